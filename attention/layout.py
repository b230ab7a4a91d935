"""Where the latent grid sits in each model family's attention sequence.

One place for the per-family facts the sparse policies need: the grid of video/image tokens
(frames, height, width, in tokens after patching), the tokens in front of it in the
self-attention sequence, and how many self-attention layers one forward runs. Every token
outside the grid (text, references, registers) attends and is attended densely.

Families are matched by class name anywhere in the MRO (so subclasses such as Wan VACE share
their parent's layout), each with one rule: ``grid_first`` (the grid starts the sequence;
anything after it is a dense tail; ``exact`` rules accept only sequences of exactly the grid,
since LTX-2's audio stream and a UNet's other levels are other sequences), ``text_first`` (the
conditioning's text tokens, then the grid, then any references), ``grid_last`` (the grid ends
the sequence, after a prefix whose length the model computes) or ``unet`` (each level attends
over the latent grid at its own resolution). The layouts were read from ComfyUI's model code
and are checked family by family against the model itself (tests/integration/
test_family_matrix.py moves one latent pixel and finds the attention row that moves).
Families the sparse path cannot serve have a reason instead (:func:`unsupported`).
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
    exact: bool = False   # only a sequence of exactly the grid's tokens carries it

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def placed(self, seq_len: int) -> "TokenGrid | None":
        """This grid with a known offset inside a sequence of ``seq_len`` tokens, or None when
        the sequence does not carry the grid (text encoders, token refiners, lower UNet levels)."""
        if self.tokens < 1 or seq_len < self.tokens or (self.exact and seq_len != self.tokens):
            return None
        offset = seq_len - self.tokens if self.offset is None else self.offset
        if offset + self.tokens > seq_len:
            return None
        return TokenGrid(self.frames, self.height, self.width, offset, self.exact)


@dataclass(frozen=True)
class ModelFacts:
    family: str
    grid: TokenGrid
    layers: int | None  # self-attention layers per forward over the grid; None: count them
    levels: int = 1     # UNets: the grid is also attended at 1/2, 1/4... of its size

    def place(self, seq_len: int) -> TokenGrid | None:
        """The grid a self-attention sequence of ``seq_len`` tokens carries, placed, or None."""
        g = self.grid
        for level in range(self.levels):
            scale = 2 ** level
            grid = g if level == 0 else TokenGrid(g.frames, _ceil_div(g.height, scale), _ceil_div(g.width, scale),
                                                  g.offset, g.exact)
            placed = grid.placed(seq_len)
            if placed is not None:
                return placed
        return None


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
        patch = getattr(getattr(model, "params", None), "patch_size", None)
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


@dataclass(frozen=True)
class Rule:
    family: str
    kind: str                          # grid_first | text_first | grid_last | unet
    blocks: tuple[str, ...] = ()       # block lists whose layers attend over the grid
    patch: tuple[int, ...] | None = None   # token size in latent pixels when the model has no patch_size
    exact: bool = False


# Class name (anywhere in the MRO) -> layout rule. Order matters where classes nest.
RULES: dict[str, Rule] = {
    "WanModel": Rule("wan", "grid_first", ("blocks", "vace_blocks")),
    "LTXAVModel": Rule("ltxav", "grid_first", ("transformer_blocks",), (1, 1, 1), exact=True),
    "LTXVModel": Rule("ltxv", "grid_first", ("transformer_blocks",), (1, 1, 1)),
    "Kandinsky5": Rule("kandinsky5", "grid_first", ("visual_transformer_blocks",)),
    "GeneralDIT": Rule("cosmos", "grid_first", (), (1, 2, 2)),
    "MiniTrainDIT": Rule("cosmos_predict2", "grid_first", ("blocks",), (1, 2, 2)),
    "AsymmDiTJoint": Rule("mochi", "grid_first", ("blocks",)),
    "JoyImageTransformer3DModel": Rule("joyimage", "grid_first", ("double_blocks",)),
    "HiDreamImageTransformer2DModel": Rule("hidream", "grid_first", ("double_stream_blocks", "single_stream_blocks")),
    "HunyuanVideo": Rule("hunyuan_video", "grid_last", ("double_blocks", "single_blocks")),
    "Flux": Rule("flux", "text_first", ("double_blocks", "single_blocks")),
    "Chroma": Rule("chroma", "text_first", ("double_blocks", "single_blocks")),
    "QwenImageTransformer2DModel": Rule("qwen_image", "text_first", ("transformer_blocks",)),
    "MageFlowTransformer2DModel": Rule("mage_flow", "text_first", ("transformer_blocks",)),
    "OpenAISignatureMMDITWrapper": Rule("sd3", "text_first", ("joint_blocks",)),
    "CogVideoXTransformer3DModel": Rule("cogvideox", "text_first", ("transformer_blocks",)),
    # Ideogram 4 unpacks Flux 2's 2x2-packed latent and patches it by 2 again: one token per latent pixel.
    "Ideogram4Transformer2DModel": Rule("ideogram4", "text_first", ("layers",), (1, 1, 1)),
    "SingleStreamDiT": Rule("krea2", "text_first", ("blocks",), (1, 2, 2)),
    "MMDiT": Rule("auraflow", "grid_last", ("double_layers", "single_layers")),
    "NextDiT": Rule("lumina2", "grid_last"),
    "OmniGen2Transformer2DModel": Rule("omnigen2", "grid_last"),
    "BooguTransformer2DModel": Rule("boogu", "grid_last"),
    "PixDiT_T2I": Rule("pixeldit", "grid_last"),
    "MiniMaxH3Model": Rule("minimax_h3", "grid_last", ("blocks",)),
    "UNetModel": Rule("unet", "unet", exact=True),
}

_AUDIO = "an audio model: Sparse Attention's policies are written for image and video token grids"
_SHAPE = "a 3-D shape model: its latent tokens are a set of points or voxels, not an image or video grid"
_NO_OVERRIDE = ("its attention does not go through ComfyUI's attention override (optimized_attention_override), "
                "so there is nothing to patch")
_JOINT_KEYS = ("its attention attends to the image tokens and the conditioning in one sequence of keys, which the "
               "block-sparse path does not cover")
UNSUPPORTED: dict[str, str] = {
    "AudioDiffusionTransformer": _AUDIO,
    "ACEStepTransformer2DModel": _AUDIO,
    "AceStepConditionGenerationModel": _AUDIO,
    "MiniMaxMusic3DiT": _AUDIO,
    "Hunyuan3Dv2": _SHAPE,
    "HunYuanDiTPlain": _SHAPE,
    "Trellis2": _SHAPE,
    "LatentSeqMMFlowModel": _SHAPE,
    "PixArtMS": _NO_OVERRIDE,
    "HunYuanDiT": _NO_OVERRIDE,
    "ErnieImageModel": _NO_OVERRIDE,
    "NaDiT": _NO_OVERRIDE,
    "StageC": _JOINT_KEYS,
    "StageB": _JOINT_KEYS,
    "LensTransformer2DModel": "its attention always carries a text mask, and masked attention stays dense",
    "HiDreamO1Transformer": "its attention is a two-pass prefix attention (queries and keys of different lengths), "
                            "which the block-sparse path does not cover",
}


def rule_of(diffusion_model) -> Rule | None:
    names = _class_names(diffusion_model)
    for name, rule in RULES.items():
        if name in names:
            return rule
    return None


def unsupported(diffusion_model) -> str | None:
    """Why Sparse Attention cannot patch this model, or None when it can."""
    names = _class_names(diffusion_model)
    for name, reason in UNSUPPORTED.items():
        if name in names:
            return reason
    if rule_of(diffusion_model) is None:
        return "no token layout is known for this model class"
    if "WanModel_S2V" in names:
        from ..compat import blocks_get_transformer_options
        if not blocks_get_transformer_options(type(diffusion_model)):
            return "this ComfyUI calls its blocks without the transformer options, so its attention never " \
                   "reaches the attention override (newer ComfyUI does)"
    return None


def _image_first(diffusion_model) -> bool:
    """HunyuanVideo up to ComfyUI 0.3.75 put its image tokens before the text (its blocks carry
    ``flipped_img_txt``); newer hosts put the text first."""
    blocks = getattr(diffusion_model, "double_blocks", None) or ()
    return bool(blocks) and bool(getattr(blocks[0], "flipped_img_txt", False))


def model_facts(diffusion_model, x_shape, context_shape=None, extra: dict | None = None) -> ModelFacts:
    """The grid and layer count of one forward of ``diffusion_model`` on a latent of ``x_shape``."""
    extra = extra or {}
    shapes = extra.get("latent_shapes")
    if shapes:   # audio-video models: the sampler packs the streams; the first is the video
        x_shape = tuple(shapes[0])
    rule = rule_of(diffusion_model)
    if rule is None:   # no known layout: the latent grid, text assumed in front
        frames, height, width = _spatial(x_shape, _patch_of(diffusion_model))
        return ModelFacts(type(diffusion_model).__name__, TokenGrid(frames, height, width, None), None)
    patch = rule.patch or _patch_of(diffusion_model)
    frames, height, width = _spatial(x_shape, patch)
    layers = _count(diffusion_model, *rule.blocks) if rule.blocks else None
    offset: int | None = 0
    if rule.family == "wan":
        concat = extra.get("time_dim_concat")
        if concat is not None:
            frames += _ceil_div(concat.shape[2], patch[0])
        ref = extra.get("reference_latent")
        if ref is not None and getattr(diffusion_model, "ref_conv", None) is not None:
            offset = _ceil_div(ref.shape[-2], patch[1]) * _ceil_div(ref.shape[-1], patch[2])
    elif rule.family == "hunyuan_video" and _image_first(diffusion_model):
        ref = extra.get("ref_latent")
        offset = 0 if ref is None else math.prod(_spatial(ref.shape, patch))
    elif rule.kind == "text_first":
        offset = None if context_shape is None else int(context_shape[1])
    elif rule.kind == "grid_last":
        offset = None
    if rule.kind == "unet":
        levels = len(getattr(diffusion_model, "channel_mult", ()) or ()) or 1
        return ModelFacts(rule.family, TokenGrid(frames, height, width, 0, True), None, levels)
    return ModelFacts(rule.family, TokenGrid(frames, height, width, offset, rule.exact), layers)
