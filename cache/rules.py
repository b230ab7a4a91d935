"""The maths of step caching, free of ComfyUI: where a sigma sits in the schedule, TeaCache's
accumulate-and-skip rule (also replayed offline to calibrate a threshold), the rescale
polynomial fit, and the Taylor (Newton divided-difference) forecaster.

Everything here is plain numpy/torch so it unit-tests alone; ``cache.engine`` applies it to
a running sampler.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# Relative tolerance when matching a sigma against the schedule (ComfyUI passes the
# schedule's own float32 values, so exact matches are the normal case).
SIGMA_RTOL = 1e-4


def step_index(sigma: float, schedule: Sequence[float]) -> int:
    """The step a model evaluation at ``sigma`` belongs to.

    ``schedule`` is the sampler's sigmas (``n_steps + 1`` values, decreasing). Step ``k`` is
    the interval ``schedule[k] >= sigma > schedule[k + 1]``; a sigma equal to ``schedule[k]``
    is step ``k`` (so Heun's corrector at ``schedule[k + 1]`` counts as step ``k + 1``, and an
    intermediate sigma of DPM++ 2S counts as the step it lies in). Clamped to the schedule.
    """
    n_steps = max(len(schedule) - 1, 1)
    step = -1
    for i in range(n_steps):
        if schedule[i] >= sigma * (1.0 - SIGMA_RTOL):
            step = i
        else:
            break
    return min(max(step, 0), n_steps - 1)


def in_window(step: int, n_steps: int, start: float, end: float) -> bool:
    """Whether caching may act at ``step``: ``start <= step / n_steps < end``."""
    frac = step / max(n_steps, 1)
    return start <= frac + 1e-9 and frac < end - 1e-9


def is_forced(step: int, n_steps: int, start: float, end: float, warmup_steps: int,
              last_step: bool) -> bool:
    """Whether a step must be computed whatever the cache policy says: the warm-up steps,
    steps outside the ``[start, end)`` window, and (when ``last_step``) the last step."""
    return (step < warmup_steps or not in_window(step, n_steps, start, end)
            or (last_step and step >= n_steps - 1))


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous| (TeaCache's distance), as a Python float."""
    num = (current.float() - previous.float()).abs().mean()
    den = previous.float().abs().mean()
    return float((num / den.clamp_min(1e-12)).item())


# --- TeaCache ------------------------------------------------------------------------------

class Rescale:
    """The rescale polynomial, coefficients highest power first (numpy ``polyval`` order)."""

    def __init__(self, coefficients: Sequence[float]):
        self.coefficients = [float(c) for c in coefficients]
        if not self.coefficients:
            raise ValueError("a rescale polynomial needs at least one coefficient")

    def __call__(self, x: float) -> float:
        return float(np.polyval(self.coefficients, x))


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


# --- Taylor forecast -----------------------------------------------------------------------

class TaylorForecaster:
    """Forecast a feature from its last computed values by a Newton/Taylor polynomial.

    After each full computation ``update(t, value)`` refreshes the divided differences
    ``F[t_k]``, ``F[t_k, t_k-1]``, ``F[t_k, t_k-1, t_k-2]`` (up to ``order``), spaced by the
    actual times ``t`` (not step counts); ``predict(t)`` evaluates the polynomial through the
    last ``order + 1`` computed points. It is exact for features that are polynomials of
    degree <= order in ``t``. Memory: ``order + 1`` tensors of the feature's size.
    """

    def __init__(self, order: int, device: torch.device | str | None = None):
        if order < 0:
            raise ValueError("order must be >= 0")
        self.order = int(order)
        self.device = device
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

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        store_dtype = value.dtype
        value = value.detach()
        if self.device is not None:
            value = value.to(self.device)
        if self.diffs and not self.compatible(value):
            self.reset()
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
        t = float(t)
        acc = self.diffs[-1].float()
        for j in range(len(self.diffs) - 2, -1, -1):
            acc = self.diffs[j].float() + (t - self.times[j]) * acc
        return acc.to(self.diffs[0].dtype)
