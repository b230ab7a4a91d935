"""One rule for every op: Triton on CUDA when Triton imports and the shape is supported,
the PyTorch reference otherwise.

Each op module in ``kernels/`` has ``<op>_reference`` (the truth and the CPU path),
``<op>_triton`` and the dispatcher ``<op>`` that asks :func:`pick` which to run.
Tests force the Triton path on CPU tensors under ``TRITON_INTERPRET=1`` with
``with backend("triton"):``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

_state = threading.local()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        log.debug("Triton unavailable: %s", e)
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def backend(name: str | None):
    """Force ``"triton"`` or ``"reference"`` for the ops called inside the block (thread-local)."""
    if name not in (None, "triton", "reference"):
        raise ValueError(f"unknown kernel backend {name!r}; use 'triton' or 'reference'")
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
    if supported and triton_available() and all(t.is_cuda for t in tensors):
        return "triton"
    return "reference"
