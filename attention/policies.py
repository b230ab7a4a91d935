"""The five training-free policies: which key blocks each query block keeps.

Every policy sees the grid part of one attention call (q and k of the grid tokens in raster
order, ``[B, H, G, D]``) and returns a :class:`Plan`: an order of the grid tokens for the
queries and one for the keys (the kernel sees the reordered sequence), and for each of the
``S = G // block_size`` full query blocks a list of kept key blocks among the S full key
blocks. Tokens past the last full block, and every token outside the grid, are handled
densely by the caller. ``density`` is the fraction of the S x S block pairs to keep.

- ``sliding_tile``: 3-D tiles; each query tile keeps the nearest key tiles (a window).
- ``radial``: like a window, but the spatial reach halves each time the frame distance doubles.
- ``svg``: per head, a spatial pattern (own and nearby frames) or a temporal pattern (the
  same spatial neighbourhood in every frame), chosen by the error each gives on sampled
  query rows against exact attention (Sparse VideoGen's online profiling).
- ``svg2``: queries and keys clustered by k-means, reordered so clusters are contiguous;
  each query block keeps the key blocks with the most estimated attention mass until
  ``top_p`` of it is covered, at most the density budget (Sparse VideoGen 2).
- ``draft``: a low-resolution attention map of block-pooled q and k picks the highest-mass
  blocks of each head (DraftAttention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels.block_sparse_attention import block_mask
from . import geometry
from .layout import TokenGrid

POLICIES = ("svg", "svg2", "radial", "sliding_tile", "draft")
SPATIAL, TEMPORAL = 0, 1
# k-means in svg2: refresh the centroids every this many sparse steps of a layer; in
# between, tokens are only assigned to the stored centroids (the clusters drift slowly).
KMEANS_REFRESH_STEPS = 5
KMEANS_ITERS = 8
KMEANS_SAMPLE_PER_CLUSTER = 32   # tokens the centroids are fitted on, per cluster


@dataclass
class Plan:
    kv_indices: torch.Tensor            # [B|1, H|1, S, maxK] int32, key grid blocks
    kv_counts: torch.Tensor             # [B|1, H|1, S] int32
    q_order: torch.Tensor               # [B|1, H|1, G] long, raster index of each position
    k_order: torch.Tensor
    pattern: torch.Tensor | None = None  # [B, H] (svg) SPATIAL or TEMPORAL


@dataclass
class Problem:
    q: torch.Tensor                     # [B, H, G, D] grid queries, raster order
    k: torch.Tensor
    v: torch.Tensor
    grid: TokenGrid
    block_size: int
    density: float
    scale: float
    top_p: float = 1.0
    probe: torch.Tensor | None = None   # [r] raster indices of sampled query rows (svg)
    state: dict = field(default_factory=dict)  # per (layer, branch) memory across steps
    step: int = 0

    @property
    def blocks(self) -> int:
        return self.grid.tokens // self.block_size

    @property
    def keep(self) -> int:
        """Key blocks per query block at the requested density (at least one)."""
        return keep_count(self.density, self.blocks)


def _as_lists(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k indices [..., S, k] as sorted int32 lists and counts."""
    idx = idx.sort(-1).values.to(torch.int32)
    return idx, torch.full(idx.shape[:-1], idx.shape[-1], dtype=torch.int32, device=idx.device)


def lists_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean [..., S, S] block mask as padded sorted lists and counts."""
    counts = mask.sum(-1).to(torch.int32)
    width = max(1, int(counts.max()))
    # Kept blocks first, in ascending order (a stable sort of the negated mask).
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    return order.to(torch.int32), counts


def _static(order: torch.Tensor, score: torch.Tensor, keep: int, device) -> Plan:
    """Keep, per query block, the ``keep`` key blocks with the lowest score."""
    idx = torch.topk(score, keep, dim=-1, largest=False).indices
    lists, counts = _as_lists(idx)
    order = order.to(device)[None, None]
    return Plan(lists.to(device)[None, None], counts.to(device)[None, None], order, order)


def _tile_distances(p: Problem):
    order = geometry.tile_order(p.grid, p.block_size)
    centres = geometry.block_centres(p.grid, order, p.block_size)
    return (order, *geometry.pair_offsets(centres, geometry.tile_shape(p.grid, p.block_size)))


def sliding_tile(p: Problem) -> Plan:
    order, dt, ds, euclid = _tile_distances(p)
    # A box window (Chebyshev distance in tiles over frames, rows, columns), ties to the nearer centre.
    score = torch.maximum(dt, ds) + 1e-3 * euclid
    return _static(order, score, p.keep, p.q.device)


def radial(p: Problem) -> Plan:
    order, dt, ds, euclid = _tile_distances(p)
    # Spatial reach divided by 2 for each doubling of the frame distance (energy decay); the
    # frame distance counts frames, not tiles.
    dt = dt * geometry.tile_shape(p.grid, p.block_size)[0]
    decay = torch.exp2(torch.floor(torch.log2(dt.clamp_min(1.0))))
    score = (ds + 1.0) * decay + 1e-3 * (dt + euclid)
    return _static(order, score, p.keep, p.q.device)


@geometry.tensor_cache()
def _svg_candidates(grid: TokenGrid, block_size: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orders [2, G] and lists [2, S, keep] of the spatial and the temporal pattern."""
    spatial_order = geometry.raster_order(grid)
    temporal_order = geometry.spatial_major_order(grid)
    big = float(grid.tokens)
    dt, ds, _ = geometry.pair_offsets(geometry.block_centres(grid, spatial_order, block_size))
    spatial_score = dt * big + ds          # own frame first, then the nearest frames
    dt, ds, _ = geometry.pair_offsets(geometry.block_centres(grid, temporal_order, block_size))
    temporal_score = ds * big + dt         # own spatial neighbourhood, in every frame
    lists = [_as_lists(torch.topk(score, keep, dim=-1, largest=False).indices)[0]
             for score in (spatial_score, temporal_score)]
    return torch.stack([spatial_order, temporal_order]), torch.stack(lists)


def svg(p: Problem) -> Plan:
    orders, lists = (t.to(p.q.device) for t in _svg_candidates(p.grid, p.block_size, p.keep))
    B, H = p.q.shape[:2]
    counts = torch.full(lists.shape[:-1], lists.shape[-1], dtype=torch.int32, device=lists.device)
    if p.probe is None or p.probe.numel() == 0:
        pattern = torch.zeros(B, H, dtype=torch.long, device=p.q.device)
    else:
        truth = rows_attention(p.q, p.k, p.v, p.probe, None, p.scale)
        errors = []
        for c in range(2):
            plan = Plan(lists[c][None, None], counts[c][None, None], orders[c][None, None], orders[c][None, None])
            approx = rows_attention(p.q, p.k, p.v, p.probe, probe_key_mask(plan, p.probe, p.block_size), p.scale)
            errors.append((approx - truth).pow(2).mean((-1, -2)))
        pattern = torch.stack(errors).argmin(0)          # [B, H]
    return Plan(lists[pattern], counts[pattern], orders[pattern], orders[pattern], pattern)


def _block_means(x: torch.Tensor, order: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    """Mean of each full block of ``x`` [B, H, G, D] taken in ``order`` [B|1, H|1, G]."""
    B, H, _, D = x.shape
    idx = order[..., : n_blocks * block_size].expand(B, H, -1)
    xs = torch.gather(x.float(), 2, idx[..., None].expand(-1, -1, -1, D))
    return xs.view(B, H, n_blocks, block_size, D).mean(3)


def _block_probs(p: Problem, q_order: torch.Tensor, k_order: torch.Tensor) -> torch.Tensor:
    """Softmax over key blocks of the pooled scores: estimated attention mass [B, H, S, S]."""
    qm = _block_means(p.q, q_order, p.block_size, p.blocks)
    km = _block_means(p.k, k_order, p.block_size, p.blocks)
    return torch.softmax(torch.matmul(qm, km.transpose(-1, -2)) * p.scale, dim=-1)


def draft(p: Problem) -> Plan:
    order = geometry.tile_order(p.grid, p.block_size).to(p.q.device)[None, None]
    probs = _block_probs(p, order, order)
    B, H, S, _ = probs.shape
    # The densest block pairs of each head, as in DraftAttention, plus every row's best block
    # so that no query block is left without keys.
    flat = probs.reshape(B, H, S * S)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept.scatter_(-1, torch.topk(flat, p.keep * S, dim=-1).indices, True)
    kept = kept.view(B, H, S, S)
    kept.scatter_(-1, probs.argmax(-1, keepdim=True), True)
    lists, counts = lists_from_mask(kept)
    return Plan(lists, counts, order, order)


def _cluster_order(x: torch.Tensor, n_clusters: int, key: str, p: Problem, kmeans_ops) -> torch.Tensor:
    """Raster indices sorted by the k-means cluster of each token ([B, H, G]). The centroids are
    fitted on a sample of the tokens, kept in ``p.state`` and refitted every
    KMEANS_REFRESH_STEPS steps; in between tokens are only assigned to them."""
    stored = p.state.get(key)
    feats = x.float()
    if stored is None or stored["shape"] != tuple(feats.shape) or p.step - stored["step"] >= KMEANS_REFRESH_STEPS:
        sample = feats
        if feats.shape[-2] > KMEANS_SAMPLE_PER_CLUSTER * n_clusters:
            pick = torch.randperm(feats.shape[-2], generator=torch.Generator().manual_seed(p.step))
            sample = feats[..., pick[:KMEANS_SAMPLE_PER_CLUSTER * n_clusters].to(feats.device), :]
        # Random seeding: k-means++ costs one pass per centroid, more than the iterations here.
        centroids, _ = kmeans_ops.kmeans(sample, n_clusters, iters=KMEANS_ITERS, seed=0, init="random")
        p.state[key] = {"centroids": centroids, "shape": tuple(feats.shape), "step": p.step}
    labels, _ = kmeans_ops.nearest_centroid(feats, p.state[key]["centroids"])
    return torch.sort(labels, dim=-1, stable=True).indices


def svg2(p: Problem) -> Plan:
    from ..kernels import kmeans as kmeans_ops  # shared with the VQ nodes
    S = p.blocks
    q_order = _cluster_order(p.q, max(2, min(256, S // 2)), "svg2_q", p, kmeans_ops)
    k_order = _cluster_order(p.k, max(2, min(512, S)), "svg2_k", p, kmeans_ops)
    probs = _block_probs(p, q_order, k_order)
    ranked, idx = probs.sort(-1, descending=True)
    # Keep the fewest blocks whose mass reaches top_p, at least one, at most the budget
    # (top_p = 1 means the whole budget, even where float rounding says the mass is reached).
    before = ranked.cumsum(-1) - ranked
    if p.top_p < 1.0:
        n_keep = (before < p.top_p).sum(-1).clamp(1, p.keep)
    else:
        n_keep = torch.full_like(idx[..., 0], p.keep)
    kept = torch.zeros_like(probs, dtype=torch.bool)
    kept.scatter_(-1, idx, torch.arange(S, device=idx.device) < n_keep[..., None])
    lists, counts = lists_from_mask(kept)
    return Plan(lists, counts, q_order, k_order)


PLANNERS = {"svg": svg, "svg2": svg2, "radial": radial, "sliding_tile": sliding_tile, "draft": draft}
STATIC = {"radial", "sliding_tile"}  # the plan depends only on the grid: cached across layers


def plan(policy: str, problem: Problem) -> Plan:
    if policy not in PLANNERS:
        raise ValueError(f"unknown sparse-attention policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return PLANNERS[policy](problem)


# --- sampled query rows: exact and masked attention for a few rows -------------------------

def probe_key_mask(plan: Plan, probe: torch.Tensor, block_size: int) -> torch.Tensor:
    """For sampled query rows (raster indices), which grid keys (raster order) the plan keeps:
    [B|1, H|1, r, G] bool. Rows or keys past the last full block are dense."""
    G = plan.q_order.shape[-1]
    S = plan.kv_indices.shape[-2]
    q_pos = geometry.inverse(plan.q_order)[..., probe]             # position of each probe row
    k_block = geometry.inverse(plan.k_order) // block_size          # block of each raster key
    rows = block_mask(plan.kv_indices, plan.kv_counts, S)           # [B|1, H|1, S, S]
    q_block = (q_pos // block_size).clamp(max=S - 1)
    lead = torch.broadcast_shapes(rows.shape[:2], q_block.shape[:2], k_block.shape[:2])
    rows = rows.expand(*lead, -1, -1)
    row_mask = torch.gather(rows, 2, q_block.expand(*lead, -1)[..., None].expand(-1, -1, -1, S))
    key_mask = torch.gather(row_mask, 3, k_block.clamp(max=S - 1).expand(*lead, -1)[:, :, None, :]
                            .expand(-1, -1, probe.numel(), -1))
    key_mask |= (k_block >= S).expand(*lead, -1)[:, :, None, :]
    key_mask |= (q_pos >= S * block_size).expand(*lead, -1)[..., None]
    return key_mask


def rows_attention(q, k, v, rows: torch.Tensor, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of the query rows ``rows`` to all keys (masked by ``key_mask`` [.., r, N]),
    fp32 [B, H, r, D]; cheap for a few rows, so exact."""
    s = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float())


def density_of(plan: Plan) -> torch.Tensor:
    """Kept fraction of the S x S grid block pairs, per (batch, head) [B|1, H|1]."""
    S = plan.kv_indices.shape[-2]
    return plan.kv_counts.float().sum(-1) / float(S * S)


def keep_count(density: float, blocks: int) -> int:
    return max(1, min(blocks, math.floor(density * blocks + 0.5)))
