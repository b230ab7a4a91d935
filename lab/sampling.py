"""Sampling in-process the way KSampler / KSamplerAdvanced do it: ComfyUI's noise for the seed
(``comfy.sample.prepare_noise``), then its real guider, sampler and wrappers (``comfy.sample.sample``).

The one home of that sequence for the lab and the tests: ``ksampler`` on any conditioning and
latent, ``sample`` on the fixtures of ``lab.fixtures``, and ``Subject``: a model with the
conditioning, latent and settings the benchmarks sample it with every time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

SEED = 0
COUNT_KEY = "lab.sampling.count"


def ksampler(model, positive, negative, latent, steps: int, cfg: float, seed: int = 0, sampler: str = "euler",
             scheduler: str = "simple", fix_empty_latent: bool = False, disable_noise: bool = False, **advanced):
    """The denoised latent of one run: KSampler's noise for ``seed`` (none with ``disable_noise``,
    as KSamplerAdvanced's add_noise "disable"), without autograd, no progress bar.

    ``fix_empty_latent``: resize an empty latent to the model's channels, as KSampler does (off by
    default: a latent made for the model needs nothing). ``advanced``: ``comfy.sample.sample``'s
    start_step, last_step, force_full_denoise and callback.
    """
    import torch
    import comfy.sample
    if fix_empty_latent:
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = torch.zeros_like(latent) if disable_noise else comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   seed=seed, disable_noise=disable_noise, disable_pbar=True, **advanced)


def sample(model, family: str, size: str = "tiny", steps: int = 10, seed: int = 0, cfg: float = 3.0,
           batch: int = 1, tokens: tuple = (None, None), cond_seeds: tuple = (1, 2), latent=None, **options):
    """Denoise the family's empty latent (or ``latent``) with fixture conditioning.

    ``tokens`` sets the positive / negative context lengths (different lengths that do not
    batch make ComfyUI run cond and uncond as separate model calls); ``options``: ``ksampler``'s.
    """
    from lab import fixtures
    pos = fixtures.make_conditioning(family, size, batch=batch, seed=cond_seeds[0], tokens=tokens[0])
    neg = fixtures.make_conditioning(family, size, batch=batch, seed=cond_seeds[1], tokens=tokens[1])
    if latent is None:
        latent = fixtures.empty_latent(family, size, batch=batch)["samples"]
    return ksampler(model, pos, neg, latent, steps, cfg, seed, **options)


def count_calls(model):
    """(a clone that counts the calls reaching the diffusion model, after any cache wrapper; the counter)."""
    import comfy.patcher_extension
    m = model.clone()
    counter = {"calls": 0}

    def count(executor, *args, **kwargs):
        counter["calls"] += 1
        return executor(*args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, COUNT_KEY, count)
    return m, counter


@dataclasses.dataclass
class Subject:
    """A model plus everything needed to sample it the same way every time."""
    name: str                       # shown in the "model" column
    model: object                   # the unaccelerated ModelPatcher (fp32, as ComfyUI loads on a CPU)
    load: Callable[[object], object]  # dtype -> a freshly loaded ModelPatcher (ComfyUI's weight_dtype)
    positive: list
    negative: list
    latent: dict
    steps: int
    cfg: float
    decode: Callable | None         # latent -> pixels (B, 3, [T,] H, W) in [0, 1], or None: compare latents
    block_size: int                 # sparse attention block for this token count
    core_only: bool = False         # one setting per technique and no interaction rows (slow subjects)
    timing_rounds: int | None = None  # None: as many as fit the time budget

    def sample(self, model, **options):
        """``model`` sampled with this subject's settings and ``SEED``; ``options``: ``ksampler``'s."""
        return ksampler(model, self.positive, self.negative, self.latent["samples"], self.steps, self.cfg, SEED,
                        fix_empty_latent=True, **options)

    def picture(self, latent):
        return latent.float() if self.decode is None else self.decode(latent).float().clamp(0, 1)


def reference_subject(name: str, steps: int, prompt: int = 0) -> Subject:
    """A trained reference model (``lab.reference``) on one of its prompts, cfg 4, decoded to pixels."""
    from lab import reference
    tokens = math.prod(reference.latent_shape(name)[2:]) // 4    # patch 2x2 (Wan: 1x2x2)
    return Subject(
        name=f"{name}, {steps} steps", model=reference.load_reference(name),
        load=lambda dtype: reference.load_reference(name, dtype=dtype),
        positive=reference.make_conditioning(name, prompt), negative=reference.make_conditioning(name, ""),
        latent=reference.empty_latent(name), steps=steps, cfg=4.0, decode=lambda x: reference.decode(name, x),
        block_size=16 if tokens <= 128 else 32)


def fixture_subject(family: str, size: str, steps: int) -> Subject:
    """A random-weight fixture (``lab.fixtures``), cfg 3, compared on its final latent."""
    from lab import fixtures
    return Subject(
        name=f"{family} {size} fixture, {steps} steps", model=fixtures.load_model(family, size),
        load=lambda dtype: fixtures.load_model(family, size, dtype=dtype),
        positive=fixtures.make_conditioning(family, size, seed=1),
        negative=fixtures.make_conditioning(family, size, seed=2),
        latent=fixtures.empty_latent(family, size), steps=steps, cfg=3.0, decode=None, block_size=64, core_only=True)
