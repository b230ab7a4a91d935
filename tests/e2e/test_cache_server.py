"""Step caching through the real server: workflows with TeaCache / TaylorSeer / Forecast Cache, the report node,
the short-schedule warning, and the clear message for a model without block hooks."""
from __future__ import annotations

import pytest
import torch

from lab import fixtures
from lab.host import PromptError
from lab.prompts import read_latent, sampling_prompt

pytestmark = pytest.mark.e2e

TEACACHE = {"threshold": -1.0, "start": 0.0, "end": 1.0, "coefficients": "auto", "cache_device": "model device",
            "short_schedule": "skip caching"}


def _with_report(prompt: dict) -> dict:
    model = prompt["5"]["inputs"]["model"]
    prompt["7"] = {"class_type": "AccelCacheReport", "inputs": {"model": model, "latent": ["5", 0]}}
    return prompt


def _latent(server, entry):
    (path,) = server.output_files(entry, "6", kind="latents")
    return read_latent(path)


def test_teacache_workflow_runs_and_reports(comfy_server):
    info = fixtures.write_fixture("flux", "tiny", comfy_server.models_dir)
    prompt = _with_report(sampling_prompt(info, seed=11, steps=12, prefix="e2e_teacache",
                                          chain=[("AccelTeaCache", TEACACHE)]))
    entry = comfy_server.run(prompt)
    out = _latent(comfy_server, entry)
    assert torch.isfinite(out).all() and tuple(out.shape) == tuple(info.latent_shape)
    report = entry["outputs"]["7"]
    text = report["text"][0]
    assert "Cache report (AccelTeaCache)" in text and "coefficients flux" in text and "steps: 12" in text
    assert report["images"] and report["images"][0]["type"] == "temp"
    assert "AccelTeaCache [threshold 0.4, coefficients flux" in comfy_server.log_tail(200)


def test_short_schedule_warns_and_runs_uncached(comfy_server):
    info = fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir)
    plain = comfy_server.run(sampling_prompt(info, seed=12, steps=4, prefix="e2e_short_plain"))
    cached = comfy_server.run(sampling_prompt(info, seed=12, steps=4, prefix="e2e_short_cached",
                                              chain=[("AccelTeaCache", {**TEACACHE, "coefficients": "wan21_t2v_1.3b",
                                                                        "threshold": 10.0})]))
    assert torch.equal(_latent(comfy_server, cached), _latent(comfy_server, plain))
    assert "4-step schedule: caching is off" in comfy_server.log_tail(200)


def test_model_without_block_hooks_gets_a_clear_message(comfy_server):
    info = fixtures.write_fixture("lumina2", "tiny", comfy_server.models_dir)
    with pytest.raises(PromptError, match="no block-replacement hook.*TaylorSeer with forecast 'model output'"):
        comfy_server.run(sampling_prompt(info, seed=13, steps=10, chain=[("AccelTeaCache", TEACACHE)]))
    # ... and TaylorSeer on the model output runs on it.
    taylor = {"interval": 3, "order": 1, "warmup_steps": 2, "end": 1.0, "forecast": "auto",
              "cache_device": "model device", "short_schedule": "skip caching"}
    entry = comfy_server.run(_with_report(sampling_prompt(info, seed=13, steps=10, prefix="e2e_taylor",
                                                          chain=[("AccelTaylorSeer", taylor)])))
    assert torch.isfinite(_latent(comfy_server, entry)).all()
    assert "computed: 6" in entry["outputs"]["7"]["text"][0]   # steps 0, 1 (warm-up), 2, 5, 8, 9 (last)


def test_forecast_cache_workflow_runs_and_reports(comfy_server):
    info = fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir)
    settings = {"speedup": 3.0, "forecast": "auto", "verify": True, "cache_device": "model device",
                "short_schedule": "skip caching"}
    entry = comfy_server.run(_with_report(sampling_prompt(info, seed=14, steps=20, prefix="e2e_forecast",
                                                          chain=[("AccelForecastCache", settings)])))
    out = _latent(comfy_server, entry)
    assert torch.isfinite(out).all() and tuple(out.shape) == tuple(info.latent_shape)
    text = entry["outputs"]["7"]["text"][0]
    assert "Cache report (AccelForecastCache)" in text and "computed: 6" in text and "bound_speedup: 3.333" in text
    assert "planned_steps: [0, 3, 6, 10, 14, 19]" in text
    assert "AccelForecastCache [speedup 3x, order 1, verified slope, target output]" in comfy_server.log_tail(200)
