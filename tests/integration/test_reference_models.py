"""The trained reference models in real ComfyUI: stock loading, sampling, and that training worked."""
import json

import numpy as np
import pytest
import torch

from lab import reference
from lab.reference import autoencoder
from lab.reference import data, samples, train
from lab.sampling import ksampler

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(comfy):
    return {name: reference.load_reference(name) for name in reference.MODELS}


@pytest.mark.parametrize("name", list(reference.MODELS))
def test_encode_decode_round_trip_through_the_family_latent_format(comfy, name):
    spec = reference.reference_spec(name)
    shape = (2, 3, spec.length, 16, 16) if spec.kind == "video" else (2, 3, 16, 16)
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    latent = reference.encode(name, pixels)
    assert (reference.decode(name, latent) - pixels).abs().max() < 1e-5
    # ComfyUI's own process_in (what KSampler applies) yields exactly the model-space vectors.
    import comfy.latent_formats
    fmt = getattr(comfy.latent_formats, spec.family_spec.latent_format)()
    assert torch.allclose(fmt.process_in(latent), autoencoder.to_model_space(pixels), atol=1e-5)


@pytest.mark.parametrize("name", list(reference.MODELS))
def test_committed_weights_are_small_fp16_and_match_the_spec(comfy, name):
    from safetensors import safe_open
    spec = reference.reference_spec(name)
    assert spec.path.stat().st_size < 8_000_000
    with safe_open(str(spec.path), framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    # Changing the spec (config, data size, schedule) without retraining makes this fail.
    assert json.loads(meta["accel_reference"]) == json.loads(reference.fingerprint(name))
    assert int(meta["accel_params"]) == reference.parameter_count(name)


def test_wan_reference_loads_through_the_stock_loader(comfy, tmp_path):
    import comfy.sd
    path = reference.write_reference("ref_wan21", tmp_path)
    assert path == tmp_path / "diffusion_models" / "accel_ref_wan21.safetensors"
    assert reference.write_reference("ref_wan21", tmp_path) == path          # identical file: left alone
    model = comfy.sd.load_diffusion_model(str(path))
    assert type(model.model).__name__ == "WAN21"
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    dm = model.model.diffusion_model
    assert (dm.dim, dm.num_heads, len(dm.blocks), dm.ffn_dim) == (256, 2, 3, 384)
    assert model.model.model_sampling.shift == 8.0
    loaded = reference.load_weights("ref_wan21")
    assert all(torch.equal(dm.state_dict()[k].float(), v) for k, v in loaded.items())
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        reference.write_reference("ref_wan21", tmp_path)
    with pytest.raises(ValueError, match="in-process"):
        reference.write_reference("ref_flux", tmp_path)


@pytest.mark.parametrize("name", list(reference.MODELS))
def test_a_few_sampling_steps_give_finite_pictures(comfy, models, name):
    import comfy.sample
    model = models[name]
    latent = reference.empty_latent(name)["samples"]
    noise = comfy.sample.prepare_noise(latent, 5)   # what the run starts from
    negative = reference.make_conditioning(name, "")
    out = ksampler(model, reference.make_conditioning(name, 0), negative, latent, 4, 4.0, seed=5)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert (out - noise).abs().mean() > 0.1           # it sampled, not returned the noise
    pixels = reference.decode(name, out)
    assert ((pixels > -0.25) & (pixels < 1.25)).float().mean() > 0.9


@pytest.mark.parametrize("name", list(reference.MODELS))
def test_one_sampler_step_makes_the_call_training_makes(comfy, models, name):
    # One euler step from sigma 1 to 0 returns the model's x0 prediction at sigma 1. Training
    # (train.flow_matching_loss) calls BaseModel.apply_model on model-space latents with the
    # embedded captions (per-frame levels: the next test); KSampler must hand the model the same
    # timestep, latent and conditioning.
    import comfy.latent_formats
    import comfy.sample
    spec = reference.reference_spec(name)
    model = models[name]
    latent = reference.empty_latent(name)["samples"]
    noise = comfy.sample.prepare_noise(latent, 7)   # what the run starts from
    negative = reference.make_conditioning(name, "")
    out = ksampler(model, reference.make_conditioning(name, 1), negative, latent, 1, 1.0, seed=7)
    context, pooled = reference.embed_captions([reference.caption(name, 1)], spec.family_spec.context_dim)
    extra = {"y": pooled} if spec.family_spec.pooled_dim is not None else {}
    with torch.no_grad():
        x0 = model.model.apply_model(noise, torch.ones(1), c_crossattn=context, **extra)
    fmt = getattr(comfy.latent_formats, spec.family_spec.latent_format)()
    assert x0.abs().mean() > 0.1
    assert (fmt.process_in(out) - x0).abs().max() < 1e-4


def test_per_frame_noise_levels_reach_each_frame(comfy, models):
    # Training noises most Wan clips with one level per frame (train.denoise with (B, T) sigmas).
    # Equal levels must be exactly the sampler's apply_model call, and a frame's own level must
    # act on that frame: a clean first frame changes the first frame's prediction most.
    base = models["ref_wan21"].model
    x = torch.randn(2, 16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context, _ = reference.embed_captions(["red circle moving right", ""])
    sigma = torch.tensor([0.7, 0.95])
    with torch.no_grad():
        sampler = base.apply_model(x, sigma, c_crossattn=context)
        per_frame = sigma[:, None].repeat(1, 4)
        assert (train.denoise(base, x, per_frame, context) - sampler).abs().max() < 1e-5
        per_frame[:, 0] = 0.05
        change = (train.denoise(base, x, per_frame, context) - sampler).abs().mean((0, 1, 3, 4))
    assert change[0] > 3 * change[1:].max(), change


@pytest.mark.parametrize("name", list(reference.MODELS))
def test_trained_model_denoises_held_out_data_better_than_untrained(comfy, models, name):
    trained = train.heldout_loss(models[name], name, n=8, rounds=1)
    untrained = train.heldout_loss(train.untrained_model(name), name, n=8, rounds=1)
    assert trained < 0.7 * untrained, (trained, untrained)


@pytest.mark.parametrize("name", list(reference.MODELS))
def test_the_caption_helps_the_trained_model(comfy, models, name):
    # Same pictures, noise and sigmas; with the captions dropped the loss must be higher.
    pixels, captions = train.batch(name, train.HELDOUT_SEED, 0, 8)
    losses = []
    for caps in (captions, [""] * len(captions)):
        g = train.data.generator(train.HELDOUT_SEED, "noise:0")
        with torch.no_grad():
            losses.append(float(train.flow_matching_loss(models[name].model, name, pixels, caps, g)))
    assert losses[0] < losses[1], losses


def test_fixture_nodes_serve_the_reference_models(comfy):
    from lab import fixture_nodes
    model = fixture_nodes.AccelTestFluxLoader.execute("ref_flux", "tiny", 0, False).result[0]
    assert type(model.model).__name__ == "Flux"
    assert model.model.diffusion_model.hidden_size == 192
    cond = fixture_nodes.AccelTestReferencePrompt.execute("ref_flux", "blue square", 2).result[0]
    assert cond[0][0].shape == (2, reference.TEXT_TOKENS, 4096) and cond[0][1]["pooled_output"].shape == (2, 768)
    assert "purple" in fixture_nodes.AccelTestReferencePrompt.validate_inputs("ref_flux", "purple square", 1)
    assert fixture_nodes.AccelTestReferencePrompt.validate_inputs("ref_flux", "blue square", 1) is True
    latent = reference.encode("ref_wan21", torch.rand(1, 3, 6, 32, 32))
    image = fixture_nodes.AccelTestPatchDecode.execute({"samples": latent}, "ref_wan21").result[0]
    assert image.shape == (6, 32, 32, 3)
    assert torch.allclose(image, reference.decode("ref_wan21", latent)[0].permute(1, 2, 3, 0).clamp(0, 1), atol=1e-6)


def _near(pictures: torch.Tensor, colour_name: str, tolerance: float = 0.25) -> torch.Tensor:
    """Mask (N, [T,] H, W) of pixels within ``tolerance`` of a caption colour in every channel."""
    colour = torch.tensor(data.COLOURS[colour_name]).view(3, *[1] * (pictures.ndim - 2))
    return (pictures - colour).abs().amax(1) < tolerance


def _largest_blob_share(mask: torch.Tensor) -> float:
    """Share of a 2-D mask's pixels in its largest 4-connected region."""
    from scipy import ndimage
    labels, count = ndimage.label(mask.numpy())
    if count == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max() / mask.sum())


@pytest.mark.parametrize("prompt", ["red circle", "blue square", "yellow triangle"])
def test_flux_samples_show_one_shape_in_the_caption_colour(comfy, models, prompt):
    # What the data look like: one solid shape covering 3-35% of the picture. Block noise in
    # the right colours (what undertrained weights made) scatters the colour over many blobs.
    pictures = samples.sample("ref_flux", prompt, range(4), models["ref_flux"])
    for picture in _near(pictures, prompt.split()[0]):
        assert 0.02 < picture.float().mean() < 0.5, picture.float().mean()
        assert _largest_blob_share(picture) > 0.8


def test_wan_samples_move_the_shape_the_way_the_caption_says(comfy, models):
    videos = samples.sample("ref_wan21", "red circle moving right", range(2), models["ref_wan21"])
    for video in _near(videos, "red"):                                       # (T, H, W)
        assert (video.float().mean((1, 2)) > 0.02).all()
        assert all(_largest_blob_share(frame) > 0.8 for frame in video)
        xs = torch.arange(video.shape[-1], dtype=torch.float32)
        centre_x = (video.float() * xs).sum((1, 2)) / video.float().sum((1, 2))
        assert centre_x[-1] - centre_x[0] > 3, centre_x                         # moved right, pixels
