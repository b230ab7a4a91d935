"""Train the reference models with rectified flow, deterministically, on the CPU.

    python -m lab.reference.train                 # both models, one core each
    python -m lab.reference.train --model ref_flux --steps 200 --out /tmp/w

The objective is the one ComfyUI's samplers assume for these families (``CONST``
model sampling): ``x_sigma = (1 - sigma) x0 + sigma noise``; the model, called through
``BaseModel.apply_model`` exactly as a sampler calls it (same timestep scaling, same
latent space), returns the denoised ``x0``, and the loss is the squared error of the implied
velocity ``(x_sigma - x0_hat) / sigma`` against ``noise - x0``. Sigmas are drawn the way the
stock schedulers spend their steps (``t`` uniform, then the model's own shift: 8 for Wan,
1.15 for Flux), plus a share drawn uniformly so the low-noise end is learnt too. For video,
``ReferenceSpec.frame_noise`` of the clips get one noise level per frame instead ("diffusion
forcing"): predicting a noisy frame from a cleaner one is what teaches the model motion.
ComfyUI's Wan takes per-frame timesteps (Wan 2.2 uses them); those clips call the diffusion
model directly with ``model_sampling.timestep`` per frame, which for equal levels is exactly
``apply_model``'s call.
AdamW with a linear warm-up and cosine decay; the saved weights are an exponential moving
average of the trained ones (``ReferenceSpec.ema``), which samples much cleaner than the
last step's weights after a short training.

Deterministic: weights start from per-key seeded tensors, batch ``i`` is ``data.*_batch(SEED, i)``,
noise and sigmas come from a generator seeded per step, and
``torch.use_deterministic_algorithms`` is on. The same machine and thread count give the
same bytes; another CPU or thread count can differ in the last bits of the float sums.
One thread by default (``--threads``): on this machine, shared with other jobs, two threads
per process spent most of their time waiting on each other (about 10x slower per step).
Matrix products run in bfloat16 autocast (master weights, optimizer and loss stay float32);
the Wan model's forward is compiled with ``torch.compile`` (inductor fuses the many small
element-wise ops that dominate at this width: about 3x faster per step; it needs a C++
compiler, ``--no-compile`` trains eagerly and gives slightly different weights). Flux is
trained eagerly (see ``_INPLACE_RESIDUALS``). Weights are saved as float16.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from lab import fixtures
from lab.reference import (MODELS, autoencoder, data, embed_captions, fingerprint, load_reference, model_config,
               reference_spec, shapes)

log = logging.getLogger("comfyui_accel.reference.train")

SEED = 0
HELDOUT_SEED = 1_000_003        # data seed never used in training
CFG_DROP = 0.1                  # share of captions replaced by "" so classifier-free guidance works
UNIFORM_SIGMA = 0.2             # share of sigmas drawn uniformly rather than from the shifted schedule
WARMUP = 0.04                   # share of steps with a linear learning-rate warm-up
FINAL_LR = 0.05                 # cosine decay to this fraction of the peak learning rate

# Keys initialised to zero (adaLN-zero: blocks start as the identity, the output at zero),
# as the reference implementations do for training from scratch.
_ZERO = {"wan21": ("time_projection.1.", "head.head."),
         "flux": ("img_mod.lin.", "txt_mod.lin.", "modulation.lin.", "final_layer.adaLN_modulation.",
                  "final_layer.linear.")}


# Families whose blocks add residuals in place (Flux: ``x += ...``), which autograd refuses for
# a tensor it saved for backward (and torch.compile cannot trace); for these, every tensor
# saved for backward is saved as a copy.
_INPLACE_RESIDUALS = {"flux"}
_COMPILE = {"wan21"}


def init_state_dict(name: str, seed: int = SEED) -> dict:
    """Untrained weights: linear/conv N(0, 1/fan_in), biases 0, norms 1, adaLN-zero."""
    spec = reference_spec(name)
    sd = {}
    for key, shape in sorted(shapes(name).items()):
        g = data.generator(seed, f"init:{key}")
        leaf = key.rsplit(".", 1)[-1]
        if any(part in key for part in _ZERO[spec.family]):
            t = torch.zeros(shape)
        elif leaf == "modulation":       # Wan's per-block modulation table: its reference init
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        elif leaf == "bias":
            t = torch.zeros(shape)
        elif len(shape) <= 1:             # norm scales
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        sd[key] = t
    return sd


def untrained_model(name: str, seed: int = SEED):
    """A ModelPatcher of the architecture with the training start weights."""
    return fixtures.build_model(model_config(name), init_state_dict(name, seed), torch.float32)


def batch(name: str, seed: int, index: int, n: int):
    spec = reference_spec(name)
    if spec.kind == "video":
        return data.video_batch(seed, index, n, spec.width, spec.length)
    return data.image_batch(seed, index, n, spec.width)


def _sdpa(func, *args, **kwargs):
    # ComfyUI's CPU default attention (sub-quadratic, chunked) is slow to train through;
    # PyTorch's SDPA computes the same attention and has a fused backward.
    from comfy.ldm.modules import attention
    return attention.attention_pytorch(*args, **kwargs)


def _keep_copy(t):
    # Under bfloat16 autocast the matmul inputs autograd saves are fresh bf16 casts; the
    # float32 ones are the residual stream the blocks add to in place: copy only those.
    return t.clone() if t.dtype == torch.float32 else t


def _same(t):
    return t


def _sigmas(ms, shape, g: torch.Generator) -> torch.Tensor:
    """Noise levels spaced as the scheduler spends its steps, a share of them uniform."""
    u = torch.rand(shape, generator=g).clamp(1e-3, 1.0)
    shifted = ms.sigma(ms.timestep(u))                       # the scheduler's spacing: shift(t), t uniform
    return torch.where(torch.rand(shape, generator=g) < UNIFORM_SIGMA, u, shifted).float()


def _broadcast(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """Noise levels, one per sample (B,) or per frame (B, T), shaped against (B, C, [T,] H, W) latents."""
    if sigma.ndim == 1:
        return sigma.view(-1, *[1] * (ndim - 1))
    return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)


def denoise(base_model, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, **extra) -> torch.Tensor:
    """The model's x0 prediction as a sampler gets it; ``sigma`` (B,) or, for video, (B, T) per frame.

    Per-frame levels call the diffusion model with per-frame timesteps, what ``apply_model`` does for
    Wan (CONST sampling, no extra conditions) except that it reshapes one level per sample.
    """
    options = {"optimized_attention_override": _sdpa}
    if sigma.ndim == 1:
        return base_model.apply_model(x_t, sigma, c_crossattn=context, transformer_options=options, **extra)
    timestep = base_model.model_sampling.timestep(sigma).float()
    velocity = base_model.diffusion_model(x_t, timestep, context=context, transformer_options=options, **extra)
    return x_t - velocity.float() * _broadcast(sigma, x_t.ndim)


def flow_matching_loss(base_model, name: str, pixels: torch.Tensor, captions: list[str],
                       g: torch.Generator, frame_noise: float = 0.0) -> torch.Tensor:
    """Rectified-flow loss of a ComfyUI ``BaseModel`` on one batch (noise and sigmas from ``g``).

    ``frame_noise``: share of video clips noised with one level per frame.
    """
    spec = reference_spec(name)
    fam = spec.family_spec
    x0 = autoencoder.to_model_space(pixels)                 # what the model sees after process_in
    n = x0.shape[0]
    ms = base_model.model_sampling
    sigma = _sigmas(ms, (n,), g)
    noise = torch.randn(x0.shape, generator=g)
    if frame_noise > 0:                                      # these clips get one level per frame
        own = torch.rand(n, generator=g) < frame_noise
        sigma = torch.where(own[:, None], _sigmas(ms, (n, x0.shape[2]), g), sigma[:, None])
    s = _broadcast(sigma, x0.ndim)
    x_t = (1 - s) * x0 + s * noise
    context, pooled = embed_captions(captions, fam.context_dim)
    extra = {"y": pooled} if fam.pooled_dim is not None else {}
    copies = spec.family in _INPLACE_RESIDUALS and torch.is_grad_enabled()
    with torch.autograd.graph.saved_tensors_hooks(_keep_copy if copies else _same, _same), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        denoised = denoise(base_model, x_t, sigma, context, **extra)
    v_pred = (x_t - denoised.float()) / s
    return torch.nn.functional.mse_loss(v_pred, noise - x0)


@torch.no_grad()
def heldout_loss(model_patcher, name: str, n: int = 16, rounds: int = 2) -> float:
    """Flow-matching loss on a fixed batch the training never saw (fixed noise and sigmas)."""
    total = 0.0
    for r in range(rounds):
        pixels, captions = batch(name, HELDOUT_SEED, r, n)
        g = data.generator(HELDOUT_SEED, f"noise:{r}")
        total += float(flow_matching_loss(model_patcher.model, name, pixels, captions, g))
    return total / rounds


def _lr(step: int, steps: int, peak: float) -> float:
    warm = max(1, int(steps * WARMUP))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _update_ema(ema: list, params: list, decay: float) -> None:
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def _load() -> float:
    return os.getloadavg()[0]


def train(name: str, steps: int | None = None, out_dir: Path | None = None, log_every: int = 25,
          compile: bool = True) -> dict:
    """Train one reference model; writes ``<out_dir>/<spec.filename>``; returns a report dict."""
    spec = reference_spec(name)
    steps = steps or spec.steps
    out_dir = Path(out_dir or spec.path.parent)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    model = untrained_model(name)
    base = model.model
    params = [p for p in base.diffusion_model.parameters()]
    for p in params:
        p.requires_grad_(True)
    base.diffusion_model.train()
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8, fused=True)
    ema = [p.detach().clone() for p in params]
    report = {"name": name, "params": sum(p.numel() for p in params), "steps": steps, "batch": spec.batch,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "losses": [],
              "load_average": []}
    report["heldout_loss_untrained"] = heldout_loss(model, name)
    report["compiled"] = compile and spec.family in _COMPILE
    if report["compiled"]:
        base.diffusion_model.compile()
    start, cpu_start, window = time.perf_counter(), time.process_time(), []
    for step in range(steps):
        pixels, captions = batch(name, SEED, step, spec.batch)
        g = data.generator(SEED, f"noise:{step}")
        drop = torch.rand(len(captions), generator=g) < CFG_DROP
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, spec.lr)
        loss = flow_matching_loss(base, name, pixels, captions, g, spec.frame_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _update_ema(ema, params, min(spec.ema, (1 + step) / (10 + step)))
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            mean = sum(window) / len(window)
            report["losses"].append([step + 1, round(mean, 5)])
            report["load_average"].append(round(_load(), 2))
            log.info("%s step %d/%d loss %.4f lr %.2e %.0fs (load %.1f)", name, step + 1, steps, mean,
                     opt.param_groups[0]["lr"], elapsed, _load())
            window = []
    report["seconds"] = round(time.perf_counter() - start, 1)
    # CPU time of the training loop (in-process compilation included, the C++ compiler's
    # subprocesses not): about what the run takes on an idle core, whatever else the machine was
    # doing (with one thread the process uses one core at most).
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / spec.filename
    with torch.no_grad():
        for p, avg in zip(params, ema):
            p.copy_(avg)                   # the saved weights are the moving average
    sd = {k: v.detach().to(torch.float16) for k, v in base.diffusion_model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fixtures._save_safetensors(sd, tmp, {"accel_reference": fingerprint(name), "accel_params": str(report["params"])})
    os.replace(tmp, path)
    report["path"] = str(path)
    report["bytes"] = path.stat().st_size
    # Measured on the saved file as ComfyUI loads it (float16 weights, stock loader for Wan).
    report["heldout_loss_trained"] = heldout_loss(load_reference(name, path), name)
    log.info("%s: %d parameters, %d steps in %.0f s, held-out loss %.4f (untrained %.4f) -> %s", name,
             report["params"], steps, report["seconds"], report["heldout_loss_trained"],
             report["heldout_loss_untrained"], path)
    return report


def _train_and_report(name: str, args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    fixtures._comfy()
    report = train(name, args.steps, args.out, compile=not args.no_compile)
    (args.report / f"train_{name}.json").write_text(json.dumps(report, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), help="model(s) to train (default: all)")
    parser.add_argument("--steps", type=int, help="override the spec's number of steps (for trials)")
    parser.add_argument("--out", type=Path, help="folder for the weights (default: the committed weights folder)")
    parser.add_argument("--no-compile", action="store_true", help="train eagerly (no C++ compiler needed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model (default 1: the committed weights were trained with 1; "
                             "more threads per process mostly wait on each other at these sizes)")
    parser.add_argument("--jobs", type=int, default=min(len(MODELS), os.cpu_count() or 1),
                        help="models trained at the same time, one process each (default: one per core)")
    parser.add_argument("--report", type=Path, default=Path("out/reference"), help="folder for the JSON reports")
    args = parser.parse_args(argv)
    args.report.mkdir(parents=True, exist_ok=True)
    names = args.model or list(MODELS)
    if args.jobs <= 1 or len(names) == 1:
        for name in names:
            _train_and_report(name, args)
        return
    # Both models at once, one core each: about as long as the longer one (ref_wan21, ~16 min).
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in [pool.submit(_train_and_report, name, args) for name in names]:
            done.result()


if __name__ == "__main__":
    main()
