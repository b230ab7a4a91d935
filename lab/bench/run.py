"""Run every registered benchmark and write ``out/bench.json`` and ``out/bench.md``.

A benchmark is a module ``lab/bench/bench_<name>.py`` with ``run(quick: bool) -> list[dict]``;
each dict is one measurement (see ``RECORD_KEYS``) taken side by side with its
baseline in the same run. ``--only NAME`` runs the benchmarks whose name contains NAME
(``--only stack,cache``: either).

Optional parts of a benchmark module: an ``out`` parameter of ``run`` (a folder
``out/<name>/`` for its pictures), ``markdown(records, images) -> str`` (its own section
instead of the generic table) and ``readme(records, images) -> str`` (its part of the
README's Benchmarks block). The projection to real GPUs (``projection.py``, formulas only)
ends bench.md. ``--publish`` copies the report and pictures to ``docs/bench.md`` and
``docs/bench/`` and rewrites the README between the ``bench:begin`` / ``bench:end`` markers.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parents[1]
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
RECORD_KEYS = ("name", "model", "baseline", "variant", "speedup", "psnr_db", "ssim",
               "weight_bytes_ratio", "bound")

log = logging.getLogger("lab.bench")


def discover(only: str | None = None) -> list[str]:
    """The benchmark modules; ``only``: comma-separated parts of their names ("stack,cache")."""
    names = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    parts = [p.strip() for p in (only or "").split(",") if p.strip()]
    return [n for n in names if not parts or any(p in n for p in parts)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cores": os.cpu_count(),
        "cpus": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def normalise(record: dict, module: str) -> dict:
    out = {key: record.get(key) for key in RECORD_KEYS}
    out.update({k: v for k, v in record.items() if k not in out})
    out.setdefault("benchmark", module)
    return out


def machine_line(info: dict) -> str:
    m = info["machine"]
    return (f"Machine: {m['processor']}, {m.get('cores', '?')} cores ({m['cpus']} torch threads), "
            f"{m['platform']}, torch {m['torch']}" + (f", GPU {m['cuda']}" if m['cuda'] else ", no GPU")
            + f"; {'quick' if info.get('quick') else 'full'} run of {info['date']}.")


def to_markdown(records: list[dict], info: dict, sections: dict[str, str] | None = None,
                tail: str = "") -> str:
    """The report: a generic table per benchmark, or the section the benchmark wrote itself."""
    sections = sections or {}

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"# Benchmarks ({info['date']})", "", machine_line(info),
             "", "Speedup and weight-bytes ratio are baseline / variant, measured side by side in one run; "
             "PSNR/SSIM are against the baseline's output on the same seeds; bound is the physical limit.", ""]
    by_bench: dict[str, list[dict]] = {}
    for r in records:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench in sections:
        by_bench.setdefault(bench, [])
    for bench, rows in by_bench.items():
        if bench in sections:
            lines += [sections[bench], ""]
            continue
        lines += [f"## {bench}", "", "| " + " | ".join(RECORD_KEYS) + " |",
                  "|" + "---|" * len(RECORD_KEYS)]
        lines += ["| " + " | ".join(cell(r.get(k)) for k in RECORD_KEYS) + " |" for r in rows]
        lines.append("")
    if tail:
        lines += [tail, ""]
    return "\n".join(lines)


def run_benchmark(name: str, quick: bool, out: Path):
    """(module, records, pictures relative to ``out``) of one benchmark."""
    module = importlib.import_module(f"{__package__}.{name}")
    folder = out / name.removeprefix("bench_")
    kwargs = {"out": folder} if "out" in inspect.signature(module.run).parameters else {}
    rows = module.run(quick=quick, **kwargs)
    images = sorted(p.relative_to(out).as_posix() for p in folder.glob("*.png")) if kwargs else []
    return module, rows, images


def render(done: list, records: list[dict], info: dict, prefix: str) -> tuple[str, str]:
    """(bench.md, README block) with picture links under ``prefix``."""
    from lab.bench import projection
    sections, readme = {}, []
    for name, module, rows, images in done:
        linked = [prefix + p for p in images]
        if hasattr(module, "markdown"):
            sections[name] = module.markdown(rows, linked)
        if hasattr(module, "readme"):
            readme.append(module.readme(rows, linked))
    report = to_markdown(records, info, sections, tail=projection.markdown())
    return report, "\n\n".join([machine_line(info)] + readme)


def publish(out: Path, done: list, records: list[dict], info: dict, repo: Path = REPO_DIR) -> None:
    """Copy the report and pictures into docs/ and refresh the README's Benchmarks block."""
    readme_path = repo / "README.md"
    readme = readme_path.read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise RuntimeError(f"README.md has no {README_BEGIN} ... {README_END} block to fill")
    docs = repo / "docs"
    for _, _, _, images in done:
        for image in images:
            target = docs / "bench" / image
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / image, target)
    report, block = render(done, records, info, "bench/")
    (docs / "bench.md").write_text(report)
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = block.replace("](bench/", "](docs/bench/") + "\n\nFull report: [docs/bench.md](docs/bench.md)."
    readme_path.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")
    log.info("published %s, docs/bench/ and the README block", docs / "bench.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-sized runs")
    parser.add_argument("--only", default=None,
                        help="run benchmarks whose name contains this (comma-separated for several)")
    parser.add_argument("--out", default="out", help="output folder")
    parser.add_argument("--publish", action="store_true",
                        help="also write docs/bench.md, docs/bench/*.png and the README's Benchmarks block")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    names = discover(args.only)
    if not names:
        log.error("no benchmark matches %r", args.only)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, failed, done = [], [], []
    for name in names:
        log.info("== %s", name)
        start = time.perf_counter()
        try:
            module, rows, images = run_benchmark(name, args.quick, out)
        except Exception:
            log.error("benchmark %s failed:\n%s", name, traceback.format_exc())
            failed.append(name)
            continue
        rows = [normalise(r, name) for r in rows]
        records += rows
        done.append((name, module, rows, images))
        log.info("   %d records in %.1f s", len(rows), time.perf_counter() - start)

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "machine": machine()}
    (out / "bench.json").write_text(json.dumps({**info, "records": records}, indent=1, default=str))
    (out / "bench.md").write_text(render(done, records, info, "")[0])
    if args.publish and not failed:
        publish(out, done, records, info)
    log.info("wrote %s and %s (%d records)", out / "bench.json", out / "bench.md", len(records))
    if failed:
        log.error("failed benchmarks: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
