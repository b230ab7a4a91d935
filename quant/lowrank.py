"""SVDQuant's low-rank branch on one weight: SVD factors, the residual to quantize, a LoRA joining it.

With SmoothQuant factors ``s`` [K], a layer ``y = x @ W^T`` becomes

    y = (x / s) @ L1 @ L2  +  (x / s) @ R^T,     W * s = L2^T L1^T + R

with ``L1 [K, r] = V_r sqrt(S_r)``, ``L2 [r, N] = sqrt(S_r) U_r^T`` from the truncated SVD of the
smoothed weight (the ``r`` largest directions, where smoothing put the activation outliers), kept
in 16 bits; only the residual ``R`` is quantized. After quantization, the branch is fitted to the
error ``(W - deq(Q)) * s`` instead (:func:`fit_error_branch`).

A LoRA on a branched, quantized layer arrives as a dense float weight (``QuantLinear.set_weight``);
:func:`absorb_patch` recovers the low-rank factors of the difference and appends them to the branch,
so the 4-bit residual is untouched; a patch that is not low rank requantizes the residual instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .qweight import QuantWeight, branch_weight

log = logging.getLogger(__name__)

BRANCH_DTYPE = torch.bfloat16
METHODS = ("randomized", "full")


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
        return branch_weight(self.down, self.up, self.smooth)


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
