"""DeepCache-style caching for SD1.x / SDXL UNets, through object patches on the clone.

What the ComfyUI 0.3.75 UNet (``openaimodel.UNetModel``) allows: its ``transformer_options``
patches (``input_block_patch``, ``output_block_patch``, ``middle_block_patch``...) can only
*transform* the feature between blocks, and ``patches_replace`` only replaces attention; none
can skip a block's computation. What it does have: every block is a
``TimestepEmbedSequential`` that the forward runs by iterating over it
(``forward_timestep_embed`` does ``for layer in block``). So the clone gets, by
``add_object_patch``, a replacement container for each deep block that holds the *same* child
modules (same parameter objects and state-dict keys, so LoRA and weight patches still apply)
and decides, while being iterated, what to yield:

- ``input_blocks[k]`` (k = ``SHALLOW_BLOCKS``) first yields a probe that sees the shallow
  feature (the signal: TeaCache accumulates its relative change) and takes the decision;
- on a computed call every deep block yields its layers, and ``output_blocks[n - k - 1]``
  finally yields a recorder that stores the deep feature it produced;
- on a reused call the deep blocks yield nothing (the feature passes through unchanged) and
  ``output_blocks[n - k - 1]`` yields a replay layer that returns the cached (TaylorSeer:
  forecast) deep feature; the shallow output blocks then run on it with fresh skip features.

Known limits: attention patches keyed by the global ``transformer_index`` (GLIGEN) see other
indices on reused calls, and patches that resize the feature between deep blocks (Kohya Deep
Shrink) do not combine with it.
"""
from __future__ import annotations

import torch

SHALLOW_BLOCKS = 1   # input blocks always computed; DeepCache's default branch keeps only conv_in


class UNetAdapter:
    family = "unet"
    classes = ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",)

    def matches(self, diffusion_model) -> bool:
        from .adapters import class_names
        return any(name in self.classes for name in class_names(diffusion_model))

    def signals(self) -> tuple[str, ...]:
        return ("shallow",)

    def layout(self, diffusion_model) -> tuple[int, int]:
        """(index of the first skipped input block, index of the output block whose result is cached)."""
        n_in, n_out = len(diffusion_model.input_blocks), len(diffusion_model.output_blocks)
        k = min(SHALLOW_BLOCKS, n_in - 1, n_out - 1)
        return k, n_out - k - 1

    def install(self, model) -> list[str]:
        """Object-patch the deep blocks of the clone ``model``; returns the patched names."""
        from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
        dm = model.get_model_object("diffusion_model")
        first, cached = self.layout(dm)
        names = {f"input_blocks.{i}": ("decide" if i == first else "skip") for i in range(first, len(dm.input_blocks))}
        if dm.middle_block is not None:
            names["middle_block"] = "skip"
        names.update({f"output_blocks.{j}": ("cache" if j == cached else "skip") for j in range(cached + 1)})
        container = _container_class(TimestepEmbedSequential)
        for name, role in names.items():
            original = model.get_model_object(f"diffusion_model.{name}")
            model.add_object_patch(f"diffusion_model.{name}", container(role, original))
        return list(names)


_CONTAINERS: dict = {}


def _container_class(base):
    """A TimestepEmbedSequential whose iteration follows the current call's decision."""
    if base in _CONTAINERS:
        return _CONTAINERS[base]

    class CachedBlock(base):
        def __init__(self, role: str, original):
            super().__init__(*original)       # the same child modules, registered under the same names
            self.role = role

        def __iter__(self):
            from .engine import active_call
            call = active_call()
            if call is None:
                yield from super().__iter__()
                return
            if self.role == "decide":
                yield _Probe(call)
            if not call.computing:
                if self.role == "cache":
                    yield _Replay(call)
                return
            yield from super().__iter__()
            if self.role == "cache":
                yield _Record(call)

    _CONTAINERS[base] = CachedBlock
    return CachedBlock


def is_cached_block(obj) -> bool:
    return any(isinstance(obj, cls) for cls in _CONTAINERS.values())


class _Probe(torch.nn.Module):
    def __init__(self, call):
        super().__init__()
        self.call = call

    def forward(self, h):
        self.call.run.unet_decide(self.call, h)
        return h


class _Record(_Probe):
    def forward(self, h):
        self.call.run.unet_record(self.call, h)
        return h


class _Replay(_Probe):
    def forward(self, h):
        return self.call.run.unet_replay(self.call, h)
