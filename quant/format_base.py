"""The interface every weight format implements (``formats.FORMATS``), and a layer's ``Spec``.

A format is a stateless object that stores a linear layer's float32 weight [N, K] as a dict of
tensors (the "parts": codes and scales): ``quantize(w, spec, generator)`` (a generator switches to
stochastic rounding, as ComfyUI rounds a LoRA baked into its own fp8 weights), ``quantize_for_inputs``
(parts chosen for the output error on inputs of per-channel mean square ``input_sq`` [K]; formats
that cannot use it quantize as without it), ``dequantize``, ``linear(x [M, K], ...)`` through the
``kernels/`` dispatchers, ``part_specs`` (every stored tensor's shape and dtype, to check a file and
count bytes) and ``problem`` (why it cannot hold a shape). What does not depend on the format
(SmoothQuant factors, the low-rank branch) lives around the parts in ``qweight.QuantWeight``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import lowrank_gemm


@dataclass(frozen=True)
class Spec:
    """How one layer is stored and computed."""
    format: str
    group_size: int | None = None
    act_quant: bool = True  # quantize activations too, when the format can (W8A8, W4A8)

    def to_json(self) -> dict:
        return {"format": self.format, "group_size": self.group_size, "act_quant": self.act_quant}

    @classmethod
    def from_json(cls, d: dict) -> "Spec":
        """The spec a file's metadata gives; ValueError for a field of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"a layer's metadata must be a JSON object, got {type(d).__name__}")
        fmt, group, act = d.get("format"), d.get("group_size"), d.get("act_quant", True)
        if not isinstance(fmt, str):
            raise ValueError(f"'format' must be a format name, got {fmt!r}")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or not 0 < group <= 1 << 20):
            raise ValueError(f"'group_size' must be a positive whole number or null, got {group!r}")
        if not isinstance(act, bool):
            raise ValueError(f"'act_quant' must be true or false, got {act!r}")
        return cls(fmt, group, act)


def rounded(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Round to nearest, or stochastically (unbiased) when a generator is given."""
    if generator is None:
        return torch.round(x)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + noise)


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales of all-zero rows/groups become 1 so nothing divides by zero."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def smoothed(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> torch.Tensor:
    return x if inv_smooth is None else x * inv_smooth.to(x.dtype)


class WeightFormat:
    name = ""
    description = ""
    weight_bits = 16
    act_bits: int | None = None   # activation bits when activations are quantized
    act_type = "int"              # "int" or "fp" activations (the report's label: int8, fp8, fp4)
    grouped = False               # takes a group size along K
    fixed_block: int | None = None  # block size fixed by the format (NVFP4 16, MXFP4 32)
    comfy_native: str | None = None  # ComfyUI's name for this layout (its loader reads it)

    def problem(self, shape: tuple[int, int], spec: Spec) -> str | None:
        n, k = shape
        block = self.block(spec)
        if block and k % block:
            what = "group size" if self.grouped else f"{self.name} block size"
            return f"{what} {block} does not divide the layer's input width {k}"
        if self.weight_bits == 4 and k % 2:
            return f"4-bit packing needs an even input width, got {k}"
        return None

    def block(self, spec: Spec) -> int | None:
        return spec.group_size if self.grouped else self.fixed_block

    def part_specs(self, shape, spec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def quantize(self, w, spec, generator=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantize_for_inputs(self, w, spec, input_sq: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.quantize(w, spec)

    def dequantize(self, parts, shape, spec, dtype) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x, parts, shape, spec, bias, inv_smooth=None) -> torch.Tensor:
        """``x [M, K]``; ``inv_smooth`` [K] float32 multiplies ``x`` first (SmoothQuant).
        Default: weight-only, dequantize then a high-precision matmul."""
        return F.linear(smoothed(x, inv_smooth), self.dequantize(parts, shape, spec, x.dtype), bias)

    def linear_with_branch(self, x, parts, shape, spec, bias, inv_smooth, down, up) -> torch.Tensor:
        """``linear`` plus a low-rank branch ``((x * inv_smooth) @ down) @ up`` (SVDQuant). Formats
        with a fused kernel override this; the default adds the branch after the matmul."""
        y = self.linear(x, parts, shape, spec, bias, inv_smooth)
        return y.add_(lowrank_gemm.branch_output(smoothed(x, inv_smooth), down, up).to(y.dtype))

    def quantizes_activations(self, spec: Spec) -> bool:
        return self.act_bits is not None and spec.act_quant

    def bits_per_weight(self, shape, spec) -> float:
        return 8 * self.nbytes(shape, spec) / (shape[0] * shape[1])

    def nbytes(self, shape, spec) -> int:
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                   for s, d in self.part_specs(shape, spec).values())
