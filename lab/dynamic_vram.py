"""ComfyUI's dynamic-VRAM loader (``ModelPatcherDynamic``, ComfyUI 0.33+) run on the CPU, for tests.

On a GPU, 0.33's main.py makes every model loader build a ``ModelPatcherDynamic``. With
``--cpu``, and in process here, the loaders build a plain ``ModelPatcher``, and the class itself
hands back a plain one when its load device is the CPU. :func:`dynamic_patcher` builds the real
class without that reroute, so ComfyUI's own ``load``, ``clone``, ``unpatch_model`` and backup
handling run here unchanged: the code that decides what our layers see (which layers are
streamed, where a LoRA's patch goes, which small layers are patched at load time, backups put
back at the next load). What the CPU cannot run: the VRAM arena (comfy-aimdo's vbar; no layer
gets a ``_v`` slot here, so ComfyUI's own layers take their non-streamed path, which ignores a
LoRA hung on them: tests put LoRAs on our layers only), pinned host buffers, offload streams,
block prefetch, ``partially_unload`` (it refuses a CPU load device).
"""
from __future__ import annotations

import functools

from lab import fixtures


def unavailable() -> str | None:
    """Why this host cannot build a dynamic-VRAM patcher, or None."""
    import comfy.model_patcher
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no dynamic-VRAM loader (ModelPatcherDynamic came in 0.33)"
    import comfy_aimdo.host_buffer
    if comfy_aimdo.host_buffer.lib is None:
        return "comfy-aimdo's library did not load (lab.host loads it before ComfyUI)"
    return None


@functools.cache
def _patcher_class():
    import comfy.model_patcher

    class CpuModelPatcherDynamic(comfy.model_patcher.ModelPatcherDynamic):
        """ComfyUI's class as it is, but built on a CPU load device too (its ``__new__``
        returns a plain ModelPatcher there)."""

        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

    return CpuModelPatcherDynamic


def as_dynamic(patcher):
    """The model of a freshly loaded plain ``patcher`` under the dynamic-VRAM loader (the plain
    patcher must not be used any more: the two would not know each other's patches)."""
    return _patcher_class()(patcher.model, patcher.load_device, patcher.offload_device)


def dynamic_patcher(family: str, size: str = "tiny", **kwargs):
    """The fixture model (``fixtures.load_model``'s arguments) under the dynamic-VRAM loader, in
    its own BaseModel (so no plain patcher of another load of the fixture shares its modules)."""
    return as_dynamic(fixtures.load_model(family, size, **kwargs))
