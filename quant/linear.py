"""``QuantLinear``: the module that replaces a linear layer on a cloned model.

It is installed with ``ModelPatcher.add_object_patch("diffusion_model.<path>", module)``
on the clone, so the shared model is never modified; ComfyUI swaps it in when that clone
is loaded and back out when another clone is.

It speaks ComfyUI's weight protocol so a LoRA loaded with the stock LoraLoader after
quantization reaches it (see ``comfy/model_patcher.py``):

- full load: ``patch_weight_to_device`` backs up ``weight`` (a ``QuantWeight``), turns it
  into float32 (dequantization), adds the patches with ``comfy.lora.calculate_weight`` and
  calls ``set_weight``, which packs the result in the same format with stochastic rounding
  seeded by the key (ComfyUI's choice for its own fp8 weights). Unpatching restores the
  backed-up ``QuantWeight``, scales and all, because they are one object.
- low VRAM: ModelPatcher sets ``comfy_cast_weights`` and puts a ``LowVramPatch`` in
  ``weight_function``; ``forward`` then moves the packed weight to the input's device and
  runs those functions on it. On 0.3.75 the patch itself calls ``convert_weight``
  (dequantize) and ``set_weight`` (repack); newer hosts hand it a float weight and use what
  it returns, so there ``forward`` dequantizes before and repacks after (see ``compat``).
  Either way the result equals the full-load path's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import compat
from .qweight import QuantWeight


class QuantLinear(torch.nn.Module):
    comfy_cast_weights = False
    baked_patches = None  # weight patches (a LoRA) merged in when this layer was quantized

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.weight_function = []
        self.bias_function = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device != x.device:
            weight = weight.retarget(device=x.device)
        bias = self.bias
        if bias is not None:
            bias = bias.to(device=x.device, dtype=x.dtype)
            for f in self.bias_function:
                bias = f(bias)
        if self.weight_function:
            weight = self._patched(weight)
        if isinstance(weight, QuantWeight):
            return weight.linear(x, bias)
        return F.linear(x, weight.to(x.dtype), bias)

    def _patched(self, weight):
        """The weight with the low-VRAM patches (a LoRA) applied, packed as the full load packs it."""
        if compat.lowvram_patch_converts():
            for f in self.weight_function:
                weight = f(weight)
            return weight
        weight, key = self.convert_weight(weight), None
        for f in self.weight_function:
            weight, key = f(weight), key or getattr(f, "key", None)
        seed = None if key is None else compat.string_to_seed(key)
        return self.set_weight(weight, seed=seed, return_weight=True)

    # ComfyUI's weight protocol (get_key_weight looks these up by name).
    def convert_weight(self, weight, inplace=False, **kwargs):
        return weight.dequantize(torch.float32) if isinstance(weight, QuantWeight) else weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        if self.weight.branch is not None:
            # a LoRA on a layer with a low-rank branch: its factors join the branch, no requantization
            from .lowrank import absorb_patch
            new = absorb_patch(self.weight, weight, seed=seed)
        else:
            new = self.weight.requantize(weight, seed=seed)
        if return_weight:
            return new
        self.weight = torch.nn.Parameter(new, requires_grad=False)

    def _apply(self, fn, recurse=True):
        # Move or retype without dequantizing: ask ``fn`` what it does to a float tensor.
        weight = self.weight
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        dtype = probe.dtype if probe.dtype.is_floating_point else None
        self.weight = torch.nn.Parameter(weight.retarget(device=probe.device, dtype=dtype), requires_grad=False)
        if self.bias is not None:
            self.bias = torch.nn.Parameter(fn(self.bias), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={w.spec.format}, bits={w.bits_per_weight():.2f}")
