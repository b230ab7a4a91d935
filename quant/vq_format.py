"""VQ weight formats (VQ4DiT-style): each row's weights, scaled by the row's RMS, are cut into
sub-vectors of 4 along K and replaced by the index of the nearest code in a per-layer codebook
fitted with k-means (``kernels.kmeans``, the same search and update the latent VQ nodes use).

- ``vq2``: 256 codes of 4 weights, an 8-bit index per 4 weights = 2 bits per weight.
- ``vq3``: 4096 codes of 4 weights, 12-bit indices packed two per 3 bytes = 3 bits per weight.

Plus per layer an fp16 codebook [codes, 4] and an fp16 scale per output row (overhead
``(16 codes 4 + 16 N) / (N K)`` bits per weight: 0.033 for a 3072 x 3072 layer at vq3). The matmul
dequantizes (W2A16/W3A16). Data-free: the codebook is fitted on the weights themselves; VQ4DiT's
refinement of candidate assignments on calibration data is not done here.
"""
from __future__ import annotations

import torch

from ..kernels import kmeans as km
from . import formats
from .formats import Spec, WeightFormat, _safe

SUBVECTOR = 4
FIT_VECTORS_PER_CODE = 64  # k-means runs on a fixed random subset of this many sub-vectors per code
FIT_ITERS = 8


def pack_uint12(idx: torch.Tensor) -> torch.Tensor:
    """[..., 2m] integers < 4096 -> uint8 [..., 3m] (two 12-bit values in three bytes)."""
    a, b = idx[..., 0::2].to(torch.int32), idx[..., 1::2].to(torch.int32)
    packed = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], -1)
    return packed.reshape(*idx.shape[:-1], -1).to(torch.uint8)


def unpack_uint12(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint12`, as int64."""
    p = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int64)
    a = p[..., 0] | ((p[..., 1] & 0xF) << 8)
    b = (p[..., 1] >> 4) | (p[..., 2] << 4)
    return torch.stack([a, b], -1).reshape(*packed.shape[:-1], -1)


class VQWeights(WeightFormat):
    grouped = False
    fixed_block = SUBVECTOR

    def __init__(self, bits: int):
        self.bits = bits
        self.weight_bits = bits
        self.codes = 2 ** (bits * SUBVECTOR)
        self.name = f"vq{bits}"
        self.description = (f"vector-quantized weights (VQ4DiT-style): {self.codes} fp16 codes of {SUBVECTOR} weights "
                            f"per layer, fp16 scale per row, {bits} bits per weight; computed through dequantization")

    def problem(self, shape: tuple[int, int], spec: Spec) -> str | None:
        n, k = shape
        step = 2 * SUBVECTOR if self.bits == 3 else SUBVECTOR  # 12-bit indices are packed in pairs
        if k % step:
            return f"{self.name} needs an input width divisible by {step}, got {k}"
        return None

    def part_specs(self, shape, spec):
        n, k = shape
        m = k // SUBVECTOR
        index = ((n, m), torch.uint8) if self.bits == 2 else ((n, 3 * m // 2), torch.uint8)
        return {"weight": index, "codebook": ((self.codes, SUBVECTOR), torch.float16), "scale": ((n,), torch.float16)}

    def quantize(self, w, spec, generator=None):
        # Nearest-code assignment is deterministic: ``generator`` (stochastic rounding) has no meaning here.
        n, k = w.shape
        # An all-zero row keeps scale 0 (it dequantizes to zeros whatever its codes).
        scale = w.square().mean(dim=1).sqrt().to(torch.float16)
        v = (w / _safe(scale.float())[:, None]).reshape(-1, SUBVECTOR)
        if v.shape[0] <= self.codes:  # a tiny layer: its sub-vectors are the codebook
            codebook = v.to(torch.float16)
        else:
            gen = torch.Generator().manual_seed(0)
            cap = FIT_VECTORS_PER_CODE * self.codes
            sample = v if v.shape[0] <= cap else v[torch.randperm(v.shape[0], generator=gen)[:cap].to(v.device)]
            codebook = km.kmeans(sample, self.codes, iters=FIT_ITERS, seed=0)[0].to(torch.float16)
        if codebook.shape[0] < self.codes:  # tiny layer: pad with copies, which lose every tie
            codebook = torch.cat([codebook, codebook[:1].expand(self.codes - codebook.shape[0], -1)])
        idx, _ = km.nearest_centroid(v, codebook.float())  # against the stored fp16 codes
        idx = idx.reshape(n, k // SUBVECTOR)
        packed = idx.to(torch.uint8) if self.bits == 2 else pack_uint12(idx)
        return {"weight": packed, "codebook": codebook, "scale": scale}

    def indices(self, parts) -> torch.Tensor:
        w = parts["weight"]
        return w.long() if self.bits == 2 else unpack_uint12(w)

    def dequantize(self, parts, shape, spec, dtype):
        n, k = shape
        vals = parts["codebook"].float()[self.indices(parts)].reshape(n, k)
        return (vals * parts["scale"].float()[:, None]).to(dtype)


VQ_FORMATS = (VQWeights(2), VQWeights(3))
formats.FORMATS.update({f.name: f for f in VQ_FORMATS})
