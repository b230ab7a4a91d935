"""Save Quantized Model / Load Quantized Model with real ComfyUI: round trips, the stock
loader reading our fp8 files, LoRA baked in at save time."""
import pytest
import torch

from lab import fixtures
from lab.quant_checks import lora_for, quantize, sample, with_lora
from comfyui_accel.metrics import psnr
from comfyui_accel.quant import checkpoint
from comfyui_accel.quant import model as qmodel


@pytest.fixture(scope="module")
def wan(comfy):
    return fixtures.load_model("wan21", "tiny")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_save_then_load_gives_the_same_model(wan, tmp_path, fmt):
    q = quantize(wan, fmt).model
    path = str(tmp_path / f"{fmt}.safetensors")
    info = checkpoint.save_model(q, path)
    assert info["quantized layers"] == len(qmodel.quantized_layers(q))
    loaded = checkpoint.load_model(path)
    assert len(qmodel.quantized_layers(loaded)) == info["quantized layers"]
    assert torch.equal(sample(loaded, "wan21"), sample(q, "wan21"))


def test_stock_loader_reads_our_fp8_file(wan, tmp_path):
    import comfy.sd
    q = quantize(wan, "fp8_e4m3").model
    path = str(tmp_path / "fp8.safetensors")
    checkpoint.save_model(q, path)
    stock = comfy.sd.load_diffusion_model(path)  # what UNETLoader does, no node of ours
    assert psnr(sample(q, "wan21"), sample(stock, "wan21")) > 60


def test_int8_file_in_the_stock_loader(wan, tmp_path):
    import comfy.quant_ops
    import comfy.sd
    q = quantize(wan, "int8").model
    path = str(tmp_path / "int8.safetensors")
    checkpoint.save_model(q, path)
    if "int8_tensorwise" in getattr(comfy.quant_ops, "QUANT_ALGOS", {}):
        # hosts with core's int8 layout (0.33 on) read the file as it is
        stock = comfy.sd.load_diffusion_model(path)
        assert psnr(sample(q, "wan21"), sample(stock, "wan21")) > 30
    else:
        # 0.3.75 knows only float8_e4m3fn; it refuses the file, naming the layout (documented in the node)
        with pytest.raises(KeyError, match="int8_tensorwise"):
            comfy.sd.load_diffusion_model(path)


def test_lora_after_quantization_is_baked_into_the_file(wan, tmp_path):
    result = quantize(wan, "int8")
    paths = [r.layer for r in result.rows if r.format != "keep"]
    lora_model = with_lora(result.model, lora_for(wan, paths, scale=0.5))
    expected = sample(lora_model, "wan21")
    path = str(tmp_path / "lora.safetensors")
    checkpoint.save_model(lora_model, path)
    assert torch.equal(sample(checkpoint.load_model(path), "wan21"), expected)


def test_detection_needing_file_metadata_round_trips(comfy, tmp_path):
    # LTX-Video's head count comes from the file's "config" metadata, which a loaded model no
    # longer has: the file carries the configuration again, and loading checks it.
    import json

    import safetensors
    import safetensors.torch
    model = fixtures.load_model("ltxv", "tiny")
    q = quantize(model, "int4").model
    path = str(tmp_path / "ltxv.safetensors")
    checkpoint.save_model(q, path)
    assert torch.equal(sample(checkpoint.load_model(path), "ltxv"), sample(q, "ltxv"))
    with safetensors.safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    accel = json.loads(meta[checkpoint.META_KEY])
    accel["model_config"]["num_attention_heads"] += 1
    meta[checkpoint.META_KEY] = json.dumps(accel)
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match="another configuration"):
        checkpoint.load_model(path)
