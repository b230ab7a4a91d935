"""The family x node matrix: every family of ``lab.families`` through the four nodes.

For each family (its tiny build, fixed seeds, ``families.STEPS`` euler steps) and each node,
through the node's own ``execute`` as a workflow would call it:

- Quantize Model, int8, float32 compute (defaults otherwise): PSNR of the final latent against
  the float model.
- TeaCache: where the model has a block hook, Cache Calibrate (target 2x) then TeaCache with
  that profile: the output at threshold 0 (must equal the uncached one) and the PSNR at the
  calibrated threshold, with the steps it computed. Elsewhere the node's refusal.
- TaylorSeer: block residual where the model has the hook, else the model-output forecast:
  interval 1 (must equal the uncached output) and interval 3, order 1, one warm-up step.
- Sparse Attention (sliding tile, density 0.5, blocks of 16, every layer and step sparse):
  density 1 (must stay within float noise of dense) and the PSNR at 0.5, with the share of the
  attention calls that ran sparse; the layout facts are checked by moving one latent pixel and
  finding the attention rows that move. Elsewhere the node's refusal.

``python -m lab.family_matrix --readme RUN.json [OLD_HOST_RUN.json]``
rewrites the README's matrix between its ``families:begin`` / ``families:end`` markers from
the JSON the matrix test writes under ``out/`` on each host.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from lab import families

NODES = {"quantize": "Quantize Model (int8)", "teacache": "TeaCache", "taylorseer": "TaylorSeer",
         "sparse": "Sparse Attention"}
TEACACHE_TARGET = 2.0
TAYLOR = dict(interval=3, order=1, warmup_steps=1)
SPARSE = dict(policy="sliding_tile", density=0.5, block_size=16, top_p=0.9, dense_steps=0, dense_first_layers=0,
              dense_last_layers=0, min_tokens=0, retention=False, probe_rows=16, save_report=False)
README_BEGIN, README_END = "<!-- families:begin -->", "<!-- families:end -->"
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Cell:
    status: str                 # "measured" | "refused" | "not measured"
    psnr: float | None = None   # dB against the unaccelerated output, same seeds
    detail: str = ""            # what ran (hook, steps computed, density) or the node's message
    checks: dict = dataclasses.field(default_factory=dict)   # invariants the test asserts

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _flat(x):
    """A latent as one tensor (audio-video models return a NestedTensor of streams)."""
    import torch
    if getattr(x, "is_nested", False):
        return torch.cat([t.flatten() for t in x.unbind()])
    return x


def psnr(ref, x) -> float:
    from comfyui_accel import metrics
    return metrics.psnr(_flat(ref), _flat(x))


def equal(a, b) -> bool:
    import torch
    return torch.equal(_flat(a), _flat(b))


def _refusal(call) -> str | None:
    """The message of the AccelInputError ``call`` raises, or None when it does not raise."""
    from comfyui_accel.nodes.common import AccelInputError
    try:
        call()
    except AccelInputError as e:
        return str(e)
    return None


# --- the four cells ------------------------------------------------------------------------

def quantize_cell(model, name, ref) -> Cell:
    from comfyui_accel.nodes.quant import AccelQuantizeModel
    from comfyui_accel.quant import model as qmodel
    # float32 compute: the int8 error alone ("auto" computes in bfloat16 on a CPU, which is its own error)
    q = AccelQuantizeModel.execute(model, "int8", 64, "float32", 0.5, 8, 0, 5.0, "int8, w4a8, int4", 0.35, 0.0,
                                   "").args[0]
    out = families.sample(q, name)
    n = len(qmodel.quantized_layers(q))
    return Cell("measured", psnr(ref, out), f"{n} linear layers int8", {"layers": n})


def teacache_cell(model, name, ref) -> Cell:
    import comfy.sample
    from comfyui_accel.cache import adapters, engine
    from comfyui_accel.nodes.cache import AccelCacheCalibrate, AccelTeaCache
    fam = families.family(name)
    node = dict(start=0.0, end=1.0, coefficients="auto", cache_device="model device", short_schedule="cache anyway")
    if adapters.find_adapter(model.get_model_object("diffusion_model")) is None:
        message = _refusal(lambda: AccelTeaCache.execute(model, threshold=-1.0, **node))
        return Cell("refused", detail=message or "", checks={"refused": message is not None})
    x = families.latent(name)
    steps = fam.steps
    profile, recorded = AccelCacheCalibrate.execute(
        model, families.conditioning(name, 1), families.conditioning(name, 2), {"samples": x}, 0, steps, fam.cfg,
        "euler", "simple", 1.0, TEACACHE_TARGET, 0.0, 1.0, "auto").args[:2]
    zero = AccelTeaCache.execute(model, threshold=0.0, profile=profile, **node).args[0]
    out_zero = families.sample(zero, name)
    cached = AccelTeaCache.execute(model, threshold=-1.0, profile=profile, **node).args[0]
    out = families.sample(cached, name)
    summary = engine.setup_of(cached).reports[-1]["summary"]
    return Cell("measured", psnr(ref, out),
                f"block hook, calibrated to {TEACACHE_TARGET:g}x: {summary['computed']}/{summary['evaluations']} "
                f"evaluations computed",
                {"identical_at_zero": equal(out_zero, ref), "calibration_run_equals_uncached":
                 equal(recorded["samples"], ref), "computed": summary["computed"],
                 "evaluations": summary["evaluations"]})


def taylorseer_cell(model, name, ref) -> Cell:
    from comfyui_accel.cache import engine
    from comfyui_accel.nodes.cache import AccelTaylorSeer
    node = dict(end=1.0, forecast="auto", cache_device="model device", short_schedule="cache anyway")
    every = AccelTaylorSeer.execute(model, interval=1, order=1, warmup_steps=1, **node).args[0]
    out_every = families.sample(every, name)
    cached = AccelTaylorSeer.execute(model, **TAYLOR, **node).args[0]
    out = families.sample(cached, name)
    setup = engine.setup_of(cached)
    summary = setup.reports[-1]["summary"]
    target = "block residual" if setup.settings.target == "blocks" else "model output"
    return Cell("measured", psnr(ref, out),
                f"{target}, interval {TAYLOR['interval']}: {summary['computed']}/{summary['evaluations']} "
                f"evaluations computed",
                {"identical_at_interval_1": equal(out_every, ref), "target": setup.settings.target,
                 "computed": summary["computed"], "evaluations": summary["evaluations"]})


def sparse_cell(model, name, ref) -> Cell:
    from comfyui_accel.attention.layout import unsupported
    from comfyui_accel.attention.sparse import find_patches
    from comfyui_accel.nodes.attention import AccelSparseAttention
    if unsupported(model.get_model_object("diffusion_model")) is not None:
        message = _refusal(lambda: AccelSparseAttention.execute(model, **SPARSE))
        return Cell("refused", detail=message or "", checks={"refused": message is not None})
    full = AccelSparseAttention.execute(model, **{**SPARSE, "density": 1.0}).args[0]
    out_full = families.sample(full, name)
    half = AccelSparseAttention.execute(model, **SPARSE).args[0]
    out = families.sample(half, name)
    s = find_patches(half)[0].last_report["summary"]
    calls = s["sparse_calls"] + s["dense_calls"]
    return Cell("measured", psnr(ref, out),
                f"{s['sparse_calls']}/{calls} attention calls sparse, mean density "
                f"{s['mean_density']:.2f}" if s["mean_density"] is not None else "no sparse call",
                {"sparse_calls": s["sparse_calls"], "density_one_psnr": psnr(ref, out_full),
                 "layout": s.get("layout", ""), "placement": layout_check(model, name)})


CELLS = {"quantize": quantize_cell, "teacache": teacache_cell, "taylorseer": taylorseer_cell,
         "sparse": sparse_cell}


# --- layout check ----------------------------------------------------------------------------

def layout_check(model, name) -> dict:
    """Move the first (then the last) latent pixel and find which query rows of the first
    attention call over the grid move: they must be where ``layout`` places that pixel's token
    in every frame. Returns ``{"expected": [...], "observed": [...]}`` per pixel, or
    ``{"skipped": why}`` when the rows cannot be told apart (the model mixes the pixels before
    its first attention, as a UNet's convolutions do)."""
    import comfy.patcher_extension
    import comfy.sample
    from comfyui_accel.attention.layout import model_facts
    runs = {}
    for which, pixel in (("base", None), ("first", (0, 0)), ("last", (-1, -1))):
        x = _flat_latent(name, 0, pixel)
        records, facts = [], {}
        m = model.clone()

        def apply_model(executor, x_, t, c_concat, c_crossattn, control, options, **kwargs):
            dm = executor.class_obj.diffusion_model
            facts["f"] = model_facts(dm, tuple(x_.shape), None if c_crossattn is None else tuple(c_crossattn.shape),
                                     kwargs)
            return executor(x_, t, c_concat, c_crossattn, control, options, **kwargs)

        def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kw):
            n_q, n_k = (q.shape[2], k.shape[2]) if skip_reshape else (q.shape[1], k.shape[1])
            grid = facts["f"].place(n_q) if n_q == n_k and "f" in facts else None
            if grid is not None and not records:
                rows = q[0].transpose(0, 1).reshape(n_q, -1) if skip_reshape else q[0]
                records.append((grid, rows.detach().clone()))
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kw)

        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "accel_layout_check", apply_model)
        cond = families.conditioning(name, 1)
        # Image-to-image models (FlowRVS) start from the latent image, the others from the noise.
        start = x if families.family(name).source_latent else x * 0
        comfy.sample.sample(m, x, 1, 1.0, "euler", "simple", cond, cond, start, seed=0, disable_pbar=True)
        if not records:
            return {"skipped": "no attention call over the grid"}
        runs[which] = records[0]
    grid, rows = runs["base"]
    per_frame = grid.height * grid.width
    out = {}
    for which in ("first", "last"):
        moved = (runs[which][1] - rows).abs().amax(-1) > 1e-5 * (1 + rows.abs().amax())
        observed = moved.nonzero().flatten().tolist()
        if not observed or len(observed) > grid.frames:
            return {"skipped": f"moving one pixel moved {len(observed)} rows of the first attention call "
                               f"(the model mixes pixels before it)"}
        pos = 0 if which == "first" else per_frame - 1
        out[which] = {"expected": [grid.offset + f * per_frame + pos for f in range(len(observed))],
                      "observed": observed}
    return out


def _flat_latent(name, seed, pixel=None):
    """The family's latent filled with seeded noise, one pixel of its video stream moved by 5."""
    import torch
    x = families.latent(name)
    g = torch.Generator().manual_seed(seed + 1)
    if getattr(x, "is_nested", False):
        import comfy.nested_tensor
        parts = [torch.randn(t.shape, generator=g) for t in x.unbind()]
        if pixel is not None:
            parts[0][..., pixel[0], pixel[1]] += 5.0
        return comfy.nested_tensor.NestedTensor(parts)
    x = torch.randn(x.shape, generator=g)
    if pixel is not None:
        x[..., pixel[0], pixel[1]] += 5.0
    return x


# --- a whole row -------------------------------------------------------------------------------

def measure(name: str) -> dict[str, Cell]:
    """The four cells of one family (the host must have it: ``families.missing``)."""
    fam = families.family(name)
    model = families.build(name)
    if fam.full_size:
        # Only the nodes' refusals can be checked on a model whose weights are on the meta device.
        why = f"not measured: {fam.note}"
        cells = {k: Cell("not measured", detail=why) for k in NODES}
        for key in ("teacache", "sparse"):
            cell = CELLS[key](model, name, None)
            if cell.status == "refused":
                cells[key] = cell
        return cells
    ref = families.sample(model, name)
    return {key: fn(model, name, ref) for key, fn in CELLS.items()}


# --- output ------------------------------------------------------------------------------------

def cell_text(cell: dict) -> str:
    if cell["status"] == "measured":
        return f"{cell['psnr']:.1f} dB" if math.isfinite(cell["psnr"]) else "identical"
    if cell["status"] == "refused":
        return "refused"
    return "not measured"


def old_host_cell(row: dict | None, old: dict | None) -> str:
    """What an older host gives for a family: absent, as the main run, or which nodes differ."""
    if old is None:
        return "not run"
    if "absent" in old:
        return "absent"
    differs = [f"{NODES[k]} {cell['status']}" for k, cell in old["cells"].items()
               if row is None or "cells" not in row or row["cells"][k]["status"] != cell["status"]]
    return "as above" if not differs else "as above, except " + ", ".join(differs)


def markdown(run: dict, old_run: dict | None = None) -> str:
    """The matrix as Markdown: one row per family, PSNR (dB) per node or why not; the refusals
    and notes below the table."""
    version = run["host"]
    head = ["Family", "ComfyUI configs"] + list(NODES.values())
    if old_run is not None:
        head.append(f"ComfyUI {old_run['host']}")
    lines = [f"Measured on ComfyUI {version} ({run['steps']} euler steps, PSNR of the final latent against the "
             f"unaccelerated run, same seeds; tiny random-weight builds, see below).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refusals: dict[str, list[str]] = {}
    for fam in families.FAMILIES:
        row = run["families"].get(fam.name)
        configs = ", ".join(fam.configs) or f"{fam.build_config} ({fam.name})"
        if row is None or "absent" in row:
            cells = [row["absent"] if row else "not run"] + [""] * (len(NODES) - 1)
        else:
            cells = [cell_text(row["cells"][k]) for k in NODES]
            for k, cell in row["cells"].items():
                if cell["status"] == "refused":
                    reason = cell["detail"].split(": ", 2)[-1]
                    refusals.setdefault(f"{NODES[k]}: {reason}", []).append(fam.title)
        line = [fam.title, configs] + cells
        if old_run is not None:
            line.append(old_host_cell(row, old_run["families"].get(fam.name)))
        lines.append("| " + " | ".join(line) + " |")
    lines += ["", "Refused, with the node's reason:", ""]
    for reason, names in sorted(refusals.items()):
        lines.append(f"- {reason} ({', '.join(names)})")
    notes = [f"- {fam.title}: {fam.note}" for fam in families.FAMILIES if fam.note]
    if notes:
        lines += ["", "What the tiny builds leave out:", ""] + notes
    from comfyui_accel.families import NOT_DIFFUSION
    lines += ["", "Not diffusion models (every node refuses them): " +
              ", ".join(f"{k} ({v})" for k, v in NOT_DIFFUSION.items()) + "."]
    return "\n".join(lines)


def write(run: dict, out_dir: Path = ROOT / "out") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"family_matrix_{run['host']}.json"
    path.write_text(json.dumps(run, indent=1, default=float))
    (out_dir / f"family_matrix_{run['host']}.md").write_text(markdown(run) + "\n")
    return path


def readme_block(readme: str) -> str:
    if README_BEGIN not in readme or README_END not in readme:
        raise RuntimeError(f"README.md has no {README_BEGIN} ... {README_END} block")
    return readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]


def readme_rows(block: str) -> dict[str, list[str]]:
    """Family title -> the cells of its row in the README's matrix."""
    titles = {f.title for f in families.FAMILIES}
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in titles:
            rows[cells[0]] = cells[1:]
    return rows


def update_readme(run: dict, old_run: dict | None, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    readme_block(text)   # raises when the markers are missing
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_BEGIN}\n{markdown(run, old_run)}\n{README_END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--readme":
        sys.exit("usage: python -m lab.family_matrix --readme RUN.json [OLD_HOST_RUN.json]")
    main_run = json.loads(Path(sys.argv[2]).read_text())
    old = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) > 3 else None
    update_readme(main_run, old)
