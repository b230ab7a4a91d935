"""VQ weight formats (VQ4DiT-style): each row, scaled by its RMS, is cut into sub-vectors along K
that are replaced by indices into per-layer fp16 codebooks fitted with k-means (``kernels.kmeans``,
shared with the latent VQ nodes); plus an fp16 scale per row. The matmul dequantizes (W2A16/W3A16).

- ``vq2``: 256 codes of 4 weights, 8-bit indices: 2 bits per weight.
- ``vq3``: 4096 codes of 4 weights, 12-bit indices packed two per 3 bytes: 3 bits per weight.
- ``vq2x8``: sub-vectors of 8 weights, two residual levels of 256 codes (the second quantizes what
  the first left): 2 bits per weight. One level of 2^16 codes would cost 1 MiB of codebook per layer
  and hours of CPU k-means; two levels of 256 cost 8 KiB.

Without calibration each sub-vector takes its nearest code. With it (``quantize_for_inputs``, the
per-channel mean square ``h`` of the layer's inputs), codes and codebook are chosen for the output
error (VQ4DiT's refinement): with the diagonal of ``X^T X``, ``||X (W - Ŵ)^T||^2`` separates over
sub-vectors, so each one's best code among all codes is one nearest-code search in a space scaled by
``sqrt(h)``, and the codebook is refitted by the same weighted means. The full ``X^T X`` (GPTQ's
off-diagonal terms) overfits the 128 input rows calibration keeps: on a 256 x 1024 layer, 21 dB on
those rows but 16 dB on held-out ones, where the diagonal gives 17-18 dB on both.
"""
from __future__ import annotations

import torch

from ..kernels import kmeans
from .format_base import Spec, WeightFormat, safe_scale

FIT_VECTORS_PER_CODE = 64  # k-means runs on a fixed random subset of this many sub-vectors per code
FIT_ITERS = 8
REFINE_ITERS = 2     # weighted Lloyd steps on the calibration statistics
DAMP = 0.01          # input channels that never fired still count this much of the mean (never zero)
_ASSIGN_POSITIONS = 16  # sub-vector positions searched per batched call (each has its own scaled codebook)


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


def assign(v: torch.Tensor, codebook: torch.Tensor, position_weight: torch.Tensor | None) -> torch.Tensor:
    """Code index [N, M] of each sub-vector ``v`` [N, M, D] minimising ``sum_j h_mj (v_nmj - c_j)^2``
    (plain nearest code when ``position_weight`` h [M, D] is None)."""
    n, m, d = v.shape
    if position_weight is None:
        return kmeans.nearest_centroid(v.reshape(-1, d), codebook)[0].reshape(n, m)
    root = position_weight.sqrt()
    out = torch.empty(n, m, dtype=torch.long, device=v.device)
    for p0 in range(0, m, _ASSIGN_POSITIONS):
        r = root[p0:p0 + _ASSIGN_POSITIONS]
        x = (v[:, p0:p0 + _ASSIGN_POSITIONS] * r).transpose(0, 1)  # one batch per position
        out[:, p0:p0 + _ASSIGN_POSITIONS] = kmeans.nearest_centroid(x, codebook[None] * r[:, None, :])[0].t()
    return out


def weighted_means(v: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The k-means update with a weight per element: ``c_kj = sum w v / sum w`` over the
    sub-vectors assigned to code k; codes with no sub-vectors stay."""
    d = v.shape[-1]
    flat = idx.reshape(-1)
    num = torch.zeros_like(codebook).index_add_(0, flat, (weight * v).reshape(-1, d))
    den = torch.zeros_like(codebook).index_add_(0, flat, weight.reshape(-1, d))
    return torch.where(den > 0, num / den.clamp_min(1e-30), codebook)


class VQWeights(WeightFormat):
    grouped = False

    def __init__(self, name: str, bits: int, dim: int = 4, levels: int = 1):
        self.name = name
        self.weight_bits = bits
        self.dim = self.fixed_block = dim
        self.levels = levels
        self.index_bits = bits * dim // levels
        assert self.index_bits in (8, 12), "indices are stored as 8-bit or packed 12-bit values"
        self.codes = 2 ** self.index_bits
        shape = f"{self.codes} fp16 codes of {dim} weights"
        shape += f" in each of {levels} residual levels" if levels > 1 else ""
        self.description = (f"vector-quantized weights (VQ4DiT-style): {shape} per layer, fp16 scale per row, "
                            f"{bits} bits per weight; codes chosen for the output error when calibrated; "
                            "computed through dequantization")

    def problem(self, shape: tuple[int, int], spec: Spec) -> str | None:
        n, k = shape
        # 12-bit indices are packed in pairs
        step = self.dim * (2 if self.index_bits == 12 and self.levels % 2 else 1)
        if k % step:
            return f"{self.name} needs an input width divisible by {step}, got {k}"
        return None

    def part_specs(self, shape, spec):
        n, k = shape
        count = k // self.dim * self.levels
        index = ((n, count), torch.uint8) if self.index_bits == 8 else ((n, 3 * count // 2), torch.uint8)
        return {"weight": index, "codebook": ((self.levels * self.codes, self.dim), torch.float16),
                "scale": ((n,), torch.float16)}

    def quantize(self, w, spec, generator=None):
        # Nearest-code assignment is deterministic: ``generator`` (stochastic rounding) has no meaning here.
        return self._pack(w, None)

    def quantize_for_inputs(self, w, spec, input_sq):
        return self._pack(w, input_sq)

    def _pack(self, w: torch.Tensor, input_sq: torch.Tensor | None) -> dict[str, torch.Tensor]:
        n, k = w.shape
        m = k // self.dim
        # An all-zero row keeps scale 0 (it dequantizes to zeros whatever its codes).
        scale = w.square().mean(dim=1).sqrt().to(torch.float16)
        s = safe_scale(scale.float())
        residual = (w / s[:, None]).reshape(n, m, self.dim)
        position_weight = element_weight = None
        if input_sq is not None:
            h = input_sq.to(device=w.device, dtype=torch.float32)
            position_weight = (h + DAMP * h.mean()).reshape(m, self.dim)
            # Row n's output error scales with its scale squared.
            element_weight = s.square()[:, None, None] * position_weight
        books, indices = [], []
        for level in range(self.levels):
            book = self._fit(residual.reshape(-1, self.dim), seed=level)
            for _ in range(REFINE_ITERS if input_sq is not None else 0):
                book = weighted_means(residual, assign(residual, book, position_weight), book, element_weight)
            book = book.to(torch.float16)
            idx = assign(residual, book.float(), position_weight)  # against the stored fp16 codes
            residual -= book.float()[idx]
            books.append(book)
            indices.append(idx)
        idx = torch.stack(indices, -1).reshape(n, m * self.levels)
        packed = idx.to(torch.uint8) if self.index_bits == 8 else pack_uint12(idx)
        return {"weight": packed, "codebook": torch.cat(books), "scale": scale}

    def _fit(self, v: torch.Tensor, seed: int) -> torch.Tensor:
        """Data-free float32 codebook [codes, dim] for sub-vectors ``v`` [M, dim]."""
        if v.shape[0] <= self.codes:  # a tiny layer: its sub-vectors are the codebook,
            # padded with copies of the first, which lose every tie
            return torch.cat([v, v[:1].expand(self.codes - v.shape[0], -1)])
        gen = torch.Generator().manual_seed(seed)
        cap = FIT_VECTORS_PER_CODE * self.codes
        sample = v if v.shape[0] <= cap else v[torch.randperm(v.shape[0], generator=gen)[:cap].to(v.device)]
        return kmeans.kmeans(sample, self.codes, iters=FIT_ITERS, seed=seed)[0]

    def indices(self, parts) -> torch.Tensor:
        """Code indices [N, K / dim * levels] (level fastest); level l's codes start at row l * codes."""
        w = parts["weight"]
        return w.long() if self.index_bits == 8 else unpack_uint12(w)

    def dequantize(self, parts, shape, spec, dtype):
        n, k = shape
        idx = self.indices(parts).reshape(n, k // self.dim, self.levels)
        idx = idx + torch.arange(self.levels, device=idx.device) * self.codes
        vals = parts["codebook"].float()[idx].sum(-2).reshape(n, k)
        return (vals * parts["scale"].float()[:, None]).to(dtype)


VQ_FORMATS = (VQWeights("vq2", 2), VQWeights("vq3", 3), VQWeights("vq2x8", 2, dim=8, levels=2))
