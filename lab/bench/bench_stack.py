"""Every technique alone, ComfyUI's peers, and everything stacked, on the trained reference models.

One run, same seeds and conditioning for every row. Subjects: the two trained reference models
(``ref_flux``, ``ref_wan21``: real denoising trajectories, outputs decoded to pixels by their exact
patch autoencoder) and, in the full run, the medium random-weight Wan fixture (more tokens, so
attention and matmuls weigh more; fidelity on its final latent).

Every MODEL is a real ModelPatcher chain built by our nodes' ``execute`` (Quantize Model, TeaCache
with a Cache Calibrate profile, TaylorSeer, Sparse Attention) or by ComfyUI's own code (EasyCache,
LazyCache, fp8 ``weight_dtype`` at load, bf16 compute, its registered attention backends through
``optimized_attention_override``), sampled in-process with ``comfy.sample.sample`` (KSampler's path).

Per row: speedup against the unaccelerated run (timed interleaved in the same rounds), weight bytes
of the diffusion model, the peak RSS growth while sampling, PSNR/SSIM of the decoded output (pixels
in [0, 1]) against the unaccelerated output, and the physical bound of the technique:
cache = evaluations / computed evaluations; sparse attention = 1 / density for attention and the
Amdahl limit of the whole run from the measured attention share; quantization = 32 / bits of the
quantized layers' weight bytes against fp32; stacks multiply their speed bounds.

CacheQuant interaction (``interaction`` records): cache alone, quantization alone, both, with the
cache calibrated on the float model and (the remedy) on the quantized model. Independent errors add
in mean squared error, so ``mse_ratio`` = MSE(both) / (MSE(cache) + MSE(quant)) > 1 means the two
hurt each other beyond the sum; see docs/cache_quant.md.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch

from lab import host, measure
from lab.bench.bench_sparse_attention import SelfAttentionClock
from lab.peer_caches import DEFAULTS, comfy_cache
from lab.sampling import SEED, Subject, count_calls, fixture_subject, reference_subject
from comfyui_accel import metrics

log = logging.getLogger(__name__)


# --- building the MODEL chains with our nodes and ComfyUI's ---------------------------------------

def quantize(model, fmt: str):
    from comfyui_accel.nodes.quant import AccelQuantizeModel
    return AccelQuantizeModel.execute(model, format=fmt, group_size=64, compute_dtype="auto", smooth_alpha=0.5,
                                      calibration_steps=8, seed=0, cfg=4.0, auto_formats="int8, w4a8, int4",
                                      auto_budget=0.35, auto_min_sqnr_db=0.0, layer_overrides="").args[0]


def quantized_bits(model) -> float | None:
    """Stored bits per weight of the quantized layers (codes and scales), weighted by size."""
    from comfyui_accel.quant import core
    from comfyui_accel.quant import model as qmodel
    layers = [m for _, m in qmodel.linear_layers(model) if qmodel.is_ours(m)]
    numel = sum(m.weight.numel() for m in layers)
    nbytes = sum(m.weight.packed_nbytes() if isinstance(m, qmodel.QuantLinear) else core.packed_nbytes(m.weight)
                 for m in layers)
    return 8 * nbytes / numel if numel else None


def svd_branch(subject: Subject, model, rank: int = 16):
    """SVD Low-Rank Branch before Quantize Model (SVDQuant), calibrated on the subject's conditioning."""
    from comfyui_accel.nodes.svd import AccelSVDLowRankBranch
    return AccelSVDLowRankBranch.execute(model, rank=rank, smooth_alpha=0.5, search_alpha=False, svd="randomized",
                                         report_format="w4a4", group_size=64, calibration_steps=4, seed=SEED, cfg=subject.cfg,
                                         layer_overrides="", positive=subject.positive, negative=subject.negative,
                                         latent=subject.latent).args[0]


def calibrate(subject: Subject, model, target: float):
    """A Cache Calibrate profile for ``model`` (the node, on the subject's own conditioning)."""
    from comfyui_accel.nodes.cache import AccelCacheCalibrate
    return AccelCacheCalibrate.execute(model, subject.positive, subject.negative, subject.latent, seed=SEED,
                                       steps=subject.steps, cfg=subject.cfg, sampler_name="euler",
                                       scheduler="simple", denoise=1.0, target_speedup=target, start=0.0, end=1.0,
                                       signal="auto").args[0]


def teacache(model, profile):
    from comfyui_accel.nodes.cache import AccelTeaCache
    return AccelTeaCache.execute(model, threshold=-1.0, start=0.0, end=1.0, coefficients="auto",
                                 cache_device="model device", short_schedule="skip caching", profile=profile).args[0]


def taylorseer(model, interval: int, order: int = 1):
    from comfyui_accel.nodes.cache import AccelTaylorSeer
    return AccelTaylorSeer.execute(model, interval=interval, order=order, warmup_steps=3, end=1.0, forecast="auto",
                                   cache_device="model device", short_schedule="skip caching").args[0]


def forecast(model, speedup: float, verify: bool = True, short_schedule: str = "skip caching"):
    from comfyui_accel.nodes.cache import AccelForecastCache
    return AccelForecastCache.execute(model, speedup=speedup, forecast="auto", verify=verify,
                                      cache_device="model device", short_schedule=short_schedule).args[0]


def sparse(model, density: float, block_size: int):
    from comfyui_accel.nodes.attention import AccelSparseAttention
    return AccelSparseAttention.execute(model, policy="radial", density=density, block_size=block_size, top_p=0.9,
                                        dense_steps=1, dense_first_layers=1, dense_last_layers=0, min_tokens=0,
                                        retention=False, probe_rows=0, save_report=False).args[0]


def comfy_attention(model, backend: str):
    """ComfyUI's registered attention backend ``backend`` for every attention call (its public override)."""
    from comfy.ldm.modules import attention
    func = attention.get_attention_function(backend)
    m = model.clone()

    def override(_default, *args, **kwargs):
        return func(*args, **kwargs)   # kwargs carry ComfyUI's "inside the wrapper" flag: no recursion

    m.model_options["transformer_options"]["optimized_attention_override"] = override
    return m


def bf16_compute(subject: Subject):
    m = subject.load(torch.bfloat16)
    m.set_model_compute_dtype(torch.bfloat16)
    return m


# --- variants -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    technique: str                  # series in the plots: "Quantize Model", "TeaCache", "EasyCache (ComfyUI)"...
    label: str
    model: object
    peer: bool = False              # ComfyUI's own, not ours
    counter: dict | None = None     # evaluations counter for ComfyUI's caches
    bits: float | None = None       # bits per quantized weight
    density: float | None = None    # sparse attention density asked for
    group: str = "alone"            # "alone", "stack", "interaction"
    threshold: float | None = None  # TeaCache's calibrated threshold


QUANT_FORMATS = ("int8", "fp8_e4m3", "int4", "nvfp4", "w4a4")


def variants(subject: Subject, quick: bool) -> list[Variant]:
    base = subject.model
    quick = quick or subject.core_only
    out: list[Variant] = []
    formats = ("int8", "int4", "w4a4") if quick else QUANT_FORMATS
    quantized, bits = {}, {}
    for fmt in formats:
        quantized[fmt] = quantize(base, fmt)
        bits[fmt] = quantized_bits(quantized[fmt])
        out.append(Variant("Quantize Model", fmt, quantized[fmt], bits=bits[fmt]))
    svdquant = quantize(svd_branch(subject, base), "w4a4")
    out.append(Variant("SVD Low-Rank Branch", "SVDQuant: rank 16 + w4a4", svdquant, bits=quantized_bits(svdquant)))
    out.append(Variant("ComfyUI weight dtype", "fp8_e4m3fn (UNET loader)", subject.load(torch.float8_e4m3fn),
                       peer=True, bits=8.0))
    out.append(Variant("ComfyUI weight dtype", "bf16 weights + compute", bf16_compute(subject), peer=True, bits=16.0))

    targets = (2.0,) if quick else (1.5, 2.0, 2.5)
    profiles = {t: calibrate(subject, base, t) for t in targets}
    for t, p in profiles.items():
        out.append(Variant("TeaCache", f"calibrated {t:g}x", teacache(base, p), threshold=p.threshold))
    for interval in ((3,) if quick else (2, 4)):
        out.append(Variant("TaylorSeer", f"N={interval}, order 1", taylorseer(base, interval)))
    for speedup in ((3.0,) if quick else (3.0, 4.0)):
        out.append(Variant("Forecast Cache", f"{speedup:g}x", forecast(base, speedup)))
    for kind in ("EasyCache", "LazyCache"):
        for thr in ((0.2,) if quick else (0.2, 0.5)):
            m, counter = comfy_cache(base, kind, reuse_threshold=thr, **DEFAULTS)
            out.append(Variant(f"{kind} (ComfyUI)", f"threshold {thr:g}", m, peer=True, counter=counter))

    for density in ((0.5,) if quick else (0.5, 0.25)):
        out.append(Variant("Sparse Attention", f"radial, density {density:g}", sparse(base, density, subject.block_size),
                           density=density))
    from comfy.ldm.modules import attention
    backends = [b for b in ("pytorch", "split") if b in attention.REGISTERED_ATTENTION_FUNCTIONS]
    for backend in backends[:1] if quick else backends:
        out.append(Variant("ComfyUI attention", backend, comfy_attention(base, backend), peer=True))

    # Everything stacked: quantize first, calibrate the cache on the quantized model (the remedy
    # measured below), then sparse attention on top.
    int8_profile = calibrate(subject, quantized["int8"], 2.0)
    out.append(Variant("Stacked", "int8 + TeaCache 2x + sparse 0.5",
                       sparse(teacache(quantized["int8"], int8_profile), 0.5, subject.block_size),
                       bits=bits["int8"], density=0.5, group="stack", threshold=int8_profile.threshold))
    svd_profile = calibrate(subject, svdquant, 2.0)
    out.append(Variant("Stacked", "SVDQuant w4a4 + TeaCache 2x + sparse 0.5",
                       sparse(teacache(svdquant, svd_profile), 0.5, subject.block_size),
                       bits=quantized_bits(svdquant), density=0.5, group="stack", threshold=svd_profile.threshold))
    out.append(Variant("Stacked", "int8 + Forecast Cache 3x + sparse 0.5",
                       sparse(forecast(quantized["int8"], 3.0), 0.5, subject.block_size),
                       bits=bits["int8"], density=0.5, group="stack"))
    out.append(Variant("Stacked", "int4 + TaylorSeer N=3 + sparse 0.5",
                       sparse(taylorseer(quantized["int4"], 3), 0.5, subject.block_size),
                       bits=bits["int4"], density=0.5, group="stack"))

    if subject.core_only:
        return out
    # CacheQuant: cache alone (above: TeaCache 2x calibrated on fp32) vs quant + the same cache.
    fp32_profile = profiles[2.0]
    int4_profile = calibrate(subject, quantized["int4"], 2.0)
    for fmt, own in (("int8", int8_profile), ("int4", int4_profile)):
        out.append(Variant("Quant + cache", f"{fmt} + TeaCache 2x calibrated on fp32", teacache(quantized[fmt], fp32_profile),
                           bits=bits[fmt], group="interaction", threshold=fp32_profile.threshold))
        out.append(Variant("Quant + cache", f"{fmt} + TeaCache 2x calibrated on {fmt} (remedy)",
                           teacache(quantized[fmt], own), bits=bits[fmt], group="interaction", threshold=own.threshold))
    return out


# --- measuring ------------------------------------------------------------------------------------

def _cache_counts(variant: Variant, evaluations: int) -> tuple[int, int] | None:
    """(evaluations, computed) of the last run, for any variant with a cache in its chain;
    ``evaluations``: the diffusion-model calls of the unaccelerated run."""
    from comfyui_accel.cache import engine
    if variant.counter is not None:
        return evaluations, variant.counter["calls"]
    setup = engine.setup_of(variant.model)
    if setup is None or not setup.reports:
        return None
    s = setup.reports[-1]["summary"]
    return s["evaluations"], s["computed"]


def _attention_share(subject: Subject) -> float:
    """Fraction of the unaccelerated run's time spent in self-attention (an override that times it)."""
    clock = SelfAttentionClock(lambda func, *args, **kwargs: func(*args, **kwargs))
    m = subject.model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = clock
    start = time.perf_counter()
    subject.sample(m)
    return clock.seconds / (time.perf_counter() - start)


def _bound(v: Variant, counts, attention_share: float) -> tuple[str, float | None]:
    """(text, speed bound) for the row: the limits its techniques set."""
    parts, speed = [], 1.0
    if v.bits is not None:
        parts.append(f"weights <= 32/{v.bits:g} = {32 / v.bits:.2f}x")
    if counts is not None and counts[1]:
        evaluations, computed = counts
        parts.append(f"steps {evaluations}/{computed} = {evaluations / computed:.2f}x")
        speed *= evaluations / computed
    if v.density is not None:
        amdahl = 1 / (1 - attention_share * (1 - v.density))
        parts.append(f"attention 1/{v.density:g} = {1 / v.density:.1f}x, run {amdahl:.2f}x")
        speed *= amdahl
    has_speed_bound = counts is not None or v.density is not None
    return "; ".join(parts) or "same math", (speed if has_speed_bound else None)


def bench_subject(subject: Subject, quick: bool, images: dict | None = None) -> list[dict]:
    log.info("== stack: %s", subject.name)
    todo = variants(subject, quick)
    share = _attention_share(subject)
    reference, base_peak = measure.peak_rss_during(subject.sample, subject.model)
    reference_px = subject.picture(reference)
    outputs, peaks = {}, {}

    def timed(i):
        def fn():   # every timed run also gives the output and its memory peak (same seeds: same output)
            if todo[i].counter is not None:
                todo[i].counter["calls"] = 0
            outputs[i], peak = measure.peak_rss_during(subject.sample, todo[i].model)
            peaks[i] = max(peaks.get(i) or 0, peak or 0) if peak is not None else None
        return fn

    # As many rounds as fit a time budget per variant: cheap models get more, to beat the noise.
    repeat = subject.timing_rounds
    if repeat is None:
        base_s = measure.time_fn(lambda: subject.sample(subject.model), warmup=0, repeat=1)["median_s"]
        repeat = max(1, min(5, int((2.0 if quick else 12.0) / base_s)))
    timing = measure.compare_timings(lambda: subject.sample(subject.model), {str(i): timed(i) for i in range(len(todo))},
                                     warmup=0, repeat=repeat)
    counted, calls = count_calls(subject.model)
    subject.sample(counted)
    counts = {i: _cache_counts(v, calls["calls"]) for i, v in enumerate(todo)}   # of the last run
    # Weight bytes with no clone's object patches applied (sampling leaves the last one's in place).
    import comfy.model_management
    comfy.model_management.unload_all_models()
    base_bytes = measure.model_weight_bytes(subject.model)
    sizes = [measure.model_weight_bytes(v.model) for v in todo]
    records = []
    if images is not None:
        images[subject.name] = {"unaccelerated": reference_px}
    for i, v in enumerate(todo):
        px = subject.picture(outputs[i])
        data_range = None if subject.decode is None else 1.0
        model_bytes = sizes[i]
        text, speed_bound = _bound(v, counts[i], share)
        t = timing["variants"][str(i)]
        mse = float((px.double() - reference_px.double()).pow(2).mean())
        records.append(dict(
            name="stack", model=subject.name, baseline="fp32, no acceleration", variant=f"{v.technique}: {v.label}",
            speedup=t["speedup"], psnr_db=metrics.psnr(reference_px, px, data_range=data_range),
            ssim=metrics.ssim(reference_px, px, data_range=data_range), weight_bytes_ratio=base_bytes / model_bytes,
            bound=text, bound_speedup=speed_bound, technique=v.technique, setting=v.label, peer=v.peer, group=v.group,
            weight_bytes=model_bytes, baseline_weight_bytes=base_bytes, peak_rss_bytes=peaks[i],
            baseline_peak_rss_bytes=base_peak, mse=mse, evaluations=counts[i][0] if counts[i] else None,
            computed=counts[i][1] if counts[i] else None, attention_share=share, time_s=t["median_s"],
            baseline_time_s=timing["baseline"]["median_s"], fidelity_on="decoded pixels" if subject.decode else "latent",
            threshold=v.threshold, timing_rounds=repeat, threads=torch.get_num_threads(),
            load_average=os.getloadavg()[0]))
        if images is not None and v.group != "interaction":
            images[subject.name][f"{v.technique}: {v.label}"] = px
        log.info("   %-60s %.2fx  PSNR %.1f dB", records[-1]["variant"], records[-1]["speedup"], records[-1]["psnr_db"])
    return records + interaction_records(records)


def interaction_records(records: list[dict]) -> list[dict]:
    """CacheQuant: does caching on the quantized model lose more than cache and quant alone add up to?"""
    by = {r["setting"]: r for r in records}
    cache = by.get("calibrated 2x")
    out = []
    for fmt in ("int8", "int4"):
        quant = by.get(fmt)
        for which in ("fp32", fmt):
            key = f"{fmt} + TeaCache 2x calibrated on {which}" + (" (remedy)" if which == fmt else "")
            both = by.get(key)
            if cache is None or quant is None or both is None:
                continue
            expected = cache["mse"] + quant["mse"]
            out.append(dict(
                name="cache x quant", model=both["model"], baseline="fp32, no acceleration",
                variant=key, speedup=both["speedup"], psnr_db=both["psnr_db"], ssim=both["ssim"],
                weight_bytes_ratio=both["weight_bytes_ratio"], bound=both["bound"],
                psnr_cache_alone=cache["psnr_db"], psnr_quant_alone=quant["psnr_db"],
                psnr_if_additive=_psnr_from_mse(expected, both), mse_ratio=both["mse"] / expected if expected else None,
                computed_cache_alone=cache["computed"], computed_both=both["computed"], threshold=both["threshold"],
                threshold_cache_alone=cache["threshold"], group="interaction"))
    return out


def _psnr_from_mse(mse: float, like: dict) -> float:
    # Same data range as the row's own PSNR: recover it from that row's PSNR and MSE.
    if mse <= 0 or not like["mse"]:
        return math.inf
    return like["psnr_db"] + 10 * math.log10(like["mse"] / mse)


# --- outputs: plots and side-by-side pictures -------------------------------------------------------

def write_outputs(records: list[dict], images: dict, out: Path) -> list[Path]:
    from lab.bench import stack_plots
    return stack_plots.write(records, images, out)


def subjects(quick: bool) -> list[Subject]:
    steps = 10 if quick else 20   # TeaCache/TaylorSeer leave schedules of 8 steps or fewer uncached
    subs = [reference_subject("ref_flux", steps), reference_subject("ref_wan21", steps)]
    if not quick:
        subs.append(fixture_subject("wan21", "medium", 10))
    return subs


def run(quick: bool, out: Path | None = None, subjects_: list[Subject] | None = None) -> list[dict]:
    """The records; with ``out``, also the plots and output pictures written there (PNG)."""
    images: dict = {}
    with host.in_process():
        records = []
        for subject in subjects_ if subjects_ is not None else subjects(quick):
            records += bench_subject(subject, quick, images)
    if out is not None:
        write_outputs(records, images, Path(out))
    return records


# --- the report section ---------------------------------------------------------------------------

def _mb(n) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _db(x) -> str:
    return "identical" if x is None or math.isinf(x) else f"{x:.1f}"


def markdown(records: list[dict], images: list[str]) -> str:
    """The stack section of bench.md: one table per subject, the CacheQuant table, the pictures."""
    rows = [r for r in records if r.get("name") == "stack"]
    lines = ["## Everything side by side (bench_stack)", "",
             "Each row is one MODEL chain built by our nodes (or ComfyUI's peers), sampled with the same seed, "
             "conditioning and schedule as the unaccelerated fp32 run it is compared with. Speedup: "
             "unaccelerated time / this time, timed in interleaved rounds. PSNR/SSIM: the decoded output "
             "(reference models: pixels in [0, 1]) or the final latent (fixture) against the unaccelerated one. "
             "Weights: the diffusion model's stored bytes. Peak: RSS growth while sampling (in-process). "
             "Bound: the physical limit of the technique (steps computed, attention density with the run's "
             "Amdahl limit from the measured attention share, bytes per weight).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model and r.get("group") != "interaction"]
        first = sub[0]
        lines += [f"### {model}", "",
                  f"Unaccelerated: {first['baseline_time_s']:.2f} s per run ({first['threads']} torch thread(s), "
                  f"load average {first['load_average']:.1f}), weights "
                  f"{_mb(first['baseline_weight_bytes'])} MB, peak {_mb(first['baseline_peak_rss_bytes'])} MB; "
                  f"self-attention {first['attention_share']:.0%} of the run; fidelity on {first['fidelity_on']}.", "",
                  "| technique | setting | speedup | bound | weights MB (x smaller) | peak MB | PSNR dB | SSIM |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sub:
            who = r["technique"] + (" *(ComfyUI)*" if r["peer"] and "ComfyUI" not in r["technique"] else "")
            setting = r["setting"] + ("" if r["threshold"] is None else f" (threshold {r['threshold']:.3g})")
            lines.append(f"| {who} | {setting} | {r['speedup']:.2f}x | {r['bound']} | "
                         f"{_mb(r['weight_bytes'])} ({r['weight_bytes_ratio']:.2f}x) | {_mb(r['peak_rss_bytes'])} | "
                         f"{_db(r['psnr_db'])} | {r['ssim']:.3f} |")
        lines.append("")
    inter = [r for r in records if r.get("name") == "cache x quant"]
    if inter:
        lines += ["### Cache on a quantized model (CacheQuant)", "",
                  "MSE ratio = MSE(quant + cache) / (MSE(quant alone) + MSE(cache alone)): independent errors add, "
                  "so 1 means no interaction and > 1 means caching on the quantized model loses more than the sum. "
                  "'PSNR if additive' is what the sum predicts. The remedy calibrates the cache (Cache Calibrate) "
                  "on the quantized model instead of the float one.", "",
                  "| model | variant | speedup | steps computed (cache alone) | PSNR quant alone | PSNR cache alone | "
                  "PSNR if additive | PSNR measured | MSE ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for r in inter:
            lines.append(f"| {r['model']} | {r['variant']} (threshold {r['threshold']:.3g}; alone "
                         f"{r['threshold_cache_alone']:.3g}) | {r['speedup']:.2f}x | {r['computed_both']} "
                         f"({r['computed_cache_alone']}) | {_db(r['psnr_quant_alone'])} | {_db(r['psnr_cache_alone'])} | "
                         f"{_db(r['psnr_if_additive'])} | {_db(r['psnr_db'])} | "
                         f"{'' if r['mse_ratio'] is None else format(r['mse_ratio'], '.2f')} |")
        lines.append("")
    for path in images:
        lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines)


def readme(records: list[dict], images: list[str]) -> str:
    """The README's short form: speedup / PSNR per variant (rows) and model (columns), the pictures."""
    rows = [r for r in records if r.get("name") == "stack" and r.get("group") != "interaction"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        cells.setdefault(r["variant"], {})[r["model"]] = f"{r['speedup']:.2f}x / {_db(r['psnr_db'])}"
    lines = ["Speedup against the unaccelerated fp32 run / PSNR (dB) of the output against it, same seeds "
             "(details, bounds, memory and SSIM in the full report):", "",
             "| variant | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {variant} | " + " | ".join(by.get(m, "") for m in models) + " |" for variant, by in cells.items()]
    lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines)
