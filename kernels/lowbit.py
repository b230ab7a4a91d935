"""Bit layouts shared by the low-bit weight formats: the one home for each of them.

- 4-bit packing: two 4-bit codes per byte, element ``2i`` in the low nibble and ``2i+1``
  in the high nibble (the order NVIDIA's FP4 and ComfyUI's packed layouts use).
- FP4 E2M1 (OCP MX / NVFP4 element type): sign bit, 2 exponent bits, 1 mantissa bit;
  magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. Encoding rounds to nearest, ties to the even code.
- E8M0 scales (MXFP4): an unsigned biased exponent, value ``2 ** (e - 127)``.
- E4M3 scales (NVFP4) use ``torch.float8_e4m3fn`` directly.

The Triton kernels decode the same layouts in-kernel; these functions are their reference.
"""
from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0

# Magnitude of E2M1 codes 0..7; codes 8..15 are the same values negated.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_e2m1_tables: dict[tuple, torch.Tensor] = {}


def e2m1_values(device=None, dtype=torch.float32) -> torch.Tensor:
    """The 16 values of the E2M1 codes, indexable by code."""
    key = (torch.device(device or "cpu"), dtype)
    table = _e2m1_tables.get(key)
    if table is None:
        mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32)
        table = torch.cat([mags, -mags]).to(device=key[0], dtype=dtype)
        _e2m1_tables[key] = table
    return table


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 values 0..15, last dim even) into bytes along the last dim."""
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes 0..15, last dim doubled."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round values (already divided by their scale) to E2M1 codes (uint8 0..15).

    Saturates at +-6. Ties go to the even code, as IEEE round-to-nearest-even does."""
    m = x.abs().float()
    # Thresholds between neighbouring magnitudes; '>' keeps a tie on the lower (even)
    # code, '>=' moves it to the upper (even) one.
    code = ((m > 0.25).to(torch.uint8) + (m >= 0.75) + (m > 1.25) + (m >= 1.75)
            + (m > 2.5) + (m >= 3.5) + (m > 5.0))
    sign = (x < 0).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def e2m1_decode(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return e2m1_values(codes.device, dtype)[codes.long()]


NVFP4_BLOCK = 16


def nvfp4_encode(x: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 codes of ``x [..., K]``: E2M1 codes (uint8 0..15, unpacked) [..., K] and an E4M3
    scale per block of 16 along K [..., K // 16], so that ``x ~= e2m1(code) * block_scale * outer``.
    ``outer`` (fp32, > 0, broadcastable against [..., K // 16]) is the second-level scale: one per
    tensor for weights, one per token for activations; ``amax / (448 * 6)`` makes the largest
    block scale E4M3's largest value."""
    *lead, k = x.shape
    xb = x.float().reshape(*lead, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_scale = (xb.abs().amax(dim=-1) / E2M1_MAX / outer).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
    total = block_scale.float() * outer
    total = torch.where(total > 0, total, torch.ones_like(total))   # all-zero blocks
    return e2m1_encode(xb / total[..., None]).reshape(*lead, k), block_scale


def e8m0_encode_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``scale`` as an E8M0 byte (so nothing saturates).

    ``scale`` must be positive; it is clamped to the E8M0 range 2**-127 .. 2**127."""
    exponent = torch.ceil(torch.log2(scale.float().clamp(min=2.0 ** -127, max=2.0 ** 127)))
    return (exponent + 127).clamp(0, 254).to(torch.uint8)


def e8m0_decode(code: torch.Tensor) -> torch.Tensor:
    return torch.exp2(code.float() - 127.0)
