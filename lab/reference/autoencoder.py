"""A fixed, exactly invertible patch autoencoder standing in for a VAE.

A real VAE compresses 8x8 pixels (x4 frames for video) into 16 channels and is far
from invertible; we have no trained VAE and want to look at outputs as pictures and
measure PSNR/SSIM on decoded frames. So the "VAE" here is linear and fixed:

1. every 2x2 pixel patch of each frame (3 colours x 4 pixels = 12 numbers, centred at 0.5)
   becomes a 12-vector (pixel-unshuffle, channel order colour, row, column);
2. an orthonormal 12x12 transform turns it into colour-frequency coefficients: an
   orthonormal luma/chroma basis (R+G+B, R-B, R-2G+B) times the 2x2 Haar basis (mean,
   horizontal, vertical, diagonal difference);
3. all coefficients are multiplied by one fixed gain ``LATENT_GAIN`` (so the latent
   channels have about unit variance on the training data, as a real VAE's latents do).
   The gain is the same for every coefficient: the map stays orthonormal up to that one
   factor, so a squared error in the latent is the same squared error in pixels (times a
   constant) whichever coefficient it falls on, and the training loss weighs layout and
   fine detail as pixels do. (Whitening each coefficient towards unit variance instead would
   make the loss weigh the fine-detail coefficients 8-40x more than the layout, relative to
   their share of the pixel error.)
4. a fixed 16x12 matrix with orthonormal columns spreads the 12 coefficients over 16
   latent channels: the first 12 columns of the 16x16 Sylvester-Hadamard matrix divided by
   4 (entries +-1/4, exact; every channel mixes all coefficients, as in a real VAE latent);
5. ComfyUI's latent format of the model family is undone (``process_out``), so that when
   ComfyUI applies ``process_in`` before sampling the model sees exactly the vectors of
   step 4 (about unit variance).

Every step is a fixed linear map built from exact constants and square roots (no
decomposition whose output could differ between machines), and invertible.

Geometry: 16 channels at /2 spatial and no temporal compression. An image of HxW pixels
is a ``(B, 16, H/2, W/2)`` latent; a video of T frames is ``(B, 16, T, H/2, W/2)``. (Wan's
16 channels at /8 spatial and /4 temporal hold 16 numbers per 768 pixel values, which no
linear map can invert.) The stock empty-latent nodes assume the real VAEs' /8 (and 4k+1
frames): a 32x32 image is ``EmptySD3LatentImage`` at 128x128, a 4-frame 32x32 video is
``EmptyHunyuanLatentVideo`` at 128x128 with length 13.

``decode(encode(x)) == x`` to float precision; ``decode`` of an arbitrary latent reads only
the 12-dimensional subspace the encoder uses (it is the orthogonal projection onto it), and
never clamps, so sampled pixels may leave [0, 1] (clamp when saving a picture).
"""
from __future__ import annotations

import functools

import torch

PATCH = 2
PIXEL_CHANNELS = 3
LATENT_CHANNELS = 16
# One gain for all colour-frequency coefficients: the orthonormal coefficients of the
# training data (pixels in [0, 1], centred) have a total variance of about 0.76 over 12
# numbers per patch, i.e. 0.048 per latent channel once spread over 16; 4.5 brings that to
# about 1. A fixed constant: changing it changes the latent space the weights were trained in.
LATENT_GAIN = 4.5


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester-Hadamard matrix (entries +-1), n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"hadamard({n}): n must be a power of two")
    return h


def spread() -> torch.Tensor:
    """The 16x12 map from coefficients to latent channels; its columns are orthonormal."""
    patch_dim = PIXEL_CHANNELS * PATCH * PATCH
    return hadamard(LATENT_CHANNELS)[:, :patch_dim] / LATENT_CHANNELS ** 0.5


def colour_frequency() -> torch.Tensor:
    """The orthonormal 12x12 map from a patch vector to colour-frequency coefficients."""
    colour = torch.tensor([[1, 1, 1], [1, 0, -1], [1, -2, 1]], dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)
    haar = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
    return torch.kron(colour, haar)


@functools.lru_cache(maxsize=8)
def _maps(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(encode matrix 16x12, decode matrix 12x16) in float32; decode @ encode == I."""
    forward = spread() @ colour_frequency() * LATENT_GAIN
    inverse = colour_frequency().T @ spread().T / LATENT_GAIN
    return forward.float().to(device), inverse.float().to(device)


def _latent_format(latent_format):
    if isinstance(latent_format, str):
        import comfy.latent_formats  # ComfyUI is imported lazily: only the constants are needed
        return getattr(comfy.latent_formats, latent_format)()
    return latent_format


def _unshuffle(x: torch.Tensor) -> torch.Tensor:
    """(B, C, [T,] H, W) -> (B, C*4, [T,] H/2, W/2), channel index c*4 + dy*2 + dx."""
    *lead, h, w = x.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"pixel height and width must be multiples of {PATCH}, got {h}x{w}")
    b, c, mid = lead[0], lead[1], lead[2:]
    x = x.reshape(b, c, *mid, h // PATCH, PATCH, w // PATCH, PATCH)
    n = x.ndim
    # move the two patch axes (n-3, n-1) right after the channel axis
    order = [0, 1, n - 3, n - 1] + list(range(2, n - 4)) + [n - 4, n - 2]
    return x.permute(order).reshape(b, c * PATCH * PATCH, *mid, h // PATCH, w // PATCH)


def _shuffle(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_unshuffle``."""
    b, cp, *mid, h, w = x.shape
    c = cp // (PATCH * PATCH)
    x = x.reshape(b, c, PATCH, PATCH, *mid, h, w)
    n = x.ndim
    order = [0, 1] + list(range(4, n - 2)) + [n - 2, 2, n - 1, 3]
    return x.permute(order).reshape(b, c, *mid, h * PATCH, w * PATCH)


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, [T,] H, W) in [0, 1] -> the 16-channel vectors the diffusion model sees."""
    patches = _unshuffle(pixels.float() - 0.5)
    return torch.einsum("lp,bp...->bl...", _maps(pixels.device)[0], patches)


def from_model_space(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_model_space`` (orthogonal projection for latents outside its range)."""
    patches = torch.einsum("pl,bl...->bp...", _maps(latent.device)[1], latent.float())
    return _shuffle(patches) + 0.5


def encode(pixels: torch.Tensor, latent_format) -> torch.Tensor:
    """Pixels (B, 3, H, W) or (B, 3, T, H, W) in [0, 1] -> a latent as ComfyUI stores it.

    ``latent_format``: a ``comfy.latent_formats`` instance or its class name ("Wan21", "Flux").
    """
    return _latent_format(latent_format).process_out(to_model_space(pixels))


def decode(latent: torch.Tensor, latent_format) -> torch.Tensor:
    """A latent as ComfyUI stores it (a LATENT's ``samples``) -> pixels, not clamped."""
    return from_model_space(_latent_format(latent_format).process_in(latent.float()))


def to_comfy_image(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) or (B, 3, T, H, W) -> ComfyUI IMAGE (N, H, W, 3) in [0, 1], frames in order."""
    if pixels.ndim == 5:
        pixels = pixels.transpose(1, 2).flatten(0, 1)
    return pixels.clamp(0, 1).permute(0, 2, 3, 1).contiguous()
