"""Quantized safetensors files: layout, validation of metadata against tensors, atomic writes."""
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

from comfyui_accel.quant import checkpoint
from comfyui_accel.quant.formats import Spec
from comfyui_accel.quant.qweight import QuantWeight


def state(fmt="int8", smooth=False):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g) / 11
    group = 64 if fmt in ("int4", "w4a8") else None
    s = torch.rand(128, generator=g) + 0.5 if smooth else None
    qw = QuantWeight.quantize(w, Spec(fmt, group), torch.bfloat16, smooth=s)
    return {"blocks.0.q.weight": qw, "blocks.0.q.bias": torch.randn(32), "norm.weight": torch.ones(128)}


def write(tmp_path, st, name="m.safetensors"):
    tensors, meta = checkpoint.state_to_save(st)
    path = str(tmp_path / name)
    checkpoint.write_atomic(tensors, meta, path)
    return path, tensors, meta


def test_fp8_and_int8_use_comfyui_layouts(tmp_path):
    # our fp8 layers have no calibrated input scale: ComfyUI loads them weight-only, as they run on a CPU
    for fmt, native, scale_shape, wdtype in [
            ("fp8_e4m3", {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}, (), torch.float8_e4m3fn),
            ("int8", {"format": "int8_tensorwise"}, (32, 1), torch.int8)]:
        path, tensors, meta = write(tmp_path, state(fmt), f"{fmt}.safetensors")
        layers = json.loads(meta["_quantization_metadata"])["layers"]
        assert layers == {"blocks.0.q": native}
        with safetensors.safe_open(path, "pt") as f:
            assert f.get_tensor("blocks.0.q.weight").dtype == wdtype
            scale = f.get_tensor("blocks.0.q.weight_scale")
            assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape
            assert set(f.keys()) == {"blocks.0.q.weight", "blocks.0.q.weight_scale", "blocks.0.q.bias", "norm.weight"}


def weight_only(st):
    qw = st["blocks.0.q.weight"]
    return {**st, "blocks.0.q.weight": QuantWeight(qw.parts, Spec(qw.spec.format, qw.spec.group_size, False),
                                                   tuple(qw.shape), qw.dtype)}


def test_smoothed_weight_only_int8_and_4bit_layers_are_marked_private(tmp_path):
    # ComfyUI's int8_tensorwise always quantizes activations: a weight-only int8 layer would compute otherwise
    for st, expected in [(state("int8", smooth=True), "accel_int8"), (state("int4"), "accel_int4"),
                         (weight_only(state("int8")), "accel_int8")]:
        _, _, meta = write(tmp_path, st, f"{expected}{len(os.listdir(tmp_path))}.safetensors")
        assert json.loads(meta["_quantization_metadata"])["layers"]["blocks.0.q"]["format"] == expected


@pytest.mark.parametrize("fmt,smooth", [("int8", False), ("int8", True), ("int4", False), ("w4a8", False),
                                        ("nvfp4", False), ("nvfp4_w4a4", True), ("mxfp4", False), ("fp8_e4m3", False)])
def test_roundtrip_is_exact(tmp_path, fmt, smooth):
    st = state(fmt, smooth)
    path, _, _ = write(tmp_path, st)
    plain, packed, _, compute = checkpoint.load_quantized_state(path)
    assert compute == "bfloat16"
    assert set(plain) == {"blocks.0.q.bias", "norm.weight"}
    qw = packed["blocks.0.q"]
    assert qw.spec == st["blocks.0.q.weight"].spec and qw.dtype == torch.bfloat16
    assert torch.equal(qw.dequantize(torch.float32), st["blocks.0.q.weight"].dequantize(torch.float32))


def _rewrite(path, tensors=None, meta=None):
    with safetensors.safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    t.update(tensors or {})
    m.update(meta or {})
    safetensors.torch.save_file(t, path, metadata=m)


def _accel_meta(path):
    with safetensors.safe_open(path, "pt") as f:
        return json.loads(f.metadata()[checkpoint.META_KEY])


def test_unknown_format_is_named(tmp_path):
    path, _, _ = write(tmp_path, state("int4"))
    meta = _accel_meta(path)
    meta["layers"]["blocks.0.q"]["format"] = "int3"
    _rewrite(path, meta={checkpoint.META_KEY: json.dumps(meta)})
    with pytest.raises(checkpoint.CheckpointError, match="unknown weight format 'int3'"):
        checkpoint.load_quantized_state(path)


def test_shape_mismatch_is_named(tmp_path):
    path, _, _ = write(tmp_path, state("int4"))
    _rewrite(path, tensors={"blocks.0.q.weight_scale": torch.ones(32, 3, dtype=torch.float16)})
    with pytest.raises(checkpoint.CheckpointError, match=r"blocks.0.q.weight_scale has shape \[32, 3\], expected \[32, 2\]"):
        checkpoint.load_quantized_state(path)


def test_dtype_mismatch_and_missing_tensor(tmp_path):
    path, _, _ = write(tmp_path, state("int8"))
    _rewrite(path, tensors={"blocks.0.q.weight": torch.zeros(32, 128, dtype=torch.uint8)})
    with pytest.raises(checkpoint.CheckpointError, match="is uint8, the int8 format stores int8"):
        checkpoint.load_quantized_state(path)
    path, tensors, meta = write(tmp_path, state("int8"), "b.safetensors")
    tensors.pop("blocks.0.q.weight_scale")
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match="missing tensor blocks.0.q.weight_scale"):
        checkpoint.load_quantized_state(path)


def test_truncated_and_foreign_files(tmp_path):
    path, _, _ = write(tmp_path, state("int8"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or damaged"):
        checkpoint.load_quantized_state(path)
    plain = str(tmp_path / "plain.safetensors")
    safetensors.torch.save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(checkpoint.CheckpointError, match="not a quantized model file"):
        checkpoint.load_quantized_state(plain)


def test_newer_file_version_is_refused(tmp_path):
    path, _, _ = write(tmp_path, state("int8"))
    meta = _accel_meta(path)
    meta["format_version"] = 99
    _rewrite(path, meta={checkpoint.META_KEY: json.dumps(meta)})
    with pytest.raises(checkpoint.CheckpointError, match="version 99"):
        checkpoint.load_quantized_state(path)


def test_never_overwrites_unless_asked_and_leaves_no_temp_files(tmp_path):
    path, tensors, meta = write(tmp_path, state("int8"))
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError):
        checkpoint.write_atomic({"x": torch.zeros(1)}, {}, path)
    assert open(path, "rb").read() == before
    checkpoint.write_atomic({"x": torch.zeros(1)}, {}, path, overwrite=True)
    with safetensors.safe_open(path, "pt") as f:
        assert list(f.keys()) == ["x"]
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_standin_takes_no_memory():
    qw = state("int4")["blocks.0.q.weight"]
    s = checkpoint.standin(qw)
    assert s.shape == qw.shape and s.dtype == qw.dtype and s.stride() == (0, 0)
