"""The parts of the model fixtures that need no ComfyUI: names, shapes, seeded tensors,
conditioning, and the activation-outlier planting."""
import torch

from lab import fixtures


def test_every_family_has_both_sizes_and_a_known_loader():
    for name, spec in fixtures.FAMILIES.items():
        assert spec.name == name
        assert set(fixtures.SIZES) <= set(spec.sizes) <= set(fixtures.SIZES + fixtures.BENCH_SIZES)
        assert spec.loader_node in ("UNETLoader", "AccelTestFluxLoader")


def test_file_names_tell_seed_and_outliers_apart():
    names = {fixtures.fixture_filename("wan21", "tiny"), fixtures.fixture_filename("wan21", "tiny", seed=1),
             fixtures.fixture_filename("wan21", "tiny", outliers=True), fixtures.fixture_filename("wan21", "medium")}
    assert len(names) == 4
    assert fixtures.fixture_filename("wan21", "tiny") == "accel_wan21_tiny.safetensors"


def test_latent_shapes_follow_the_stock_empty_latent_nodes():
    # EmptyHunyuanLatentVideo: 16 ch, (length - 1) // 4 + 1 frames, /8.
    assert fixtures.latent_shape("wan21", 128, 128, 9) == (1, 16, 3, 16, 16)
    # EmptyLTXVLatentVideo: 128 ch, (length - 1) // 8 + 1 frames, /32.
    assert fixtures.latent_shape("ltxv", 128, 128, 9, batch=2) == (2, 128, 2, 4, 4)
    # Wan 2.2 5B: 48 ch, /16.
    assert fixtures.latent_shape("wan22_5b", 256, 256, 9) == (1, 48, 3, 16, 16)
    assert fixtures.latent_shape("sd3", 128, 64) == (1, 16, 8, 16)
    assert fixtures.latent_shape("sd15", 64, 64) == (1, 4, 8, 8)


def test_init_is_deterministic_per_key_and_seed():
    a = fixtures._init_tensor("blocks.0.ffn.0.weight", (64, 32), seed=0)
    assert torch.equal(a, fixtures._init_tensor("blocks.0.ffn.0.weight", (64, 32), seed=0))
    assert not torch.equal(a, fixtures._init_tensor("blocks.0.ffn.0.weight", (64, 32), seed=1))
    assert not torch.equal(a, fixtures._init_tensor("blocks.1.ffn.0.weight", (64, 32), seed=0))
    # Unit-variance linear layers, nothing zero.
    big = fixtures._init_tensor("x.weight", (512, 256), seed=0)
    assert abs(big.std().item() * 256 ** 0.5 - 1.0) < 0.05
    for key, shape in [("x.bias", (64,)), ("norm.weight", (64,)), ("blocks.0.modulation", (1, 6, 64))]:
        t = fixtures._init_tensor(key, shape, seed=0)
        assert t.abs().min() > 0 and torch.isfinite(t).all()


def test_conditioning_shapes_and_determinism():
    cond = fixtures.make_conditioning("hunyuan_video", "tiny", batch=2, seed=3)
    context, extra = cond[0]
    assert context.shape == (2, 32, 4096)
    assert extra["pooled_output"].shape == (2, 768)
    assert extra["guidance"] == 6.0
    assert torch.equal(context, fixtures.make_conditioning("hunyuan_video", "tiny", batch=2, seed=3)[0][0])
    assert not torch.equal(context, fixtures.make_conditioning("hunyuan_video", "tiny", batch=2, seed=4)[0][0])
    assert fixtures.make_conditioning("sd15", "tiny")[0][0].shape == (1, 77, 768)
    assert fixtures.make_conditioning("sd3", "tiny")[0][1]["pooled_output"].shape == (1, 2048)
    assert fixtures.make_conditioning("ltxv", "tiny")[0][1]["attention_mask"].shape == (1, 32)
    assert fixtures.make_conditioning("wan21", "tiny")[0][1] == {}


def _mlp(sd, x, kind):
    if kind == "gelu":
        h = torch.nn.functional.gelu(x @ sd["b.ffn.0.weight"].T + sd["b.ffn.0.bias"], approximate="tanh")
    else:
        h = x @ sd["b.ffn.0.weight"].T + sd["b.ffn.0.bias"]
    return h, h @ sd["b.ffn.2.weight"].T


def test_outliers_make_a_few_large_channels_and_keep_the_block_output_bounded():
    spec = fixtures.FamilySpec(**{**fixtures.FAMILIES["wan21"].__dict__,
                            "ffn_pairs": ((r"^(b)\.ffn\.0\.weight$", r"\1.ffn.2.weight", "gelu"),)})
    sd = {"b.ffn.0.weight": torch.randn(1024, 256) / 16, "b.ffn.0.bias": torch.zeros(1024),
          "b.ffn.2.weight": torch.randn(256, 1024) / 32}
    x = torch.randn(512, 256)
    h0, y0 = _mlp(sd, x, "gelu")
    planted = fixtures._plant_outliers(sd, spec, seed=0)
    h1, y1 = _mlp(sd, x, "gelu")
    assert planted == 4
    channel = h1.abs().mean(0)
    ratio = channel.topk(planted).values / channel.median()
    assert (ratio > 8).all() and (ratio < 200).all()
    assert (h0.abs().mean(0).max() / h0.abs().mean(0).median()) < 8
    # The down projection's output moves by a bounded amount, not by the outlier factor.
    assert (y1 - y0).std() < 2 * y0.std()


def test_outliers_in_a_glu_value_half_preserve_the_function_exactly():
    spec = fixtures.FamilySpec(**{**fixtures.FAMILIES["lumina2"].__dict__,
                            "ffn_pairs": ((r"^(b)\.ffn\.0\.weight$", r"\1.ffn.2.weight", "linear"),)})
    sd = {"b.ffn.0.weight": torch.randn(512, 128) / 11, "b.ffn.0.bias": torch.randn(512) * 0.02,
          "b.ffn.2.weight": torch.randn(128, 512) / 22}
    x = torch.randn(64, 128, dtype=torch.float64)
    sd64 = {k: v.double() for k, v in sd.items()}
    _, y0 = _mlp(sd64, x, "linear")
    fixtures._plant_outliers(sd64, spec, seed=0)
    h1, y1 = _mlp(sd64, x, "linear")
    torch.testing.assert_close(y1, y0)
    channel = h1.abs().mean(0)
    assert channel.max() / channel.median() > 8
