"""The maths of step caching, free of ComfyUI (so it unit-tests alone): where a sigma sits on
the model's noise table, TeaCache's accumulate-and-skip rule (also replayed offline to calibrate
a threshold, for any step count), the rescale polynomial fit, the Forecast Cache's schedule, and
the Taylor (Newton divided-difference) forecaster with its verified slope.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def noise_position(sigma: float, log_table: Sequence[float]) -> float:
    """Where ``sigma`` sits on the model's own noise table (``model_sampling.sigmas``, ascending,
    given as logs): 0 at its lowest sigma, 1 at its highest, linear in the table index between
    and extrapolated beyond its ends.

    The forecasts' time axis: the table is the model's timesteps run through its noise shift,
    so this is the unshifted time (or the discrete timestep), whatever scheduler picked the
    sigmas. Features are smoother along it than along sigma, because shifted schedules crowd
    many steps into a tiny range of sigma near 1 (docs/caching.md)."""
    x = math.log(max(float(sigma), 1e-30))
    n = len(log_table)
    if n < 2:
        return 0.0
    if x <= log_table[0]:
        i = 0
    elif x >= log_table[-1]:
        i = n - 2
    else:
        i = int(np.searchsorted(log_table, x)) - 1
    lo, hi = log_table[i], log_table[i + 1]
    frac = (x - lo) / (hi - lo) if hi > lo else 0.0
    return float((i + frac) / (n - 1))


def is_forced(step: int, n_steps: int, start: float, end: float, warmup_steps: int,
              last_step: bool) -> bool:
    """Whether a step must be computed whatever the cache policy says: the warm-up steps,
    steps outside ``start <= step / n_steps < end``, and (when ``last_step``) the last step."""
    frac = step / max(n_steps, 1)
    in_window = start <= frac + 1e-9 and frac < end - 1e-9
    return step < warmup_steps or not in_window or (last_step and step >= n_steps - 1)


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous| (TeaCache's distance), as a Python float."""
    num = (current.float() - previous.float()).abs().mean()
    den = previous.float().abs().mean()
    return float((num / den.clamp_min(1e-12)).item())


# --- TeaCache ------------------------------------------------------------------------------

class Rescale:
    """The rescale polynomial, coefficients highest power first (numpy ``polyval`` order).

    A change is never negative: where a fitted polynomial dips below zero (outside the range it
    was fitted on, e.g. the smaller per-step changes of a longer schedule) it counts as 0."""

    def __init__(self, coefficients: Sequence[float]):
        self.coefficients = [float(c) for c in coefficients]
        if not self.coefficients:
            raise ValueError("a rescale polynomial needs at least one coefficient")

    def __call__(self, x: float) -> float:
        return max(float(np.polyval(self.coefficients, x)), 0.0)


class AccumulateRule:
    """TeaCache's decision: add the rescaled signal up; compute (and restart the sum) once it
    reaches the threshold, otherwise reuse the cache. ``forced`` steps always compute."""

    def __init__(self, rescale: Rescale, threshold: float):
        self.rescale = rescale
        self.threshold = float(threshold)
        self.accumulated = 0.0

    def step(self, signal: float | None, forced: bool) -> bool:
        """Feed one evaluation; True when it must be computed."""
        if forced or signal is None or not math.isfinite(signal):
            self.accumulated = 0.0
            return True
        self.accumulated += self.rescale(signal)
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True


def simulate(signals: Sequence[float | None], forced: Sequence[bool], rescale: Rescale,
             threshold: float) -> list[bool]:
    """Replay the accumulate rule over a recorded signal curve; True where it computes."""
    rule = AccumulateRule(rescale, threshold)
    return [rule.step(s, f) for s, f in zip(signals, forced)]


def speedup_of(computed: Sequence[bool]) -> float:
    """Evaluations / computed evaluations: the bound a cache schedule can reach."""
    n = sum(bool(c) for c in computed)
    return len(computed) / n if n else float("inf")


def fit_rescale(signal_change: Sequence[float], output_change: Sequence[float],
                degree: int = 4) -> list[float]:
    """Least-squares polynomial (numpy ``polyfit``) mapping the signal's relative change to
    the output's relative change, highest power first. The degree drops when there are too
    few distinct points to determine it."""
    x = np.asarray(signal_change, dtype=float)
    y = np.asarray(output_change, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    distinct = len(np.unique(np.round(x, 12)))
    if distinct < 2:
        raise ValueError(f"need at least 2 distinct signal values to fit a rescale polynomial, got {distinct}")
    degree = max(1, min(degree, distinct - 1))
    return [float(c) for c in np.polyfit(x, y, degree)]


def threshold_for_speedup(signals: Sequence[float | None], forced: Sequence[bool], rescale: Rescale,
                          target: float) -> tuple[float, float]:
    """A threshold whose replayed schedule reaches ``target`` speedup, and the speedup it gives.

    The speedup is a step function of the threshold. This finds the lowest plateau at or above
    the target and returns the middle of that plateau, so small differences between the
    recorded curve and a later run do not tip decisions at its edge. When the forced steps make
    the target unreachable, it returns the middle of the highest plateau.
    """
    hi = 2 * sum(max(rescale(s), 0.0) for s, f in zip(signals, forced)
                 if not f and s is not None and math.isfinite(s)) + 1.0

    def speed(thr: float) -> float:
        return speedup_of(simulate(signals, forced, rescale, thr))

    goal = min(target, speed(hi))
    lo_edge = _first_reaching(speed, goal, 0.0, hi)
    reached = speed(lo_edge)
    hi_edge = _first_reaching(speed, reached * (1 + 1e-9) + 1e-12, lo_edge, hi) if speed(hi) > reached else hi
    mid = (lo_edge + hi_edge) / 2
    return (mid, reached) if speed(mid) == reached else (lo_edge, reached)


def signal_rates(positions: Sequence[float], signals: Sequence[float | None]) -> list[list[float]]:
    """A recorded signal curve as a rate along the noise position: ``[position, change per unit
    of position]`` for each evaluation that has a signal and moved from the previous one.

    TeaCache's signal is the relative change between consecutive evaluations, so it grows with
    the step size; its rate does not, which is what lets one calibration serve any step count."""
    out = []
    for k in range(1, len(signals)):
        s, gap = signals[k], abs(positions[k - 1] - positions[k])
        if s is not None and math.isfinite(s) and gap > 1e-9:
            out.append([(positions[k - 1] + positions[k]) / 2, s / gap])
    return out


def predicted_signals(rates: Sequence[Sequence[float]], positions: Sequence[float]) -> list[float | None]:
    """The signal each evaluation of a schedule at ``positions`` should see, from a recorded rate
    curve (``signal_rates``): the rate at the midpoint of each step times the step's length."""
    if not rates:
        raise ValueError("an empty signal-rate curve predicts nothing")
    xs, ys = zip(*sorted((float(u), float(r)) for u, r in rates))
    out: list[float | None] = [None]
    for k in range(1, len(positions)):
        mid = (positions[k - 1] + positions[k]) / 2
        out.append(float(np.interp(mid, xs, ys)) * abs(positions[k - 1] - positions[k]))
    return out


def _first_reaching(speed, goal: float, lo: float, hi: float) -> float:
    """The smallest threshold in [lo, hi] whose speedup reaches ``goal``: a geometric scan (the
    speedup is not always monotone in the threshold) refined by bisection."""
    prev = lo
    for thr in [lo] + list(np.geomspace(max(lo, hi * 1e-6, 1e-9), hi, 240)):
        if speed(thr) >= goal - 1e-9:
            a, b = prev, thr
            for _ in range(40):
                mid = (a + b) / 2
                if speed(mid) >= goal - 1e-9:
                    b = mid
                else:
                    a = mid
            return float(b)
        prev = thr
    return float(hi)


# --- Forecast Cache's schedule ---------------------------------------------------------------

# How fast the gaps between computed steps grow along a run (1 = even spacing), as Spectrum
# widens its window; 1.3 measured best on the reference models (docs/caching.md).
GAP_GROWTH = 1.3


def computed_count(n_steps: int, speedup: float) -> int:
    """How many of ``n_steps`` steps a forecast schedule computes so that steps / computed
    reaches ``speedup`` (at least 1, at most every step)."""
    if speedup <= 0:
        raise ValueError(f"speedup must be positive, got {speedup}")
    return max(1, min(n_steps, math.floor(n_steps / speedup + 1e-9)))


def forecast_schedule(n_steps: int, computes: int, growth: float = GAP_GROWTH) -> list[int]:
    """The steps to compute: the first and the last, and ``computes - 2`` between them placed at
    ``1 + (n_steps - 2) * (i / (computes - 1)) ** growth`` (rounded, kept distinct), so the
    gaps between computed steps grow along the run."""
    if computes >= n_steps:
        return list(range(n_steps))
    if computes <= 1:
        return [0][:max(computes, 0)]
    inner = computes - 2
    chosen = [0]
    for i in range(inner):
        q = round(1 + (n_steps - 2) * ((i + 1) / (inner + 1)) ** growth)
        q = max(q, chosen[-1] + 1)
        q = min(q, n_steps - 2 - (inner - 1 - i))   # leave room for the ones still to place
        chosen.append(q)
    return chosen + [n_steps - 1]


# --- Taylor forecast -----------------------------------------------------------------------

# The verified slope: how much of the last verification's least-squares factor replaces the
# previous one (the rest is kept, so one odd step does not swing it), and its range.
SLOPE_MEMORY = 0.5
SLOPE_RANGE = (0.0, 1.5)


class TaylorForecaster:
    """Forecast a feature from its last computed values by a Newton/Taylor polynomial.

    ``update(t, value)`` refreshes the divided differences ``F[t_k]``, ``F[t_k, t_k-1]``, ...
    (up to ``order``), spaced by the actual times ``t``; ``predict(t)`` evaluates the polynomial
    through the last ``order + 1`` computed points (exact for polynomials of degree <= order).
    Memory: ``order + 1`` tensors of the feature's size.

    With ``verify``, each computed value first checks the forecast that would have replaced it
    (SpeCa's forecast-then-verify, free here since the value was computed anyway): the
    least-squares factor ``a = <real - F, forecast - F> / |forecast - F|^2`` is blended into
    ``slope``, and later forecasts use ``F + slope * (forecast - F)`` (FoCa's calibration).
    ``slope`` is 1 until the first verification and after ``reset``.
    """

    def __init__(self, order: int, device: torch.device | str | None = None, verify: bool = False):
        if order < 0:
            raise ValueError("order must be >= 0")
        self.order = int(order)
        self.device = device
        self.verify = bool(verify)
        self.slope = 1.0
        self.verifications: list[float] = []   # each verification's factor, for the report
        self.diffs: list[torch.Tensor] = []     # D0 (newest value), D1, D2 ...
        self.times: list[float] = []            # t_k, t_k-1, ... (newest first)

    @property
    def ready(self) -> bool:
        return bool(self.diffs)

    @property
    def newest(self) -> torch.Tensor | None:
        return self.diffs[0] if self.diffs else None

    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.diffs)

    def compatible(self, value: torch.Tensor) -> bool:
        return bool(self.diffs) and tuple(self.diffs[0].shape) == tuple(value.shape)

    def reset(self) -> None:
        self.diffs, self.times = [], []
        self.slope, self.verifications = 1.0, []

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        store_dtype = value.dtype
        value = value.detach()
        if self.device is not None:
            value = value.to(self.device)
        if self.diffs and not self.compatible(value):
            self.reset()
        if self.verify and len(self.diffs) >= 2 and abs(t - self.times[0]) > 1e-12:
            self._verify(t, value)
        new = [value]
        for j in range(1, self.order + 1):
            if len(self.diffs) < j:
                break
            gap = t - self.times[j - 1]
            if abs(gap) < 1e-12:
                # Same time again (a second evaluation at one sigma): no slope to take.
                new = [value]
                break
            d = (new[j - 1].float() - self.diffs[j - 1].float()) / gap
            new.append(d.to(store_dtype))
        self.times = ([t] + self.times)[:len(new)]
        self.diffs = new

    def predict(self, t: float) -> torch.Tensor:
        if not self.diffs:
            raise RuntimeError("nothing to forecast from: no computed value yet")
        if len(self.diffs) == 1:
            return self.diffs[0]
        increment = self._increment(float(t))
        if self.slope != 1.0:
            increment = increment * self.slope
        return (self.diffs[0].float() + increment).to(self.diffs[0].dtype)

    def _increment(self, t: float) -> torch.Tensor:
        """The Newton polynomial at ``t`` minus the newest computed value."""
        acc = self.diffs[-1].float()
        for j in range(len(self.diffs) - 2, 0, -1):
            acc = self.diffs[j].float() + (t - self.times[j]) * acc
        return (t - self.times[0]) * acc

    def _verify(self, t: float, value: torch.Tensor) -> None:
        increment = self._increment(t)
        real = value.float() - self.diffs[0].float()
        norm = float((increment * increment).sum())
        if not math.isfinite(norm) or norm <= 0:
            return
        factor = float((real * increment).sum()) / norm
        if not math.isfinite(factor):
            return
        factor = min(max(factor, SLOPE_RANGE[0]), SLOPE_RANGE[1])
        self.verifications.append(factor)
        self.slope = SLOPE_MEMORY * self.slope + (1 - SLOPE_MEMORY) * factor
