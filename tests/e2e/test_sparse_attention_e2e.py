"""Sparse Attention through a real ComfyUI server: a workflow, its report, and a bad input."""
import json

import pytest
import requests

from lab import fixtures
from lab.host import PromptError

pytestmark = pytest.mark.e2e


def workflow(filename, density, seed=0):
    spec = fixtures.size_spec("wan21", "tiny")
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": filename, "weight_dtype": "default"}},
        "2": {"class_type": "AccelSparseAttention", "inputs": {
            "model": ["1", 0], "policy": "radial", "density": density, "block_size": 16, "top_p": 0.9,
            "dense_steps": 1, "dense_first_layers": 0, "dense_last_layers": 0, "min_tokens": 0,
            "retention": False, "probe_rows": 16, "save_report": True}},
        "3": {"class_type": "AccelTestConditioning", "inputs": {"family": "wan21", "size": "tiny", "seed": 1,
                                                                "batch": 1, "tokens": 0}},
        "4": {"class_type": "AccelTestConditioning", "inputs": {"family": "wan21", "size": "tiny", "seed": 2,
                                                                "batch": 1, "tokens": 0}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": spec.width, "height": spec.height,
                                                                  "length": spec.length, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "AccelSparseAttentionReport", "inputs": {"model": ["2", 0], "latent": ["6", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }


def test_workflow_runs_and_reports(comfy_server):
    info = fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir)
    entry = comfy_server.run(workflow(info.filename, 0.5))
    assert len(comfy_server.output_files(entry, "8")) == 2          # density and error heat maps
    text = entry["outputs"]["9"]["text"][0]
    report = json.loads(text.split("JSON:", 1)[1])
    assert report["summary"]["policy"] == "radial" and report["summary"]["sparse_calls"] > 0
    assert report["summary"]["mean_density"] == pytest.approx(0.5)
    # The session server's folder also holds other tests' reports: this run's has the highest counter.
    saved = sorted((comfy_server.output_dir / "accel_sparse_attention").glob("*.json"))
    assert saved and json.loads(saved[-1].read_text())["summary"]["sparse_calls"] > 0
    assert "Sparse attention (radial)" in comfy_server.log_tail(200)


def test_bad_density_is_refused_and_the_server_stays_up(comfy_server):
    info = fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir)
    with pytest.raises(PromptError, match="density"):
        comfy_server.run(workflow(info.filename, 1.5))
    assert requests.get(comfy_server.url + "/system_stats", timeout=10).ok
    entry = comfy_server.run(workflow(info.filename, 0.25, seed=1))
    assert entry["outputs"]["9"]["text"]
