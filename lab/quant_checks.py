"""Helpers for the quantization tests and benchmarks: sampling runs on fixtures, LoRAs,
reference models and the checks that a node left its input model alone (real ComfyUI)."""
from __future__ import annotations

import functools

import torch

from lab import fixtures, sampling
from comfyui_accel.quant import model as qmodel
from comfyui_accel.quant import policy


# One euler step on the family's tiny fixture (``sample(model, family)``): enough for the checks.
sample = functools.partial(sampling.sample, steps=1, fix_empty_latent=True)


def plans_for(model, fmt: str, group: int = 64, overrides: str = ""):
    return qmodel.plan_model(model, fmt, group, policy.parse_overrides(overrides))


def quantize(model, fmt: str = "int8", group: int = 64, overrides: str = "", dtype=None, kernels: str = "ours"):
    """Quantize Model's layers; our own (``QuantLinear``) unless ``kernels`` says otherwise
    ("auto": what the node does on this host, "core": ComfyUI's layouts wherever they exist)."""
    return qmodel.quantize_model(model, plans_for(model, fmt, group, overrides), dtype=dtype, kernels=kernels)


def patcher_tensors(model) -> dict:
    """The diffusion model's tensors as this ModelPatcher sees them: its own object patches
    (or the originals while another clone's are installed) and clean weights (the backup
    while another clone's weight patches are applied in place)."""
    import comfy.utils
    out = {}
    root = model.model.diffusion_model
    for path, _ in root.named_modules():
        module = model.get_model_object("diffusion_model." + path) if path else root
        installed = comfy.utils.get_attr(model.model, "diffusion_model." + path) if path else root
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{path}.{name}" if path else name
            full = "diffusion_model." + key
            if full in model.backup and installed is module:  # the backup is the installed module's
                tensor = model.backup[full].weight
            out[key] = tensor.detach().clone()
    return out


def snapshot(model) -> dict:
    """Everything about a ModelPatcher that a node must not change."""
    return {
        "tensors": patcher_tensors(model),
        "object_patches": dict(model.object_patches),
        "patches": {k: list(v) for k, v in model.patches.items()},
        "uuid": model.patches_uuid,
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["object_patches"] == before["object_patches"]
    assert after["uuid"] == before["uuid"]
    assert after["patches"].keys() == before["patches"].keys()
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert type(after["tensors"][k]) is torch.Tensor, k
        assert torch.equal(after["tensors"][k], v), k


def lora_for(model, layers: list[str], rank: int = 4, scale: float = 0.5, seed: int = 0) -> dict:
    """A LoRA state dict in the plain 'diffusion_model.<path>.lora_up/down' format."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in layers:
        n, k = model.get_model_object("diffusion_model." + path).weight.shape
        sd[f"diffusion_model.{path}.lora_up.weight"] = torch.randn(n, rank, generator=g) * scale / rank ** 0.5
        sd[f"diffusion_model.{path}.lora_down.weight"] = torch.randn(rank, k, generator=g) / k ** 0.5
    return sd


def with_lora(model, lora: dict, strength: float = 1.0):
    import comfy.sd
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    return patched


def with_weights(model, weights: dict):
    """A clone computing with the given float weights (ComfyUI's 'set' patches)."""
    clone = model.clone()
    clone.add_patches({f"diffusion_model.{p}.weight": ("set", (w,)) for p, w in weights.items()}, 1.0)
    return clone


def full_and_lowvram_outputs(model, layer: str):
    """One Wan forward of ``model`` fully loaded and in low-VRAM mode (weights patched per call).

    Returns ``(full, lowvram, used_lowvram_full, used_lowvram)``; ``layer`` (a dotted path in the
    diffusion model) is the layer checked for a ``weight_function``, ComfyUI's low-VRAM patch hook.
    """
    x, t = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5])
    ctx = fixtures.make_conditioning("wan21", "tiny")[0][0]

    def run(lowvram_bytes):
        model.patch_model(lowvram_model_memory=lowvram_bytes, load_weights=True)
        try:
            used = bool(model.get_model_object(f"diffusion_model.{layer}").weight_function)
            with torch.no_grad():
                return model.model.apply_model(x, t, c_crossattn=ctx), used
        finally:
            model.unpatch_model()
    (full, used_full), (partial, used) = run(0), run(1)
    return full, partial, used_full, used
