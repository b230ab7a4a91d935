"""Step-caching nodes: TeaCache, TaylorSeer, Forecast Cache, Cache Calibrate and Cache Report.

The cache nodes return a patched clone of the model (the input model is unchanged). What a
cache did is only known after sampling: each run logs one line, and the Cache Report node
(fed the sampler's LATENT and the cached MODEL) shows that run's report as text and a plot.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from comfy_api.latest import io, ui

from .. import files
from ..cache import adapters, engine
from ..cache.presets import PRESETS
from ..cache.profile import CacheProfile, from_recording
from .. import families
from .common import CATEGORY, fail, node_name, progress, report_text, require_diffusion_model
from .plots import line_plot
from .validate import AccelNode, custom_type

log = logging.getLogger(__name__)

PROFILE = custom_type("ACCEL_CACHE_PROFILE", CacheProfile, "a cache profile from Cache Calibrate")
PROFILE_FOLDER = "accel_cache"
CACHE_DEVICES = {"model device": None, "cpu": "cpu"}
SHORT_SCHEDULE = {"skip caching": False, "cache anyway": True}
FORECASTS = {"auto": None, "block residual": "blocks", "model output": "output"}

_TIP_START = ("Fraction of the sampling schedule (0-1) before which every step is computed; caching may act "
              "from here. 0.1 = the first 10% of the steps are always computed.")
_TIP_END = "Fraction of the schedule (0-1) after which every step is computed again. 1.0 = until the end."
_TIP_DEVICE = ("Where the cached tensors live: 'model device' (fastest) or 'cpu' (system RAM: frees GPU memory "
               "at the cost of a copy per step).")
_TIP_SHORT = ("Schedules of 8 steps or fewer (distilled / turbo models) gain little from caching and lose "
              "detail: 'skip caching' runs them uncached with a warning; 'cache anyway' caches them too.")


def _memory_inputs() -> list:
    """The inputs every cache node shares: where the cache lives, and what short schedules do."""
    return [io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default="model device", tooltip=_TIP_DEVICE),
            io.Combo.Input("short_schedule", options=list(SHORT_SCHEDULE), default="skip caching", tooltip=_TIP_SHORT)]


def _diffusion_model(model):
    return model.get_model_object("diffusion_model")


def _hooked(node: str, model, start: float, end: float):
    """The diffusion model and its cache adapter, for the nodes that need a block hook (TeaCache's
    signal): the window and the model checked, a model without the hook refused."""
    _check_window(node, start, end)
    require_diffusion_model(node, model)
    dm = _diffusion_model(model)
    adapter = adapters.find_adapter(dm)
    if adapter is None:
        why = adapters.unhookable(dm) or "ComfyUI gives this model no block-replacement hook (patches_replace['dit'])"
        fail(node, "model", f"is {families.a_model(model)}: {why}, so its blocks cannot be skipped. Use Forecast "
                            f"Cache (it forecasts the model output) or TaylorSeer with forecast 'model output', "
                            f"which work on every model (and Quantize Model).")
    return dm, adapter


class AccelTeaCache(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelTeaCache",
            display_name="TeaCache",
            category=f"{CATEGORY}/cache",
            description=(
                "Timestep-embedding-aware cache: at each step the first transformer block's modulated input is "
                "compared with the previous step's; the relative change, rescaled by a polynomial, is added up, "
                "and while the sum stays below the threshold every block is skipped and the cached residual is "
                "reused. Cond and uncond keep separate caches with one decision per step. Uses ComfyUI's block "
                "hooks (no copied model code): Flux, Chroma, Wan 2.1/2.2, HunyuanVideo, LTX-Video, SD3, "
                "Qwen-Image, Mochi, AuraFlow, HunyuanDiT, Hunyuan3D; on SD1.x/SDXL UNets the deep blocks are "
                "cached DeepCache-style (signal: the shallow feature). Published coefficients are picked "
                "automatically; other models (UNets included) need a profile from Cache Calibrate. Each run "
                "logs what it skipped; the Cache Report node shows it."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to cache (a transformer model)."),
                io.Float.Input("threshold", default=-1.0, min=-1.0, max=10.0, step=0.01,
                               tooltip="Reuse the cache while the accumulated rescaled change stays below this. "
                                       "-1 = the recommended value for the coefficients (about 2x); with a profile, "
                                       "the value that reaches the profile's speedup on each run's own step "
                                       "count. 0 = never reuse (same "
                                       "output as no cache). Larger = faster and less faithful. Published "
                                       "~2x values: Flux 0.4, HunyuanVideo 0.15, LTX-Video 0.05, Wan 0.15-0.3."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_TIP_START),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=_TIP_END),
                io.Combo.Input("coefficients", options=["auto"] + list(PRESETS), default="auto",
                               tooltip="The rescale polynomial. 'auto' picks the published set for the model "
                                       "(Flux, HunyuanVideo 1.0, LTX-Video 2B, Mochi, Wan 2.1 by size and "
                                       "t2v/i2v; Wan 2.2 A14B uses Wan 2.1 14B's). A connected profile takes "
                                       "precedence. Kontext: choose flux_kontext."),
                *_memory_inputs(),
                PROFILE.Input("profile", optional=True,
                              tooltip="A profile from Cache Calibrate for this model: its fitted coefficients and "
                                      "calibrated threshold replace the preset."),
            ],
            outputs=[io.Model.Output(tooltip="The model with TeaCache (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, threshold, start, end, coefficients, cache_device, short_schedule,
                profile: CacheProfile | None = None) -> io.NodeOutput:
        node = node_name(cls)
        dm, adapter = _hooked(node, model, start, end)
        if profile is not None:
            if profile.family != adapter.family:
                fail(node, "profile", f"was calibrated on a {profile.family} model ({profile.model_class}); this "
                                      f"model is {adapter.family}. Calibrate this model with Cache Calibrate.")
            coeffs, signal, recommended = tuple(profile.coefficients), profile.signal, profile.threshold
            warmup, source = profile.warmup_steps, f"calibrated on {profile.steps} steps"
        else:
            name = adapters.auto_preset(adapter, dm) if coefficients == "auto" else coefficients
            if name is None:
                fail(node, "coefficients", f"'auto' found no published TeaCache coefficients for this {adapter.family} "
                                           f"model ({adapters.describe(dm)}). Run Cache Calibrate on it and connect "
                                           f"the profile, or choose a preset by hand.")
            preset = PRESETS[name]
            if preset.family != adapter.family:
                fail(node, "coefficients", f"'{name}' is for {preset.family} models; this model is {adapter.family}. "
                                           f"Choose 'auto' or a {adapter.family} preset.")
            coeffs, signal, recommended, warmup, source = (preset.coefficients, preset.signal, preset.threshold,
                                                           preset.warmup_steps, name)
        # With a profile and the threshold left on auto, each run replays the profile's signal curve
        # on its own schedule and picks the threshold for the profile's speedup there.
        per_run = profile is not None and threshold < 0 and bool(profile.signal_rates)
        settings = engine.Settings(
            node="AccelTeaCache", method="teacache", target="blocks", start=start, end=end, warmup_steps=warmup,
            force_short=SHORT_SCHEDULE[short_schedule], cache_device=CACHE_DEVICES[cache_device],
            signal=signal, coefficients=tuple(coeffs), threshold=recommended if threshold < 0 else threshold,
            preset=source, signal_rates=tuple(tuple(p) for p in profile.signal_rates) if per_run else (),
            target_speedup=profile.target_speedup if per_run else 0.0)
        return io.NodeOutput(engine.install(model, settings, adapter, adapter.family))


class AccelTaylorSeer(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelTaylorSeer",
            display_name="TaylorSeer",
            category=f"{CATEGORY}/cache",
            description=(
                "Computes the model fully on the first warm-up steps and then once every N steps; the steps in "
                "between are forecast by a Taylor expansion (order 0-2) of the last computed values, with "
                "differences spaced by the actual sigma gaps. 'block residual' forecasts the transformer blocks' "
                "residual and keeps the embeddings and head exact (transformer models; on UNets the deep blocks' "
                "feature, DeepCache-style); 'model output' forecasts "
                "the model's prediction (tiny memory, skips the whole model, works on every model including "
                "UNets). Cond and "
                "uncond are forecast separately. Memory: (order + 1) copies of the forecast tensor per cond; "
                "the Cache Report shows the measured peak."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to cache."),
                io.Int.Input("interval", default=5, min=1, max=50,
                             tooltip="One full computation every N steps after the warm-up; the N-1 steps "
                                     "between are forecast. The speedup is at most about N. 1 = no caching."),
                io.Int.Input("order", default=1, min=0, max=2,
                             tooltip="Taylor order: 0 reuses the last value, 1 extrapolates linearly, 2 "
                                     "quadratically. Each order keeps one more copy of the forecast tensor."),
                io.Int.Input("warmup_steps", default=3, min=0, max=1000,
                             tooltip="First steps always computed (the picture's layout forms there)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=_TIP_END),
                io.Combo.Input("forecast", options=list(FORECASTS), default="auto",
                               tooltip="What is forecast: 'block residual' = the transformer blocks' residual (the "
                                       "hidden state's size per order; embeddings and head stay exact; transformer "
                                       "models with a block hook); 'model output' = the model's prediction (the "
                                       "sampler's derivative; about the latent's size per order; every model, "
                                       "UNets included). 'auto' = block residual where the model has the hook."),
                *_memory_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with TaylorSeer (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, interval, order, warmup_steps, end, forecast, cache_device,
                short_schedule) -> io.NodeOutput:
        node = node_name(cls)
        _check_window(node, 0.0, end)
        require_diffusion_model(node, model)
        if not 1 <= interval:
            fail(node, "interval", f"must be at least 1 (one full computation every N steps), got {interval}.")
        if order not in (0, 1, 2):
            fail(node, "order", f"must be 0, 1 or 2 (Taylor order of the forecast), got {order}.")
        return _install_forecast(model, node, "AccelTaylorSeer", forecast, prefer_blocks=True, method="taylorseer", end=end,
                                 warmup_steps=warmup_steps, force_short=SHORT_SCHEDULE[short_schedule],
                                 cache_device=CACHE_DEVICES[cache_device], interval=interval, order=order)


class AccelForecastCache(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelForecastCache",
            display_name="Forecast Cache",
            category=f"{CATEGORY}/cache",
            description=(
                "Computes the model on a schedule spaced for the speedup you ask (the first and last steps, and "
                "gaps that grow along the run, for any step count) and forecasts the steps between by linear "
                "extrapolation along the model's noise level. Each computed step first verifies the forecast it "
                "replaces and recalibrates the extrapolation's slope, per cond. 'model output' forecasts the "
                "model's prediction (skips the whole model, every model family, tiny memory); 'block "
                "residual' forecasts the transformer blocks' residual (embeddings and head stay exact; models "
                "with a block hook). Cond and uncond are forecast separately. Each run logs its schedule; the "
                "Cache Report shows it with the verified slopes."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to cache."),
                io.Float.Input("speedup", default=3.0, min=1.0, max=20.0, step=0.1,
                               tooltip="Steps / computed steps: 3.0 computes a third of the steps (20 steps: 6 "
                                       "computed). The bound is exact for every step count; the wall-clock gain "
                                       "is close to it on large models. 1.0 = no caching."),
                io.Combo.Input("forecast", options=list(FORECASTS), default="auto",
                               tooltip="What is forecast: 'model output' = the model's prediction (the sampler's "
                                       "derivative; the latent's size per cond; every model); 'block residual' = "
                                       "the transformer blocks' residual (the hidden state's size; models with a "
                                       "block hook). 'auto' = model output, which measured better on the "
                                       "reference models."),
                io.Boolean.Input("verify", default=True,
                                 tooltip="Each computed step checks the forecast it replaces and rescales the "
                                         "extrapolation's slope (least squares). Off = plain linear extrapolation."),
                *_memory_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with Forecast Cache (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, speedup, forecast, verify, cache_device, short_schedule) -> io.NodeOutput:
        node = node_name(cls)
        require_diffusion_model(node, model)
        if not speedup >= 1.0:
            fail(node, "speedup", f"must be at least 1.0 (steps / computed steps), got {speedup}.")
        return _install_forecast(model, node, "AccelForecastCache", forecast, prefer_blocks=False, method="forecast",
                                 force_short=SHORT_SCHEDULE[short_schedule], cache_device=CACHE_DEVICES[cache_device],
                                 order=1, speedup=float(speedup), verify=bool(verify))


class AccelCacheCalibrate(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers
        return io.Schema(
            node_id="AccelCacheCalibrate",
            display_name="Cache Calibrate",
            category=f"{CATEGORY}/cache",
            description=(
                "Calibrates TeaCache for this very model: runs one real, uncached sampling pass with your "
                "conditioning, records at every step how much the first block's signal and the blocks' output "
                "changed, fits the rescale polynomial (least squares, degree 4), then replays TeaCache's rule on "
                "the recorded curve to find the threshold that reaches the requested speedup. The profile "
                "feeds TeaCache and is saved as JSON in the output folder (accel_cache/). Gives TeaCache to "
                "models without published coefficients (SD3, Wan 2.2, Qwen-Image, Chroma, Flux 2...). The "
                "profile keeps the signal curve along the noise level, so TeaCache sets the threshold for each "
                "run's own step count: one calibration serves 10 to 50 steps."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to calibrate (a transformer model)."),
                io.Conditioning.Input("positive", tooltip="Your positive conditioning (as for the sampler)."),
                io.Conditioning.Input("negative", tooltip="Your negative conditioning (as for the sampler)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (as for the sampler)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed of the calibration run."),
                io.Int.Input("steps", default=30, min=2, max=10000,
                             tooltip="Steps of the calibration run (30 serves runs of 10 to 50 steps)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (as for the sampler)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler of the calibration run (as you will sample)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler of the calibration run (as you will sample)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise strength (as for the sampler)."),
                io.Float.Input("target_speedup", default=2.0, min=1.0, max=20.0, step=0.05,
                               tooltip="Speedup the calibrated threshold should reach: steps / computed steps "
                                       "(e.g. 2.0 computes half the steps)."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip=_TIP_START + " Use the same value in TeaCache."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip=_TIP_END + " Use the same value in TeaCache."),
                io.Combo.Input("signal", options=["auto", "modulated", "vec"], default="auto",
                               tooltip="TeaCache's signal: 'modulated' = the first block's modulated image input "
                                       "(depends on the image, the published choice for Flux/HunyuanVideo/LTX); "
                                       "'vec' = the modulation vector the first block gets (time only, the Wan "
                                       "choice). 'auto' = modulated where the model has it."),
            ],
            outputs=[
                PROFILE.Output("profile", display_name="profile", tooltip="Connect to TeaCache's profile input."),
                io.Latent.Output("latent", display_name="latent", tooltip="The uncached result of the calibration run (a reference)."),
                io.String.Output("report", display_name="report", tooltip="The fit, the threshold and the replayed schedule (text + JSON)."),
                io.Image.Output("plot", display_name="plot", tooltip="Measured output change against signal change, and the fit."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise, target_speedup, start, end, signal) -> io.NodeOutput:
        import comfy.sample
        node = node_name(cls)
        dm, adapter = _hooked(node, model, start, end)
        kind = adapter.signals()[0] if signal == "auto" else signal
        if kind not in adapter.signals():
            fail(node, "signal", f"'{signal}' is not available for {adapter.family} models; choose one of "
                                 f"{', '.join(adapter.signals())} or 'auto'.")
        recorder = engine.install(model, engine.Settings(node="AccelCacheCalibrate", method="record", signal=kind, min_steps=0),
                                  adapter, adapter.family)
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(recorder, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        step = progress(steps)
        samples = comfy.sample.sample(
            recorder, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=denoise,
            noise_mask=latent_image.get("noise_mask"), callback=lambda i, *_: step(i + 1), disable_pbar=True,
            seed=seed)
        report = engine.setup_of(recorder).reports[-1]
        if not any(p["signal_change"] is not None for p in report["points"]):
            fail(node, "steps", f"gave too few recorded steps to fit ({report['summary']['evaluations']} "
                                f"evaluations); use at least 3 steps.")
        profile = from_recording(report, family=adapter.family, model_class=adapters.describe(dm), signal=kind,
                                 target=target_speedup, start=start, end=end, warmup_steps=1,
                                 sampler=sampler_name, scheduler=scheduler)
        path = save_json(f"{PROFILE_FOLDER}/profile_{adapter.family}", json.loads(profile.to_json()))
        summary = {"family": profile.family, "model": profile.model_class, "signal": profile.signal,
                   "coefficients": [float(f"{c:.6g}") for c in profile.coefficients],
                   "fit_r2": round(profile.fit_r2, 4), "points": len(profile.signal_change),
                   "target_speedup": target_speedup, "threshold": round(profile.threshold, 6),
                   "predicted_speedup": round(profile.predicted_speedup, 3), "steps": profile.steps,
                   "saved": path}
        log.info("AccelCacheCalibrate: %s model, %d points, fit R2 %.3f -> threshold %.4g for %.2fx "
                 "(predicted %.2fx); saved %s", profile.family, len(profile.signal_change), profile.fit_r2,
                 profile.threshold, target_speedup, profile.predicted_speedup, path)
        if profile.predicted_speedup < target_speedup - 1e-6:
            log.warning("AccelCacheCalibrate: %.2fx is the most this schedule allows (forced steps); asked %.2fx",
                        profile.predicted_speedup, target_speedup)
        rows = [{"eval": r["eval"], "step": r["step"], "sigma": r["sigma"], "signal": r["signal"],
                 "replay": "compute" if c else "reuse"} for r, c in zip(report["rows"], profile.replay)]
        text = report_text("Cache calibration", summary, rows)
        out = dict(latent_image)
        out["samples"] = samples
        return io.NodeOutput(profile, out, text, calibration_plot(profile))


class AccelCacheReport(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelCacheReport",
            display_name="Cache Report",
            category=f"{CATEGORY}/cache",
            description=(
                "Shows what TeaCache, TaylorSeer or Forecast Cache did in a sampling run: steps computed and reused per cond, "
                "compute fraction, the bound speedup (steps / computed steps), the accumulated signal per step "
                "and the cache's memory. Connect the cached MODEL and the sampler's LATENT output (the report "
                "of the run that made that latent is shown; it runs after the sampler)."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of TeaCache / TaylorSeer / Forecast Cache (or a model "
                                                "made from it)."),
                io.Latent.Input("latent", tooltip="The sampler's LATENT output: picks that run's report and makes "
                                                  "this node run after sampling."),
            ],
            outputs=[
                io.String.Output("report", display_name="report", tooltip="The run's report as text, with the JSON at the end."),
                io.Image.Output("plot", display_name="plot", tooltip="Per step: computed or reused, accumulated signal and threshold."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        setup = engine.setup_of(model)
        if setup is None:
            fail(node_name(cls), "model", "carries no TeaCache, TaylorSeer or Forecast Cache: connect the MODEL "
                                          "output of one of those nodes (or a model made from it, e.g. after a LoRA).")
        report = setup.history.find(latent["samples"])
        if report is None:
            text = ("Cache report\n============\nNo report for this latent: no sampling run with this model made "
                    "it, or its report is no longer kept (the newest runs are). Connect the LATENT output of the "
                    "sampler that used this model.")
            image = line_plot({}, "no report for this latent")
        else:
            text = report_text(f"Cache report ({report['summary']['node']})", report_summary(report), report["rows"])
            image = report_plot(report)
        merged = {**ui.PreviewImage(image, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
        return io.NodeOutput(text, image, ui=merged)


def _install_forecast(model, node: str, node_id: str, forecast: str, prefer_blocks: bool, **settings) -> io.NodeOutput:
    """TaylorSeer's and Forecast Cache's install: the ``forecast`` choice resolved to a target ('auto':
    the block residual where the model has the hook and ``prefer_blocks``, else the model output).
    ``node`` names the node in messages, ``node_id`` in the run log and report."""
    dm = _diffusion_model(model)
    adapter = adapters.find_adapter(dm)
    target = FORECASTS[forecast] or ("blocks" if prefer_blocks and adapter is not None else "output")
    if target == "blocks" and adapter is None:
        fail(node, "forecast", f"'block residual' needs ComfyUI's transformer block hook, which this "
                               f"{families.describe(model)} model does not have; choose 'model output' "
                               f"(or 'auto'), which works on every model.")
    family = adapter.family if adapter else type(dm).__name__
    return io.NodeOutput(engine.install(model, engine.Settings(node=node_id, target=target, **settings),
                                        adapter if target == "blocks" else None, family))


def _check_window(node: str, start: float, end: float) -> None:
    if not 0.0 <= start < end <= 1.0:
        fail(node, "start/end", f"must satisfy 0 <= start < end <= 1, got start {start} and end {end}.")


def report_summary(report: dict) -> dict:
    summary = dict(report["summary"])
    summary["streams"] = ", ".join(f"{k} {v['computed']} computed / {v['skipped']} reused"
                                   for k, v in report["streams"].items())
    for i, w in enumerate(report["warnings"]):
        summary[f"warning {i + 1}"] = w
    return summary


def report_plot(report: dict) -> torch.Tensor:
    rows = report["rows"]
    xs = [r["eval"] for r in rows]
    s = report["summary"]
    title = (f"{s['node']}: {s['computed']}/{s['evaluations']} computed, bound {s['bound_speedup']}x"
             if s["status"] != "off" else f"{s['node']}: off ({s['steps']}-step schedule)")
    series = {"computed (1) / reused (0)": (xs, [1.0 if r["decision"] == "compute" else 0.0 for r in rows])}
    if "threshold" in s:
        # TeaCache: decisions drawn at the threshold's height so they share the signal's axis.
        nan = float("nan")
        series = {"computed": (xs, [s["threshold"] if r["decision"] == "compute" else 0.0 for r in rows]),
                  "accumulated": (xs, [nan if r["accumulated"] is None else r["accumulated"] for r in rows]),
                  "rescaled change": (xs, [nan if r["rescaled"] is None else r["rescaled"] for r in rows]),
                  "threshold": (xs, [s["threshold"]] * len(xs))}
    return line_plot(series, title, xlabel="evaluation (step)", ylabel="")


def calibration_plot(profile: CacheProfile) -> torch.Tensor:
    import numpy as np
    pts = sorted(zip(profile.signal_change, profile.output_change))
    xs = [p[0] for p in pts]
    grid = list(np.linspace(min(xs), max(xs), 50)) if xs else []
    return line_plot({"measured": (xs, [p[1] for p in pts]),
                      "fit": (grid, list(np.polyval(profile.coefficients, grid)) if grid else [])},
                     f"{profile.family}: threshold {profile.threshold:.4g} -> {profile.predicted_speedup:.2f}x",
                     xlabel="signal change (rel. L1)", ylabel="output change")


def save_json(prefix: str, data: dict) -> str:
    """Write ``data`` as strict JSON to a new numbered file under ComfyUI's output folder (atomic,
    never over an existing file); the path relative to the output folder."""
    import folder_paths
    output_dir = folder_paths.get_output_directory()
    folder, name = os.path.split(os.path.join(output_dir, prefix))
    path = files.write_json(folder, name, data)
    return os.path.relpath(path, output_dir)


NODES = [AccelTeaCache, AccelTaylorSeer, AccelForecastCache, AccelCacheCalibrate, AccelCacheReport]
