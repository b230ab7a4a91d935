"""SVD Low-Rank Branch (SVDQuant) on the CPU: fidelity, branch overhead, bytes, build time.

- ``svdquant fidelity``: the Wan 2.1 fixture with activation outlier channels (tiny, 1 step,
  rank 32 in quick mode; medium, 6 steps, ranks 32 and 64 otherwise), calibrated on its own conditioning. SVDQuant W4A4 (smoothing + rank-r
  branch + 4-bit residual) against plain W4A4 and W4A8 at the same weight bits, with and without
  SmoothQuant; final-latent PSNR/SSIM against the float model on the same seeds, and the median
  output SQNR over the branched layers (calibration inputs) and over the FFN down projections
  (the layers whose inputs carry the outliers). Each rank twice: smoothing alpha 0.5 and alpha
  searched per layer (``lowrank.best_smoothing``).
- ``svdquant layer``: one 3072x3072 layer (FLUX width; 4096 tokens, 512 in quick mode), rank 32: W4A4 with the branch fused
  against the same W4A4 GEMM without it, timed interleaved; ``overhead`` = time ratio - 1
  (the issue's target: <= 0.15). Weight bytes against bf16 (SVDQuant's paper: ~3.5x for FLUX).
- ``svd method``: torch.svd_lowrank (rank + 16, 2 power iterations) against torch.linalg.svd on
  a smoothed 3072x3072 weight (512x512 in quick mode): time and the error of the rank-32
  approximation against the best.
- ``svdquant build``: seconds to build the branches of the fixture (calibration excluded, it is
  one short sampling run of the user's), and the projection to FLUX.1-dev 12B: per-layer time at
  each of its linear shapes times how many layers have it, beside DeepCompressor's published
  12 h on an H100 (research/quantization.md, section 2.5).
"""
from __future__ import annotations

import os
import time

import torch

from ..devtools import fixtures, host
from ..devtools.quant_checks import plans_for
from . import measure

# FLUX.1-dev's quantized linears (19 double blocks, 38 single blocks; modulation layers are
# weight-only and are not branched): (out, in) -> count
FLUX_LAYERS = {(9216, 3072): 2 * 19, (3072, 3072): 2 * 19, (12288, 3072): 2 * 19, (3072, 12288): 2 * 19,
               (21504, 3072): 38, (3072, 15360): 38}
DEEPCOMPRESSOR_HOURS = 12.0   # FLUX.1-dev on an H100 (deepcompressor #24, #66)


def _runner(model, family, size, steps, seed=0):
    import comfy.sample
    latent = comfy.sample.fix_empty_latent_channels(model, fixtures.empty_latent(family, size)["samples"])
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = fixtures.make_conditioning(family, size, seed=1)
    neg = fixtures.make_conditioning(family, size, seed=2)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 3.5, "euler", "simple", pos, neg, latent, seed=seed,
                                   disable_pbar=True)


def fidelity(size: str, steps: int, ranks: tuple[int, ...], full: bool = True) -> list[dict]:
    from ..quant import calibrate, lowrank
    from ..quant import model as qmodel
    family = "wan21"
    model = fixtures.load_model(family, size, outliers=True)
    reference = _runner(model, family, size, steps)
    layers = [p for p, _ in lowrank.select_layers(model, [])]
    stats = calibrate.calibrate(model, layers, fixtures.make_conditioning(family, size, seed=1),
                                fixtures.make_conditioning(family, size, seed=2), fixtures.empty_latent(family, size),
                                steps=2, seed=0, cfg=3.5)
    bf16_bytes = 2 * sum(m.weight.numel() for _, m in qmodel.linear_layers(model))
    variants = {}
    for fmt in ("w4a4", "w4a8"):
        for alpha in (0.0, 0.5) if full else (0.0,):
            res = qmodel.quantize_model(model, plans_for(model, fmt, 64), stats=stats, smooth_alpha=alpha)
            variants[f"{fmt}" + (" +smooth 0.5" if alpha else "")] = (res, None)
    for rank in ranks:
        for alpha, label in ((0.5, ""), (lowrank.AUTO_ALPHA, " alpha searched")):
            start = time.perf_counter()
            branched = lowrank.branch_model(model, layers, rank, alpha, stats)
            build = time.perf_counter() - start
            res = qmodel.quantize_model(branched.model, plans_for(branched.model, "w4a4", 64), stats=stats)
            variants[f"SVDQuant w4a4 r{rank}{label}"] = (res, build)
    records = []
    for name, (res, build) in variants.items():
        out = _runner(res.model, family, size, steps)
        rows = {r.layer: r for r in res.rows}
        sq = sorted(rows[p].output_sqnr_db for p in layers)
        ffn = sorted(rows[p].output_sqnr_db for p in layers if p.endswith("ffn.2"))
        packed = sum(r.bytes_after if r.format != "keep" else 2 * r.params for r in res.rows)
        records.append(dict(
            name="svdquant fidelity", model=f"{family} {size} outliers, {steps} steps", baseline="float model",
            variant=name, psnr_db=measure.psnr(reference, out), ssim=measure.ssim(reference, out),
            layer_sqnr_db=sq[len(sq) // 2], ffn_down_sqnr_db=ffn[len(ffn) // 2],
            weight_bytes_ratio=bf16_bytes / packed, bound=4 / 16, branch_build_s=build))
    return records


def layer_overhead(tokens: int, repeat: int) -> list[dict]:
    from ..quant import lowrank
    from ..quant.formats import Spec
    from ..quant.linear import QuantLinear
    from ..quant.qweight import QuantWeight
    n = k = 3072
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g)
    x[:, :8] *= 30                                              # outlier channels
    smooth = (x.abs().amax(0).sqrt() / w.abs().amax(0).sqrt()).clamp(min=1e-4)
    branch, _ = lowrank.make_branch(w, 32, smooth)
    branched = lowrank.quantize_branched(w, branch, Spec("w4a4", 64), torch.bfloat16)
    plain = branched.with_branch(None, None)                    # the same residual GEMM without the branch
    xb = x.bfloat16()
    layers = {"w4a4 + rank-32 branch": QuantLinear(branched), "w4a4 (same GEMM, no branch)": QuantLinear(plain)}
    bf16_w = w.bfloat16()
    with torch.no_grad():
        timing = measure.compare_timings(lambda: layers["w4a4 (same GEMM, no branch)"](xb),
                                         {"branch": lambda: layers["w4a4 + rank-32 branch"](xb),
                                          "bf16": lambda: torch.nn.functional.linear(xb, bf16_w)},
                                         warmup=1, repeat=repeat)
    ref = x @ w.t()
    plain_w4a4 = QuantWeight.quantize(w, Spec("w4a4", 64), torch.bfloat16)   # no smoothing, no branch
    base, with_branch = timing["baseline"], timing["variants"]["branch"]
    return [dict(
        name="svdquant layer", model=f"{tokens}x{k}x{n}", baseline="the same w4a4 GEMM without the branch",
        variant="w4a4 + rank-32 branch", speedup=base["median_s"] / with_branch["median_s"],
        seconds=with_branch["median_s"], baseline_seconds=base["median_s"],
        overhead=with_branch["median_s"] / base["median_s"] - 1,
        # on a loaded machine the fastest run is the steadier estimate
        overhead_min=with_branch["min_s"] / base["min_s"] - 1,
        bf16_seconds=timing["variants"]["bf16"]["median_s"],
        sqnr_db=measure.sqnr_db(ref, layers["w4a4 + rank-32 branch"](x).float()),
        plain_w4a4_sqnr_db=measure.sqnr_db(ref, QuantLinear(plain_w4a4)(x).float()),
        weight_bytes_ratio=n * k * 2 / branched.packed_nbytes(), bound=branched.bits_per_weight() / 16,
        load_average=os.getloadavg()[0])]


def svd_methods(width: int, repeat: int) -> list[dict]:
    from ..quant import lowrank
    g = torch.Generator().manual_seed(1)
    n = k = width
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w *= (1 + 30 * (torch.rand(k, generator=g) > 0.995))[None, :]   # smoothed outlier columns
    best = torch.linalg.svdvals(w)[32:].pow(2).sum().sqrt().item()
    records = []
    for method in lowrank.METHODS:
        t = measure.time_fn(lambda: lowrank.svd_factors(w, 32, method), warmup=0, repeat=repeat)
        down, up, energy = lowrank.svd_factors(w, 32, method)
        err = torch.linalg.matrix_norm(w - up.t() @ down.t()).item()
        records.append(dict(name="svd method", model=f"{n}x{k} smoothed, rank 32", baseline="optimal rank-32 error",
                            variant=method, seconds=t["median_s"], error_over_best=err / best, energy=energy))
    return records


def projection(quick: bool) -> dict:
    """Quick mode times the 3072x3072 shape only and scales it to the others by their size
    (the randomized SVD's cost is linear in N x K at a fixed rank)."""
    from ..quant import lowrank
    g = torch.Generator().manual_seed(2)
    per_shape = {}
    for (n, k), count in FLUX_LAYERS.items():
        if quick and (n, k) != (3072, 3072):
            continue
        w = torch.randn(n, k, generator=g) / k ** 0.5
        smooth = torch.rand(k, generator=g) + 0.5
        per_shape[(n, k)] = measure.time_fn(lambda: lowrank.make_branch(w, 32, smooth), warmup=0,
                                            repeat=1)["median_s"]
    if quick:
        base = per_shape[(3072, 3072)]
        per_shape = {(n, k): base * n * k / 3072 ** 2 for n, k in FLUX_LAYERS}
    total = sum(per_shape[s] * c for s, c in FLUX_LAYERS.items())
    return dict(name="svdquant build", model="FLUX.1-dev 12B projection (rank 32, randomized SVD)"
                + (", scaled from 3072x3072" if quick else ""),
                baseline="DeepCompressor, H100", variant="SVD Low-Rank Branch, this CPU",
                seconds=total, layers=sum(FLUX_LAYERS.values()),
                per_shape_s={f"{n}x{k}": round(s, 3) for (n, k), s in per_shape.items()},
                deepcompressor_hours=DEEPCOMPRESSOR_HOURS, speedup=DEEPCOMPRESSOR_HOURS * 3600 / total)


def run(quick: bool) -> list[dict]:
    host.import_comfy()
    torch.manual_seed(0)
    records = layer_overhead(512 if quick else 4096, 3 if quick else 5)
    records += svd_methods(512 if quick else 3072, 1 if quick else 2)
    records.append(projection(quick))
    records += fidelity("tiny" if quick else "medium", 1 if quick else 6, (32,) if quick else (32, 64), full=not quick)
    return records
