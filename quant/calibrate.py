"""Calibration: the linear layers' input statistics over a short real sampling run.

The run goes through ``comfy.sample.sample`` with the user's conditioning and latent, on a clone
whose linear layers are object patches: observing copies of the modules (their own class with an
observing ``forward`` mixed in, sharing the tensors in a parameter dict of their own, so
ModelPatcher can patch them without touching the originals). Statistics cover every token of every
step, because the activation range moves with the timestep (Q-Diffusion, TFMQ-DM): per-channel
absmax (SmoothQuant, outlier ratio), per-channel mean square (the diagonal of ``X^T X / tokens``,
for the VQ formats), each step's largest input, and input rows spread over the steps (output SQNR
in the report and ``auto``).
"""
from __future__ import annotations

import math
import uuid
from typing import Callable

import torch

from .. import compat
from .model import PREFIX, clean_param

_observer_classes: dict[type, type] = {}


class Recorder:
    """Shared by the observers of one calibration run: which step is running, and on/off."""

    def __init__(self):
        self.step = 0
        self.active = True


class LayerStats:
    def __init__(self, in_features: int, recorder: Recorder, rows_per_call: int, max_rows: int, seed: int):
        self.absmax = torch.zeros(in_features)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.step_absmax: dict[int, float] = {}
        self.rows: list[torch.Tensor] = []
        self.recorder = recorder
        self.rows_per_call = rows_per_call
        self.max_rows = max_rows
        self.calls = 0
        self.tokens = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if not self.recorder.active:
            return
        x2 = x.detach().reshape(-1, x.shape[-1])
        channel = torch.linalg.vector_norm(x2, float("inf"), dim=0).float().cpu()
        torch.maximum(self.absmax, channel, out=self.absmax)
        self.sq_sum += torch.linalg.vector_norm(x2, 2, dim=0, dtype=torch.float32).double().cpu().square()
        step = self.recorder.step
        self.step_absmax[step] = max(self.step_absmax.get(step, 0.0), channel.max().item())
        pick = torch.randperm(x2.shape[0], generator=self._gen)[: self.rows_per_call]
        self.rows.append(x2[pick.to(x2.device)].float().cpu())
        self.calls += 1
        self.tokens += x2.shape[0]

    def sample(self) -> torch.Tensor:
        """At most ``max_rows`` recorded input rows, spread evenly over the calls."""
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.absmax.numel())
        if rows.shape[0] > self.max_rows:
            keep = torch.randperm(rows.shape[0], generator=self._gen)[: self.max_rows]
            rows = rows[keep.sort().values]
        return rows

    def channel_mean_square(self) -> torch.Tensor | None:
        """Per-input-channel mean of x^2 over every observed token (float32 [K]), None before any."""
        return (self.sq_sum / self.tokens).float() if self.tokens else None

    def step_range_ratio(self) -> float:
        """How far the largest activation moves across the steps (max over min of the per-step maxima)."""
        values = [v for v in self.step_absmax.values() if v > 0]
        return max(values) / min(values) if values else 1.0

    def outlier_ratio(self) -> float:
        """Largest per-channel absmax over the median one (real DiTs: 10-100)."""
        med = self.absmax.median().item()
        return float("inf") if med == 0 else self.absmax.max().item() / med


class _Observing:
    def forward(self, x, *args, **kwargs):
        self._accel_stats.observe(x)
        return super().forward(x, *args, **kwargs)


def module_copy(module: torch.nn.Module, params: dict[str, torch.Tensor], cls: type | None = None) -> torch.nn.Module:
    """A shallow copy of ``module`` (as class ``cls``, default its own) holding ``params`` in a
    parameter dict of its own, so ModelPatcher can patch the copy without touching the original."""
    obs = object.__new__(cls or type(module))
    # the loader's state for the original stays behind
    obs.__dict__.update({key: value.copy() if isinstance(value, (dict, list)) else value
                         for key, value in module.__dict__.items() if key not in compat.LOADER_MODULE_STATE})
    for key in ("weight_function", "bias_function"):
        if key in obs.__dict__:
            obs.__dict__[key] = []
    if "comfy_cast_weights" in obs.__dict__ and "prev_comfy_cast_weights" in module.__dict__:
        obs.__dict__["comfy_cast_weights"] = module.__dict__["prev_comfy_cast_weights"]
    for name, tensor in params.items():
        if tensor is not None:
            obs._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    return obs


def observing_copy(module: torch.nn.Module, stats: LayerStats, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A ``module_copy`` whose forward records its input into ``stats``."""
    cls = type(module)
    sub = _observer_classes.get(cls)
    if sub is None:
        sub = type(f"Observing{cls.__name__}", (_Observing, cls), {})
        _observer_classes[cls] = sub
    obs = module_copy(module, params, sub)
    obs._accel_stats = stats
    return obs


def calibrate(patcher, layers: list[str], positive, negative, latent: dict, steps: int, seed: int,
              cfg: float, sampler_name: str = "euler", scheduler: str = "simple", max_rows: int = 128,
              progress: Callable[[int], None] | None = None) -> dict[str, LayerStats]:
    """Run ``steps`` sampling steps on a calibration clone; statistics for ``layers``."""
    import comfy.sample

    clone = patcher.clone()
    # A fresh uuid makes ComfyUI unpatch the shared modules before installing the observers.
    # With the input's uuid it skips that, the originals keep their "weights patched" flag while
    # the observers are in, and the next clone's LoRA patches are then never applied to them.
    clone.patches_uuid = uuid.uuid4()
    recorder = Recorder()
    rows_per_call = max(1, math.ceil(max_rows / max(steps, 1)))
    stats = {}
    for i, path in enumerate(layers):
        module = patcher.get_model_object(PREFIX + path)
        # One row-sampling seed per layer; wrapped into torch's seed range (the widget goes to 2^64 - 1).
        stats[path] = LayerStats(module.weight.shape[1], recorder, rows_per_call, max_rows, (seed + i) % 2 ** 64)
        params = {name: clean_param(patcher, path, name) for name in ("weight", "bias")}
        clone.add_object_patch(PREFIX + path, observing_copy(module, stats[path], params))

    samples = comfy.sample.fix_empty_latent_channels(clone, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))

    def on_step(step, x0, x, total_steps):
        recorder.step = step + 1
        if progress is not None:
            progress(step + 1)

    try:
        comfy.sample.sample(clone, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                            noise_mask=latent.get("noise_mask"), callback=on_step, disable_pbar=True, seed=seed)
    finally:
        recorder.active = False  # the observers may stay installed until another clone loads
    return stats
