"""What one sampling run with sparse attention did, per layer and head.

Collected while sampling (density kept, the pattern svg chose, the error against exact
attention on sampled query rows) and turned into a plain dict at the end of the run, which the
node layer prints and plots and the patch saves as JSON.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict


class RunReport:
    def __init__(self):
        self.layers: dict[int, dict] = {}
        self.steps: dict[int, dict] = defaultdict(lambda: {"sparse_calls": 0, "density": 0.0,
                                                           "error": 0.0, "error_n": 0})
        self.dense_reasons: Counter = Counter()
        self.sparse_calls = 0
        self.layouts: dict[str, str] = {}

    def layout(self, family: str, grid, seq_len: int) -> None:
        """Where the grid sat in the attention sequence (the rest is text and other dense tokens)."""
        self.layouts.setdefault(family, f"{grid.frames}x{grid.height}x{grid.width} grid tokens at "
                                        f"{grid.offset}..{grid.offset + grid.tokens} of {seq_len}")

    def dense(self, reason: str) -> None:
        self.dense_reasons[reason] += 1

    def sparse(self, layer: int, step: int, density: list[float], error: list[float] | None,
               temporal: list[float] | None) -> None:
        """One sparse call: per-head density, relative error (or None) and share of temporal
        choices (svg only, else None)."""
        heads = len(density)
        entry = self.layers.setdefault(layer, {"calls": 0, "density": [0.0] * heads, "error": [0.0] * heads,
                                               "error_n": 0, "temporal": [0.0] * heads, "svg": False})
        if len(entry["density"]) != heads:  # a layer seen with another head count: start over
            entry.update(calls=0, density=[0.0] * heads, error=[0.0] * heads, error_n=0, temporal=[0.0] * heads)
        entry["calls"] += 1
        entry["density"] = [a + b for a, b in zip(entry["density"], density)]
        if error is not None:
            entry["error"] = [a + b for a, b in zip(entry["error"], error)]
            entry["error_n"] += 1
        if temporal is not None:
            entry["svg"] = True
            entry["temporal"] = [a + b for a, b in zip(entry["temporal"], temporal)]
        s = self.steps[step]
        s["sparse_calls"] += 1
        s["density"] += sum(density) / heads
        if error is not None:
            s["error"] += sum(error) / heads
            s["error_n"] += 1
        self.sparse_calls += 1

    def rows(self) -> list[dict]:
        rows = []
        for layer in sorted(self.layers):
            e = self.layers[layer]
            for h, dens in enumerate(e["density"]):
                pattern = "-"
                if e["svg"]:
                    share = e["temporal"][h] / e["calls"]
                    pattern = "temporal" if share > 0.5 else "spatial"
                rows.append({"layer": layer, "head": h, "density": dens / e["calls"], "pattern": pattern,
                             "rel_error": e["error"][h] / e["error_n"] if e["error_n"] else None,
                             "calls": e["calls"]})
        return rows

    def build(self, settings: dict, notices: list[str]) -> dict:
        rows = self.rows()
        densities = [r["density"] for r in rows]
        errors = [r["rel_error"] for r in rows if r["rel_error"] is not None]
        mean_density = sum(densities) / len(densities) if densities else None
        summary = dict(settings)
        summary.update({
            "sparse_calls": self.sparse_calls,
            "dense_calls": sum(self.dense_reasons.values()),
            "dense_reasons": dict(self.dense_reasons),
            "sparse_layers": len(self.layers),
            "layout": "; ".join(f"{k}: {v}" for k, v in self.layouts.items()) or None,
            "mean_density": mean_density,
            # Attention work of the sparse calls is at best this many times smaller.
            "attention_bound": (1.0 / mean_density) if mean_density else None,
            "mean_rel_error": sum(errors) / len(errors) if errors else None,
            "max_rel_error": max(errors) if errors else None,
        })
        steps = [{"step": k, "sparse_calls": v["sparse_calls"], "mean_density": v["density"] / v["sparse_calls"],
                  "mean_rel_error": v["error"] / v["error_n"] if v["error_n"] else None}
                 for k, v in sorted(self.steps.items()) if v["sparse_calls"]]
        return {"summary": summary, "rows": rows, "steps": steps, "notices": list(notices)}


def matrices(report: dict) -> tuple[list[list[float]], list[list[float]], list[int]]:
    """Density and relative error as [layer][head] tables (NaN where unknown) and the layer ids."""
    layers = sorted({r["layer"] for r in report["rows"]})
    heads = max((r["head"] for r in report["rows"]), default=-1) + 1
    density = [[math.nan] * heads for _ in layers]
    error = [[math.nan] * heads for _ in layers]
    pos = {layer: i for i, layer in enumerate(layers)}
    for r in report["rows"]:
        density[pos[r["layer"]]][r["head"]] = r["density"]
        if r["rel_error"] is not None:
            error[pos[r["layer"]]][r["head"]] = r["rel_error"]
    return density, error, layers

