"""Run every registered benchmark and write ``out/bench.json`` and ``out/bench.md``.

A benchmark is a module ``bench/bench_<name>.py`` with ``run(quick: bool) -> list[dict]``;
each dict is one measurement (see ``RECORD_KEYS``) taken side by side with its
baseline in the same run. A ``run`` that also takes ``out`` gets the output folder for the
files it writes (plots). ``--only NAME`` runs the benchmarks whose name contains NAME.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RECORD_KEYS = ("name", "model", "baseline", "variant", "speedup", "psnr_db", "ssim",
               "weight_bytes_ratio", "bound")

log = logging.getLogger("comfyui_accel.bench")


def discover(only: str | None = None) -> list[str]:
    names = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    return [n for n in names if not only or only in n]


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
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


def to_markdown(records: list[dict], info: dict) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"# Benchmarks ({info['date']})", "",
             f"Machine: {info['machine']['processor']}, {info['machine']['cpus']} threads, "
             f"{info['machine']['platform']}, torch {info['machine']['torch']}"
             + (f", GPU {info['machine']['cuda']}" if info['machine']['cuda'] else ", no GPU"),
             "", "Speedup and weight-bytes ratio are baseline / variant, measured side by side in one run; "
             "PSNR/SSIM are against the baseline's output on the same seeds; bound is the physical limit.", ""]
    by_bench: dict[str, list[dict]] = {}
    for r in records:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench, rows in by_bench.items():
        lines += [f"## {bench}", "", "| " + " | ".join(RECORD_KEYS) + " |",
                  "|" + "---|" * len(RECORD_KEYS)]
        lines += ["| " + " | ".join(cell(r.get(k)) for k in RECORD_KEYS) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-sized runs")
    parser.add_argument("--only", default=None, help="run benchmarks whose name contains this")
    parser.add_argument("--out", default="out", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    names = discover(args.only)
    if not names:
        log.error("no benchmark matches %r", args.only)
        return 2
    records, failed = [], []
    for name in names:
        log.info("== %s", name)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"{__package__}.{name}")
            extra = {"out": args.out} if "out" in inspect.signature(module.run).parameters else {}
            rows = module.run(quick=args.quick, **extra)
        except Exception:
            log.error("benchmark %s failed:\n%s", name, traceback.format_exc())
            failed.append(name)
            continue
        records += [normalise(r, name) for r in rows]
        log.info("   %d records in %.1f s", len(rows), time.perf_counter() - start)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "machine": machine()}
    (out / "bench.json").write_text(json.dumps({**info, "records": records}, indent=1, default=str))
    (out / "bench.md").write_text(to_markdown(records, info))
    log.info("wrote %s and %s (%d records)", out / "bench.json", out / "bench.md", len(records))
    if failed:
        log.error("failed benchmarks: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
