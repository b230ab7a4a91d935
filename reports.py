"""Run reports kept for the report nodes (Cache Report, Sparse Attention Report).

A patched model keeps the reports of its last sampling runs so a report node placed after the
sampler can show them. Each report is found by the output its run made (a fingerprint of the
LATENT the sampler returned), never by "the newest": with several prompts in the queue the
newest report can be another prompt's. The history is bounded in count and in bytes, so a
model that stays loaded across many prompts does not grow.
"""
from __future__ import annotations

import json
import math

import torch

MAX_REPORTS = 32
MAX_REPORT_BYTES = 4 << 20   # all kept reports of one model together, as JSON


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
        self._sizes: list[int] = []

    def add(self, report: dict, output: torch.Tensor | None) -> None:
        """Keep ``report`` (its ``fingerprint`` set from ``output``), dropping the oldest ones beyond
        the bounds; a report alone over the byte bound is kept without its per-step rows."""
        report["fingerprint"] = fingerprint(output) if isinstance(output, torch.Tensor) else None
        size = len(json.dumps(report, default=str))
        if size > self.max_bytes and report.get("rows"):
            report["rows"] = []
            report.setdefault("warnings", []).append("per-step rows dropped: the report was too large to keep")
            size = len(json.dumps(report, default=str))
        self.reports.append(report)
        self._sizes.append(size)
        while len(self.reports) > self.max_reports or (len(self.reports) > 1 and sum(self._sizes) > self.max_bytes):
            del self.reports[0], self._sizes[0]

    def find(self, output: torch.Tensor | None) -> dict | None:
        """The report of the run that made ``output``, or None."""
        if output is None:
            return None
        fp = fingerprint(output)
        return next((r for r in reversed(self.reports) if same_fingerprint(r.get("fingerprint"), fp)), None)

    def latest(self) -> dict | None:
        return self.reports[-1] if self.reports else None
