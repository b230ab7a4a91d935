"""Measurement toolkit: fidelity (PSNR, SSIM, SQNR), timing side by side, memory.

No ComfyUI import: benchmarks and tests use it alone. Every speed claim is a ratio
against a baseline timed in the same run (see :func:`compare_timings`).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
from typing import Callable

import torch

# Fidelity metrics live in metrics.py, shared with the nodes' reports.


# ---------------------------------------------------------------- timing


AUTORANGE_SECONDS = 0.2   # per function and round: torch.utils.benchmark's own default


def _seconds(fn: Callable[[], object], autorange: bool) -> float:
    """Seconds per call of ``fn``, timed by ``torch.utils.benchmark`` (it synchronizes an accelerator).

    ``autorange`` (cheap calls: a kernel, a layer): the Timer's ``blocked_autorange``, which warms
    up, then times blocks of calls for ``AUTORANGE_SECONDS``; its median per call. Otherwise (whole
    sampling runs) one call on the same clock: the Timer's warm-up call would double each round.
    """
    from torch.utils import benchmark   # imports torch's C++ extension tooling, which warns without CUDA
    if autorange:
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=AUTORANGE_SECONDS).median
    start = benchmark.timer()
    fn()
    return benchmark.timer() - start


def _summary(runs: list[float]) -> dict:
    return dict(median_s=statistics.median(runs), min_s=min(runs), max_s=max(runs), runs=runs)


def speed(base_runs: list[float], runs: list[float]) -> dict:
    """``runs`` against ``base_runs`` timed in the same rounds: the median time and its range, the
    speedup (ratio of medians) and the range of the per-round ratios."""
    ratios = [b / v for b, v in zip(base_runs, runs)]
    return {**_summary(runs), "speedup": statistics.median(base_runs) / statistics.median(runs),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def time_fn(fn: Callable[[], object], warmup: int = 2, repeat: int = 5, autorange: bool = False) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then time it ``repeat`` times (see ``_seconds`` for
    ``autorange``); ``{median_s, min_s, max_s, runs}`` in seconds."""
    for _ in range(warmup):
        fn()
    return _summary([_seconds(fn, autorange) for _ in range(repeat)])


def compare_timings(
    baseline_fn: Callable[[], object],
    variant_fns: dict[str, Callable[[], object]],
    warmup: int = 2,
    repeat: int = 5,
    autorange: bool = False,
) -> dict:
    """Time a baseline and its variants interleaved round by round, so drift hits all alike.

    Returns ``{"baseline": summary, "variants": {name: summary + speed + time_ratio}}`` where a
    summary is :func:`time_fn`'s dict, the speed fields are :func:`speed`'s (``speedup = baseline
    median / variant median``, > 1 is faster) and ``time_ratio`` is the speedup's inverse. The
    order within a round rotates each round so no function always runs first (cold caches) or
    last. ``autorange``: see ``_seconds``.
    """
    fns = {"baseline": baseline_fn, **variant_fns}
    if len(fns) != len(variant_fns) + 1:
        raise ValueError("a variant may not be named 'baseline'")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    runs = {name: [] for name in names}
    for round_index in range(repeat):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(_seconds(fns[name], autorange))
    variants = {name: speed(runs["baseline"], runs[name]) for name in variant_fns}
    for summary in variants.values():
        summary["time_ratio"] = 1 / summary["speedup"]
    return dict(baseline=_summary(runs["baseline"]), variants=variants)


# ---------------------------------------------------------------- memory


def _storage_tensors(t: torch.Tensor):
    """Plain tensors that hold ``t``'s data: wrapper subclasses (QuantizedTensor...) are opened up."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        inner_names, _ = t.__tensor_flatten__()
        for name in inner_names:
            yield from _storage_tensors(getattr(t, name))
    else:
        yield t


def weight_bytes(module_or_state_dict: torch.nn.Module | dict) -> int:
    """Bytes of parameters and buffers as stored: ``numel * element_size`` of the real storage dtype.

    Packed formats count their packed bytes (int4 packed two per uint8 counts 0.5 byte per weight),
    quantized tensor subclasses count their inner data and scales, and a tensor that appears twice
    (tied weights) counts once.
    """
    if isinstance(module_or_state_dict, torch.nn.Module):
        tensors = list(module_or_state_dict.parameters()) + list(module_or_state_dict.buffers())
    else:
        tensors = [v for v in module_or_state_dict.values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for tensor in tensors:
        for t in _storage_tensors(tensor):
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_weight_bytes(patcher) -> int:
    """Weight bytes of a ComfyUI ModelPatcher's diffusion model as it will run: every
    parameter and buffer as stored (quantized layers at their packed size, kept layers at
    their own dtype).

    Clones share one ``torch.nn.Module``, and whichever clone ran last has its object patches
    installed in it. So each patched path counts what *this* patcher resolves it to
    (``get_model_object``: its own patch, else the original from ``object_patches_backup``)
    instead of what the shared module happens to hold.
    """
    model = patcher.model
    total = weight_bytes(model.diffusion_model)
    keys = set(patcher.object_patches) | set(getattr(patcher, "object_patches_backup", {}))
    for key in keys:
        if not key.startswith("diffusion_model."):
            continue
        wanted = patcher.get_model_object(key)
        current = model  # what the shared module holds now, counted above
        for name in key.split("."):
            current = getattr(current, name)
        if wanted is not current and isinstance(wanted, torch.nn.Module) and isinstance(current, torch.nn.Module):
            total += weight_bytes(wanted) - weight_bytes(current)
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage`` maxrss; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> bool:
    """Linux: reset this process's high-water mark (VmHWM) to its current RSS; False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand memory that malloc keeps after frees back to the OS (glibc), so a later run's
    growth is its own and not hidden by earlier runs' freed pages."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _peak_rss_increase_child(fn, args, kwargs) -> int:
    # The child's high-water mark already holds its import spikes; reset it so only fn's peak counts.
    if _reset_peak_rss():
        before = _rss_kib("VmRSS")
        fn(*args, **kwargs)  # the result is dropped here, not sent back
        return (_rss_kib("VmHWM") - before) * 1024
    before = peak_rss_bytes()  # no reset available: the increase is a lower bound
    fn(*args, **kwargs)
    return peak_rss_bytes() - before


def peak_rss_during(fn: Callable, *args, **kwargs) -> tuple[object, int | None]:
    """``(fn(*args, **kwargs), peak RSS growth while it ran)`` in this process (Linux: the
    high-water mark is reset first; elsewhere ``None``). In-process, memory the allocator kept
    from earlier work is reused, so this is the run's own working set beyond what was already
    resident (weights included), not a cold-start figure: see :func:`peak_rss_increase_bytes`."""
    _release_free_memory()
    if not _reset_peak_rss():
        return fn(*args, **kwargs), None
    before = _rss_kib("VmRSS")
    result = fn(*args, **kwargs)
    return result, max(_rss_kib("VmHWM") - before, 0) * 1024


def peak_rss_increase_bytes(fn: Callable, *args, **kwargs) -> int:
    """Peak RSS growth while ``fn(*args, **kwargs)`` runs in a fresh process.

    ``fn`` must be picklable (a module-level function); imports done before the call (torch,
    the pack) are part of the child's starting point, not of the increase. Exact on Linux (the
    child resets its high-water mark first); elsewhere a lower bound.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_peak_rss_increase_child, fn, args, kwargs).result()
