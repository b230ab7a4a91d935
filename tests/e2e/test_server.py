"""The pack in a real ComfyUI server: it loads, and workflows run through the HTTP API."""
from __future__ import annotations

import logging

import pytest
import torch

from lab import fixtures
from lab.host import PromptError
from lab.prompts import read_latent, sampling_prompt

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)


def test_pack_loads_without_import_errors(comfy_server):
    text = comfy_server.log_path.read_text(errors="replace")
    import_lines = [line for line in text.splitlines() if "custom_nodes" in line and "seconds" in line]
    assert any("ComfyUI-Accel" in line for line in import_lines), text[-3000:]
    assert not any("IMPORT FAILED" in line for line in import_lines), import_lines
    info = comfy_server.object_info()
    assert {"AccelTestConditioning", "AccelTestFluxLoader", "AccelTestEmptyLatent"} <= set(info)
    ours = [name for name, node in info.items() if node.get("python_module", "").endswith("ComfyUI-Accel")]
    assert all(name.startswith("Accel") for name in ours), ours
    assert all(info[name]["category"].startswith("accel/") for name in ours), ours


@pytest.mark.parametrize("family", ["wan21", "flux"])
def test_sampling_workflow_runs_through_the_server(comfy_server, family):
    info = fixtures.write_fixture(family, "tiny", comfy_server.models_dir)
    outputs = []
    for seed in (1, 2):
        prompt = sampling_prompt(info, seed=seed, steps=4, prefix=f"e2e_{family}_{seed}")
        entry = comfy_server.run(prompt)
        files = comfy_server.output_files(entry, "6", kind="latents")
        assert len(files) == 1 and files[0].is_file()
        outputs.append(read_latent(files[0]))
    log.info("e2e: %s tiny sampled twice through the real server at %s", family, comfy_server.url)
    a, b = outputs
    assert tuple(a.shape) == tuple(info.latent_shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.abs().mean() > 0.1  # it sampled something, not the empty latent
    assert not torch.equal(a, b)  # the seed reached the sampler


def test_missing_model_file_is_a_clear_error_and_the_server_survives(comfy_server):
    info = fixtures.fixture_info("wan21", "tiny")
    prompt = sampling_prompt(info, seed=3, steps=2)
    prompt["1"]["inputs"]["unet_name"] = "no_such_model.safetensors"
    with pytest.raises(PromptError, match="no_such_model"):
        comfy_server.run(prompt)
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]
