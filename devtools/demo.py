"""``make demo``: baseline against each of our nodes and against all of them chained.

Boots a headless ComfyUI with the pack, writes the built-in fixture model (a medium
random-weight Wan 2.1) into its models folder, runs the same sampling workflow with each
variant of the MODEL chain, and prints a table: sampling time and speedup against the
baseline run in the same session, weight memory, and fidelity (PSNR/SSIM of the final
latent against the baseline on the same seed). Outputs go to ``out/demo/``.

Each variant runs twice: first to load the model and apply the nodes (reported as
"setup"), then with the timed seed, when ComfyUI's cache reuses the patched model and
only the sampler runs again.

Then every example workflow (``example_workflows/*.json``) runs through the same server:
model files it names that ComfyUI's model folders do not have are mapped to the tiny
fixtures (``devtools/workflows.py``); what each wrote or showed goes to
``out/demo/workflows/<name>/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bench.measure import psnr, ssim
from . import fixtures, workflows
from .host import ComfyServer, HostError, PromptError, comfyui_dir, comfyui_version, exec_seconds
from .prompts import quantize_step, read_latent, sampling_prompt

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
        "probe_rows": 32, "save_report": True})]))
    out = [Variant("baseline")] + single
    if len(single) > 1:
        out.append(Variant("all chained", [step for v in single for step in v.chain]))
    return out


def run_variant(server: ComfyServer, info, variant: Variant, steps: int, seed: int) -> dict:
    slug = variant.name.replace(" ", "_")
    setup = server.run(sampling_prompt(info, seed=seed + 1000, steps=steps, chain=variant.chain,
                                       prefix=f"demo_{slug}_warmup", model_info=True), timeout=1800)
    timed = server.run(sampling_prompt(info, seed=seed, steps=steps, chain=variant.chain,
                                       prefix=f"demo_{slug}"), timeout=1800)
    latent_file = server.output_files(timed, "6", kind="latents")[0]
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(latent_file, OUT / f"{slug}.latent")
    texts = _texts(setup)
    weights = json.loads(texts.pop("7")[0])["weight_bytes"]
    return {"variant": variant.name, "setup_s": exec_seconds(setup), "sample_s": exec_seconds(timed),
            "weight_bytes": weights, "latent": read_latent(latent_file), "reports": texts}


def _texts(entry: dict) -> dict:
    """Text shown by nodes in the UI (our reports), by node id."""
    return {node: out["text"] for node, out in entry.get("outputs", {}).items() if "text" in out}


def table(rows: list[dict]) -> str:
    base = rows[0]
    header = ["variant", "setup s", "sample s", "speedup", "weights MB", "smaller", "PSNR dB", "SSIM"]
    lines = []
    for r in rows:
        same = r is base
        lines.append([r["variant"], f"{r['setup_s']:.2f}", f"{r['sample_s']:.2f}",
                      f"{base['sample_s'] / r['sample_s']:.2f}x",
                      f"{r['weight_bytes'] / 2**20:.1f}", f"{base['weight_bytes'] / r['weight_bytes']:.2f}x",
                      "ref" if same else f"{psnr(base['latent'], r['latent']):.1f}",
                      "ref" if same else f"{ssim(base['latent'], r['latent']):.4f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan21", choices=list(fixtures.FAMILIES))
    parser.add_argument("--size", default="medium", choices=list(fixtures.SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
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
        rows = []
        for variant in variants():
            start = time.perf_counter()
            rows.append(run_variant(server, info, variant, args.steps, args.seed))
            log.info("demo: %-12s done in %.1f s", variant.name, time.perf_counter() - start)
        result = table(rows)
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
