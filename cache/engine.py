"""Step caching inside a running ComfyUI sampler, through public extension points only.

``install(model, settings, adapter)`` returns a clone of the ModelPatcher with:

- an ``OUTER_SAMPLE`` wrapper (``runs.RunOwner``) that makes a :class:`Run` per sampling run;
- a ``CALC_COND_BATCH`` wrapper: one call is one evaluation of the guider (every cond at one
  latent and sigma), which gets ONE compute-or-reuse decision, shared by cond and uncond
  whether ComfyUI batches them into one model call or runs them one by one;
- an ``APPLY_MODEL`` wrapper (every model class has one, DiT or UNet) that marks the current
  model call for the block hooks and, for the "model output" target, forecasts the whole call;
- for the "blocks" target, a ``patches_replace["dit"]`` replacement on every block: the first
  block computes TeaCache's signal and takes the decision; on reuse it returns its input plus
  the cached (or forecast) residual, the middle blocks pass through, and the last block returns
  that value again (overriding anything added in between, e.g. ControlNet residuals, which the
  cached residual already holds); on a computed call the last block records ``image output -
  image input`` as the new residual. Block replacements installed before are chained.

Streams (the cache entries) are keyed by the cond's uuid, the context window, and how often
that uuid was already evaluated at this sigma (so Heun's second evaluation at one sigma,
Skip-Layer-Guidance's extra cond pass and context windows each keep their own cache).
Steps are located by sigma in the run's schedule, not by counting calls.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import time
from collections import defaultdict

import torch

from .. import runs
from . import rules
from .adapters import BlockAdapter, is_cached_block

log = logging.getLogger(__name__)

KEY = "comfyui_accel.cache"          # wrapper key and transformer_options entry of the setup

FORECASTING = ("taylorseer", "forecast")   # methods whose streams forecast with their order
SIGNALLED = ("teacache", "record")         # methods that compute TeaCache's first-block signal
MIN_FORECAST_COMPUTES = 3                  # Forecast Cache: first, one between, last

_current_call: contextvars.ContextVar = contextvars.ContextVar("comfyui_accel_cache_call", default=None)


@dataclasses.dataclass(frozen=True)
class Settings:
    node: str                        # node id, named in messages and reports
    method: str                      # "teacache" | "taylorseer" | "forecast" | "record" (calibration)
    target: str = "blocks"           # "blocks": hidden-state residual | "output": model prediction
    start: float = 0.0               # fraction of the schedule where caching may begin
    end: float = 1.0                 # ... and where it stops
    warmup_steps: int = 1            # first steps always computed
    last_step: bool = True           # the last step is always computed
    min_steps: int = 9               # shorter schedules run uncached unless force_short
    force_short: bool = False
    cache_device: str | None = None  # None: where the model computes; "cpu": system RAM
    signal: str = "modulated"        # TeaCache: "modulated" | "vec"
    coefficients: tuple = (1.0, 0.0)
    threshold: float = 0.0
    preset: str = ""                 # where the coefficients came from (for the report)
    interval: int = 1                # TaylorSeer: one full step every `interval` steps
    order: int = 0                   # TaylorSeer, Forecast Cache: Taylor order of the forecast
    speedup: float = 0.0             # Forecast Cache: steps / computed steps its schedule reaches
    verify: bool = False             # Forecast Cache: computed steps verify and calibrate the slope
    signal_rates: tuple = ()         # TeaCache with a profile: ((position, rate), ...) to set the
    target_speedup: float = 0.0      # threshold for each run's own schedule (rules.signal_rates)

    def describe(self) -> str:
        if self.method == "teacache":
            source = f"calibrated {self.target_speedup:g}x" if self.signal_rates else f"threshold {self.threshold:g}"
            return f"{source}, coefficients {self.preset or 'custom'}, signal {self.signal}"
        if self.method == "taylorseer":
            return f"every {self.interval} steps, order {self.order}, warm-up {self.warmup_steps}, target {self.target}"
        if self.method == "forecast":
            return (f"speedup {self.speedup:g}x, order {self.order}{', verified slope' if self.verify else ''}, "
                    f"target {self.target}")
        return "recording"


class CacheSetup(runs.RunOwner):
    """What a cache node put on its clone: settings, adapter, hook keys, and its runs' reports."""

    def __init__(self, settings: Settings, adapter: BlockAdapter | None, keys: list, family: str):
        super().__init__(KEY)
        self.settings = settings
        self.adapter = adapter
        self.keys = keys
        self.family = family

    def start(self, guider, schedule: list[float]) -> "Run":
        return Run(self, schedule, guider.model_patcher.get_model_object("model_sampling"))

    def finish(self, run: "Run", status: str, output) -> None:
        report = run.report(status)
        self.history.add(report, output)
        (log.warning if report["warnings"] else log.info)("%s", report["log_line"])
        for st in run.streams.values():
            st.forecaster.reset()
            st.prev_signal = None

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run_of(model_options.get("transformer_options"))
        if run is None or not run.enabled:
            return executor(model, conds, x_in, timestep, model_options)
        run.begin_evaluation(timestep, model_options["transformer_options"].get("context_window"))
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            run.end_evaluation()

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):
        run = self.run_of(transformer_options)
        if run is None or not run.enabled:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        call = run.begin_call(x, t, transformer_options, executor.class_obj)
        token = _current_call.set(call)
        try:
            if run.settings.target == "output" and not call.bypass:
                return run.output_call(call, executor, (x, t, c_concat, c_crossattn, control, transformer_options),
                                       kwargs)
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            run.end_call(call)
            return out
        finally:
            _current_call.reset(token)
            run.close_call(call)


def setup_of(model) -> CacheSetup | None:
    return model.model_options.get("transformer_options", {}).get(KEY)


def install(model, settings: Settings, adapter: BlockAdapter | None, family: str):
    """A clone of ``model`` with the cache installed; an earlier cache of ours is replaced."""
    import comfy.patcher_extension as pe
    m = model.clone()
    wrapper_types = (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.CALC_COND_BATCH, pe.WrappersMP.APPLY_MODEL)
    for wrapper_type in wrapper_types:
        m.remove_wrappers_with_key(wrapper_type, KEY)
    _remove_block_hooks(m)
    keys = []
    if settings.target == "blocks" and not isinstance(adapter, BlockAdapter):
        keys = adapter.install(m, active_call)       # UNet: object patches on the deep blocks
    elif settings.target == "blocks":
        keys = adapter.keys(m.get_model_object("diffusion_model"))
        if not keys:
            raise ValueError(f"{settings.node}: the model has no blocks to cache")
        existing = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
        for i, key in enumerate(keys):
            hook = BlockHook(key, first=i == 0, last=i == len(keys) - 1, inner=existing.get(key))
            m.set_model_patch_replace(hook, "dit", key[0], key[1])
    setup = CacheSetup(settings, adapter, keys, family)
    m.model_options["transformer_options"][KEY] = setup
    for wrapper_type, wrapper in zip(wrapper_types, (setup.outer_sample, setup.calc_cond_batch, setup.apply_model)):
        m.add_wrapper_with_key(wrapper_type, KEY, wrapper)
    return m


def _remove_block_hooks(m) -> None:
    """Undo an earlier install of ours on the clone: block hooks (keeping what they chained)
    and the UNet's block containers."""
    m.object_patches = {k: v for k, v in m.object_patches.items() if not is_cached_block(v)}
    to = m.model_options.get("transformer_options", {})
    dit = to.get("patches_replace", {}).get("dit")
    if not dit or not any(isinstance(p, BlockHook) for p in dit.values()):
        return
    to["patches_replace"] = dict(to["patches_replace"])
    new = {}
    for key, patch in dit.items():
        while isinstance(patch, BlockHook):
            patch = patch.inner
        if patch is not None:
            new[key] = patch
    to["patches_replace"]["dit"] = new
    to.pop(KEY, None)


class BlockHook:
    """The replacement installed for one block (see the module docstring)."""

    def __init__(self, key: tuple, first: bool, last: bool, inner=None):
        self.key, self.first, self.last, self.inner = key, first, last, inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        # Decisions and bookkeeping run outside torch.compile's graph (see _before/_after);
        # only the block itself, in between, is traced and compiled.
        early = _before_block(self, args)
        if early is not None:
            return early
        out = self.inner(args, extra) if self.inner is not None else extra["original_block"](args)
        _after_block(self, out)
        return out


def active_call():
    """The model call in progress whose run caches blocks (None otherwise)."""
    call = _current_call.get()
    if call is None or call.bypass or call.run.settings.target != "blocks":
        return None
    return call


@torch.compiler.disable
def _before_block(hook: BlockHook, args):
    """What the block returns without running, or None to run it."""
    call = active_call()
    return call.run.before_block(call, hook, args) if call is not None else None


@torch.compiler.disable
def _after_block(hook: BlockHook, out) -> None:
    call = active_call()
    if call is not None:
        call.run.after_block(call, hook, out)


# --- a sampling run --------------------------------------------------------------------------

class Stream:
    def __init__(self, label: str, cond: int, order: int, device, verify: bool = False):
        self.label, self.cond = label, cond
        self.forecaster = rules.TaylorForecaster(order, device, verify)
        self.prev_signal: torch.Tensor | None = None
        self.shape_key: tuple | None = None     # what the cached feature was made for
        self.computed = 0
        self.skipped = 0

    @property
    def nbytes(self) -> int:
        prev = self.prev_signal
        return self.forecaster.nbytes + (prev.numel() * prev.element_size() if prev is not None else 0)


@dataclasses.dataclass
class Evaluation:
    index: int
    sigma: float
    step: int
    time: float
    window: tuple | None
    decision: bool | None = None
    forced: bool = False
    decider: str = ""
    signal: float | None = None
    rescaled: float | None = None
    accumulated: float | None = None
    computed_calls: int = 0
    skipped_calls: int = 0
    occurrences: dict = dataclasses.field(default_factory=dict)


class Call:
    def __init__(self, run: "Run", evaluation: Evaluation, keys: list, streams: list, chunk: int,
                 diffusion_model, implicit: bool, bypass: bool):
        self.run, self.evaluation, self.keys, self.streams = run, evaluation, keys, streams
        self.chunk, self.diffusion_model, self.implicit, self.bypass = chunk, diffusion_model, implicit, bypass
        self.started = False
        self.computing = True
        self.reached_last = False
        self.base: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        self.img_tokens = 0
        self.img_start = None   # where the last block's stream holds the image, when the model says
        self.signals: list | None = None
        self.shape_key: tuple | None = None


class Run:
    """One sampling run: its schedule, its streams, its decisions, and the report at the end."""

    def __init__(self, setup: CacheSetup, schedule: list[float], model_sampling):
        s = self.settings = setup.settings
        self.setup = setup
        self.schedule = schedule
        self.n_steps = max(len(self.schedule) - 1, 0)
        self.model_sampling = model_sampling
        self.enabled, self.note = True, ""
        if self.n_steps < s.min_steps and not s.force_short:
            self.enabled = False
            sigma_max = float(getattr(model_sampling, "sigma_max", self.schedule[0] if self.schedule else 0.0))
            segment = bool(self.schedule) and (self.schedule[-1] > 0 or self.schedule[0] < sigma_max * (1 - 1e-3))
            self.note = (f"{self.n_steps}-step schedule"
                         + (" (part of a longer one: one expert of a KSamplerAdvanced pair, or denoise < 1)"
                            if segment else "")
                         + f": caching is off. Schedules of {s.min_steps - 1} steps or fewer leave almost nothing "
                         f"to skip between the first and last step, and every skipped step is a large share of the "
                         f"picture: on the Wan reference, two experts of 4 steps each forecasting one step apiece (6 "
                         f"model calls) lost 1.6-3.8 dB against sampling 6 steps outright (bench_cache). Sample fewer steps instead, "
                         f"or set short_schedule to 'cache anyway'")
        table = getattr(model_sampling, "sigmas", None)
        self.log_table = (torch.as_tensor(table).double().clamp_min(1e-30).log().flatten().sort().values.cpu().numpy()
                          if table is not None and torch.as_tensor(table).numel() > 1 else None)
        self.positions = [self.time_of(v) for v in self.schedule]
        self.threshold = s.threshold
        if s.method == "teacache" and s.signal_rates and self.enabled:
            forced = [rules.is_forced(k, self.n_steps, s.start, s.end, s.warmup_steps, s.last_step)
                      for k in range(self.n_steps)]
            self.threshold = rules.threshold_for_speedup(
                rules.predicted_signals(s.signal_rates, self.positions[:self.n_steps]), forced,
                rules.Rescale(s.coefficients), s.target_speedup)[0]
        self.rule = rules.AccumulateRule(rules.Rescale(s.coefficients), self.threshold) if s.method == "teacache" else None
        self.plan: list[int] = []
        if s.method == "forecast" and self.enabled:
            computes = rules.computed_count(self.n_steps, s.speedup)
            if computes < MIN_FORECAST_COMPUTES and computes < self.n_steps:
                self.enabled = False
                self.note = (f"speedup {s.speedup:g}x on a {self.n_steps}-step schedule leaves {computes} computed "
                             f"step(s); the forecast needs at least {MIN_FORECAST_COMPUTES} (the first, one between, "
                             f"the last): caching is off. Ask for at most "
                             f"{self.n_steps / MIN_FORECAST_COMPUTES:.2g}x or sample more steps")
            else:
                self.plan = rules.forecast_schedule(self.n_steps, computes)
        self.device = torch.device(s.cache_device) if s.cache_device else None
        self.streams: dict = {}
        self.lead = None
        self.evaluations: list[Evaluation] = []
        self.current: Evaluation | None = None
        self.occurrence: dict = defaultdict(int)
        self.points: list[dict] = []     # (signal change, residual change) pairs, when recording
        self.peak_bytes = 0
        self.calls = self.unhooked_calls = self.incomplete_calls = self.bypassed_calls = 0
        self.started = time.perf_counter()

    # evaluations and calls

    def time_of(self, sigma: float) -> float:
        """The forecasts' time axis: the sigma's position on the model's noise table
        (rules.noise_position), else the model's timestep where there is no table."""
        if self.log_table is not None:
            return rules.noise_position(sigma, self.log_table)
        try:
            return float(self.model_sampling.timestep(torch.tensor([sigma])).flatten()[0])
        except Exception:
            return sigma

    def begin_evaluation(self, timestep, window=None) -> Evaluation:
        sigma = float(torch.as_tensor(timestep).flatten()[0])
        wkey = tuple(int(i) for i in getattr(window, "index_list", ())) if window is not None else None
        ev = Evaluation(len(self.evaluations), sigma, runs.step_index(sigma, self.schedule),
                        self.time_of(sigma), wkey)
        self.evaluations.append(ev)
        self.current = ev
        return ev

    def end_evaluation(self) -> None:
        self.current = None

    def begin_call(self, x, t, transformer_options, base_model) -> Call:
        self.calls += 1
        implicit = self.current is None
        ev = self.current or self.begin_evaluation(t, transformer_options.get("context_window"))
        uuids = list(transformer_options.get("uuids") or [])
        conds = list(transformer_options.get("cond_or_uncond") or [])
        if not uuids:
            uuids = [f"cond{c}" for c in conds] or ["x"]
        if len(conds) != len(uuids):
            conds = list(range(len(uuids)))
        bypass = x.shape[0] % len(uuids) != 0
        keys, streams = [], []
        for uuid, c in zip(uuids, conds):
            slot = (uuid, ev.window)
            if slot not in ev.occurrences:
                sigma_slot = (uuid, ev.window, round(ev.sigma, 7))
                ev.occurrences[slot] = self.occurrence[sigma_slot]
                self.occurrence[sigma_slot] += 1
            key = (uuid, ev.window, ev.occurrences[slot])
            if key not in self.streams:
                self.streams[key] = Stream(_label(c, ev.occurrences[slot], ev.window), c,
                                           self.settings.order if self.settings.method in FORECASTING else 0,
                                           self.device, self.settings.verify)
            keys.append(key)
            streams.append(self.streams[key])
        if self.lead is None:
            self.lead = keys[_decider(streams)]
        if bypass:
            self.bypassed_calls += 1
        chunk = x.shape[0] // len(uuids) if not bypass else x.shape[0]
        return Call(self, ev, keys, streams, chunk, base_model.diffusion_model, implicit, bypass)

    def end_call(self, call: Call) -> None:
        if call.bypass:
            return
        if not call.started and self.settings.target == "blocks":
            self.unhooked_calls += 1
        elif call.computing and call.started and not call.reached_last:
            # The last block's hook never ran (another node replaced it for this call): the
            # residual is unknown, so these streams compute again next time.
            self.incomplete_calls += 1
            for st in call.streams:
                st.forecaster.reset()

    def close_call(self, call: Call) -> None:
        call.base = call.final = None
        if call.implicit:
            self.end_evaluation()

    # the decision

    def decide(self, call: Call, features: torch.Tensor, signal=None) -> bool:
        """Whether ``call`` computes (True) or reuses; ``features`` is what it caches, ``signal()``
        the tensor TeaCache's signal is measured on (None: no signal)."""
        call.started = True
        signals = None
        if signal is not None and self.settings.method in SIGNALLED:
            signals = call.signals = self.signal_changes(call, signal())
        shape_key = (call.chunk,) + tuple(features.shape[1:])
        s, ev = self.settings, call.evaluation
        if ev.decision is None:
            i = call.keys.index(self.lead) if self.lead in call.keys else _decider(call.streams)
            forced = rules.is_forced(ev.step, self.n_steps, s.start, s.end, s.warmup_steps, s.last_step)
            x = signals[i] if signals else None
            if s.method == "teacache":
                prior = self.rule.accumulated
                compute = self.rule.step(x, forced)
                ev.rescaled = self.rule.rescale(x) if x is not None and math.isfinite(x) else None
                # the sum the threshold was compared with (before a compute resets it)
                ev.accumulated = prior + ev.rescaled if ev.rescaled is not None and not forced else 0.0
            elif s.method == "taylorseer":
                compute = forced or (ev.step - s.warmup_steps) % max(s.interval, 1) == 0
            elif s.method == "forecast":
                compute = forced or ev.step in self.plan
            else:
                compute = True
            ev.decision, ev.forced, ev.decider, ev.signal = compute, forced, call.streams[i].label, x
        call.shape_key = shape_key
        ready = all(st.forecaster.ready and st.shape_key == shape_key for st in call.streams)
        compute = ev.decision or not ready
        call.computing = compute
        for st in call.streams:
            if compute:
                st.computed += 1
            else:
                st.skipped += 1
        if compute:
            ev.computed_calls += 1
        else:
            ev.skipped_calls += 1
        return compute

    def signal_changes(self, call: Call, signal: torch.Tensor) -> list:
        """Per stream: the relative L1 change of its signal since its previous evaluation."""
        out = []
        for i, st in enumerate(call.streams):
            chunk = signal[i * call.chunk:(i + 1) * call.chunk]
            prev = st.prev_signal
            change = None
            if prev is not None and prev.shape == chunk.shape:
                change = rules.rel_l1(chunk, prev.to(chunk.device))
            st.prev_signal = chunk.detach().to(self.device or chunk.device, copy=True)
            out.append(change)
        return out

    def forecast(self, call: Call, dtype, device) -> torch.Tensor:
        t = call.evaluation.time
        return torch.cat([st.forecaster.predict(t).to(device=device, dtype=dtype) for st in call.streams])

    def store(self, call: Call, features: torch.Tensor) -> None:
        ev = call.evaluation
        for i, st in enumerate(call.streams):
            chunk = features[i * call.chunk:(i + 1) * call.chunk]
            if self.settings.method == "record" and st.forecaster.compatible(chunk):
                self.points.append({"stream": st.label, "eval": ev.index, "step": ev.step,
                                    "signal_change": call.signals[i] if call.signals else None,
                                    "output_change": rules.rel_l1(chunk, st.forecaster.newest.to(chunk.device))})
            st.forecaster.update(ev.time, chunk)
            st.shape_key = call.shape_key
        self.peak_bytes = max(self.peak_bytes, sum(st.nbytes for st in self.streams.values()))

    # the two targets

    def before_block(self, call: Call, hook: BlockHook, args: dict):
        adapter = self.setup.adapter
        if hook.last:
            call.img_start = adapter.image_start(hook.key, args)
        if hook.first and not call.started:
            img = args["img"]
            call.img_tokens = img.shape[1]
            first_block = adapter.block(call.diffusion_model, hook.key)
            if self.decide(call, img, lambda: adapter.signal(self.settings.signal, first_block, args)):
                call.base = img.clone()   # some blocks (LTXV) update their input in place
                return None
            call.final = img + self.forecast(call, img.dtype, img.device)
            out = dict(args)
            out["img"] = adapter.with_image(hook.key, img, call.final, call.img_start) if hook.last else call.final.clone()
            call.reached_last = hook.last
            return out
        if not call.started or call.computing:
            return None
        if not hook.last:
            return args
        out = dict(args)
        out["img"] = adapter.with_image(hook.key, args["img"], call.final, call.img_start)
        call.reached_last = True
        return out

    def after_block(self, call: Call, hook: BlockHook, out: dict) -> None:
        if hook.last and call.started and call.computing and call.base is not None:
            residual = self.setup.adapter.image_part(hook.key, out["img"], call.img_tokens, call.img_start) - call.base
            call.base = None
            self.store(call, residual)
            call.reached_last = True

    def unet_decide(self, call: Call, h: torch.Tensor) -> None:
        if not call.started:
            self.decide(call, h, lambda: h)

    def unet_record(self, call: Call, h: torch.Tensor) -> None:
        if call.computing and call.started:
            self.store(call, h)
            call.reached_last = True

    def unet_replay(self, call: Call, h: torch.Tensor) -> torch.Tensor:
        call.reached_last = True
        return self.forecast(call, h.dtype, h.device)

    def output_call(self, call: Call, executor, args: tuple, kwargs: dict):
        x, sigma = args[0], args[1]
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.device, torch.float32)
        if bool((sig <= 0).any()):
            call.evaluation.decision = True
        if self.decide(call, x):
            out = executor(*args, **kwargs)
            if bool((sig > 0).all()):
                # The sampler's own derivative (x - denoised) / sigma: eps or velocity-like, and
                # smooth in time, unlike denoised itself.
                self.store(call, (x.float() - out.float()) / sig)
            call.reached_last = True
            return out
        call.reached_last = True
        return (x.float() - sig * self.forecast(call, torch.float32, x.device)).to(x.dtype)

    # the end

    def report(self, status: str) -> dict:
        s = self.settings
        evs = [e for e in self.evaluations if e.computed_calls + e.skipped_calls > 0]
        computed = sum(1 for e in evs if e.computed_calls > 0)
        n = len(evs)
        warnings = []
        if not self.enabled:
            status = "off"
            warnings.append(self.note)
        if self.enabled and self.unhooked_calls and self.unhooked_calls == self.calls - self.bypassed_calls:
            warnings.append(f"the model never reached the block hook in {self.unhooked_calls} calls "
                            f"({self.setup.family}): nothing was cached")
        if self.incomplete_calls:
            warnings.append(f"{self.incomplete_calls} computed calls never reached the last block's hook "
                            f"(another node replaced it); their streams recomputed")
        if self.bypassed_calls:
            warnings.append(f"{self.bypassed_calls} calls had a batch that does not split by cond; run uncached")
        streams = {st.label: {"computed": st.computed, "skipped": st.skipped} for st in self.streams.values()}
        if s.verify:
            for st in self.streams.values():
                streams[st.label]["slope"] = round(st.forecaster.slope, 3)
                streams[st.label]["verified"] = [round(v, 3) for v in st.forecaster.verifications]
        bound = n / computed if computed else 1.0
        rows = [{"eval": e.index, "step": e.step, "sigma": round(e.sigma, 6), "position": round(e.time, 6),
                 "decision": "compute" if e.computed_calls else "reuse", "forced": e.forced,
                 "decider": e.decider, "signal": e.signal, "rescaled": e.rescaled,
                 "accumulated": e.accumulated} for e in evs]
        summary = {
            "node": s.node, "method": s.method, "family": self.setup.family, "status": status,
            "settings": s.describe(), "steps": self.n_steps, "evaluations": n, "computed": computed,
            "reused": n - computed, "compute_fraction": round(computed / n, 4) if n else 1.0,
            "bound_speedup": round(bound, 3), "cache_peak_mb": round(self.peak_bytes / 2 ** 20, 3),
            "time_s": round(time.perf_counter() - self.started, 3),
        }
        if s.method == "teacache":
            summary["threshold"] = self.threshold
            if s.signal_rates:
                summary["threshold_for"] = f"this {self.n_steps}-step schedule, {s.target_speedup:g}x (profile)"
        if s.method == "forecast":
            summary["target_speedup"] = s.speedup
            summary["planned_steps"] = self.plan
        if self.note:
            summary["note"] = self.note
        stream_text = ", ".join(f"{k} {v['computed']}/{v['computed'] + v['skipped']}" for k, v in streams.items())
        line = (f"{s.node} [{s.describe()}]: " + (
            f"{self.note}" if not self.enabled else
            f"computed {computed} of {n} evaluations over {self.n_steps} steps, reused {n - computed} "
            f"(bound {bound:.2f}x; streams {stream_text}; cache peak {summary['cache_peak_mb']:.1f} MB)")
            + (f" [{status}]" if status not in ("ok", "off") else "")
            + "".join(f"; WARNING: {w}" for w in warnings if w != self.note))
        return {"summary": summary, "streams": streams, "rows": rows, "points": self.points,
                "warnings": warnings, "log_line": line}


def _decider(streams: list) -> int:
    """The stream that decides for an evaluation: the positive cond where present (cond 0), so
    batched and one-by-one calls decide alike (ComfyUI puts uncond first in a batch, but runs
    cond first when they do not batch)."""
    return min(range(len(streams)), key=lambda i: (streams[i].cond, i))


def _label(cond: int, occurrence: int, window: tuple | None) -> str:
    label = {0: "cond", 1: "uncond"}.get(cond, f"cond{cond}")
    if occurrence:
        label += f"#{occurrence + 1}"
    if window:
        label += f"[{window[0]}:{window[-1]}]"
    return label

