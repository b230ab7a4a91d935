"""One sampling run of a patched model, shared by the step cache and sparse attention.

A patch is a :class:`RunOwner` whose :meth:`~RunOwner.outer_sample` is ComfyUI's OUTER_SAMPLE
wrapper: it makes the run's state when sampling starts and keeps it in the guider's per-run
copy of the transformer options, so every model call of that run, and no other, finds it
(:meth:`~RunOwner.run_of`); the run ends also on an error or an interrupt. Its report is kept
for the report nodes and found later by the output its run made (a fingerprint of the LATENT
the sampler returned), never by "the newest": with several prompts in the queue the newest can
be another prompt's. The history is bounded in count and bytes, so a model that stays loaded
across many prompts does not grow.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import torch

MAX_REPORTS = 32
MAX_REPORT_BYTES = 4 << 20   # all kept reports of one model together, as JSON
# Relative tolerance when matching a sigma against the schedule. ComfyUI passes the schedule's
# own float32 values, so a match is normally exact; 1e-4 absorbs float32/float64 round trips
# (~1e-7) and stays below the relative gap between neighbouring sigmas of the schedules in use
# (the smallest: 1.25e-4, 1,000 steps at Wan's shift 8), so a step is never taken for the next.
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
    for i in range(min(n_steps, len(schedule))):
        if schedule[i] >= sigma * (1.0 - SIGMA_RTOL):
            step = i
        else:
            break
    return min(max(step, 0), n_steps - 1)


class RunOwner:
    """What a patch keeps across its sampling runs. Shared, not copied, by every clone of the
    patched model, so a report node given the patch node's MODEL sees runs made through a LoRA
    clone of it too. Subclasses make the run (:meth:`start`) and end it (:meth:`finish`)."""

    def __init__(self, key: str):
        self.key = key
        self.run_key = f"{key}.run"   # transformer_options entry of the live run
        self.history = RunHistory()

    def __deepcopy__(self, memo):
        return self

    @property
    def reports(self) -> list[dict]:
        return self.history.reports

    def start(self, guider, schedule: list[float]):
        """The state of a run that samples along ``schedule`` (its sigmas), or None to leave it alone."""
        raise NotImplementedError

    def finish(self, run, status: str, output) -> None:
        """End ``run`` ("ok", "interrupted" or "error: ..."); add its report to the history."""
        raise NotImplementedError

    def run_of(self, transformer_options: dict | None):
        return (transformer_options or {}).get(self.run_key)

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        run = self.start(guider, [float(v) for v in torch.as_tensor(sigmas).flatten().tolist()])
        if run is None:
            return executor(*args, **kwargs)
        options[self.run_key] = run
        status, output = "ok", None
        try:
            output = executor(*args, **kwargs)
            return output
        except BaseException as e:
            interrupted = type(e).__name__ == "InterruptProcessingException"
            status = "interrupted" if interrupted else f"error: {type(e).__name__}"
            raise
        finally:
            options.pop(self.run_key, None)
            self.finish(run, status, output)


def fingerprint(output: torch.Tensor) -> list:
    """Shape and absolute sum of a run's output: what a report node is given to find its run."""
    t = output.detach()
    return [list(t.shape), float(t.double().abs().sum())]


def same_fingerprint(a, b) -> bool:
    return bool(a) and bool(b) and a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-9)


class RunHistory:
    """The newest run reports, found by the output of their run."""

    def __init__(self, max_reports: int = MAX_REPORTS, max_bytes: int = MAX_REPORT_BYTES):
        self.max_reports = max_reports
        self.max_bytes = max_bytes
        self.reports: list[dict] = []   # oldest first
        self._fingerprints: list[list | None] = []
        self._sizes: list[int] = []

    def add(self, report: dict, output: torch.Tensor | None) -> None:
        """Keep ``report`` of the run that made ``output``, dropping the oldest ones beyond the
        bounds; a report alone over the byte bound is kept without its per-step rows."""
        size = len(json.dumps(report, default=str))
        if size > self.max_bytes and report.get("rows"):
            report["rows"] = []
            report.setdefault("warnings", []).append("per-step rows dropped: the report was too large to keep")
            size = len(json.dumps(report, default=str))
        self.reports.append(report)
        self._fingerprints.append(fingerprint(output) if isinstance(output, torch.Tensor) else None)
        self._sizes.append(size)
        while len(self.reports) > self.max_reports or (len(self.reports) > 1 and sum(self._sizes) > self.max_bytes):
            del self.reports[0], self._fingerprints[0], self._sizes[0]

    def find(self, output: torch.Tensor | None) -> dict | None:
        """The report of the run that made ``output``, or None."""
        if output is None:
            return None
        fp = fingerprint(output)
        found = [r for r, f in zip(self.reports, self._fingerprints) if same_fingerprint(f, fp)]
        return found[-1] if found else None

    def latest(self) -> dict | None:
        return self.reports[-1] if self.reports else None
