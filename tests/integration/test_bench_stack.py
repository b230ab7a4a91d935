"""bench_stack's quick path on the trained Flux reference model: every row well formed, the
stack built from our nodes and ComfyUI's peers, pictures and report sections written, and the
unaccelerated model left as it was."""
import math

import pytest
import torch
from PIL import Image

from lab.bench import bench_stack, run as bench_run


@pytest.fixture(scope="module")
def stack(quick_bench):
    return quick_bench(bench_stack, steps=10)


def test_every_row_is_well_formed(stack):
    _, _, records, _ = stack
    rows = [r for r in records if r["name"] == "stack"]
    assert rows
    for r in rows:
        for key in bench_run.RECORD_KEYS:
            assert key in r, key
        assert r["speedup"] > 0 and r["time_s"] > 0
        assert r["psnr_db"] > 0 and -1 <= r["ssim"] <= 1
        assert r["weight_bytes"] > 0 and r["weight_bytes_ratio"] > 0
        assert isinstance(r["bound"], str) and r["bound"]
    by = {r["setting"]: r for r in rows}
    # Quantization shrinks the weights; caches and attention leave them alone.
    assert by["int8"]["weight_bytes_ratio"] > 1.5 and by["int4"]["weight_bytes_ratio"] > by["int8"]["weight_bytes_ratio"]
    for r in rows:
        if r["technique"] in ("TeaCache", "TaylorSeer", "Forecast Cache", "Sparse Attention", "ComfyUI attention"):
            assert r["weight_bytes_ratio"] == pytest.approx(1.0)
    # The caches skipped evaluations and say so in the bound.
    for r in rows:
        if r["technique"] in ("TeaCache", "TaylorSeer", "Forecast Cache"):
            assert r["computed"] < r["evaluations"] and "steps" in r["bound"]
    techniques = {r["technique"] for r in rows}
    assert {"Quantize Model", "SVD Low-Rank Branch", "TeaCache", "TaylorSeer", "Forecast Cache", "Sparse Attention", "Stacked",
            "EasyCache (ComfyUI)",
            "LazyCache (ComfyUI)", "ComfyUI weight dtype", "ComfyUI attention"} <= techniques
    # ComfyUI's SDPA backend computes the same attention as its default: the same picture.
    assert by["pytorch"]["psnr_db"] > 60


def test_cache_quant_rows_compare_against_the_sum(stack):
    _, _, records, _ = stack
    inter = [r for r in records if r["name"] == "cache x quant"]
    assert {r["variant"] for r in inter} >= {"int8 + TeaCache 2x calibrated on fp32",
                                             "int8 + TeaCache 2x calibrated on int8 (remedy)"}
    for r in inter:
        assert r["mse_ratio"] is None or r["mse_ratio"] > 0
        # Independent errors add: the additive prediction is below both parts alone.
        assert r["psnr_if_additive"] <= min(r["psnr_quant_alone"], r["psnr_cache_alone"]) + 1e-9


def test_pictures_and_report_sections(stack):
    _, _, records, out = stack
    pngs = sorted(out.glob("*.png"))
    assert {p.name.split("_ref")[0] for p in pngs} == {"stack_speed_psnr", "stack_outputs"}
    for png in pngs:
        with Image.open(png) as img:
            assert img.width > 100 and img.height > 100
    images = [p.name for p in pngs]
    md = bench_stack.markdown(records, images)
    readme = bench_stack.readme(records, images)
    for r in records:
        if r["name"] == "stack" and r["group"] != "interaction":
            assert r["setting"] in md and r["variant"] in readme
    assert all(f"]({name})" in md for name in images)


def test_the_unaccelerated_model_is_left_alone(stack):
    subject, before, _, _ = stack
    assert not subject.model.object_patches
    assert "optimized_attention_override" not in subject.model.model_options["transformer_options"]
    after = subject.sample(subject.model)
    assert torch.equal(before, after)
    assert math.isfinite(float(after.abs().max()))
