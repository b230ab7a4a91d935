"""``make demo``: baseline against each of our nodes and against all of them chained.

Boots a headless ComfyUI with the pack, writes the built-in fixture model (a medium
random-weight Wan 2.1) into its models folder, runs the same sampling workflow with each
variant of the MODEL chain, and prints a table: sampling time and speedup against the
baseline run in the same session, with their spread, the physical bound of each speedup,
weight memory, and fidelity (PSNR/SSIM of the final latent against the baseline on the same
seed). Outputs go to ``out/demo/``.

Each variant runs once to load the model and apply the nodes (reported as "setup"). Then the
variants are timed in interleaved rounds, as ``lab/bench/`` times them: every round runs each
variant once with that round's seed, in an order rotated each round, so load from other work
on the machine hits every variant alike. The speedup is the ratio of medians; its spread is
the range of the per-round ratios. A speedup above its physical bound (steps / computed steps
for caching, attention work kept for sparse attention, their product when chained) cannot be
real: the table flags it, and the machine was too busy to trust that row.

Then every example workflow (``example_workflows/*.json``) runs through the same server:
model files it names that ComfyUI's model folders do not have are mapped to the tiny
fixtures (``lab/workflows.py``); what each wrote or showed goes to
``out/demo/workflows/<name>/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from comfyui_accel.metrics import psnr, ssim
from lab import fixtures, workflows
from lab.measure import speed
from lab.host import ComfyServer, HostError, PromptError, comfyui_dir, comfyui_version, exec_seconds
from lab.prompts import quantize_step, read_latent, sampling_prompt

log = logging.getLogger("comfyui_accel.demo")
OUT = Path("out/demo")


@dataclass
class Variant:
    name: str
    chain: list = field(default_factory=list)   # [(class_type, inputs)] on the MODEL path


def variants() -> list[Variant]:
    """The baseline, each node family that exists, and all of them chained."""
    single: list[Variant] = []
    # Node families add their variants here as they land.
    single.append(Variant("quantize int8", [quantize_step(format="int8")]))
    # Step caching: TaylorSeer works on any model. (TeaCache needs published coefficients or a
    # Cache Calibrate profile; the random-weight fixtures match no published set.)
    single.append(Variant("TaylorSeer", [("AccelTaylorSeer", {
        "interval": 3, "order": 1, "warmup_steps": 3, "end": 1.0, "forecast": "auto",
        "cache_device": "model device", "short_schedule": "skip caching"})]))
    single.append(Variant("sparse attention", [("AccelSparseAttention", {
        "policy": "radial", "density": 0.25, "block_size": 64, "top_p": 0.9, "dense_steps": 2,
        "dense_first_layers": 1, "dense_last_layers": 0, "min_tokens": 0, "retention": False,
        "probe_rows": 32, "save_report": False})]))
    out = [Variant("baseline")] + single
    if len(single) > 1:
        out.append(Variant("all chained", [step for v in single for step in v.chain]))
    return out


CACHE_NODES = ("AccelTaylorSeer", "AccelTeaCache")


def variant_prompt(info, variant: Variant, seed: int, steps: int, prefix: str, model_info: bool = False) -> dict:
    """The sampling prompt of a variant, with the report nodes its bound is read from."""
    prompt = sampling_prompt(info, seed=seed, steps=steps, chain=variant.chain, prefix=prefix, model_info=model_info)
    for i, (class_type, _) in enumerate(variant.chain):
        node = [str(10 + i), 0]
        if class_type in CACHE_NODES:
            prompt["80"] = {"class_type": "AccelCacheReport", "inputs": {"model": node, "latent": ["5", 0]}}
        if class_type == "AccelSparseAttention":
            prompt["81"] = {"class_type": "AccelSparseAttentionReport", "inputs": {"model": node, "latent": ["5", 0]}}
            prompt["82"] = {"class_type": "PreviewAny", "inputs": {"source": ["81", 0]}}
    return prompt


def bound_of(texts: dict) -> tuple[float | None, str]:
    """(speed bound, how it is made) from a run's report texts by node id: steps / computed steps
    for a cache, 1 / (share of attention work kept) for sparse attention, their product for both;
    None where a technique in the chain sets no speed bound (quantization)."""
    bound, parts = 1.0, []
    if "80" in texts:
        summary = _report_json(texts["80"][0])["summary"]
        bound *= summary["bound_speedup"]
        parts.append(f"steps {summary['evaluations']}/{summary['computed']}")
    if "82" in texts:
        s = _report_json(texts["82"][0])["summary"]
        calls = s["dense_calls"] + s["sparse_calls"]
        kept = (s["dense_calls"] + s["sparse_calls"] * (s["mean_density"] or 1.0)) / max(calls, 1)
        bound *= 1.0 / kept
        parts.append(f"attention {kept:.2f} kept")
    return bound, ", ".join(parts)


def _report_json(text: str) -> dict:
    return json.loads(text.split("JSON:", 1)[1])


def run_variants(server: ComfyServer, info, todo: list[Variant], steps: int, seed: int, rounds: int) -> list[dict]:
    """Setup run of each variant, then ``rounds`` interleaved timed rounds; one row per variant."""
    rows = {}
    for v in todo:
        start = time.perf_counter()
        slug = v.name.replace(" ", "_")
        setup = server.run(variant_prompt(info, v, seed + 1000, steps, f"demo_{slug}_warmup", model_info=True),
                           timeout=1800)
        texts = _texts(setup)
        rows[v.name] = {"variant": v.name, "setup_s": exec_seconds(setup), "runs": [],
                        "weight_bytes": json.loads(texts.pop("7")[0])["weight_bytes"], "reports": texts}
        log.info("demo: %-16s set up in %.1f s", v.name, time.perf_counter() - start)
    OUT.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        shift = r % len(todo)
        for v in todo[shift:] + todo[:shift]:
            slug = v.name.replace(" ", "_")
            entry = server.run(variant_prompt(info, v, seed + r, steps, f"demo_{slug}_r{r}"), timeout=1800)
            row = rows[v.name]
            row["runs"].append(exec_seconds(entry))
            if r == 0:   # fidelity and the bound on the first round's seed, the same for every variant
                latent_file = server.output_files(entry, "6", kind="latents")[0]
                shutil.copy(latent_file, OUT / f"{slug}.latent")
                row["latent"] = read_latent(latent_file)
                row["bound"], row["bound_text"] = bound_of(_texts(entry)) if v.chain else (1.0, "same run")
                if any(class_type == "AccelQuantizeModel" for class_type, _ in v.chain):
                    row["bound"] = None   # faster matmuls: no bound from the schedule or the attention
                row["reports"].update(_texts(entry))
        log.info("demo: round %d/%d done", r + 1, rounds)
    return [rows[v.name] for v in todo]


def _texts(entry: dict) -> dict:
    """Text shown by nodes in the UI (our reports), by node id."""
    return {node: out["text"] for node, out in entry.get("outputs", {}).items() if "text" in out}


def table(rows: list[dict]) -> str:
    base = rows[0]
    header = ["variant", "setup s", "sample s (min-max)", "speedup (per round)", "bound", "weights MB", "smaller",
              "PSNR dB", "SSIM"]
    lines, flagged = [], []
    for r in rows:
        same = r is base
        t = speed(base["runs"], r["runs"])
        bound = r.get("bound")
        above = bound is not None and not same and t["speedup"] > bound
        if above:
            flagged.append(r["variant"])
        lines.append([r["variant"], f"{r['setup_s']:.2f}",
                      f"{t['median_s']:.2f} ({t['min_s']:.2f}-{t['max_s']:.2f})",
                      f"{t['speedup']:.2f}x ({t['ratio_min']:.2f}-{t['ratio_max']:.2f})" + (" !" if above else ""),
                      "-" if same else (f"{bound:.2f}x" if bound is not None else "none"),
                      f"{r['weight_bytes'] / 2**20:.1f}", f"{base['weight_bytes'] / r['weight_bytes']:.2f}x",
                      "ref" if same else f"{psnr(base['latent'], r['latent']):.1f}",
                      "ref" if same else f"{ssim(base['latent'], r['latent']):.4f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    out.append(f"{len(base['runs'])} interleaved rounds (order rotated each round); speedup = ratio of median "
               "times, in brackets the range of the per-round ratios. bound: the most the technique can save "
               "(steps / computed steps; 1 / attention work kept; none for quantization, whose gain depends "
               "on the matmul kernels).")
    if flagged:
        out.append(f"! above its physical bound: {', '.join(flagged)}. That cannot be real: other work on the "
                   "machine skewed the timing; rerun on an idle machine (or with more rounds).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan21", choices=list(fixtures.FAMILIES))
    parser.add_argument("--size", default="medium", choices=list(fixtures.SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (each runs every variant)")
    parser.add_argument("--skip-workflows", action="store_true", help="only the table, not the example workflows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root = comfyui_dir()
    except HostError as e:
        log.error("demo: %s", e)
        return 2
    log.info("demo: ComfyUI %s at %s; fixture %s/%s, %d steps", comfyui_version(root), root,
             args.family, args.size, args.steps)
    # The host ComfyUI's own model folders are visible too: a workflow whose files are there
    # runs on them instead of the fixtures.
    server = ComfyServer(extra_models=root / "models")
    try:
        server.start()
        info = fixtures.write_fixture(args.family, args.size, server.models_dir)
        rows = run_variants(server, info, variants(), args.steps, args.seed, max(1, args.rounds))
        result = table(rows) + f"\nload average during the demo: {os.getloadavg()[0]:.1f}"
        print(result)  # the demo's product is this table on stdout
        (OUT / "table.txt").write_text(result + "\n")
        (OUT / "reports.json").write_text(json.dumps({r["variant"]: r["reports"] for r in rows}, indent=1))
        log.info("demo: latents, table and node reports in %s/", OUT)
        if not args.skip_workflows:
            print("\n".join(run_example_workflows(server)))
    except (HostError, PromptError) as e:
        log.error("demo: %s", e)
        return 1
    finally:
        server.cleanup()
    return 0


def run_example_workflows(server: ComfyServer) -> list[str]:
    """Run every example workflow (standard model files mapped to fixtures where absent);
    copy what each wrote or showed to out/demo/workflows/<name>/. One summary line each."""
    lines = ["", "example workflows (example_workflows/*.json):"]
    for path in workflows.example_workflows():
        start = time.perf_counter()
        try:
            run = workflows.run(server, path)
        except (PromptError, workflows.WorkflowError) as e:
            lines.append(f"  {path.stem}: FAILED: {e}")
            continue
        dest = OUT / "workflows" / path.stem
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        files = [f for paths in run.files.values() for f in paths]
        for f in files:
            shutil.copy(f, dest / f.name)
        (dest / "reports.txt").write_text("\n\n".join(t for items in run.texts.values() for t in items) + "\n")
        how = (f"on fixtures ({run.mapping.family}, {len(run.mapping.missing)} model files not found)"
               if run.mapping.family else "on your model files")
        problems = workflows.check(run, server.object_info())
        status = "ran" if not problems else "ran with problems: " + "; ".join(problems)
        lines.append(f"  {path.stem}: {status} {how} in {time.perf_counter() - start:.1f} s; "
                     f"{len(files)} files and the reports in {dest}/")
    return lines


if __name__ == "__main__":
    sys.exit(main())
