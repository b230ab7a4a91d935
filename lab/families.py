"""One registry of tiny models, one per diffusion family ComfyUI ships, for the family matrix.

Each entry (a :class:`Family`) is keyed by the ``comfy.supported_models`` config names it covers;
the first one builds it. The model is the host's own classes: the config class completed by
``fixtures.model_config`` with a small ``unet_config`` (widths of 64-256, one to three blocks), the
diffusion model the config's ``get_model`` makes, seeded random weights (``fixtures._init_tensor``:
same seed, same bytes), and conditioning of the shapes that family's forward takes (context,
pooled vector, guidance, masks, reference latents, audio features...). Most families that
``lab.fixtures`` has (files the stock loader reads) come from there.

A family is available on a host when its config class exists there (a feature check, never a
version string): ComfyUI 0.3.75 lacks many of 0.33's families, and :func:`missing` says which class.
``NOT_DIFFUSION`` (in the pack, ``families.py``) lists the supported_models entries that are not
diffusion models. :func:`uncovered` names any config of the running host that is in neither list,
so a ComfyUI update that adds a family fails the matrix test until the family is added here.
"""
from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace
from typing import Callable

from lab import fixtures, sampling

STEPS = 6        # sampler steps of every matrix run
CFG = 1.0        # the cond stream only: half the time (tests/integration/test_cache.py runs both streams)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                             # row id in the matrix
    title: str                            # what users call it
    configs: tuple[str, ...]              # comfy.supported_models configs covered; configs[0] builds it
    unet_config: dict | None = None       # tiny config; None: the ``fixture`` family of lab.fixtures
    latent: tuple = ()                    # latent shape, batch 1
    context: tuple[int, int] | None = (8, 64)   # (tokens, width) of the text conditioning
    extra: Callable | None = None         # (generator, latent shape) -> more conditioning
    fixture: str | None = None            # lab.fixtures family built instead
    build_config: str | None = None       # the config that builds it when ``configs`` is empty
    model_state: Callable | None = None   # () -> tensors the config's get_model reads from the checkpoint
    note: str = ""                        # what the tiny build leaves out, for the README
    full_size: bool = False               # widths fixed in code: built on the meta device, never sampled
    source_latent: bool = False           # image-to-image sampling: the latent is a (seeded) source, not empty
    steps: int = STEPS                    # sampler steps of each run
    cfg: float = CFG

    @property
    def config(self) -> str:
        return self.build_config or self.configs[0]


def _randn(g, *shape):
    import torch
    return torch.randn(shape, generator=g)


def _ones_mask(tokens):
    import torch
    return lambda g, shape: {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}


def _unet(channels=32, context_dim=64, in_channels=4, out_channels=4, adm=None, linear=False, depth=(1, 1),
          levels=(1, 2), **extra):
    """A two-level UNet (``openaimodel.UNetModel``) with the layout detection writes."""
    config = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                  adm_in_channels=adm, in_channels=in_channels, out_channels=out_channels,
                  model_channels=channels, num_res_blocks=[1] * len(levels), transformer_depth=list(depth),
                  transformer_depth_output=[d for d in depth for _ in range(2)], channel_mult=list(levels),
                  transformer_depth_middle=max(depth), use_linear_in_transformer=linear, context_dim=context_dim,
                  use_temporal_resblock=False, use_temporal_attention=False)
    if adm is not None:
        config["num_classes"] = "sequential"
    config.update(extra)
    return config


def _wan(model_type="t2v", dim=256, layers=2, in_dim=16, **extra):
    return dict(image_model="wan2.1", model_type=model_type, dim=dim, out_dim=16, num_heads=dim // 128,
                ffn_dim=2 * dim, num_layers=layers, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=in_dim, text_dim=64, **extra)


def _hunyuan(in_channels, out_channels, patch=(1, 1, 1), depth=2, single=0, v15=False, byt5=None, **extra):
    """HunyuanVideo's class as detection configures 1.5 (``v15``: cond-type and vision embeddings)
    and Image 2.1, at 256 wide."""
    config = dict(image_model="hunyuan_video", in_channels=in_channels, patch_size=list(patch),
                  out_channels=out_channels, vec_in_dim=None, axes_dim=[16, 56, 56] if len(patch) == 3 else [64, 64],
                  meanflow=False, context_in_dim=64, hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=depth,
                  depth_single_blocks=single, theta=256, qkv_bias=True, byt5=v15 if byt5 is None else byt5,
                  guidance_embed=False, use_cond_type_embedding=v15, vision_in_dim=1152 if v15 else None,
                  meanflow_sum=v15)
    config.update(extra)
    return config


def _byt5(g, shape):
    """HunyuanVideo 1.5 / Image 2.1's byT5 glyph features, and no pooled vector."""
    return {"conditioning_byt5small": _randn(g, 1, 8, 1472), "pooled_output": None}


def _clip_vision(tokens=257, width=1280):
    """A CLIP-vision output as the conditioning carries it (what the model reads of it)."""
    def extra(g, shape):
        hidden = _randn(g, 1, tokens, width)
        return {"clip_vision_output": SimpleNamespace(penultimate_hidden_states=hidden, last_hidden_state=hidden,
                                                      image_embeds=_randn(g, 1, width))}
    return extra


def _merge(*extras):
    def extra(g, shape):
        out = {}
        for e in extras:
            out.update(e(g, shape))
        return out
    return extra


def _pooled(width):
    """A pooled text vector of ``width``; None: the family takes none (older hosts look the key up)."""
    return lambda g, shape: {"pooled_output": None if width is None else _randn(g, 1, width)}


def _concat_latent(channels=None):
    def extra(g, shape):
        s = list(shape)
        if channels is not None:
            s[1] = channels
        return {"concat_latent_image": _randn(g, *s)}
    return extra


def _randint(g, high, shape):
    import torch
    return torch.randint(0, high, shape, generator=g)


def _number_conditioners(names, **kwargs):
    """Seeded weights of Stable Audio's seconds embedders, which the config reads from the checkpoint."""
    fixtures._comfy()
    import torch
    from comfy.ldm.audio.embedders import NumberConditioner
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in NumberConditioner(768, min_val=0, **kwargs).state_dict().items()}
    return {f"conditioner.conditioners.{n}.{k}": fixtures._init_tensor(f"{n}.{k}", shape, 0)
            for n in names for k, shape in shapes.items()}


def _reference_latents(g, shape):
    return {"reference_latents": [_randn(g, *shape)]}


# --- the registry --------------------------------------------------------------------------
# Latent shapes follow each config's latent format: Flux/SD3 16 channels at 1/8, Flux 2 128 at
# 1/16, Wan 2.1 16 (and Wan 2.2 5B 48) channels with (frames - 1) / 4 + 1 latent frames...

_F = Family
FAMILIES: tuple[Family, ...] = (
    # Families with a file fixture or an in-process one in lab.fixtures.
    _F("sd15", "Stable Diffusion 1.x", ("SD15",), _unet(64, 768), latent=(1, 4, 16, 16), context=(8, 768),
       note="64 channels instead of SD 1.x's fixed 320 (the file fixture lab.fixtures writes is 26 M parameters)"),
    _F("sdxl", "SDXL (and SSD-1B, Segmind Vega, KOALA)",
       ("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"), fixture="sdxl"),
    _F("sd3", "Stable Diffusion 3 / 3.5", ("SD3",), fixture="sd3"),
    _F("flux", "Flux.1 dev / schnell / Fill", ("Flux", "FluxSchnell", "FluxInpaint"), fixture="flux"),
    _F("lumina2", "Lumina 2", ("Lumina2",), fixture="lumina2"),
    _F("wan21", "Wan 2.1 T2V, Wan 2.2 T2V A14B", ("WAN21_T2V",), fixture="wan21"),
    _F("wan22_5b", "Wan 2.2 TI2V 5B", ("WAN22_T2V",), fixture="wan22_5b"),
    _F("hunyuan_video", "HunyuanVideo", ("HunyuanVideo",), fixture="hunyuan_video"),
    _F("ltxv", "LTX-Video", ("LTXV",), fixture="ltxv"),

    # Flux-architecture families.
    _F("flux2", "Flux 2 (dev, Klein)", ("Flux2",),
       dict(image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=2, mlp_ratio=3.0, theta=2000, in_channels=128,
            out_channels=128, global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False,
            default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1, hidden_size=256,
            context_in_dim=64, vec_in_dim=None, depth=1, depth_single_blocks=2, guidance_embed=False),
       latent=(1, 128, 8, 8), context=(8, 64), extra=_merge(_reference_latents, _pooled(None)),
       note="Klein layout (no guidance embedding); one reference latent; the text is padded to 512 tokens as "
            "ComfyUI does"),
    _F("chroma", "Chroma", ("Chroma",),
       dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=256, mlp_ratio=4.0,
            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, in_dim=64, out_dim=256, hidden_dim=128, n_layers=1),
       latent=(1, 16, 16, 16), context=(8, 64), extra=_pooled(768)),
    _F("chroma_radiance", "Chroma Radiance (pixel space)", ("ChromaRadiance",),
       dict(image_model="chroma_radiance", in_channels=3, out_channels=3, context_in_dim=64, hidden_size=256,
            mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
            patch_size=8, qkv_bias=True, in_dim=64, out_dim=256, hidden_dim=128, n_layers=1, nerf_hidden_size=32,
            nerf_mlp_ratio=4, nerf_depth=2, nerf_max_freqs=8, nerf_tile_size=512, nerf_final_head_type="linear",
            nerf_embedder_dtype=None, use_x0=False, use_sequential_txt_ids=False),
       latent=(1, 3, 64, 64), context=(8, 64), extra=_pooled(768), note="patches of 8 pixels instead of 16"),
    _F("hunyuan3d", "Hunyuan3D 2.0 (and 2mini)", ("Hunyuan3Dv2", "Hunyuan3Dv2mini"),
       dict(image_model="hunyuan3d2", in_channels=64, context_in_dim=64, hidden_size=256, mlp_ratio=4.0, num_heads=2,
            depth=2, depth_single_blocks=2, qkv_bias=True, guidance_embed=False),
       latent=(1, 64, 64), context=(8, 64), note="the latent is a set of 64 shape tokens"),

    # Joint-attention image DiTs.
    _F("qwen_image", "Qwen-Image (and Edit, Layered)", ("QwenImage",),
       dict(image_model="qwen_image", num_layers=2, num_attention_heads=2, attention_head_dim=128,
            joint_attention_dim=64),
       latent=(1, 16, 1, 16, 16), context=(8, 64), extra=_reference_latents),
    _F("auraflow", "AuraFlow", ("AuraFlow",),
       dict(cond_seq_dim=64, dim=256, n_layers=3, n_double_layers=1, n_heads=2, global_conddim=256, max_seq=64),
       latent=(1, 4, 16, 16), context=(8, 64)),
    _F("hunyuan_dit", "HunyuanDiT 1.0 / 1.1+", ("HunyuanDiT", "HunyuanDiT1"),
       dict(image_model="hydit", depth=4, hidden_size=256, num_heads=2, text_states_dim=64, text_states_dim_t5=64,
            text_len=8, text_len_t5=8, input_size=32),
       latent=(1, 4, 16, 16), context=(8, 64),
       extra=lambda g, shape: {"conditioning_mt5xl": _randn(g, 1, 8, 64), **_ones_mask(8)(g, shape),
                               "attention_mask_mt5xl": _ones_mask(8)(g, shape)["attention_mask"]}),
    _F("zimage", "Z-Image", ("ZImage",),
       dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=2, qk_norm=True,
            n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
            ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
       latent=(1, 16, 16, 16), context=(8, 64)),
    _F("zimage_pixel", "Z-Image pixel space", ("ZImagePixelSpace",),
       dict(image_model="zimage_pixel", patch_size=16, in_channels=3, dim=256, cap_feat_dim=64, n_layers=2,
            qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
            rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
            decoder_in_channels=768, decoder_hidden_size=64, decoder_num_res_blocks=1, decoder_max_freqs=8),
       latent=(1, 3, 128, 128), context=(8, 64)),
    _F("hidream", "HiDream-I1", ("HiDream",),
       dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32], caption_channels=[64, 64],
            max_resolution=[128, 128], in_channels=16, llama_layers=[0, 1, 2, 3], num_attention_heads=2,
            num_routed_experts=4, num_activated_experts=2, num_layers=1, num_single_layers=2, out_channels=16,
            patch_size=2, text_emb_dim=64),
       latent=(1, 16, 16, 16), context=(8, 64),
       extra=lambda g, shape: {"pooled_output": _randn(g, 1, 64), "conditioning_llama3": _randn(g, 1, 4, 8, 64)},
       note="four Llama layers of eight tokens instead of 48 of 128"),

    # Video DiTs.
    _F("wan21_i2v", "Wan 2.1 I2V / FLF2V (CLIP-vision image embedding)", ("WAN21_I2V",),
       _wan("i2v", in_dim=36), latent=(1, 16, 3, 16, 16), context=(8, 64),
       extra=_merge(_clip_vision(), _concat_latent())),
    _F("wan22_i2v", "Wan 2.2 I2V A14B (WAN21_T2V config, image latent concatenated)", (),
       _wan("t2v", in_dim=36), latent=(1, 16, 3, 16, 16), context=(8, 64), extra=_concat_latent(),
       build_config="WAN21_T2V"),
    _F("wan22_s2v", "Wan 2.2 S2V (speech to video)", ("WAN22_S2V",),
       _wan("s2v", audio_dim=64, num_audio_token=4, enable_adain=True, cond_dim=16, audio_inject_layers=[0, 1]),
       latent=(1, 16, 3, 16, 16), context=(8, 64),
       extra=lambda g, shape: {"audio_embed": _randn(g, 1, 25, 64, 36), **_reference_latents(g, shape)},
       note="audio features of 64 channels (25 layers, as the audio encoder's)"),
    _F("wan22_animate", "Wan 2.2 Animate", ("WAN22_Animate",),
       _wan("animate", in_dim=36, motion_encoder_dim=64), latent=(1, 16, 3, 16, 16), context=(8, 64),
       extra=_merge(_clip_vision(), _concat_latent())),
    _F("wan_camera", "Wan 2.1 / 2.2 Fun Camera", ("WAN22_Camera", "WAN21_Camera"),
       _wan("camera_2.2", in_dim=36, in_dim_control_adapter=24), latent=(1, 16, 3, 16, 16), context=(8, 64),
       extra=lambda g, shape: {"camera_conditions": _randn(g, 1, 24, 3, 128, 128),
                               **_concat_latent()(g, shape)}),
    _F("hunyuan_video15", "HunyuanVideo 1.5", ("HunyuanVideo15",), _hunyuan(65, 32, v15=True),
       latent=(1, 32, 3, 8, 8), context=(8, 64), extra=_byt5),
    _F("ltxav", "LTX-2 (audio and video)", ("LTXAV",),
       dict(image_model="ltxav", in_channels=128, audio_in_channels=128, cross_attention_dim=128,
            audio_cross_attention_dim=64, attention_head_dim=64, audio_attention_head_dim=32, num_attention_heads=2,
            audio_num_attention_heads=2, caption_channels=64, num_layers=2, connector_attention_head_dim=32,
            connector_num_attention_heads=2, connector_num_layers=1),
       latent=((1, 128, 2, 4, 4), (1, 8, 5, 16)), context=(8, 64)),
    _F("kandinsky5", "Kandinsky 5 video", ("Kandinsky5",),
       dict(image_model="kandinsky5", model_dim=256, axes_dims=(32, 48, 48), time_dim=64, ff_dim=512,
            visual_embed_dim=132, num_text_blocks=1, num_visual_blocks=2, in_text_dim=64, in_text_dim2=64),
       latent=(1, 16, 3, 16, 16), context=(8, 64), extra=_pooled(64)),
    _F("kandinsky5_image", "Kandinsky 5 image", ("Kandinsky5Image",),
       dict(image_model="kandinsky5", model_dim=256, axes_dims=(32, 48, 48), time_dim=64, ff_dim=512,
            visual_embed_dim=64, num_text_blocks=1, num_visual_blocks=2, in_text_dim=64, in_text_dim2=64,
            rope_scale_factor=(1.0, 1.0, 1.0)),
       latent=(1, 16, 16, 16), context=(8, 64), extra=_pooled(64)),
    _F("mochi", "Mochi", ("GenmoMochi",),
       dict(image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=256, hidden_size_y=128,
            mlp_ratio_x=48.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
            out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True, timestep_mlp_bias=True,
            attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=64, t5_token_length=8,
            rope_theta=10000.0),
       latent=(1, 12, 2, 8, 8), context=(8, 64), extra=_ones_mask(8),
       note="Mochi's blocks fix the MLP at 12288 wide (hidden 256 x ratio 48)"),

    # UNet families (SD 1.x / 2.x / XL layouts, video and 3-D UNets).
    _F("sd2", "Stable Diffusion 2.x", ("SD20",), _unet(64, 64, linear=True), latent=(1, 4, 16, 16), context=(8, 64)),
    _F("sd21_unclip", "SD 2.1 unCLIP (L and H)", ("SD21UnclipL", "SD21UnclipH"),
       _unet(64, 64, linear=True, adm=1536), latent=(1, 4, 16, 16), context=(8, 64)),
    _F("sd15_ip2p", "SD 1.5 InstructPix2Pix", ("SD15_instructpix2pix",), _unet(32, 64, in_channels=8),
       latent=(1, 4, 16, 16), context=(8, 64), extra=_concat_latent()),
    _F("sdxl_ip2p", "SDXL InstructPix2Pix (CosXL Edit)", ("SDXL_instructpix2pix",),
       _unet(64, 2048, in_channels=8, adm=2816, linear=True, depth=(0, 1)), latent=(1, 4, 16, 16),
       context=(8, 2048), extra=_merge(_pooled(1280), _concat_latent())),
    _F("sdxl_refiner", "SDXL Refiner", ("SDXLRefiner",),
       _unet(64, 1280, adm=2560, linear=True, depth=(0, 1)), latent=(1, 4, 16, 16), context=(8, 1280),
       extra=_pooled(1280)),
    _F("sd_x4", "SD x4 Upscaler", ("SD_X4Upscaler",),
       _unet(32, 64, in_channels=7, linear=True, levels=(1, 1, 2, 2), depth=(1, 1, 1, 1)),
       latent=(1, 4, 48, 48), context=(8, 64),
       extra=lambda g, shape: {"concat_image": _randn(g, 1, 3, 48, 48)},
       note="48x48 latent: its only self-attention is at 1/8 size (6x6 tokens), as in the real model"),
    _F("zero123", "Stable Zero123", ("Stable_Zero123",), _unet(64, 768, in_channels=8),
       latent=(1, 4, 16, 16), context=(1, 772), extra=_concat_latent(),
       model_state=lambda: {"cc_projection.weight": fixtures._init_tensor("cc_projection.weight", (768, 772), 0),
                            "cc_projection.bias": fixtures._init_tensor("cc_projection.bias", (768,), 0)}),
    _F("lotus", "Lotus depth / normal", ("LotusD",),
       _unet(64, 64, adm=4, linear=True, num_heads=-1, num_head_channels=64), latent=(1, 4, 16, 16),
       context=(8, 64)),
    _F("svd", "Stable Video Diffusion", ("SVD_img2vid",),
       _unet(64, 64, in_channels=8, adm=768, linear=True, extra_ff_mix_layer=True, use_spatial_context=True,
             merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
             use_temporal_resblock=True, use_temporal_attention=True, disable_temporal_crossattention=False),
       latent=(4, 4, 8, 8), context=(1, 64), extra=_concat_latent(),
       note="the batch is the frames, as ComfyUI's SVD latents are"),
    _F("sv3d", "SV3D (u and p)", ("SV3D_u", "SV3D_p"),
       _unet(64, 64, in_channels=8, adm=256, linear=True, extra_ff_mix_layer=True, use_spatial_context=True,
             merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
             use_temporal_resblock=True, use_temporal_attention=True, disable_temporal_crossattention=False),
       latent=(4, 4, 8, 8), context=(1, 64), extra=_concat_latent()),
    _F("cascade_c", "Stable Cascade stage C", ("Stable_Cascade_C",),
       dict(stable_cascade_stage="c", c_cond=64, c_hidden=[64, 64], nhead=[2, 2], blocks=[[1, 1], [1, 1]],
            block_repeat=[[1, 1], [1, 1]], c_clip_text=64, c_clip_text_pooled=64),
       latent=(1, 16, 12, 12), context=(8, 64), extra=lambda g, shape: {"pooled_output": _randn(g, 1, 1, 64)}),
    _F("cascade_b", "Stable Cascade stage B", ("Stable_Cascade_B",),
       dict(stable_cascade_stage="b", c_hidden=[32, 64], nhead=[-1, 2], blocks=[[1, 1], [1, 1]],
            block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CTA"], c_clip=64, c_cond=64),
       latent=(1, 4, 16, 16), context=(8, 64), extra=lambda g, shape: {"pooled_output": _randn(g, 1, 1, 64)}),

    # Audio models.
    _F("stable_audio", "Stable Audio Open 1.0", ("StableAudio",),
       dict(audio_model="dit1.0", io_channels=64, embed_dim=256, depth=2, num_heads=2, cond_token_dim=768,
            project_cond_tokens=True, global_cond_dim=1536, input_concat_dim=0),
       latent=(1, 64, 64), context=(8, 768),
       model_state=lambda: _number_conditioners(("seconds_start", "seconds_total"), max_val=512)),
    _F("stable_audio3", "Stable Audio 3", ("StableAudio3",),
       dict(audio_model="dit1.0", io_channels=64, embed_dim=256, depth=2, num_heads=2, cond_token_dim=768,
            project_cond_tokens=True, global_cond_dim=768, input_concat_dim=0, local_add_cond_dim=65,
            global_cond_shared_embed=True, global_cond_type="adaLN", timestep_features_type="expo",
            norm_type="rms_norm", attn_kwargs={"qk_norm": "rms", "differential": False}),
       latent=(1, 64, 64), context=(8, 768),
       model_state=lambda: _number_conditioners(("seconds_total",), max_val=384, fourier_features_type="expo")),
    _F("ace_step", "ACE-Step", ("ACEStep",),
       dict(audio_model="ace", attention_head_dim=64, in_channels=8, inner_dim=128, max_height=16,
            max_position=32768, max_width=32768, mlp_ratio=2.5, num_attention_heads=2, num_layers=2,
            out_channels=8, patch_size=[16, 1], rope_theta=1000000.0, speaker_embedding_dim=512,
            text_embedding_dim=64, ssl_encoder_depths=[1, 1], ssl_latent_dims=[64, 64], ssl_names=["mert", "m-hubert"],
            lyric_encoder_vocab_size=64, lyric_hidden_size=1024),
       latent=(1, 8, 16, 32), context=(8, 64),
       extra=lambda g, shape: {"conditioning_lyrics": _randint(g, 64, (1, 8))},
       note="the lyric encoder (a Conformer) is fixed at 1024 wide"),

    # Other image and video DiTs.
    _F("pixart", "PixArt-alpha / sigma", ("PixArtAlpha", "PixArtSigma"),
       dict(image_model="pixart_alpha", num_heads=2, patch_size=2, hidden_size=192, in_channels=4, depth=2,
            model_max_length=8, input_size=80, pe_interpolation=1.0, micro_condition=True, caption_channels=64),
       latent=(1, 4, 40, 40), context=(8, 64),
       extra=lambda g, shape: {"width": 128, "height": 128}),
    _F("cosmos", "Cosmos 1.0 (Text2World, Video2World)", ("CosmosT2V", "CosmosI2V"),
       dict(image_model="cosmos", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
            patch_spatial=2, patch_temporal=1, model_channels=256, block_config="FA-CA-MLP",
            concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
            block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=64, num_blocks=2,
            num_heads=2, crossattn_emb_channels=64, extra_per_block_abs_pos_emb=True,
            extra_per_block_abs_pos_emb_type="learnable"),
       latent=(1, 16, 3, 16, 16), context=(8, 64)),
    _F("cosmos_predict2", "Cosmos Predict 2 (text/image to image/video)", ("CosmosT2IPredict2", "CosmosI2VPredict2"),
       dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
            out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=256, concat_padding_mask=True,
            crossattn_emb_channels=64, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
            min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=64, num_blocks=2, num_heads=2,
            extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
            rope_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False),
       latent=(1, 16, 1, 16, 16), context=(8, 64)),
    _F("longcat", "LongCat-Image", ("LongCatImage",),
       dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=3584,
            hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[16, 56, 56],
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False, txt_ids_dims=[1, 2]),
       latent=(1, 16, 16, 16), context=(8, 3584)),
    _F("hunyuan_video_i2v", "HunyuanVideo I2V", ("HunyuanVideoI2V",),
       dict(fixtures.size_spec("hunyuan_video", "tiny").unet_config, in_channels=33, meanflow_sum=False),
       latent=(1, 16, 3, 16, 16), context=(8, 4096), extra=_merge(_pooled(768), _concat_latent())),
    _F("hunyuan_video_skyreels", "SkyReels V1 I2V (HunyuanVideo)", ("HunyuanVideoSkyreelsI2V",),
       dict(fixtures.size_spec("hunyuan_video", "tiny").unet_config, in_channels=32, meanflow_sum=False),
       latent=(1, 16, 3, 16, 16), context=(8, 4096), extra=_merge(_pooled(768), _concat_latent())),
    _F("hunyuan_image21", "HunyuanImage 2.1", ("HunyuanImage21",),
       _hunyuan(64, 64, patch=(1, 1), depth=1, single=2, byt5=True), latent=(1, 64, 8, 8), context=(8, 64),
       extra=_byt5),
    _F("hunyuan_image21_refiner", "HunyuanImage 2.1 refiner", ("HunyuanImage21Refiner",),
       _hunyuan(128, 64, depth=1, single=2, guidance_embed=True), latent=(1, 64, 3, 8, 8), context=(8, 64),
       extra=_pooled(None)),
    _F("hunyuan_video15_sr", "HunyuanVideo 1.5 super-resolution", ("HunyuanVideo15_SR_Distilled",),
       _hunyuan(98, 32, v15=True), latent=(1, 32, 3, 8, 8), context=(8, 64), extra=_byt5),
    _F("wan21_causal", "Wan 2.1 causal (autoregressive) T2V", ("WAN21_CausalAR_T2V",), _wan("t2v"),
       latent=(1, 16, 3, 16, 16), context=(8, 64)),
    _F("wan21_fun_control", "Wan 2.1 Fun Control", ("WAN21_FunControl2V",), _wan("i2v", in_dim=48),
       latent=(1, 16, 3, 16, 16), context=(8, 64), extra=_merge(_clip_vision(), _concat_latent(32))),
    _F("wan21_vace", "Wan 2.1 VACE", ("WAN21_Vace",), _wan("vace", vace_in_dim=96, vace_layers=1),
       latent=(1, 16, 3, 16, 16), context=(8, 64)),
    _F("wan21_humo", "Wan 2.1 HuMo", ("WAN21_HuMo",), _wan("humo", in_dim=36), latent=(1, 16, 3, 16, 16),
       context=(8, 64)),
    _F("wan_animate2", "Wan Animate 2", ("WAN_Animate2",), _wan("animate2", in_dim=36), latent=(1, 16, 3, 16, 16),
       context=(8, 64), extra=_concat_latent()),
    _F("wan21_flowrvs", "Wan 2.1 FlowRVS", ("WAN21_FlowRVS",), _wan("flow_rvs"), latent=(1, 16, 3, 16, 16),
       context=(8, 64), source_latent=True,
       note="image-to-image flow: it starts from the source latent (seeded noise here), not from noise"),
    _F("wan21_scail", "Wan 2.1 SCAIL", ("WAN21_SCAIL",), _wan("scail", in_dim=20), latent=(1, 16, 3, 16, 16),
       context=(8, 64)),
    _F("wan21_scail2", "Wan 2.1 SCAIL 2", ("WAN21_SCAIL2",), _wan("scail2", in_dim=20), latent=(1, 16, 3, 16, 16),
       context=(8, 64)),
    _F("wan22_dancer", "Wan 2.2 WanDancer", ("WAN22_WanDancer",),
       _wan("wandancer", in_dim=36, audio_inject_layers=[0, 1]), latent=(1, 16, 3, 16, 16), context=(8, 64),
       extra=_concat_latent()),
    _F("hunyuan3d21", "Hunyuan3D 2.1", ("Hunyuan3Dv2_1",),
       dict(image_model="hunyuan3d2_1", in_channels=64, context_dim=64, hidden_size=256, mlp_ratio=4.0,
            num_heads=2, depth=3, qkv_bias=False, guidance_cond_proj_dim=None, num_moe_layers=1, num_experts=2,
            moe_top_k=1),
       latent=(1, 64, 64), context=(8, 64), cfg=2.0,
       note="the latent is a set of 64 shape tokens; cfg 2 (ComfyUI 0.3.75's forward needs cond and uncond)"),
    _F("omnigen2", "OmniGen2", ("Omnigen2",),
       dict(image_model="omnigen2", axes_dim_rope=[40, 40, 48], axes_lens=[1024, 1664, 1664],
            ffn_dim_multiplier=None, hidden_size=256, in_channels=16, multiple_of=64, norm_eps=1e-05,
            num_attention_heads=2, num_kv_heads=2, num_layers=2, num_refiner_layers=1, out_channels=None,
            patch_size=2, text_feat_dim=64, timestep_scale=1000.0),
       latent=(1, 16, 16, 16), context=(8, 64), extra=_ones_mask(8)),
    _F("mage_flow", "Mage-Flow", ("MageFlow",),
       dict(image_model="mage_flow", in_channels=128, out_channels=128, num_layers=2, attention_head_dim=128,
            num_attention_heads=2, joint_attention_dim=64),
       latent=(1, 128, 8, 8), context=(8, 64)),
    _F("joyimage", "JoyImage", ("JoyImage",),
       dict(image_model="joyimage", in_channels=16, hidden_size=256, patch_size=[1, 2, 2], num_layers=2,
            num_attention_heads=2, text_dim=64),
       latent=(1, 16, 1, 16, 16), context=(8, 64)),
    _F("ideogram4", "Ideogram 4", ("Ideogram4",),
       dict(image_model="ideogram4", in_channels=128, num_layers=2, num_attention_heads=2, attention_head_dim=128,
            rope_theta=5000000, norm_eps=1e-5,
            intermediate_size=512, adaln_dim=64, llm_features_dim=64, mrope_section=(24, 20, 20)),
       latent=(1, 128, 8, 8), context=(8, 64)),
    _F("krea2", "Krea 2", ("Krea2",),
       dict(image_model="krea2", features=256, channels=16, patch=2, layers=2, heads=2, kvheads=2, txtlayers=2,
            txtdim=64, txtheads=2, txtkvheads=2),
       latent=(1, 16, 1, 16, 16), context=(8, 128)),
    _F("ernie", "ERNIE-Image", ("ErnieImage",),
       dict(image_model="ernie", hidden_size=256, num_attention_heads=2, num_layers=2, ffn_hidden_size=512,
            in_channels=128, out_channels=128, text_in_dim=64),
       latent=(1, 128, 8, 8), context=(8, 64)),
    _F("cogvideox", "CogVideoX (T2V, I2V, Fun Inpaint)", ("CogVideoX_T2V", "CogVideoX_I2V", "CogVideoX_Inpaint"),
       dict(image_model="cogvideox", num_attention_heads=2, attention_head_dim=64, time_embed_dim=64, num_layers=2,
            in_channels=16, patch_size=2, text_embed_dim=64, use_learned_positional_embeddings=False,
            use_rotary_positional_embeddings=True, sample_width=16, sample_height=16, sample_frames=9,
            max_text_seq_length=8),
       latent=(1, 16, 3, 16, 16), context=(8, 64)),
    _F("anima", "Anima", ("Anima",),
       dict(image_model="anima", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
            patch_spatial=2, patch_temporal=1, model_channels=256, concat_padding_mask=True,
            crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
            min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=64, num_blocks=2, num_heads=2,
            extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
            rope_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False),
       latent=(1, 16, 1, 16, 16), context=(8, 1024),
       note="text as the LLM adapter's output (1024 wide); the adapter itself is not run"),
    _F("lens", "Lens", ("Lens",),
       dict(image_model="lens", in_channels=128, out_channels=32, num_layers=2, num_attention_heads=2,
            attention_head_dim=64, enc_hidden_dim=64, multi_layer_encoder_feature=False, selected_layer_index=(0,),
            axes_dims_rope=(8, 28, 28)),
       latent=(1, 128, 8, 8), context=(8, 64)),
    _F("boogu", "Boogu-Image", ("Boogu",),
       dict(image_model="boogu", hidden_size=256, num_layers=1, num_double_stream_layers=1, num_refiner_layers=1,
            instruction_feat_dim=64, num_attention_heads=2, num_kv_heads=2, axes_dim_rope=(40, 40, 48),
            multiple_of=64),
       latent=(1, 16, 16, 16), context=(8, 64), extra=_ones_mask(8)),
    _F("pixeldit", "PixelDiT (pixel space)", ("PixelDiTT2I",),
       dict(image_model="pixeldit_t2i", in_channels=3, num_groups=2, hidden_size=128, pixel_hidden_size=8,
            pixel_attn_hidden_size=64, pixel_num_groups=2, patch_depth=2, pixel_depth=1, patch_size=8,
            txt_embed_dim=64, txt_max_length=8),
       latent=(1, 3, 64, 64), context=(8, 64)),
    _F("pid", "PiD (pixel diffusion decoder)", ("PiD",),
       dict(image_model="pid", lq_latent_channels=16, lq_hidden_dim=32, lq_num_res_blocks=1, lq_interval=1,
            sr_scale=1, latent_spatial_down_factor=8, in_channels=3, num_groups=2, hidden_size=128,
            pixel_hidden_size=8, pixel_attn_hidden_size=64, pixel_num_groups=2, patch_depth=2, pixel_depth=1,
            patch_size=8, txt_embed_dim=64, txt_max_length=8),
       latent=(1, 3, 64, 64), context=(8, 64),
       extra=lambda g, shape: {"lq_latent": _randn(g, 1, 16, 8, 8), "degrade_sigma": _randn(g, 1).abs() * 0.1}),
    _F("seedvr2", "SeedVR2 (video restoration)", ("SeedVR2",),
       dict(image_model="seedvr2", vid_dim=256, heads=2, head_dim=128, num_layers=2, mm_layers=2, norm_eps=1e-5,
            rope_type="mmrope3d", rope_dim=64, mlp_type="swiglu", txt_in_dim=64, expand_ratio=2),
       latent=(1, 16, 2, 16, 16), context=(8, 64),
       extra=lambda g, shape: {"condition": _randn(g, 1, 17, *shape[2:])}),
    _F("trellis2", "TRELLIS.2 (image to 3-D), structure stage", ("Trellis2",),
       dict(image_model="trellis2", resolution=16, model_channels=64, cond_channels=64, num_blocks=1, num_heads=2,
            mlp_ratio=2.0, init_txt_model=False, txt_only=False),
       latent=(1, 32, 16, 16, 16), context=(8, 64),
       extra=lambda g, shape: {"embeds": _randn(g, 1, 8, 64)},
       steps=4, note="the structure stage (a dense 16^3 grid: 4096 tokens, so 4 steps); the shape and texture "
                     "stages run on sparse voxels"),
    _F("triposplat", "TripoSplat (image to 3-D Gaussians)", ("TripoSplat",),
       dict(image_model="triposplat", q_token_length=64, in_channels=16, model_channels=128, cond_channels=64,
            out_channels=16, num_blocks=1, num_refiner_blocks=1, num_head_channels=64, cam_channels=5,
            cond2_channels=None),
       latent=((1, 64, 16), (1, 1, 5)), context=(8, 64),
       note="64 latent tokens instead of 8192"),
    _F("hidream_o1", "HiDream-O1 (pixel space)", ("HiDreamO1",),
       dict(image_model="hidream_o1",
            text_config_overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=1, num_key_value_heads=1, head_dim=128),
            vision_config_overrides=dict(hidden_size=64, num_heads=2, intermediate_size=128, depth=1,
                                         deepstack_visual_indexes=())),
       latent=(1, 3, 256, 256), context=(1, 1),
       extra=lambda g, shape: {"text_input_ids": _randint(g, 1000, (1, 8))},
       note="the Qwen3-VL vocabulary (151936 tokens) is kept: the model's special tokens index into it"),
    _F("ace_step15", "ACE-Step 1.5", ("ACEStep15",),
       dict(audio_model="ace1.5", in_channels=192, hidden_size=128, text_hidden_dim=64, timbre_hidden_dim=64,
            audio_acoustic_hidden_dim=64, num_dit_layers=2, num_lyric_layers=1, num_timbre_layers=1,
            num_tokenizer_layers=1, num_heads=2, num_kv_heads=2, head_dim=64, intermediate_size=256,
            fsq_dim=128, encoder_hidden_size=128, encoder_intermediate_size=256, encoder_num_heads=2),
       latent=(1, 64, 32), context=(8, 64),
       extra=lambda g, shape: {"conditioning_lyrics": _randn(g, 1, 8, 64)}),
    _F("minimax_h3", "MiniMax H3 (audio and video)", ("MiniMaxH3",),
       dict(image_model="minimax_h3", hidden_size=256, num_layers=2, token_refiner_num_layers=1,
            num_attention_heads=2, attention_head_dim=128, ffn_hidden_size=512, latents_dim=24,
            audio_latents_dim=32, text_dim=64, timestep_input_dim=256, time_embed_hidden_size=256,
            time_embed_dim=128, rope_inv_freq_len=16),
       latent=((1, 24, 2, 8, 8), (1, 32, 2, 8)), context=(8, 64), cfg=1.0,
       note="batch 1 only (the model refuses more), so no negative prompt: cfg 1"),
    _F("minimax_music3", "MiniMax Music 3", ("MiniMaxMusic3",), dict(audio_model="minimax_music3"),
       latent=(1, 64, 32), context=None, full_size=True,
       note="its widths are fixed in code (2.46 B parameters): built on the meta device, where only the "
            "nodes' refusals can be checked"),
)


def family(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def covered_configs() -> dict[str, str]:
    """supported_models config name -> the family row that covers it."""
    return {c: f.name for f in FAMILIES for c in f.configs}


# --- host checks ---------------------------------------------------------------------------

def missing(fam: Family) -> str | None:
    """Why this host cannot build the family (it lacks the config class), or None."""
    fixtures._comfy()
    import comfy.supported_models
    if getattr(comfy.supported_models, fam.config, None) is None:
        return f"ComfyUI {_version()} has no {fam.config}"
    return None


def uncovered() -> list[str]:
    """The running host's supported_models configs that no family covers and that are not
    listed as non-diffusion models."""
    fixtures._comfy()
    import comfy.supported_models
    from comfyui_accel.families import NOT_DIFFUSION
    known = covered_configs()
    return [m.__name__ for m in comfy.supported_models.models
            if m.__name__ not in known and m.__name__ not in NOT_DIFFUSION]


def _version() -> str:
    from comfyui_accel.compat import host_version
    return host_version()


# --- building ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def build(name: str, seed: int = 0):
    """A ModelPatcher of the family's tiny model (fp32, CPU), cached per (name, seed)."""
    fam = family(name)
    if fam.fixture is not None:
        return fixtures.load_model(fam.fixture, "tiny", seed=seed)
    fixtures._comfy()
    import torch
    import comfy.model_patcher
    from comfyui_accel.compat import complete_unet_config
    unet_config = complete_unet_config(fam.unet_config)
    config = fixtures.model_config(fam.config, unet_config)
    # Widths some configs fix in unet_extra_config (Ideogram 4's 4608-wide blocks) give way to ours.
    config.unet_config.update(unet_config)
    config.set_inference_dtype(torch.float32, None)
    if fam.full_size:
        with torch.device("meta"):
            base = config.get_model({}, device=torch.device("meta"))
        meta = torch.device("meta")
        return comfy.model_patcher.ModelPatcher(base, load_device=meta, offload_device=meta)
    with torch.no_grad():   # as ComfyUI loads (0.3.75's Zero123 copies its projection in place)
        base = config.get_model(fam.model_state() if fam.model_state else {})
    base.requires_grad_(False)
    module = base.diffusion_model
    sd = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            sd[key] = fixtures._init_tensor(f"{fam.config}:{key}", tuple(value.shape), seed).to(value.dtype)
        else:
            sd[key] = value   # integer buffers (indices, counters) keep what the model set
    module.load_state_dict(sd)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def build_not_diffusion(config: str, unet_config: dict):
    """A ModelPatcher of a non-diffusion supported_models entry (SAM 3, Depth Anything 3...) on the
    meta device, for checking that the nodes refuse it; None where the host lacks the config."""
    fixtures._comfy()
    import torch
    import comfy.model_patcher
    import comfy.supported_models
    cls = getattr(comfy.supported_models, config, None)
    if cls is None:
        return None
    model_config = cls(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    meta = torch.device("meta")
    with torch.device(meta):
        base = model_config.get_model({}, device=meta)
    return comfy.model_patcher.ModelPatcher(base, load_device=meta, offload_device=meta)


def conditioning(name: str, seed: int) -> list:
    """A CONDITIONING list for the family (seed 1 for the positive, 2 for the negative)."""
    import torch
    fam = family(name)
    if fam.fixture is not None:
        return fixtures.make_conditioning(fam.fixture, "tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens, width = fam.context or (1, 1)
    context = _randn(g, 1, tokens, width)
    extra = fam.extra(g, fam.latent) if fam.extra else {}
    return [[context, extra]]


def latent(name: str):
    fam = family(name)
    if fam.fixture is not None:
        return fixtures.empty_latent(fam.fixture, "tiny")["samples"]
    import torch
    if isinstance(fam.latent[0], tuple):   # audio-video models: a NestedTensor of the streams
        import comfy.nested_tensor
        return comfy.nested_tensor.NestedTensor([torch.zeros(s) for s in fam.latent])
    if fam.source_latent:
        return torch.randn(fam.latent, generator=torch.Generator().manual_seed(3))
    return torch.zeros(fam.latent)


def sample(model, name: str, steps: int | None = None, seed: int = 0, cfg: float | None = None,
           sampler: str = "euler"):
    """A real sampling run (comfy.sample, ``sampler``, simple) on the family's latent and conditioning."""
    fam = family(name)
    cfg = fam.cfg if cfg is None else cfg
    return sampling.ksampler(model, conditioning(name, 1), conditioning(name, 2), latent(name), steps or fam.steps,
                             cfg, seed, sampler)
