"""SVDQuant's low-rank branch on a ComfyUI model: smoothing, SVD, the 16-bit branch.

A layer ``y = x @ W^T`` is rewritten, with SmoothQuant factors ``s`` [K] from calibration, as

    y = (x / s) @ (W * s)^T = (x / s) @ L1 @ L2  +  (x / s) @ R^T,     W * s = L2^T L1^T + R

where ``L1 [K, r] = V_r sqrt(S_r)`` and ``L2 [r, N] = sqrt(S_r) U_r^T`` come from the truncated
SVD of the smoothed weight (the ``r`` largest singular directions, where smoothing put the
activation outliers) and are kept in 16 bits; only the residual ``R`` is quantized.

Two orders, both on a clone (object patches; the input model is never modified):

- **before Quantize Model** (SVDQuant): :func:`branch_model` replaces each chosen layer with a
  copy of the same module carrying a :class:`Branch` (``accel_branch``); it still computes
  ``x @ W^T`` exactly. Quantize Model then packs only ``R`` with these ``s`` (:func:`quantize_branched`)
  and keeps ``L1, L2`` in the ``QuantWeight``.
- **after Quantize Model** (low-rank error compensation): :func:`branch_model` fits the branch
  to the quantization error ``(W - deq(Q)) * s`` of the already packed layer
  (:func:`fit_error_branch`); nothing is requantized.

A LoRA loaded after a branched, quantized layer arrives as a dense float weight through
ComfyUI's weight protocol (``QuantLinear.set_weight``); :func:`absorb_patch` takes the
difference to the current weight, which is exactly low rank for a LoRA, recovers its factors
with a rank-revealing randomized range finder, and appends them to the branch (the rank
grows, the 4-bit residual is untouched). A patch that is not low rank (a full-weight diff,
LoKr at high rank) falls back to requantizing the residual.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..metrics import sqnr_db
from . import calibrate, formats, policy
from . import model as qmodel
from .linear import QuantLinear
from .qweight import QuantWeight

log = logging.getLogger(__name__)

BRANCH_DTYPE = torch.bfloat16
METHODS = ("randomized", "full")
AUTO_ALPHA = -1.0                       # smooth_alpha that asks for a per-layer search
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Branch:
    """A layer's branch before quantization: factors in the smoothed coordinates."""
    down: torch.Tensor              # [K, r] BRANCH_DTYPE
    up: torch.Tensor                # [r, N] BRANCH_DTYPE
    smooth: torch.Tensor | None     # [K] float32, or None (no calibration)

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def weight(self) -> torch.Tensor:
        """The branch as a float32 [N, K] weight in the layer's own coordinates."""
        w = self.up.float().t() @ self.down.float().t()
        return w if self.smooth is None else w / self.smooth[None, :].to(w.device)


# ---------------------------------------------------------------- the math


@torch.no_grad()
def svd_factors(w: torch.Tensor, rank: int, method: str = "randomized", niter: int = 2, oversample: int = 16,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``w [N, K] ~= up^T @ down^T`` with ``down [K, r]``, ``up [r, N]`` (float32), and the
    fraction of ``||w||_F^2`` the rank-``r`` approximation captures."""
    w = w.float()
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].t()
    elif method == "randomized":
        q = min(rank + oversample, *w.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    else:
        raise ValueError(f"unknown SVD method {method!r}; use one of {METHODS}")
    total = w.pow(2).sum().item()
    energy = s.pow(2).sum().item() / total if total > 0 else 1.0
    root = s.sqrt()
    return v * root[None, :], (u * root[None, :]).t().contiguous(), energy


def make_branch(w: torch.Tensor, rank: int, smooth: torch.Tensor | None, method: str = "randomized"
                ) -> tuple[Branch, float]:
    """SVD of the smoothed weight; returns the branch and the energy it captures."""
    ws = w.float() if smooth is None else w.float() * smooth[None, :].to(w.device)
    down, up, energy = svd_factors(ws, rank, method)
    return Branch(down.to(BRANCH_DTYPE), up.to(BRANCH_DTYPE), smooth), energy


def quantize_branched(w: torch.Tensor, branch: Branch, spec, dtype: torch.dtype) -> QuantWeight:
    """Quantize Model's step for a branched layer: pack ``W - branch`` with the branch's smoothing
    (the residual is taken against the 16-bit factors as stored, so their rounding goes into it)."""
    qw = QuantWeight.quantize(w.float() - branch.weight().to(w.device), spec, dtype, smooth=branch.smooth)
    return qw.with_branch(branch.down, branch.up)


@torch.no_grad()
def fit_error_branch(w: torch.Tensor, qw: QuantWeight, rank: int, method: str = "randomized"
                     ) -> tuple[QuantWeight, float]:
    """The already packed ``qw`` plus a branch fitted to its quantization error against ``w``;
    returns it and the fraction of the error's energy the branch captures."""
    err = w.float().to(qw.device) - qw.dequantize(torch.float32)
    if qw.smooth is not None:
        err = err * qw.smooth[None, :]
    down, up, energy = svd_factors(err, rank, method)
    return qw.with_branch(down.to(BRANCH_DTYPE), up.to(BRANCH_DTYPE)), energy


@torch.no_grad()
def lowrank_of(delta: torch.Tensor, max_rank: int, tol: float, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factors ``down [K, r]``, ``up [r, N]`` with ``||delta - up^T down^T||_F <= tol`` and r as
    small as the singular values allow, or None when that needs more than ``max_rank``."""
    n, k = delta.shape
    g = torch.Generator(device=delta.device).manual_seed(seed)
    q = min(8, max_rank)
    while True:
        basis, _ = torch.linalg.qr(delta @ torch.randn(k, q, generator=g, device=delta.device))
        coeffs = basis.t() @ delta                               # [q, K]
        if torch.linalg.matrix_norm(delta - basis @ coeffs).item() <= tol:
            break
        if q >= max_rank:
            return None
        q = min(2 * q, max_rank)
    u, s, vh = torch.linalg.svd(coeffs, full_matrices=False)
    tail = s.pow(2).flip(0).cumsum(0).flip(0).sqrt()            # tail[i] = ||s[i:]||
    r = int((tail > tol / 2).sum().item())
    root = s[:r].sqrt()
    return (vh[:r].t() * root[None, :]), ((basis @ u[:, :r]) * root[None, :]).t()


def absorb_patch(qw: QuantWeight, w_new: torch.Tensor, seed: int | None = None, max_rank: int = 256,
                 rtol: float = 1e-3) -> QuantWeight:
    """A branched ``qw`` computing ``w_new`` (its dequantized weight plus a patch, e.g. a LoRA):
    the patch's low-rank factors appended to the branch, or, when it is not low rank, ``w_new``
    requantized around the same branch."""
    w_new = w_new.to(device=qw.device, dtype=torch.float32)
    delta = w_new - qw.dequantize(torch.float32)
    if qw.smooth is not None:
        delta = delta * qw.smooth[None, :]
    norm = torch.linalg.matrix_norm(delta).item()
    if norm == 0.0:
        return qw
    # fp32 rounding of (dequantized + patch) is noise, not patch: never ask for more than it allows
    floor = 1e-6 * torch.linalg.matrix_norm(w_new * (1 if qw.smooth is None else qw.smooth[None, :])).item()
    room = max(0, min(max_rank, *qw.shape) - qw.rank)
    factors = lowrank_of(delta, room, max(rtol * norm, floor), seed=0 if seed is None else seed % (2 ** 31)) \
        if room else None
    if factors is None:
        log.info("a weight patch on a branched %s layer %s is not low rank within %d: requantized",
                 qw.spec.format, tuple(qw.shape), room)
        return qw.requantize(w_new, seed)
    down, up = factors
    old_down, old_up = qw.branch
    return qw.with_branch(torch.cat([old_down, down.to(old_down.dtype)], 1),
                          torch.cat([old_up, up.to(old_up.dtype)], 0))


# ---------------------------------------------------------------- the model


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


@dataclass
class Result:
    model: object
    rows: list[LayerRow] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


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
        chosen = plan.spec is not None and (plan.reason.startswith("override") or plan.role == "linear")
        if chosen:
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
    w = w.to(torch.float32, copy=True)
    if getattr(qlinear, "baked_patches", None):
        import comfy.lora
        w = comfy.lora.calculate_weight(qlinear.baked_patches, w, key + ".weight")
    return w


@torch.no_grad()
def _sqnr(w: torch.Tensor, qw: QuantWeight, rows: torch.Tensor | None) -> float:
    if rows is not None and rows.shape[0]:
        return qmodel.output_sqnr_db(w, qw, rows)
    return qmodel.weight_sqnr_db(w, qw)


@torch.no_grad()
def best_smoothing(w: torch.Tensor, act_absmax: torch.Tensor, rows: torch.Tensor, rank: int, method: str, spec,
                   dtype: torch.dtype) -> torch.Tensor:
    """The SmoothQuant factors, over ``ALPHA_GRID``, whose full SVDQuant layer (branch plus the
    residual quantized in ``spec``) has the best output SQNR on the calibration ``rows``: the
    best alpha moves with how much of the outliers the branch absorbs, layer by layer."""
    if formats.get(spec.format).problem(tuple(w.shape), spec):
        return calibrate.smoothing_factors(act_absmax, w, 0.5).to(w.device)
    best, best_db = None, -float("inf")
    for alpha in ALPHA_GRID:
        smooth = calibrate.smoothing_factors(act_absmax, w, alpha).to(w.device)
        branch, _ = make_branch(w, rank, smooth, method)
        db = _sqnr(w, quantize_branched(w, branch, spec, dtype), rows)
        if db > best_db:
            best, best_db = smooth, db
    return best


@torch.no_grad()
def branch_model(patcher, layers: list[str], rank: int, smooth_alpha: float, stats: dict | None = None,
                 method: str = "randomized", report_spec=None,
                 progress: Callable[[int], None] | None = None) -> Result:
    """Branch ``layers`` of a clone of ``patcher``. A model with quantized layers gets the
    after-quantization fit on those; otherwise the SVDQuant split (Quantize Model packs the
    residual). ``report_spec``: the format the report compares plain and branched quantization
    in (before order). ``smooth_alpha`` ``AUTO_ALPHA``: searched per layer (:func:`best_smoothing`,
    in ``report_spec``, w4a4 g64 without one) on the calibration rows."""
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
            plain_db, branched_db = _sqnr(w, qw, sample), _sqnr(w, branched, sample)
            new = QuantLinear(branched.retarget(device=patcher.offload_device), qmodel.clean_bias(patcher, path))
            new.baked_patches = getattr(module, "baked_patches", None)
        else:
            w = qmodel.float_weight(patcher, path, device=device)
            start = time.perf_counter()
            smooth = None
            if layer_stats is not None and smooth_alpha == AUTO_ALPHA and sample is not None:
                smooth = best_smoothing(w, layer_stats.absmax, sample, rank, method, search_spec, dtype)
            elif layer_stats is not None and smooth_alpha > 0:
                smooth = calibrate.smoothing_factors(layer_stats.absmax, w, smooth_alpha).to(device)
            branch, energy = make_branch(w, rank, smooth, method)
            ms = 1000 * (time.perf_counter() - start)
            plain_db = branched_db = None
            if report_spec is not None and not formats.get(report_spec.format).problem((n, k), report_spec):
                plain_db = _sqnr(w, QuantWeight.quantize(w, report_spec, dtype), sample)
                branched_db = _sqnr(w, quantize_branched(w, branch, report_spec, dtype), sample)
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
    return Result(clone, rows, summarize(rows, after, rank, method))


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
        out["median SQNR plain dB"] = round(sorted(p for p, _ in pairs)[len(pairs) // 2], 2)
        out["median SQNR branched dB"] = round(sorted(b for _, b in pairs)[len(pairs) // 2], 2)
    return out
