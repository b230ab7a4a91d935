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
- Wan 2.2 S2V's blocks get the transformer options (and so their attention reaches
  ``optimized_attention_override``) only since 0.33: ``blocks_get_transformer_options`` says, and
  Sparse Attention refuses the model where they do not.
- HunyuanVideo put its image tokens before the text up to 0.3.75 (its double blocks carry
  ``flipped_img_txt``) and after since; 0.33 also names the image slice of joint streams
  (``transformer_options["img_slice"]``). ``attention/layout.py`` and the block cache read both.
- ``string_to_seed`` moved from ``comfy.model_patcher`` to ``comfy.utils`` (0.33; 0.38 warns
  at each call of the old name): ``string_to_seed`` here takes whichever exists.
- Model parameter dataclasses gained required fields after 0.3.75 (``FluxParams.txt_ids_dims``,
  ``ChromaParams.txt_ids_dims`` and ``vec_in_dim``, ``HunyuanVideoParams.meanflow_sum``) and
  optional ones (Flux 2's ``txt_norm``, ``yak_mlp``...); the stock loader's detection fills them
  from the checkpoint. Only the test fixtures, which build small models from a config instead of
  a file, need them: ``complete_unet_config`` adds what a host requires and drops what it lacks.
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
