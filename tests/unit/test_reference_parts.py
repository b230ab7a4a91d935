"""The reference models' parts that need no ComfyUI: patch autoencoder, data, captions."""
import pytest
import torch

from lab import reference
from lab.reference import autoencoder
from lab.reference import data


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 6, 16, 24), (1, 3, 1, 2, 2)])
def test_patch_autoencoder_round_trips_random_pixels(shape):
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape)))
    latent = autoencoder.to_model_space(pixels)
    assert latent.shape == (shape[0], 16, *shape[2:-2], shape[-2] // 2, shape[-1] // 2)
    back = autoencoder.from_model_space(latent)
    assert back.shape == pixels.shape
    assert (back - pixels).abs().max() < 1e-5


def test_the_linear_maps_are_exact_inverses_built_from_orthonormal_parts():
    h = autoencoder.hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16, dtype=h.dtype))
    spread = autoencoder.spread()
    assert torch.allclose(spread.T @ spread, torch.eye(12, dtype=spread.dtype), atol=1e-12)
    cf = autoencoder.colour_frequency()
    assert torch.allclose(cf @ cf.T, torch.eye(12, dtype=cf.dtype), atol=1e-12)
    forward, inverse = autoencoder._maps(torch.device("cpu"))
    assert torch.allclose(inverse @ forward, torch.eye(12), atol=1e-5)
    # One gain for every coefficient: a latent error costs the same in pixels whichever
    # coefficient (layout or fine detail) it falls on.
    assert torch.allclose(forward.T @ forward, autoencoder.LATENT_GAIN ** 2 * torch.eye(12), atol=1e-4)
    # A latent outside the encoder's range decodes to its projection: encode(decode(z)) is idempotent.
    z = torch.randn(2, 16, 4, 4)
    once = autoencoder.to_model_space(autoencoder.from_model_space(z))
    assert torch.allclose(autoencoder.to_model_space(autoencoder.from_model_space(once)), once, atol=1e-5)


def test_patches_follow_pixel_unshuffle_order():
    x = torch.rand(2, 3, 8, 6)
    assert torch.equal(autoencoder._unshuffle(x), torch.nn.functional.pixel_unshuffle(x, 2))
    video = torch.rand(1, 3, 4, 8, 6)
    per_frame = torch.stack([torch.nn.functional.pixel_unshuffle(video[:, :, t], 2) for t in range(4)], 2)
    assert torch.equal(autoencoder._unshuffle(video), per_frame)
    with pytest.raises(ValueError, match="multiples of 2"):
        autoencoder.to_model_space(torch.rand(1, 3, 7, 8))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_training_data_has_about_unit_variance_latents(kind):
    # LATENT_GAIN is fixed; if the data drifts away from it, the latents stop being ~unit variance.
    pixels = data.image_batch(5, 0, 64)[0] if kind == "image" else data.video_batch(5, 0, 8)[0]
    per_channel = autoencoder.to_model_space(pixels).transpose(0, 1).flatten(1).std(dim=1)
    assert ((per_channel > 0.5) & (per_channel < 1.5)).all(), per_channel


def test_batches_are_a_function_of_seed_and_index():
    a, ca = data.image_batch(0, 3, 12)
    b, cb = data.image_batch(0, 3, 12)
    c, _ = data.image_batch(0, 4, 12)
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, c)
    assert a.shape == (12, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    v, cv = data.video_batch(1, 0, 4)
    assert v.shape == (4, 3, data.VIDEO_FRAMES, 32, 32) and v.min() >= 0 and v.max() <= 1
    assert torch.equal(v, data.video_batch(1, 0, 4)[0])
    # frames differ (the shape moves) and every caption is over the vocabulary
    assert (v[:, :, 0] - v[:, :, -1]).abs().amax(dim=(1, 2, 3)).min() > 0.1
    for caption in ca + cv:
        assert set(caption.split()) <= set(data.VOCABULARY)


def test_video_captions_tell_the_direction_the_shape_moves():
    pixels, captions = data.video_batch(2, 0, 24)
    for video, caption in zip(pixels, captions):
        colour = torch.tensor(data.COLOURS[caption.split()[0]])
        # pixels close to the caption's colour are the shape; follow their centroid
        mask = ((video - colour[:, None, None, None]).abs().amax(0) < 0.12).float()   # (T, H, W)
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        area = mask.sum((1, 2)).clamp(min=1)
        cx, cy = (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area
        dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        expected = data.DIRECTIONS[caption.split()[-1]]
        assert dx * expected[0] + dy * expected[1] > 4, (caption, dx, dy)


def test_captions_embed_deterministically_and_empty_is_all_padding():
    context, pooled = reference.embed_captions(["red circle", "red circle", ""])
    assert context.shape == (3, reference.TEXT_TOKENS, 4096) and pooled.shape == (3, reference.POOLED_DIM)
    assert torch.equal(context[0], context[1])
    assert not torch.equal(context[0], context[2])
    assert torch.equal(context[2][0], context[2][-1])          # "" is TEXT_TOKENS pad vectors
    assert torch.equal(context[0][2], context[2][0])           # words, then padding
    with pytest.raises(ValueError, match="purple"):
        reference.embed_captions(["purple circle"])
    with pytest.raises(ValueError, match="at most"):
        reference.embed_captions([" ".join(["red"] * (reference.TEXT_TOKENS + 1))])


def test_prompts_are_captions_the_models_were_trained_on():
    for name, spec in reference.MODELS.items():
        for prompt in spec.prompts:
            reference.embed_captions([prompt])   # raises on an unknown word
        assert reference.caption(name, 0) == spec.prompts[0]
        with pytest.raises(ValueError):
            reference.caption(name, len(spec.prompts))
    assert reference.latent_shape("ref_wan21") == (1, 16, 4, 16, 16)
    assert reference.latent_shape("ref_flux", batch=2) == (2, 16, 16, 16)
