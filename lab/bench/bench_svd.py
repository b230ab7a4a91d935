"""SVD Low-Rank Branch (SVDQuant) on the CPU: fidelity, branch overhead, bytes, build time.

- ``svdquant fidelity``: the Wan 2.1 fixture with activation outlier channels (tiny, 1 step,
  rank 32, W4A4 int4 only in quick mode; medium, 6 steps, ranks 32, 64 and 128 otherwise), calibrated on
  its own conditioning. At each quantization setting of ``SAME_BITS`` (W4A4 int4 g64, W4A4 nvfp4
  g16, W4A8 int4 g64): plain, plain with SmoothQuant 0.5, and SVDQuant (SmoothQuant 0.5 + rank-r
  16-bit branch + the residual in that setting); final-latent PSNR/SSIM against the float model
  on the same seeds, and the median output SQNR over the branched layers (calibration inputs) and
  over the FFN down projections (the layers whose inputs carry the outliers).
- ``svdquant layer fidelity``: the same settings on one layer (3072 wide, 512 in quick mode) with
  8 activation outlier channels, output SQNR on held-out tokens.
- ``svdquant layer``: one 3072x3072 layer (FLUX width; 4096 tokens, 512 in quick mode), rank 32: W4A4 with the branch fused
  against the same W4A4 GEMM without it, timed interleaved; ``overhead`` = time ratio - 1
  (target: <= 0.15). Weight bytes against bf16 (SVDQuant's paper: ~3.5x for FLUX).
- ``svd method``: torch.svd_lowrank (rank + 16, 2 power iterations) against torch.linalg.svd on
  a smoothed 3072x3072 weight (512x512 in quick mode): time and the error of the rank-32
  approximation against the best.
- ``svdquant build``: seconds to build the branches of the fixture (calibration excluded, it is
  one short sampling run of the user's), and the projection to FLUX.1-dev 12B: per-layer time at
  each of its linear shapes times how many layers have it, beside DeepCompressor's published
  12 h on an H100 (research/quantization.md, section 2.5).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import torch

from lab import fixtures, host
from lab import measure
from lab.quant_checks import plans_for
from lab.sampling import ksampler
from comfyui_accel import metrics

# FLUX.1-dev's quantized linears (19 double blocks, 38 single blocks; modulation layers are
# weight-only and are not branched): (out, in) -> count
FLUX_LAYERS = {(9216, 3072): 2 * 19, (3072, 3072): 2 * 19, (12288, 3072): 2 * 19, (3072, 12288): 2 * 19,
               (21504, 3072): 38, (3072, 15360): 38}
DEEPCOMPRESSOR_HOURS = 12.0   # FLUX.1-dev on an H100 (deepcompressor #24, #66)


@dataclasses.dataclass
class Subject:
    """A model with outlier channels, how it is sampled (final latents of all seeds, concatenated)
    and what it is calibrated on."""
    label: str
    model: object
    sample: Callable[[object], torch.Tensor]
    calibration: dict   # calibrate.calibrate's keyword arguments


def _sampler(positive, negative, latent, steps: int, cfg: float, seeds) -> Callable[[object], torch.Tensor]:
    def sample(model):
        return torch.cat([ksampler(model, positive, negative, latent["samples"], steps, cfg, seed,
                                   fix_empty_latent=True) for seed in seeds])
    return sample


def fixture_subject(size: str, steps: int) -> Subject:
    """The random-weight Wan 2.1 fixture with planted outliers, calibrated on its own conditioning."""
    family = "wan21"
    pos, neg = fixtures.make_conditioning(family, size, seed=1), fixtures.make_conditioning(family, size, seed=2)
    latent = fixtures.empty_latent(family, size)
    return Subject(f"{family} {size} outliers, {steps} steps", fixtures.load_model(family, size, outliers=True),
                   _sampler(pos, neg, latent, steps, 3.5, (0,)),
                   dict(positive=pos, negative=neg, latent=latent, steps=2, seed=0, cfg=3.5))


def reference_subject(name: str, steps: int, seeds: int) -> Subject:
    """A trained reference model (``lab/reference``): its weights and activations come from
    training, not from a random init with planted outliers. Sampled as KSampler would (``steps``,
    cfg 4) on its first prompt, calibrated on its second; its trajectories branch easily, so the
    PSNR pools ``seeds`` seeds."""
    from lab import reference
    neg, latent = reference.make_conditioning(name, ""), reference.empty_latent(name)
    return Subject(f"{name} (trained), {steps} steps, {seeds} seeds", reference.load_reference(name),
                   _sampler(reference.make_conditioning(name, 0), neg, latent, steps, 4.0, range(seeds)),
                   dict(positive=reference.make_conditioning(name, 1), negative=neg, latent=latent, steps=4, seed=1,
                        cfg=4.0))


# Quantization settings compared "at the same bits": (label, format, group size). Each is run
# plain, plain with SmoothQuant 0.5, and as the residual of SVDQuant (the branch keeps 16 bits).
SAME_BITS = (("W4A4 int4 g64", "w4a4", 64), ("W4A4 nvfp4 g16", "nvfp4_w4a4", None), ("W4A8 int4 g64", "w4a8", 64))


def fidelity(subject: Subject, ranks: tuple[int, ...], settings=SAME_BITS, full: bool = True) -> list[dict]:
    """Each setting plain, with SmoothQuant 0.5 (``full``), and as SVDQuant's residual at each rank
    with smoothing alpha 0.5 and (``full``, W4A4 settings) alpha searched per layer in that setting."""
    from comfyui_accel.quant import calibrate, svdquant
    from comfyui_accel.quant import model as qmodel
    from comfyui_accel.quant.formats import Spec
    model = subject.model
    reference = subject.sample(model)
    layers = [p for p, _ in svdquant.select_layers(model, [])]
    stats = calibrate.calibrate(model, layers, **subject.calibration)
    bf16_bytes = 2 * sum(m.weight.numel() for _, m in qmodel.linear_layers(model))
    records = []

    def record(bits, name, res, build=None):
        out = subject.sample(res.model)
        rows = {r.layer: r for r in res.rows}
        sq = sorted(rows[p].output_sqnr_db for p in layers)
        ffn = sorted(rows[p].output_sqnr_db for p in layers if p.endswith("ffn.2"))
        packed = sum(r.bytes_after if r.format != "keep" else 2 * r.params for r in res.rows)
        records.append(dict(
            name="svdquant fidelity", model=subject.label, baseline="float model", bits=bits,
            variant=f"{bits}: {name}", psnr_db=metrics.psnr(reference, out), ssim=metrics.ssim(reference, out),
            layer_sqnr_db=sq[len(sq) // 2], ffn_down_sqnr_db=ffn[len(ffn) // 2],
            weight_bytes_ratio=bf16_bytes / packed, bound=4 / 16, branch_build_s=build))

    branched = {}
    for rank in ranks:   # alpha 0.5 does not depend on the setting: one branched model per rank
        start = time.perf_counter()
        branched[rank] = (svdquant.branch_model(model, layers, rank, 0.5, stats).model, time.perf_counter() - start)
    for bits, fmt, group in settings:
        for alpha in (0.0, 0.5) if full else (0.0,):
            res = qmodel.quantize_model(model, plans_for(model, fmt, group), stats=stats, smooth_alpha=alpha,
                                         kernels="ours")
            record(bits, "plain" + (" + SmoothQuant 0.5" if alpha else ""), res)
        for rank, (bmodel, build) in branched.items():
            record(bits, f"SVDQuant r{rank}", qmodel.quantize_model(bmodel, plans_for(bmodel, fmt, group), stats=stats, kernels="ours"),
                   build)
            if full and fmt != "w4a8":   # the search is for W4A4 (where activations limit); it costs ~10x the build
                start = time.perf_counter()
                searched = svdquant.branch_model(model, layers, rank, svdquant.AUTO_ALPHA, stats,
                                                 report_spec=Spec(fmt, group)).model
                build = time.perf_counter() - start
                record(bits, f"SVDQuant r{rank}, alpha searched",
                       qmodel.quantize_model(searched, plans_for(searched, fmt, group), stats=stats), build)
    return records


def layer_same_bits(width: int, tokens: int, rank: int = 32) -> list[dict]:
    """One layer with activation outlier channels, at each quantization setting: plain,
    SmoothQuant 0.5, and SVDQuant (SmoothQuant 0.5 + rank-``rank`` branch + quantized residual);
    output SQNR on held-out tokens (the smoothing factors come from other tokens)."""
    from comfyui_accel.quant import lowrank, qweight
    from comfyui_accel.quant.formats import Spec
    from comfyui_accel.quant.qweight import QuantWeight
    g = torch.Generator().manual_seed(3)
    w = torch.randn(width, width, generator=g) / width ** 0.5
    outliers = torch.randperm(width, generator=g)[:8]

    def tokens_(n):
        x = torch.randn(n, width, generator=g)
        x[:, outliers] *= 30
        return x
    calib, x = tokens_(tokens), tokens_(tokens)
    smooth = qweight.smoothing_factors(calib.abs().amax(0), w, 0.5)
    branch, energy = lowrank.make_branch(w, rank, smooth)
    ref = x @ w.t()
    records = []
    for bits, fmt, group in SAME_BITS:
        spec = Spec(fmt, group)
        for name, qw in (("plain", QuantWeight.quantize(w, spec, torch.float32)),
                         ("plain + SmoothQuant 0.5", QuantWeight.quantize(w, spec, torch.float32, smooth=smooth)),
                         (f"SVDQuant r{rank}", lowrank.quantize_branched(w, branch, spec, torch.float32))):
            records.append(dict(name="svdquant layer fidelity", model=f"{width}x{width}, 8 outlier channels x30",
                                baseline="float layer", bits=bits, variant=f"{bits}: {name}",
                                sqnr_db=metrics.sqnr_db(ref, qw.linear(x, None).float()),
                                weight_bytes_ratio=width * width * 2 / qw.packed_nbytes(), bound=4 / 16,
                                branch_energy=energy if qw.rank else None))
    return records


def layer_overhead(tokens: int, repeat: int) -> list[dict]:
    from comfyui_accel.quant import lowrank
    from comfyui_accel.quant.formats import Spec
    from comfyui_accel.quant.linear import QuantLinear
    from comfyui_accel.quant.qweight import QuantWeight
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
                                         warmup=1, repeat=repeat, autorange=True)
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
        sqnr_db=metrics.sqnr_db(ref, layers["w4a4 + rank-32 branch"](x).float()),
        plain_w4a4_sqnr_db=metrics.sqnr_db(ref, QuantLinear(plain_w4a4)(x).float()),
        weight_bytes_ratio=n * k * 2 / branched.packed_nbytes(), bound=branched.bits_per_weight() / 16,
        load_average=os.getloadavg()[0])]


def svd_methods(width: int, repeat: int) -> list[dict]:
    from comfyui_accel.quant import lowrank
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
    from comfyui_accel.quant import lowrank
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
    records += layer_same_bits(512 if quick else 3072, 512 if quick else 2048)
    records += svd_methods(512 if quick else 3072, 1 if quick else 2)
    records.append(projection(quick))
    if quick:
        records += fidelity(fixture_subject("tiny", 1), (32,), SAME_BITS[:1], full=False)
    else:
        # rank 128, the top of the node's range, is a quarter of this 512-wide fixture: where
        # SVDQuant W4A4 (NVFP4) passes plain W4A8 on Gaussian weights (docs/svdquant.md)
        records += fidelity(fixture_subject("medium", 6), (32, 64, 128))
        records += fidelity(reference_subject("ref_wan21", 20, 8), (32, 64))
    return records
