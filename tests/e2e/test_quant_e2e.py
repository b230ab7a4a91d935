"""Quantize / Save / Load through a real ComfyUI server with API-format workflows:
UNETLoader -> Quantize Model -> KSampler -> SaveLatent, the saved file back through the
stock loader and ours, and bad input answered with an error while the server stays up."""
import pytest
import torch

from lab import fixtures
from lab.host import PromptError
from lab.prompts import QUANTIZE_DEFAULTS, quantize_step, read_latent, sampling_prompt

pytestmark = pytest.mark.e2e

SAVED = "e2e/wan_fp8.safetensors"


@pytest.fixture(scope="module")
def wan(comfy_server):
    return fixtures.write_fixture("wan21", "tiny", comfy_server.models_dir)


def _latent(server, entry) -> torch.Tensor:
    return read_latent(server.output_files(entry, "6", kind="latents")[0]).float()


def _with_loader(prompt: dict, class_type: str, inputs: dict) -> dict:
    prompt["1"] = {"class_type": class_type, "inputs": inputs}
    return prompt


def test_node_defaults_match_the_prompt_helper(comfy_server):
    schema = comfy_server.object_info()["AccelQuantizeModel"]["input"]
    defaults = {name: spec[1].get("default") for name, spec in schema["required"].items() if name != "model"}
    assert defaults == QUANTIZE_DEFAULTS
    assert set(schema["optional"]) == {"positive", "negative", "latent"}


def test_quantize_sample_save_and_reload(comfy_server, wan):
    # float32 compute, as the stock loader will use on this CPU, so the outputs can be compared
    fp8 = quantize_step(format="fp8_e4m3", compute_dtype="float32")
    prompt = sampling_prompt(wan, seed=1, steps=2, chain=[fp8], prefix="q")
    prompt["20"] = {"class_type": "AccelSaveQuantized",
                    "inputs": {"model": ["10", 0], "filename": SAVED[:-len(".safetensors")], "overwrite": False,
                               "other_weights_dtype": "keep"}}
    quantized = _latent(comfy_server, comfy_server.run(prompt))
    assert torch.isfinite(quantized).all() and quantized.abs().mean() > 0
    saved = comfy_server.models_dir / "diffusion_models" / SAVED
    assert saved.is_file()

    # the stock loader reads our fp8 file and gives the same result, with no node of ours in the path
    stock = _with_loader(sampling_prompt(wan, seed=1, steps=2, prefix="stock"), "UNETLoader",
                         {"unet_name": SAVED, "weight_dtype": "default"})
    assert torch.allclose(_latent(comfy_server, comfy_server.run(stock)), quantized, atol=1e-4)

    # and so does Load Quantized Model
    ours = _with_loader(sampling_prompt(wan, seed=1, steps=2, prefix="ours"), "AccelLoadQuantized",
                        {"unet_name": SAVED})
    assert torch.allclose(_latent(comfy_server, comfy_server.run(ours)), quantized, atol=1e-4)

    # saving again under the same name is refused and the file is kept
    before = saved.read_bytes()
    prompt = sampling_prompt(wan, seed=2, steps=2, chain=[fp8], prefix="q2")
    prompt["20"] = {"class_type": "AccelSaveQuantized",
                    "inputs": {"model": ["10", 0], "filename": "e2e/wan_fp8", "overwrite": False,
                               "other_weights_dtype": "keep"}}
    with pytest.raises(PromptError, match="already exists"):
        comfy_server.run(prompt)
    assert saved.read_bytes() == before


def test_bad_input_is_an_error_and_the_server_stays_up(comfy_server, wan):
    with pytest.raises(PromptError, match=r"Quantize Model [(]AccelQuantizeModel[)]: input 'group_size'.*does not divide"):
        comfy_server.run(sampling_prompt(wan, seed=3, steps=2, chain=[quantize_step(format="int4", group_size=96)]))
    with pytest.raises(PromptError, match=r"input 'layer_overrides'"):
        comfy_server.run(sampling_prompt(wan, seed=3, steps=2, chain=[quantize_step(layer_overrides="blocks.*")]))
    with pytest.raises(PromptError, match="already quantized"):
        comfy_server.run(sampling_prompt(wan, seed=3, steps=2, chain=[quantize_step(), quantize_step()]))
    # still serving: a good prompt runs, here calibrated on the prompt's own conditioning and latent
    calibrated = quantize_step(calibration_steps=2, positive=["2", 0], negative=["3", 0], latent=["4", 0])
    entry = comfy_server.run(sampling_prompt(wan, seed=5, steps=2, chain=[calibrated], prefix="ok"))
    assert torch.isfinite(_latent(comfy_server, entry)).all()
