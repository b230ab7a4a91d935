"""Where the ComfyUI versions the pack supports differ, and how the pack meets each difference.

Supported: 0.3.75 (newest on the package index) to today's releases; 0.3.75 and 0.33.0 are tested,
newer upstream source (to 0.38.1: model_patcher.py at 08d0e510, wan/model.py at 0c9a69ae,
attention.py at 05080f60, comfy_api/latest at 168efe45) was read. Every difference is a feature
check on the running host, never its version string, so back-ports and removals take the right
branch. ComfyUI is imported inside the functions only. API by API (0.3.75 -> 0.33 -> newer):

- Plain weight loading (``ModelPatcher.load``, ``patch_weight_to_device``, the layer's
  ``convert_weight``/``set_weight``): same shape. 0.33 merges a LoRA in ``lora_compute_dtype`` and
  adds ``return_weight``/``force_cast``; newer patches shape-changing LoRAs in place in low VRAM.
  ``QuantLinear`` never changes shape; ``packed_like`` keeps a weight handed back unchanged packed.
- ``LowVramPatch``: 0.3.75 converts the weight through the layer (dequantize, add LoRA, repack);
  0.33+ adds the LoRA to whatever it is handed (``convert_func`` unused, "TODO: remove" upstream).
  ``lowvram_patch_converts`` tells which; ``QuantLinear`` converts around the patches itself where
  the host does not.
- Dynamic VRAM (0.33+, ``ModelPatcherDynamic`` and comfy-aimdo; the default loader on NVIDIA and
  recent AMD GPUs, never with ``--cpu``): weights stream per layer from the offload device; a LoRA
  goes to ``<param>_lowvram_function`` (``loader_functions``); small or shape-changing layers are
  patched at load through ``patch_weight_to_device(force_cast=True)``; ``force_patch_weights`` is
  refused, so Save Quantized Model bakes patches itself (``checkpoint.computed_state``); a layer's
  arena slot and pinned copies must not be shared by a copy (``LOADER_MODULE_STATE``). Newer
  upstream only adds a fast-disk pin pool.
- ``string_to_seed`` moved from ``comfy.model_patcher`` to ``comfy.utils`` (0.33 warns on the old).
- V3 combos: 0.33 refuses a value outside the options at queue time, 0.3.75 does not; no host
  refuses NaN or checks linked values. ``nodes/validate.py`` checks every input on every host.
- Parameter dataclasses gained required fields (``FluxParams.txt_ids_dims``, Chroma's
  ``txt_ids_dims``/``vec_in_dim``, ``HunyuanVideoParams.meanflow_sum``); detection fills them from
  a file, so only configs built by hand need ``complete_unet_config``.
- Wan 2.2 S2V's blocks get the transformer options (so the attention override) only since 0.33:
  ``blocks_get_transformer_options``; Sparse Attention refuses the model where they do not.
- HunyuanVideo put image tokens before the text up to 0.3.75 (``flipped_img_txt``) and after since;
  0.33 names the image slice (``transformer_options["img_slice"]``). ``attention/layout.py`` and
  the block cache read both.
- Object patches and wrappers (``clone``, ``add_object_patch``, ``add_wrapper_with_key``,
  ``WrappersMP.OUTER_SAMPLE``/``CALC_COND_BATCH``/``APPLY_MODEL``, ``outer_sample``'s arguments):
  unchanged; ``clone`` gains ``disable_dynamic``/``model_override`` (the plain-loader delegate for
  hooked conditioning shares our layers: ``loader_functions`` ignores a stale dynamic patch). Newer
  upstream's "config" weight patches become object patches: Quantize Model leaves such layers as they are.
- ``patches_replace["dit"]``: the argument dicts are unchanged. 0.33's Qwen-Image ``_modulate``
  takes a ``timestep_zero_index`` (edit models with a zero-timestep reference double the timestep
  batch) the arguments do not carry: the TeaCache signal modulates the reference tokens with the
  second half (``cache/adapters.py``). The UNet's ``forward_timestep_embed`` checks per-class
  patches first, which our probe modules never match.
- Attention override (``optimized_attention_override(func, q, k, v, heads, ...)``): 0.33 may pass
  q, k, v in an ``AttentionTensorContainer``, unpacked for an override without
  ``container_function`` (ours). Newer upstream pops a per-layer ``preferred_attention`` first, so
  the dense path we chain is the default backend. GQA calls stay dense on every host.
- V3 API (``comfy_api.latest``): still exported in newer upstream. Outputs' display names default
  to their ids from 0.33, so our nodes name them. ``io.DynamicCombo`` (0.33+) is used by stock
  nodes only; the lab's workflow converter handles it.
- ``comfy.quant_ops``: 0.3.75 has its own fp8-only ``QuantizedTensor``; 0.33+ wraps comfy-kitchen's
  (``float8_e4m3fn``, ``float8_e5m2``, ``nvfp4``, ``mxfp8``, ``int8_tensorwise``, ``convrot_w4a4``,
  ``asym_w4a8_int8``; 0.38.1 adds ``awq_w4a16``; none up to 0.38.1 lists ``svdquant_w4a4``), and
  ``comfy.ops.pick_operations`` gives its mixed-precision ``Linear``. ``_quantization_metadata``
  v1.0 keeps its names and parameters. ``core_quant_formats``/``core_linear_class`` feed
  ``quant/core.py``. ``load_diffusion_model_state_dict`` skips ``convert_old_quants`` when given
  ``custom_operations`` (our loader: our files need no conversion).
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
def blocks_get_transformer_options(model_class) -> bool:
    """Whether ``model_class.forward_orig`` hands its blocks the transformer options (so their
    attention reaches ``optimized_attention_override``): read from the host's own source, the one
    place that says it."""
    import re
    try:
        source = inspect.getsource(model_class.forward_orig)
    except (AttributeError, OSError, TypeError):
        return True
    return re.search(r"block\([^\n]*transformer_options", source) is not None


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


def loader_functions(module, param: str) -> list:
    """The functions the loader that placed ``module`` asks it to run on its ``param``
    (``"weight"`` or ``"bias"``) before use, in the order ComfyUI's own layers run them.

    The low-VRAM loader (every host) puts a ``LowVramPatch`` and any weight wrappers in
    ``<param>_function``. The dynamic-VRAM loader (0.33+) puts the ``LowVramPatch`` in
    ``<param>_lowvram_function`` and runs it first (wrappers stay in ``<param>_function``); it
    sets that attribute at each of its loads, but no loader clears it, so it counts only while
    no plain load holds the layer (a plain load marks each layer ``comfy_patched_weights`` or
    ``prev_comfy_cast_weights`` until it is undone)."""
    functions = list(getattr(module, param + "_function", None) or ())
    dynamic = getattr(module, param + "_lowvram_function", None)
    held_by_plain_load = getattr(module, "comfy_patched_weights", False) or hasattr(module, "prev_comfy_cast_weights")
    if dynamic is not None and not held_by_plain_load:
        functions.insert(0, dynamic)
    return functions


# What ComfyUI's loaders leave on a layer for the load that placed it; a copy of the layer
# starts without them. 0.3.75: the plain loader's marks. 0.33+: the dynamic loader's LoRA
# patches, seed key and pin state, and on GPUs its VRAM-arena slot (``_v``), the residency
# signature and staged views of that slot, the prefetch state and pinned host copies (``_pins``):
# a copy sharing those would compute with the original's staged weights.
LOADER_MODULE_STATE = ("comfy_patched_weights", "prev_comfy_cast_weights",
                       "weight_lowvram_function", "bias_lowvram_function", "seed_key", "_pin_state",
                       "_v", "_v_signature", "_v_weight", "_v_bias", "_v_block", "_prefetch", "_pins")


# Model families whose ComfyUI class takes its configuration as a parameter dataclass, by
# ``image_model``: the dataclass's module and name, and the fields newer hosts require with the
# value their detection gives the models these classes first described (Flux.1, Chroma,
# HunyuanVideo 1.0).
_PARAMETER_DATACLASSES = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
    "flux2": ("comfy.ldm.flux.model", "FluxParams", {}),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", {"txt_ids_dims": [], "vec_in_dim": None}),
    "chroma_radiance": ("comfy.ldm.chroma_radiance.model", "ChromaRadianceParams",
                        {"txt_ids_dims": [], "vec_in_dim": None}),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False}),
}


def complete_unet_config(config: dict) -> dict:
    """``config`` (a ``unet_config`` as a detection writes it) fitted to this host's parameter
    dataclass: the fields it requires and the config lacks are added as its detection would, and
    fields it does not have (written by a newer host's detection) are dropped, as this host's
    detection would never write them. Families without a parameter dataclass pass through."""
    entry = _PARAMETER_DATACLASSES.get(config.get("image_model"))
    if entry is None:
        return dict(config)
    module, name, values = entry
    params = getattr(importlib.import_module(module), name, None)
    if params is None:
        return dict(config)
    fields = {f.name for f in dataclasses.fields(params)}
    fitted = {k: v for k, v in config.items() if k in fields or k == "image_model"}
    return {**{k: copy.deepcopy(v) for k, v in values.items() if k in fields}, **fitted}


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
