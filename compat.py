"""Where the ComfyUI versions the pack supports differ, and how the pack meets each difference.

Supported: ComfyUI 0.3.75 (the newest on the package index) up to today's releases (0.3.75 and
0.33.0 are tested; newer upstream source, to 0.38.1, was read). Every difference is found by a
feature check on the running host, never by its version string, so a host that back-ports or
drops a feature gets the right branch. ComfyUI is imported inside the functions only.

What changes, API by API (0.3.75 -> 0.33 -> newer upstream), and what the pack does about it.
"Newer" is what the code index holds of Comfy-Org/ComfyUI: one stored version per file, each
from its own commit, none confirmed to be the 0.38.1 tag (comfyui_version.py 0.38.1 is commit
20ca544e; model_patcher.py was read at 08d0e510, wan/model.py at 0c9a69ae, attention.py at
05080f60, comfy_api/latest/__init__.py at 168efe45, all newer than 0.33).

- Weight loading, plain loader (``ModelPatcher.load``, ``patch_weight_to_device``,
  ``get_key_weight``, the ``convert_weight``/``set_weight`` layer protocol): unchanged in shape.
  0.33 merges a LoRA in ``lora_compute_dtype`` (fp16 on most GPUs, fp32 on the CPU) instead of
  fp32 and adds ``return_weight``/``force_cast``; newer upstream also patches a shape-changing
  LoRA in place in low-VRAM mode. ``QuantLinear`` is unaffected (its shape never changes);
  ``packed_like`` keeps a weight handed back unchanged in its packed form.
- ``LowVramPatch``: on 0.3.75 the patch dequantizes the layer's weight through the layer's
  ``convert_weight``, adds the LoRA and repacks it through ``set_weight``. From 0.33 on it only
  adds the LoRA to whatever weight it is handed and ``convert_func``/``set_func`` are unused
  ("TODO: remove" upstream; still so in newer upstream). ``lowvram_patch_converts`` tells which;
  ``QuantLinear`` dequantizes and repacks around the patches itself where the host does not.
- Dynamic VRAM (0.33+: ``ModelPatcherDynamic``, comfy-aimdo; what main.py makes every loader
  build on NVIDIA and recent AMD GPUs unless ``--disable-dynamic-vram``, ``--highvram``,
  ``--gpu-only`` or ``--novram``; never with ``--cpu``): weights stay on the
  offload device and are streamed per layer. A LoRA goes to ``<param>_lowvram_function`` instead
  of ``<param>_function`` (``loader_functions``); layers of 16 KB or less, and layers whose LoRA
  changes their shape, are patched at load time through ``patch_weight_to_device(force_cast=True)``
  (convert, then set, also with no patch); ``force_patch_weights`` is refused by an assertion, so
  Save Quantized Model bakes patches itself (``checkpoint.computed_state``); a layer gets a slot in
  the VRAM arena and, once cast, pinned host copies, which a copy of the layer must not share
  (``LOADER_MODULE_STATE``). Unchanged in newer upstream apart from a fast-disk pin pool.
- ``string_to_seed`` moved from ``comfy.model_patcher`` to ``comfy.utils`` (0.33; the old name
  logs a warning at each call from 0.33 on): ``string_to_seed`` here takes whichever exists.
- V3 combo values: 0.33 refuses a value outside a combo's options when the prompt is queued;
  0.3.75 passes any value to the node. No host refuses NaN in a FLOAT or checks a value that
  arrives through a link. The pack does not branch on this: ``nodes/validate.py`` checks every
  input of every node against its schema on every host, before the node runs.
- Model parameter dataclasses gained required fields after 0.3.75 (``FluxParams.txt_ids_dims``,
  ``ChromaParams.txt_ids_dims`` and ``vec_in_dim``, ``HunyuanVideoParams.meanflow_sum``) and
  optional ones (Flux 2's ``txt_norm``, ``yak_mlp``...); the stock loader's detection fills them
  from the checkpoint. Only the test fixtures, which build small models from a config instead of
  a file, need them: ``complete_unet_config`` adds what a host requires and drops what it lacks.
- Wan 2.2 S2V's blocks get the transformer options (and so their attention reaches
  ``optimized_attention_override``) only since 0.33: ``blocks_get_transformer_options`` says, and
  Sparse Attention refuses the model where they do not.
- HunyuanVideo put its image tokens before the text up to 0.3.75 (its double blocks carry
  ``flipped_img_txt``) and after since; 0.33 also names the image slice of joint streams
  (``transformer_options["img_slice"]``). ``attention/layout.py`` and the block cache read both.
- Object patches and wrappers (``clone``, ``add_object_patch``, ``get_model_object``,
  ``add_wrapper_with_key``/``remove_wrappers_with_key``, ``WrappersMP.OUTER_SAMPLE``,
  ``CALC_COND_BATCH``, ``APPLY_MODEL``, ``CFGGuider.outer_sample``'s arguments): same in 0.33;
  ``clone`` gains ``disable_dynamic``/``model_override`` (the sampler's plain-loader delegate for
  hooked conditioning shares our layers: ``loader_functions`` ignores a stale dynamic patch there).
  Newer upstream adds "config" weight patches that become object patches of a
  ``ConfigurableModule``; Quantize Model leaves any layer another node object-patched as it is.
- ``patches_replace["dit"]``: the argument dicts our block hook passes on are unchanged (Wan in
  newer upstream: ``img, txt, vec, pe, transformer_options`` / ``original_block``). 0.33's
  Qwen-Image block ``_modulate`` takes a ``timestep_zero_index`` (edit models with a zero-timestep
  reference, ``ref_latents_method="index_timestep_zero"``, which doubles the timestep batch) that
  the replacement arguments do not carry. ``cache.adapters``'s Qwen signal sees it as a timestep
  batch larger than the image batch and modulates the reference tokens (the last
  ``sum(transformer_options["reference_image_num_tokens"])``) with the second half, through the
  block's own ``_modulate`` (test: ``test_qwen_edit_signal_with_a_zero_timestep_reference``).
  Flux's ``apply_mod`` slices the modulation differently (same values); the UNet's
  ``forward_timestep_embed`` now checks its per-class patches before dispatching, which our block
  containers' plain probe modules never match.
- Attention override (``transformer_options["optimized_attention_override"]``, called as
  ``override(func, q, k, v, heads, ...)``): 0.33 lets a model pass q, k, v in
  ``AttentionTensorContainer`` (MiniMax); an override without ``container_function`` receives
  the unpacked tensors, as ours does. Newer upstream pops a per-layer ``preferred_attention``
  before calling the override, so the dense path we chain is the default backend, not that
  layer's preference (comfy-kitchen int8 attention from a checkpoint). GQA calls
  (``enable_gqa``) stay dense in our override on every host.
- V3 node API (``comfy_api.latest``: ``io``, ``ui``, ``ComfyExtension``): still exported in newer
  upstream (through ``_io_public``/``_ui_public``, plus a new ``sdk``); outputs' display names
  default to their ids from 0.33, so our nodes name them. ``io.DynamicCombo``
  (``COMFY_DYNAMICCOMBO_V3``, 0.33+) is used by stock nodes only (SaveVideo's ``format``); our
  nodes declare none; ``lab/workflows.py`` converts the stock nodes that do.
- ``comfy/quant_ops.py`` layouts (``_quantization_metadata`` v1.0, ``int8_tensorwise`` with a
  per-row ``weight_scale`` [N, 1], ``float8_e4m3fn`` with a scalar ``weight_scale``): the same
  names and parameters in 0.33 and newer upstream (0.33 adds ``convrot_w4a4`` and
  ``asym_w4a8_int8``). ``load_diffusion_model_state_dict`` gains
  ``disable_dynamic`` and skips ``convert_old_quants`` when given ``custom_operations`` (our
  loader's case: our files need no conversion).
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
