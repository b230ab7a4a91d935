"""The weight formats (``FORMATS``): int8, fp8, int4, W4A8, W4A4, NVFP4, MXFP4, MXFP8 here, VQ in
``vq_format``. The interface they implement is ``format_base.WeightFormat``."""
from __future__ import annotations

import torch

from ..kernels import int8_gemm, lowbit, lowbit_gemm, lowrank_gemm
from ..kernels.quant_primitives import quantize_per_token_int8
from .format_base import Spec, WeightFormat, rounded, safe_scale, smoothed
from .vq_format import VQ_FORMATS


def fp8_matmul_available(device: torch.device) -> bool:
    """FP8 tensor-core matmul (torch._scaled_mm) needs CUDA compute capability 8.9+."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and hasattr(torch, "_scaled_mm"))


class Int8(WeightFormat):
    name = "int8"
    description = "int8 weights, one scale per output channel; W8A8 with dynamic per-token int8 activations"
    weight_bits = 8
    act_bits = 8
    comfy_native = "int8_tensorwise"

    def part_specs(self, shape, spec):
        n, k = shape
        return {"weight": ((n, k), torch.int8), "scale": ((n,), torch.float32)}

    def quantize(self, w, spec, generator=None):
        scale = safe_scale(w.abs().amax(dim=1) / 127.0)
        q = rounded(w / scale[:, None], generator).clamp_(-127, 127).to(torch.int8)
        return {"weight": q, "scale": scale}

    def dequantize(self, parts, shape, spec, dtype):
        return (parts["weight"].to(torch.float32) * parts["scale"][:, None]).to(dtype)

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        if not spec.act_quant:
            return lowbit_gemm.w8a16_linear(smoothed(x, inv_smooth), parts["weight"], parts["scale"], bias)
        return int8_gemm.int8_linear(x, parts["weight"], parts["scale"], bias, inv_smooth)


class FP8E4M3(WeightFormat):
    name = "fp8_e4m3"
    description = ("fp8 e4m3 weights with one per-tensor scale (ComfyUI's float8_e4m3fn layout); "
                   "W8A8 with per-token fp8 activations on GPUs with fp8 matmul, weight-only elsewhere")
    weight_bits = 8
    act_bits = 8
    act_type = "fp"
    comfy_native = "float8_e4m3fn"

    def part_specs(self, shape, spec):
        return {"weight": (tuple(shape), torch.float8_e4m3fn), "scale": ((), torch.float32)}

    def quantize(self, w, spec, generator=None):
        scale = safe_scale(w.abs().amax() / lowbit.E4M3_MAX)
        q = (w / scale).clamp_(-lowbit.E4M3_MAX, lowbit.E4M3_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "scale": scale.reshape(())}

    def dequantize(self, parts, shape, spec, dtype):
        return (parts["weight"].to(torch.float32) * parts["scale"]).to(dtype)

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        x = smoothed(x, inv_smooth)
        n, k = shape
        # cuBLASLt's row-wise scaled fp8 GEMM: K and N multiples of 16, bf16 output
        if spec.act_quant and fp8_matmul_available(x.device) and k % 16 == 0 and n % 16 == 0:
            x32 = x.to(torch.float32, copy=True)  # scaled in place below: never the caller's tensor
            amax = torch.maximum(x32.amax(dim=-1, keepdim=True), x32.amin(dim=-1, keepdim=True).neg_())
            xs = safe_scale(amax / lowbit.E4M3_MAX)
            xq = x32.div_(xs).to(torch.float8_e4m3fn)
            ws = parts["scale"].float().reshape(1, 1).expand(1, n).contiguous()
            out = torch._scaled_mm(xq, parts["weight"].t(), scale_a=xs, scale_b=ws,
                                   bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
            return out.to(x.dtype)
        return lowbit_gemm.w8a16_linear(x, parts["weight"], parts["scale"], bias)


class Int4(WeightFormat):
    name = "int4"
    description = "int4 weights, asymmetric, fp16 scale and uint8 zero point per group along K; W4A16"
    weight_bits = 4
    grouped = True

    def part_specs(self, shape, spec):
        n, k = shape
        g = k // spec.group_size
        return {"weight": ((n, k // 2), torch.uint8), "scale": ((n, g), torch.float16),
                "zero": ((n, g), torch.uint8)}

    def quantize(self, w, spec, generator=None):
        n, k = w.shape
        wg = w.reshape(n, k // spec.group_size, spec.group_size)
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        # Quantize against the fp16-rounded scale so that dequantization sees the same one.
        scale = safe_scale((hi - lo) / 15.0).to(torch.float16)
        s = scale.float()
        zero = torch.round(-lo / s).clamp_(0, 15)
        q = (rounded(wg / s[..., None], generator) + zero[..., None]).clamp_(0, 15)
        return {"weight": lowbit.pack_int4(q.reshape(n, k).to(torch.uint8)), "scale": scale,
                "zero": zero.to(torch.uint8)}

    def dequantize(self, parts, shape, spec, dtype):
        return lowbit_gemm.dequant_int4(parts["weight"], parts["scale"], parts["zero"], spec.group_size).to(dtype)

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        return lowbit_gemm.lowbit_linear(smoothed(x, inv_smooth), "int4", parts["weight"], parts["scale"],
                                         parts["zero"], block=spec.group_size, bias=bias)


class W4A8(WeightFormat):
    """Two-level int4: an fp32 scale per output channel and an integer scale (1..17) per
    group, so ``code * group_scale`` is an exact int8 weight (|.| <= 119) and the matmul
    runs on the int8 path with int8 activations (the QServe-style progressive scheme)."""
    name = "w4a8"
    description = ("int4 weights (symmetric, integer scale per group, fp32 scale per channel) "
                   "with dynamic per-token int8 activations through the int8 matmul")
    weight_bits = 4
    act_bits = 8
    grouped = True
    _LEVEL1 = 119.0  # 7 * 17: the largest code times the largest group scale fits int8

    def part_specs(self, shape, spec):
        n, k = shape
        return {"weight": ((n, k // 2), torch.uint8), "group_scale": ((n, k // spec.group_size), torch.uint8),
                "scale": ((n,), torch.float32)}

    def quantize(self, w, spec, generator=None):
        n, k = w.shape
        scale = safe_scale(w.abs().amax(dim=1) / self._LEVEL1)
        wg = (w / scale[:, None]).reshape(n, k // spec.group_size, spec.group_size)
        gscale = torch.ceil(wg.abs().amax(dim=-1) / 7.0).clamp_(1, 17)
        q = rounded(wg / gscale[..., None], generator).clamp_(-7, 7) + 8
        return {"weight": lowbit.pack_int4(q.reshape(n, k).to(torch.uint8)),
                "group_scale": gscale.to(torch.uint8), "scale": scale}

    def int8_weight(self, parts, shape, spec) -> torch.Tensor:
        return lowbit_gemm.w4a8_int8_weight(parts["weight"], parts["group_scale"], spec.group_size)

    def dequantize(self, parts, shape, spec, dtype):
        w8 = self.int8_weight(parts, shape, spec)
        return (w8.to(torch.float32) * parts["scale"][:, None]).to(dtype)

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        if not spec.act_quant:
            return super().linear(x, parts, shape, spec, bias, inv_smooth)
        xq, xs = quantize_per_token_int8(x, inv_smooth)
        return lowbit_gemm.w4a8_gemm(xq, xs, parts["weight"], parts["group_scale"], parts["scale"],
                                     spec.group_size, bias, x.dtype)


class W4A4(W4A8):
    """W4A8's weights with 4-bit activations: per token an fp32 scale and an integer scale
    (1..17) per group of the same size as the weight's, so both sides are exact int8 values
    and the matmul runs on the int8 path (``kernels/lowrank_gemm``). Made for SVDQuant: a
    low-rank branch from SVD Low-Rank Branch is fused into the same pass."""
    name = "w4a4"
    description = ("int4 weights and int4 activations (group-wise, two-level scales) through the int8 matmul; "
                   "use after SVD Low-Rank Branch (SVDQuant)")
    act_bits = 4

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        if not spec.act_quant:   # weight-only layers (modulation): W4A8's dequantizing path
            return super().linear(x, parts, shape, spec, bias, inv_smooth)
        return self.linear_with_branch(x, parts, shape, spec, bias, inv_smooth, None, None)

    def linear_with_branch(self, x, parts, shape, spec, bias, inv_smooth, down, up):
        if not spec.act_quant:   # the generic path: self.linear (weight-only above), then the branch
            return super().linear_with_branch(x, parts, shape, spec, bias, inv_smooth, down, up)
        return lowrank_gemm.w4a4_linear(x, parts["weight"], parts["group_scale"], parts["scale"], spec.group_size,
                                        bias, inv_smooth, down, up)


class NVFP4(WeightFormat):
    name = "nvfp4"
    description = ("fp4 e2m1 weights, fp8 e4m3 scale per 16 and an fp32 per-tensor scale (NVIDIA's NVFP4); "
                   "computed through dequantization (W4A16)")
    weight_bits = 4
    fixed_block = 16

    def part_specs(self, shape, spec):
        n, k = shape
        return {"weight": ((n, k // 2), torch.uint8), "block_scale": ((n, k // 16), torch.float8_e4m3fn),
                "global_scale": ((), torch.float32)}

    def quantize(self, w, spec, generator=None):
        gscale = safe_scale(w.abs().amax() / (lowbit.E4M3_MAX * lowbit.E2M1_MAX))
        codes, bscale = lowbit.nvfp4_encode(w, gscale)
        return {"weight": lowbit.pack_int4(codes), "block_scale": bscale, "global_scale": gscale.reshape(())}

    def dequantize(self, parts, shape, spec, dtype):
        return lowbit_gemm.dequant_fp4(parts["weight"], parts["block_scale"], 16, parts["global_scale"]).to(dtype)

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        return lowbit_gemm.lowbit_linear(smoothed(x, inv_smooth), "nvfp4", parts["weight"], parts["block_scale"],
                                         global_scale=parts["global_scale"], block=16, bias=bias)


class NVFP4W4A4(NVFP4):
    """NVFP4 weights and NVFP4 activations (SVDQuant's W4A4 layout for FP4 GPUs, nunchaku's
    ``nvfp4``): per token an fp32 scale ``max|x~| / (448 * 6)``, an E4M3 scale per 16 and E2M1
    values, the same encoding as the weights. Only Blackwell GPUs multiply FP4 natively; here the
    quantized activations are decoded (exactly, in the compute dtype) into the W4A16 matmul and
    the token scale is applied to its output, so the numbers are those of an FP4 GEMM, not its speed."""
    name = "nvfp4_w4a4"
    description = ("NVFP4 weights and NVFP4 activations (fp4 e2m1, fp8 e4m3 scale per 16, fp32 scale per "
                   "token); emulated through the W4A16 matmul (no FP4 units are used); use after SVD "
                   "Low-Rank Branch (SVDQuant)")
    act_bits = 4
    act_type = "fp"

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        if not spec.act_quant:   # weight-only layers (modulation): NVFP4's W4A16 path
            return super().linear(x, parts, shape, spec, bias, inv_smooth)
        x32 = x.to(torch.float32) if inv_smooth is None else x.to(torch.float32) * inv_smooth
        amax = torch.maximum(x32.amax(dim=-1, keepdim=True), x32.amin(dim=-1, keepdim=True).neg())
        token_scale = safe_scale(amax / (lowbit.E4M3_MAX * lowbit.E2M1_MAX))
        codes, block_scale = lowbit.nvfp4_encode(x32, token_scale)
        m, k = x32.shape
        # e2m1 x e4m3 has at most 6 significant bits: exact in bf16 and fp16
        x_blocks = lowbit.e2m1_decode(codes).reshape(m, k // 16, 16) * block_scale.float()[..., None]
        y = lowbit_gemm.lowbit_linear(x_blocks.reshape(m, k).to(x.dtype), "nvfp4", parts["weight"],
                                      parts["block_scale"], global_scale=parts["global_scale"], block=16)
        y = y.float() * token_scale
        return (y if bias is None else y + bias.float()).to(x.dtype)


class MXFP4(WeightFormat):
    name = "mxfp4"
    description = ("fp4 e2m1 weights with a power-of-two (e8m0) scale per 32 (OCP MXFP4); computed through "
                   "dequantization")
    weight_bits = 4
    fixed_block = 32

    def part_specs(self, shape, spec):
        n, k = shape
        return {"weight": ((n, k // 2), torch.uint8), "block_scale": ((n, k // 32), torch.uint8)}

    def quantize(self, w, spec, generator=None):
        n, k = w.shape
        wb = w.reshape(n, k // 32, 32)
        amax = wb.abs().amax(dim=-1)
        code = lowbit.e8m0_encode_ceil(safe_scale(amax / lowbit.E2M1_MAX))
        codes = lowbit.e2m1_encode(wb / lowbit.e8m0_decode(code)[..., None])
        return {"weight": lowbit.pack_int4(codes.reshape(n, k)), "block_scale": code}

    def dequantize(self, parts, shape, spec, dtype):
        return lowbit_gemm.dequant_fp4(parts["weight"], parts["block_scale"], 32).to(dtype)

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None):
        return lowbit_gemm.lowbit_linear(smoothed(x, inv_smooth), "mxfp4", parts["weight"], parts["block_scale"],
                                         block=32, bias=bias)


class MXFP8(WeightFormat):
    """OCP MXFP8: fp8 e4m3 values with a power-of-two (e8m0) scale per 32 along K, ComfyUI's
    ``mxfp8`` layout (whose MXFP8 matmul, activations included, needs a Blackwell GPU). Here
    it is computed through dequantization, as ComfyUI itself emulates it elsewhere."""
    name = "mxfp8"
    description = ("fp8 e4m3 weights with a power-of-two (e8m0) scale per 32 (OCP MXFP8, ComfyUI's mxfp8 layout); "
                   "MXFP8 activations too on GPUs with MXFP8 matmul (Blackwell), weight-only elsewhere")
    weight_bits = 8
    act_bits = 8
    act_type = "fp"
    fixed_block = 32  # core's mxfp8 files store these swizzled: Save writes them from core's own layer

    def part_specs(self, shape, spec):
        n, k = shape
        return {"weight": ((n, k), torch.float8_e4m3fn), "block_scale": ((n, k // 32), torch.uint8)}

    def quantize(self, w, spec, generator=None):
        n, k = w.shape
        wb = w.reshape(n, k // 32, 32)
        code = lowbit.e8m0_encode_ceil(safe_scale(wb.abs().amax(dim=-1) / lowbit.E4M3_MAX))
        scaled = (wb / lowbit.e8m0_decode(code)[..., None]).clamp_(-lowbit.E4M3_MAX, lowbit.E4M3_MAX)
        return {"weight": scaled.reshape(n, k).to(torch.float8_e4m3fn), "block_scale": code}

    def dequantize(self, parts, shape, spec, dtype):
        n, k = shape
        scale = lowbit.e8m0_decode(parts["block_scale"])[..., None]
        return (parts["weight"].to(torch.float32).reshape(n, k // 32, 32) * scale).reshape(n, k).to(dtype)


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Int8(), FP8E4M3(), Int4(), W4A8(), W4A4(), NVFP4(),
                                                        NVFP4W4A4(), MXFP4(), MXFP8(), *VQ_FORMATS)}


def get(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}") from None
