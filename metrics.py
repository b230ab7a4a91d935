"""Fidelity metrics: PSNR, SQNR, SSIM. Torch only.

One home for the numbers every report and benchmark quotes: the nodes' reports (layer
SQNR, reconstruction PSNR) and ``lab/bench/`` use the same definitions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def _pair(ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != x.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(x.shape)}")
    # float64 on the CPU: the sums of squares of a large latent lose digits in fp32.
    return ref.detach().to("cpu", torch.float64), x.detach().to("cpu", torch.float64)


def _data_range(ref: torch.Tensor, data_range: float | None) -> float:
    if data_range is not None:
        return data_range
    spread = (ref.max() - ref.min()).item()
    if spread == 0:
        raise ValueError("the reference is constant: pass data_range explicitly")
    return spread


def psnr(ref: torch.Tensor, x: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / MSE)``; ``inf`` when identical.

    ``data_range`` defaults to ``ref.max() - ref.min()``: latents have no fixed range, so the
    reference's own spread is the peak. Pass ``data_range=1.0`` for images in [0, 1].
    """
    ref, x = _pair(ref, x)
    mse = (ref - x).pow(2).mean().item()
    if mse == 0:
        return math.inf
    return 10 * math.log10(_data_range(ref, data_range)**2 / mse)


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
    data_range = _data_range(ref, data_range)
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
