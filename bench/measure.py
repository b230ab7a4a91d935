"""Measurement toolkit: fidelity (PSNR, SSIM, SQNR), timing side by side, memory.

No ComfyUI import: benchmarks and tests use it alone. Every speed claim is a ratio
against a baseline timed in the same run (see :func:`compare_timings`).
"""
from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import resource
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- fidelity


def _pair(ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != x.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(x.shape)}")
    # float64 on the CPU: the sums of squares of a large latent lose digits in fp32.
    return ref.detach().to("cpu", torch.float64), x.detach().to("cpu", torch.float64)


def psnr(ref: torch.Tensor, x: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / MSE)``; ``inf`` when identical.

    ``data_range`` defaults to ``ref.max() - ref.min()``: latents have no fixed range, so the
    reference's own spread is the peak. Pass ``data_range=1.0`` for images in [0, 1].
    """
    ref, x = _pair(ref, x)
    mse = (ref - x).pow(2).mean().item()
    if mse == 0:
        return math.inf
    if data_range is None:
        data_range = (ref.max() - ref.min()).item()
        if data_range == 0:
            raise ValueError("the reference is constant: pass data_range explicitly")
    return 10 * math.log10(data_range**2 / mse)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum(ref**2) / sum((ref - x)**2))``."""
    ref, x = _pair(ref, x)
    noise = (ref - x).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref.pow(2).sum().item() / noise)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim(ref: torch.Tensor, x: torch.Tensor, data_range: float | None = None) -> float:
    """Mean SSIM (Wang et al. 2004) over 2-D planes: the last two dims are H, W, all others a batch.

    So a latent ``[B, C, H, W]`` is B*C planes and a video latent ``[B, C, T, H, W]`` is B*C*T.
    Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering (no padding); a plane
    smaller than 11 uses a window as large as its smaller side (odd). ``data_range`` defaults to
    ``ref.max() - ref.min()`` as in :func:`psnr`. For ComfyUI IMAGE tensors use :func:`ssim_image`.
    """
    ref, x = _pair(ref, x)
    if ref.dim() < 2:
        raise ValueError(f"ssim needs at least [H, W], got shape {tuple(ref.shape)}")
    if data_range is None:
        data_range = (ref.max() - ref.min()).item()
        if data_range == 0:
            raise ValueError("the reference is constant: pass data_range explicitly")
    H, W = ref.shape[-2:]
    size = min(11, H, W)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian_window(size, 1.5)
    ref, x = ref.reshape(-1, 1, H, W), x.reshape(-1, 1, H, W)

    def blur(t):  # separable Gaussian: rows then columns
        return F.conv2d(F.conv2d(t, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_r, mu_x = blur(ref), blur(x)
    var_r = blur(ref * ref) - mu_r.pow(2)
    var_x = blur(x * x) - mu_x.pow(2)
    cov = blur(ref * x) - mu_r * mu_x
    ssim_map = ((2 * mu_r * mu_x + c1) * (2 * cov + c2)) / ((mu_r.pow(2) + mu_x.pow(2) + c1) * (var_r + var_x + c2))
    return ssim_map.mean().item()


def ssim_image(ref: torch.Tensor, x: torch.Tensor) -> float:
    """SSIM of ComfyUI IMAGE tensors ``[B, H, W, C]`` in [0, 1] (data range 1), per channel plane."""
    return ssim(ref.movedim(-1, -3), x.movedim(-1, -3), data_range=1.0)


# ---------------------------------------------------------------- timing


def _sync() -> None:
    # CUDA work is asynchronous: without a sync the clock stops before the kernels finish.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _summary(runs: list[float]) -> dict:
    return dict(median_s=statistics.median(runs), min_s=min(runs), runs=runs)


def time_fn(fn: Callable[[], object], warmup: int = 2, repeat: int = 5) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; ``{median_s, min_s, runs}`` in seconds."""
    for _ in range(warmup):
        fn()
    return _summary([_timed(fn) for _ in range(repeat)])


def compare_timings(
    baseline_fn: Callable[[], object],
    variant_fns: dict[str, Callable[[], object]],
    warmup: int = 2,
    repeat: int = 5,
) -> dict:
    """Time a baseline and its variants interleaved round by round, so drift hits all alike.

    Returns ``{"baseline": summary, "variants": {name: summary + speedup + time_ratio}}`` where
    a summary is :func:`time_fn`'s dict, ``speedup = baseline median / variant median`` (> 1 is
    faster) and ``time_ratio`` is its inverse. The order within a round rotates each round so
    no function always runs first (cold caches) or last.
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
            runs[name].append(_timed(fns[name]))
    baseline = _summary(runs["baseline"])
    variants = {}
    for name in variant_fns:
        summary = _summary(runs[name])
        summary["speedup"] = baseline["median_s"] / summary["median_s"]
        summary["time_ratio"] = summary["median_s"] / baseline["median_s"]
        variants[name] = summary
    return dict(baseline=baseline, variants=variants)


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
    """Weight bytes of a ComfyUI ModelPatcher's diffusion model as it will run.

    Modules swapped in by object patches (our quantized layers) count instead of the
    modules they replace, whether or not the patches are applied right now.
    """
    model = patcher.model
    total = weight_bytes(model.diffusion_model)
    for key, patch in patcher.object_patches.items():
        if not (key.startswith("diffusion_model.") and isinstance(patch, torch.nn.Module)):
            continue
        current = model  # what the model holds now, counted above
        for name in key.split("."):
            current = getattr(current, name)
        if current is not patch:
            total += weight_bytes(patch) - weight_bytes(current)
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


def peak_rss_increase_bytes(fn: Callable, *args, **kwargs) -> int:
    """Peak RSS growth while ``fn(*args, **kwargs)`` runs in a fresh process.

    ``fn`` must be picklable (a module-level function); imports done before the call (torch,
    the pack) are part of the child's starting point, not of the increase. Exact on Linux (the
    child resets its high-water mark first); elsewhere a lower bound.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_peak_rss_increase_child, fn, args, kwargs).result()
