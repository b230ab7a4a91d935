"""The pure caching maths: schedule positions, TeaCache's rule and its calibration, Taylor forecasts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_accel import runs
from comfyui_accel.cache import rules

SCHEDULE = [1.0, 0.8, 0.5, 0.2, 0.0]


@pytest.mark.parametrize("sigma,step", [(1.0, 0), (0.9, 0), (0.8, 1), (0.79, 1), (0.5, 2), (0.2, 3),
                                        (0.05, 3), (1.7, 0)])
def test_step_index_locates_sigma_in_schedule(sigma, step):
    assert runs.step_index(sigma, SCHEDULE) == step


def test_step_index_tolerates_float32_rounding():
    sched = torch.linspace(1, 0, 31, dtype=torch.float32).tolist()
    for k in range(30):
        assert runs.step_index(float(torch.tensor(sched[k], dtype=torch.float32)), sched) == k


def test_forced_steps_cover_warmup_window_and_last_step():
    forced = [rules.is_forced(k, 10, start=0.2, end=0.8, warmup_steps=1, last_step=True) for k in range(10)]
    assert forced == [True, True, False, False, False, False, False, False, True, True]
    forced = [rules.is_forced(k, 10, start=0.0, end=1.0, warmup_steps=3, last_step=False) for k in range(10)]
    assert forced == [True] * 3 + [False] * 7


def test_accumulate_rule_skips_until_threshold_then_resets():
    identity = rules.Rescale([1.0, 0.0])
    signals = [None, 0.1, 0.1, 0.1, 0.3, 0.05, 0.05]
    forced = [False] * 6 + [True]
    # acc: (first: no signal -> compute), 0.1, 0.2 (< 0.25 reuse), 0.3 -> compute, 0.3 -> compute,
    # 0.05 reuse, forced last -> compute
    assert rules.simulate(signals, forced, identity, 0.25) == [True, False, False, True, True, False, True]


def test_threshold_zero_computes_every_step():
    signals = [None] + [0.01] * 9
    assert all(rules.simulate(signals, [False] * 10, rules.Rescale([1.0, 0.0]), 0.0))


def test_rescale_uses_highest_power_first():
    assert rules.Rescale([2.0, -1.0, 0.5])(3.0) == pytest.approx(2 * 9 - 3 + 0.5)


def test_fit_recovers_a_known_polynomial():
    x = np.linspace(0.01, 0.3, 40)
    y = 3 * x ** 2 - x + 0.5
    coeffs = rules.fit_rescale(x, y, degree=4)
    assert len(coeffs) == 5
    grid = np.linspace(0.01, 0.3, 7)
    assert np.allclose(np.polyval(coeffs, grid), 3 * grid ** 2 - grid + 0.5, atol=1e-8)


def test_fit_lowers_degree_with_few_points_and_rejects_one():
    assert len(rules.fit_rescale([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])) == 3   # degree 2 through 3 points
    with pytest.raises(ValueError):
        rules.fit_rescale([0.1, 0.1], [1.0, 2.0])


def test_threshold_search_lands_inside_the_first_plateau_reaching_target():
    rng = np.random.default_rng(0)
    signals = [None] + list(rng.uniform(0.02, 0.2, 29))
    forced = [False] * 29 + [True]
    rescale = rules.Rescale([2.0, 0.01])

    def speed(thr):
        return rules.speedup_of(rules.simulate(signals, forced, rescale, thr))

    thr, reached = rules.threshold_for_speedup(signals, forced, rescale, 2.0)
    assert reached >= 2.0 and speed(thr) == pytest.approx(reached)
    grid = np.linspace(0, 3, 3001)
    # the plateau of `reached` is the first one at or above the target ...
    assert all(speed(t) < 2.0 or speed(t) >= reached for t in grid if t < thr)
    # ... and the threshold sits mid-plateau, with room on both sides before the speedup changes
    fine = np.linspace(thr * 0.5, thr * 1.5, 4001)
    below = max(t for t in fine if t < thr and speed(t) != reached)
    above = min(t for t in fine if t > thr and speed(t) != reached)
    assert abs(thr - (below + above) / 2) < (above - below) / 4


def test_threshold_search_reports_unreachable_target():
    signals = [None, 0.1, 0.1, 0.1]
    forced = [False, True, False, True]     # at most one of four can be reused
    thr, speed = rules.threshold_for_speedup(signals, forced, rules.Rescale([1.0, 0.0]), 3.0)
    assert speed == pytest.approx(4 / 3)
    assert rules.speedup_of(rules.simulate(signals, forced, rules.Rescale([1.0, 0.0]), thr)) == pytest.approx(4 / 3)


def _poly(coeffs, t):
    return sum(c * t ** i for i, c in enumerate(coeffs))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_forecast_is_exact_on_polynomials_of_its_order(order):
    # Feature = a tensor whose entries are polynomials of degree `order` in t, sampled at
    # uneven times (as sigma schedules are).
    gen = torch.Generator().manual_seed(order)
    coeffs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(order + 1)]
    times = [0.95, 0.81, 0.52, 0.47][: order + 2]
    f = rules.TaylorForecaster(order)
    for t in times:
        f.update(t, _poly(coeffs, t))
    for t in (0.4, 0.3, 0.12):
        assert torch.allclose(f.predict(t), _poly(coeffs, t), atol=1e-9)


def test_taylor_forecast_of_lower_order_misses_a_higher_degree():
    gen = torch.Generator().manual_seed(5)
    coeffs = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(3)]   # degree 2
    f = rules.TaylorForecaster(1)
    for t in (0.9, 0.7, 0.6):
        f.update(t, _poly(coeffs, t))
    assert not torch.allclose(f.predict(0.3), _poly(coeffs, 0.3), atol=1e-3)


def test_taylor_spacing_uses_the_actual_times_not_the_step_count():
    # Linear in t: with uneven gaps an index-spaced difference would overshoot.
    f = rules.TaylorForecaster(1)
    f.update(1.0, torch.tensor([1.0], dtype=torch.float64))
    f.update(0.9, torch.tensor([0.9], dtype=torch.float64))   # slope 1 per unit of t
    assert f.predict(0.5).item() == pytest.approx(0.5)
    index_spaced = 0.9 + (0.9 - 1.0) * 1          # one "step" later by index
    assert index_spaced != pytest.approx(f.predict(0.5).item())


def test_taylor_same_time_twice_restarts_instead_of_dividing_by_zero():
    f = rules.TaylorForecaster(2)
    f.update(0.5, torch.ones(3))
    f.update(0.5, 2 * torch.ones(3))
    assert len(f.diffs) == 1 and torch.equal(f.predict(0.1), 2 * torch.ones(3))


def test_taylor_memory_is_order_plus_one_features():
    f = rules.TaylorForecaster(2)
    for t in (0.9, 0.8, 0.7, 0.6):
        f.update(t, torch.zeros(10, 10, dtype=torch.bfloat16))
    assert f.nbytes == 3 * 100 * 2
    assert f.predict(0.5).dtype == torch.bfloat16


def test_taylor_shape_change_restarts():
    f = rules.TaylorForecaster(1)
    f.update(0.9, torch.zeros(2, 3))
    f.update(0.8, torch.ones(4, 3))
    assert f.predict(0.1).shape == (4, 3) and len(f.diffs) == 1


def test_rel_l1():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([2.0, -2.0])
    assert rules.rel_l1(a, b) == pytest.approx((1 + 0) / 2 / 2)
    assert math.isfinite(rules.rel_l1(a, torch.zeros(2)))


# --- noise position, Forecast Cache schedule, verified slope, per-schedule thresholds -------------

def _shifted_flow_table(shift: float, n: int = 1000) -> list[float]:
    """ComfyUI's ModelSamplingDiscreteFlow table: sigma = shift t / (1 + (shift - 1) t), t = k/n."""
    t = np.arange(1, n + 1) / n
    return list(np.log(shift * t / (1 + (shift - 1) * t)))


@pytest.mark.parametrize("shift", [1.0, 3.0, 8.0])
def test_noise_position_is_the_unshifted_time(shift):
    table = _shifted_flow_table(shift)
    for t in (0.05, 0.3, 0.5, 0.77, 0.999):
        sigma = shift * t / (1 + (shift - 1) * t)
        # index k holds t = (k + 1) / n: position k / (n - 1)
        assert rules.noise_position(sigma, table) == pytest.approx((t * 1000 - 1) / 999, abs=1e-6)
    # monotone, and extrapolated linearly past both ends instead of clamped
    xs = [rules.noise_position(s, table) for s in (1e-4, 5e-4, 0.2, 0.6, 1.0, 1.3)]
    assert xs == sorted(xs) and len(set(xs)) == len(xs) and xs[0] < 0 and xs[-1] > 1


@pytest.mark.parametrize("n_steps", [10, 13, 20, 30, 37, 50])
@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0, 4.0, 5.0])
def test_forecast_schedule_reaches_the_speedup_with_growing_gaps(n_steps, speedup):
    k = rules.computed_count(n_steps, speedup)
    assert n_steps / k >= speedup - 1e-9 and n_steps / (k + 1) < speedup   # the fewest computes that reach it
    plan = rules.forecast_schedule(n_steps, k)
    assert len(plan) == len(set(plan)) == k and plan == sorted(plan)
    assert plan[0] == 0 and plan[-1] == n_steps - 1
    gaps = np.diff(plan)
    # rounding may shorten a gap by one step; the trend grows
    assert all(b >= a - 1 for a, b in zip(gaps, gaps[1:])) and gaps[-1] >= gaps[0]


def test_forecast_schedule_edges():
    assert rules.forecast_schedule(6, 6) == list(range(6)) and rules.forecast_schedule(6, 9) == list(range(6))
    assert rules.forecast_schedule(6, 2) == [0, 5]
    five = rules.forecast_schedule(5, 4)   # one of steps 1-3 is forecast
    assert len(five) == 4 and five[0] == 0 and five[-1] == 4 and len(set(five)) == 4
    assert rules.forecast_schedule(20, 5, growth=1.0) == [0, 6, 10, 14, 19]
    with pytest.raises(ValueError):
        rules.computed_count(20, 0.0)


def test_verified_slope_rescales_the_linear_forecast():
    f = rules.TaylorForecaster(order=1, verify=True)
    one = torch.ones(4)
    f.update(0.0, 0 * one)
    f.update(1.0, 1 * one)
    assert f.slope == 1.0 and torch.allclose(f.predict(3.0), 3 * one)
    # t^2 at t = 2: the linear forecast from (0, 0), (1, 1) says 2, the value is 4: the increment
    # over the last value is 1 where 3 came; factor 3 is clipped to 1.5, half of it is taken.
    f.update(2.0, 4 * one)
    assert f.verifications == [pytest.approx(1.5)] and f.slope == pytest.approx(1.25)
    # now the slope (4 - 1) / (2 - 1) = 3 per unit, scaled by 1.25
    assert torch.allclose(f.predict(3.0), (4 + 1.25 * 3) * one)
    # a feature that is linear in t verifies at 1 and keeps the plain extrapolation
    g = rules.TaylorForecaster(order=1, verify=True)
    for t in (0.0, 0.5, 1.5, 2.0):
        g.update(t, 2 * t * one + 1)
    assert g.verifications == [pytest.approx(1.0)] * 2 and g.slope == pytest.approx(1.0)
    plain = rules.TaylorForecaster(order=1)
    for t, v in ((0.0, 0.0), (1.0, 1.0), (2.0, 4.0)):
        plain.update(t, v * one)
    assert plain.slope == 1.0 and plain.verifications == []
    f.reset()
    assert f.slope == 1.0 and f.verifications == [] and not f.ready


def test_signal_rates_predict_the_recorded_curve_and_scale_with_the_step():
    positions = list(np.linspace(1.0, 0.0, 31))
    rng = np.random.default_rng(0)
    signals = [None] + list(rng.uniform(0.05, 0.3, 30))
    rates = rules.signal_rates(positions, signals)
    assert len(rates) == 30 and all(r > 0 for _, r in rates)
    # on the recorded schedule the prediction is the recording
    assert rules.predicted_signals(rates, positions)[1:] == pytest.approx(signals[1:])
    # a constant rate: each step's signal is the rate times the step's length, for any step count
    flat = [[u, 2.0] for u in np.linspace(0, 1, 11)]
    coarse = [1.0, 0.7, 0.2, 0.0]
    assert rules.predicted_signals(flat, coarse)[1:] == pytest.approx([0.6, 1.0, 0.4])


def test_rescale_never_counts_a_negative_change():
    r = rules.Rescale([1.0, -0.5])   # x - 0.5
    assert r(0.2) == 0.0 and r(1.0) == pytest.approx(0.5)
