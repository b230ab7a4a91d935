"""Small deterministic random-weight models of real ComfyUI architectures.

Tests and benchmarks need real ComfyUI model classes (real ``ModelPatcher``, real
blocks, real samplers) without downloading gigabytes. Each family here is built from
ComfyUI's own ``comfy.supported_models`` / ``comfy.model_base`` classes with a small
configuration, filled with seeded random weights (same seed, same bytes), and either
written as a ``.safetensors`` file that ComfyUI's stock detection and ``UNETLoader``
accept, or, where detection fixes the width, built in-process only.

Families (``FAMILIES``), each in a "tiny" (tests) and a "medium" (benchmarks) size; wan21
and flux also have a "wide" bench-only size, wan21 a "full" one (``BENCH_SIZES``, see there):

=============  ==========  ============================================================
family         how         what makes the small one possible
=============  ==========  ============================================================
wan21          file        Wan 2.1 t2v: detection reads dim from ``head.modulation`` and
                           sets ``num_heads = dim // 128``; layers and ffn are counted.
wan22_5b       file        Wan 2.2 TI2V 5B: same detection with ``out_dim = 48``
                           (48-channel Wan 2.2 latent, 16x spatial). Its stock empty-latent
                           node (Wan22ImageToVideoLatent) requires a VAE, hence
                           AccelTestEmptyLatent.
hunyuan_video  file        hidden size from ``img_in``, ``num_heads = hidden // 128``.
ltxv           file        LTX-Video: detection takes ``attention_head_dim = inner // 32``
                           (32 heads) but then applies the ``config`` JSON in the
                           safetensors metadata (real LTXV files carry one), which we use
                           to get heads of 64.
sd3            file        MMDiT: ``hidden = 64 * depth``, ``heads = depth``; depth 3/6.
sd15           file        SD1.x UNet: the SD15 config requires ``model_channels = 320``
                           and ``context_dim = 768``, but the number of levels, res blocks
                           and transformer depths are free: one level, one res block.
                           Still ~26M parameters because of the 320 width.
flux           in-process  detection fixes 24 heads and ``axes_dim`` [16, 56, 56], so a
                           file must be 3072 wide (~230M parameters with even one double
                           and one single block). Built from ``supported_models.Flux``
                           (Flux dev, guidance embed) with 2/3 heads of 128.
sdxl           in-process  every SDXL-class config (SDXL, SSD-1B, Segmind Vega, KOALA) fixes
                           ``model_channels = 320``, ``context_dim = 2048``,
                           ``adm_in_channels = 2816`` and the exact ``transformer_depth``
                           list; the smallest file detection accepts (Vega's
                           [0, 0, 1, 1, 2, 2] on one level) has 86M parameters. Built from
                           ``supported_models.SDXL`` with 64/128 channels on two levels.
lumina2        in-process  detection sets heads only for dim 2304 (Lumina 2) or 3840
                           (Z-Image); any other dim gets NextDiT's defaults (32 heads,
                           128-d rope) and so must be 4096 wide. Built in-process with
                           heads of 96 and grouped KV heads like the real one.
=============  ==========  ============================================================

Not included, and why (ComfyUI 0.3.75 detection):

- Wan 2.2 A14B (two experts): it is two files of the Wan 2.1 14B architecture (high-noise
  and low-noise expert, both detected as ``WAN21_T2V``); use two ``wan21`` fixtures with
  different seeds (``write_fixture("wan21", size, dir, seed=1)`` gets its own file name).
- Flux 2, Chroma, PixArt, HiDream, Mochi, Cosmos, Omnigen2, Qwen-Image, AuraFlow, Z-Image:
  detection fixes the width (Flux 2: 48 heads of 128; PixArt: 1152; Z-Image: 3840;
  Qwen-Image, AuraFlow: only layer counts are read, widths are the class defaults; the
  others set every dimension). ``lab.families`` builds these, and every other family
  of ComfyUI 0.33's supported_models, in-process.

Weights: every >=2-D weight is N(0, 1/fan_in) (so each linear keeps unit variance),
biases N(0, 0.02), norm scales 1 + N(0, 0.05), Wan ``modulation`` and LTXV
``scale_shift_table`` N(0, 1/dim) as in their reference inits, SD3 ``pos_embed`` the
real 2-D sin-cos table. Nothing is zero-initialised (real DiTs zero their final and
gate layers; random outputs are needed here for fidelity tests). Each tensor has its own
generator seeded from (seed, key), so the bytes depend only on the family, size, seed
and ``outliers`` flag.

``outliers=True`` plants activation outliers the way they arise in real models: in each
feed-forward pair (up projection -> activation -> down projection) a few hidden channels
(about 1 in 256, at least 2) get their up-projection rows scaled by k and, for GELU MLPs,
a positive bias so the channel is large on every token; the down projection's matching
columns are divided by k, so the block's output barely changes but the down projection's
input has a few channels 10-100x the median (the case SmoothQuant/SVDQuant address).
For GEGLU/SwiGLU MLPs the value half is scaled instead (exactly function-preserving).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# Bump when the weights a spec produces change, so stale files on disk get rewritten.
FIXTURE_VERSION = 1
SIZES = ("tiny", "medium")
# Bench-only sizes, on some families. "wide": real DiT widths (Wan 2.1 1.3B's dim 1536 and
# ffn 8960; Flux at half its 3072) with only 1-3 blocks, so the linear layers take most of
# the time and bytes as they do in the real models (at "medium"'s dim 384-512 the model's
# elementwise ops and attention take as long as its matmuls, which caps any matmul speedup).
# About 120M (wan21) and 170M (flux) parameters: ~0.5-0.7 GB in fp32. "full" (wan21 only): Wan 2.1
# 1.3B's own configuration, all 30 blocks (1.4B parameters, 5.7 GB in fp32), for the share of the
# weights that quantization keeps in 16 bits at real depth (a 2-block model exaggerates it).
BENCH_SIZES = ("wide", "full")


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    unet_config: dict            # the config ComfyUI builds the model from (== what detection yields)
    width: int                   # typical pixel resolution for this size
    height: int
    length: int                  # pixel frames for video families, 1 for image families
    context_tokens: int          # text tokens in the fixture conditioning


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str
    model_config: str            # class in comfy.supported_models used to build it
    model_class: str             # comfy.model_base class the model ends up as
    loadable: bool               # True: a file the stock UNETLoader accepts; False: in-process only
    latent_format: str           # class in comfy.latent_formats
    latent_channels: int
    spatial_down: int            # pixels per latent pixel
    temporal_down: int | None    # None for image models; latent frames = (length - 1) // t + 1
    empty_latent: str            # node that makes the empty latent for this family
    context_dim: int             # text-encoder hidden size the model expects
    pooled_dim: int | None       # pooled_output width, when the model takes one
    guidance: float | None       # "guidance" in the conditioning (distilled-guidance models)
    text_encoder: str            # what the context stands in for (documentation)
    sizes: dict[str, SizeSpec]
    # (regex on the up-projection weight key, template of the down-projection key, kind)
    ffn_pairs: tuple[tuple[str, str, str], ...] = ()
    metadata: Callable[[dict], dict] | None = None   # safetensors metadata detection reads
    attention_mask: bool = False # the text encoder returns a token mask the model requires

    @property
    def loader_node(self) -> str:
        return "UNETLoader" if self.loadable else "AccelTestFluxLoader"


@dataclasses.dataclass
class FixtureInfo:
    family: str
    size: str
    seed: int
    outliers: bool
    filename: str | None              # under models/diffusion_models; None for in-process families
    path: Path | None
    params: int
    loader_node: str                  # "UNETLoader" or "AccelTestFluxLoader"
    loader_inputs: dict               # inputs for that node in an API prompt
    model_class: str                  # comfy.model_base class name the loader yields
    latent_format: str
    latent_channels: int
    latent_shape: tuple               # batch 1 at (width, height, length)
    empty_latent_node: str
    empty_latent_inputs: dict
    context_shape: tuple              # (tokens, dim)
    pooled_dim: int | None
    guidance: float | None
    width: int
    height: int
    length: int


# --- family specifications --------------------------------------------------------------

def _wan(dim, layers, ffn, in_dim=16, out_dim=16):
    return dict(image_model="wan2.1", model_type="t2v", dim=dim, out_dim=out_dim, num_heads=dim // 128,
                ffn_dim=ffn, num_layers=layers, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=in_dim)


def _hunyuan_video(hidden, depth, single):
    return dict(image_model="hunyuan_video", in_channels=16, patch_size=[1, 2, 2], out_channels=16,
                vec_in_dim=768, axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth,
                depth_single_blocks=single, theta=256, qkv_bias=True, byt5=False, guidance_embed=True,
                use_cond_type_embedding=False, vision_in_dim=None)


def _flux(hidden, depth, single):
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth,
                depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True)


def _ltxv(heads, layers):
    # Detection derives attention_head_dim = inner // 32 (32 heads), then applies the
    # "config" metadata; these two keys are what _ltxv_metadata writes there.
    return dict(image_model="ltxv", num_layers=layers, attention_head_dim=64,
                cross_attention_dim=heads * 64, num_attention_heads=heads)


def _ltxv_metadata(cfg: dict) -> dict:
    transformer = {"num_attention_heads": cfg["num_attention_heads"], "attention_head_dim": cfg["attention_head_dim"]}
    return {"config": json.dumps({"transformer": transformer}, sort_keys=True)}


def _sd3(depth, pos_embed_max_size=64):
    hidden = 64 * depth
    return dict(in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": hidden}},
                num_patches=pos_embed_max_size ** 2, pos_embed_max_size=pos_embed_max_size,
                pos_embed_scaling_factor=None, x_block_self_attn_layers=[])


def _sd15(num_res_blocks):
    return dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                adm_in_channels=None, in_channels=4, out_channels=4, model_channels=320,
                num_res_blocks=[num_res_blocks], transformer_depth=[1] * num_res_blocks,
                transformer_depth_output=[1] * (num_res_blocks + 1), channel_mult=[1],
                transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
                use_temporal_resblock=False, use_temporal_attention=False)


def _sdxl(channels, depth):
    # SDXL's layout (no attention at the top level, linear proj, y = pooled + size embeddings)
    # at a width detection would not accept: two levels instead of three, 64/128 channels.
    return dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4,
                model_channels=channels, num_res_blocks=[1, 1], transformer_depth=[0, depth],
                transformer_depth_output=[0, 0, depth, depth], channel_mult=[1, 2],
                transformer_depth_middle=depth, use_linear_in_transformer=True, context_dim=2048,
                use_temporal_resblock=False, use_temporal_attention=False)


def _lumina2(heads, kv_heads, layers):
    # Heads of 96 with grouped KV heads, like Lumina 2 (24 heads of 96, 8 KV heads).
    return dict(image_model="lumina2", patch_size=2, in_channels=16, dim=heads * 96, cap_feat_dim=2304,
                n_layers=layers, qk_norm=True, n_heads=heads, n_kv_heads=kv_heads, axes_dims=[32, 32, 32],
                axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0)


_GELU_MLP = "gelu"      # up -> GELU -> down
_GLU_VALUE = "geglu"    # up projects to [value, gate]; value half scaled
_LINEAR = "linear"      # separate value projection (SwiGLU w3)

FAMILIES: dict[str, FamilySpec] = {
    "wan21": FamilySpec(
        name="wan21", model_config="WAN21_T2V", model_class="WAN21", loadable=True,
        latent_format="Wan21", latent_channels=16, spatial_down=8, temporal_down=4,
        empty_latent="EmptyHunyuanLatentVideo", context_dim=4096, pooled_dim=None, guidance=None,
        text_encoder="umT5-XXL",
        sizes={"tiny": SizeSpec(_wan(256, 4, 512), 128, 128, 9, 32),
               "medium": SizeSpec(_wan(512, 6, 2048), 256, 256, 9, 128),
               "wide": SizeSpec(_wan(1536, 2, 8960), 256, 256, 9, 128),
               "full": SizeSpec(_wan(1536, 30, 8960), 256, 256, 9, 128)},
        ffn_pairs=((r"^(blocks\.\d+)\.ffn\.0\.weight$", r"\1.ffn.2.weight", _GELU_MLP),)),
    "wan22_5b": FamilySpec(
        name="wan22_5b", model_config="WAN22_T2V", model_class="WAN22", loadable=True,
        latent_format="Wan22", latent_channels=48, spatial_down=16, temporal_down=4,
        empty_latent="AccelTestEmptyLatent", context_dim=4096, pooled_dim=None, guidance=None,
        text_encoder="umT5-XXL",
        sizes={"tiny": SizeSpec(_wan(256, 4, 512, 48, 48), 256, 256, 9, 32),
               "medium": SizeSpec(_wan(512, 6, 2048, 48, 48), 512, 512, 9, 128)},
        ffn_pairs=((r"^(blocks\.\d+)\.ffn\.0\.weight$", r"\1.ffn.2.weight", _GELU_MLP),)),
    "hunyuan_video": FamilySpec(
        name="hunyuan_video", model_config="HunyuanVideo", model_class="HunyuanVideo", loadable=True,
        latent_format="HunyuanVideo", latent_channels=16, spatial_down=8, temporal_down=4,
        empty_latent="EmptyHunyuanLatentVideo", context_dim=4096, pooled_dim=768, guidance=6.0,
        text_encoder="LLaVA-Llama-3 (context) + CLIP-L (pooled)",
        sizes={"tiny": SizeSpec(_hunyuan_video(256, 2, 2), 128, 128, 9, 32),
               "medium": SizeSpec(_hunyuan_video(384, 2, 4), 256, 256, 9, 128)},
        ffn_pairs=((r"^(double_blocks\.\d+)\.(img|txt)_mlp\.0\.weight$", r"\1.\2_mlp.2.weight", _GELU_MLP),)),
    "flux": FamilySpec(
        name="flux", model_config="Flux", model_class="Flux", loadable=False,
        latent_format="Flux", latent_channels=16, spatial_down=8, temporal_down=None,
        empty_latent="EmptySD3LatentImage", context_dim=4096, pooled_dim=768, guidance=3.5,
        text_encoder="T5-XXL (context) + CLIP-L (pooled)",
        sizes={"tiny": SizeSpec(_flux(256, 2, 2), 128, 128, 1, 32),
               "medium": SizeSpec(_flux(384, 2, 4), 384, 384, 1, 128),
               "wide": SizeSpec(_flux(1536, 1, 2), 384, 384, 1, 128)},
        ffn_pairs=((r"^(double_blocks\.\d+)\.(img|txt)_mlp\.0\.weight$", r"\1.\2_mlp.2.weight", _GELU_MLP),)),
    "ltxv": FamilySpec(
        name="ltxv", model_config="LTXV", model_class="LTXV", loadable=True,
        latent_format="LTXV", latent_channels=128, spatial_down=32, temporal_down=8,
        empty_latent="EmptyLTXVLatentVideo", context_dim=4096, pooled_dim=None, guidance=None,
        text_encoder="T5-XXL",
        sizes={"tiny": SizeSpec(_ltxv(4, 4), 128, 128, 9, 32),
               "medium": SizeSpec(_ltxv(8, 6), 384, 384, 25, 128)},
        ffn_pairs=((r"^(transformer_blocks\.\d+)\.ff\.net\.0\.proj\.weight$", r"\1.ff.net.2.weight", _GELU_MLP),),
        metadata=_ltxv_metadata, attention_mask=True),
    "sd3": FamilySpec(
        name="sd3", model_config="SD3", model_class="SD3", loadable=True,
        latent_format="SD3", latent_channels=16, spatial_down=8, temporal_down=None,
        empty_latent="EmptySD3LatentImage", context_dim=4096, pooled_dim=2048, guidance=None,
        text_encoder="CLIP-L + CLIP-G + T5-XXL (154 tokens), pooled CLIP-L+G",
        sizes={"tiny": SizeSpec(_sd3(3), 128, 128, 1, 154),
               "medium": SizeSpec(_sd3(6), 384, 384, 1, 154)},
        ffn_pairs=((r"^(joint_blocks\.\d+)\.(x|context)_block\.mlp\.fc1\.weight$", r"\1.\2_block.mlp.fc2.weight",
                    _GELU_MLP),)),
    "sd15": FamilySpec(
        name="sd15", model_config="SD15", model_class="BaseModel", loadable=True,
        latent_format="SD15", latent_channels=4, spatial_down=8, temporal_down=None,
        empty_latent="EmptyLatentImage", context_dim=768, pooled_dim=None, guidance=None,
        text_encoder="CLIP-L (77 tokens)",
        sizes={"tiny": SizeSpec(_sd15(1), 64, 64, 1, 77),
               "medium": SizeSpec(_sd15(1), 256, 256, 1, 77)},
        ffn_pairs=((r"^(.*transformer_blocks\.\d+)\.ff\.net\.0\.proj\.weight$", r"\1.ff.net.2.weight", _GLU_VALUE),)),
    "sdxl": FamilySpec(
        name="sdxl", model_config="SDXL", model_class="SDXL", loadable=False,
        latent_format="SDXL", latent_channels=4, spatial_down=8, temporal_down=None,
        empty_latent="EmptyLatentImage", context_dim=2048, pooled_dim=1280, guidance=None,
        text_encoder="CLIP-L + CLIP-G (77 tokens), pooled CLIP-G",
        sizes={"tiny": SizeSpec(_sdxl(64, 1), 128, 128, 1, 77),
               "medium": SizeSpec(_sdxl(128, 2), 256, 256, 1, 77)},
        ffn_pairs=((r"^(.*transformer_blocks\.\d+)\.ff\.net\.0\.proj\.weight$", r"\1.ff.net.2.weight", _GLU_VALUE),)),
    "lumina2": FamilySpec(
        name="lumina2", model_config="Lumina2", model_class="Lumina2", loadable=False,
        latent_format="Flux", latent_channels=16, spatial_down=8, temporal_down=None,
        empty_latent="EmptySD3LatentImage", context_dim=2304, pooled_dim=None, guidance=None,
        text_encoder="Gemma-2 2B",
        sizes={"tiny": SizeSpec(_lumina2(2, 1, 2), 128, 128, 1, 32),
               "medium": SizeSpec(_lumina2(4, 2, 4), 384, 384, 1, 128)},
        ffn_pairs=((r"^(.*)\.feed_forward\.w3\.weight$", r"\1.feed_forward.w2.weight", _LINEAR),)),
}


def family_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown fixture family {family!r}; known: {', '.join(FAMILIES)}") from None


def size_spec(family: str, size: str) -> SizeSpec:
    spec = family_spec(family)
    if size not in spec.sizes:
        raise ValueError(f"unknown fixture size {size!r}; known: {', '.join(spec.sizes)}")
    return spec.sizes[size]


# --- shapes --------------------------------------------------------------------------------

def latent_shape(family: str, width: int, height: int, length: int = 1, batch: int = 1) -> tuple:
    """The latent a family's empty-latent node makes for this pixel size."""
    spec = family_spec(family)
    h, w = height // spec.spatial_down, width // spec.spatial_down
    if spec.temporal_down is None:
        return (batch, spec.latent_channels, h, w)
    return (batch, spec.latent_channels, (length - 1) // spec.temporal_down + 1, h, w)


def empty_latent_inputs(family: str, width: int, height: int, length: int = 1, batch: int = 1) -> dict:
    spec = family_spec(family)
    if spec.empty_latent == "AccelTestEmptyLatent":
        return {"family": family, "width": width, "height": height, "length": length, "batch_size": batch}
    inputs = {"width": width, "height": height, "batch_size": batch}
    if spec.temporal_down is not None:
        inputs["length"] = length
    return inputs


def fixture_filename(family: str, size: str, seed: int = 0, outliers: bool = False) -> str:
    size_spec(family, size)  # raises for an unknown family or size
    name = f"accel_{family}_{size}"
    if seed:
        name += f"_s{seed}"
    if outliers:
        name += "_outliers"
    return name + ".safetensors"


# --- weights -------------------------------------------------------------------------------

def _generator(seed: int, tag: str):
    import torch
    # crc32 of the key makes each tensor independent of build order and of other keys.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}".encode()))


def _init_tensor(key: str, shape: tuple, seed: int):
    import torch
    g = _generator(seed, key)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("pos_embed") and len(shape) == 3:
        # SD3's buffer is a fixed 2-D sin-cos table; the real one, not noise.
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
        side = int(math.isqrt(shape[1]))
        table = get_2d_sincos_pos_embed(shape[2], side)
        return torch.from_numpy(table).float().reshape(shape)
    if leaf in ("modulation", "scale_shift_table"):
        # Added to the timestep embedding before shift/scale/gate: N(0, 1/dim) as in Wan and LTXV.
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    if leaf == "bias":
        return torch.randn(shape, generator=g) * 0.02
    if len(shape) <= 1:
        # Norm scales ("weight"/"scale") and other vectors: near one, never exactly one.
        return 1.0 + torch.randn(shape, generator=g) * 0.05
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def _plant_outliers(sd: dict, spec: FamilySpec, seed: int) -> int:
    """Give the down projection of each FFN pair a few input channels 10-100x the median."""
    import torch
    planted = 0
    for up_key in sorted(sd):
        for pattern, down_template, kind in spec.ffn_pairs:
            m = re.match(pattern, up_key)
            if not m:
                continue
            down_key = m.expand(down_template)
            up_w, down_w = sd[up_key], sd[down_key]
            up_b = sd.get(up_key[:-len("weight")] + "bias")
            hidden = down_w.shape[1]
            g = _generator(seed, "outliers:" + up_key)
            n = max(2, hidden // 256)
            channels = torch.randperm(hidden, generator=g)[:n]
            if kind == _GELU_MLP:
                # Scale k in [1.8, 10] and a bias of 2k: the pre-activation is ~k(2 + N(0, 1)), so
                # GELU passes it on every token, ~7k (10-100x) a typical channel's |GELU(N(0, 1))|.
                k = 10 ** (0.25 + 0.75 * torch.rand(n, generator=g))
                up_w[channels] *= k[:, None]
                if up_b is not None:
                    up_b[channels] = 2.0 * k
            else:
                # Value half of a GLU (or SwiGLU's w3): linear in the row, so scaling by k scales
                # the channel by exactly k, and dividing the down column undoes it.
                k = 10 ** (1.0 + 0.7 * torch.rand(n, generator=g))   # 10-50
                up_w[channels] *= k[:, None]
                if up_b is not None:
                    up_b[channels] *= k
            down_w[:, channels] /= k[None, :]
            planted += n
    return planted


def _comfy():
    import sys
    if "comfy.model_management" in sys.modules:
        return  # already inside ComfyUI (the test server) or imported before
    from lab.host import import_comfy
    import_comfy()


def model_config(config_name: str, unet_config: dict):
    """The ``comfy.supported_models`` config ``config_name`` for ``unet_config``, with the fields
    this host requires and the config lacks filled in as its detection would (``compat``)."""
    _comfy()
    import comfy.supported_models
    from comfyui_accel.compat import complete_unet_config
    return getattr(comfy.supported_models, config_name)(complete_unet_config(unet_config))


def _model_config(family: str, size: str):
    return model_config(family_spec(family).model_config, size_spec(family, size).unet_config)


def _shapes(family: str, size: str) -> dict:
    """Key -> shape of the family's diffusion model, built on the meta device (no memory)."""
    import torch
    model_config = _model_config(family, size)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("meta"))
    return {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}


def state_dict(family: str, size: str, seed: int = 0, outliers: bool = False) -> dict:
    """The fixture's weights: ComfyUI's diffusion-model keys (no prefix), fp32, CPU."""
    spec = family_spec(family)
    sd = {k: _init_tensor(k, shape, seed) for k, shape in sorted(_shapes(family, size).items())}
    if outliers:
        _plant_outliers(sd, spec, seed)
    return sd


def _fingerprint(family: str, size: str, seed: int, outliers: bool) -> str:
    cfg = size_spec(family, size).unet_config
    return json.dumps({"version": FIXTURE_VERSION, "family": family, "size": size, "seed": seed,
                       "outliers": outliers, "config": cfg}, sort_keys=True, default=str)


def _file_metadata(family: str, size: str, seed: int, outliers: bool, params: int) -> dict:
    spec = family_spec(family)
    meta = dict(spec.metadata(size_spec(family, size).unet_config)) if spec.metadata else {}
    meta["accel_fixture"] = _fingerprint(family, size, seed, outliers)
    meta["accel_params"] = str(params)
    return meta


def _save_safetensors(sd: dict, path: Path, metadata: dict) -> None:
    """Write a .safetensors file whose bytes depend only on its content.

    ``safetensors.torch.save_file`` orders the metadata entries differently from one call
    to the next (a hash map), so two identical fixtures would differ in their header. The
    format is simple enough to write here: u64 header length, JSON header (sorted, padded
    to 8 bytes with spaces), then the tensors' little-endian bytes in header order.
    """
    import struct
    import torch
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    formats = {torch.float32: ("F32", "<f4"), torch.float16: ("F16", "<f2")}
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        if t.dtype not in formats:
            raise TypeError(f"tensors are float32 or float16, {key} is {t.dtype}")
        name, numpy_type = formats[t.dtype]
        data = t.numpy().astype(numpy_type).tobytes()
        header[key] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in blobs:
            f.write(data)


def _existing_params(path: Path, fingerprint: str) -> int | None:
    """The parameter count stored in an existing fixture file with this fingerprint, else None."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a partial or foreign file: rewrite it
        return None
    if meta.get("accel_fixture") != fingerprint:
        return None
    return int(meta.get("accel_params", 0))


# --- public API ----------------------------------------------------------------------------

def fixture_info(family: str, size: str, seed: int = 0, outliers: bool = False,
                 path: Path | None = None, params: int = 0) -> FixtureInfo:
    spec = family_spec(family)
    ss = size_spec(family, size)
    filename = fixture_filename(family, size, seed, outliers) if spec.loadable else None
    if spec.loadable:
        loader_inputs = {"unet_name": filename, "weight_dtype": "default"}
    else:
        loader_inputs = {"family": family, "size": size, "seed": seed, "outliers": outliers}
    return FixtureInfo(
        family=family, size=size, seed=seed, outliers=outliers, filename=filename, path=path, params=params,
        loader_node=spec.loader_node, loader_inputs=loader_inputs, model_class=spec.model_class,
        latent_format=spec.latent_format, latent_channels=spec.latent_channels,
        latent_shape=latent_shape(family, ss.width, ss.height, ss.length),
        empty_latent_node=spec.empty_latent,
        empty_latent_inputs=empty_latent_inputs(family, ss.width, ss.height, ss.length),
        context_shape=(ss.context_tokens, spec.context_dim), pooled_dim=spec.pooled_dim,
        guidance=spec.guidance, width=ss.width, height=ss.height, length=ss.length)


def write_fixture(family: str, size: str, models_dir, seed: int = 0, outliers: bool = False) -> FixtureInfo:
    """Write ``models_dir/diffusion_models/<fixture_filename>`` for families the stock loader accepts.

    A file with the same fingerprint (family, size, seed, outliers, config, FIXTURE_VERSION in
    its metadata) is left alone. For in-process families (flux, lumina2) nothing is written;
    the returned info names the fixture node that builds them.
    """
    spec = family_spec(family)
    size_spec(family, size)
    if not spec.loadable:
        params = sum(math.prod(s) for s in _shapes(family, size).values())
        return fixture_info(family, size, seed, outliers, None, params)
    folder = Path(models_dir) / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fixture_filename(family, size, seed, outliers)
    fingerprint = _fingerprint(family, size, seed, outliers)
    params = _existing_params(path, fingerprint) if path.exists() else None
    if params is None:
        sd = state_dict(family, size, seed, outliers)
        params = sum(t.numel() for t in sd.values())
        # Write beside and rename, so a reader (or a parallel test) never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _save_safetensors(sd, tmp, _file_metadata(family, size, seed, outliers, params))
        os.replace(tmp, path)
        log.info("wrote fixture %s (%.1fM parameters)", path, params / 1e6)
    return fixture_info(family, size, seed, outliers, path, params)


def load_model(family: str, size: str, seed: int = 0, outliers: bool = False, dtype=None):
    """A real ComfyUI ModelPatcher for the fixture, built in this process.

    File families go through ComfyUI's own detection (``load_diffusion_model_state_dict``
    with the same metadata the file carries), so what tests get is what ``UNETLoader``
    would give. In-process families repeat the steps of that function with our config.
    """
    spec = family_spec(family)
    _comfy()
    import comfy.sd
    sd = state_dict(family, size, seed, outliers)
    params = sum(t.numel() for t in sd.values())
    options = {"dtype": dtype} if dtype is not None else {}
    if spec.loadable:
        metadata = _file_metadata(family, size, seed, outliers, params)
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata)
        if model is None:
            raise RuntimeError(f"ComfyUI did not detect the {family} {size} fixture")
        return model
    return build_model(_model_config(family, size), sd, dtype)


def build_model(model_config, sd: dict, dtype=None):
    """A ModelPatcher built in-process from a ``comfy.supported_models`` config and its weights.

    The steps ``comfy.sd.load_diffusion_model_state_dict`` takes after detection, for models
    whose small configuration detection would not produce.
    """
    _comfy()
    import torch
    import comfy.model_management
    import comfy.model_patcher
    params = sum(t.numel() for t in sd.values())
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    unet_dtype = dtype or comfy.model_management.unet_dtype(model_params=params, supported_dtypes=supported,
                                                            weight_dtype=torch.float32)
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, supported)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = model_config.get_model(sd, "")
    model = model.to(offload_device)
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def make_conditioning(family: str, size: str, batch: int = 1, seed: int = 0, tokens: int | None = None) -> list:
    """A ComfyUI CONDITIONING list standing in for the family's text encoder output.

    ``[[context (batch, tokens, dim), {"pooled_output": (batch, pooled), "guidance": g,
    "attention_mask": (batch, tokens)}]]`` with the extras the family's encoder gives;
    values N(0, 1), deterministic from the seed (use another seed for the negative).
    """
    import torch
    spec = family_spec(family)
    ss = size_spec(family, size)
    tokens = tokens or ss.context_tokens
    g = _generator(seed, f"cond:{family}")
    context = torch.randn((batch, tokens, spec.context_dim), generator=g)
    extra: dict[str, Any] = {}
    if spec.pooled_dim is not None:
        extra["pooled_output"] = torch.randn((batch, spec.pooled_dim), generator=g)
    if spec.guidance is not None:
        extra["guidance"] = spec.guidance
    if spec.attention_mask:
        # LTXV's forward takes the mask positionally; its T5 encoder always returns one.
        extra["attention_mask"] = torch.ones((batch, tokens), dtype=torch.long)
    return [[context, extra]]


def empty_latent(family: str, size: str, batch: int = 1, width: int | None = None, height: int | None = None,
                 length: int | None = None) -> dict:
    """A LATENT dict of zeros shaped like the family's empty-latent node makes it."""
    import torch
    ss = size_spec(family, size)
    shape = latent_shape(family, width or ss.width, height or ss.height, length or ss.length, batch)
    return {"samples": torch.zeros(shape)}


# --- tiny autoencoders ---------------------------------------------------------------------
# Stand-ins for a family's VAE file: ComfyUI's own tiny autoencoders (TAESD for images, TAEHV
# for video), which the stock VAELoader reads from models/vae_approx, with random weights.
# Real ComfyUI VAE objects, so the stock VAEEncode/VAEDecode nodes run on the fixtures.
# Image TAEs are an encoder and a decoder file, listed by VAELoader under one name ("taef1");
# video TAEs are one file, listed by file name.
TAE_FOR_FAMILY = {"flux": "taef1", "lumina2": "taef1", "sd3": "taesd3", "sdxl": "taesdxl", "sd15": "taesd",
                  "wan21": "lighttaew2_1.safetensors", "hunyuan_video": "taehv.safetensors",
                  "wan22_5b": "lighttaew2_2.safetensors"}


def write_tae_fixture(family: str, models_dir, seed: int = 0) -> str:
    """Write the family's random-weight tiny autoencoder into ``models_dir/vae_approx``.

    Returns the ``vae_name`` to give VAELoader. Files with the same fingerprint are left alone.
    (LTX-Video has no tiny autoencoder in ComfyUI 0.3.75.)
    """
    if family not in TAE_FOR_FAMILY:
        raise ValueError(f"no tiny autoencoder for the {family} family; known: {', '.join(TAE_FOR_FAMILY)}")
    _comfy()
    import torch
    import comfy.taesd.taehv
    import comfy.taesd.taesd
    name = TAE_FOR_FAMILY[family]
    channels = family_spec(family).latent_channels
    folder = Path(models_dir) / "vae_approx"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        if name.endswith(".safetensors"):
            parts = {name: comfy.taesd.taehv.TAEHV(latent_channels=channels)}
        else:
            parts = {f"{name}_encoder.safetensors": comfy.taesd.taesd.Encoder(latent_channels=channels),
                     f"{name}_decoder.safetensors": comfy.taesd.taesd.Decoder(latent_channels=channels)}
    for filename, module in parts.items():
        path = folder / filename
        fingerprint = json.dumps({"version": FIXTURE_VERSION, "tae": filename, "channels": channels, "seed": seed},
                                 sort_keys=True)
        if path.exists() and _existing_params(path, fingerprint) is not None:
            continue
        sd = {k: _init_tensor(f"{filename}:{k}", tuple(v.shape), seed) for k, v in module.state_dict().items()}
        params = sum(t.numel() for t in sd.values())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _save_safetensors(sd, tmp, {"accel_fixture": fingerprint, "accel_params": str(params)})
        os.replace(tmp, path)
        log.info("wrote tiny autoencoder fixture %s (%.1fM parameters)", path, params / 1e6)
    return name
