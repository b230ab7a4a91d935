"""One rule for every op: Triton on CUDA when Triton imports and the shape is supported,
the PyTorch reference otherwise; and a Triton kernel is trusted only after it has matched
its reference once.

Each op module in ``kernels/`` has ``<op>_reference`` (the truth and the CPU path),
``<op>_triton`` and the dispatcher ``<op>``, which calls :func:`route`: :func:`pick` says which
to run, :func:`run` takes the Triton route. At the first call of each shape class (op, GPU, dtypes,
ranks, sizes rounded up to powers of two, the other arguments) :func:`run` computes a small
slice of the call with both and compares them; a kernel that fails to compile, raises, or
disagrees is not used for that class again: the reference computes instead, after one
warning per kernel and GPU that names both and the error. A new GPU, driver or Triton
release can break a kernel that the interpreter and the GPU it was written on accepted;
this turns that into a slower run, not a wrong picture.

Backends (``with backend(...)`` or ``ACCEL_KERNEL_BACKEND``): ``None`` (the rule above),
``"reference"``, ``"triton"`` (the kernel itself, no check and no fallback: tests force it
on CPU tensors under ``TRITON_INTERPRET=1`` so they cannot pass on the wrong path), and
``"checked"`` (the CUDA rule, on any device the kernel can run on: the interpreter in tests).
:func:`fault` makes a kernel fail on purpose, to test the fallback.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

try:  # Triton is optional: the pack must import where it is missing. The kernels take it from here.
    import triton
    import triton.language as tl
except Exception as e:  # ImportError, or a broken install raising anything else
    log.debug("Triton unavailable: %s", e)
    triton = tl = None

_state = threading.local()
BACKENDS = (None, "triton", "reference", "checked")


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def backend(name: str | None):
    """Force ``"triton"`` or ``"reference"`` for the ops called inside the block (thread-local)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use 'triton', 'reference' or 'checked'")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def forced_backend() -> str | None:
    return getattr(_state, "forced", None) or os.environ.get("ACCEL_KERNEL_BACKEND") or None


def pick(*tensors: torch.Tensor, supported: bool = True) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op on ``tensors``.

    ``supported`` is the op's own verdict on shapes and dtypes. A forced ``"triton"``
    on an unsupported shape is an error, never a silent fallback, so tests cannot
    pass on the wrong path.
    """
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("the Triton backend was forced but Triton does not import")
        if not supported:
            raise RuntimeError("the Triton backend was forced on a shape or dtype the kernel does not support")
        if not interpreting() and not all(t.is_cuda for t in tensors):
            raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
        return "triton"
    on_device = all(t.is_cuda for t in tensors) or (forced == "checked" and interpreting())
    if supported and triton_available() and on_device:
        return "triton"
    return "reference"


# ---------------------------------------------------------------- the first-use check

CHECK_ROWS = 16            # rows (or batch items) of the slice both paths compute
CHECK_TOLERANCE = 2e-2     # relative L2 error allowed per output (bf16 rounding is ~4e-3)
MAX_CLASSES = 4096         # remembered verdicts; beyond, they are forgotten and checked again

_verdicts: dict[tuple, str | None] = {}   # shape class -> None (trusted) or why not
_warned: set[tuple[str, str]] = set()     # (op, GPU) pairs already warned about
_faults: dict[str, str] = {}              # op -> "error" | "mismatch" (tests only)
_lock = threading.Lock()


@contextlib.contextmanager
def fault(op: str, kind: str = "error"):
    """Inside the block, ``op``'s Triton kernel raises (``"error"``, as a compile error would) or
    returns wrong numbers (``"mismatch"``). For tests of the fallback; any thread sees it."""
    if kind not in ("error", "mismatch"):
        raise ValueError(f"unknown fault {kind!r}; use 'error' or 'mismatch'")
    previous = _faults.get(op)
    _faults[op] = kind
    try:
        yield
    finally:
        if previous is None:
            _faults.pop(op, None)
        else:
            _faults[op] = previous


def reset() -> None:
    """Forget every verdict and warning (tests; a new Triton in the same process)."""
    with _lock:
        _verdicts.clear()
        _warned.clear()


def verdict(op: str) -> dict[tuple, str | None]:
    """The verdicts of ``op`` so far: shape class -> None (kernel in use) or the reason it is not."""
    return {k: v for k, v in _verdicts.items() if k[0] == op}


def first_rows(t, n: int = CHECK_ROWS):
    """The first ``n`` rows of a 2-D (or [..., K]-flattened) tensor; other values unchanged."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t.reshape(-1, t.shape[-1])[:n] if t.dim() > 2 else t[:n]


def head_rows(args: tuple) -> tuple:
    """The usual first-use slice: the first rows of the first argument, the others whole."""
    return (first_rows(args[0]), *args[1:])


def gpu_before_ampere(device: torch.device) -> bool:
    """Triton's int8 and 16-bit tensor-core dots need compute capability 8.0 (Ampere); older GPUs
    keep the reference (cuBLAS)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)


def route(op: str, kernel: Callable, reference: Callable, args: tuple, tensors: tuple, supported: bool,
          small: Callable[[tuple], tuple] = head_rows, compare: Callable | None = None):
    """A dispatcher's body: :func:`pick` for ``tensors``, then the Triton route (:func:`run`) or
    ``reference(*args)``."""
    if pick(*tensors, supported=supported) == "triton":
        return run(op, kernel, reference, args, small, compare)
    return reference(*args)


def run(op: str, kernel: Callable, reference: Callable, args: tuple, small: Callable[[tuple], tuple],
        compare: Callable | None = None):
    """The Triton route of a dispatcher: ``kernel(*args)``, trusted after its shape class passed
    the first-use check (``small(args)``: the arguments of a small slice of the same call;
    ``compare(kernel_out, reference_out)``: None or what differs, default :func:`difference`)."""
    if forced_backend() == "triton":
        return _call(op, kernel, args)
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    key = (op, str(device), *(_arg_class(a) for a in args))
    with _lock:
        known = key in _verdicts
        problem = _verdicts.get(key)
    if not known:
        problem = _check(op, kernel, reference, small(args), compare or difference)
        with _lock:
            if len(_verdicts) >= MAX_CLASSES:
                _verdicts.clear()
            _verdicts[key] = problem
        if problem is not None:
            _warn(op, device, problem)
    if problem is not None:
        return reference(*args)
    return _call(op, kernel, args)


def _call(op: str, kernel: Callable, args: tuple):
    kind = _faults.get(op)
    if kind == "error":
        raise RuntimeError(f"injected failure of the {op} kernel (dispatch.fault)")
    out = kernel(*args)
    if kind == "mismatch":
        out = _map(out, lambda t: -t - 1 if t.is_floating_point() else ~t)
    return out


def _check(op: str, kernel: Callable, reference: Callable, args: tuple, compare: Callable) -> str | None:
    try:
        got = _call(op, kernel, args)
    except Exception as e:  # compile errors, launch failures, anything the kernel raises
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return compare(got, reference(*args))


def _warn(op: str, device: torch.device, problem: str) -> None:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (Triton interpreter)"
    with _lock:
        if (op, gpu) in _warned:
            return
        _warned.add((op, gpu))
    log.warning("ComfyUI-Accel: the Triton kernel %s failed its first-use check on %s (%s); the PyTorch "
                "reference computes these shapes instead (slower, same results)", op, gpu, problem)


def difference(got, want, tolerance: float = CHECK_TOLERANCE) -> str | None:
    """None when every output of the kernel is within ``tolerance`` (relative L2) of the
    reference's, else what differs. Where the reference is finite the kernel must be too."""
    got_t, want_t = _flat(got), _flat(want)
    if len(got_t) != len(want_t):
        return f"it returned {len(got_t)} outputs, the reference {len(want_t)}"
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        if g is None or w is None:
            if (g is None) != (w is None):
                return f"output {i} is missing on one side"
            continue
        if tuple(g.shape) != tuple(w.shape):
            return f"output {i} has shape {list(g.shape)}, the reference {list(w.shape)}"
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        finite = torch.isfinite(w)
        if not torch.isfinite(g[finite]).all():
            return f"output {i} has NaN or infinite values where the reference has none"
        err = float((g[finite] - w[finite]).norm()) / max(float(w[finite].norm()), 1e-30)
        if err > tolerance or math.isnan(err):
            return f"output {i} is off by {err:.3g} (relative L2; allowed {tolerance:g})"
    return None


def _flat(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


def _map(out, fn):
    if isinstance(out, tuple):
        return tuple(_map(o, fn) for o in out)
    return fn(out) if isinstance(out, torch.Tensor) else out


def _arg_class(a):
    """A call argument's part of the shape class: dtype, rank and each size rounded up to a
    power of two for tensors; the value itself for small scalars."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, tuple(1 << max(int(d) - 1, 0).bit_length() for d in a.shape))
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
        return a
    return type(a).__name__
