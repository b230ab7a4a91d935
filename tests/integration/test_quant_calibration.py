"""Calibration on a real sampling run, SmoothQuant on outlier channels, and auto allocation."""
import pytest
import torch

from lab import fixtures
from lab.quant_checks import assert_unchanged, plans_for, sample, snapshot
from comfyui_accel.quant import auto, calibrate
from comfyui_accel.quant import model as qmodel


@pytest.fixture(scope="module")
def calibrated(comfy):
    """The tiny Wan with planted activation outliers, and its statistics over 4 steps."""
    model = fixtures.load_model("wan21", "tiny", outliers=True)
    before = snapshot(model)
    reference = sample(model, "wan21")
    plans = plans_for(model, "int8")
    layers = [p.path for p in plans if p.spec is not None]
    pos = fixtures.make_conditioning("wan21", "tiny", seed=1)
    neg = fixtures.make_conditioning("wan21", "tiny", seed=2)
    stats = calibrate.calibrate(model, layers, pos, neg, fixtures.empty_latent("wan21", "tiny"), steps=4, seed=0,
                                cfg=3.0, max_rows=64)
    return model, before, reference, plans, stats


def test_statistics_cover_every_step_and_leave_the_model_alone(calibrated):
    model, before, reference, plans, stats = calibrated
    assert set(stats) == {p.path for p in plans if p.spec is not None}
    for s in stats.values():
        assert sorted(s.step_absmax) == [0, 1, 2, 3]       # one model call per step (cond+uncond batched)
        assert s.sample().shape == (64, s.absmax.numel())
        assert s.absmax.min() > 0
    # the planted outlier channels show up where the fixture put them (FFN down projections)
    down = [s.outlier_ratio() for p, s in stats.items() if p.endswith("ffn.2")]
    other = [s.outlier_ratio() for p, s in stats.items() if p.endswith("self_attn.q")]
    assert min(down) > 5 and max(other) < min(down)
    assert_unchanged(model, before)
    assert torch.equal(sample(model, "wan21"), reference)  # no observer left in the input's view


def test_smoothing_lifts_the_outlier_layers(calibrated):
    model, _, reference, plans, stats = calibrated
    plain = qmodel.quantize_model(model, plans, stats=stats, smooth_alpha=0.0)
    smooth = qmodel.quantize_model(model, plans, stats=stats, smooth_alpha=0.5)
    by = {r.layer: r for r in plain.rows}
    for r in smooth.rows:
        if r.layer.endswith("ffn.2"):
            assert r.output_sqnr_db > by[r.layer].output_sqnr_db + 6
            assert "smoothed" in r.reason
    assert smooth.summary["worst layer output SQNR dB"] > plain.summary["worst layer output SQNR dB"]


def test_auto_budget_and_floor(calibrated):
    model, _, _, _, stats = calibrated
    base = plans_for(model, "auto")
    todo = {p.path for p in base if p.auto}
    bf16 = sum(2 * p.shape[0] * p.shape[1] for p in base if p.auto)
    table = auto.measure(model, base, ["int8", "w4a8", "int4"], 64, torch.float32, stats, 0.5)
    assert set(table) == todo and all(len(options) == 4 for options in table.values())
    plans = auto.assign(base, table, budget_fraction=0.4)
    result = qmodel.quantize_model(model, plans, stats=stats, smooth_alpha=0.5)
    chosen = [r for r in result.rows if r.layer in todo]
    assert sum(r.bytes_after for r in chosen) <= 0.4 * bf16
    assert "int8" in {r.format for r in chosen} and len({r.format for r in chosen}) >= 2
    assert all(r.reason.startswith("auto:") for r in chosen)
    # the measured sensitivity is what the quantized model then shows
    for r in chosen:
        measured = next(o for o in table[r.layer] if o.spec is not None and o.spec.format == r.format)
        assert r.output_sqnr_db == pytest.approx(measured.sqnr_db, abs=0.5)
    # a quality floor alone: every layer reaches it on the calibration data
    floor_plans = auto.assign(base, table, min_sqnr_db=30.0)
    assert all(next(o for o in table[p.path] if o.spec == p.spec).sqnr_db >= 30.0
               for p in floor_plans if p.path in todo)
    with pytest.raises(auto.BudgetError, match="the smallest needs"):
        auto.assign(base, table, budget_fraction=0.1)


def test_report_rows_carry_the_activation_statistics(calibrated):
    model, _, _, plans, stats = calibrated
    result = qmodel.quantize_model(model, plans, stats=stats)
    for r in result.rows:
        if r.layer in stats:
            assert r.outlier_ratio == pytest.approx(stats[r.layer].outlier_ratio())
            assert r.step_range_ratio >= 1.0
            values = list(stats[r.layer].step_absmax.values())
            assert r.step_range_ratio == pytest.approx(max(values) / min(values))


def test_a_lora_clone_sampled_after_calibration_gets_its_lora(calibrated):
    # regression: the calibration clone shared the input's patches uuid, so ComfyUI left the
    # original modules flagged as patched and the next clone's LoRA was silently not applied
    from lab.quant_checks import lora_for, with_lora
    from comfyui_accel.metrics import psnr
    model, _, reference, _, _ = calibrated
    lora_model = with_lora(model, lora_for(model, ["blocks.0.ffn.2"], rank=4, scale=0.5, seed=3))
    assert psnr(reference, sample(lora_model, "wan21")) < 55
