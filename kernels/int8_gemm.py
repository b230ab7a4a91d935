"""W8A8 int8 GEMM: per-token activation scales, per-output-channel weight scales.

``int8_gemm(xq, x_scale, wq, w_scale, bias)`` = ``(xq @ wq.T) * x_scale * w_scale + bias``
with xq ``[M, K]`` int8, x_scale ``[M, 1]`` (or ``[M]``), wq ``[N, K]`` int8 (nn.Linear layout),
w_scale ``[N]``. The int8 products are summed exactly in int32; the scales and the bias are
applied in fp32 and the result is cast to ``out_dtype``.

Reference (the CPU path and the truth): ``torch._int_mm``. What it accepts on torch 2.14:
- CPU: any M, K, N >= 0 and any strides, int8 or uint8 (uint8 is read as unsigned), with one
  bug: K == 1 with ``wq.t()`` as mat2 (strides (1, 1)) returns garbage, so K == 1 takes an
  exact int32 matmul instead.
- CUDA (cuBLAS): M > 16, K and N multiples of 8 (checked in ATen); other shapes are zero-padded
  up to those (zeros add nothing to an integer sum, so the result stays exact).
CPU timings against fp32 and bf16 matmuls are in docs/quantization.md.
"""
from __future__ import annotations

import functools
import logging

import torch

from . import dispatch
from .dispatch import tl, triton
from .quant_primitives import quantize_per_token_int8

log = logging.getLogger(__name__)


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_operands(xq: torch.Tensor, wq: torch.Tensor) -> None:
    if xq.dim() != 2 or wq.dim() != 2:
        raise ValueError(f"int8_gemm takes 2-D xq [M, K] and wq [N, K], got {tuple(xq.shape)} and {tuple(wq.shape)}")
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"int8_gemm takes int8 operands, got {xq.dtype} and {wq.dtype}")
    if xq.shape[1] != wq.shape[1]:
        raise ValueError(f"inner dims differ: xq {tuple(xq.shape)} vs wq {tuple(wq.shape)}")


# ---------------------------------------------------------------- reference


def _int_mm_padded(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(xq, wq.T)`` after zero-padding to cuBLAS's rules (M > 16, K and N multiples of 8)."""
    M, K = xq.shape
    N = wq.shape[0]
    pad_m, pad_k, pad_n = max(17 - M, 0), -K % 8, -N % 8
    if pad_m or pad_k:
        xq = torch.nn.functional.pad(xq, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        # Copies the weight: real layers have K and N in multiples of 64, so this is for odd test shapes.
        wq = torch.nn.functional.pad(wq, (0, pad_k, 0, pad_n))
    return torch._int_mm(xq, wq.t())[:M, :N]


_warned: set[str] = set()   # device types warned about; a handful at most


def int8_matmul_int32(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact ``xq @ wq.T`` in int32 for int8 xq ``[M, K]`` and wq ``[N, K]``, on any shape."""
    _check_operands(xq, wq)
    M, K = xq.shape
    N = wq.shape[0]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=torch.int32, device=xq.device)
    if xq.is_cuda:
        # cuBLASLt's int8 GEMM wants row-major xq and column-major mat2, which wq.t() of a row-major wq is.
        xq, wq = xq.contiguous(), wq.contiguous()
        if M > 16 and K % 8 == 0 and N % 8 == 0:
            return torch._int_mm(xq, wq.t())
        return _int_mm_padded(xq, wq)
    if xq.device.type == "cpu":
        if K == 1:  # see the module docstring: CPU _int_mm misreads mat2 with strides (1, 1)
            return xq.to(torch.int32) @ wq.to(torch.int32).t()
        return torch._int_mm(xq, wq.t())
    # Other backends (mps, xpu, ...): try theirs; if it refuses, compute exactly on the CPU.
    try:
        return torch._int_mm(xq, wq.t())
    except (RuntimeError, NotImplementedError) as e:
        if xq.device.type not in _warned:
            _warned.add(xq.device.type)
            log.warning("torch._int_mm failed on %s (%s); computing the int8 GEMM on the CPU", xq.device.type, e)
        return int8_matmul_int32(xq.cpu(), wq.cpu()).to(xq.device)


def int8_gemm_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    acc = int8_matmul_int32(xq, wq)
    # In place on the fresh fp32 copy: the epilogue is memory-bound and each pass over M x N counts.
    out = acc.float().mul_(x_scale.reshape(-1, 1).float()).mul_(w_scale.reshape(1, -1).float())
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype)


# ---------------------------------------------------------------- Triton


def _int8_gemm_kernel(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share the same column-tiles of w while they are in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = k0 * BLOCK_K + offs_k
        # Masked lanes load 0, which adds nothing to the integer sum.
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (k[None, :] < K), other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=mask_n[None, :] & (k[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N] tile of w.T
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # Epilogue in fp32, in the reference's order: (acc * x_scale) * w_scale + bias.
    x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=None)
def _jitted_kernel():
    # Jitted on first use, not at import: triton.jit reads TRITON_INTERPRET when it decorates.
    return triton.jit(_int8_gemm_kernel)


def _launch_config(M: int) -> dict:
    if dispatch.interpreting():
        # The interpreter runs tiles one by one in numpy: small tiles, and tests then cover masking.
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1)
    # GPU tiles: untuned starting points.
    block_m = 32 if M <= 32 else 64 if M <= 64 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4 if block_m < 128 else 8, num_stages=3)


def _triton_supports(M: int, K: int, wq, w_scale, bias, out_dtype, device: torch.device) -> bool:
    """The kernel's verdict on one call's shapes and dtypes (``M`` rows of int8 activations of width ``K``)."""
    if wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] != K:
        return False
    N = wq.shape[0]
    if min(M, N, K) == 0 or out_dtype not in _OUT_DTYPES:
        return False
    if w_scale.numel() != N or (bias is not None and bias.numel() != N):
        return False
    return not dispatch.gpu_before_ampere(device)


def int8_gemm_triton(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    M, K = xq.shape
    N = wq.shape[0]
    x_scale = x_scale.reshape(M).float().contiguous()
    w_scale = w_scale.reshape(N).float().contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    config = _launch_config(M)
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    _jitted_kernel()[grid](
        xq, wq, x_scale, w_scale, bias if bias is not None else w_scale, out,
        M, N, K,
        xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        **config,
    )
    return out


# ---------------------------------------------------------------- dispatchers


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(xq @ wq.T) * x_scale * w_scale + bias`` as ``out_dtype``; see the module docstring for shapes."""
    supported = (
        xq.dim() == 2 and xq.dtype == torch.int8 and x_scale.numel() == xq.shape[0]
        and _triton_supports(xq.shape[0], xq.shape[1], wq, w_scale, bias, out_dtype, xq.device)
    )
    return dispatch.route("int8_gemm", int8_gemm_triton, int8_gemm_reference,
                          (xq, x_scale, wq, w_scale, bias, out_dtype), (xq, wq), supported,
                          lambda a: (dispatch.first_rows(a[0]), dispatch.first_rows(a[1]), *a[2:]))


def _int8_linear(gemm, x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    xq, x_scale = quantize_per_token_int8(x.reshape(-1, x.shape[-1]), inv_smooth)
    out = gemm(xq, x_scale, wq, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], wq.shape[0])


# CPU row chunks: every fp32/int32 temporary of a chunk stays under this size. Bigger ones are
# mmap'd fresh by glibc's allocator on every call (its threshold tops out at 32 MiB), and their
# page faults cost as much as the memory-bound quantizer and epilogue themselves.
_CHUNK_BYTES = 16 << 20


def int8_linear_reference(x, wq, w_scale, bias=None, inv_smooth=None):
    K, N = x.shape[-1], wq.shape[0]
    x2 = x.reshape(-1, K)
    chunks = max(1, -(-x2.shape[0] * 4 * max(K, N, 1) // _CHUNK_BYTES))  # 1 for an empty input
    rows = max(64, -(-x2.shape[0] // chunks))  # even chunks: a short last one wastes a GEMM call
    if x2.shape[0] <= rows:
        return _int8_linear(int8_gemm_reference, x, wq, w_scale, bias, inv_smooth)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    for r0 in range(0, x2.shape[0], rows):
        out[r0:r0 + rows] = _int8_linear(int8_gemm_reference, x2[r0:r0 + rows], wq, w_scale, bias, inv_smooth)
    return out.reshape(*x.shape[:-1], N)


def int8_linear_triton(x, wq, w_scale, bias=None, inv_smooth=None):
    # torch ops quantize the activations; only the GEMM is a kernel.
    return _int8_linear(int8_gemm_triton, x, wq, w_scale, bias, inv_smooth)


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """What a W8A8 QuantLinear calls: quantize ``x [..., K]`` per token (after SmoothQuant's
    ``inv_smooth`` [K], if given), then :func:`int8_gemm`; output in ``x.dtype``."""
    K = x.shape[-1] if x.dim() else 0
    rows = x.numel() // K if K else 0
    supported = x.dtype in _OUT_DTYPES and _triton_supports(rows, K, wq, w_scale, bias, x.dtype, x.device)
    return dispatch.route("int8_linear", int8_linear_triton, int8_linear_reference,
                          (x, wq, w_scale, bias, inv_smooth), (x, wq), supported)
