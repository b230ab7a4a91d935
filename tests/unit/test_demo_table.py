"""The demo's table: interleaved timings with their spread, and a speedup above its bound flagged."""
from __future__ import annotations

import json

import torch

from lab import demo


def report(summary: dict) -> list[str]:
    return ["Some report\n===\nJSON:\n" + json.dumps({"summary": summary, "rows": []})]


def test_bounds_come_from_the_runs_reports():
    cache = report({"bound_speedup": 2.5, "evaluations": 20, "computed": 8})
    sparse = report({"dense_calls": 10, "sparse_calls": 30, "mean_density": 0.2})
    assert demo.bound_of({"80": cache}) == (2.5, "steps 20/8")
    bound, text = demo.bound_of({"82": sparse})
    kept = (10 + 30 * 0.2) / 40
    assert abs(bound - 1 / kept) < 1e-9 and "attention 0.40 kept" == text
    assert abs(demo.bound_of({"80": cache, "82": sparse})[0] - 2.5 / kept) < 1e-9


def test_the_table_shows_the_spread_and_flags_a_speedup_above_its_bound():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = [{"variant": "baseline", "setup_s": 1.0, "runs": [1.0, 1.1, 0.9], "weight_bytes": 2 ** 20,
             "latent": latent, "bound": 1.0},
            {"variant": "cache", "setup_s": 1.0, "runs": [0.4, 0.45, 0.35], "weight_bytes": 2 ** 20,
             "latent": latent + 0.01, "bound": 2.0},
            {"variant": "sparse", "setup_s": 1.0, "runs": [0.9, 1.0, 0.8], "weight_bytes": 2 ** 20,
             "latent": latent, "bound": 4.0},
            {"variant": "quant", "setup_s": 1.0, "runs": [0.2, 0.2, 0.2], "weight_bytes": 2 ** 19,
             "latent": latent, "bound": None}]
    text = demo.table(rows)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "2.50x (2.44-2.57) !" in lines["cache"]          # 1.0 / 0.4 > 2.0: impossible, flagged
    assert "0.40 (0.35-0.45)" in lines["cache"]
    assert "!" not in lines["sparse"] and "4.00x" in lines["sparse"]
    assert "!" not in lines["quant"] and "none" in lines["quant"] and "2.00x" in lines["quant"]
    assert "above its physical bound: cache." in text
