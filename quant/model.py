"""Quantize the linear layers of a ComfyUI model: a clone with ``QuantLinear`` object patches.

Takes a ModelPatcher and returns ``patcher.clone()``; the shared model is never modified.
Layers are quantized one at a time (a float32 copy of one layer at a time), so peak memory
stays near the model's own size plus the packed copy.

Reading the weights the input model really uses:
- the module is ``patcher.get_model_object(path)``: the input's own object patch if it has
  one, else the original module, even while another clone's object patches are installed;
- the tensor is the clean copy in ``patcher.backup`` when some loaded clone has patched the
  shared weights in place, else the module's own;
- it is converted the way ``ModelPatcher.patch_weight_to_device`` does (float32, then the
  module's ``convert_weight``) and the input's own weight patches (a LoRA loaded before this
  node) are merged with ``comfy.lora.calculate_weight``; those patches are then dropped from
  the clone because they are baked in. Bias patches stay on the clone and apply as usual.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import formats, policy
from .linear import QuantLinear
from .qweight import QuantWeight

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."


class AlreadyQuantized(ValueError):
    pass


@dataclass
class LayerRow:
    """One line of the report."""
    layer: str
    role: str
    format: str                  # a format name, or "keep"
    activations: str             # "int8", "fp8", or "float" (not quantized)
    params: int
    bits: float
    bytes_before: int
    bytes_after: int
    weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    outlier_ratio: float | None = None
    reason: str = ""


@dataclass
class Result:
    model: object                # the quantized ModelPatcher clone
    rows: list[LayerRow] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def is_linear(module) -> bool:
    if isinstance(module, QuantLinear) or isinstance(module, torch.nn.Linear):
        return True
    # ComfyUI's mixed-precision ops Linear is not an nn.Linear subclass.
    return ("Linear" in type(module).__name__ and hasattr(module, "in_features")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def linear_layers(patcher) -> list[tuple[str, torch.nn.Module]]:
    """(path inside diffusion_model, module) for every linear layer, as the patcher sees it."""
    root = patcher.get_model_object("diffusion_model")
    out = []
    for name, _ in root.named_modules():
        if not name:
            continue
        module = patcher.get_model_object(PREFIX + name)
        if is_linear(module):
            out.append((name, module))
    return out


def quantized_layers(patcher) -> list[str]:
    return [name for name, m in linear_layers(patcher) if isinstance(m, QuantLinear)]


def compute_dtype(patcher) -> torch.dtype:
    model = patcher.model
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def float_weight(patcher, path: str, device=None) -> torch.Tensor:
    """The float32 weight the input model computes with, LoRA patches merged."""
    key = f"{PREFIX}{path}.weight"
    module = patcher.get_model_object(PREFIX + path)
    backup = patcher.backup.get(key)
    w = backup.weight if backup is not None else module.weight
    w = w.to(device=device or w.device, dtype=torch.float32, copy=True)
    convert = getattr(module, "convert_weight", None)
    if convert is not None:
        w = convert(w, inplace=True)
    if isinstance(w, QuantWeight):
        w = w.dequantize(torch.float32)
    if key in patcher.patches:
        import comfy.lora
        w = comfy.lora.calculate_weight(patcher.patches[key], w, key)
    return w.float()


def clean_bias(patcher, path: str) -> torch.Tensor | None:
    key = f"{PREFIX}{path}.bias"
    module = patcher.get_model_object(PREFIX + path)
    backup = patcher.backup.get(key)
    bias = backup.weight if backup is not None else getattr(module, "bias", None)
    return None if bias is None else bias.detach().clone()


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.float(), approx.float()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(max(signal, 1e-30) / noise)).item()


def act_label(spec) -> str:
    if spec is None:
        return "float"
    fmt = formats.get(spec.format)
    if not fmt.quantizes_activations(spec):
        return "float"
    return "fp8" if spec.format == "fp8_e4m3" else f"int{fmt.act_bits}"


def quantize_model(patcher, plans: list[policy.LayerPlan], dtype: torch.dtype | None = None,
                   smooth: dict[str, torch.Tensor] | None = None,
                   progress: Callable[[int], None] | None = None) -> Result:
    """Apply ``plans`` (one per linear layer) to a clone of ``patcher``.

    ``dtype``: the compute dtype of the result (None keeps the model's). ``smooth``: per-layer
    SmoothQuant factors [K] from calibration."""
    already = quantized_layers(patcher)
    if already:
        raise AlreadyQuantized(f"the model already has {len(already)} quantized layers "
                               f"(e.g. {already[0]}); connect the model before quantization")
    current = compute_dtype(patcher)
    dtype = dtype or current
    work_device = patcher.load_device
    store_device = patcher.offload_device
    clone = patcher.clone()
    rows = []
    total_before = total_after = 0
    for i, plan in enumerate(plans):
        module = patcher.get_model_object(PREFIX + plan.path)
        n, k = plan.shape
        before = n * k * module.weight.element_size()
        if plan.spec is None:
            rows.append(LayerRow(plan.path, plan.role, "keep", "float", n * k,
                                 8.0 * module.weight.element_size(), before, before, reason=plan.reason))
            total_before += before
            total_after += before
        else:
            w = float_weight(patcher, plan.path, device=work_device)
            layer_smooth = None if smooth is None else smooth.get(plan.path)
            qw = QuantWeight.quantize(w, plan.spec, dtype, smooth=layer_smooth)
            row = LayerRow(plan.path, plan.role, plan.spec.format, act_label(plan.spec), n * k, qw.bits_per_weight(),
                           before, qw.packed_nbytes(), weight_sqnr_db=sqnr_db(w, qw.dequantize(torch.float32)),
                           reason=plan.reason + (", smoothed" if layer_smooth is not None else ""))
            qlinear = QuantLinear(qw.retarget(device=store_device), clean_bias(patcher, plan.path))
            clone.add_object_patch(PREFIX + plan.path, qlinear)
            clone.patches.pop(f"{PREFIX}{plan.path}.weight", None)
            rows.append(row)
            total_before += before
            total_after += row.bytes_after
            del w, qw
        if progress is not None:
            progress(i + 1)
    clone.patches_uuid = uuid.uuid4()
    if dtype != current:
        clone.set_model_compute_dtype(dtype)
    quantized = [r for r in rows if r.format != "keep"]
    params = sum(r.params for r in rows)
    as_bf16 = sum(r.bytes_after if r.format != "keep" else 2 * r.params for r in rows)
    summary = {
        "layers quantized": f"{len(quantized)} of {len(rows)}",
        "compute dtype": str(dtype).replace("torch.", ""),
        "linear weight bytes before": total_before,
        "linear weight bytes after": total_after,
        # kept layers counted at 16 bits, so this compares with the same model in bf16
        "linear weights vs bf16": round(2.0 * params / max(as_bf16, 1), 3),
        "quantized layers vs bf16": round(2.0 * sum(r.params for r in quantized)
                                          / max(sum(r.bytes_after for r in quantized), 1), 3),
    }
    return Result(clone, rows, summary)

