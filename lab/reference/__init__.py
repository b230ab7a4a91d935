"""Small trained reference models of real ComfyUI architectures, for fidelity benchmarks.

Random-weight fixtures (``lab/fixtures.py``) prove the plumbing; these models were
trained here (``python -m lab.reference.train``) with rectified flow on
the data of ``data.py``, so they have smooth denoising trajectories and produce pictures
that resemble their data when sampled with ComfyUI's stock samplers.

========== ============================================ ===========================
name       architecture                                  loaded by
========== ============================================ ===========================
ref_wan21  Wan 2.1 t2v (``WAN21_T2V``): dim 256 (2 heads   ``UNETLoader`` from the file
           of 128), 3 layers, ffn 384; 4-frame 32x32       (stock detection)
           videos of shapes moving right
ref_flux   Flux (``supported_models.Flux``, no guidance     in-process
           embedding): hidden 192 (3 heads of 64), 1        (``AccelTestFluxLoader``)
           double + 2 single blocks; 32x32 images
========== ============================================ ===========================

Both use ComfyUI's own time convention for their family (``model_sampling``: Wan's
discrete flow with shift 8 and timesteps x1000, Flux's shift 1.15 and timesteps in [0, 1]),
so KSampler (euler, simple or normal, 20-30 steps, cfg 3-5) samples them as it would the
real models. Latents come from the fixed patch autoencoder in ``autoencoder.py`` (16
channels at /2 spatial, no temporal compression); ``encode``/``decode`` below convert.

Text conditioning: a caption is a few words from ``data.VOCABULARY``; each word has a fixed
random 4096-d vector (the T5 width both families expect) and a 768-d pooled vector, a caption
is its words' vectors padded to ``TEXT_TOKENS`` with a pad vector, and the empty caption (the
negative prompt) is all pad. Training dropped the caption 10% of the time, so
classifier-free guidance works.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import zlib
from pathlib import Path

from lab import fixtures
from lab.reference import autoencoder, data

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEXT_TOKENS = 8
POOLED_DIM = 768
REFERENCE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    name: str
    family: str                  # the fixture family it belongs to (latent format, text widths, loader)
    model_config: str            # class in comfy.supported_models
    unet_config: dict
    kind: str                    # "video" or "image": which data.py batches it learns
    width: int                   # pixels the model was trained at
    height: int
    length: int                  # pixel frames (1 for images)
    prompts: tuple[str, ...]     # captions for benchmarks and the sample sheets
    # training
    batch: int
    steps: int
    lr: float
    ema: float                   # decay of the weights' moving average that is saved
    frame_noise: float = 0.0     # share of video clips noised per frame (train.flow_matching_loss)

    @property
    def filename(self) -> str:
        return f"accel_{self.name}.safetensors"

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.filename

    @property
    def family_spec(self) -> fixtures.FamilySpec:
        return fixtures.family_spec(self.family)

    @property
    def loadable(self) -> bool:
        return self.family_spec.loadable


def _flux_config(hidden: int, heads: int, depth: int, single: int) -> dict:
    head = hidden // heads   # rope axes split like Flux's [16, 56, 56] of 128
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM, context_in_dim=4096,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single,
                axes_dim=[head // 8, head * 7 // 16, head * 7 // 16], theta=10000, patch_size=2, qkv_bias=True,
                guidance_embed=False)


MODELS: dict[str, ReferenceSpec] = {
    "ref_wan21": ReferenceSpec(
        name="ref_wan21", family="wan21", model_config="WAN21_T2V",
        unet_config=fixtures._wan(256, 3, 384), kind="video",
        width=data.VIDEO_SIZE, height=data.VIDEO_SIZE, length=data.VIDEO_FRAMES,
        prompts=("red circle moving right", "blue square moving right", "yellow triangle moving right",
                 "green square moving right"),
        batch=8, steps=5000, lr=1e-3, ema=0.998, frame_noise=0.75),
    "ref_flux": ReferenceSpec(
        name="ref_flux", family="flux", model_config="Flux",
        unet_config=_flux_config(192, 3, 1, 2), kind="image",
        width=data.IMAGE_SIZE, height=data.IMAGE_SIZE, length=1,
        prompts=("red circle", "blue square", "yellow triangle", "stripes", "checkerboard", "astronaut photo",
                 "cat photo", "flower photo"),
        batch=16, steps=2500, lr=1e-3, ema=0.998),
}


def reference_spec(name: str) -> ReferenceSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown reference model {name!r}; known: {', '.join(MODELS)}") from None


# --- text conditioning ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _word_vector(word: str, dim: int):
    import torch
    g = torch.Generator().manual_seed(zlib.crc32(f"reference-word:{word}:{dim}".encode()))
    return torch.randn(dim, generator=g)


def _words(caption: str) -> list[str]:
    words = caption.split()
    unknown = [w for w in words if w not in data.VOCABULARY]
    if unknown:
        raise ValueError(f"unknown words {unknown} in caption {caption!r}; the reference models know: "
                         f"{', '.join(data.VOCABULARY)}")
    if len(words) > TEXT_TOKENS:
        raise ValueError(f"caption {caption!r} has {len(words)} words; at most {TEXT_TOKENS}")
    return words


def embed_captions(captions: list[str], context_dim: int = 4096):
    """Captions -> (context (B, TEXT_TOKENS, context_dim), pooled (B, POOLED_DIM))."""
    import torch
    contexts, pooled = [], []
    for caption in captions:
        words = _words(caption)
        tokens = words + ["<pad>"] * (TEXT_TOKENS - len(words))
        contexts.append(torch.stack([_word_vector(w, context_dim) for w in tokens]))
        pooled.append(torch.stack([_word_vector(w, POOLED_DIM) for w in (words or ["<pad>"])]).mean(0))
    return torch.stack(contexts), torch.stack(pooled)


def caption(name: str, prompt: int | str) -> str:
    """A benchmark prompt by index into the model's ``prompts``, or a caption as it is."""
    spec = reference_spec(name)
    if isinstance(prompt, int):
        if not 0 <= prompt < len(spec.prompts):
            raise ValueError(f"{name} has prompts 0..{len(spec.prompts) - 1}, not {prompt}")
        return spec.prompts[prompt]
    return prompt


def make_conditioning(name: str, prompt: int | str = 0, batch: int = 1) -> list:
    """A ComfyUI CONDITIONING for a reference model; ``""`` is the negative (unconditional) prompt.

    ``prompt``: an index into ``MODELS[name].prompts`` or a caption over ``data.VOCABULARY``.
    """
    spec = reference_spec(name)
    fam = spec.family_spec
    context, pooled = embed_captions([caption(name, prompt)] * batch, fam.context_dim)
    extra = {"pooled_output": pooled} if fam.pooled_dim is not None else {}
    return [[context, extra]]


# --- latents --------------------------------------------------------------------------------

def latent_shape(name: str, batch: int = 1) -> tuple:
    spec = reference_spec(name)
    h, w = spec.height // autoencoder.PATCH, spec.width // autoencoder.PATCH
    if spec.kind == "video":
        return (batch, autoencoder.LATENT_CHANNELS, spec.length, h, w)
    return (batch, autoencoder.LATENT_CHANNELS, h, w)


def empty_latent(name: str, batch: int = 1) -> dict:
    """A LATENT of zeros at the size the model was trained at (what the stock nodes give at 4x)."""
    import torch
    return {"samples": torch.zeros(latent_shape(name, batch))}


def encode(name: str, pixels):
    """Pixels (B, 3, [T,] H, W) in [0, 1] -> the model's LATENT samples (see autoencoder.py)."""
    return autoencoder.encode(pixels, reference_spec(name).family_spec.latent_format)


def decode(name: str, latent):
    """LATENT samples -> pixels (B, 3, [T,] H, W), not clamped."""
    return autoencoder.decode(latent, reference_spec(name).family_spec.latent_format)


# --- weights --------------------------------------------------------------------------------

def fingerprint(name: str) -> str:
    """What the weights depend on; stored in the file's metadata."""
    spec = reference_spec(name)
    return json.dumps({"version": REFERENCE_VERSION, "name": name, "config": spec.unet_config,
                       "kind": spec.kind, "size": [spec.width, spec.height, spec.length], "batch": spec.batch,
                       "steps": spec.steps, "lr": spec.lr, "latent_gain": autoencoder.LATENT_GAIN,
                       "ema": spec.ema, "text_tokens": TEXT_TOKENS,
                       **({"video": {"directions": data.VIDEO_DIRECTIONS, "step": data.VIDEO_STEP,
                                     "frame_noise": spec.frame_noise}} if spec.kind == "video" else {})},
                      sort_keys=True, default=str)


def model_config(name: str):
    spec = reference_spec(name)
    return fixtures.model_config(spec.model_config, spec.unet_config)


def load_weights(name: str, path: Path | None = None) -> dict:
    """The trained weights (ComfyUI diffusion-model keys), upcast to float32."""
    import torch
    from safetensors.torch import load_file
    spec = reference_spec(name)
    path = Path(path or spec.path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights for {name} at {path}; train them with "
                                f"`python -m lab.reference.train --model {name}`")
    return {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}


def load_reference(name: str, path: Path | None = None, dtype=None):
    """A real ComfyUI ModelPatcher with the trained weights.

    ``ref_wan21`` goes through ComfyUI's own file loading (``comfy.sd.load_diffusion_model``,
    what UNETLoader calls); ``ref_flux`` is built in-process from ComfyUI's Flux classes.
    """
    spec = reference_spec(name)
    fixtures._comfy()
    if spec.loadable:
        import comfy.sd
        path = Path(path or spec.path)
        if not path.is_file():
            load_weights(name, path)  # raises the message that says how to make them
        options = {"dtype": dtype} if dtype is not None else {}
        return comfy.sd.load_diffusion_model(str(path), model_options=options)
    return fixtures.build_model(model_config(name), load_weights(name, path), dtype)


def write_reference(name: str, models_dir) -> Path:
    """Copy the file-loadable reference into ``models_dir/diffusion_models`` for a server.

    An identical file already there is left alone; a different file of that name is an error
    (it is not ours to overwrite).
    """
    spec = reference_spec(name)
    if not spec.loadable:
        raise ValueError(f"{name} is built in-process (AccelTestFluxLoader), it has no model file")
    folder = Path(models_dir) / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / spec.filename
    if target.exists():
        if target.read_bytes() != spec.path.read_bytes():
            raise FileExistsError(f"{target} exists and differs from {spec.path}; not overwriting it")
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(spec.path, tmp)
    os.replace(tmp, target)
    return target


def shapes(name: str) -> dict:
    """Key -> shape of the model ComfyUI builds from the spec (on the meta device, no memory)."""
    import torch
    config = model_config(name)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("meta"))
    return {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}


def parameter_count(name: str) -> int:
    return sum(math.prod(shape) for shape in shapes(name).values())
