"""Where the ComfyUI versions the pack supports differ, and how the pack meets each difference.

Supported: ComfyUI 0.3.75 (the newest on the package index) up to today's releases (0.33 is
tested; upstream 0.38.1 read through its source). Every difference is found by a feature check
on the running host, never by its version string, so a host that back-ports or drops a feature
gets the right branch. ComfyUI is imported inside the functions only.

What changes, API by API (0.3.75 -> 0.33 -> 0.38.1), and what the pack does about it:

- ``LowVramPatch`` (low-VRAM loading with a LoRA): on 0.3.75 the patch dequantizes the layer's
  weight through the layer's ``convert_weight``, adds the LoRA and repacks it through
  ``set_weight``. From 0.33 on it only adds the LoRA to whatever weight it is handed (core's
  ops dequantize their own ``QuantizedTensor`` first) and ``convert_func``/``set_func`` are
  unused ("TODO: remove" upstream). ``lowvram_patch_converts`` tells which; ``QuantLinear``
  dequantizes and repacks around the patches itself where the host does not.
- ``string_to_seed`` moved from ``comfy.model_patcher`` to ``comfy.utils`` (0.33; 0.38 warns
  at each call of the old name): ``string_to_seed`` here takes whichever exists.
- Model parameter dataclasses gained required fields after 0.3.75 (``FluxParams.txt_ids_dims``,
  ``ChromaParams.txt_ids_dims`` and ``vec_in_dim``, ``HunyuanVideoParams.meanflow_sum``); the
  stock loader's detection fills them from the checkpoint. Only the test fixtures, which build
  small models from a config instead of a file, need them: ``complete_unet_config``.
- ``comfy.quant_ops`` (quantized layers): 0.3.75 has its own fp8-only ``QuantizedTensor``; from 0.33 on
  it wraps comfy-kitchen's (layouts ``float8_e4m3fn``, ``float8_e5m2``, ``nvfp4``, ``mxfp8``,
  ``int8_tensorwise``, ``convrot_w4a4``, ``asym_w4a8_int8``; 0.38.1 adds ``awq_w4a16``; no release up
  to 0.38.1 lists kitchen's ``svdquant_w4a4``) and ``comfy.ops.pick_operations`` gives the
  mixed-precision ``Linear`` its loader uses for them. ``core_quant_formats`` lists the layouts this
  host builds (empty on 0.3.75 or without comfy-kitchen), ``core_linear_class`` that ``Linear``;
  Quantize Model uses them for its formats core has (``quant/core.py``) and keeps its own layers
  elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect

MINIMUM_COMFYUI = "0.3.75"


def host_problem() -> str | None:
    """One sentence saying why this ComfyUI is too old for the pack, or None where it is not.

    Checks what 0.3.75 brought that the pack relies on: the V3 node API (``comfy_api.latest``)
    and a diffusion-model loader that takes the file's metadata."""
    try:
        from comfy_api.latest import io  # noqa: F401
        import comfy.sd
    except ImportError as e:
        missing = f"it has no {e.name or 'V3 node API'}"
    else:
        params = inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters
        if "metadata" in params:
            return None
        missing = "its load_diffusion_model_state_dict() takes no metadata"
    return (f"ComfyUI-Accel needs ComfyUI {MINIMUM_COMFYUI} or newer, and this ComfyUI ({host_version()}) "
            f"is older ({missing}); update ComfyUI.")


def host_version() -> str:
    """The running ComfyUI's version string, for messages only."""
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "version unknown"


def string_to_seed(text: str) -> int:
    """ComfyUI's seed for a weight key (the seed of its stochastic rounding)."""
    import comfy.utils
    if hasattr(comfy.utils, "string_to_seed"):
        return comfy.utils.string_to_seed(text)
    import comfy.model_patcher
    return comfy.model_patcher.string_to_seed(text)


@functools.cache
def lowvram_patch_converts() -> bool:
    """True where ComfyUI's ``LowVramPatch`` converts the weight itself (0.3.75): it calls the
    layer's ``convert_weight`` before adding the patches and ``set_weight`` after. Found by
    running one on an empty patch list with a converter that records its call."""
    import torch
    from comfy.model_patcher import LowVramPatch
    calls = []

    def convert(weight, **kwargs):
        calls.append(True)
        return weight

    LowVramPatch("probe.weight", {"probe.weight": []}, convert, None)(torch.zeros(1))
    return bool(calls)


# Fields newer hosts' parameter dataclasses require, with the value their detection gives the
# models these classes first described (Flux.1, Chroma, HunyuanVideo 1.0): the class's module,
# its name, and the fields.
_NEWER_REQUIRED_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", {"txt_ids_dims": [], "vec_in_dim": None}),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False}),
}


def complete_unet_config(config: dict) -> dict:
    """``config`` (a ``unet_config`` as 0.3.75's detection writes it) plus the fields this host's
    parameter dataclass requires and the config lacks. Unknown families pass through."""
    entry = _NEWER_REQUIRED_FIELDS.get(config.get("image_model"))
    if entry is None:
        return dict(config)
    module, name, values = entry
    params = getattr(importlib.import_module(module), name, None)
    fields = {f.name for f in dataclasses.fields(params)} if params is not None else set()
    return {**{k: copy.deepcopy(v) for k, v in values.items() if k in fields}, **config}


def core_quant_formats() -> frozenset:
    """The names in ComfyUI's ``QUANT_ALGOS`` whose comfy-kitchen layout this host can build, or
    an empty set where ``comfy.quant_ops`` is not kitchen's (0.3.75) or comfy-kitchen is missing
    (then its ``QuantizedTensor`` is a placeholder, not a tensor class)."""
    try:
        import comfy.ops
        import comfy.quant_ops
    except ImportError:
        return frozenset()  # ComfyUI not importable (yet): not remembered
    return _core_quant_formats()


@functools.cache
def _core_quant_formats() -> frozenset:
    import torch
    import comfy.ops
    import comfy.quant_ops as quant_ops
    get_layout = getattr(quant_ops, "get_layout_class", None)
    qt = getattr(quant_ops, "QuantizedTensor", None)
    if (get_layout is None or not (isinstance(qt, type) and issubclass(qt, torch.Tensor))
            or "model_config" not in inspect.signature(comfy.ops.pick_operations).parameters):
        return frozenset()
    names = set()
    for name, conf in getattr(quant_ops, "QUANT_ALGOS", {}).items():
        try:
            layout = get_layout(conf["comfy_tensor_layout"])
        except (KeyError, TypeError):
            continue
        if layout is not None:
            names.add(name)
    return frozenset(names)


class _QuantizedModelConfig:
    """What ``pick_operations`` reads from a model config to choose mixed-precision ops."""
    quant_config = {"mixed_ops": True}


@functools.lru_cache(maxsize=None)
def core_ops(compute_dtype, load_device):
    """The operations ComfyUI's loader uses for a quantized checkpoint computing in
    ``compute_dtype`` on ``load_device``: its layouts the device cannot multiply natively
    (nvfp4, mxfp8, fp8 without the GPU for them) run dequantized, as in a stock-loaded file."""
    import comfy.ops
    return comfy.ops.pick_operations(None, compute_dtype, load_device, model_config=_QuantizedModelConfig())


def core_linear_class(compute_dtype, load_device):
    return core_ops(compute_dtype, load_device).Linear
