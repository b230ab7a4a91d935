"""ComfyUI's own quantized layers (``comfy/quant_ops.py`` on comfy-kitchen) for the formats it has.

Where the host builds comfy-kitchen layouts (0.33 and later, ``compat.core_quant_formats``), Quantize
Model puts ComfyUI's mixed-precision ``Linear`` (the class its loader picks for a quantized file on
this device, ``compat.core_linear_class``) into the clone; it computes, takes LoRAs, moves and saves
exactly like a stock-loaded quantized file, with comfy-kitchen's kernels. Our format -> core's layout:
``int8`` -> ``int8_tensorwise`` (per-row scales, per-token int8 activations, as ours); ``fp8_e4m3`` ->
``float8_e4m3fn`` (the calibration's largest input as ``input_scale`` on fp8 GPUs; weight-only
without calibration, since an unscaled fp8 cast clips activations at 448); ``nvfp4`` -> ``nvfp4``
weight-only, ``nvfp4_w4a4`` -> ``nvfp4`` with activations (one scale per tensor, not per token) where
the device multiplies FP4; ``mxfp8`` -> ``mxfp8``; ``w4a8`` -> ``asym_w4a8_int8`` (ConvRot and a
Lloyd-Max codebook: another quantizer, the same int8 activations); ``w4a4`` -> ``convrot_w4a4``.

A layer stays on our ``QuantLinear`` where the host has no such layout, where a SmoothQuant factor or
a low-rank branch has no place in core's file (its loader reads ``pre_quant_scale`` for nvfp4 only; no
release up to 0.38.1 lists ``svdquant_w4a4``), for weight-only layers of layouts that always quantize
activations, where the shape does not fit, and where ours measured faster (``PREFERRED``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import compat
from . import formats
from .formats import Spec

# our format -> ComfyUI's QUANT_ALGOS name
CORE_NAMES = {"int8": "int8_tensorwise", "fp8_e4m3": "float8_e4m3fn", "nvfp4": "nvfp4", "nvfp4_w4a4": "nvfp4",
              "mxfp8": "mxfp8", "w4a8": "asym_w4a8_int8", "w4a4": "convrot_w4a4"}
KERNELS = ("auto", "core", "ours")
_ALWAYS_QUANTIZE_INPUT = ("int8_tensorwise", "asym_w4a8_int8", "convrot_w4a4")
_CONVROT_SIZES = (256, 64, 16)  # ConvRot's regular Hadamard blocks are powers of 4

# Where both paths exist, the faster one per kind of device, measured by lab/bench/bench_quant.py's
# ``core <format>`` records (figures in docs/quantization.md); ties go to ComfyUI's. Unlisted formats and
# every GPU use ComfyUI's kernels, a choice made on paper (no GPU has measured either).
PREFERRED = {("cpu", "int8"): "ours", ("cpu", "fp8_e4m3"): "ours", ("cpu", "w4a8"): "ours", ("cpu", "w4a4"): "ours",
             ("cpu", "nvfp4"): "core", ("cpu", "mxfp8"): "core"}


@dataclass(frozen=True)
class Choice:
    """Where one layer goes: ``core`` is ComfyUI's format name, or None for our path."""
    core: str | None
    reason: str
    full_precision: bool = False        # core's full_precision_matrix_mult: weight-only
    quantize_args: dict = field(default_factory=dict)
    fallback: bool = False              # the asked format cannot run as such here: logged once


def native_matmul(core_name: str, device: torch.device) -> bool:
    """Whether ComfyUI multiplies this layout's quantized activations on ``device`` (else it
    runs the layer dequantized, as its loader does for a stock file)."""
    import comfy.model_management
    check = {"nvfp4": "supports_nvfp4_compute", "mxfp8": "supports_mxfp8_compute",
             "float8_e4m3fn": "supports_fp8_compute", "float8_e5m2": "supports_fp8_compute"}.get(core_name)
    if check is None:
        return True
    return device.type == "cuda" and bool(getattr(comfy.model_management, check, lambda d: False)(device))


def _layout_args(core_name: str, shape: tuple[int, int], spec: Spec) -> tuple[dict, str | None]:
    """Quantize arguments of core's layout for a weight of ``shape``, or why it cannot hold it."""
    n, k = shape
    if core_name == "int8_tensorwise":
        return {"per_channel": True}, None
    if core_name in ("float8_e4m3fn", "float8_e5m2"):
        return {"scale": "recalculate"}, None
    if core_name == "nvfp4":
        return {}, None if k % 16 == 0 and n % 16 == 0 else f"nvfp4 needs both sides a multiple of 16, got {n}x{k}"
    if core_name == "mxfp8":
        return {}, None if k % 32 == 0 and n % 32 == 0 else f"mxfp8 needs both sides a multiple of 32, got {n}x{k}"
    rotation = next((r for r in _CONVROT_SIZES if k % r == 0), None)
    if rotation is None:
        return {}, f"{core_name} rotates groups of 16 to 256 inputs; the input width {k} is not a multiple of 16"
    if core_name == "asym_w4a8_int8":
        g = spec.group_size or 16
        if k % g or (16 % g and g % 16):
            return {}, (f"asym_w4a8_int8 needs a group size dividing the input width {k} that divides 16 or is a "
                        "multiple of 16")
        return {"group_size": g, "convrot_groupsize": rotation}, None
    if core_name == "convrot_w4a4":
        if k % 64:
            return {}, f"convrot_w4a4 quantizes groups of 64; the input width {k} is not a multiple of 64"
        return {"convrot_groupsize": rotation}, None
    return {}, None


def choose(spec: Spec, shape: tuple[int, int], device: torch.device, *, smoothed: bool = False,
           branched: bool = False, calibrated: bool = False, kernels: str = "auto") -> Choice:
    """Core's layout for one planned layer, or our path, with the reason the report shows."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    name = CORE_NAMES.get(spec.format)
    if kernels == "ours":
        return Choice(None, "our kernels (asked)")
    if name is None:
        return Choice(None, f"ComfyUI has no {spec.format} layout")
    if name not in compat.core_quant_formats():
        return Choice(None, f"this ComfyUI has no {name} layout (needs comfy.quant_ops on comfy-kitchen); "
                            "our kernels run instead", fallback=True)
    if branched:
        return Choice(None, "low-rank branch: ComfyUI's loader has no svdquant_w4a4 layout")
    if smoothed:
        return Choice(None, f"SmoothQuant factors: ComfyUI's {name} files have no place for them")
    weight_only = not formats.get(spec.format).quantizes_activations(spec)
    if weight_only and name in _ALWAYS_QUANTIZE_INPUT:
        return Choice(None, f"weight-only: ComfyUI's {name} always quantizes activations")
    args, problem = _layout_args(name, shape, spec)
    if problem:
        return Choice(None, problem)
    if spec.format == "nvfp4_w4a4" and not native_matmul(name, device):
        return Choice(None, f"nvfp4 activations: this {device.type} has no FP4 matmul, where ComfyUI's nvfp4 "
                            "runs weight-only; our FP4 emulation runs instead", fallback=True)
    full_precision = weight_only or spec.format == "nvfp4" or (name.startswith("float8") and not calibrated)
    if kernels == "auto" and PREFERRED.get((device.type, spec.format), "core") == "ours":
        return Choice(None, f"our kernels: measured faster than ComfyUI's {name} on {device.type}")
    what = "weight-only" if full_precision else ("dequantized here" if not native_matmul(name, device) else
                                                  "quantized matmul")
    return Choice(name, f"ComfyUI's {name} ({what})", full_precision, args)


# The tensors ComfyUI's loader needs for each layout (``L.weight`` and its scales, by suffix).
FILE_PARTS = {"float8_e4m3fn": ("", "_scale"), "float8_e5m2": ("", "_scale"), "int8_tensorwise": ("", "_scale"),
              "nvfp4": ("", "_scale", "_scale_2"), "mxfp8": ("", "_scale"), "convrot_w4a4": ("", "_scale"),
              "asym_w4a8_int8": ("", "_s_rel", "_s_channel")}


def core_format(module) -> str | None:
    """ComfyUI's format name of a layer holding a core ``QuantizedTensor`` (ours or a stock-loaded one)."""
    if not compat.core_quant_formats():
        return None  # no comfy-kitchen layouts on this host: no layer holds one
    import comfy.quant_ops
    weight = getattr(module, "weight", None)
    return getattr(module, "quant_format", None) if isinstance(weight, comfy.quant_ops.QuantizedTensor) else None


def packed_nbytes(weight) -> int:
    """Bytes of a core ``QuantizedTensor``: its data and every scale."""
    return sum(t.numel() * t.element_size() for t in weight.state_dict("").values())


@torch.no_grad()
def build_layer(w: torch.Tensor, spec: Spec, choice: Choice, dtype: torch.dtype, bias: torch.Tensor | None,
                load_device: torch.device, store_device: torch.device, input_absmax: float | None = None):
    """ComfyUI's ``Linear`` holding float weight ``w`` [N, K] in ``choice``'s layout, on ``store_device``."""
    import comfy.quant_ops
    from comfy.quant_ops import QuantizedTensor
    linear_class = compat.core_linear_class(dtype, load_device)
    n, k = w.shape
    layer = linear_class(k, n, bias=bias is not None, device=store_device)
    layout = comfy.quant_ops.QUANT_ALGOS[choice.core]["comfy_tensor_layout"]
    qt = QuantizedTensor.from_float(w.float(), layout, **choice.quantize_args).to(dtype=dtype)
    layer.weight = torch.nn.Parameter(qt.to(device=store_device), requires_grad=False)
    layer.quant_format = choice.core
    layer.layout_type = layout
    layer._full_precision_mm_config = choice.full_precision
    layer._full_precision_mm = choice.full_precision or choice.core in layer._disabled_formats
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(device=store_device, dtype=dtype), requires_grad=False)
    if input_absmax is not None and choice.core.startswith("float8") and not choice.full_precision:
        fp8_max = torch.finfo(comfy.quant_ops.QUANT_ALGOS[choice.core]["storage_t"]).max
        scale = torch.tensor(max(input_absmax, 1e-12) / fp8_max, dtype=torch.float32, device=store_device)
        layer.input_scale = torch.nn.Parameter(scale, requires_grad=False)
    layer.accel_spec = spec  # made by Quantize Model (a stock-loaded layer has none)
    layer.accel_reason = choice.reason
    return layer


def layer_state(module, prefix: str, weight=None) -> dict:
    """The tensors ComfyUI's ``Linear`` writes for ``module`` (weight and scales, ``comfy_quant``,
    bias, input scale), with ``weight`` (a ``QuantizedTensor`` of its layout) in place of its own."""
    sd = module.state_dict(prefix=prefix)
    if weight is not None:
        sd.update(weight.state_dict(prefix + "weight"))
    return sd
