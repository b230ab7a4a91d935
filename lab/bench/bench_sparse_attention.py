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
import os
import time
import warnings

import torch
import torch.nn.functional as F

from comfyui_accel.attention import policies
from comfyui_accel.attention.layout import TokenGrid
from comfyui_accel.kernels.block_sparse_attention import block_mask, block_sparse_attention
from comfyui_accel.metrics import psnr, ssim
from lab.measure import compare_timings, time_fn
from lab import sampling

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

    timings = compare_timings(dense, {"sparse": sparse}, warmup=1, repeat=repeat, autorange=True)
    dense_s = timings["baseline"]["median_s"]
    sparse_s = timings["variants"]["sparse"]["median_s"]
    flex_s = time_fn(lambda: _flex(q, k, v, lists, counts), warmup=0, repeat=1)["median_s"]
    flex_out, sparse_out = _flex(q, k, v, lists, counts), sparse()
    model = f"random q/k/v 1x{heads}x{grid.tokens}x{dim} fp32, radial mask, blocks of {BLOCK}"
    common = dict(name="sparse_attention_op", model=model, ssim=None, weight_bytes_ratio=None,
                  density=density, threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
    return [
        dict(common, baseline="dense SDPA", variant="block-sparse (CPU gather path)", speedup=dense_s / sparse_s,
             psnr_db=psnr(flex_out, sparse_out), bound=f"1/density = {1 / density:.2f}",
             time_s=sparse_s, baseline_time_s=dense_s,
             fidelity_note="PSNR against FlexAttention with the same mask (same math: exactness)"),
        dict(common, baseline="dense SDPA", variant="FlexAttention eager, same mask", speedup=dense_s / flex_s,
             psnr_db=psnr(sparse_out, flex_out), bound=f"1/density = {1 / density:.2f}", time_s=flex_s,
             baseline_time_s=dense_s),
        dict(common, baseline="FlexAttention eager, same mask", variant="block-sparse (CPU gather path)",
             speedup=flex_s / sparse_s, psnr_db=psnr(flex_out, sparse_out), bound=None, time_s=sparse_s,
             baseline_time_s=flex_s),
    ]


# --- end to end ---------------------------------------------------------------------------

E2E_POLICIES = ("radial", "sliding_tile", "svg", "svg2", "draft")


class SelfAttentionClock:
    """An attention override that times the self-attention calls of a dense run."""

    def __init__(self, backend):
        self.backend, self.seconds = backend, 0.0

    def __call__(self, func, q, k, v, *args, **kwargs):
        start = time.perf_counter()
        out = self.backend(func, q, k, v, *args, **kwargs)
        if q.shape == k.shape:
            self.seconds += time.perf_counter() - start
        return out


def _sdpa_backend(func, *args, **kwargs):
    """Dense attention through PyTorch SDPA, for the baseline and the patch's dense calls alike
    (ComfyUI's default CPU backend is sub-quadratic attention, slower than SDPA)."""
    from comfy.ldm.modules import attention
    return attention.attention_pytorch.__wrapped__(*args, **kwargs)


def e2e_records(quick: bool) -> list[dict]:
    from comfyui_accel.attention.sparse import SparseConfig, apply_sparse_attention
    from lab import fixtures, host
    host.import_comfy()
    # Long grid: 25 frames at 384x512 -> 7 x 24 x 32 = 5,376 tokens (quick: 17 x 256^2 -> 1,280).
    width, height, length = (256, 256, 17) if quick else (512, 384, 25)
    steps, density, block = (3, 0.25, 64) if quick else (4, 0.25, 128)
    base = fixtures.load_model("wan21", "medium").clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = _sdpa_backend
    latent = fixtures.empty_latent("wan21", "medium", width=width, height=height, length=length)["samples"]

    def sample(model):
        return sampling.sample(model, "wan21", "medium", steps, cfg=1.0, latent=latent)

    clock = SelfAttentionClock(_sdpa_backend)
    timed = base.clone()
    timed.model_options["transformer_options"]["optimized_attention_override"] = clock
    sample(timed)   # warm-up
    clock.seconds = 0.0
    start = time.perf_counter()
    sample(timed)
    attention_share = clock.seconds / (time.perf_counter() - start)
    outputs, patches, variants = {}, {}, {}

    def keep(name, model):   # a timed run that also keeps its latent
        def fn():
            outputs[name] = sample(model)
        return fn

    for policy in E2E_POLICIES:
        config = SparseConfig(policy=policy, density=density, block_size=block, top_p=1.0, dense_steps=1,
                              dense_first_layers=0, min_tokens=0)
        model, patches[policy] = apply_sparse_attention(base, config)
        variants[policy] = keep(policy, model)
    timings = compare_timings(keep("dense", base), variants, warmup=0, repeat=1)
    reference = outputs["dense"]
    grid = tuple(latent.shape[2:])
    records = []
    for policy in E2E_POLICIES:
        out = outputs[policy]
        s = patches[policy].last_report["summary"]
        sparse_share = s["sparse_calls"] / max(1, s["sparse_calls"] + s["dense_reasons"].get("warmup", 0)
                                               + s["dense_reasons"].get("dense_layer", 0))
        # Amdahl: only the sparse calls' share of the dense attention time shrinks, to `density`.
        saved = attention_share * sparse_share * (1 - s["mean_density"])
        records.append(dict(
            name="sparse_attention_e2e", model=f"wan21 medium, latent {grid}, {steps} steps, 1 dense",
            baseline="dense (SDPA)", variant=f"{policy} @ {density}", speedup=timings["variants"][policy]["speedup"],
            psnr_db=psnr(reference, out), ssim=ssim(reference, out), weight_bytes_ratio=None,
            bound=f"attention 1/density = {1 / s['mean_density']:.2f}; run {1 / (1 - saved):.2f}",
            density=s["mean_density"], attention_share=attention_share, mean_rel_error=s["mean_rel_error"],
            time_s=timings["variants"][policy]["median_s"], baseline_time_s=timings["baseline"]["median_s"],
            layout=s["layout"], load_average=os.getloadavg()[0]))
        log.info("   %s: %.2fx, PSNR %.1f dB", policy, records[-1]["speedup"], records[-1]["psnr_db"])
    return records


def run(quick: bool) -> list[dict]:
    return op_records(quick) + e2e_records(quick)
