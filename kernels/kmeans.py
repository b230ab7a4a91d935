"""Nearest-centroid search and k-means, batched over leading dims (e.g. one codebook per head).

Ops (each with ``_reference``, ``_triton`` and a dispatcher, see ``dispatch.py``):

- ``nearest_centroid(x [..., N, D], centroids [..., K, D]) -> (indices int64 [..., N], sq_dist float32 [..., N])``
  A 2-D ``centroids`` [K, D] is one codebook shared by every leading index of ``x``.
- ``centroid_sums(x [..., N, D], indices [..., N], k, weights=None) -> (sums float32 [..., K, D], counts float32 [..., K])``
  the k-means update's scatter-add.

and ``kmeans(x, k, iters=10, seed=0, init="kmeans++", progress=None)`` built on them.

Both backends pick ``argmax(x.c - |c|^2 / 2)`` (the nearest centroid; ``|x|^2`` is the same for
every code and is left out), computed in float32 without TF32, and break exact ties toward the
lowest index, so duplicated codes resolve the same way on every path. Different summation orders
can still flip near-ties, which is why tests compare backends by agreement rate and by the chosen
code's distance. ``sq_dist`` is always recomputed as ``|x - c[index]|^2`` directly (no
cancellation), so it is exact on every path.

The reference is also the CPU path, in two passes, never materialising the N x K scores
(blocks of ``_BLOCK_N x _BLOCK_K`` stay in cache). A screen computes half squared distances
``[x, |x|^2/2, 1] . [-c, 1, |c|^2/2]`` one GEMM per block, in bfloat16 where the CPU multiplies it
natively (else float32), and reduces runs of ``_GROUP`` consecutive codes to their minimum (codes
permuted so that is an elementwise min over a middle axis, on the scores' bits as integers:
non-negative floats order like their bit patterns, and integer min is the fastest reduction).
Then every group whose screened minimum could hold the nearest code, given the screen's rounding
bound (``_screen_slack``), is scored again exactly in float32 (usually 1-3 groups); the others
provably cannot hold it, so the result is the float32 search's. On several cores, row ranges run
in threads (``_in_threads``). Timings against faiss: README (VQ latent compression) and
``lab/bench/bench_vq.py``.

The Triton kernel keeps a running (max, argmax) per row in registers while it loops over code
blocks, so it never writes the N x K matrix either (FlashAssign-style tiling).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

from . import dispatch
from .dispatch import tl, triton

# CPU blocking: a 512 x 2048 block of bfloat16 screen scores (2 MiB) measured fastest.
_BLOCK_N = 512
_BLOCK_K = 2048
_GROUP = 16  # codes reduced per vectorised amax step
_SEED_ROUNDS = 128  # k-means++ picks one code per round up to this many codes, then several per round
_PARALLEL_MIN_SCORES = 1 << 24  # below this many x-code pairs one thread is quicker than several
_SPAN_BLOCKS = 4  # row blocks screened before one refinement pass over their rows


# ---------------------------------------------------------------- shapes


def _flatten(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """[..., N, D] and [..., K, D] (or a shared [K, D]) -> [B, N, D], [B, K, D], leading shape."""
    if x.dim() < 2 or centroids.dim() < 2:
        raise ValueError(f"x and centroids must be [..., N, D] and [..., K, D]; got {tuple(x.shape)} and {tuple(centroids.shape)}")
    if x.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"x has D={x.shape[-1]} but the centroids have D={centroids.shape[-1]}")
    lead = tuple(x.shape[:-2])
    n, d = x.shape[-2:]
    if centroids.dim() == 2:
        # One codebook for everything: a single batch of all vectors.
        return x.reshape(1, -1, d), centroids.unsqueeze(0), lead
    if tuple(centroids.shape[:-2]) != lead:
        raise ValueError(f"leading dims differ: x {tuple(x.shape)} vs centroids {tuple(centroids.shape)}")
    return x.reshape(-1, n, d), centroids.reshape(-1, centroids.shape[-2], d), lead


def _unflatten(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, N, ...] back to x's leading shape + [N, ...]."""
    return t.reshape(*x.shape[:-1], *t.shape[2:])


def _exact_sq_dist(x: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """|x - c[index]|^2 in float32 for [B, N, D], [B, K, D], [B, N]."""
    chosen = torch.gather(centroids, 1, indices.unsqueeze(-1).expand(-1, -1, centroids.shape[-1]))
    return (x.float() - chosen.float()).square_().sum(-1)


# ---------------------------------------------------------------- nearest_centroid


def nearest_centroid_reference(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xb, cb, _ = _flatten(x, centroids)
    b, n, d = xb.shape
    k = cb.shape[1]
    if k == 0:
        raise ValueError("the codebook is empty")
    xf, cf = xb.float(), cb.float()
    xa = torch.cat([xf, xf.new_ones(b, n, 1)], -1)
    screen = _screen_dtype(x.device)
    aug, blocks = _augmented_blocks(cf, screen)
    groups = aug.shape[1] // _GROUP
    if groups:
        half_sq = 0.5 * xf.square().sum(-1, keepdim=True)
        x_screen = torch.cat([xf, *_hi_lo(half_sq, screen), xf.new_ones(b, n, 2)], -1).to(screen)
        slack = _screen_slack(xf, cf, screen)
        ordered = _ORDERED_INT[screen]
        u = _unit_roundoff(screen)
    best_i = torch.empty(b, n, dtype=torch.long, device=x.device)
    widest = max(block.shape[-1] for _, block in blocks)
    # Rows per block: about _BLOCK_N x _BLOCK_K scores, a block that stays in cache.
    rows = max(1, _BLOCK_N * _BLOCK_K // (b * widest))

    # Rows refined together: the refinement's few dozen small ops run once per span of blocks.
    span = rows * _SPAN_BLOCKS

    def search(spans: Iterable[int]) -> None:
        # Buffers reused by every block: a fresh 4 MiB allocation per block costs more than its GEMM.
        if groups:
            buf = torch.empty(b * min(rows, n) * widest, device=x.device, dtype=screen)
            group_min = torch.empty(b, min(span, n), groups, device=x.device, dtype=ordered)
        for s0 in spans:
            s1 = min(n, s0 + span)
            if not groups:  # a small codebook: one block, plain argmax
                best_i[:, s0:s1] = torch.bmm(xa[:, s0:s1], blocks[0][1]).argmax(-1)
                continue
            for n0 in range(s0, s1, rows):
                m = min(rows, s1 - n0)
                for g0, block in blocks:
                    kk = block.shape[-1]
                    dist = torch.bmm(x_screen[:, n0:n0 + m], block, out=buf[:b * m * kk].view(b, m, kk))
                    # Screened half squared distances are >= 0 up to rounding; the bits of a non-negative
                    # float order like the integers they spell, and integer min is the fast reduction.
                    torch.amin(dist.view(ordered).view(b, m, _GROUP, kk // _GROUP), 2,
                               out=group_min[:, n0 - s0:n0 - s0 + m, g0:g0 + kk // _GROUP])
            best_i[:, s0:s1] = _refine(xa[:, s0:s1], aug, group_min[:, :s1 - s0], slack[:, s0:s1], screen, u)

    threads = torch.get_num_threads()
    if x.device.type == "cpu" and threads > 1 and n >= 2 * span and b * n * k >= _PARALLEL_MIN_SCORES:
        _in_threads(search, range(0, n, span), threads)
    else:
        with _no_tf32(x.device):
            search(range(0, n, span))
    return _unflatten(best_i, x), _unflatten(_exact_sq_dist(xb, cb, best_i), x)


def _refine(xs, aug, gmin, slack, screen, u) -> torch.Tensor:
    """The exact (float32) winner among the groups whose screened minimum could hold it.

    A group's true half distances are all >= its screened minimum less the screen's rounding
    (or >= 0 when that minimum is negative, which only rounding makes), and the row's best is
    <= the row's screened minimum plus it: every group whose lower bound is under that is a
    candidate (usually 1-3 per row), and no other group can hold the nearest code.
    """
    b, m, groups = gmin.shape
    d1 = aug.shape[-1]
    row_min = gmin.amin(-1).view(screen).float()
    threshold = (row_min + u * row_min.abs() + 2 * slack) / (1 - u)
    # rounded up into the screen's dtype, so the integer comparison errs towards more candidates
    limit = (threshold * (1 + 2 * u)).to(screen).view(gmin.dtype)
    bi, ri, gi = _candidates(gmin, limit)
    row = bi * m + ri
    # index_select of whole rows is a plain copy, several times faster than advanced indexing
    codes = aug.reshape(b * groups, _GROUP * d1).index_select(0, bi * groups + gi).view(-1, _GROUP, d1)
    vectors = xs.reshape(b * m, d1).index_select(0, row)
    scores = torch.bmm(codes, vectors[..., None]).squeeze(-1)                # [P, R]
    best, pos = scores.max(-1)                                               # first max: lowest code
    row_best = torch.full((b * m,), float("-inf"), device=xs.device).scatter_reduce_(0, row, best, "amax")
    code = torch.where(best == row_best[row], gi * _GROUP + pos, torch.iinfo(torch.long).max)
    out = torch.full((b * m,), torch.iinfo(torch.long).max, dtype=torch.long, device=xs.device)
    return out.scatter_reduce_(0, row, code, "amin").view(b, m)


def _candidates(gmin: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, row, group) of every group whose minimum is <= its row's ``limit``. Runs of _GROUP
    groups are tested first by their minimum, so the full comparison only touches a few runs. A
    run is groups ``s, s + S, s + 2S, ...`` (S = groups // _GROUP): a strided run's minimum is a
    vectorised reduction over a middle axis, a consecutive one's is not."""
    b, m, groups = gmin.shape
    runs = groups // _GROUP
    if runs < 4:
        return (gmin <= limit[..., None]).nonzero(as_tuple=True)
    head = gmin[..., :runs * _GROUP].view(b, m, _GROUP, runs)
    bi, ri, si = (head.amin(2) <= limit[..., None]).nonzero(as_tuple=True)
    row = bi * m + ri
    member = (row * groups + si)[:, None] + runs * torch.arange(_GROUP, device=gmin.device)
    members = gmin.reshape(-1).index_select(0, member.reshape(-1)).view(-1, _GROUP)
    pi, j = (members <= limit.reshape(b * m).index_select(0, row)[:, None]).nonzero(as_tuple=True)
    found = (bi[pi], ri[pi], si[pi] + runs * j)
    if runs * _GROUP == groups:
        return found
    tb, tr, tg = (gmin[..., runs * _GROUP:] <= limit[..., None]).nonzero(as_tuple=True)
    return tuple(torch.cat([f, t]) for f, t in zip(found, (tb, tr, tg + runs * _GROUP)))


def _screen_dtype(device: torch.device) -> torch.dtype:
    """The screen's dtype: bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX: about
    twice float32's GEMM rate and half the bytes), else float32."""
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_native_bf16() else torch.float32


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a private op: absent in some builds
        return False


_ORDERED_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _hi_lo(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (float32) as two ``dtype`` parts whose sum is ``t`` to ~u^2 (inf: inf and 0)."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).nan_to_num_(0.0).to(dtype)


def _screen_slack(x: torch.Tensor, c: torch.Tensor, screen: torch.dtype) -> torch.Tensor:
    """[B, N]: bound on |screened - float32 half squared distance| of any code for each vector,
    before the output's own rounding: rounding x and c to the screen's dtype (2u |x_i||c_i| per
    product, at most 2u |x| max|c|), the squared norms' low parts (u^2 each), and float32
    accumulation on both sides ((D + 4) 2^-24 of the absolute sum, twice)."""
    u = _unit_roundoff(screen) if screen != torch.float32 else 0.0
    acc = 2 * (x.shape[-1] + 4) * _unit_roundoff(torch.float32)
    norm = c.norm(dim=-1).amax(-1, keepdim=True)                 # [B, 1]
    x_norm = x.norm(dim=-1)                                      # [B, N]
    halves = 0.5 * (x_norm.square() + norm.square())
    return (2 * u + u * u + acc) * x_norm * norm + (u * u + acc) * halves + 1e-30


def _in_threads(work: Callable[[Iterable[int]], None], blocks: range, threads: int) -> None:
    """Run ``work`` on ``threads`` Python threads at once, each op single-threaded; each thread's
    ``work`` pulls the next row block from one shared queue until none is left.

    The blocked search issues hundreds of small ops; with torch's intra-op threads each is a
    parallel region with a barrier, which a descheduled thread stalls when the cores are shared.
    Independent row blocks in Python threads (torch releases the GIL inside ops) need no barriers,
    and a shared queue keeps a descheduled thread from holding up the end. Torch's thread count is
    1 meanwhile.
    """
    queue = iter(blocks)
    lock = threading.Lock()

    def pull() -> Iterator[int]:
        while True:
            with lock:
                block = next(queue, None)
            if block is None:
                return
            yield block

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(work, pull()) for _ in range(threads)]:
                f.result()
    finally:
        torch.set_num_threads(saved)


def _augmented_blocks(c: torch.Tensor, screen: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """The augmented codes ``[c, -|c|^2/2]`` [B, K', D+1] (exact scores ``[x, 1] . aug``) and the
    screen's blocks.

    Codebooks of at least ``4 * _GROUP`` codes are padded to a multiple of _GROUP with codes that
    score -inf (zero vector, bias -inf), K' codes in all. The screen computes half squared distances
    ``[x, |x|^2/2 (hi, lo), 1, 1] . [-c, 1, 1, |c|^2/2 (hi, lo)]`` in ``screen``'s dtype (norms in two
    parts, so only the products are rounded). Each block is a [B, D+4, kk] matrix whose codes are
    permuted: code ``g * R + r`` of the block (R = _GROUP) goes to column ``r * G + g``, so viewing
    its scores as [.., R, G], a reduction over R (vectorised, elementwise) gives each run of R
    consecutive codes; blocks are returned with the index of their first group. Smaller codebooks
    are one float32 block of ``aug`` in plain order (and no groups: K' = 0 groups' worth).
    """
    b, k, d = c.shape
    half_sq = 0.5 * c.square().sum(-1, keepdim=True)
    aug = torch.cat([c, -half_sq], -1)
    if k < 4 * _GROUP:
        return aug[:, :0], [(0, aug.transpose(1, 2).contiguous())]
    pad = -k % _GROUP
    if pad:
        filler = aug.new_zeros(b, pad, d + 1)
        filler[..., -1] = float("-inf")
        aug = torch.cat([aug, filler], 1)
        half_sq = torch.cat([half_sq, half_sq.new_full((b, pad, 1), float("inf"))], 1)
    scr = torch.cat([-aug[..., :d].to(screen), aug.new_ones(*aug.shape[:2], 2).to(screen),
                     *_hi_lo(half_sq, screen)], -1)
    e = d + 4
    blocks = []
    for k0 in range(0, scr.shape[1], _BLOCK_K):
        blk = scr[:, k0:k0 + _BLOCK_K]
        g = blk.shape[1] // _GROUP
        blk = blk.reshape(b, g, _GROUP, e).transpose(1, 2).reshape(b, g * _GROUP, e)
        blocks.append((k0 // _GROUP, blk.transpose(1, 2).contiguous()))
    return aug, blocks


def nearest_centroid_triton(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xb, cb, _ = _flatten(x, centroids)
    xb, cb = xb.contiguous(), cb.contiguous()
    b, n, d = xb.shape
    k = cb.shape[1]
    half_norm = 0.5 * cb.float().square().sum(-1)
    best_i = torch.empty(b, n, dtype=torch.int64, device=x.device)
    block_n, block_k, block_d = _triton_blocks(d)
    grid = (triton.cdiv(n, block_n), b)
    _kernels()["nearest"][grid](
        xb, cb, half_norm, best_i, n, k, d,
        xb.stride(0), xb.stride(1), cb.stride(0), cb.stride(1), half_norm.stride(0), best_i.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return _unflatten(best_i, x), _unflatten(_exact_sq_dist(xb, cb, best_i), x)


def _triton_blocks(d: int) -> tuple[int, int, int]:
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    if dispatch.interpreting():
        return 32, 32, 16 if d <= 16 else 32  # small tiles: the interpreter runs them in numpy
    return 128, 64, block_d


_CHECK_VECTORS = 256   # vectors in the first-use check's slice


def _supported(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid (L2) of each vector and its squared distance.

    ``x`` [..., N, D]; ``centroids`` [..., K, D] with the same leading dims, or [K, D] shared.
    Returns int64 indices [..., N] and float32 squared distances [..., N].
    """
    # Near-ties may pick another code on either path: the first-use check compares the distances.
    return dispatch.route("nearest_centroid", nearest_centroid_triton, nearest_centroid_reference, (x, centroids),
                          (x, centroids), _supported(x, centroids), lambda a: (a[0][..., :_CHECK_VECTORS, :], a[1]),
                          lambda got, want: dispatch.difference(got[1], want[1]))


# ---------------------------------------------------------------- centroid_sums (the k-means update)


def _flatten_assignments(x, indices, weights):
    if indices.shape != x.shape[:-1]:
        raise ValueError(f"indices {tuple(indices.shape)} must be x's shape without D {tuple(x.shape[:-1])}")
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match indices {tuple(indices.shape)}")
    n, d = x.shape[-2:]
    xb = x.reshape(-1, n, d)
    wb = None if weights is None else weights.reshape(-1, n).float()
    return xb, indices.reshape(-1, n), wb


def centroid_sums_reference(x: torch.Tensor, indices: torch.Tensor, k: int,
                            weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xb, ib, wb = _flatten_assignments(x, indices, weights)
    b, n, d = xb.shape
    flat = (ib + torch.arange(b, device=x.device)[:, None] * k).reshape(-1)
    values = xb.float().reshape(-1, d)
    w = torch.ones(b * n, device=x.device) if wb is None else wb.reshape(-1)
    if wb is not None:
        values = values * w[:, None]
    sums = torch.zeros(b * k, d, device=x.device).index_add_(0, flat, values)
    counts = torch.zeros(b * k, device=x.device).index_add_(0, flat, w)
    return sums.reshape(*x.shape[:-2], k, d), counts.reshape(*x.shape[:-2], k)


def centroid_sums_triton(x: torch.Tensor, indices: torch.Tensor, k: int,
                         weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xb, ib, wb = _flatten_assignments(x, indices, weights)
    xb, ib = xb.contiguous(), ib.contiguous()
    b, n, d = xb.shape
    sums = torch.zeros(b, k, d, device=x.device, dtype=torch.float32)
    counts = torch.zeros(b, k, device=x.device, dtype=torch.float32)
    wb = torch.ones(b, n, device=x.device) if wb is None else wb.contiguous()
    block_n, _, block_d = _triton_blocks(d)
    grid = (triton.cdiv(n, block_n), b)
    _kernels()["sums"][grid](
        xb, ib, wb, sums, counts, n, k, d,
        xb.stride(0), xb.stride(1), ib.stride(0), wb.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d)
    return sums.reshape(*x.shape[:-2], k, d), counts.reshape(*x.shape[:-2], k)


def centroid_sums(x: torch.Tensor, indices: torch.Tensor, k: int,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code sum of the (weighted) vectors assigned to it, and the (weighted) count.

    Float32 results. The Triton path adds with atomics, so on a GPU its sums can differ from
    run to run in the last bits; the reference (CPU) path is deterministic.
    """
    n = _CHECK_VECTORS
    return dispatch.route("centroid_sums", centroid_sums_triton, centroid_sums_reference, (x, indices, k, weights),
                          (x, indices) if weights is None else (x, indices, weights), _supported(x),
                          lambda a: (a[0][..., :n, :], a[1][..., :n], a[2], None if a[3] is None else a[3][..., :n]))


# ---------------------------------------------------------------- k-means


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, init: str | torch.Tensor = "kmeans++",
           progress: Callable[[int], None] | None = None,
           weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` [..., N, D], one independent problem per leading index.

    ``init``: ``"kmeans++"`` (D^2 sampling; exact up to 128 codes, above that several codes are
    picked per round, k-means||-style, so seeding costs about one iteration) or ``"random"``
    (distinct random vectors), or a tensor [..., K, D] of starting centroids (a warm start, e.g.
    the previous step's). Codes that end an iteration with no vectors are re-seeded at
    vectors drawn with probability proportional to their squared error, which never raises the
    distortion. ``weights`` [..., N] (optional, >= 0) weight each vector (used to shrink a
    codebook by usage). Deterministic for a given ``seed`` on a given device.

    ``progress(done)`` is called with the number of finished iterations (0 while seeding), so a
    caller can drive a progress bar of ``iters`` steps and raise to interrupt.

    Returns centroids [..., K, D] (x's float dtype) and the indices [..., N] of each vector's
    nearest returned centroid.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [..., N, D]; got {tuple(x.shape)}")
    n, d = x.shape[-2:]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of vectors N={n}")
    if n > 2 ** 24:
        raise ValueError(f"N={n} vectors is more than k-means samples from (2^24); subsample first")
    warm = isinstance(init, torch.Tensor)
    if warm and tuple(init.shape) != (*x.shape[:-2], k, d):
        raise ValueError(f"init centroids must be {(*x.shape[:-2], k, d)}, got {tuple(init.shape)}")
    if not warm and init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++', 'random' or a tensor of centroids, not {init!r}")
    report = progress or (lambda done: None)
    gen = torch.Generator().manual_seed(int(seed))
    xb = x.reshape(-1, n, d).float()
    wb = None if weights is None else weights.reshape(-1, n).float()
    if wb is not None and bool((wb < 0).any()):
        raise ValueError("weights must be >= 0")
    c = init.reshape(-1, k, d).float().clone() if warm else _seed(xb, k, init, gen, wb, report)
    prev = None
    for it in range(iters):
        idx, d2 = nearest_centroid(xb, c)
        if prev is not None and torch.equal(idx, prev):
            break  # converged: the means would not move
        sums, counts = centroid_sums(xb, idx, k, wb)
        c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1e-30)[..., None], c)
        _reseed_dead(xb, c, counts, d2, gen, wb)
        prev = idx
        report(it + 1)
    report(iters)
    c = c.to(x.dtype) if x.dtype.is_floating_point else c
    idx, _ = nearest_centroid(xb, c)
    return c.reshape(*x.shape[:-2], k, d), idx.reshape(x.shape[:-1])


def _sample(weights: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """m distinct indices per row of [B, N] weights, drawn proportionally (uniform if all zero)."""
    w = weights.detach().float().cpu().clamp_min(0)
    total = w.sum(-1, keepdim=True)
    p = torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / w.shape[-1]))
    # A tiny floor keeps multinomial valid when fewer than m vectors have non-zero weight.
    p = p + 1e-12
    return torch.multinomial(p, m, replacement=False, generator=gen).to(weights.device)


def _gather_rows(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.gather(xb, 1, rows.unsqueeze(-1).expand(-1, -1, xb.shape[-1]))


def _seed(xb, k, init, gen, wb, report) -> torch.Tensor:
    b, n, d = xb.shape
    base = torch.ones(b, n, device=xb.device) if wb is None else wb
    if init == "random":
        return _gather_rows(xb, _sample(base, k, gen)).clone()
    c = torch.empty(b, k, d, device=xb.device)
    c[:, :1] = _gather_rows(xb, _sample(base, 1, gen))
    min_d2 = (xb - c[:, :1]).square().sum(-1)
    picked = 1
    per_round = max(1, math.ceil((k - 1) / _SEED_ROUNDS)) if k > _SEED_ROUNDS else 1
    while picked < k:
        m = min(per_round, k - picked)
        new = _gather_rows(xb, _sample(min_d2 * base, m, gen))
        c[:, picked:picked + m] = new
        if m <= 4:  # few new codes: direct differences beat a search call
            near = (xb[:, :, None, :] - new[:, None]).square().sum(-1).amin(-1)
        else:
            near = nearest_centroid(xb, new)[1]
        min_d2 = torch.minimum(min_d2, near)
        picked += m
        report(0)
    return c


def _reseed_dead(xb, c, counts, d2, gen, wb) -> None:
    """Move codes that got no vectors onto vectors with large error (in place)."""
    dead = counts <= 0
    if not bool(dead.any()):
        return
    for bi in torch.nonzero(dead.any(-1)).flatten().tolist():
        slots = torch.nonzero(dead[bi]).flatten()
        err = d2[bi] if wb is None else d2[bi] * wb[bi]
        m = min(len(slots), int((err > 0).sum()))
        if m == 0:
            continue  # every vector sits on a code already: nothing to gain
        rows = _sample(err[None], m, gen)[0]
        c[bi, slots[:m]] = xb[bi, rows]


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """Float32 matmuls on CUDA without TF32 inside the block (the CPU never uses TF32)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@functools.lru_cache(maxsize=1)
def _kernels() -> dict:
    @triton.jit
    def nearest_kernel(x_ptr, c_ptr, hn_ptr, out_ptr, N, K, D,
                       sxb, sxn, scb, sck, shb, sob,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # int64 offsets: B * N * D can pass 2^31 on video latents
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        best_i = tl.zeros((BLOCK_N,), tl.int64)
        x_base = x_ptr + b * sxb + rows[:, None] * sxn
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < D
                # float32 operands and IEEE dot: no TF32, and bf16 dots are avoided entirely.
                xt = tl.load(x_base + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                ct = tl.load(c_ptr + b * scb + cols[:, None] * sck + dd[None, :],
                             mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(xt, tl.trans(ct), input_precision="ieee")
            hn = tl.load(hn_ptr + b * shb + cols, mask=col_ok, other=float("inf"))
            score = acc - hn[None, :]
            blk, blk_i = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = blk > best  # strict: ties keep the earlier (lower) code
            best = tl.where(better, blk, best)
            best_i = tl.where(better, blk_i.to(tl.int64) + k0, best_i)
        tl.store(out_ptr + b * sob + rows, best_i, mask=row_ok)

    @triton.jit
    def sums_kernel(x_ptr, i_ptr, w_ptr, s_ptr, c_ptr, N, K, D,
                    sxb, sxn, sib, swb,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        code = tl.load(i_ptr + b * sib + rows, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + b * swb + rows, mask=row_ok, other=0.0)
        target = (b * K + code) * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            xt = tl.load(x_ptr + b * sxb + rows[:, None] * sxn + dd[None, :], mask=m, other=0.0).to(tl.float32)
            tl.atomic_add(s_ptr + target[:, None] + dd[None, :], xt * w[:, None], mask=m)
        tl.atomic_add(c_ptr + b * K + code, w, mask=row_ok)

    return {"nearest": nearest_kernel, "sums": sums_kernel}
