"""SVD Low-Rank Branch through a real ComfyUI server: UNETLoader -> SVD Low-Rank Branch (calibrated
on the prompt's own conditioning and latent) -> Quantize Model (w4a4) [-> stock LoraLoaderModelOnly]
-> KSampler -> SaveLatent."""
import pytest
import torch

from lab import fixtures
from lab.host import PromptError
from lab.prompts import SVD_DEFAULTS, quantize_step, read_latent, sampling_prompt, svd_step
from comfyui_accel.metrics import psnr

pytestmark = pytest.mark.e2e

CALIBRATION = {"positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0]}


def _latent(server, entry) -> torch.Tensor:
    return read_latent(server.output_files(entry, "6", kind="latents")[0]).float()


def test_svd_then_quantize_then_sample(comfy_server):
    schema = comfy_server.object_info()["AccelSVDLowRankBranch"]
    defaults = {name: spec[1].get("default") for name, spec in schema["input"]["required"].items() if name != "model"}
    assert defaults == SVD_DEFAULTS
    assert schema["output_name"] == ["model", "report", "plot"]

    wan = fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir, outliers=True)
    reference = _latent(comfy_server, comfy_server.run(sampling_prompt(wan, seed=3, steps=2, prefix="float")))
    chain = [svd_step(calibration_steps=1, **CALIBRATION), quantize_step(format="w4a4", compute_dtype="float32")]
    entry = comfy_server.run(sampling_prompt(wan, seed=3, steps=2, chain=chain, prefix="svdq"))
    svdq = _latent(comfy_server, entry)
    assert torch.isfinite(svdq).all() and not torch.equal(svdq, reference)
    assert psnr(reference, svdq) > 25

    # a LoRA file loaded with the stock LoraLoaderModelOnly after quantization takes effect
    g = torch.Generator().manual_seed(0)
    lora = {f"diffusion_model.blocks.{i}.self_attn.q.lora_{part}.weight": t for i in range(2)
            for part, t in (("up", torch.randn(256, 4, generator=g) * 0.3), ("down", torch.randn(4, 256, generator=g) / 16))}
    from safetensors.torch import save_file
    (comfy_server.models_dir / "loras").mkdir(parents=True, exist_ok=True)
    save_file(lora, str(comfy_server.models_dir / "loras" / "svd_e2e_lora.safetensors"))
    lora_step = ("LoraLoaderModelOnly", {"lora_name": "svd_e2e_lora.safetensors", "strength_model": 1.0})
    with_lora = _latent(comfy_server, comfy_server.run(sampling_prompt(wan, seed=3, steps=2, chain=[*chain, lora_step],
                                                                       prefix="svdq_lora")))
    assert torch.isfinite(with_lora).all() and psnr(svdq, with_lora) < 60

    # bad input: an error naming node and input, and the server keeps serving
    with pytest.raises(PromptError, match=r"SVD Low-Rank Branch [(]AccelSVDLowRankBranch[)]: input 'model' already has a low-rank branch"):
        comfy_server.run(sampling_prompt(wan, seed=4, steps=1, chain=[svd_step(), svd_step()], prefix="bad"))
    assert comfy_server.object_info()["AccelSVDLowRankBranch"]
