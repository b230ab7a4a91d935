"""Which model family a ComfyUI MODEL is, in the words the nodes' messages use.

ComfyUI names a model's family by its ``comfy.supported_models`` config class (``Flux2``,
``ZImage``, ``WAN22_S2V``...), which the loader attaches to the model as ``model_config``; the
diffusion model class (``Flux``, ``NextDiT``, ``WanModel_S2V``) is shared by several of them.
Messages name both. No ComfyUI import: everything is read from the objects handed in.
"""
from __future__ import annotations

# supported_models entries that load as a MODEL but are not diffusion models: nothing here
# samples them, so no node of this pack patches them.
NOT_DIFFUSION = {
    "SAM3": "image segmentation (SAM 3)",
    "SAM31": "image and video segmentation (SAM 3.1)",
    "RT_DETR_v4": "object detection (RT-DETR v4)",
    "DepthAnything3": "depth estimation (Depth Anything 3)",
}


def config_name(model) -> str | None:
    """The supported_models config class of a ModelPatcher (or of its inner model), or None."""
    inner = getattr(model, "model", model)
    config = getattr(inner, "model_config", None)
    return type(config).__name__ if config is not None else None


def describe(model) -> str:
    """``'ZImage (NextDiT)'``: the family and the diffusion model class, for messages."""
    inner = getattr(model, "model", model)
    dm = getattr(inner, "diffusion_model", None)
    name = config_name(model)
    cls = type(dm).__name__ if dm is not None else type(inner).__name__
    if name is None or name == cls:
        return cls
    return f"{name} ({cls})"


def a_model(model) -> str:
    """``'a ZImage (NextDiT) model'`` / ``'an Anima model'``: the family with its article, for messages."""
    name = describe(model)
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name} model"


def not_diffusion(model) -> str | None:
    """What the model is, when it is not a diffusion model; None for diffusion models."""
    return NOT_DIFFUSION.get(config_name(model) or "")
