"""VQ through the real ComfyUI server: stock loaders and encoders, our nodes, files on disk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def files(comfy_server):
    from lab import host
    host.import_comfy()  # the fixtures read ComfyUI's model classes for their shapes
    from lab import vq_fixtures
    vae_dir = comfy_server.models_dir / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(vq_fixtures.taesd_state_dict(seed=0), str(vae_dir / "accel_vq_taesd.safetensors"))
    safetensors.torch.save_file(vq_fixtures.stage_a_state_dict(seed=0), str(vae_dir / "accel_vq_stage_a.safetensors"))
    image = (vq_fixtures.smooth_images(1, 64, 80, seed=2)[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(image).save(comfy_server.base / "input" / "accel_vq.png")
    return {"taesd": "accel_vq_taesd.safetensors", "stage_a": "accel_vq_stage_a.safetensors", "image": "accel_vq.png"}


def encode_prompt(files, codebook_size):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": files["image"]}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": files["taesd"]}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "AccelVQFitCodebook", "inputs": {"latent": ["3", 0], "codebook_size": codebook_size,
              "patch_size": 1, "residual_levels": 2, "iterations": 4, "seed": 0}},
        "5": {"class_type": "AccelVQEncode", "inputs": {"latent": ["3", 0], "codebook": ["4", 0],
              "residual_levels": 0, "vae": ["2", 0]}},
        "6": {"class_type": "AccelVQSaveTokens", "inputs": {"tokens": ["5", 0], "filename_prefix": "vq_tokens/e2e",
              "embed_codebook": True}},
    }


def test_fit_encode_save_load_decode(comfy_server, files):
    entry = comfy_server.run(encode_prompt(files, 16))
    saved = entry["outputs"]["6"]
    report = saved["text"][0]
    assert "VQ Save Tokens" in report and "coded_bpp" in report and "file_bpp" in report
    summary = json.loads(report.split("JSON:", 1)[1])["summary"]
    assert summary["pixels"] == 64 * 80 and summary["coded_bpp"] > 0
    token = saved["vq_tokens"][0]
    path = comfy_server.output_dir / token["subfolder"] / token["filename"]
    assert path.is_file()

    decode = {
        "1": {"class_type": "AccelVQLoadTokens", "inputs": {"token_file": f"vq_tokens/{token['filename']} [output]"}},
        "2": {"class_type": "AccelVQDecode", "inputs": {"tokens": ["1", 0], "residual_levels": 0}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["taesd"]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "vq_e2e"}},
    }
    entry = comfy_server.run(decode)
    images = comfy_server.output_files(entry, "5")
    assert len(images) == 1 and Image.open(images[0]).size == (80, 64)


def test_bad_input_is_a_clear_error_and_the_server_stays_up(comfy_server, files):
    from lab.host import PromptError
    with pytest.raises(PromptError, match="VQ Fit Codebook [(]AccelVQFitCodebook[)]: input 'codebook_size' is 5000 but the latent has only 80"):
        comfy_server.run(encode_prompt(files, 5000))
    assert comfy_server.get("/system_stats")["system"]
    # And it still runs work afterwards (another size, so nothing comes from ComfyUI's cache).
    entry = comfy_server.run(encode_prompt(files, 8))
    assert "coded_bpp" in entry["outputs"]["6"]["text"][0]


def test_stage_a_through_the_stock_vae_loader(comfy_server, files):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": files["image"]}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": files["stage_a"]}},
        "3": {"class_type": "AccelVQGANEncode", "inputs": {"image": ["1", 0], "vae": ["2", 0], "report_psnr": False}},
        "4": {"class_type": "AccelVQSaveTokens", "inputs": {"tokens": ["3", 0], "filename_prefix": "vq_tokens/stage_a",
              "embed_codebook": False}},
        "5": {"class_type": "AccelVQGANDecode", "inputs": {"tokens": ["3", 0], "vae": ["2", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    entry = comfy_server.run(prompt)
    summary = json.loads(entry["outputs"]["4"]["text"][0].split("JSON:", 1)[1])["summary"]
    assert summary["pixels"] == 64 * 80 and summary["tokens"] == 16 * 20
    assert summary["fixed_bpp"] == pytest.approx(16 * 20 * 13 / (64 * 80))
    assert len(entry["outputs"]["6"]["images"]) == 1
