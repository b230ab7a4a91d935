"""Train the reference models with rectified flow, deterministically, on the CPU.

    python -m comfyui_accel.devtools.reference.train                 # both models
    python -m comfyui_accel.devtools.reference.train --model ref_flux --steps 200 --out /tmp/w

The objective is the one ComfyUI's samplers assume for these families (``CONST``
model sampling): ``x_sigma = (1 - sigma) x0 + sigma noise``; the model, called through
``BaseModel.apply_model`` exactly as a sampler calls it (same timestep scaling, same
latent space), returns the denoised ``x0``, and the loss is the squared error of the implied
velocity ``(x_sigma - x0_hat) / sigma`` against ``noise - x0``. Sigmas are drawn the way the
stock schedulers spend their steps (``t`` uniform, then the model's own shift: 8 for Wan,
1.15 for Flux), plus a share drawn uniformly so the low-noise end is learnt too.
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

from .. import fixtures
from . import (MODELS, autoencoder, data, embed_captions, fingerprint, load_reference, model_config,
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
    import comfy.ldm.modules.attention as attention
    return attention.attention_pytorch(*args, **kwargs)


def _keep_copy(t):
    # Under bfloat16 autocast the matmul inputs autograd saves are fresh bf16 casts; the
    # float32 ones are the residual stream the blocks add to in place: copy only those.
    return t.clone() if t.dtype == torch.float32 else t


def _same(t):
    return t


def flow_matching_loss(base_model, name: str, pixels: torch.Tensor, captions: list[str],
                       g: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss of a ComfyUI ``BaseModel`` on one batch (noise and sigmas from ``g``)."""
    spec = reference_spec(name)
    fam = spec.family_spec
    x0 = autoencoder.to_model_space(pixels)                 # what the model sees after process_in
    n = x0.shape[0]
    u = torch.rand(n, generator=g).clamp(1e-3, 1.0)
    ms = base_model.model_sampling
    shifted = ms.sigma(ms.timestep(u))                       # the scheduler's spacing: shift(t), t uniform
    sigma = torch.where(torch.rand(n, generator=g) < UNIFORM_SIGMA, u, shifted).float()
    noise = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    x_t = (1 - s) * x0 + s * noise
    context, pooled = embed_captions(captions, fam.context_dim)
    extra = {"y": pooled} if fam.pooled_dim is not None else {}
    options = {"optimized_attention_override": _sdpa}
    copies = spec.family in _INPLACE_RESIDUALS and torch.is_grad_enabled()
    with torch.autograd.graph.saved_tensors_hooks(_keep_copy if copies else _same, _same), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        denoised = base_model.apply_model(x_t, sigma, c_crossattn=context, transformer_options=options, **extra)
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
        loss = flow_matching_loss(base, name, pixels, captions, g)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), help="model(s) to train (default: all)")
    parser.add_argument("--steps", type=int, help="override the spec's number of steps (for trials)")
    parser.add_argument("--out", type=Path, help="folder for the weights (default: the committed weights folder)")
    parser.add_argument("--no-compile", action="store_true", help="train eagerly (no C++ compiler needed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the committed weights were trained with 1; on a machine "
                             "shared with other jobs, more threads wait on each other)")
    parser.add_argument("--report", type=Path, default=Path("out/reference"), help="folder for the JSON reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    fixtures._comfy()
    args.report.mkdir(parents=True, exist_ok=True)
    for name in args.model or list(MODELS):
        report = train(name, args.steps, args.out, compile=not args.no_compile)
        (args.report / f"train_{name}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
