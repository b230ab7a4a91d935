"""Quantize Model on the CPU: full sampling runs of the Wan 2.1 and Flux fixtures.

Two sizes: ``medium`` (the test fixtures' largest size) and the bench-only ``wide`` (lab/fixtures.py:
Wan 2.1 1.3B's width, dim 1536 and ffn 8960 in 2 blocks; Flux at hidden 1536). The targets are
about real DiTs (dim 1536-5120), where the linear layers take most of the time; at ``medium``'s
dim 384-512 and ~768 tokens they take only about a third of the fp32 run (the rest is the
models' own elementwise fp32 ops, norms and attention), so no matmul speedup can give 3x there
(``linear_time_share`` below is that bound). ``wide`` is where the formats' speed shows.

Variants, all timed side by side in one run (interleaved rounds, same seed):
- ``fp32``: the model as ComfyUI loads it on a CPU (the baseline and the fidelity reference);
- ``bf16``: the weights in bfloat16 and bfloat16 compute (on a CPU ComfyUI would otherwise
  upcast a bf16 file to fp32 compute);
- ``comfy fp8``: ComfyUI's own fp8 weight dtype (``UNETLoader`` weight_dtype fp8_e4m3fn), as
  ComfyUI runs it on a CPU (fp32 compute);
- ours: each format applied to the bf16 model (so kept layers are 16-bit, as in the bf16
  baseline), compute in bf16; plus ``int8 @fp32`` from the fp32 model with fp32 compute;
- ``core <format>``: the same format on ComfyUI's own layout and layer (``kernels="core"``: comfy-kitchen's
  eager backend on a CPU), where the host has it; ``path`` says whose layers ran.

Layer records: one QuantLinear against a bf16 and an fp32 linear at the shapes of real
models (Flux-dev and Wan 2.1 14B widths, 4096 tokens), where the matmul dominates.

The machine's load average and OMP_WAIT_POLICY are recorded beside the timings: on a shared machine the
memory-bound parts (activation quantization, casts) slow down more than the matmuls, and with
OpenMP's default spinning barriers each of the int8 path's ~10 small ops per layer stalls (5x
slower at load 10 on 2 cores): run with ``OMP_WAIT_POLICY=PASSIVE`` there (set before Python starts).

Each record: speedup vs fp32 and vs bf16, final-latent PSNR/SSIM vs fp32, weight bytes of the
diffusion model vs bf16, and the physical bounds: ``bound`` = bits per quantized weight / 16,
``linear_time_share`` (``_bf16``) = fraction of the fp32 (bf16) model's time in matmuls: a
speedup of the matmuls alone cannot exceed 1 / (1 - share) against that baseline.

Layer SQNR with activation outliers: the fixtures' ``outliers=True`` models plant outlier
channels at the FFN down projections the way they arise in real DiTs (a few hidden channels
scaled up before the activation and down after it, so the block's function is kept but the
down projection's inputs have channels 10-100x the median). The records give each format's
median output SQNR on those layers (calibration inputs), with and without SmoothQuant.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from lab import fixtures, host, measure, sampling
from lab.quant_checks import plans_for
from comfyui_accel import metrics

log = logging.getLogger(__name__)

FORMATS = ("int8", "fp8_e4m3", "int4", "w4a8", "nvfp4", "mxfp4", "mxfp8", "w4a4")
# Formats ComfyUI has a layout for (quant/core.py): each also runs on ComfyUI's own layer and kernels, as
# ``core <format>``, where the host has the layout (ComfyUI 0.33 on, with comfy-kitchen).
CORE_FORMATS = ("int8", "fp8_e4m3", "w4a8", "nvfp4", "mxfp8", "w4a4")


def _runner(model, family: str, steps: int, seed: int = 0, size: str = "medium"):
    return functools.partial(sampling.sample, model, family, size, steps, seed, cfg=3.5, fix_empty_latent=True)


def _matmul_share(run) -> float:
    """Fraction of CPU time spent in matmul ops during one run (profiler self time)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    total = mm = 0.0
    for ev in prof.key_averages():
        total += ev.self_cpu_time_total
        if ev.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "aten::baddbmm"):
            mm += ev.self_cpu_time_total
    return mm / total if total else 0.0


def bench_family(family: str, steps: int, repeat: int, size: str = "medium") -> list[dict]:
    from comfyui_accel.quant import model as qmodel
    fp32 = fixtures.load_model(family, size)
    bf16 = fixtures.load_model(family, size, dtype=torch.bfloat16)
    bf16_compute = bf16.clone()
    bf16_compute.set_model_compute_dtype(torch.bfloat16)
    fp8 = fixtures.load_model(family, size, dtype=torch.float8_e4m3fn)
    models = {"bf16": bf16_compute, "comfy fp8": fp8}
    results = {}
    for fmt in FORMATS:
        results[fmt] = qmodel.quantize_model(bf16, plans_for(bf16, fmt, 64), dtype=torch.bfloat16, kernels="ours")
        models[fmt] = results[fmt].model
    for fmt in CORE_FORMATS:
        res = qmodel.quantize_model(bf16, plans_for(bf16, fmt, 64), dtype=torch.bfloat16, kernels="core")
        if any(r.layout.startswith("ComfyUI ") for r in res.rows):
            results[f"core {fmt}"] = res
            models[f"core {fmt}"] = res.model
    results["int8 @fp32"] = qmodel.quantize_model(fp32, plans_for(fp32, "int8", 64), dtype=torch.float32, kernels="ours")
    models["int8 @fp32"] = results["int8 @fp32"].model

    runs = {name: _runner(m, family, steps, size=size) for name, m in models.items()}
    base_run = _runner(fp32, family, steps, size=size)
    reference = base_run()
    outputs = {name: run() for name, run in runs.items()}
    sizes = {name: measure.model_weight_bytes(m) for name, m in models.items()}
    share = _matmul_share(base_run)
    share_bf16 = _matmul_share(runs["bf16"])
    load_before = os.getloadavg()[0]
    timing = measure.compare_timings(base_run, runs, warmup=1, repeat=repeat)
    load = (load_before + os.getloadavg()[0]) / 2
    bf16_time = timing["variants"]["bf16"]["median_s"]
    records = []
    for name in models:
        t = timing["variants"][name]
        res = results.get(name)
        bits = layers_ratio = path = None
        if res is not None:
            q = [r for r in res.rows if r.format != "keep"]
            path = ", ".join(sorted({r.layout for r in q}))
            bits = sum(r.bits * r.params for r in q) / max(sum(r.params for r in q), 1)
            layers_ratio = res.summary["quantized layers vs bf16"]
        records.append(dict(
            name=f"quant {family}", model=f"{family} {size}, {steps} steps", baseline="fp32", variant=name, path=path,
            speedup=t["speedup"], speedup_vs_bf16=bf16_time / t["median_s"], seconds=t["median_s"],
            psnr_db=metrics.psnr(reference, outputs[name]), ssim=metrics.ssim(reference, outputs[name]),
            # bf16 itself drifts from fp32 on some fixtures (flux wide: ~28 dB); the formats applied
            # to the bf16 model are better judged against it.
            psnr_vs_bf16_db=metrics.psnr(outputs["bf16"], outputs[name]),
            weight_bytes_ratio=sizes["bf16"] / sizes[name], quantized_layers_bytes_ratio=layers_ratio,
            bound=None if bits is None else bits / 16, linear_time_share=share,
            linear_time_share_bf16=share_bf16,
            fp32_seconds=timing["baseline"]["median_s"], load_average=load,
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default")))
    return records


def outlier_layer_sqnr(family: str, steps: int) -> list[dict]:
    from comfyui_accel.quant import calibrate
    from comfyui_accel.quant import model as qmodel
    model = fixtures.load_model(family, "medium", outliers=True)
    plans = plans_for(model, "int8", 64)
    layers = [p.path for p in plans if p.spec is not None]
    stats = calibrate.calibrate(model, layers, fixtures.make_conditioning(family, "medium", seed=1),
                                fixtures.make_conditioning(family, "medium", seed=2),
                                fixtures.empty_latent(family, "medium"), steps=steps, seed=0, cfg=3.5)
    outlier_layers = [p for p, s in stats.items() if s.outlier_ratio() > 8]
    records = []
    for fmt in FORMATS:
        for alpha in (0.0, 0.5):
            fmt_plans = plans_for(model, fmt, 64)
            res = qmodel.quantize_model(model, [p for p in fmt_plans if p.path in outlier_layers], stats=stats,
                                        smooth_alpha=alpha)
            sq = sorted(r.output_sqnr_db for r in res.rows)
            ratio = sorted(stats[p].outlier_ratio() for p in outlier_layers)
            records.append(dict(
                name=f"outlier layers {family}", model=f"{family} medium outliers, {len(outlier_layers)} layers",
                baseline="float layer output", variant=fmt + (" +smooth 0.5" if alpha else ""),
                layer_sqnr_db=sq[len(sq) // 2], worst_layer_sqnr_db=sq[0],
                median_outlier_ratio=ratio[len(ratio) // 2],
                smoothing_applies=any("smoothed" in r.reason for r in res.rows)))
    return records


LAYER_SHAPES = {"flux-dev attention": (4096, 3072, 3072), "flux-dev mlp up": (4096, 3072, 12288),
                "wan 14B mlp down": (4096, 13824, 5120)}


def layer_records(quick: bool) -> list[dict]:
    from comfyui_accel.quant.formats import Spec
    from comfyui_accel.quant.linear import QuantLinear
    from comfyui_accel.quant.qweight import QuantWeight
    records = []
    shapes = dict(list(LAYER_SHAPES.items())[:1]) if quick else LAYER_SHAPES
    for label, (m, k, n) in shapes.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) / k ** 0.5
        x = torch.randn(m, k, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        ref = x @ w.t()
        variants = {"bf16": lambda: torch.nn.functional.linear(xb, wb)}
        layers = {}
        for fmt in ("int8", "w4a8", "int4"):
            layers[fmt] = QuantLinear(QuantWeight.quantize(w, Spec(fmt, 64 if fmt != "int8" else None), torch.bfloat16))
            variants[fmt] = (lambda layer: lambda: layer(xb))(layers[fmt])
        with torch.no_grad():
            timing = measure.compare_timings(lambda: torch.nn.functional.linear(x, w), variants, warmup=1,
                                             repeat=2 if quick else 4)
        bf16_s = timing["variants"]["bf16"]["median_s"]
        for name in variants:
            out = variants[name]().float()
            records.append(dict(
                name="quant layer", model=f"{label} {m}x{k}x{n}", baseline="fp32 linear", variant=name,
                speedup=timing["variants"][name]["speedup"],
                speedup_vs_bf16=bf16_s / timing["variants"][name]["median_s"],
                sqnr_db=metrics.sqnr_db(ref, out), load_average=os.getloadavg()[0],
                bound=None if name == "bf16" else layers[name].weight.bits_per_weight() / 16))
    return records


def _load_only(family: str) -> None:
    from comfyui_accel.quant import model as qmodel  # noqa: F401  same imports as below (triton's are large)
    host.import_comfy()
    fixtures.load_model(family, "medium")


def _load_and_quantize(family: str) -> None:
    from comfyui_accel.quant import model as qmodel
    host.import_comfy()
    model = fixtures.load_model(family, "medium")
    qmodel.quantize_model(model, plans_for(model, "int8", 64))


def quantize_memory(family: str) -> dict:
    """How much quantizing raises the process's peak memory above loading the model alone
    (fresh processes: load, then load + quantize), as a fraction of the model's weight bytes.
    Layer by layer, it adds the packed copy plus one layer in float32, which stays under the
    load's own peak (state dict and model side by side): about 0."""
    host.import_comfy()
    model = fixtures.load_model(family, "medium")
    model_bytes = measure.model_weight_bytes(model)
    from comfyui_accel.quant import model as qmodel
    packed = qmodel.quantize_model(model, plans_for(model, "int8", 64))
    extra = measure.peak_rss_increase_bytes(_load_and_quantize, family) - measure.peak_rss_increase_bytes(_load_only, family)
    return dict(name=f"quantize memory {family}", model=f"{family} medium fp32", baseline="model weight bytes",
                variant="int8 quantize_model", peak_extra_over_model=extra / model_bytes,
                packed_copy_over_model=sum(r.bytes_after for r in packed.rows if r.format != "keep") / model_bytes)


def real_depth_bytes(family: str = "wan21") -> list[dict]:
    """Whole-model weight bytes against bf16 at real depth (the ``full`` fixture: Wan 2.1 1.3B's
    configuration, 30 blocks), each format with the default keep policy and no calibration. The
    2-block fixtures keep a large share in 16 bits (text embedding, time projection, patch
    embedding, head: ~21% of ``wide``), which caps their whole-model ratio; here it is ~2%."""
    from comfyui_accel.quant import model as qmodel
    bf16 = fixtures.load_model(family, "full", dtype=torch.bfloat16)
    base = measure.model_weight_bytes(bf16)
    records = []
    for fmt, group in (("int8", 64), ("fp8_e4m3", 64), ("int4", 64), ("int4", 128), ("w4a8", 64),
                       ("nvfp4", 64), ("mxfp4", 64)):
        res = qmodel.quantize_model(bf16, plans_for(bf16, fmt, group), dtype=torch.bfloat16)
        q = [r for r in res.rows if r.format != "keep"]
        kept = sum(r.params for r in res.rows if r.format == "keep")
        bits = sum(r.bits * r.params for r in q) / sum(r.params for r in q)
        records.append(dict(
            name=f"weight bytes {family} full", model=f"{family} full (Wan 2.1 1.3B config, random weights)",
            baseline="bf16", variant=fmt + (f" g{group}" if fmt in ("int4", "w4a8") else ""),
            weight_bytes_ratio=base / measure.model_weight_bytes(res.model),
            quantized_layers_ratio=res.summary["quantized layers vs bf16"], bits_per_quantized_weight=bits,
            kept_share=kept / sum(r.params for r in res.rows), bound=16 / bits))
        del res
    return records


def reference_fidelity(name: str, steps: int) -> list[dict]:
    """Each format of ``CORE_FORMATS`` on our layers and on ComfyUI's (where the host has the layout)
    on a trained reference model: PSNR of the decoded picture and of the final latent against the
    float model's, same seed and prompt (no timing: the reference models are too small for it)."""
    from lab import reference as ref
    from comfyui_accel.metrics import psnr
    from comfyui_accel.quant import model as qmodel
    model = ref.load_reference(name)
    positive, negative, latent = ref.make_conditioning(name, 0), ref.make_conditioning(name, ""), ref.empty_latent(name)

    def sample(m):
        return sampling.ksampler(m, positive, negative, latent["samples"], steps, 4.0, fix_empty_latent=True)
    reference = sample(model)
    picture = ref.decode(name, reference).float().clamp(0, 1)
    records = []
    for fmt in CORE_FORMATS:
        for kernels in ("ours", "core"):
            res = qmodel.quantize_model(model, plans_for(model, fmt, 64), kernels=kernels)
            layouts = sorted({r.layout for r in res.rows if r.format != "keep"})
            if kernels == "core" and not any(lay.startswith("ComfyUI ") for lay in layouts):
                continue
            out = sample(res.model)
            records.append(dict(name=f"reference fidelity {name}", model=f"{name}, {steps} steps",
                                baseline="float model", variant=f"core {fmt}" if kernels == "core" else fmt,
                                path=", ".join(layouts), psnr_db=psnr(picture, ref.decode(name, out).float().clamp(0, 1)),
                                latent_psnr_db=psnr(reference, out)))
    return records


def run(quick: bool) -> list[dict]:
    host.import_comfy()
    torch.manual_seed(0)
    families = ("wan21",) if quick else ("wan21", "flux")
    steps, repeat = (2, 3) if quick else (6, 3)
    records = layer_records(quick)
    records.append(quantize_memory("wan21"))
    for family in families:
        for size in (("wide",) if quick else ("medium", "wide")):
            records += bench_family(family, steps, repeat, size)
        records += outlier_layer_sqnr(family, 2 if quick else 4)
        records += reference_fidelity(f"ref_{family}", 8 if quick else 20)
    if not quick:
        records += real_depth_bytes()
    return records
