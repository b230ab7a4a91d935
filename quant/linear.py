"""``QuantLinear``: the module a clone's object patch puts in place of a linear layer.

ComfyUI swaps it in when that clone loads and out when another does; the shared model is never
modified. It speaks ComfyUI's weight protocol (``comfy/model_patcher.py``), so a LoRA loaded after
quantization reaches it:

- full load: ``patch_weight_to_device`` backs up the ``QuantWeight``, dequantizes it
  (``convert_weight``), adds the patches and calls ``set_weight``, which packs the result in the same
  format with stochastic rounding seeded by the key (ComfyUI's choice for its own fp8 weights);
  unpatching restores the backup, scales and all. A weight handed back unchanged (0.33's dynamic
  loader does that on small unpatched layers) keeps its packed form: repacking is not lossless.
- streamed (low VRAM, 0.33's dynamic-VRAM loader): the loader hangs the LoRA on the layer as
  functions (``compat.loader_functions``); ``forward`` dequantizes, applies them and repacks (0.3.75's
  patch does that itself, ``compat.lowvram_patch_converts``), so the result equals the full load's.
  The patched weight is kept while the loader hands over the same functions: one repack per load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import compat
from .lowrank import absorb_patch
from .qweight import QuantWeight


class QuantLinear(torch.nn.Module):
    comfy_cast_weights = False
    baked_patches = None  # weight patches (a LoRA) merged in when this layer was quantized
    _streamed = None  # (functions, source weight, patched weight): the last streamed patch, kept

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.weight_function = []
        self.bias_function = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        bias = self.bias
        if bias is not None:
            bias = bias.to(device=x.device, dtype=x.dtype)
            for f in compat.loader_functions(self, "bias"):
                bias = f(bias)
        if weight.device != x.device:
            weight = weight.retarget(device=x.device)
        functions = compat.loader_functions(self, "weight")
        if functions:
            weight = self._patched(weight, functions)
        else:
            self._streamed = None
        if isinstance(weight, QuantWeight):
            return weight.linear(x, bias)
        return F.linear(x, weight.to(x.dtype), bias)

    def _patched(self, weight, functions):
        """``weight`` (this layer's, on the input's device) with the streamed patches (a LoRA)
        applied, packed as the full load packs it. Kept, on the stored weight's device, while the
        loader hands over the same patch objects for the same stored weight."""
        source, last = self.weight, self._streamed
        if (last is not None and last[1] is source and len(last[0]) == len(functions)
                and all(a is b for a, b in zip(last[0], functions))):
            return _moved(last[2], weight.device)
        if compat.lowvram_patch_converts():
            for f in functions:
                weight = f(weight)
        else:
            weight, key = self.convert_weight(weight), None
            for f in functions:
                weight, key = f(weight), key or getattr(f, "key", None)
            weight = self.set_weight(weight, seed=None if key is None else compat.string_to_seed(key),
                                     return_weight=True)
        if _fixed_for_the_load(functions):
            self._streamed = (tuple(functions), source, _moved(weight, source.device))
        return weight

    # ComfyUI's weight protocol (get_key_weight looks these up by name).
    def convert_weight(self, weight, inplace=False, **kwargs):
        return weight.dequantize(torch.float32) if isinstance(weight, QuantWeight) else weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        new = packed_like(self.weight, weight, seed)
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


def _fixed_for_the_load(functions) -> bool:
    """True where every function is ComfyUI's ``LowVramPatch`` (fixed patches for one load;
    the loaders make new ones at each load). Weight wrappers, such as the adapters the training
    node fits, change between calls."""
    from comfy.model_patcher import LowVramPatch
    return all(isinstance(f, LowVramPatch) for f in functions)


def _moved(weight: torch.Tensor, device) -> torch.Tensor:
    return weight.retarget(device=device) if isinstance(weight, QuantWeight) else weight.to(device)


def packed_like(template: QuantWeight, weight: torch.Tensor, seed: int | None = None) -> QuantWeight:
    """``weight`` (a float tensor: ``template``'s weight plus patches) packed the way ``template``
    is, on ``weight``'s device: ``template`` itself when nothing was added, the patch's factors
    joining the low-rank branch where there is one, else requantized with stochastic rounding."""
    if isinstance(weight, QuantWeight):
        return weight
    current = template.retarget(device=weight.device)
    if torch.equal(weight, current.dequantize(weight.dtype)):
        return current
    if template.branch is not None:
        # a LoRA on a layer with a low-rank branch: its factors join the branch, no requantization
        return absorb_patch(current, weight, seed=seed)
    return current.requantize(weight, seed=seed)
