"""W4A4 linear with a fused low-rank branch (SVDQuant's compute, the nunchaku layout).

A branched layer computes ``y = Q(x~) @ Q(R)^T + (x~ @ L1) @ L2 + bias`` where ``x~ = x * inv_smooth``
(SmoothQuant), ``R`` the 4-bit residual weight, ``L1 [K, r]`` and ``L2 [r, N]`` the 16-bit branch.
The activations are read once:

- ``quantize_act_4bit(x, inv_smooth, down, block)``: one pass over ``x`` that smooths it,
  quantizes it to 4 bits and computes the branch's down projection ``x~ @ L1`` from the same
  tiles. Returns ``(x8, x_scale, lora_act)``;
- the quantized GEMM (``lowbit_gemm.w4a8_gemm``) adds ``lora_act @ L2`` in its epilogue.

4-bit activations, two levels (so that the matmul runs on the int8 path, ``torch._int_mm`` on
the CPU, the way W4A8 weights do): an fp32 scale per token ``s = max|x~| / 119`` and an integer
scale ``g`` in 1..17 per group of ``block`` along K, with codes ``c`` in -7..7;
``x~ ~= s * g * c`` and ``g * c`` is an exact int8 (|.| <= 119). A group whose range is below
1/17 of the token's largest keeps the token-wide step (the format's limit of dynamic range).
"""
from __future__ import annotations

import torch

from . import dispatch, lowbit_gemm
from .dispatch import tl, triton
from .quant_primitives import row_scale


LEVEL1 = 119.0   # 7 codes x 17 group steps: the largest exact int8 value


# ---------------------------------------------------------------- reference


def quantize_act_4bit_reference(x: torch.Tensor, inv_smooth: torch.Tensor | None, down: torch.Tensor | None,
                                block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    m, k = x.shape
    x32 = x.to(torch.float32, copy=True)
    if inv_smooth is not None:
        x32.mul_(inv_smooth.to(torch.float32))
    lora_act = None if down is None else x32 @ down.to(torch.float32)
    scale = row_scale(x32, LEVEL1)
    xg = x32.mul_(scale.reciprocal()).reshape(m, k // block, block)
    gscale = xg.abs().amax(dim=-1, keepdim=True).div_(7.0).ceil_().clamp_(1, 17)
    codes = xg.div_(gscale).round_().clamp_(-7, 7).mul_(gscale)
    return codes.reshape(m, k).to(torch.int8), scale, lora_act


# ---------------------------------------------------------------- Triton


if tl is not None:
    @triton.jit
    def _smoothed_tile(x_ptr, inv_ptr, offs_m, k, mask_m, stride_xm, HAS_SMOOTH: tl.constexpr):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None], other=0.0)
        x = x.to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_ptr + k)[None, :]
        return x

    @triton.jit
    def _act_4bit_kernel(x_ptr, inv_ptr, down_ptr, q_ptr, s_ptr, la_ptr, M, K, R, stride_xm,
                         HAS_SMOOTH: tl.constexpr, HAS_DOWN: tl.constexpr, R_PAD: tl.constexpr,
                         BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_g = tl.arange(0, BLOCK)
        mask_m = offs_m < M
        # pass 1: the token's largest smoothed value
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + offs_g
            x = _smoothed_tile(x_ptr, inv_ptr, offs_m, k, mask_m, stride_xm, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.maximum(amax, 1e-12) / 119.0
        tl.store(s_ptr + offs_m, scale, mask=mask_m)
        # pass 2: group scales and codes, and the branch's down projection from the same tiles
        r = tl.arange(0, R_PAD)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + offs_g
            x = _smoothed_tile(x_ptr, inv_ptr, offs_m, k, mask_m, stride_xm, HAS_SMOOTH)
            if HAS_DOWN:
                d = tl.load(down_ptr + k[:, None] * R + r[None, :], mask=(r < R)[None, :], other=0.0)
                acc += tl.dot(x, d.to(tl.float32))
            xs = x / scale[:, None]
            g = tl.minimum(tl.maximum(tl.ceil(tl.max(tl.abs(xs), axis=1) / 7.0), 1.0), 17.0)
            c = xs / g[:, None]
            c = tl.where(c >= 0, tl.floor(c + 0.5), tl.ceil(c - 0.5))  # round half away from zero
            c = tl.minimum(tl.maximum(c, -7.0), 7.0) * g[:, None]
            tl.store(q_ptr + offs_m[:, None] * K + k[None, :], c.to(tl.int8), mask=mask_m[:, None])
        if HAS_DOWN:
            tl.store(la_ptr + offs_m[:, None] * R + r[None, :], acc, mask=mask_m[:, None] & (r < R)[None, :])


def quantize_act_4bit_triton(x, inv_smooth, down, block):
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    r = 0 if down is None else down.shape[1]
    lora_act = torch.empty(m, r, dtype=torch.float32, device=x.device) if r else None
    block_m = 16 if dispatch.interpreting() else 32
    dummy = scale
    _act_4bit_kernel[(triton.cdiv(m, block_m),)](
        x, inv_smooth.float().contiguous() if inv_smooth is not None else dummy,
        down.contiguous() if r else dummy, q, scale, lora_act if r else dummy, m, k, r, x.stride(0),
        HAS_SMOOTH=inv_smooth is not None, HAS_DOWN=r > 0, R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
        BLOCK=block, BLOCK_M=block_m)
    return q, scale, lora_act


# ---------------------------------------------------------------- dispatchers


def quantize_act_4bit(x: torch.Tensor, inv_smooth: torch.Tensor | None = None, down: torch.Tensor | None = None,
                      block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x [M, K]`` -> (int8 ``g * c`` [M, K], fp32 token scale [M, 1], ``(x * inv_smooth) @ down`` fp32 [M, r] or None)."""
    supported = (x.dim() == 2 and x.stride(1) == 1 and block >= 16 and block & (block - 1) == 0
                 and x.shape[1] % block == 0 and (down is None or down.shape[1] <= 256))
    return dispatch.route("quantize_act_4bit", quantize_act_4bit_triton, quantize_act_4bit_reference,
                          (x, inv_smooth, down, block), (x,), supported)


def w4a4_linear(x: torch.Tensor, packed: torch.Tensor, group_scale: torch.Tensor, scale: torch.Tensor, block: int,
                bias: torch.Tensor | None = None, inv_smooth: torch.Tensor | None = None,
                down: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """A W4A4 layer (weights as ``lowbit_gemm.w4a8_gemm`` stores them), with an optional branch
    ``down [K, r]``, ``up [r, N]``; output in ``x.dtype``."""
    xq, xs, lora_act = quantize_act_4bit(x, inv_smooth, down, block)
    return lowbit_gemm.w4a8_gemm(xq, xs, packed, group_scale, scale, block, bias, x.dtype, lora_act, up)


def branch_output(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``(x @ down) @ up`` in fp32: the branch for formats without a fused path."""
    return (x.to(torch.float32) @ down.to(torch.float32)) @ up.to(torch.float32)
