"""Sampling a fixture model in-process, the way KSampler / KSamplerAdvanced do it.

Used by tests and benchmarks that need a real sampling run (real guider, real sampler, real
wrappers) on the fixtures of ``lab.fixtures`` without a server.
"""
from __future__ import annotations


def sample(model, family: str, size: str = "tiny", steps: int = 10, seed: int = 0, cfg: float = 3.0,
           sampler: str = "euler", scheduler: str = "simple", batch: int = 1, tokens: tuple = (None, None),
           cond_seeds: tuple = (1, 2), latent=None, start_step=None, last_step=None,
           force_full_denoise: bool = False, disable_noise: bool = False, callback=None):
    """Denoise the family's empty latent (or ``latent``) with fixture conditioning.

    ``tokens`` sets the positive / negative context lengths (different lengths that do not
    batch make ComfyUI run cond and uncond as separate model calls); ``start_step``,
    ``last_step``, ``force_full_denoise`` and ``disable_noise`` are KSamplerAdvanced's.
    """
    import torch
    import comfy.sample
    from lab import fixtures
    pos = fixtures.make_conditioning(family, size, batch=batch, seed=cond_seeds[0], tokens=tokens[0])
    neg = fixtures.make_conditioning(family, size, batch=batch, seed=cond_seeds[1], tokens=tokens[1])
    if latent is None:
        latent = fixtures.empty_latent(family, size, batch=batch)["samples"]
    noise = torch.zeros_like(latent) if disable_noise else comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, seed=seed,
                               start_step=start_step, last_step=last_step, callback=callback,
                               force_full_denoise=force_full_denoise, disable_noise=disable_noise,
                               disable_pbar=True)
