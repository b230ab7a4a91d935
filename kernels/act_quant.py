"""Dynamic per-token (per-row) symmetric int8 quantization of activations.

``quantize_rows_int8(x) -> (q, scale)`` with ``x ~= q * scale[:, None]``, ``q`` int8 in
[-127, 127] and ``scale = absmax(row) / 127`` in float32. All-zero rows get scale 1.

The reference is written for the CPU's sake as well as the truth: one reduction pass
(``vector_norm`` with ord=inf needs no ``abs`` temporary), one multiply (in float32, so a
bfloat16 product is not rounded to 8 bits before the integer rounding), one in-place round
and one narrowing cast; no clamp is needed because ``|x| * 127 / absmax <= 127``.
"""
from __future__ import annotations

import torch

from . import dispatch

_BLOCK_K = 1024


def quantize_rows_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).float()
    amax = torch.where(amax > 0, amax, torch.full_like(amax, 127.0))
    q = torch.mul(x, 127.0 / amax).round_().to(torch.int8)
    return q, (amax / 127.0).squeeze(-1)


def quantize_rows_int8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    block = min(_BLOCK_K, triton.next_power_of_2(k))
    _kernel()[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block)
    return q, scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` is 2-D [rows, K] in float32/float16/bfloat16."""
    supported = x.dim() == 2 and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.stride(-1) == 1
    if dispatch.pick(x, supported=supported) == "triton":
        return quantize_rows_int8_triton(x)
    return quantize_rows_int8_reference(x)


_compiled = None


def _kernel():
    global _compiled
    if _compiled is not None:
        return _compiled
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_int8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        x_row = x_ptr + row * stride_x
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.max(amax, axis=0)
        m = tl.where(m > 0, m, 127.0)
        inv = 127.0 / m
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            r = v * inv
            # round half away from zero, then clamp for safety against float error
            r = tl.where(r >= 0, tl.floor(r + 0.5), tl.ceil(r - 0.5))
            r = tl.minimum(tl.maximum(r, -127.0), 127.0)
            tl.store(q_ptr + row * stride_q + offs, r.to(tl.int8), mask=offs < K)
        tl.store(s_ptr + row, m / 127.0)

    _compiled = quantize_rows_int8_kernel
    return _compiled
