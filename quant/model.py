"""Quantize Model on a ComfyUI model: a clone whose linear layers are object patches.

The shared model is never modified. Layers are quantized one at a time (one float32 copy at a
time), so peak memory stays near the model's own size plus the packed copy. The weight read is
the one the input computes with: its own module (``get_model_object``), the clean tensor (the
backup while a loaded clone has patched the shared weights in place), converted and with its
weight patches (a LoRA loaded before) merged as ``ModelPatcher.patch_weight_to_device`` does;
those patches are then dropped from the clone. Bias patches stay and apply as usual.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..metrics import sqnr_db
from . import core, formats, policy
from .linear import QuantLinear
from .lowrank import quantize_branched
from .qweight import QuantWeight, smoothing_factors

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
    outlier_ratio: float | None = None    # largest / median per-channel activation absmax
    step_range_ratio: float | None = None  # largest / smallest activation absmax over the steps
    reason: str = ""
    layout: str = ""                      # whose layer computes it: "ComfyUI <layout>" or "ComfyUI-Accel <format>"


@dataclass
class Result:
    model: object                # the ModelPatcher clone
    rows: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def is_linear(module) -> bool:
    if isinstance(module, (QuantLinear, torch.nn.Linear)):
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


def plan_model(patcher, fmt: str, group_size: int | None, overrides: list[policy.Override]) -> list[policy.LayerPlan]:
    """A plan for every linear layer. A layer that another node replaced with an object patch
    on this model is left as it is (its patch is chained, not replaced)."""
    plans = []
    for name, module in linear_layers(patcher):
        shape = tuple(module.weight.shape)
        if (PREFIX + name in patcher.object_patches and not isinstance(module, QuantLinear)
                and getattr(module, "accel_branch", None) is None):
            plans.append(policy.LayerPlan(name, shape, policy.role_of(name), None,
                                          "replaced by another node's object patch: left as it is"))
            continue
        plans.append(policy.plan_layer(name, shape, fmt, group_size, overrides))
    return plans


def is_ours(module) -> bool:
    """A layer Quantize Model made: our QuantLinear or ComfyUI's own layer it built."""
    return isinstance(module, QuantLinear) or getattr(module, "accel_spec", None) is not None


def layer_format(module) -> str:
    """The format of ours a quantized layer of ours computes (``is_ours``)."""
    spec = getattr(module, "accel_spec", None)
    return (spec if spec is not None else module.weight.spec).format


def quantized_layers(patcher) -> list[str]:
    return [name for name, m in linear_layers(patcher) if is_ours(m)]


def compute_dtype(patcher) -> torch.dtype:
    model = patcher.model
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def clean_param(patcher, path: str, name: str) -> torch.Tensor | None:
    """A parameter as stored, before any clone's weight patches (the backup when a loaded clone
    has patched the shared weights in place). ``path`` "" is the diffusion model itself."""
    import comfy.utils
    where = (PREFIX + path).rstrip(".")
    module = patcher.get_model_object(where)
    backup = patcher.backup.get(f"{where}.{name}")
    # the backup is the installed module's: another clone's object patch may be installed there
    if backup is not None and comfy.utils.get_attr(patcher.model, where) is module:
        return backup.weight
    return getattr(module, name, None)


@torch.no_grad()
def merged_float(w: torch.Tensor, patches: list | None, key: str, device=None, convert=None) -> torch.Tensor:
    """A float32 copy of ``w`` on ``device`` with ``patches`` (a LoRA) merged in, as ComfyUI's
    ``patch_weight_to_device`` does: the layer's ``convert`` first (a packed weight dequantized)."""
    import comfy.lora
    w = w.to(device=device or w.device, dtype=torch.float32, copy=True)
    if convert is not None:
        w = convert(w, inplace=True)
    if isinstance(w, QuantWeight):
        w = w.dequantize(torch.float32)
    w = w.float()
    return comfy.lora.calculate_weight(patches, w, key) if patches else w


def float_weight(patcher, path: str, device=None) -> torch.Tensor:
    """The float32 weight the input model computes with, LoRA patches merged."""
    key = f"{PREFIX}{path}.weight"
    convert = getattr(patcher.get_model_object(PREFIX + path), "convert_weight", None)
    return merged_float(clean_param(patcher, path, "weight"), patcher.patches.get(key), key, device, convert)


def clean_bias(patcher, path: str) -> torch.Tensor | None:
    bias = clean_param(patcher, path, "bias")
    return None if bias is None else bias.detach().clone()


# Above this many weights, weight SQNR is measured on evenly spaced output rows: the metric
# works in float64, and a full copy of a 70M-weight layer would be gigabytes.
_SQNR_MAX_ELEMENTS = 1 << 22


def sqnr_rows(n: int, k: int) -> torch.Tensor:
    """Evenly spaced output rows holding at most ``_SQNR_MAX_ELEMENTS`` weights (all rows below)."""
    return torch.linspace(0, n - 1, max(1, min(n, _SQNR_MAX_ELEMENTS // k))).round().long().unique()


@torch.no_grad()
def weight_sqnr_db(w: torch.Tensor, qw: QuantWeight) -> float:
    n, k = w.shape
    if n * k <= _SQNR_MAX_ELEMENTS:
        return sqnr_db(w, qw.dequantize(torch.float32))
    rows = sqnr_rows(n, k).to(w.device)
    return sqnr_db(w[rows], qw.select_rows(rows).dequantize(torch.float32))


def act_label(spec) -> str:
    fmt = None if spec is None else formats.get(spec.format)
    return f"{fmt.act_type}{fmt.act_bits}" if fmt is not None and fmt.quantizes_activations(spec) else "float"


@torch.no_grad()
def output_sqnr_db(w: torch.Tensor, qw: QuantWeight, rows: torch.Tensor) -> float:
    """SQNR of the quantized layer's output against the float layer's, on recorded inputs."""
    rows = rows.to(w.device)
    return sqnr_db(rows @ w.t(), qw.linear(rows.to(qw.dtype), None).float())


def layer_sqnr_db(w: torch.Tensor, qw: QuantWeight, rows: torch.Tensor | None) -> float:
    """The output SQNR on ``rows`` where there are any, else the weight SQNR."""
    return output_sqnr_db(w, qw, rows) if rows is not None and rows.shape[0] else weight_sqnr_db(w, qw)


def smooths(spec, stats, smooth_alpha: float) -> bool:
    """SmoothQuant applies: statistics, an alpha, and a format that quantizes activations
    (there is nothing to smooth otherwise)."""
    return stats is not None and smooth_alpha > 0 and formats.get(spec.format).quantizes_activations(spec)


def quantize_layer(w: torch.Tensor, spec, dtype: torch.dtype, stats=None, smooth_alpha: float = 0.0) -> QuantWeight:
    """Pack one float weight, smoothed where ``smooths``. With statistics the format also gets
    the inputs' per-channel mean square (the VQ formats use it)."""
    smooth = None
    if smooths(spec, stats, smooth_alpha):
        smooth = smoothing_factors(stats.absmax, w, smooth_alpha)
    input_sq = None if stats is None else stats.channel_mean_square()
    return QuantWeight.quantize(w, spec, dtype, smooth=smooth, input_sq=input_sq)


def _quantize_layer(patcher, clone, plan, dtype, stats, smooth_alpha, kernels, fallbacks) -> LayerRow:
    """Put ``plan``'s layer into ``clone`` (unless it is kept or passes through); its report row."""
    module = patcher.get_model_object(PREFIX + plan.path)
    n, k = plan.shape
    loaded = core.core_format(module)  # ComfyUI's layout the input already holds this layer in
    before = core.packed_nbytes(module.weight) if loaded else n * k * module.weight.element_size()
    layer_stats = None if stats is None else stats.get(plan.path)
    row = LayerRow(plan.path, plan.role, "keep", "float", n * k, 8.0 * before / (n * k), before, before,
                   reason=plan.reason, layout=f"ComfyUI {loaded}" if loaded else "")
    if layer_stats is not None:
        row.outlier_ratio, row.step_range_ratio = layer_stats.outlier_ratio(), layer_stats.step_range_ratio()
    if plan.spec is None:
        row.reason += f"; stays as loaded, ComfyUI {loaded}" if loaded else ""
        return row
    row.format, row.activations = plan.spec.format, act_label(plan.spec)
    branch = getattr(module, "accel_branch", None)
    choice = core.choose(plan.spec, plan.shape, patcher.load_device, branched=branch is not None,
                         smoothed=branch is None and smooths(plan.spec, layer_stats, smooth_alpha),
                         calibrated=layer_stats is not None, kernels=kernels)
    if choice.fallback:
        fallbacks.setdefault(plan.spec.format, choice.reason)
    if loaded and choice.core == loaded and choice.full_precision == bool(
            getattr(module, "_full_precision_mm_config", False)):
        row.reason += f"; passed through: the input holds it in ComfyUI's {loaded}"
        return row
    w = float_weight(patcher, plan.path, device=patcher.load_device)
    sample = layer_stats.sample() if layer_stats is not None and layer_stats.rows else None
    if choice.core is not None:
        absmax = None if layer_stats is None else float(layer_stats.absmax.max())
        new = core.build_layer(w, plan.spec, choice, dtype, clean_bias(patcher, plan.path), patcher.load_device,
                               patcher.offload_device, input_absmax=absmax)
        after = core.packed_nbytes(new.weight)
        deq, picks = new.weight.dequantize().float(), sqnr_rows(n, k)
        row.weight_sqnr_db = sqnr_db(w[picks.to(w.device)], deq[picks.to(deq.device)])
        if sample is not None:
            sample = sample.to(w.device)  # the layer computes as in sampling, in its own dtype
            row.output_sqnr_db = sqnr_db(sample @ w.t(), new(sample.to(new.weight.device, new.weight.dtype)).float())
        row.activations = "float" if choice.full_precision else row.activations
        row.reason, row.layout = f"{plan.reason}; {choice.reason}", f"ComfyUI {choice.core}"
    else:
        if branch is not None:  # from SVD Low-Rank Branch: pack the residual with its smoothing
            qw = quantize_branched(w, branch, plan.spec, dtype)
        else:
            qw = quantize_layer(w, plan.spec, dtype, layer_stats, smooth_alpha)
        after = qw.packed_nbytes()
        row.weight_sqnr_db = weight_sqnr_db(w, qw)
        if sample is not None:
            row.output_sqnr_db = output_sqnr_db(w, qw, sample)
        row.reason += ((", smoothed" if qw.smooth is not None else "")
                       + (f", low-rank branch r={qw.rank}" if qw.rank else "") + f"; {choice.reason}")
        row.layout = f"ComfyUI-Accel {plan.spec.format}"
        new = QuantLinear(qw.retarget(device=patcher.offload_device), clean_bias(patcher, plan.path))
        # what was merged in, so a branch fitted later knows the float weight this approximates
        new.baked_patches = patcher.patches.get(f"{PREFIX}{plan.path}.weight")
    row.bits, row.bytes_after = 8.0 * after / (n * k), after
    if loaded:
        row.reason += f"; re-quantized from the input's ComfyUI {loaded} weight"
    clone.add_object_patch(PREFIX + plan.path, new)
    clone.patches.pop(f"{PREFIX}{plan.path}.weight", None)
    return row


@torch.no_grad()
def quantize_model(patcher, plans: list[policy.LayerPlan], dtype: torch.dtype | None = None,
                   stats: dict | None = None, smooth_alpha: float = 0.0,
                   progress: Callable[[int], None] | None = None, kernels: str = "auto") -> Result:
    """Apply ``plans`` (one per linear layer) to a clone of ``patcher``: ``dtype`` is the result's
    compute dtype (None keeps the model's), ``stats`` the per-layer ``calibrate.LayerStats`` (for
    smoothing and the report). ``kernels``: ``auto`` puts a layer on ComfyUI's own layout where
    ``core.choose`` allows and prefers it, ``core`` wherever it allows, ``ours`` never. A layer the
    input already holds in the layout asked for (a stock-loaded quantized file) passes through;
    in another, it is re-quantized from its dequantized weight."""
    already = quantized_layers(patcher)
    if already:
        raise AlreadyQuantized(f"the model already has {len(already)} quantized layers "
                               f"(e.g. {already[0]}); connect the model before quantization")
    current = compute_dtype(patcher)
    dtype = dtype or current
    clone = patcher.clone()
    rows, fallbacks = [], {}
    for i, plan in enumerate(plans):
        rows.append(_quantize_layer(patcher, clone, plan, dtype, stats, smooth_alpha, kernels, fallbacks))
        if progress is not None:
            progress(i + 1)
    for fmt, reason in fallbacks.items():
        log.info("Quantize Model: %s: %s", fmt, reason)
    clone.patches_uuid = uuid.uuid4()
    if dtype != current:
        clone.set_model_compute_dtype(dtype)
    return Result(clone, rows, summarize(rows, dtype))


def summarize(rows: list[LayerRow], dtype: torch.dtype) -> dict:
    quantized = [r for r in rows if r.format != "keep"]
    params = sum(r.params for r in rows)
    as_bf16 = sum(r.bytes_after if r.format != "keep" else 2 * r.params for r in rows)
    out = {
        "layers quantized": f"{len(quantized)} of {len(rows)}",
        "compute dtype": str(dtype).replace("torch.", ""),
        "linear weight bytes before": sum(r.bytes_before for r in rows),
        "linear weight bytes after": sum(r.bytes_after for r in rows),
        # kept layers counted at 16 bits, so this compares with the same model in bf16
        "linear weights vs bf16": round(2.0 * params / max(as_bf16, 1), 3),
        "quantized layers vs bf16": round(2.0 * sum(r.params for r in quantized)
                                          / max(sum(r.bytes_after for r in quantized), 1), 3),
    }
    measured = [r.output_sqnr_db for r in quantized if r.output_sqnr_db is not None]
    if measured:
        out["worst layer output SQNR dB"] = round(min(measured), 2)
        out["median layer output SQNR dB"] = upper_median(measured)
    return out


def upper_median(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2], 2)
