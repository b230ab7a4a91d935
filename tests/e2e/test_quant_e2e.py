"""Quantize / Save / Load through a real ComfyUI server with API-format workflows."""
import pytest
import safetensors.torch
import torch

from comfyui_accel.devtools import fixtures
from comfyui_accel.devtools.host import PromptError

pytestmark = pytest.mark.e2e


def _workflow(model_node: dict, seed: int = 0, extra: dict | None = None, prefix: str = "quant") -> dict:
    prompt = {
        "model": model_node,
        "pos": {"class_type": "AccelTestConditioning",
                "inputs": {"family": "wan21", "size": "tiny", "seed": 1, "batch": 1, "tokens": 0}},
        "neg": {"class_type": "AccelTestConditioning",
                "inputs": {"family": "wan21", "size": "tiny", "seed": 2, "batch": 1, "tokens": 0}},
        "latent": {"class_type": "AccelTestEmptyLatent",
                   "inputs": {"family": "wan21", "width": 64, "height": 64, "length": 5, "batch_size": 1}},
        "sampler": {"class_type": "KSampler",
                    "inputs": {"model": ["quant", 0], "seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler",
                               "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0],
                               "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }
    prompt.update(extra or {})
    return prompt


QUANT_DEFAULTS = {"group_size": 64, "compute_dtype": "auto", "smooth_alpha": 0.5, "calibration_steps": 2,
                  "seed": 0, "cfg": 3.0, "auto_formats": "int8, w4a8, int4", "auto_budget": 0.35,
                  "auto_min_sqnr_db": 0.0, "layer_overrides": ""}


def _quant(fmt="int8", source=("unet", 0), **inputs):
    return {"class_type": "AccelQuantizeModel",
            "inputs": {**QUANT_DEFAULTS, "model": list(source), "format": fmt, **inputs}}


def _latent(server, entry) -> torch.Tensor:
    path = server.output_files(entry, "save", kind="latents")[0]
    return safetensors.torch.load_file(str(path))["latent_tensor"].float()


@pytest.fixture(scope="module")
def wan_file(comfy_server):
    return fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir).filename


def test_quantize_sample_save_and_reload(comfy_server, wan_file):
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": wan_file, "weight_dtype": "default"}}
    save_model = {"class_type": "AccelSaveQuantized",
                  "inputs": {"model": ["quant", 0], "filename": "e2e/wan_fp8", "overwrite": False,
                             "other_weights_dtype": "keep"}}
    # float32 compute, as the stock loader will use on this CPU, so the outputs can be compared
    fp8 = _quant("fp8_e4m3", compute_dtype="float32")
    first = comfy_server.run(_workflow(unet, extra={"quant": fp8, "unet": unet,
                                                    "save_model": save_model}, prefix="q"))
    quantized = _latent(comfy_server, first)
    assert torch.isfinite(quantized).all() and quantized.abs().mean() > 0
    saved = comfy_server.models_dir / "diffusion_models" / "e2e" / "wan_fp8.safetensors"
    assert saved.is_file()

    # the stock loader reads our fp8 file and gives the same result, with no node of ours in the path
    stock = {"class_type": "UNETLoader", "inputs": {"unet_name": "e2e/wan_fp8.safetensors", "weight_dtype": "default"}}
    prompt = _workflow(stock, prefix="stock")
    prompt["sampler"]["inputs"]["model"] = ["model", 0]
    entry = comfy_server.run(prompt)
    assert torch.allclose(_latent(comfy_server, entry), quantized, atol=1e-4)

    # and so does Load Quantized Model
    ours = {"class_type": "AccelLoadQuantized", "inputs": {"unet_name": "e2e/wan_fp8.safetensors"}}
    prompt = _workflow(ours, prefix="ours")
    prompt["sampler"]["inputs"]["model"] = ["model", 0]
    assert torch.allclose(_latent(comfy_server, comfy_server.run(prompt)), quantized, atol=1e-4)

    # saving again under the same name is refused, the file is kept
    before = saved.read_bytes()
    with pytest.raises(PromptError, match="already exists"):
        comfy_server.run(_workflow(unet, seed=1, extra={"quant": fp8, "unet": unet,
                                                        "save_model": save_model}, prefix="q2"))
    assert saved.read_bytes() == before


def test_bad_input_is_an_error_and_the_server_stays_up(comfy_server, wan_file):
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": wan_file, "weight_dtype": "default"}}
    with pytest.raises(PromptError, match=r"Quantize Model: input 'group_size'.*does not divide"):
        comfy_server.run(_workflow(unet, extra={"quant": _quant("int4", group_size=96), "unet": unet}))
    with pytest.raises(PromptError, match=r"input 'layer_overrides'"):
        comfy_server.run(_workflow(unet, extra={"quant": _quant("int8", layer_overrides="blocks.*"), "unet": unet}))
    twice = _quant("int8", source=("quant0", 0))
    with pytest.raises(PromptError, match="already quantized"):
        comfy_server.run(_workflow(unet, extra={"quant0": _quant("int8"), "quant": twice, "unet": unet}))
    # still serving: a good prompt runs, here with calibration on the workflow's own inputs
    calibrated = _quant("int8", positive=["pos", 0], negative=["neg", 0], latent=["latent", 0])
    entry = comfy_server.run(_workflow(unet, seed=5, extra={"quant": calibrated, "unet": unet}, prefix="ok"))
    assert torch.isfinite(_latent(comfy_server, entry)).all()
