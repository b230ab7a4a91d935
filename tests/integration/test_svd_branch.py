"""SVD Low-Rank Branch in-process on a real ComfyUI model (tiny Wan 2.1 with activation outlier
channels): both orders around Quantize Model, LoRAs loaded with ComfyUI's own loader before and
after, save/load of a branched model, the input untouched, and clear errors."""
import pytest
import torch

from lab import fixtures
from lab.prompts import SVD_DEFAULTS
from lab.quant_checks import (assert_unchanged, full_and_lowvram_outputs, lora_for, quantize, sample,
                                                 snapshot, with_lora)
from comfyui_accel.metrics import psnr
from comfyui_accel.quant import checkpoint
from comfyui_accel.quant import model as qmodel

FFN_DOWN = "blocks.0.ffn.2"      # the layer whose input carries the planted outliers
ATTN = "blocks.1.self_attn.q"


def _calibration():
    return dict(positive=fixtures.make_conditioning("wan21", "tiny", seed=1),
                negative=fixtures.make_conditioning("wan21", "tiny", seed=2),
                latent=fixtures.empty_latent("wan21", "tiny"))


def run_node(model, calibrate=True, **inputs):
    from comfyui_accel.nodes.svd import AccelSVDLowRankBranch
    extra = _calibration() if calibrate else {}
    return AccelSVDLowRankBranch.execute(model, **{**SVD_DEFAULTS, "calibration_steps": 1, **inputs}, **extra).result


@pytest.fixture(scope="module")
def wan(comfy):
    model = fixtures.load_model("wan21", "tiny", outliers=True)
    before = snapshot(model)
    reference = sample(model, "wan21")
    branched, report, plot = run_node(model)
    return model, before, reference, branched, report, plot


def _module(model, path):
    return model.get_model_object(qmodel.PREFIX + path)


def test_node_outputs_and_input_untouched(wan):
    model, before, reference, branched, report, plot = wan
    assert report.startswith("SVD Low-Rank Branch") and FFN_DOWN in report and '"rows"' in report
    assert plot.dim() == 4 and plot.shape[-1] == 3
    branch = _module(branched, FFN_DOWN).accel_branch
    assert branch.rank == 32 and branch.smooth is not None
    # before quantization the branched model computes exactly what the input does
    assert psnr(reference, sample(branched, "wan21")) > 60
    # smoothing flattened the planted outlier channels
    row = next(r for r in _rows(report) if r["layer"] == FFN_DOWN)
    assert row["act_max_after"] < row["act_max_before"] / 5
    assert row["sqnr_branched_db"] > row["sqnr_plain_db"] + 2
    assert_unchanged(model, before)


def _rows(report):
    import json
    return json.loads(report.split("JSON:\n", 1)[1])["rows"]


def test_searched_alpha_is_no_worse_than_the_fixed_one_on_every_layer(wan):
    """alpha 0.5 is on the search grid and the report scores the same calibration rows, so the
    searched layer is at least as good as the fixed-alpha one, layer by layer."""
    model, before, _, branched, report, _ = wan
    searched, searched_report, _ = run_node(model, search_alpha=True)
    fixed = {r["layer"]: r["sqnr_branched_db"] for r in _rows(report)}
    rows = _rows(searched_report)
    assert len(rows) == len(fixed)
    assert all(r["sqnr_branched_db"] >= fixed[r["layer"]] - 1e-3 for r in rows)
    assert _module(searched, FFN_DOWN).accel_branch.smooth is not None
    assert_unchanged(model, before)


@pytest.mark.parametrize("fmt", ["w4a4", "nvfp4_w4a4", "w4a8"])
def test_svdquant_beats_plain_quantization_at_the_same_bits(wan, fmt):
    """The residual in each W4A4 layout (int4 group 64, nvfp4 group 16) and in W4A8."""
    model, before, reference, branched, _, _ = wan
    svdq = quantize(branched, fmt)
    plain = quantize(model, fmt)
    qw = _module(svdq.model, FFN_DOWN).weight
    assert qw.spec.format == fmt and qw.rank == 32 and qw.smooth is not None
    assert next(r.activations for r in svdq.rows if r.layer == FFN_DOWN) == qmodel.act_label(qw.spec) != "float"
    assert "low-rank branch r=32" in next(r.reason for r in svdq.rows if r.layer == FFN_DOWN)
    assert psnr(reference, sample(svdq.model, "wan21")) > psnr(reference, sample(plain.model, "wan21")) + 1
    assert_unchanged(model, before)


def test_svdquant_w4a4_beats_plain_w4a8_at_a_quarter_rank(wan):
    """With 4-bit activations against 8-bit ones, the branch must hold enough of the smoothed
    weights: at rank 64 (a quarter of this 256-wide model) NVFP4 W4A4 passes plain W4A8."""
    model, before, reference, _, _, _ = wan
    branched, _, _ = run_node(model, rank=64)
    svdq = quantize(branched, "nvfp4_w4a4")
    assert _module(svdq.model, FFN_DOWN).weight.rank == 64
    plain_w4a8 = psnr(reference, sample(quantize(model, "w4a8").model, "wan21"))
    assert psnr(reference, sample(svdq.model, "wan21")) > plain_w4a8 + 0.5
    assert_unchanged(model, before)


def test_after_quantization_fits_the_error_without_requantizing(wan):
    model, _, reference, _, _, _ = wan
    quantized = quantize(model, "int4").model
    patches_before = dict(quantized.object_patches)
    parts_before = {k: {n: t.clone() for n, t in m.weight.parts.items()} for k, m in patches_before.items()}
    fitted, report, _ = run_node(quantized, calibrate=False)
    old, new = _module(quantized, ATTN).weight, _module(fitted, ATTN).weight
    assert new.rank == 32 and torch.equal(new.parts["weight"], old.parts["weight"])
    assert "after quantization" in report
    assert psnr(reference, sample(fitted, "wan21")) > psnr(reference, sample(quantized, "wan21")) + 0.5
    # the quantized input keeps its own layers and packed weights
    assert quantized.object_patches == patches_before
    for key, module in quantized.object_patches.items():
        assert module.weight.parts.keys() == parts_before[key].keys()
        assert all(torch.equal(t, parts_before[key][n]) for n, t in module.weight.parts.items())


def test_lora_after_joins_the_branch(wan):
    import comfy.model_management
    model, _, _, branched, _, _ = wan
    svdq = quantize(branched, "w4a4").model
    base = _module(svdq, ATTN).weight
    deq = base.dequantize(torch.float32)
    lora = lora_for(model, [ATTN], rank=4, scale=0.5, seed=7)
    lora_model = with_lora(svdq, lora, strength=0.8)
    no_lora = sample(svdq, "wan21")
    comfy.model_management.load_models_gpu([lora_model], force_patch_weights=True)
    patched = _module(lora_model, ATTN).weight
    assert patched.rank == base.rank + 4
    for part in ("weight", "group_scale", "scale", "smooth"):
        assert torch.equal(patched.parts[part], base.parts[part])   # no requantization
    up, down = lora[f"diffusion_model.{ATTN}.lora_up.weight"], lora[f"diffusion_model.{ATTN}.lora_down.weight"]
    expected = deq + 0.8 * up @ down
    got = patched.dequantize(torch.float32)
    assert (got - expected).norm() < 0.01 * (0.8 * up @ down).norm()
    assert psnr(no_lora, sample(lora_model, "wan21")) < 60   # the LoRA changes the output
    # the quantized model without the LoRA is back to its own weights
    assert torch.equal(sample(svdq, "wan21"), no_lora)


def test_lora_before_is_merged_before_the_svd(wan):
    model, _, _, _, _, _ = wan
    lora_model = with_lora(model, lora_for(model, [ATTN, FFN_DOWN], rank=4, scale=0.5, seed=8))
    expected = sample(lora_model, "wan21")
    branched, _, _ = run_node(lora_model, calibrate=False, layer_overrides=f"^(?!{ATTN}$|{FFN_DOWN}$) = keep")
    assert set(branched.object_patches) == {qmodel.PREFIX + ATTN, qmodel.PREFIX + FFN_DOWN}
    assert not any(k.startswith(qmodel.PREFIX + ATTN) for k in branched.patches)
    assert psnr(expected, sample(branched, "wan21")) > 60
    merged = qmodel.float_weight(lora_model, ATTN)
    branch = _module(branched, ATTN).accel_branch
    assert torch.allclose(_module(branched, ATTN).weight.float(), merged)
    # the SVD saw the merged weight: its top directions are the merged weight's
    assert (merged - branch.weight()).norm() < merged.norm()


def test_save_and_load_a_branched_model(wan, tmp_path):
    _, _, _, branched, _, _ = wan
    svdq = quantize(branched, "w4a4").model
    expected = sample(svdq, "wan21")
    path = str(tmp_path / "svdq.safetensors")
    checkpoint.save_model(svdq, path)
    loaded = checkpoint.load_model(path)
    qw = _module(loaded, FFN_DOWN).weight
    assert qw.rank == 32 and qw.parts["lora_down"].dtype == torch.bfloat16
    assert torch.equal(qw.parts["lora_up"], _module(svdq, FFN_DOWN).weight.parts["lora_up"].cpu())
    assert torch.equal(sample(loaded, "wan21"), expected)


def test_bad_inputs_name_node_and_input(wan):
    from comfyui_accel.nodes.common import AccelInputError
    model, _, _, branched, _, _ = wan
    with pytest.raises(AccelInputError, match=r"SVD Low-Rank Branch [(]AccelSVDLowRankBranch[)]: input 'rank' is 136; allowed: 16 to 128"):
        run_node(model, calibrate=False, rank=136)
    # the output projection [64, 256], brought in by an override, holds at most rank 32
    with pytest.raises(AccelInputError, match=r"SVD Low-Rank Branch [(]AccelSVDLowRankBranch[)]: input 'rank' 64 is too large for layer "
                                              r"head.head \[64, 256\]: at most 32"):
        run_node(model, calibrate=False, rank=64, layer_overrides="^head[.]head$ = int8")
    with pytest.raises(AccelInputError, match=r"input 'model' already has a low-rank branch"):
        run_node(branched, calibrate=False)
    wrong = {f"diffusion_model.{ATTN}.lora_up.weight": torch.randn(192, 4),
             f"diffusion_model.{ATTN}.lora_down.weight": torch.randn(4, 256)}
    with pytest.raises(AccelInputError, match=r"input 'model' carries a LoRA .* on layer blocks.1.self_attn.q"):
        run_node(with_lora(model, wrong), calibrate=False)
    with pytest.raises(AccelInputError, match=r"input 'layer_overrides' selects no layer"):
        run_node(model, calibrate=False, layer_overrides=". = keep")


def test_lora_after_in_lowvram_mode_matches_full_load(wan):
    # low VRAM: ModelPatcher leaves a LowVramPatch in weight_function and the layer absorbs the
    # LoRA at each forward; the result must equal the full load's (where it is absorbed once)
    model, _, _, branched, _, _ = wan
    svdq = quantize(branched, "w4a4").model
    lora_model = with_lora(svdq, lora_for(model, [ATTN, FFN_DOWN], rank=4, scale=0.5, seed=9))
    full, partial, used_lowvram_full, used_lowvram = full_and_lowvram_outputs(lora_model, "blocks.1.self_attn.q")
    assert not used_lowvram_full and used_lowvram
    assert torch.allclose(full, partial, atol=1e-4)
