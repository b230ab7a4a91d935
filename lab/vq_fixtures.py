"""Random VAE weights that ComfyUI's own VAE detection accepts, for the VQ tests.

- TAESD (``taesd_encoder.*`` / ``taesd_decoder.*`` keys, about 2.4M parameters): a real 4-channel,
  8x-downscaling image VAE that ``comfy.sd.VAE`` and the stock Load VAE node recognise.
- Stable Cascade Stage A (``vquantizer.codebook.weight``): ComfyUI builds it with its fixed full-size
  config (``StageA()``: 8192 codes, 384 hidden channels, about 18M parameters), so the stock loader
  only takes the full-size layout; the weights are random.

Shapes come from instantiating ComfyUI's classes on the meta device, so they follow the host's code.
"""
from __future__ import annotations

import torch


def _random_like(shapes: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in shapes.items():
        if not t.dtype.is_floating_point:
            sd[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif name.endswith("running_var"):
            sd[name] = torch.ones(t.shape)
        elif name.endswith("running_mean") or name.endswith(".bias") or name.endswith("gammas"):
            sd[name] = torch.zeros(t.shape)
        elif name.endswith("vae_scale"):
            sd[name] = torch.ones(t.shape)
        elif t.dim() == 0:
            sd[name] = torch.zeros(())
        else:
            fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
            sd[name] = torch.randn(t.shape, generator=g) / fan_in ** 0.5
    return sd


def taesd_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD
    with torch.device("meta"):
        shapes = TAESD().state_dict()
    return _random_like(shapes, seed)


def stage_a_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.ldm.cascade.stage_a import StageA
    with torch.device("meta"):
        shapes = StageA().state_dict()
    sd = _random_like(shapes, seed)
    # Codes spread like the encoder's normalised (BatchNorm) output, so images use many of them.
    g = torch.Generator().manual_seed(seed + 1)
    sd["vquantizer.codebook.weight"] = torch.randn(sd["vquantizer.codebook.weight"].shape, generator=g)
    return sd


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE [B, H, W, 3] in [0, 1] with smooth structure (gradients and blobs)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 8), max(2, width // 8), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return img.clamp(0, 1).permute(0, 2, 3, 1).contiguous()
