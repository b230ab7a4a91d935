"""SVD Low-Rank Branch on a ComfyUI model (the math is in ``lowrank``), on a clone by object patches.

- before Quantize Model (SVDQuant): each chosen layer becomes a copy of its module carrying a
  ``lowrank.Branch`` (``accel_branch``) that still computes ``x @ W^T`` exactly; Quantize Model then
  packs only the residual, with the branch's smoothing;
- after Quantize Model (error compensation): the branch is fitted to each packed layer's
  quantization error; nothing is requantized.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from . import calibrate, formats, policy
from . import model as qmodel
from .linear import QuantLinear
from .lowrank import Branch, fit_error_branch, make_branch, quantize_branched
from .qweight import QuantWeight, smoothing_factors

AUTO_ALPHA = -1.0                       # smooth_alpha that asks for a per-layer search
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class LayerRow:
    """One line of the report."""
    layer: str
    shape: str
    rank: int
    energy: float                 # fraction of ||W s||^2 (before) or of the error's (after) in the branch
    act_max_before: float | None  # largest activation magnitude seen in calibration
    act_max_after: float | None   # the same after dividing by the smoothing factors
    sqnr_plain_db: float | None   # the layer quantized plainly with the report format
    sqnr_branched_db: float | None  # the same format on the residual, plus the branch
    sqnr_on: str                  # "output" (calibration rows) or "weight"
    ms: float                     # time to build the branch (smoothing + SVD)


def branch_of(module) -> Branch | QuantWeight | None:
    """What makes a layer branched: a ``Branch`` on a float copy, or a packed weight with one."""
    branch = getattr(module, "accel_branch", None)
    if branch is not None:
        return branch
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, QuantWeight) and weight.branch is not None else None


def branched_layers(patcher) -> list[str]:
    return [name for name, m in qmodel.linear_layers(patcher) if branch_of(m) is not None]


def select_layers(patcher, overrides: list[policy.Override]) -> list[tuple[str, torch.nn.Module]]:
    """The attention/MLP linears by default (the layers Quantize Model quantizes with activations);
    an override line '<regex> = keep' leaves layers out, '<regex> = <format>' brings any in."""
    out = []
    for name, module in qmodel.linear_layers(patcher):
        plan = policy.plan_layer(name, tuple(module.weight.shape), "int8", None, overrides)
        if plan.spec is not None and (plan.reason.startswith("override") or plan.role == "linear"):
            out.append((name, module))
    return out


def patch_shape_problem(patches: list, shape: tuple[int, int]) -> str | None:
    """Why a layer's weight patches (ComfyUI's (strength, adapter, ...) tuples) cannot apply to
    a weight of ``shape`` [N, K], or None. ComfyUI itself only logs such a mismatch and skips it."""
    n, k = shape
    for patch in patches:
        value = patch[1]
        weights = getattr(value, "weights", None)
        if type(value).__name__ == "LoRAAdapter" and weights is not None:
            up, down = weights[0], weights[1]
            got = (up.shape[0], down.flatten(start_dim=1).shape[1])
            if got != (n, k):
                return f"a LoRA with up {list(up.shape)} and down {list(down.shape)} (a {got[0]}x{got[1]} update)"
        elif isinstance(value, tuple) and value and value[0] == "diff" and tuple(value[1][0].shape) != (n, k):
            return f"a weight difference of shape {list(value[1][0].shape)}"
    return None


def max_rank(shape) -> int:
    """A branch costs r (N + K) 16-bit weights: past min(N, K) / 2 it outweighs what 4 bits save."""
    return min(shape) // 2


def original_float_weight(patcher, path: str, qlinear: QuantLinear) -> torch.Tensor | None:
    """The float weight an already quantized layer approximates: the original module's, with
    the weight patches Quantize Model baked in. None when there is none (a loaded quantized file)."""
    import comfy.utils
    key = qmodel.PREFIX + path
    original = patcher.object_patches_backup.get(key)
    if original is None:
        original = comfy.utils.get_attr(patcher.model, key)
    if original is qlinear or isinstance(original, QuantLinear) or isinstance(original.weight, QuantWeight):
        return None
    backup = patcher.backup.get(key + ".weight")
    w = backup.weight if backup is not None and not isinstance(backup.weight, QuantWeight) else original.weight
    return qmodel.merged_float(w, getattr(qlinear, "baked_patches", None), key + ".weight")


@torch.no_grad()
def best_smoothing(w: torch.Tensor, act_absmax: torch.Tensor, rows: torch.Tensor, rank: int, method: str, spec,
                   dtype: torch.dtype) -> torch.Tensor:
    """The SmoothQuant factors, over ``ALPHA_GRID``, whose full SVDQuant layer (branch plus the
    residual quantized in ``spec``) has the best output SQNR on the calibration ``rows``: the
    best alpha moves with how much of the outliers the branch absorbs, layer by layer."""
    if formats.get(spec.format).problem(tuple(w.shape), spec):
        return smoothing_factors(act_absmax, w, 0.5).to(w.device)
    best, best_db = None, -float("inf")
    for alpha in ALPHA_GRID:
        smooth = smoothing_factors(act_absmax, w, alpha).to(w.device)
        branch, _ = make_branch(w, rank, smooth, method)
        db = qmodel.layer_sqnr_db(w, quantize_branched(w, branch, spec, dtype), rows)
        if db > best_db:
            best, best_db = smooth, db
    return best


@torch.no_grad()
def branch_model(patcher, layers: list[str], rank: int, smooth_alpha: float, stats: dict | None = None,
                 method: str = "randomized", report_spec=None,
                 progress: Callable[[int], None] | None = None) -> qmodel.Result:
    """Branch ``layers`` of a clone of ``patcher``: fitted to the quantization error where the model
    has quantized layers, else the SVDQuant split. ``report_spec``: the format the report compares
    plain and branched quantization in (before Quantize Model) and the one ``AUTO_ALPHA`` searches
    in (w4a4 g64 without one)."""
    after = bool(qmodel.quantized_layers(patcher))
    search_spec = report_spec if report_spec is not None else formats.Spec("w4a4", 64)
    dtype = qmodel.compute_dtype(patcher)
    device = patcher.load_device
    clone = patcher.clone()
    rows = []
    for i, path in enumerate(layers):
        module = patcher.get_model_object(qmodel.PREFIX + path)
        layer_stats = None if stats is None else stats.get(path)
        sample = layer_stats.sample() if layer_stats is not None and layer_stats.rows else None
        n, k = module.weight.shape
        if after:
            if not isinstance(module, QuantLinear):
                continue  # kept in high precision by Quantize Model: no quantization error to fit
            w = original_float_weight(patcher, path, module)
            qw = module.weight.retarget(device=device)
            start = time.perf_counter()
            branched, energy = fit_error_branch(w.to(device), qw, rank, method)
            ms = 1000 * (time.perf_counter() - start)
            smooth = qw.smooth
            plain_db, branched_db = qmodel.layer_sqnr_db(w, qw, sample), qmodel.layer_sqnr_db(w, branched, sample)
            new = QuantLinear(branched.retarget(device=patcher.offload_device), qmodel.clean_bias(patcher, path))
            new.baked_patches = getattr(module, "baked_patches", None)
        else:
            w = qmodel.float_weight(patcher, path, device=device)
            start = time.perf_counter()
            smooth = None
            if layer_stats is not None and smooth_alpha == AUTO_ALPHA and sample is not None:
                smooth = best_smoothing(w, layer_stats.absmax, sample, rank, method, search_spec, dtype)
            elif layer_stats is not None and smooth_alpha > 0:
                smooth = smoothing_factors(layer_stats.absmax, w, smooth_alpha).to(device)
            branch, energy = make_branch(w, rank, smooth, method)
            ms = 1000 * (time.perf_counter() - start)
            plain_db = branched_db = None
            if report_spec is not None and not formats.get(report_spec.format).problem((n, k), report_spec):
                plain_db = qmodel.layer_sqnr_db(w, QuantWeight.quantize(w, report_spec, dtype), sample)
                branched_db = qmodel.layer_sqnr_db(w, quantize_branched(w, branch, report_spec, dtype), sample)
            store = patcher.offload_device
            branch = Branch(branch.down.to(store), branch.up.to(store), None if smooth is None else smooth.to(store))
            key = f"{qmodel.PREFIX}{path}.weight"
            # a LoRA on the input is merged into the weight the SVD saw: the copy holds that weight
            weight = w.to(device=store, dtype=module.weight.dtype) if key in patcher.patches \
                else qmodel.clean_param(patcher, path, "weight")
            new = calibrate.module_copy(module, {"weight": weight, "bias": qmodel.clean_param(patcher, path, "bias")})
            new.accel_branch = branch
            clone.patches.pop(key, None)
        clone.add_object_patch(qmodel.PREFIX + path, new)
        act_before = act_after = None
        if layer_stats is not None:
            act_before = layer_stats.absmax.max().item()
            act_after = act_before if smooth is None else (layer_stats.absmax / smooth.cpu()).max().item()
        rows.append(LayerRow(path, f"{n}x{k}", rank, energy, act_before, act_after, plain_db, branched_db,
                             "output" if sample is not None else "weight", ms))
        del w
        if progress is not None:
            progress(i + 1)
    clone.patches_uuid = uuid.uuid4()
    return qmodel.Result(clone, rows, summarize(rows, after, rank, method))


def summarize(rows: list[LayerRow], after: bool, rank: int, method: str) -> dict:
    out = {"order": "after quantization (fits the quantization error)" if after
           else "before quantization (SVDQuant: Quantize Model packs the residual)",
           "layers branched": len(rows), "rank": rank, "svd": method,
           "branch build time s": round(sum(r.ms for r in rows) / 1000, 3)}
    if rows:
        out["mean energy in branch"] = round(sum(r.energy for r in rows) / len(rows), 4)
        out["ms per layer"] = round(sum(r.ms for r in rows) / len(rows), 2)
    pairs = [(r.sqnr_plain_db, r.sqnr_branched_db) for r in rows if r.sqnr_plain_db is not None]
    if pairs:
        out["median SQNR plain dB"] = qmodel.upper_median([p for p, _ in pairs])
        out["median SQNR branched dB"] = qmodel.upper_median([b for _, b in pairs])
    return out
