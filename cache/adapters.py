"""Per-family facts the cache's block hooks need, and nothing more.

For each diffusion-transformer family whose ComfyUI forward consults
``transformer_options["patches_replace"]["dit"]``, a :class:`BlockAdapter` says which block
lists the forward runs in which order (the hook keys); how the stream the *last* block returns
holds the image tokens (Flux and AuraFlow concatenate ``(txt, img)`` for their single blocks,
HunyuanVideo ``(img, txt)``); and how to compute TeaCache's signal from what the first block
replacement receives: block 0's modulated image input, from that block's own modulation and
norm submodules (its first two lines, never a copy of the model's forward), or the
modulation/time vector itself. SD1.x/SDXL UNets have no such hook: :class:`UNetAdapter`
caches their deep blocks DeepCache-style through object patches.

Families are matched by class (``module.Class`` anywhere in the diffusion model's MRO), so
subclasses (Wan VACE, Camera, S2V, HuMo, Animate; Chroma Radiance) are covered. ComfyUI is
imported lazily, inside the functions that use it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

# The modulated input can be as large as the hidden state (video: 10^5 tokens); its mean
# change is estimated from at most this many tokens, taken at a fixed stride.
SIGNAL_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class BlockAdapter:
    family: str
    classes: tuple[str, ...]                      # "module.Class" names matched against the MRO
    block_lists: tuple[tuple[str, str], ...]      # (patch kind, attribute path) in call order
    last_layout: dict = dataclasses.field(default_factory=dict)   # kind -> "txt_first" | "img_first"
    modulated: Callable | None = None             # (first block, args) -> tensor [N, ...]
    skip_lists: dict = dataclasses.field(default_factory=dict)    # kind -> attribute listing skipped indices

    def matches(self, diffusion_model) -> bool:
        return any(name in self.classes for name in class_names(diffusion_model))

    def keys(self, diffusion_model) -> list[tuple[str, int]]:
        """The block-replacement keys in the order the forward calls them."""
        keys = []
        for kind, path in self.block_lists:
            blocks = get_path(diffusion_model, path)
            skipped = set(getattr(diffusion_model, self.skip_lists[kind], ()) or ()) if kind in self.skip_lists else set()
            keys += [(kind, i) for i in range(len(blocks)) if i not in skipped]
        return keys

    def block(self, diffusion_model, key: tuple[str, int]):
        kind, index = key
        path = dict(self.block_lists)[kind]
        return get_path(diffusion_model, path)[index]

    def signals(self) -> tuple[str, ...]:
        return ("modulated", "vec") if self.modulated else ("vec",)

    def signal(self, kind: str, first_block, args: dict) -> torch.Tensor:
        """TeaCache's signal for the whole call, batch first: ``[N, ...]``."""
        if kind == "modulated":
            if self.modulated is None:
                raise ValueError(f"no modulated-input signal for {self.family}")
            return subsample_tokens(self.modulated(first_block, args))
        return vec_signal(args["vec"])

    def image_start(self, key: tuple[str, int], args: dict) -> int | None:
        """Where the image tokens start in the stream block ``key`` gets, when the model says so.

        Newer hosts put ``img_slice`` ([first image token, end]) in the transformer options of a
        joint stream; it wins over the static layout (HunyuanVideo put its image first up to
        ComfyUI 0.3.75 and its text first since). None: use the static layout."""
        if key[0] not in self.last_layout:
            return None
        img_slice = (args.get("transformer_options") or {}).get("img_slice")
        return int(img_slice[0]) if img_slice else None

    def image_part(self, key: tuple[str, int], stream: torch.Tensor, img_tokens: int,
                   start: int | None = None) -> torch.Tensor:
        """The image tokens of what block ``key`` returned under ``"img"``."""
        layout = self.last_layout.get(key[0])
        if layout is None:
            return stream
        if start is None:
            start = stream.shape[1] - img_tokens if layout == "txt_first" else 0
        return stream[:, start:start + img_tokens]

    def with_image(self, key: tuple[str, int], stream: torch.Tensor, img: torch.Tensor,
                   start: int | None = None) -> torch.Tensor:
        """``stream`` with its image tokens replaced by ``img`` (same layout as ``image_part``)."""
        layout = self.last_layout.get(key[0])
        if layout is None:
            return img
        if start is None:
            start = stream.shape[1] - img.shape[1] if layout == "txt_first" else 0
        return torch.cat([stream[:, :start], img.to(stream.dtype), stream[:, start + img.shape[1]:]], dim=1)


def class_names(obj) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__]


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def vec_signal(vec) -> torch.Tensor:
    """The modulation vector(s) the first block receives, flattened per batch element."""
    if isinstance(vec, torch.Tensor):
        return vec.reshape(vec.shape[0], -1)
    parts = [t for t in _flatten(vec) if isinstance(t, torch.Tensor)]
    return torch.cat([p.reshape(p.shape[0], -1).float() for p in parts], dim=1)


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield from _flatten(getattr(obj, field.name))
    else:
        yield obj


def subsample_tokens(x: torch.Tensor) -> torch.Tensor:
    if x.ndim >= 3 and x.shape[1] > SIGNAL_TOKENS:
        return x[:, ::math.ceil(x.shape[1] / SIGNAL_TOKENS)]
    return x


# --- modulated input of block 0, per family -----------------------------------------------

def _flux_double(block, args):
    # DoubleStreamBlock: img_norm1(img) * (1 + scale) + shift, from img_mod(vec) or, when the
    # model modulates globally (Flux 2, Chroma), from the precomputed ((img_mod1, _), _) vec.
    from comfy.ldm.flux.layers import apply_mod
    vec = args["vec"]
    mod = block.img_mod(vec)[0] if getattr(block, "modulation", True) else vec[0][0]
    return apply_mod(block.img_norm1(args["img"]), 1 + mod.scale, mod.shift, args.get("modulation_dims_img"))


def _wan(block, args):
    from comfy.ldm.wan.model import repeat_e
    import comfy.model_management
    x, e0 = args["img"], args["vec"]
    mod = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    e = (mod + e0).chunk(6, dim=1) if e0.ndim < 4 else (mod.unsqueeze(0) + e0).unbind(2)
    return torch.addcmul(repeat_e(e[0], x), block.norm1(x), 1 + repeat_e(e[1], x))


def _ltxv(block, args):
    from comfy.ldm.common_dit import rms_norm
    x, timestep = args["img"], args["vec"]
    table = block.scale_shift_table
    mods = table[None, None].to(device=x.device, dtype=x.dtype) + timestep.reshape(
        x.shape[0], timestep.shape[1], table.shape[0], -1)
    shift_msa, scale_msa = mods[:, :, 0], mods[:, :, 1]
    normed = rms_norm(x)
    return normed * (1 + scale_msa) + shift_msa


def _sd3(block, args):
    from comfy.ldm.modules.diffusionmodules.mmdit import modulate
    xb, x, c = block.x_block, args["img"], args["vec"]
    mods = xb.adaLN_modulation(c)
    if xb.scale_mod_only:
        shift, scale = None, mods.chunk(mods.shape[1] // x.shape[-1], dim=1)[0]
    else:
        shift, scale = mods.chunk(mods.shape[1] // x.shape[-1], dim=1)[:2]
    return modulate(xb.norm1(x), shift, scale)


def _qwen_image(block, args):
    x, vec = args["img"], args["vec"]
    img_mod1 = block.img_mod(vec).chunk(2, dim=-1)[0]
    if vec.shape[0] == x.shape[0]:
        return block._modulate(block.img_norm1(x), img_mod1)[0]
    # An edit model's zero-timestep reference (0.33+, ref_latents_method "index_timestep_zero")
    # stacks the references' timestep after the image's, and the block modulates the reference
    # tokens (after the image's) with it.
    refs = sum(args["transformer_options"].get("reference_image_num_tokens", ()))
    return block._modulate(block.img_norm1(x), img_mod1, x.shape[1] - refs)[0]


def _mochi(block, args):
    import torch.nn.functional as F
    from comfy.ldm.genmo.joint_model.asymm_models_joint import modulated_rmsnorm
    scale_msa_x = block.mod_x(F.silu(args["vec"])).chunk(4, dim=1)[0]
    return modulated_rmsnorm(args["img"], scale_msa_x)


ADAPTERS: tuple[BlockAdapter, ...] = (
    BlockAdapter("flux", ("comfy.ldm.flux.model.Flux",),
                 (("double_block", "double_blocks"), ("single_block", "single_blocks")),
                 {"single_block": "txt_first"}, _flux_double),
    BlockAdapter("chroma", ("comfy.ldm.chroma.model.Chroma",),
                 (("double_block", "double_blocks"), ("single_block", "single_blocks")),
                 {"single_block": "txt_first"}, _flux_double,
                 skip_lists={"double_block": "skip_mmdit", "single_block": "skip_dit"}),
    BlockAdapter("hunyuan_video", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",),
                 (("double_block", "double_blocks"), ("single_block", "single_blocks")),
                 {"single_block": "img_first"}, _flux_double),
    BlockAdapter("wan", ("comfy.ldm.wan.model.WanModel",), (("double_block", "blocks"),), {}, _wan),
    BlockAdapter("ltxv", ("comfy.ldm.lightricks.model.LTXVModel",),
                 (("double_block", "transformer_blocks"),), {}, _ltxv),
    BlockAdapter("sd3", ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",),
                 (("double_block", "joint_blocks"),), {}, _sd3),
    BlockAdapter("qwen_image", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
                 (("double_block", "transformer_blocks"),), {}, _qwen_image),
    BlockAdapter("mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",),
                 (("double_block", "blocks"),), {}, _mochi),
    BlockAdapter("auraflow", ("comfy.ldm.aura.mmdit.MMDiT",),
                 (("double_block", "double_layers"), ("single_block", "single_layers")),
                 {"single_block": "txt_first"}),
    BlockAdapter("hunyuan_dit", ("comfy.ldm.hydit.models.HunYuanDiT",), (("double_block", "blocks"),)),
    BlockAdapter("hunyuan3d", ("comfy.ldm.hunyuan3d.model.Hunyuan3Dv2",),
                 (("double_block", "double_blocks"), ("single_block", "single_blocks")),
                 {"single_block": "txt_first"}),
)


# Subclasses of a hooked family whose block hook the cache cannot serve, and why.
UNHOOKABLE = {
    "comfy.ldm.lightricks.av_model.LTXAVModel": "its block hook passes the video and audio streams together, "
                                                "which the block cache does not split",
}


def unhookable(diffusion_model) -> str | None:
    """Why the block cache cannot hook this model although its family has a block hook, or None."""
    for name in class_names(diffusion_model):
        if name in UNHOOKABLE:
            return UNHOOKABLE[name]
    return None


def find_adapter(diffusion_model):
    """The family's BlockAdapter, the UNet adapter (DeepCache through object patches), or None."""
    if unhookable(diffusion_model) is not None:
        return None
    for adapter in ADAPTERS + (UNetAdapter(),):
        if adapter.matches(diffusion_model):
            return adapter
    return None


def describe(diffusion_model) -> str:
    cls = type(diffusion_model)
    return f"{cls.__qualname__} ({cls.__module__})"


def auto_preset(adapter: BlockAdapter, diffusion_model) -> str | None:
    """The published coefficient set for this model, or None where none exists."""
    family = adapter.family
    if family == "flux":
        params = getattr(diffusion_model, "params", None)
        return None if getattr(params, "global_modulation", False) else "flux"   # Flux 2: none
    if family == "hunyuan_video":
        # HunyuanVideo 1.5 adds byT5 / cond-type embeddings; only 1.0 has published numbers.
        newer = getattr(diffusion_model, "byt5_in", None) is not None or \
            getattr(diffusion_model, "cond_type_embedding", None) is not None
        return None if newer else "hunyuan_video"
    if family == "ltxv":
        return "ltxv" if getattr(diffusion_model, "inner_dim", None) == 2048 else None
    if family == "mochi":
        return "mochi"
    if family == "wan":
        dim = getattr(diffusion_model, "dim", None)
        i2v = getattr(diffusion_model, "model_type", "t2v") == "i2v" or getattr(diffusion_model, "in_dim", 16) == 36
        if dim == 1536 and not i2v:
            return "wan21_t2v_1.3b"
        if dim == 5120:
            return "wan21_i2v_480p_14b" if i2v else "wan21_t2v_14b"
    return None


# --- UNets: DeepCache through object patches ------------------------------------------------
#
# The UNet's patches can only transform the feature between blocks or replace attention; none
# can skip a block. But the forward iterates each block (a ``TimestepEmbedSequential``), so the
# clone gets, by ``add_object_patch``, a container per deep block that holds the *same* child
# modules (LoRA and weight patches still apply) and picks, while iterated, what to yield: the
# first deep input block a probe that sees the shallow feature (the signal) and decides; on a
# computed call the deep blocks' layers and, after the last one, a recorder of the deep
# feature; on a reused call nothing but a replay of the cached (or forecast) deep feature, on
# which the shallow output blocks run with fresh skip features. Limits: attention patches keyed
# by the global ``transformer_index`` (GLIGEN) see other indices on reused calls; patches that
# resize the feature between deep blocks (Kohya Deep Shrink) do not combine with it.

SHALLOW_BLOCKS = 1   # input blocks always computed; DeepCache's default branch keeps only conv_in


class UNetAdapter:
    family = "unet"
    classes = ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",)

    matches = BlockAdapter.matches

    def signals(self) -> tuple[str, ...]:
        return ("shallow",)

    def layout(self, diffusion_model) -> tuple[int, int]:
        """(index of the first skipped input block, index of the output block whose result is cached)."""
        n_in, n_out = len(diffusion_model.input_blocks), len(diffusion_model.output_blocks)
        k = min(SHALLOW_BLOCKS, n_in - 1, n_out - 1)
        return k, n_out - k - 1

    def install(self, model, current_call: Callable) -> list[str]:
        """Object-patch the deep blocks of the clone ``model``; returns the patched names.
        ``current_call()`` gives the cache's model call in progress (None: run the block as is)."""
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
            model.add_object_patch(f"diffusion_model.{name}", container(role, original, current_call))
        return list(names)


_CONTAINERS: dict = {}


def _container_class(base):
    """A TimestepEmbedSequential whose iteration follows the current call's decision."""
    if base in _CONTAINERS:
        return _CONTAINERS[base]

    class CachedBlock(base):
        def __init__(self, role: str, original, current_call: Callable):
            super().__init__(*original)       # the same child modules, registered under the same names
            self.role, self.current_call = role, current_call

        def __iter__(self):
            call = self.current_call()
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
