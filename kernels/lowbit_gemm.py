"""Matmuls with 4-bit packed weights (layouts in ``lowbit``), decoded inside the kernel.

``lowbit_linear(x, code, packed, scale, zero, global_scale, block, bias)``: W4A16,
``x [M, K]`` float times the decoded weight ``[N, K]``; ``code`` is

- ``"int4"``: asymmetric int4, ``w = (q - zero[n, k // block]) * scale[n, k // block]``
  (``scale`` fp16, ``zero`` uint8);
- ``"nvfp4"``: ``w = e2m1(q) * e4m3(scale[n, k // 16]) * global_scale`` (``scale`` as
  float8_e4m3fn);
- ``"mxfp4"``: ``w = e2m1(q) * 2 ** (scale[n, k // 32] - 127)`` (``scale`` uint8 E8M0).

``w8a16_linear(x, weight, scale, bias)``: 8-bit weights computed weight-only, decoded in the
kernel: int8 ``weight [N, K]`` with one fp32 ``scale`` per row, or float8_e4m3fn with one
fp32 scale for the tensor (GPUs without fp8 matmul; modulation layers).

``w4a8_gemm(xq, x_scale, packed, group_scale, scale, block, bias, out_dtype, lora_act, lora_up)``:
int8 activations times int4 codes whose integer group scales make ``(q - 8) * group_scale``
an exact int8 weight, summed in int32 and scaled by ``x_scale[m] * scale[n]``. With
``lora_act [M, r]`` and ``lora_up [r, N]`` (an SVDQuant low-rank branch, see
``lowrank_gemm``) the epilogue adds ``lora_act @ lora_up`` before the output is written.

References (the truth and the CPU path): decode the weight, then a float matmul or the
int8 matmul. The Triton kernels read the packed bytes once: even and odd K positions are
two ``tl.dot``s over the low and high nibbles, so no interleave is needed in-kernel.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import dispatch, lowbit
from .dispatch import tl, triton
from .int8_gemm import int8_gemm_reference


CODES = ("int4", "nvfp4", "mxfp4")
_CODE_IDS = {name: i for i, name in enumerate(CODES)}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- reference decoders


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block: int) -> torch.Tensor:
    n = packed.shape[0]
    codes = lowbit.unpack_int4(packed).reshape(n, -1, block).float()
    return ((codes - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, -1)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int,
                global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 when ``scale`` is float8_e4m3fn (times ``global_scale``), MXFP4 when it is E8M0 bytes."""
    n = packed.shape[0]
    vals = lowbit.e2m1_decode(lowbit.unpack_int4(packed)).reshape(n, -1, block)
    s = lowbit.e8m0_decode(scale) if scale.dtype == torch.uint8 else scale.float()
    if global_scale is not None:
        s = s * global_scale.float()
    return (vals * s[..., None]).reshape(n, -1)


def lowbit_linear_reference(x, code, packed, scale, zero=None, global_scale=None, block=64, bias=None):
    w = dequant_int4(packed, scale, zero, block) if code == "int4" else dequant_fp4(packed, scale, block, global_scale)
    return F.linear(x, w.to(x.dtype), bias)


# Below this many rows, ATen's fused int8-weight GEMV beats dequantize-then-matmul on a CPU
# (measured: 1 row 1 ms vs 49 ms at 3072x3072; they cross near 150 rows).
_INT8PACK_MAX_ROWS = 128


def w8a16_linear_reference(x, weight, scale, bias=None):
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.int8
            and scale.numel() == weight.shape[0] and x.shape[0] <= _INT8PACK_MAX_ROWS
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")):
        # modulation layers: one token per sample, where reading the int8 weight once is all the work
        out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale.to(x.dtype))
        return out if bias is None else out + bias.to(out.dtype)
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float()
    return F.linear(x, (weight.float() * s).to(x.dtype), bias)


def w4a8_int8_weight(packed: torch.Tensor, group_scale: torch.Tensor, block: int) -> torch.Tensor:
    """The exact int8 weight ``(q - 8) * group_scale`` of a W4A8 layer."""
    n = packed.shape[0]
    codes = lowbit.unpack_int4(packed).reshape(n, -1, block)
    w8 = (codes.to(torch.int16) - 8) * group_scale.to(torch.int16)[..., None]
    return w8.reshape(n, -1).to(torch.int8)


def w4a8_gemm_reference(xq, x_scale, packed, group_scale, scale, block, bias=None, out_dtype=torch.float32,
                        lora_act=None, lora_up=None):
    w8 = w4a8_int8_weight(packed, group_scale, block)
    if lora_act is None:
        return int8_gemm_reference(xq, x_scale, w8, scale, bias, out_dtype)
    out = int8_gemm_reference(xq, x_scale, w8, scale, bias, torch.float32)
    # the branch in the epilogue, accumulated into the fp32 output in place
    return out.addmm_(lora_act.float(), lora_up.float()).to(out_dtype)


# ---------------------------------------------------------------- Triton


def _launch_config() -> dict:
    if dispatch.interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=1)
    # GPU tiles: untuned starting points.
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


if tl is not None:
    @triton.jit
    def _e2m1(q):
        """E2M1 code (int32 0..15) -> float32 value."""
        mag = q & 7
        e = mag >> 1
        mant = (mag & 1).to(tl.float32)
        normal = tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * mant)
        val = tl.where(e == 0, 0.5 * mant, normal)
        return tl.where((q & 8) != 0, -val, val)

    @triton.jit
    def _e4m3(b):
        """float8_e4m3fn bits (int32 0..255) -> float32 (no NaN codes are ever written)."""
        e = (b >> 3) & 15
        mant = (b & 7).to(tl.float32)
        val = tl.where(e == 0, mant * 0.001953125, tl.exp2((e - 7).to(tl.float32)) * (1.0 + mant * 0.125))
        return tl.where((b & 128) != 0, -val, val)

    @triton.jit
    def _decode(q, s, z, g, CODE: tl.constexpr):
        if CODE == 0:    # int4: (q - zero) * fp16 scale
            return (q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)
        elif CODE == 1:  # nvfp4: e2m1 * e4m3 block scale * global scale
            return _e2m1(q) * (_e4m3(s.to(tl.int32)) * g)
        else:            # mxfp4: e2m1 * 2^(e - 127)
            return _e2m1(q) * tl.exp2(s.to(tl.float32) - 127.0)

    @triton.jit
    def _lowbit_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, N, K,
                            stride_xm, stride_xk, stride_wn, stride_sn, stride_om,
                            BLOCK: tl.constexpr, CODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HALF_DOT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        half = tl.arange(0, BLOCK_K // 2)
        mask_m = offs_m < M
        mask_n = offs_n < N
        g = 1.0
        if CODE == 1:
            g = tl.load(g_ptr).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kp = k0 // 2 + half                       # packed byte index along K
            kmask = kp < K // 2
            wmask = kmask[:, None] & mask_n[None, :]
            packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + kp[:, None], mask=wmask, other=0).to(tl.int32)
            grp = (2 * kp) // BLOCK                  # an even/odd pair never straddles a block
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + grp[:, None], mask=wmask, other=0)
            z = 0
            if CODE == 0:
                z = tl.load(z_ptr + offs_n[None, :] * stride_sn + grp[:, None], mask=wmask, other=0)
            w_even = _decode(packed & 15, s, z, g, CODE)   # [BLOCK_K/2, BLOCK_N], K rows 2i
            w_odd = _decode(packed >> 4, s, z, g, CODE)    # K rows 2i + 1
            xmask = mask_m[:, None] & kmask[None, :]
            x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + (2 * kp)[None, :] * stride_xk,
                             mask=xmask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + (2 * kp + 1)[None, :] * stride_xk,
                            mask=xmask, other=0.0).to(tl.float32)
            if HALF_DOT:  # 16-bit tensor-core dot on GPUs, accumulating in fp32
                dt = x_ptr.dtype.element_ty
                acc += tl.dot(x_even.to(dt), w_even.to(dt))
                acc += tl.dot(x_odd.to(dt), w_odd.to(dt))
            else:
                acc += tl.dot(x_even, w_even)
                acc += tl.dot(x_odd, w_odd)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K,
                           stride_xm, stride_xk, stride_wn, stride_om,
                           FP8: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HALF_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            kmask = k < K
            raw = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None],
                          mask=kmask[:, None] & mask_n[None, :], other=0)
            if FP8:
                w = _e4m3(raw.to(tl.int32) & 255)   # float8 bytes, passed as uint8
            else:
                w = raw.to(tl.float32)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=mask_m[:, None] & kmask[None, :], other=0.0)
            if HALF_DOT:
                acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
            else:
                acc += tl.dot(x.to(tl.float32), w)
        if ROW_SCALE:
            acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            acc = acc * tl.load(s_ptr)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _w4a8_gemm_kernel(x_ptr, xs_ptr, w_ptr, gs_ptr, s_ptr, b_ptr, la_ptr, up_ptr, out_ptr, M, N, K, R,
                          stride_xm, stride_wn, stride_gn, stride_om,
                          BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        half = tl.arange(0, BLOCK_K // 2)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kp = k0 // 2 + half
            kmask = kp < K // 2
            wmask = kmask[:, None] & mask_n[None, :]
            packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + kp[:, None], mask=wmask, other=136).to(tl.int32)
            gs = tl.load(gs_ptr + offs_n[None, :] * stride_gn + ((2 * kp) // BLOCK)[:, None], mask=wmask,
                         other=0).to(tl.int32)
            w_even = ((packed & 15) - 8) * gs       # exact int8 values (|.| <= 119)
            w_odd = ((packed >> 4) - 8) * gs
            xmask = mask_m[:, None] & kmask[None, :]
            x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + (2 * kp)[None, :], mask=xmask, other=0)
            x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + (2 * kp + 1)[None, :], mask=xmask, other=0)
            acc = tl.dot(x_even, w_even.to(tl.int8), acc, out_dtype=tl.int32)
            acc = tl.dot(x_odd, w_odd.to(tl.int8), acc, out_dtype=tl.int32)
        xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        ws = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:  # low-rank branch: (x @ L1) [M, R] fp32 times L2 [R, N], in the epilogue
            r = tl.arange(0, R_PAD)
            la = tl.load(la_ptr + offs_m[:, None] * R + r[None, :], mask=mask_m[:, None] & (r < R)[None, :],
                         other=0.0).to(tl.float32)
            up = tl.load(up_ptr + r[:, None] * N + offs_n[None, :], mask=(r < R)[:, None] & mask_n[None, :],
                         other=0.0).to(tl.float32)
            out += tl.dot(la, up)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def lowbit_linear_triton(x, code, packed, scale, zero=None, global_scale=None, block=64, bias=None):
    M, K = x.shape
    N = packed.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = _launch_config()
    s = scale.view(torch.uint8) if scale.dtype == torch.float8_e4m3fn else scale
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _lowbit_gemm_kernel[grid](
        x, packed, s, zero if zero is not None else s,
        global_scale.reshape(1).float() if global_scale is not None else s,
        bias if bias is not None else s, out, M, N, K,
        x.stride(0), x.stride(1), packed.stride(0), s.stride(0), out.stride(0),
        BLOCK=block, CODE=_CODE_IDS[code], HAS_BIAS=bias is not None,
        # the interpreter's bf16 x bf16 dot is unreliable (DESIGN.md): fp32 there
        HALF_DOT=x.dtype != torch.float32 and not dispatch.interpreting(), **cfg)
    return out


def w8a16_linear_triton(x, weight, scale, bias=None):
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = _launch_config()
    fp8 = weight.dtype == torch.float8_e4m3fn
    w = weight.view(torch.uint8) if fp8 else weight
    s = scale.float().reshape(-1).contiguous()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _w8a16_gemm_kernel[grid](
        x, w, s, bias if bias is not None else s, out, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), out.stride(0),
        FP8=fp8, ROW_SCALE=s.numel() > 1, HAS_BIAS=bias is not None,
        HALF_DOT=x.dtype != torch.float32 and not dispatch.interpreting(), **cfg)
    return out


def w4a8_gemm_triton(xq, x_scale, packed, group_scale, scale, block, bias=None, out_dtype=torch.float32,
                     lora_act=None, lora_up=None):
    M, K = xq.shape
    N = packed.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    cfg = _launch_config()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    R = 0 if lora_act is None else lora_act.shape[1]
    _w4a8_gemm_kernel[grid](
        xq, x_scale.reshape(M).float().contiguous(), packed, group_scale, scale.float().contiguous(),
        bias if bias is not None else scale,
        lora_act.contiguous() if R else scale, lora_up.contiguous() if R else scale, out, M, N, K, R,
        xq.stride(0), packed.stride(0), group_scale.stride(0), out.stride(0),
        BLOCK=block, HAS_BIAS=bias is not None, HAS_LORA=R > 0, R_PAD=max(16, triton.next_power_of_2(max(R, 1))),
        **cfg)
    return out


# ---------------------------------------------------------------- dispatchers


def _supported(x, packed, block) -> bool:
    if x.dim() != 2 or packed.dim() != 2 or block % 2 or x.shape[1] != 2 * packed.shape[1]:
        return False
    return packed.stride(1) == 1 and not dispatch.gpu_before_ampere(x.device)


def lowbit_linear(x: torch.Tensor, code: str, packed: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None = None, global_scale: torch.Tensor | None = None,
                  block: int = 64, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ decode(packed).T + bias`` in ``x.dtype``; see the module docstring."""
    supported = code in CODES and x.dtype in _FLOAT_DTYPES and _supported(x, packed, block)
    return dispatch.route("lowbit_linear", lowbit_linear_triton, lowbit_linear_reference,
                          (x, code, packed, scale, zero, global_scale, block, bias), (x, packed), supported)


def w8a16_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ (weight * scale).T + bias`` in ``x.dtype``, for int8 or fp8 weights."""
    supported = (x.dim() == 2 and x.dtype in _FLOAT_DTYPES and weight.dim() == 2 and weight.stride(1) == 1
                 and weight.dtype in (torch.int8, torch.float8_e4m3fn) and x.shape[1] == weight.shape[1]
                 and scale.numel() in (1, weight.shape[0])
                 and not dispatch.gpu_before_ampere(x.device))
    return dispatch.route("w8a16_linear", w8a16_linear_triton, w8a16_linear_reference, (x, weight, scale, bias),
                          (x, weight), supported)


def w4a8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, group_scale: torch.Tensor,
              scale: torch.Tensor, block: int, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32, lora_act: torch.Tensor | None = None,
              lora_up: torch.Tensor | None = None) -> torch.Tensor:
    """``(xq @ w8.T) * x_scale * scale + bias [+ lora_act @ lora_up]`` with ``w8 = (q - 8) * group_scale``,
    the int8 part exact in int32."""
    supported = (xq.dtype == torch.int8 and out_dtype in _FLOAT_DTYPES and _supported(xq, packed, block)
                 and (lora_act is None or lora_act.shape[1] <= 256))
    rows = dispatch.first_rows
    return dispatch.route("w4a8_gemm", w4a8_gemm_triton, w4a8_gemm_reference,
                          (xq, x_scale, packed, group_scale, scale, block, bias, out_dtype, lora_act, lora_up),
                          (xq, packed), supported, lambda a: (rows(a[0]), rows(a[1]), *a[2:8], rows(a[8]), a[9]))
