"""Where the latent grid sits in each model family's attention sequence.

One place for the per-family facts the sparse policies need: the grid of video/image
tokens (frames, height, width, in tokens after patching), the number of tokens in front of
it in the self-attention sequence (Flux puts its text stream first; Wan and HunyuanVideo
may put a reference image first), and how many self-attention layers one forward runs.
Every token outside the grid (text, references, registers) attends and is attended densely.

Facts come from the latent the model is called with (``x``), its text context and extra
inputs, and the diffusion model object, read in an APPLY_MODEL wrapper; no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenGrid:
    frames: int
    height: int
    width: int
    # Tokens in front of the grid in the self-attention sequence; None: unknown, assume the
    # tokens that are not grid tokens all come first (text-first joint attention).
    offset: int | None = 0

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def placed(self, seq_len: int) -> "TokenGrid | None":
        """This grid with a known offset inside a sequence of ``seq_len`` tokens, or None when
        the sequence does not carry the grid (text encoders, token refiners, lower UNet levels)."""
        if self.tokens < 1 or seq_len < self.tokens:
            return None
        offset = seq_len - self.tokens if self.offset is None else self.offset
        if offset + self.tokens > seq_len:
            return None
        return TokenGrid(self.frames, self.height, self.width, offset)


@dataclass(frozen=True)
class ModelFacts:
    family: str
    grid: TokenGrid
    layers: int | None  # self-attention layers per forward over the grid; None: count them


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _spatial(shape, patch) -> tuple[int, int, int]:
    """(frames, height, width) in tokens of a latent [B, C, (T,) H, W] cut into ``patch``."""
    dims = ([1, 1, 1] + list(shape[2:]))[-3:]
    patch = ([1, 1, 1] + list(patch))[-3:]
    return tuple(_ceil_div(d, p) for d, p in zip(dims, patch))


def _patch_of(model, default=(1, 1, 1)) -> tuple[int, ...]:
    patch = getattr(model, "patch_size", None)
    if patch is None:
        return default
    if isinstance(patch, int):
        return (1, patch, patch)
    return tuple(int(p) for p in patch)


def _class_names(model) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def _count(model, *names) -> int | None:
    total = 0
    for name in names:
        blocks = getattr(model, name, None)
        if blocks is not None:
            total += len(blocks)
    return total or None


def model_facts(diffusion_model, x_shape, context_shape=None, extra: dict | None = None) -> ModelFacts:
    """The grid and layer count of one forward of ``diffusion_model`` on a latent of ``x_shape``."""
    extra = extra or {}
    names = _class_names(diffusion_model)
    if "WanModel" in names:
        patch = _patch_of(diffusion_model)
        frames, height, width = _spatial(x_shape, patch)
        concat = extra.get("time_dim_concat")
        if concat is not None:
            frames += _ceil_div(concat.shape[2], patch[0])
        offset = 0
        ref = extra.get("reference_latent")
        if ref is not None and getattr(diffusion_model, "ref_conv", None) is not None:
            offset = _ceil_div(ref.shape[-2], patch[1]) * _ceil_div(ref.shape[-1], patch[2])
        return ModelFacts("wan", TokenGrid(frames, height, width, offset),
                          _count(diffusion_model, "blocks", "vace_blocks"))
    if "HunyuanVideo" in names:
        patch = _patch_of(diffusion_model)
        frames, height, width = _spatial(x_shape, patch)
        ref = extra.get("ref_latent")
        offset = 0 if ref is None else math.prod(_spatial(ref.shape, patch))
        return ModelFacts("hunyuan_video", TokenGrid(frames, height, width, offset),
                          _count(diffusion_model, "double_blocks", "single_blocks"))
    if "LTXVModel" in names:
        frames, height, width = _spatial(x_shape, (1, 1, 1))
        return ModelFacts("ltxv", TokenGrid(frames, height, width, 0),
                          _count(diffusion_model, "transformer_blocks"))
    if "Flux" in names or "Chroma" in names:
        patch = _patch_of(diffusion_model, (1, 2, 2))
        frames, height, width = _spatial(x_shape, patch)
        text = 0 if context_shape is None else int(context_shape[1])
        return ModelFacts("flux", TokenGrid(frames, height, width, text),
                          _count(diffusion_model, "double_blocks", "single_blocks"))
    frames, height, width = _spatial(x_shape, _patch_of(diffusion_model))
    return ModelFacts(type(diffusion_model).__name__, TokenGrid(frames, height, width, None), None)
