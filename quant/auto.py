"""``auto``: a format per layer from measured sensitivity, under a size budget or a quality floor.

Sensitivity (MixDQ, ViDiT-Q-MP): each candidate format applied to each layer alone, its output SQNR
measured on that layer's calibration inputs (weight SQNR without calibration). A layer's options are
(bytes, noise) points, noise = 10^(-SQNR/10); 16-bit ("keep") has none. A floor alone: each layer
takes its smallest option reaching it. A budget: every layer starts at its smallest allowed option,
then the upgrade with the largest noise reduction per extra byte is taken while the budget allows,
along each layer's lower convex hull (greedy multiple-choice knapsack, exact at the hull's breakpoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import formats, policy
from .formats import Spec
from .model import float_weight, layer_sqnr_db, quantize_layer


class BudgetError(ValueError):
    def __init__(self, message: str, needed_bytes: int = 0):
        super().__init__(message)
        self.needed_bytes = needed_bytes


@dataclass
class Option:
    spec: Spec | None     # None: kept in 16 bits
    nbytes: int
    sqnr_db: float

    @property
    def noise(self) -> float:
        return 0.0 if math.isinf(self.sqnr_db) else 10.0 ** (-self.sqnr_db / 10.0)

    @property
    def label(self) -> str:
        if self.spec is None:
            return "keep"
        return self.spec.format + ("" if self.spec.act_quant or formats.get(self.spec.format).act_bits is None
                                   else " weight-only")


def parse_candidates(text: str) -> list[str]:
    names = [t.strip() for t in text.replace(";", ",").split(",") if t.strip()]
    unknown = [n for n in names if n not in formats.FORMATS]
    if unknown or not names:
        raise ValueError(f"must list formats separated by commas from {', '.join(formats.FORMATS)}; "
                         f"got {text!r}")
    return list(dict.fromkeys(names))


def layer_options(w: torch.Tensor, plan: policy.LayerPlan, candidates: list[str], group_size: int,
                  dtype: torch.dtype, stats=None, smooth_alpha: float = 0.0) -> list[Option]:
    """Every candidate applied to one layer, measured; plus 16-bit."""
    n, k = plan.shape
    rows = stats.sample() if stats is not None and stats.rows else None
    options = [Option(None, 2 * n * k, float("inf"))]
    for name in candidates:
        spec = policy.make_spec(name, group_size, act_quant=plan.role != "modulation")
        if formats.get(name).problem(plan.shape, spec):
            continue
        qw = quantize_layer(w, spec, dtype, stats, smooth_alpha)
        options.append(Option(spec, qw.packed_nbytes(), layer_sqnr_db(w, qw, rows)))
    return options


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, noise), from the smallest option up."""
    pts = sorted(options, key=lambda o: (o.nbytes, o.noise))
    frontier = []
    for o in pts:  # drop options that are bigger and not better
        if frontier and o.noise >= frontier[-1].noise:
            continue
        frontier.append(o)
    hull: list[Option] = []
    for o in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-o: never the best upgrade, drop it
            if (b.noise - a.noise) * (o.nbytes - a.nbytes) >= (o.noise - a.noise) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate(table: dict[str, list[Option]], budget_bytes: int | None = None,
             min_sqnr_db: float | None = None) -> dict[str, tuple[Option, str]]:
    """Choose one option per layer; raises BudgetError when no choice meets the constraints."""
    allowed = {}
    for layer, options in table.items():
        ok = [o for o in options if min_sqnr_db is None or o.sqnr_db >= min_sqnr_db]
        allowed[layer] = ok  # never empty: 16-bit has infinite SQNR
    floor_text = f" with output SQNR >= {min_sqnr_db:g} dB" if min_sqnr_db is not None else ""
    if budget_bytes is None:
        out = {}
        for layer, ok in allowed.items():
            best = min(ok, key=lambda o: (o.nbytes, o.noise))
            out[layer] = (best, f"auto: smallest option{floor_text} ({_describe(best)})")
        return out
    hulls = {layer: _hull(ok) for layer, ok in allowed.items()}
    pick = {layer: 0 for layer in hulls}
    used = sum(h[0].nbytes for h in hulls.values())
    if used > budget_bytes:
        raise BudgetError(f"the smallest allocation{floor_text} needs {used} bytes, more than the budget of "
                          f"{budget_bytes} bytes", used)
    while True:
        best_layer, best_gain = None, 0.0
        for layer, h in hulls.items():
            i = pick[layer]
            if i + 1 >= len(h):
                continue
            extra = h[i + 1].nbytes - h[i].nbytes
            if used + extra > budget_bytes:
                continue
            gain = (h[i].noise - h[i + 1].noise) / max(extra, 1)
            if gain > best_gain:
                best_layer, best_gain = layer, gain
        if best_layer is None:
            break
        h, i = hulls[best_layer], pick[best_layer]
        used += h[i + 1].nbytes - h[i].nbytes
        pick[best_layer] = i + 1
    out = {}
    for layer, h in hulls.items():
        chosen = h[pick[layer]]
        others = ", ".join(_describe(o) for o in sorted(table[layer], key=lambda o: o.nbytes) if o is not chosen)
        out[layer] = (chosen, f"auto: best output error per byte within the budget{floor_text} "
                              f"({_describe(chosen)}; others: {others})")
    return out


def _describe(o: Option) -> str:
    sq = "lossless" if math.isinf(o.sqnr_db) else f"{o.sqnr_db:.1f} dB"
    return f"{o.label} {sq}"


@torch.no_grad()
def measure(patcher, plans: list[policy.LayerPlan], candidates: list[str], group_size: int,
            dtype: torch.dtype, stats: dict | None = None, smooth_alpha: float = 0.0,
            progress=None) -> dict[str, list[Option]]:
    """The options of every ``auto`` plan, measured on its own weights (one layer at a time)."""
    table = {}
    for i, plan in enumerate(p for p in plans if p.auto):
        w = float_weight(patcher, plan.path, device=patcher.load_device)
        table[plan.path] = layer_options(w, plan, candidates, group_size, dtype,
                                         None if stats is None else stats.get(plan.path), smooth_alpha)
        del w
        if progress is not None:
            progress(i + 1)
    return table


def assign(plans: list[policy.LayerPlan], table: dict[str, list[Option]], budget_fraction: float | None = None,
           min_sqnr_db: float | None = None) -> list[policy.LayerPlan]:
    """Fill in the format of every ``auto`` plan. ``budget_fraction``: the allowed size of
    those layers as a fraction of their size in bf16."""
    total = sum(2 * p.shape[0] * p.shape[1] for p in plans if p.auto)
    budget = None if budget_fraction is None else int(budget_fraction * total)
    try:
        chosen = allocate(table, budget, min_sqnr_db)
    except BudgetError as e:
        floor = f" with every layer at >= {min_sqnr_db:g} dB" if min_sqnr_db is not None else ""
        raise BudgetError(f"no allocation fits {budget_fraction:g} of the bf16 size{floor}: the smallest "
                          f"needs {e.needed_bytes / total:.3f}", e.needed_bytes) from None
    out = []
    for plan in plans:
        if plan.auto:
            option, reason = chosen[plan.path]
            plan = policy.LayerPlan(plan.path, plan.shape, plan.role, option.spec, reason)
        out.append(plan)
    return out
