"""Small quantizers shared by the quantization formats: symmetric absmax int8 per row.

Per token (activations, computed on the fly) and per output channel (weights, computed
once) are the same operation on rows: ``scale = max|row| / 127`` and
``q = round(row / scale)``, so ``|x - q * scale| <= scale / 2`` element-wise.
The grid is symmetric [-127, 127]; -128 is never produced, so negating a code is safe.
"""
from __future__ import annotations

import torch

INT8_MAX = 127

# Only all-zero rows hit this floor; it keeps 1/scale finite so they quantize to zeros.
_MIN_SCALE = 1e-12


def row_scale(x32: torch.Tensor, top: float) -> torch.Tensor:
    """``max|row| / top`` of each row (last dim) of a float32 tensor, as [..., 1]."""
    # amax and amin are two cheap reductions; abs().amax() allocates a full-size temporary.
    absmax = torch.maximum(x32.amax(dim=-1, keepdim=True), x32.amin(dim=-1, keepdim=True).neg_())
    return absmax.clamp_(min=_MIN_SCALE).div_(top)


def _quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are the last dim: returns ``q`` (int8, shape of x) and ``scale`` (fp32, [..., 1])."""
    # Work in fp32: bf16 has too few mantissa bits to hold x/scale to better than half a code,
    # and mixed bf16 * fp32 elementwise kernels are ~20x slower on the CPU than a cast first.
    x32 = x.float()
    scale = row_scale(x32, INT8_MAX)
    # Multiplying by the reciprocal is cheaper than dividing. No clamp is needed: |x| <= 127 * scale
    # by construction, and the float error of x * (1/scale) is far below the 0.5 that round() absorbs.
    scaled = x32 * scale.reciprocal() if x32 is x else x32.mul_(scale.reciprocal())
    return scaled.round_().to(torch.int8), scale


def quantize_per_token_int8(x: torch.Tensor, inv_smooth: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[..., K]`` -> (``q`` int8 ``[..., K]``, ``scale`` fp32 ``[..., 1]``), one scale per token.
    ``inv_smooth`` [K] (SmoothQuant) multiplies ``x`` first, folded into the float32 copy the
    quantizer makes anyway (one in-place pass instead of a pass in x's dtype before it)."""
    if inv_smooth is not None:
        x = x.to(torch.float32, copy=True).mul_(inv_smooth)
    return _quantize_rows_int8(x)


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[N, K]`` (nn.Linear layout) -> (``q`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``), one per output channel."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    q, scale = _quantize_rows_int8(w)
    return q, scale.squeeze(1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` with ``scale`` broadcastable over ``q`` (``[..., 1]`` per row; per-channel weights: ``scale[:, None]``)."""
    return (q.float() * scale).to(dtype)
