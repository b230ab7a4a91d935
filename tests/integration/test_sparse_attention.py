"""Sparse attention on real ComfyUI models (tiny fixtures), real ModelPatcher and samplers."""
import copy

import pytest
import torch

from lab import fixtures
from lab import sampling

pytestmark = pytest.mark.integration

FAMILIES = ["wan21", "hunyuan_video", "ltxv", "flux"]


@pytest.fixture(scope="module")
def models(comfy):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = fixtures.load_model(family, "tiny")
        return cache[family]
    return get


@pytest.fixture(scope="module")
def wan_dense(models):
    return sample(models("wan21"), "wan21", steps=2)


def sample(model, family, steps=1, seed=0, latent=None, cfg=2.0):
    return sampling.sample(model, family, steps=steps, seed=seed, cfg=cfg, latent=latent)


def patched(model, **config):
    from comfyui_accel.attention.sparse import SparseConfig, apply_sparse_attention
    settings = dict(block_size=16, min_tokens=0, dense_steps=0, dense_first_layers=0, probe_rows=16)
    settings.update(config)
    return apply_sparse_attention(model, SparseConfig(**settings))


def options_snapshot(model):
    return (copy.copy(model.model_options["transformer_options"]),
            {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()})


# Grid (frames, height, width in tokens), where it starts and the attention sequence length of
# each tiny fixture at its default size, worked out from the model code: Flux puts its 32 text
# tokens first, HunyuanVideo its text last up to ComfyUI 0.3.75 (its blocks say
# ``flipped_img_txt``) and first since, Wan and LTX-Video attend over video tokens only.
def hunyuan_image_first(model) -> bool:
    return getattr(model.model.diffusion_model.double_blocks[0], "flipped_img_txt", False)


LAYOUTS = {
    "wan21": "3x8x8 grid tokens at 0..192 of 192",
    "hunyuan_video": {True: "3x8x8 grid tokens at 0..192 of 224", False: "3x8x8 grid tokens at 32..224 of 224"},
    "ltxv": "2x4x4 grid tokens at 0..32 of 32",
    "flux": "1x8x8 grid tokens at 32..96 of 96",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_density_one_is_the_dense_model_and_the_input_model_is_untouched(models, family):
    model = models(family)
    before = options_snapshot(model)
    dense = sample(model, family)
    clone, patch = patched(model, density=1.0, policy="radial")
    assert clone is not model and options_snapshot(model) == before
    assert clone.model_options["transformer_options"]["optimized_attention_override"] is patch
    out = sample(clone, family)
    summary = patch.last_report["summary"]
    expected = LAYOUTS[family]
    if isinstance(expected, dict):
        expected = expected[hunyuan_image_first(model)]
    assert expected in summary["layout"]
    assert summary["sparse_calls"] > 0 and summary["mean_density"] == 1.0
    assert "error" not in summary["dense_reasons"]
    assert torch.allclose(out, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())
    assert torch.equal(sample(model, family), dense)   # the original still samples as before


@pytest.mark.parametrize("policy", ["radial", "sliding_tile", "svg", "draft"])
def test_policies_sparsify_wan_and_report_per_layer_and_head(models, wan_dense, policy):
    model = models("wan21")
    dense = wan_dense
    clone, patch = patched(model, policy=policy, density=0.34, dense_steps=1, dense_first_layers=1)
    out = sample(clone, "wan21", steps=2)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)
    report = patch.last_report
    s = report["summary"]
    # 2 steps x CFG batch in one call x 4 layers: step 0 and layer 0 dense, layers 1..3 of step 1 sparse.
    assert s["sparse_calls"] == 3 and s["dense_reasons"]["warmup"] == 4 and s["dense_reasons"]["dense_layer"] == 1
    assert {(r["layer"], r["head"]) for r in report["rows"]} == {(layer, h) for layer in (1, 2, 3) for h in (0, 1)}
    assert all(abs(r["density"] - 4 / 12) < 1e-6 for r in report["rows"])          # 4 of 12 blocks
    assert all(0 < r["rel_error"] < 1 for r in report["rows"])
    assert all(r["pattern"] in (("spatial", "temporal") if policy == "svg" else ("-",)) for r in report["rows"])


def text_rows_checker(family, text_tokens, grid_first):
    """An override installed after ours: runs the chain, then checks every joint-attention call's
    text rows against exact dense attention."""
    checked = []

    def outer(previous):
        def override(func, q, k, v, heads, **kw):
            out = previous(func, q, k, v, heads, **kw)
            if q.shape == k.shape and q.shape[2] > text_tokens and kw.get("mask") is None:
                dense = func(q, k, v, heads, **{**kw, "skip_output_reshape": True})
                got = out
                if not kw.get("skip_output_reshape"):
                    got = out.view(dense.shape[0], -1, heads, dense.shape[3]).transpose(1, 2)
                rows = slice(-text_tokens, None) if grid_first else slice(0, text_tokens)
                checked.append(torch.allclose(got[:, :, rows], dense[:, :, rows], atol=1e-5))
            return out
        return override
    return outer, checked


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_text_tokens_attend_densely(models, family):
    grid_first = family == "hunyuan_video" and hunyuan_image_first(models(family))
    clone, patch = patched(models(family), policy="sliding_tile", density=0.25)
    outer, checked = text_rows_checker(family, fixtures.size_spec(family, "tiny").context_tokens, grid_first)
    options = clone.model_options["transformer_options"]
    options["optimized_attention_override"] = outer(options["optimized_attention_override"])
    sample(clone, family)
    assert patch.last_report["summary"]["sparse_calls"] > 0
    assert checked and all(checked)


def test_an_existing_override_is_chained(models):
    model = models("wan21").clone()
    calls = []

    def counting(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)
    model.model_options["transformer_options"]["optimized_attention_override"] = counting
    dense = sample(model, "wan21")
    n_dense = len(calls)
    calls.clear()
    clone, patch = patched(model, policy="radial", density=1.0)
    out = sample(clone, "wan21")
    assert patch.previous is counting
    # Cross-attention (and every other dense call) still goes through the earlier override.
    assert len(calls) == n_dense - patch.last_report["summary"]["sparse_calls"] > 0
    assert torch.allclose(out, dense, atol=1e-4 * dense.abs().max().item())


def test_retention_and_repeated_runs_do_not_leak_state(models):
    clone, patch = patched(models("wan21"), policy="draft", density=0.34, dense_steps=1, retention=True)
    first = sample(clone, "wan21", steps=2, seed=3)
    again = sample(clone, "wan21", steps=2, seed=3)
    assert torch.equal(first, again)   # nothing carried from one run into the next
    assert patch.last_report["summary"]["sparse_calls"] > 0
    assert not patch.last_report["notices"] or not any("Re-ttention" in n for n in patch.last_report["notices"])
    assert patch.run_key not in clone.model_options["transformer_options"]   # the run lived in the guider's copy


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unets_attend_over_the_latent_grid_at_each_level(comfy, family):
    # A UNet level attends over the latent grid at its own resolution: SD1.5's top level (the 8x8
    # latent itself), SDXL's second (its 16x16 latent halved; its top level has no attention).
    model = fixtures.load_model(family, "tiny")
    dense = sample(model, family)
    clone, patch = patched(model, density=1.0)
    out = sample(clone, family)
    summary = patch.last_report["summary"]
    assert "unet: 1x8x8 grid tokens at 0..64 of 64" in summary["layout"]
    assert summary["sparse_calls"] > 0 and "error" not in summary["dense_reasons"]
    assert torch.allclose(out, dense, atol=1e-4 * dense.abs().max().item())


def test_nodes_patch_and_report(models, tmp_path, monkeypatch):
    import folder_paths
    from comfyui_accel.nodes.attention import AccelSparseAttention, AccelSparseAttentionReport
    from comfyui_accel.nodes.common import AccelInputError
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    model = models("wan21")
    args = dict(policy="svg", density=0.5, block_size=16, top_p=0.9, dense_steps=0, dense_first_layers=0,
                dense_last_layers=1, min_tokens=0, retention=False, probe_rows=16, save_report=True)
    clone = AccelSparseAttention.execute(model=model, **args).result[0]
    with pytest.raises(AccelInputError, match="Sparse Attention.*'latent'"):
        AccelSparseAttentionReport.execute(model=clone, latent={"samples": torch.zeros(1)})
    latent = sample(clone, "wan21")
    text, images = AccelSparseAttentionReport.execute(model=clone, latent={"samples": latent}).result
    assert "Sparse attention report" in text and "mean_density" in text
    assert "temporal" in text or "spatial" in text
    assert images.shape[0] == 2 and images.shape[-1] == 3
    saved = list((tmp_path / "accel_sparse_attention").glob("*.json"))
    assert len(saved) == 1
    with pytest.raises(AccelInputError, match="'density'"):
        AccelSparseAttention.execute(model=model, **{**args, "density": 0.0})
    with pytest.raises(AccelInputError, match="carries no Sparse Attention patch"):
        AccelSparseAttentionReport.execute(model=model, latent={"samples": latent})
