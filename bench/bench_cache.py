"""Step caching: TeaCache, TaylorSeer and ComfyUI's own EasyCache / LazyCache against the uncached
run of the same model, seed and conditioning.

For each subject (a model plus how to sample it): the uncached run is the reference and the
baseline time; every cache variant runs once, timed, and its final latent is compared with the
reference (PSNR, SSIM). ``bound`` is the physical limit of the schedule: evaluations / computed
evaluations. Baseline runs are repeated between the variants (start, middle, end) and the
median is used, so drift on a shared machine hits all alike.

TeaCache thresholds come from a calibration run on the subject itself (the Cache Calibrate
method: fit the rescale polynomial, replay the rule for 1.5x / 2x / 3x), since random-weight
fixtures have no published coefficients; where a published preset applies it is run too.
EasyCache / LazyCache run at their defaults and over a grid of thresholds, so there is one at
about our speedups ("matched").

The model is a parameter: ``bench_subject(fixture_subject(...))`` for the fixtures, or build a
:class:`Subject` around any ModelPatcher (e.g. small trained models) and call ``bench_subject``.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Callable

import torch

from ..cache import adapters, engine, profile
from .measure import psnr, ssim

log = logging.getLogger(__name__)

EASYCACHE_DEFAULTS = dict(reuse_threshold=0.2, start_percent=0.15, end_percent=0.95)
COUNT_KEY = "comfyui_accel.bench.count"
COPY_KEY = "comfyui_accel.bench.copy_input"


@dataclasses.dataclass
class Subject:
    name: str                                  # shown in the "model" column
    model: object                              # a ComfyUI ModelPatcher
    sample: Callable[[object], torch.Tensor]   # model -> final latent, same seeds every call
    steps: int


def fixture_subject(family: str, size: str, steps: int, seed: int = 0, cfg: float = 3.0) -> Subject:
    from ..devtools import fixtures
    from ..devtools.sampling import sample
    model = fixtures.load_model(family, size)
    return Subject(f"{family} {size}, {steps} steps", model,
                   lambda m: sample(m, family, size=size, steps=steps, seed=seed, cfg=cfg), steps)


# --- variants -----------------------------------------------------------------------------

def _ours(model, settings: engine.Settings):
    dm = model.get_model_object("diffusion_model")
    adapter = adapters.find_adapter(dm)
    use = adapter if settings.target == "blocks" else None
    return engine.install(model, settings, use, adapter.family if adapter else type(dm).__name__)


def _counted(model):
    """A clone that counts the calls reaching the diffusion model (after any cache wrapper)."""
    import comfy.patcher_extension as pe
    m = model.clone()
    counter = {"calls": 0}

    def count(executor, *args, **kwargs):
        counter["calls"] += 1
        return executor(*args, **kwargs)

    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, COUNT_KEY, count)
    return m, counter


def _comfy_cache(model, kind: str, reuse_threshold: float, start_percent: float, end_percent: float):
    """ComfyUI's own EasyCache / LazyCache node on ``model``, with a counter of the model calls.

    EasyCache gets its input as a copy (``hand_over_a_copy``): see that function for why."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    node = EasyCacheNode if kind == "EasyCache" else LazyCacheNode
    if kind == "EasyCache":
        model = hand_over_a_copy(model)
    out = node.execute(model, reuse_threshold, start_percent, end_percent, False)
    return _counted(out.args[0] if hasattr(out, "args") else out[0])


def hand_over_a_copy(model):
    """A clone whose diffusion model receives a copy of its input, as it does on a GPU.

    On a reused step EasyCache adds its cached difference to its input *in place* and returns
    that tensor as the model output. ComfyUI's ``BaseModel._apply_model`` passes the sampler's
    own latent as that input whenever the cast to the model's dtype is a no-op: flow models
    (``calculate_input`` returns the latent unchanged) computing in float32, i.e. on a CPU. The
    output is then the very tensor ``calculate_denoised`` takes as ``x``, so ``denoised = x - x *
    sigma`` and the picture turns to noise (8-10 dB on both reference models). In bf16/fp16 on a
    GPU the cast makes a copy and nothing aliases. This wrapper, registered before EasyCache's
    (so it runs outside it), makes that copy here too, so the bench measures EasyCache as GPU
    users run it. LazyCache returns a new tensor and needs none."""
    import comfy.patcher_extension as pe
    m = model.clone()

    def copy_input(executor, x, *args, **kwargs):
        return executor(x.clone(), *args, **kwargs)

    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, COPY_KEY, copy_input)
    return m


def calibrate(subject: Subject, targets) -> tuple[dict, list]:
    """Threshold per target speedup and the fitted coefficients, from one recording run of the
    subject (Cache Calibrate's method)."""
    signal = _signal(subject.model)
    recorder = _ours(subject.model, engine.Settings(node="bench-calibrate", method="record", min_steps=0, signal=signal))
    subject.sample(recorder)
    report = engine.setup_of(recorder).reports[-1]
    profiles = {t: profile.from_recording(report, family=engine.setup_of(recorder).family, model_class=subject.name,
                                          signal=signal, target=t, start=0.0, end=1.0, warmup_steps=1)
                for t in targets}
    return {t: p.threshold for t, p in profiles.items()}, profiles[targets[0]].coefficients


def _signal(model) -> str:
    return adapters.find_adapter(model.get_model_object("diffusion_model")).signals()[0]


def variants(subject: Subject, quick: bool):
    """(method, label, model, bound source) for every variant to run."""
    out = []
    targets = (2.0,) if quick else (1.5, 2.0, 3.0)
    thresholds, coefficients = calibrate(subject, targets)
    for target, thr in thresholds.items():
        s = engine.Settings(node="AccelTeaCache", method="teacache", threshold=thr, coefficients=tuple(coefficients),
                            signal=_signal(subject.model), preset=f"calibrated {target}x")
        out.append(("TeaCache", f"threshold {thr:.4g} (calibrated {target:g}x)", _ours(subject.model, s), None))
    dm = subject.model.get_model_object("diffusion_model")
    preset = adapters.auto_preset(adapters.find_adapter(dm), dm)
    if preset:
        from ..cache.presets import PRESETS
        p = PRESETS[preset]
        s = engine.Settings(node="AccelTeaCache", method="teacache", threshold=p.threshold, coefficients=p.coefficients,
                            signal=p.signal, warmup_steps=p.warmup_steps, preset=preset)
        out.append(("TeaCache", f"published {preset} preset, threshold {p.threshold:g}", _ours(subject.model, s), None))
    grid = [(3, 0), (3, 1), (3, 2)] if quick else [(3, 0), (3, 1), (3, 2), (5, 0), (5, 1), (5, 2)]
    for target in ("output", "blocks"):
        for interval, order in grid:
            s = engine.Settings(node="AccelTaylorSeer", method="taylorseer", target=target, interval=interval,
                                order=order, warmup_steps=3)
            out.append(("TaylorSeer", f"{'model output' if target == 'output' else 'block residual'}, N={interval}, "
                                      f"order {order}", _ours(subject.model, s), None))
    # Random-weight fixtures change a lot per step: EasyCache needs large thresholds to skip.
    easy = [0.2, 0.5, 1.0] if quick else [0.2, 0.5, 1.0, 2.0]
    for kind in ("EasyCache", "LazyCache"):
        for thr in easy:
            args = dict(EASYCACHE_DEFAULTS, reuse_threshold=thr)
            label = f"threshold {thr:g}" + (" (default)" if thr == EASYCACHE_DEFAULTS["reuse_threshold"] else "")
            m, counter = _comfy_cache(subject.model, kind, **args)
            out.append((kind, label, m, counter))
    return out


# --- running --------------------------------------------------------------------------------

def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bench_subject(subject: Subject, quick: bool) -> list[dict]:
    base_times = []
    subject.sample(subject.model)                       # warm-up (first-call allocations)
    t, reference = _timed(lambda: subject.sample(subject.model))
    base_times.append(t)
    todo = variants(subject, quick)
    results = []
    for i, (method, label, model, counter) in enumerate(todo):
        if counter is not None:
            counter["calls"] = 0
        t, out = _timed(lambda: subject.sample(model))
        if counter is not None:
            evaluations, computed = subject.steps, counter["calls"]
            peak = None
        else:
            summary = engine.setup_of(model).reports[-1]["summary"]
            evaluations, computed, peak = summary["evaluations"], summary["computed"], summary["cache_peak_mb"]
        results.append((method, label, t, out, evaluations, computed, peak))
        log.info("   %s %s: %.1f s, %d/%d computed", method, label, t, computed, evaluations)
        if (i + 1) % 6 == 0:
            base_times.append(_timed(lambda: subject.sample(subject.model))[0])
    base_times.append(_timed(lambda: subject.sample(subject.model))[0])
    base = statistics.median(base_times)
    records = []
    for method, label, t, out, evaluations, computed, peak in results:
        bound = evaluations / max(computed, 1)
        records.append(dict(
            name="cache", model=subject.name, baseline="uncached", variant=f"{method}: {label}",
            speedup=base / t, psnr_db=psnr(reference, out), ssim=ssim(reference, out), weight_bytes_ratio=None,
            bound=f"{evaluations}/{computed} = {bound:.2f}x", bound_speedup=bound, method=method,
            computed=computed, evaluations=evaluations, time_s=t, baseline_time_s=base,
            baseline_times_s=base_times, cache_peak_mb=peak))
    return records


def run(quick: bool, subjects: list[Subject] | None = None) -> list[dict]:
    threads = torch.get_num_threads()
    # One thread: these models are small and the machine is shared; more threads only add
    # contention noise to the timings.
    torch.set_num_threads(1)
    try:
        if subjects is None:
            from ..devtools.host import import_comfy
            import_comfy()
            size, steps = ("tiny", 12) if quick else ("medium", 30)
            subjects = [fixture_subject(family, size, steps) for family in ("wan21", "flux")]
        records = []
        for subject in subjects:
            log.info("== cache: %s", subject.name)
            records += bench_subject(subject, quick)
        return records
    finally:
        torch.set_num_threads(threads)
