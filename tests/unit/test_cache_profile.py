"""Calibration profiles from a recorded run (no ComfyUI): fit, replay, JSON."""
from __future__ import annotations

import math

import numpy as np
import pytest

from comfyui_accel.cache import rules
from comfyui_accel.cache.profile import CacheProfile, from_recording


def _recording(n_steps=20, seed=0):
    """A report shaped like cache.engine's for a recording run: every step computed, two streams."""
    rng = np.random.default_rng(seed)
    signal = [None] + list(rng.uniform(0.05, 0.3, n_steps - 1))
    rows = [{"eval": k, "step": k, "sigma": 1 - k / n_steps, "signal": s} for k, s in enumerate(signal)]
    points = []
    for stream in ("cond", "uncond"):
        for k, s in enumerate(signal[1:], start=1):
            x = s * (1.1 if stream == "uncond" else 1.0)
            points.append({"stream": stream, "eval": k, "step": k, "signal_change": x,
                           "output_change": 4 * x ** 2 + 0.5 * x + 0.01})
    return {"summary": {"steps": n_steps}, "rows": rows, "points": points}


def test_profile_fits_the_recorded_relation_and_reaches_the_target():
    report = _recording()
    p = from_recording(report, family="wan", model_class="WanModel", signal="modulated", target=2.0,
                       start=0.1, end=1.0, warmup_steps=1)
    grid = np.linspace(0.05, 0.33, 9)
    assert np.allclose(np.polyval(p.coefficients, grid), 4 * grid ** 2 + 0.5 * grid + 0.01, atol=1e-8)
    assert p.fit_r2 == pytest.approx(1.0)
    assert p.predicted_speedup >= 2.0 and len(p.replay) == 20
    # the replay is the rule on the lead stream's curve with the cache's forced steps
    forced = [rules.is_forced(k, 20, 0.1, 1.0, 1, True) for k in range(20)]
    assert p.replay == rules.simulate([r["signal"] for r in report["rows"]], forced,
                                      rules.Rescale(p.coefficients), p.threshold)
    assert all(p.replay[:2]) and p.replay[-1]   # steps before start=0.1 and the last step compute


def test_profile_json_round_trip():
    p = from_recording(_recording(), family="flux", model_class="Flux", signal="vec", target=1.5, start=0.0,
                       end=1.0, warmup_steps=1, sampler="euler", scheduler="simple")
    q = CacheProfile.from_json(p.to_json())
    assert q == p
    bad = p.to_json().replace('"version": 1', '"version": 99')
    with pytest.raises(ValueError, match="version"):
        CacheProfile.from_json(bad)


def test_profile_with_undefined_fit_quality_still_saves():
    p = from_recording(_recording(n_steps=3), family="sd3", model_class="MMDiT", signal="modulated", target=1.2,
                       start=0.0, end=1.0, warmup_steps=1)
    assert math.isnan(p.fit_r2) or p.fit_r2 <= 1.0
    assert CacheProfile.from_json(p.to_json()).family == "sd3"


def test_profile_keeps_the_signal_curve_along_the_noise_position():
    report = _recording()
    assert from_recording(report, family="wan", model_class="WanModel", signal="vec", target=2.0, start=0.0,
                          end=1.0, warmup_steps=1).signal_rates == []   # an old recording: no positions
    for k, row in enumerate(report["rows"]):
        row["position"] = 1 - k / 20
    p = from_recording(report, family="wan", model_class="WanModel", signal="vec", target=2.0, start=0.0,
                       end=1.0, warmup_steps=1)
    assert len(p.signal_rates) == 19
    # each step is 1/20 long: the rate is the recorded signal times 20, at the step's midpoint
    for (u, rate), row, prev in zip(p.signal_rates, report["rows"][1:], report["rows"]):
        assert u == pytest.approx((row["position"] + prev["position"]) / 2)
        assert rate == pytest.approx(row["signal"] * 20)
    assert CacheProfile.from_json(p.to_json()).signal_rates == p.signal_rates
