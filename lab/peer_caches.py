"""ComfyUI's own step caches (EasyCache, LazyCache) as the lab runs them beside ours, with a counter
of the model calls they let through."""
from __future__ import annotations

from lab.sampling import count_calls

COPY_KEY = "lab.peer_caches.copy_input"
DEFAULTS = dict(start_percent=0.15, end_percent=0.95)   # the nodes' own defaults


def comfy_cache(model, kind: str, reuse_threshold: float, start_percent: float, end_percent: float):
    """ComfyUI's own EasyCache / LazyCache node on ``model``: (the patched clone, its call counter).

    EasyCache gets its input as a copy (``hand_over_a_copy``): see that function for why."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    node = EasyCacheNode if kind == "EasyCache" else LazyCacheNode
    if kind == "EasyCache":
        model = hand_over_a_copy(model)
    out = node.execute(model, reuse_threshold, start_percent, end_percent, False)
    return count_calls(out.args[0] if hasattr(out, "args") else out[0])


def hand_over_a_copy(model):
    """A clone whose diffusion model receives a copy of its input, as it does on a GPU.

    On a reused step EasyCache adds its cached difference to its input *in place* and returns
    that tensor as the model output. ComfyUI's ``BaseModel._apply_model`` passes the sampler's
    own latent as that input whenever the cast to the model's dtype is a no-op: flow models
    (``calculate_input`` returns the latent unchanged) computing in float32, i.e. on a CPU. The
    output is then the very tensor ``calculate_denoised`` takes as ``x``, so ``denoised = x - x *
    sigma`` and the picture turns to noise (8-10 dB on both reference models). In bf16/fp16 on a
    GPU the cast makes a copy and nothing aliases. This wrapper, registered before EasyCache's
    (so it runs outside it), makes that copy here too, so the bench measures EasyCache as GPU
    users run it. LazyCache returns a new tensor and needs none."""
    import comfy.patcher_extension
    m = model.clone()

    def copy_input(executor, x, *args, **kwargs):
        return executor(x.clone(), *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, COPY_KEY, copy_input)
    return m
