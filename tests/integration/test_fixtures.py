"""Model fixtures against real ComfyUI: stock detection and loading, sampling, determinism."""
import hashlib

import pytest
import torch

from lab import fixtures
from lab import sampling

pytestmark = pytest.mark.integration

FILE_FAMILIES = [name for name, spec in fixtures.FAMILIES.items() if spec.loadable]
IN_PROCESS_FAMILIES = [name for name, spec in fixtures.FAMILIES.items() if not spec.loadable]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, comfy):
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("family", FILE_FAMILIES)
def test_file_loads_through_the_stock_loader(comfy, models_dir, family):
    import comfy.sd
    spec = fixtures.FAMILIES[family]
    info = fixtures.write_fixture(family, "tiny", models_dir)
    assert info.path == models_dir / "diffusion_models" / info.filename
    assert info.loader_node == "UNETLoader"

    model = comfy.sd.load_diffusion_model(str(info.path))
    assert type(model.model).__name__ == spec.model_class
    assert type(model.model.model_config).__name__ == spec.model_config
    assert model.model.latent_format.latent_channels == spec.latent_channels
    # Every tensor in the file is used and every model weight comes from the file.
    from safetensors import safe_open
    with safe_open(str(info.path), framework="pt") as f:
        file_keys = set(f.keys())
    assert file_keys == set(model.model.diffusion_model.state_dict())
    assert info.params == sum(p.numel() for p in model.model.diffusion_model.state_dict().values())


@pytest.mark.parametrize("family", IN_PROCESS_FAMILIES)
def test_in_process_families_are_what_stock_detection_builds_where_it_accepts_them(comfy, family):
    # Why these are built in-process: 0.3.75's detection fixes their width (flux, lumina2: the
    # class refuses the shapes; sdxl: no config matches). Newer detection derives Flux's heads
    # from the width and accepts the tiny file; then it must build the very model we build.
    import comfy.sd
    sd = fixtures.state_dict(family, "tiny")
    try:
        model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    except Exception:
        model = None
    if model is not None:
        ours = fixtures.load_model(family, "tiny").model
        assert type(model.model) is type(ours) and model.model.diffusion_model.params == ours.diffusion_model.params
        theirs = model.model.diffusion_model.state_dict()
        assert set(theirs) == set(sd) and all(torch.equal(theirs[k], sd[k]) for k in sd)
    assert fixtures.write_fixture(family, "tiny", "/nonexistent").path is None


@pytest.mark.parametrize("family", list(fixtures.FAMILIES))
def test_a_short_sampling_run_gives_a_finite_latent_of_the_right_shape(comfy, models_dir, family):
    import comfy.sample
    import comfy.sd
    spec = fixtures.FAMILIES[family]
    if spec.loadable:
        model = comfy.sd.load_diffusion_model(str(fixtures.write_fixture(family, "tiny", models_dir).path))
    else:
        model = fixtures.load_model(family, "tiny")
    assert type(model.model).__name__ == spec.model_class
    info = fixtures.fixture_info(family, "tiny")
    latent = fixtures.empty_latent(family, "tiny")["samples"]
    assert tuple(latent.shape) == info.latent_shape
    noise = comfy.sample.prepare_noise(latent, 7)   # what the run starts from
    out = sampling.sample(model, family, steps=3, seed=7, cfg=2.0, latent=latent)
    assert tuple(out.shape) == info.latent_shape
    assert torch.isfinite(out).all()
    assert (out - noise).abs().mean() > 1e-2
    assert out.std() > 1e-3


def test_in_process_load_matches_the_file(comfy, models_dir):
    import comfy.sd
    from_file = comfy.sd.load_diffusion_model(str(fixtures.write_fixture("wan21", "tiny", models_dir).path))
    built = fixtures.load_model("wan21", "tiny")
    a, b = from_file.model.diffusion_model.state_dict(), built.model.diffusion_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FILE_FAMILIES)
def test_same_seed_same_bytes_other_seed_other_weights(comfy, models_dir, tmp_path, family):
    first = fixtures.write_fixture(family, "tiny", models_dir)
    second = fixtures.write_fixture(family, "tiny", tmp_path)
    assert _sha(first.path) == _sha(second.path)
    assert fixtures.fixture_filename(family, "tiny", seed=1) != first.filename
    from safetensors.torch import load_file
    a, b = load_file(str(first.path)), fixtures.state_dict(family, "tiny", seed=1)
    assert a.keys() == b.keys()
    assert not any(torch.equal(a[k], b[k]) for k in a if a[k].numel() > 16 and not k.endswith("pos_embed"))


@pytest.mark.parametrize("family", IN_PROCESS_FAMILIES)
def test_in_process_families_are_deterministic(comfy, family):
    a, b = fixtures.state_dict(family, "tiny"), fixtures.state_dict(family, "tiny")
    c = fixtures.state_dict(family, "tiny", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 16)


def test_an_identical_file_is_not_rewritten(comfy, tmp_path):
    info = fixtures.write_fixture("wan21", "tiny", tmp_path)
    before = info.path.stat().st_mtime_ns
    again = fixtures.write_fixture("wan21", "tiny", tmp_path)
    assert again.path.stat().st_mtime_ns == before
    assert again.params == info.params


def test_outlier_fixture_loads_and_differs(comfy, tmp_path):
    import comfy.sd
    plain = fixtures.write_fixture("wan21", "tiny", tmp_path)
    spiky = fixtures.write_fixture("wan21", "tiny", tmp_path, outliers=True)
    assert spiky.filename != plain.filename
    model = comfy.sd.load_diffusion_model(str(spiky.path))
    w = model.model.diffusion_model.blocks[0].ffn[2].weight
    # The planted channels show as columns far smaller than the rest in the down projection.
    col = w.abs().mean(0)
    assert col.min() < col.median() / 1.5


def test_fixture_nodes_run_in_process(comfy):
    from lab import fixture_nodes
    cond = fixture_nodes.AccelTestConditioning.execute("flux", "tiny", 0, 2, 0).result[0]
    assert cond[0][0].shape == (2, 32, 4096) and cond[0][1]["pooled_output"].shape == (2, 768)
    latent = fixture_nodes.AccelTestEmptyLatent.execute("wan22_5b", 256, 256, 9, 1).result[0]
    assert tuple(latent["samples"].shape) == (1, 48, 3, 16, 16)
    model = fixture_nodes.AccelTestFluxLoader.execute("flux", "tiny", 0, False).result[0]
    assert type(model.model).__name__ == "Flux"
