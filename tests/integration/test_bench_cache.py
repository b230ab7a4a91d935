"""bench_cache's quick path on the trained Flux reference: every row well formed (speedup, bound,
fidelity), the peers comparable, the goals table and the plot written, the model left alone."""
import pytest
import torch
from PIL import Image

from lab.bench import bench_cache, run as bench_run


@pytest.fixture(scope="module")
def cache_bench(quick_bench):
    return quick_bench(bench_cache, steps=20)


def test_every_row_has_speed_bound_and_fidelity(cache_bench):
    subject, _, records, _ = cache_bench
    rows = [r for r in records if r["name"] == "cache"]
    assert {r["method"] for r in rows} >= {"Forecast Cache", "TeaCache", "TaylorSeer", "EasyCache (ComfyUI)",
                                           "LazyCache (ComfyUI)", "Fewer steps (ComfyUI)"}
    for r in rows:
        for key in bench_run.RECORD_KEYS:
            assert key in r, key
        assert r["speedup"] > 0 and r["bound_speedup"] >= 1 and 0 < r["computed"] <= r["evaluations"] == 20
        assert 0 < r["psnr_db"] and -1 <= r["ssim"] <= 1
    by = {r["variant"]: r for r in rows}
    assert by["Forecast Cache: 3x"]["computed"] == 6 and by["Fewer steps (ComfyUI): 7 steps"]["computed"] == 7
    # the peers, measured as users run them: every one of them skips and keeps a picture
    for kind in ("EasyCache (ComfyUI)", "LazyCache (ComfyUI)"):
        assert by[f"{kind}: threshold 0.2"]["bound_speedup"] > 1 and by[f"{kind}: threshold 0.2"]["psnr_db"] > 20
    limit = next(r for r in records if r["name"] == "cache limit")
    assert 15 < limit["psnr_db"] < 60   # 20 euler steps are not the converged solution


def test_goals_plot_and_sections(cache_bench):
    _, _, records, out = cache_bench
    goals = bench_cache.goals(records)
    assert {(g["reference"], g["speed"]) for g in goals} == {("ref_flux", 3.0), ("ref_flux", 4.0)}
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["cache_speed_psnr_ref_flux.png"]
    with Image.open(pngs[0]) as img:
        assert img.width > 500 and img.height > 300
    images = [p.name for p in pngs]
    md, readme = bench_cache.markdown(records, images), bench_cache.readme(records, images)
    assert "### Goals (issue 19)" in md and "](cache_speed_psnr_ref_flux.png)" in md and "Forecast Cache: 3x" in readme
    for r in records:
        if r["name"] == "cache":
            assert f"| {r['method']} | {r['setting']} |" in md


def test_curve_interpolation_and_dominance():
    ours = [dict(bound_speedup=2.0, speedup=1.8, psnr_db=30.0), dict(bound_speedup=4.0, speedup=3.0, psnr_db=20.0)]
    assert bench_cache.psnr_at(ours, 3.0) == pytest.approx(25.0)
    assert bench_cache.psnr_at(ours, 2.4, "speedup") == pytest.approx(25.0)
    assert bench_cache.psnr_at(ours, 5.0) is None
    records = [dict(r, name="cache", reference="x", steps=20, model="x", method="Forecast Cache", variant="o") for r in ours]
    records.append(dict(name="cache", reference="x", steps=20, model="x", method="P", variant="p", bound_speedup=3.0,
                        speedup=2.0, psnr_db=26.0))
    (point,) = bench_cache.dominance(records)
    assert point["ours_db"] == pytest.approx(25.0) and point["above"] is False


def test_the_model_is_left_alone(cache_bench):
    subject, before, _, _ = cache_bench
    assert torch.equal(subject.sample(subject.model), before)
