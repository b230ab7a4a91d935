"""A calibrated TeaCache profile: the rescale polynomial fitted on this very model and the
threshold that reaches a requested speedup on the recorded run, saved as JSON.

``from_recording`` turns a recording run's report (every step computed, each stream's signal
and residual change recorded by ``cache.engine``) into a profile: it fits ``residual change ~
poly(signal change)``, replays TeaCache's rule on the lead stream's signal curve with the
forced steps the cache will use to pick the smallest threshold that reaches the target, and
keeps the curve as a rate along the noise position (``rules.signal_rates``). The threshold
alone holds only for the calibrated step count (at 50 steps each step changes less and the
rule would skip far more); the rate lets each run pick the threshold for its own schedule.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np

from . import rules

PROFILE_VERSION = 1


@dataclasses.dataclass
class CacheProfile:
    family: str
    model_class: str
    signal: str
    coefficients: list[float]
    threshold: float
    target_speedup: float
    predicted_speedup: float
    steps: int
    start: float
    end: float
    warmup_steps: int
    sampler: str = ""
    scheduler: str = ""
    fit_r2: float = float("nan")
    signal_change: list = dataclasses.field(default_factory=list)
    output_change: list = dataclasses.field(default_factory=list)
    replay: list = dataclasses.field(default_factory=list)     # True where the replay computes
    signal_rates: list = dataclasses.field(default_factory=list)   # [noise position, signal per unit]
    created: str = ""
    version: int = PROFILE_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["fit_r2"] = None if not math.isfinite(self.fit_r2) else self.fit_r2
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CacheProfile":
        data = json.loads(text)
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')} is not {PROFILE_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        if data.get("fit_r2") is None:
            data["fit_r2"] = float("nan")
        return cls(**data)


def from_recording(report: dict, *, family: str, model_class: str, signal: str, target: float,
                   start: float, end: float, warmup_steps: int, last_step: bool = True,
                   sampler: str = "", scheduler: str = "") -> CacheProfile:
    points = [p for p in report["points"] if p["signal_change"] is not None]
    x = [p["signal_change"] for p in points]
    y = [p["output_change"] for p in points]
    coefficients = rules.fit_rescale(x, y)
    rescale = rules.Rescale(coefficients)
    n_steps = report["summary"]["steps"]
    signals = [r["signal"] for r in report["rows"]]
    forced = [rules.is_forced(r["step"], n_steps, start, end, warmup_steps, last_step) for r in report["rows"]]
    threshold, predicted = rules.threshold_for_speedup(signals, forced, rescale, target)
    return CacheProfile(
        family=family, model_class=model_class, signal=signal, coefficients=coefficients,
        threshold=threshold, target_speedup=target, predicted_speedup=predicted, steps=n_steps,
        start=start, end=end, warmup_steps=warmup_steps, sampler=sampler, scheduler=scheduler,
        fit_r2=r_squared(x, y, coefficients), signal_change=x, output_change=y,
        replay=rules.simulate(signals, forced, rescale, threshold),
        signal_rates=rules.signal_rates([r["position"] for r in report["rows"]], signals)
        if all("position" in r for r in report["rows"]) else [],
        created=time.strftime("%Y-%m-%d %H:%M:%S"))


def r_squared(x, y, coefficients) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(y) < 2:
        return float("nan")
    residual = ((np.polyval(coefficients, x) - y) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - residual / total) if total > 0 else float("nan")
