"""Step caching on the trained reference models: every cache, ours and ComfyUI's, side by side.

Subjects: ``ref_flux`` and ``ref_wan21`` (real denoising trajectories, outputs decoded to pixels)
at 20 and 30 steps, euler / simple, cfg 4, the same seed and conditioning for every row. Rows:

- Forecast Cache (ours) at 1.5-5x, verified slope, and at 3x and 4x with the plain slope;
- TeaCache (ours) with a Cache Calibrate profile made on the subject for 1.5, 2, 2.5 and 3x;
- TaylorSeer (ours) every 2, 3 and 4 steps, order 1 (the node's defaults otherwise);
- ComfyUI's EasyCache (handed a copy of its input, see ``lab.peer_caches.hand_over_a_copy``) and LazyCache at
  thresholds 0.1-0.5 (start 0.15, end 0.95: the nodes' defaults);
- fewer steps: the same sampler on a half, a third and a quarter of the steps (what anyone can
  do instead of caching; its bound is steps / its steps).

Every row is timed against the uncached run in interleaved rounds (``measure.compare_timings``),
one torch thread. Bound: evaluations / computed evaluations (model calls saved). Fidelity: PSNR
and SSIM of the decoded pixels against the uncached run. One more record per subject measures
what limits any cache there: the uncached run against the same sampler at 200 steps (its own
discretization error), so a cache cannot be asked to track it more closely than the reference
tracks the solution it approximates.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from lab import host, measure, sampling
from lab.bench import bench_stack
from lab.peer_caches import DEFAULTS, comfy_cache
from comfyui_accel import metrics

log = logging.getLogger(__name__)

GOALS = {"ref_wan21": {3.0: 30.0, 4.0: 25.0}, "ref_flux": {3.0: 27.0, 4.0: 25.0}}   # speedup -> PSNR dB to reach
CONVERGED_STEPS = 200
OURS = "Forecast Cache"


# --- rows ------------------------------------------------------------------------------------

def _row(method, setting, model, sample, peer=False, counter=None, computed=None):
    return dict(method=method, setting=setting, model=model, sample=sample, peer=peer, counter=counter,
                computed=computed)


def variants(subject, quick: bool) -> list[dict]:
    """Every row for one subject: method, setting, the MODEL and how to sample it, call counts."""
    base, n = subject.model, subject.steps
    out = []
    for speedup in ((3.0,) if quick else (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)):
        out.append(_row(OURS, f"{speedup:g}x", bench_stack.forecast(base, speedup), subject.sample))
    for speedup in ((3.0,) if quick else (3.0, 4.0)):
        plain = bench_stack.forecast(base, speedup, verify=False)
        out.append(_row(f"{OURS} (plain slope)", f"{speedup:g}x", plain, subject.sample))
    for target in ((2.0,) if quick else (1.5, 2.0, 2.5, 3.0)):
        profile = bench_stack.calibrate(subject, base, target)
        out.append(_row("TeaCache", f"calibrated {target:g}x", bench_stack.teacache(base, profile), subject.sample))
    for interval in ((3,) if quick else (2, 3, 4)):
        out.append(_row("TaylorSeer", f"N={interval}, order 1", bench_stack.taylorseer(base, interval), subject.sample))
    for kind in ("EasyCache", "LazyCache"):
        for thr in ((0.2,) if quick else (0.1, 0.2, 0.3, 0.5)):
            m, counter = comfy_cache(base, kind, reuse_threshold=thr, **DEFAULTS)
            out.append(_row(f"{kind} (ComfyUI)", f"threshold {thr:g}", m, subject.sample, peer=True, counter=counter))
    for divisor in ((3,) if quick else (2, 3, 4)):
        fewer = dataclasses.replace(subject, steps=max(1, round(n / divisor)))
        out.append(_row("Fewer steps (ComfyUI)", f"{fewer.steps} steps", base, fewer.sample, peer=True,
                        computed=fewer.steps))
    return out


def _counts(row, steps: int) -> tuple[int, int]:
    """(evaluations, computed) of the row's last run."""
    from comfyui_accel.cache import engine
    if row["computed"] is not None:
        return steps, row["computed"]
    if row["counter"] is not None:
        return steps, row["counter"]["calls"]
    summary = engine.setup_of(row["model"]).reports[-1]["summary"]
    return summary["evaluations"], summary["computed"]


def bench_subject(subject, quick: bool) -> list[dict]:
    log.info("== cache: %s", subject.name)
    reference_px = subject.picture(subject.sample(subject.model))
    todo = variants(subject, quick)
    outputs = {}

    def timed(i):
        def fn():   # every timed run also gives the row's output (same seeds: same output)
            if todo[i]["counter"] is not None:
                todo[i]["counter"]["calls"] = 0
            outputs[i] = todo[i]["sample"](todo[i]["model"])
        return fn

    base_s = measure.time_fn(lambda: subject.sample(subject.model), warmup=0, repeat=1)["median_s"]
    repeat = subject.timing_rounds or max(1, min(5, int((2.0 if quick else 10.0) / base_s)))
    timing = measure.compare_timings(lambda: subject.sample(subject.model),
                                     {str(i): timed(i) for i in range(len(todo))}, warmup=0, repeat=repeat)
    reference_name = subject.name.split(",")[0]
    records = []
    for i, row in enumerate(todo):
        evaluations, computed = _counts(row, subject.steps)
        px = subject.picture(outputs[i])
        t = timing["variants"][str(i)]
        bound = evaluations / computed if computed else 1.0
        records.append(dict(
            name="cache", model=subject.name, reference=reference_name, steps=subject.steps,
            baseline="uncached, same seed", variant=f"{row['method']}: {row['setting']}", method=row["method"],
            setting=row["setting"], peer=row["peer"], speedup=t["speedup"], bound_speedup=bound,
            bound=f"{evaluations}/{computed} = {bound:.2f}x", psnr_db=metrics.psnr(reference_px, px, data_range=1.0),
            ssim=metrics.ssim(reference_px, px, data_range=1.0), weight_bytes_ratio=None, evaluations=evaluations,
            computed=computed, time_s=t["median_s"], baseline_time_s=timing["baseline"]["median_s"],
            timing_rounds=repeat, threads=torch.get_num_threads()))
        log.info("   %-45s %.2fx (bound %.2fx)  PSNR %.1f dB", records[-1]["variant"], records[-1]["speedup"],
                 bound, records[-1]["psnr_db"])
    converged = dataclasses.replace(subject, steps=CONVERGED_STEPS)
    converged_px = subject.picture(converged.sample(converged.model))
    records.append(dict(
        name="cache limit", model=subject.name, reference=reference_name, steps=subject.steps,
        baseline=f"the same sampler at {CONVERGED_STEPS} steps", variant=f"uncached, {subject.steps} steps",
        speedup=None, psnr_db=metrics.psnr(converged_px, reference_px, data_range=1.0),
        ssim=metrics.ssim(converged_px, reference_px, data_range=1.0), weight_bytes_ratio=None,
        bound="its own discretization error"))
    return records


def two_experts(steps: int, split: int, high, low, subject):
    """KSamplerAdvanced's pair: ``high`` samples steps [0, split) and returns the leftover noise,
    ``low`` finishes [split, steps) (Wan 2.2's high- and low-noise experts)."""
    pair = dataclasses.replace(subject, steps=steps)
    x = pair.sample(high, start_step=0, last_step=split, force_full_denoise=False)
    return sampling.ksampler(low, subject.positive, subject.negative, x, steps, subject.cfg, sampling.SEED,
                             start_step=split, last_step=steps, force_full_denoise=True, disable_noise=True)


def expert_records() -> list[dict]:
    """Wan 2.2's two experts on a short and a normal schedule, with the Wan reference as both
    experts (there is no trained Wan 2.2 reference; each expert's cache is separate anyway):
    Forecast Cache on each expert (cached anyway on the short one, where it would stand down)
    against the same pair on fewer steps. Fidelity and model calls only."""
    from comfyui_accel.cache import engine
    subject = sampling.reference_subject("ref_wan21", 20)
    m = subject.model
    records = []
    for steps, speedups, fewer_steps in ((8, (1.33,), (4, 5, 6)), (20, (2.0, 3.0), (6, 7, 10))):
        split = steps // 2
        name = f"ref_wan21 as both experts, {split} + {steps - split} steps"
        reference = subject.picture(two_experts(steps, split, m, m, subject))

        def add(method, setting, out, computed):
            records.append(dict(name="cache experts", model=name, reference="ref_wan21", steps=steps,
                                baseline=f"the uncached pair, {steps} steps", variant=f"{method}: {setting}",
                                method=method, setting=setting, speedup=None, bound_speedup=steps / computed,
                                bound=f"{steps}/{computed} = {steps / computed:.2f}x",
                                psnr_db=metrics.psnr(reference, subject.picture(out), data_range=1.0),
                                ssim=metrics.ssim(reference, subject.picture(out), data_range=1.0),
                                weight_bytes_ratio=None, computed=computed, evaluations=steps))

        for speedup in speedups:
            high, low = (bench_stack.forecast(m, speedup, short_schedule="cache anyway") for _ in range(2))
            out = two_experts(steps, split, high, low, subject)
            computed = sum(engine.setup_of(x).reports[-1]["summary"]["computed"] for x in (high, low))
            add(OURS, f"{speedup:g}x on each expert", out, computed)
        for fewer in fewer_steps:
            add("Fewer steps (ComfyUI)", f"{fewer} steps", two_experts(fewer, fewer // 2, m, m, subject), fewer)
    return records


def subjects(quick: bool) -> list:
    steps = (20,) if quick else (20, 30)
    names = ("ref_flux",) if quick else ("ref_flux", "ref_wan21")
    return [sampling.reference_subject(name, n) for name in names for n in steps]


def run(quick: bool, out: Path | None = None, subjects_: list | None = None) -> list[dict]:
    """The records; with ``out``, also one speed-against-PSNR plot per reference model there."""
    with host.in_process():
        records = []
        for subject in subjects_ if subjects_ is not None else subjects(quick):
            records += bench_subject(subject, quick)
        if not quick and subjects_ is None:
            records += expert_records()
    if out is not None:
        write_plots(records, Path(out))
    return records


# --- the frontier, the goals, the plots and the report ----------------------------------------

def _rows(records, reference=None, steps=None):
    return [r for r in records if r.get("name") == "cache" and (reference is None or r["reference"] == reference)
            and (steps is None or r["steps"] == steps)]


def psnr_at(records: list[dict], speed: float, key: str = "bound_speedup") -> float | None:
    """PSNR of a method's curve at ``speed`` (linear between its two nearest points; None outside)."""
    pts = sorted((r[key], r["psnr_db"]) for r in records)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 - 1e-9 <= speed <= x1 + 1e-9:
            return y0 if x1 - x0 < 1e-9 else y0 + (y1 - y0) * (speed - x0) / (x1 - x0)
    return None


def goals(records: list[dict]) -> list[dict]:
    """Per reference and step count: our curve at each goal's speed (bound and measured)."""
    out = []
    for reference, targets in GOALS.items():
        for steps in sorted({r["steps"] for r in _rows(records, reference)}):
            rows = _rows(records, reference, steps)
            ours = [r for r in rows if r["method"] == OURS]
            fewer = [r for r in rows if r["method"].startswith("Fewer steps")]
            limit = next((r for r in records if r.get("name") == "cache limit" and r["reference"] == reference
                          and r["steps"] == steps), None)
            for speed, goal in targets.items():
                at = psnr_at(ours, speed)
                out.append(dict(reference=reference, steps=steps, speed=speed, goal_db=goal, bound_db=at,
                                measured_db=psnr_at(ours, speed, "speedup"), fewer_steps_db=psnr_at(fewer, speed),
                                own_error_db=limit["psnr_db"] if limit else None,
                                met=at is not None and at >= goal))
    return out


def dominance(records: list[dict], key: str = "bound_speedup") -> list[dict]:
    """Every other method's point against our curve at its speed (None where ours has no point)."""
    out = []
    for reference in dict.fromkeys(r["reference"] for r in _rows(records)):
        for steps in sorted({r["steps"] for r in _rows(records, reference)}):
            rows = _rows(records, reference, steps)
            ours = [r for r in rows if r["method"] == OURS]
            for r in rows:
                if not r["method"].startswith(OURS):   # other methods (our own ablation is in the tables)
                    at = psnr_at(ours, r[key], key)
                    out.append(dict(model=r["model"], variant=r["variant"], speed=r[key], psnr_db=r["psnr_db"],
                                    ours_db=at, above=None if at is None else at >= r["psnr_db"] - 1e-9))
    return out


PSNR_CAP = 60.0
# Legend entries hold 16 characters.
LEGEND = {OURS: "Forecast (ours)", f"{OURS} (plain slope)": "Forecast, plain", "TeaCache": "TeaCache (ours)",
          "TaylorSeer": "TaylorSeer(ours)", "EasyCache (ComfyUI)": "EasyCache [Cfy]",
          "LazyCache (ComfyUI)": "LazyCache [Cfy]", "Fewer steps (ComfyUI)": "Fewer steps"}


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """One PNG per reference model: speedup (measured: filled, bound: hollow) against PSNR, one
    panel per step count, every method in one colour."""
    from comfyui_accel.nodes.plots import line_plot
    from lab.bench.stack_plots import slug, to_png
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in _rows(records)))
    colors = {}
    for i, m in enumerate(methods):
        colors[LEGEND.get(m, m)] = colors[f"{m} bound"] = i
    written = []
    for reference in dict.fromkeys(r["reference"] for r in _rows(records)):
        panels = []
        for steps in sorted({r["steps"] for r in _rows(records, reference)}):
            series = {}
            for m in methods:
                rows = sorted((r for r in _rows(records, reference, steps) if r["method"] == m),
                              key=lambda r: r["bound_speedup"])
                ys = [min(r["psnr_db"], PSNR_CAP) for r in rows]
                series[LEGEND.get(m, m)] = ([r["speedup"] for r in rows], ys)
                series[f"{m} bound"] = ([r["bound_speedup"] for r in rows], ys)
            panels.append(line_plot(series, f"{reference}, {steps} steps",
                                    xlabel="speedup (x): dots = measured, open circles and lines = bound "
                                           "(steps / computed)",
                                    ylabel="PSNR dB", colors=colors, hollow=[f"{m} bound" for m in methods],
                                    dots=[LEGEND.get(m, m) for m in methods]))
        written.append(to_png(torch.cat(panels, dim=2), out / f"cache_speed_psnr_{slug(reference)}.png"))
    return written


def _db(x) -> str:
    return "" if x is None else "identical" if math.isinf(x) else f"{x:.1f}"


def markdown(records: list[dict], images: list[str]) -> str:
    rows = _rows(records)
    lines = ["## Step caching on the reference models (bench_cache)", "",
             "Every cache, ours and ComfyUI's, on the trained reference models at 20 and 30 steps (euler, simple, "
             "cfg 4, one seed and prompt). Speedup: uncached time / this time, timed in interleaved rounds on one "
             "torch thread. Bound: evaluations / computed evaluations (the model calls saved; the wall-clock speedup "
             "of a large model approaches it). PSNR/SSIM: decoded pixels against the uncached run. EasyCache is "
             "handed a copy of its input (on a CPU in float32 it otherwise returns the sampler's own latent and "
             "the picture turns to noise; docs/caching.md). 'Fewer steps' is the same sampler on fewer steps: "
             "what anyone can do instead of caching.", ""]
    g = goals(records)
    if g:
        lines += ["### Goals (issue 19) and what limits them", "",
                  "Forecast Cache's curve at each speed (interpolated between its measured points), against the goal, "
                  "the same sampler on that many fewer steps, and the uncached run's own distance from the solution "
                  f"it approximates (the same sampler at {CONVERGED_STEPS} steps).", "",
                  "| reference | steps | speed | goal dB | Forecast Cache dB (bound) | at measured speedup | fewer steps dB "
                  f"| uncached vs {CONVERGED_STEPS} steps dB | met |", "|---|---|---|---|---|---|---|---|---|"]
        for r in g:
            lines.append(f"| {r['reference']} | {r['steps']} | {r['speed']:g}x | {r['goal_db']:g} | {_db(r['bound_db'])} | "
                         f"{_db(r['measured_db'])} | {_db(r['fewer_steps_db'])} | {_db(r['own_error_db'])} | "
                         f"{'yes' if r['met'] else 'no'} |")
        lines.append("")
    d = [x for x in dominance(records) if x["above"] is not None]
    if d:
        below = [x for x in d if not x["above"]]
        lines += [f"Other methods' points against Forecast Cache's curve at the same bound: {len(d) - len(below)} of "
                  f"{len(d)} on or below it" + (":" if not below else "; above it:"), ""]
        lines += [f"- {x['model']}, {x['variant']}: {x['psnr_db']:.1f} dB at {x['speed']:.2f}x, ours "
                  f"{x['ours_db']:.1f} dB" for x in below]
        lines.append("")
    experts = [r for r in records if r.get("name") == "cache experts"]
    if experts:
        lines += ["### Wan 2.2's two experts (KSamplerAdvanced pair)", "",
                  "The Wan reference as both experts (high noise: the first half of the steps, low noise: the rest), "
                  "Forecast Cache on each expert against the same pair sampled on fewer steps; PSNR against the "
                  "uncached pair. On the 8-step schedule each expert has 4 steps and the node stands down unless "
                  "short_schedule is 'cache anyway' (used here to measure what it would give).", "",
                  "| schedule | method | setting | bound | PSNR dB |", "|---|---|---|---|---|"]
        for r in experts:
            lines.append(f"| {r['model']} | {r['method']} | {r['setting']} | {r['bound']} | {_db(r['psnr_db'])} |")
        lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        first = sub[0]
        lines += [f"### {model}", "",
                  f"Uncached: {first['baseline_time_s']:.2f} s per run ({first['threads']} torch thread, "
                  f"{first['timing_rounds']} interleaved rounds).", "",
                  "| method | setting | speedup | bound | PSNR dB | SSIM |", "|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['method']} | {r['setting']} | {r['speedup']:.2f}x | {r['bound']} | {_db(r['psnr_db'])} | "
                         f"{r['ssim']:.3f} |")
        lines.append("")
    for path in images:
        lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines)


README_ROWS = (f"{OURS}: 2x", f"{OURS}: 3x", f"{OURS}: 4x", "TeaCache: calibrated 2x", "TaylorSeer: N=3, order 1",
               "EasyCache (ComfyUI): threshold 0.2", "LazyCache (ComfyUI): threshold 0.2")


def readme(records: list[dict], images: list[str]) -> str:
    rows = _rows(records)
    models = list(dict.fromkeys(r["model"] for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["variant"] in README_ROWS or r["method"].startswith("Fewer steps"):
            key = "Fewer steps (ComfyUI): a third" if r["method"].startswith("Fewer steps") and \
                abs(r["bound_speedup"] - 3) < 0.5 else r["variant"]
            if key in README_ROWS or key.endswith("a third"):
                cells.setdefault(key, {})[r["model"]] = (f"{r['speedup']:.2f}x ({r['bound_speedup']:.2f}x) / "
                                                         f"{_db(r['psnr_db'])}")
    lines = ["Step caching: measured speedup (bound: steps / computed) / PSNR dB against the uncached run, decoded "
             "pixels, same seed:", "", "| variant | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {v} | " + " | ".join(by.get(m, "") for m in models) + " |" for v, by in cells.items()]
    lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines)
