"""Quantize Model on ComfyUI's own layouts (quant/core.py) with real ComfyUI: the layers are
ComfyUI's mixed-precision Linear holding comfy-kitchen tensors, Save Quantized writes files the
stock loader reads into the same model, LoRAs before and after work in full and low-VRAM loading,
a model the stock loader loaded quantized is passed through or re-quantized, and hosts without the
layouts (0.3.75) fall back to our layers with one log line. Plus the file of format version 1
kept in tests/data, which Load Quantized must keep loading on every host."""
import json
import logging
import os

import pytest
import torch

from comfyui_accel import compat
from lab import fixtures
from lab.quant_checks import (assert_unchanged, full_and_lowvram_outputs, lora_for, quantize,
                                                 sample, snapshot, with_lora)
from comfyui_accel.metrics import psnr
from comfyui_accel.quant import checkpoint, core
from comfyui_accel.quant import model as qmodel
from comfyui_accel.quant.linear import QuantLinear

pytestmark = pytest.mark.integration

LEGACY_FILE = os.path.join(os.path.dirname(__file__), "..", "data", "accel_v1_wan_tiny.safetensors")
# format of ours -> (ComfyUI's layout, kitchen layout class, PSNR floor of the tiny Wan's output)
CORE = {"int8": ("int8_tensorwise", "TensorWiseINT8Layout", 45), "fp8_e4m3": ("float8_e4m3fn", "TensorCoreFP8E4M3Layout", 40),
        "nvfp4": ("nvfp4", "TensorCoreNVFP4Layout", 30), "mxfp8": ("mxfp8", "TensorCoreMXFP8Layout", 40),
        "w4a8": ("asym_w4a8_int8", "AsymW4A8Int8Layout", 30), "w4a4": ("convrot_w4a4", "TensorCoreConvRotW4A4Layout", 25)}


def require(name: str) -> None:
    if name not in compat.core_quant_formats():
        pytest.skip(f"this ComfyUI has no {name} layout (comfy.quant_ops on comfy-kitchen: 0.33 on)")


@pytest.fixture(scope="module")
def wan(comfy):
    model = fixtures.load_model("wan21", "tiny")
    return model, sample(model, "wan21")


def core_paths(result) -> list[str]:
    return [r.layer for r in result.rows if r.layout.startswith("ComfyUI ")]


@pytest.mark.parametrize("fmt", list(CORE))
def test_formats_core_has_become_comfyui_layers(wan, fmt):
    name, layout, floor = CORE[fmt]
    require(name)
    from comfy.quant_ops import QuantizedTensor
    model, reference = wan
    before = snapshot(model)
    result = quantize(model, fmt, kernels="core", dtype=torch.float32)
    quantized = [r for r in result.rows if r.format == fmt]
    assert quantized and all(r.layout == f"ComfyUI {name}" for r in quantized)
    linear_class = compat.core_linear_class(torch.float32, model.load_device)
    for r in quantized:
        layer = result.model.object_patches["diffusion_model." + r.layer]
        assert type(layer) is linear_class and layer.quant_format == name
        assert isinstance(layer.weight, QuantizedTensor) and layer.weight._layout_cls == layout
        assert r.bytes_after < r.bytes_before
    assert psnr(reference, sample(result.model, "wan21")) > floor
    assert_unchanged(model, before)


@pytest.mark.parametrize("fmt", list(CORE))
def test_saved_file_loads_in_the_stock_loader_with_the_same_output(wan, tmp_path, fmt):
    name = CORE[fmt][0]
    require(name)
    import comfy.sd
    model, _ = wan
    q = quantize(model, fmt, kernels="core", dtype=torch.float32).model
    path = str(tmp_path / f"{fmt}.safetensors")
    info = checkpoint.save_model(q, path)
    assert info["ComfyUI layouts"] == [name] and info["ComfyUI-Accel layouts"] == []
    expected = sample(q, "wan21")
    stock = comfy.sd.load_diffusion_model(path)  # what Load Diffusion Model does, no node of ours
    assert torch.equal(sample(stock, "wan21"), expected)
    loaded = checkpoint.load_model(path)
    assert len(qmodel.quantized_layers(loaded)) == info["quantized layers"]
    assert {qmodel.layer_format(loaded.get_model_object("diffusion_model." + p))
            for p in qmodel.quantized_layers(loaded)} == {fmt}
    assert torch.equal(sample(loaded, "wan21"), expected)


@pytest.mark.parametrize("fmt,min_gain_db", [("int8", 20), ("fp8_e4m3", 15), ("w4a8", 5)])
def test_lora_before_and_after_on_comfyui_layers_full_and_lowvram(comfy, fmt, min_gain_db):
    name = CORE[fmt][0]
    require(name)
    # the float reference on a model of its own: nothing else is loaded into it
    float_model = fixtures.load_model("wan21", "tiny")
    probe = quantize(float_model, fmt, kernels="core")
    paths = core_paths(probe)
    lora = lora_for(float_model, paths, scale=0.5)
    float_lora = with_lora(float_model, lora)
    reference = sample(float_lora, "wan21")
    ref_full, _, _, _ = full_and_lowvram_outputs(float_lora, "blocks.0.self_attn.q")

    model = fixtures.load_model("wan21", "tiny")
    plain = quantize(model, fmt, kernels="core")
    without = sample(plain.model, "wan21")
    after = with_lora(plain.model, lora)
    before = quantize(with_lora(model, lora), fmt, kernels="core")
    assert core_paths(before) == paths
    for result in (sample(after, "wan21"), sample(before.model, "wan21")):
        assert psnr(reference, result) > psnr(reference, without) + min_gain_db
    full, partial, used_full, used = full_and_lowvram_outputs(after, "blocks.0.self_attn.q")
    assert not used_full and used  # low VRAM: ComfyUI's weight_function (dequantize, add) at each call
    noise = psnr(ref_full, full)  # the format's noise with the LoRA baked in (full load)
    assert psnr(ref_full, partial) > noise - 3
    assert torch.equal(sample(plain.model, "wan21"), without)  # the LoRA left the quantized model as it was


def test_stock_loaded_quantized_model_is_passed_through_or_requantized(wan, tmp_path):
    require("int8_tensorwise")
    import comfy.sd
    model, reference = wan
    path = str(tmp_path / "int8.safetensors")
    checkpoint.save_model(quantize(model, "int8", kernels="core", dtype=torch.float32).model, path)
    stock = comfy.sd.load_diffusion_model(path)
    loaded_paths = [p for p, m in qmodel.linear_layers(stock) if core.core_format(m)]
    assert loaded_paths and not qmodel.quantized_layers(stock)  # a stock-loaded layer is not one of ours

    same = quantize(stock, "int8", kernels="core")
    rows = {r.layer: r for r in same.rows}
    assert all("passed through" in rows[p].reason for p in loaded_paths)
    assert not any("diffusion_model." + p in same.model.object_patches for p in loaded_paths)
    assert torch.equal(sample(same.model, "wan21"), sample(stock, "wan21"))

    other = quantize(stock, "int4")
    rows = {r.layer: r for r in other.rows}
    assert all("re-quantized from the input's ComfyUI int8_tensorwise" in rows[p].reason for p in loaded_paths)
    assert all(isinstance(other.model.object_patches["diffusion_model." + p], QuantLinear) for p in loaded_paths)
    assert psnr(reference, sample(other.model, "wan21")) > 30


def test_a_format_the_host_cannot_run_falls_back_with_one_log_line(wan, caplog):
    model, reference = wan
    # nvfp4 activations need FP4 units (no CPU has them); without kitchen's layouts, every format falls back
    fmt = "nvfp4_w4a4" if "nvfp4" in compat.core_quant_formats() else "int8"
    with caplog.at_level(logging.INFO, logger="comfyui_accel.quant.model"):
        result = quantize(model, fmt, kernels="core")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"Quantize Model: {fmt}:")]
    assert len(lines) == 1 and "instead" in lines[0]
    rows = [r for r in result.rows if r.format == fmt]
    assert rows and all(r.layout == f"ComfyUI-Accel {fmt}" for r in rows)
    assert psnr(reference, sample(result.model, "wan21")) > 25


def test_damaged_core_file_is_refused_naming_the_tensor(wan, tmp_path):
    require("int8_tensorwise")
    import safetensors
    import safetensors.torch
    model, _ = wan
    path = str(tmp_path / "int8.safetensors")
    checkpoint.save_model(quantize(model, "int8", kernels="core").model, path)
    with safetensors.safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    key = "blocks.1.ffn.0.weight_scale"
    del tensors[key]
    broken = str(tmp_path / "broken.safetensors")
    safetensors.torch.save_file(tensors, broken, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match=f"broken.safetensors.*missing tensor {key}"):
        checkpoint.load_model(broken)
    accel = json.loads(meta[checkpoint.META_KEY])
    accel["core_layers"]["blocks.1.ffn.0"]["comfy"]["format"] = "int2_future"
    meta[checkpoint.META_KEY] = json.dumps(accel)
    unknown = str(tmp_path / "unknown.safetensors")
    safetensors.torch.save_file(tensors, unknown, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match="blocks.1.ffn.0 uses ComfyUI's int2_future layout"):
        checkpoint.load_model(unknown)


def test_load_quantized_reads_the_format_version_1_file(wan):
    # written by the pack before ComfyUI layouts (lab/make_legacy_quant_file.py): every format of
    # ours, SmoothQuant factors and a low-rank branch
    model, reference = wan
    assert json.loads(checkpoint.read_header(LEGACY_FILE)[checkpoint.META_KEY])["format_version"] == 1
    loaded = checkpoint.load_model(LEGACY_FILE)
    layers = {p: loaded.get_model_object("diffusion_model." + p) for p in qmodel.quantized_layers(loaded)}
    assert len(layers) == 45 and all(isinstance(m, QuantLinear) for m in layers.values())
    formats = {m.weight.spec.format for m in layers.values()}
    assert formats == {"int8", "fp8_e4m3", "nvfp4", "mxfp4", "w4a8", "int4", "w4a4", "nvfp4_w4a4"}
    assert any(m.weight.smooth is not None for m in layers.values())
    assert any(m.weight.rank for m in layers.values())
    assert psnr(reference, sample(loaded, "wan21")) > 20


def test_quantize_model_node_reports_the_layout_it_picked_for_this_device(wan):
    from comfyui_accel.nodes.quant import AccelQuantizeModel
    model, _ = wan
    device = model.load_device.type
    for fmt in ("int8", "nvfp4"):
        out = AccelQuantizeModel.execute(model, format=fmt, group_size=64, compute_dtype="auto", smooth_alpha=0.5,
                                         calibration_steps=1, seed=0, cfg=3.0, auto_formats="int8",
                                         auto_budget=0.35, auto_min_sqnr_db=0.0, layer_overrides="")
        result, report = out.args[0], out.args[1]
        name = core.CORE_NAMES[fmt]
        on_core = name in compat.core_quant_formats() and core.PREFERRED.get((device, fmt), "core") == "core"
        layers = [result.get_model_object("diffusion_model." + p) for p in qmodel.quantized_layers(result)]
        assert layers and all(isinstance(m, QuantLinear) != on_core for m in layers)
        assert (f"ComfyUI {name}" if on_core else f"ComfyUI-Accel {fmt}") in report


def test_a_file_with_comfyui_layouts_loads_where_the_host_has_them_and_is_refused_elsewhere(wan, tmp_path):
    # the version 1 file with one int8 layer (stored as int8_tensorwise stores it) declared in ComfyUI's layout
    import safetensors
    import safetensors.torch
    with safetensors.safe_open(LEGACY_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    accel = json.loads(meta[checkpoint.META_KEY])
    layer = "blocks.1.cross_attn.q"
    info = accel["layers"].pop(layer)
    assert info["format"] == "int8" and not info["extras"]
    accel.update(format_version=2, core_layers={layer: {"comfy": {"format": "int8_tensorwise"}, **info}})
    meta[checkpoint.META_KEY] = json.dumps(accel)
    path = str(tmp_path / "v2.safetensors")
    safetensors.torch.save_file(tensors, path, metadata=meta)
    if "int8_tensorwise" not in compat.core_quant_formats():
        with pytest.raises(checkpoint.CheckpointError, match="v2.safetensors has layers in ComfyUI's int8_tensorwise "
                                                             "layout, which this ComfyUI .* cannot build"):
            checkpoint.load_model(path)
        return
    loaded = checkpoint.load_model(path)
    module = loaded.get_model_object("diffusion_model." + layer)
    assert core.core_format(module) == "int8_tensorwise" and qmodel.layer_format(module) == "int8"
    assert len(qmodel.quantized_layers(loaded)) == 45
    assert psnr(sample(checkpoint.load_model(LEGACY_FILE), "wan21"), sample(loaded, "wan21")) > 40


def test_what_stays_on_our_layers_and_why(comfy):
    from comfyui_accel.quant.formats import Spec
    cpu = torch.device("cpu")
    cases = [  # (spec, shape, options, words the reason must have)
        (Spec("int4", 64), (64, 256), {}, "no int4 layout"),
        (Spec("int8"), (64, 256), {"smoothed": True}, "SmoothQuant"),
        (Spec("w4a4", 64), (64, 256), {"branched": True}, "svdquant_w4a4"),
        (Spec("int8", None, False), (64, 256), {}, "always quantizes activations"),
        (Spec("w4a8", 64), (64, 200), {}, "not a multiple of 16"),
        (Spec("nvfp4_w4a4"), (64, 256), {}, "no FP4 matmul"),
    ]
    host_has_them = bool(compat.core_quant_formats())
    for spec, shape, options, words in cases:
        choice = core.choose(spec, shape, cpu, kernels="core", **options)
        if not host_has_them and spec.format != "int4":
            words = "this ComfyUI has no"  # 0.3.75: every format stays ours, for that reason first
        assert choice.core is None and words in choice.reason, (spec, choice)
    if "float8_e4m3fn" in compat.core_quant_formats():
        # fp8 activations need a calibrated input scale; without one the layer is weight-only
        assert core.choose(Spec("fp8_e4m3"), (64, 256), cpu, kernels="core").full_precision
        assert not core.choose(Spec("fp8_e4m3"), (64, 256), cpu, kernels="core", calibrated=True).full_precision
    with pytest.raises(ValueError, match="kernels must be one of"):
        core.choose(Spec("int8"), (64, 256), cpu, kernels="fastest")


def test_lora_after_on_comfyui_layers_is_baked_into_the_file(wan, tmp_path):
    require("int8_tensorwise")
    import comfy.sd
    model, _ = wan
    q = quantize(model, "int8", kernels="core", dtype=torch.float32)
    lora_model = with_lora(q.model, lora_for(model, core_paths(q), scale=0.5))
    expected = sample(lora_model, "wan21")
    assert psnr(expected, sample(q.model, "wan21")) < 40  # the LoRA changes the output
    path = str(tmp_path / "lora.safetensors")
    checkpoint.save_model(lora_model, path)
    # requantized with ComfyUI's stochastic rounding seeded by the key, as its full load does
    assert torch.equal(sample(comfy.sd.load_diffusion_model(path), "wan21"), expected)
    assert torch.equal(sample(checkpoint.load_model(path), "wan21"), expected)
