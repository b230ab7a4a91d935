"""QuantWeight behaves as a tensor where ModelPatcher needs one; QuantLinear computes right."""
import copy

import pytest
import torch

from comfyui_accel.quant.formats import Spec
from comfyui_accel.quant.linear import QuantLinear
from comfyui_accel.quant.qweight import QuantWeight


def make(fmt="int8", dtype=torch.float32, n=32, k=128, seed=0, smooth=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    group = 64 if fmt in ("int4", "w4a8") else None
    return w, QuantWeight.quantize(w, Spec(fmt, group), dtype, smooth=smooth)


def test_looks_like_the_logical_weight():
    w, qw = make(dtype=torch.bfloat16)
    assert qw.shape == w.shape and qw.dtype == torch.bfloat16 and qw.device == w.device
    assert "int8" in repr(qw)


def test_to_float_dtype_dequantizes_and_same_dtype_keeps_packed():
    w, qw = make(dtype=torch.bfloat16)
    f32 = qw.to(torch.float32)
    assert type(f32) is torch.Tensor and torch.equal(f32, qw.dequantize(torch.float32))
    same = qw.to(torch.bfloat16, copy=True)
    assert isinstance(same, QuantWeight)
    assert same.parts["weight"].data_ptr() != qw.parts["weight"].data_ptr()


def test_empty_like_then_copy_dequantizes_into_a_plain_tensor():
    w, qw = make()
    out = torch.empty_like(qw, dtype=torch.float32)
    out.copy_(qw)
    assert type(out) is torch.Tensor and torch.equal(out, qw.dequantize(torch.float32))


def test_copy_into_quantweight_requantizes_in_place_and_reaches_aliases():
    w, qw = make()
    param = torch.nn.Parameter(qw, requires_grad=False)
    alias = param.data
    new_w = w * 2
    alias.copy_(new_w)
    assert torch.allclose(param.dequantize(torch.float32), new_w, atol=new_w.abs().max().item() / 100)


def test_clone_is_independent_and_detach_is_an_alias():
    w, qw = make()
    c = qw.clone()
    c.parts["weight"].zero_()
    assert qw.parts["weight"].abs().sum() > 0
    d = qw.detach()
    assert d.parts is qw.parts


def test_unhandled_ops_run_on_the_dequantized_weight():
    w, qw = make()
    assert torch.allclose(qw * 2.0, qw.dequantize() * 2.0)
    assert torch.allclose(qw.t(), qw.dequantize().t())


def test_flatten_exposes_packed_tensors():
    w, qw = make("int4")
    names, ctx = qw.__tensor_flatten__()
    inner = {n: getattr(qw, n) for n in names}
    assert sum(t.numel() * t.element_size() for t in inner.values()) == qw.packed_nbytes()
    back = QuantWeight.__tensor_unflatten__(inner, ctx, qw.shape, None)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("fmt", ["int8", "int4", "w4a8", "nvfp4", "nvfp4_w4a4", "mxfp4", "fp8_e4m3"])
def test_quantlinear_matches_float_linear_closely(fmt):
    w, qw = make(fmt)
    bias = torch.randn(32)
    layer = QuantLinear(qw, bias)
    x = torch.randn(2, 5, 128)
    ref = torch.nn.functional.linear(x, w, bias)
    out = layer(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.03 if fmt == "int8" else 0.15)


def test_state_dict_and_parameter_protocol():
    w, qw = make()
    layer = QuantLinear(qw, torch.zeros(32))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"} and isinstance(sd["weight"], QuantWeight)
    assert isinstance(layer.weight, torch.nn.Parameter)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]


def test_module_to_changes_dtype_without_dequantizing():
    w, qw = make()
    layer = QuantLinear(qw, torch.zeros(32))
    layer.to(torch.bfloat16)
    assert isinstance(layer.weight, QuantWeight) and layer.weight.dtype == torch.bfloat16
    assert layer.weight.parts["weight"].dtype == torch.int8
    assert layer(torch.randn(3, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_set_weight_and_convert_weight_roundtrip_like_modelpatcher():
    # What ModelPatcher.patch_weight_to_device does with set_weight/convert_weight.
    w, qw = make()
    layer = QuantLinear(qw, None)
    backup = layer.weight.to(device="cpu", copy=False)
    temp = layer.convert_weight(layer.weight.to(torch.float32, copy=True), inplace=True)
    delta = torch.randn_like(w) * 0.05
    layer.set_weight(temp + delta, seed=123)
    assert torch.allclose(layer.weight.dequantize(torch.float32), qw.dequantize(torch.float32) + delta,
                          atol=3 * w.abs().max().item() / 127)
    layer.weight = torch.nn.Parameter(backup, requires_grad=False)   # unpatch
    assert torch.equal(layer.weight.dequantize(), qw.dequantize())


@pytest.mark.parametrize("fmt", ["w4a8", "vq2"])
def test_set_weight_of_an_unchanged_weight_keeps_it_packed(fmt):
    # ComfyUI 0.33's dynamic loader runs patch_weight_to_device on small layers that have no
    # patch (convert, then set); repacking these formats is not lossless, so nothing may be repacked
    w, qw = make(fmt)
    assert not torch.equal(qw.requantize(qw.dequantize(torch.float32), seed=3).dequantize(), qw.dequantize())
    layer = QuantLinear(qw.clone(), None)
    layer.set_weight(layer.convert_weight(layer.weight.to(torch.float32, copy=True), inplace=True), seed=3)
    assert torch.equal(layer.weight.dequantize(), qw.dequantize())


def test_weight_function_path_equals_full_load_path(comfy):
    # the layer asks ComfyUI which loader protocol it speaks (compat), so ComfyUI is imported
    w, qw = make()
    delta = torch.randn_like(w) * 0.05
    full = QuantLinear(qw.clone(), None)
    full.set_weight(full.convert_weight(full.weight) + delta, seed=7)
    lowvram = QuantLinear(qw.clone(), None)

    def lora_patch(weight):  # the shape of comfy.model_patcher.LowVramPatch with set_func
        out = lowvram.convert_weight(weight) + delta
        return lowvram.set_weight(out, seed=7, return_weight=True).to(dtype=weight.dtype)

    lowvram.weight_function = [lora_patch]
    lowvram.comfy_cast_weights = True
    x = torch.randn(4, 128)
    assert torch.equal(full(x), lowvram(x))


def test_smoothing_is_transparent_to_the_layer_function():
    k = 128
    smooth = torch.rand(k) * 4 + 0.25
    w, qw = make(smooth=smooth)
    assert torch.equal(qw.smooth, smooth)
    x = torch.randn(64, k)   # 64 rows: with 6 the error of fresh random data passed 0.06 in 3 of 1,000 draws
    rel = (QuantLinear(qw)(x) - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < 0.06  # random factors spread the weights' ranges, so a little above unsmoothed int8
    assert (qw.dequantize(torch.float32) - w).norm() / w.norm() < 0.04
    assert torch.equal(qw.requantize(w).smooth, smooth)


def test_deepcopy_of_layer():
    w, qw = make("int4")
    layer = QuantLinear(qw, None)
    other = copy.deepcopy(layer)
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("fmt", ["int8", "int4", "w4a8", "nvfp4", "nvfp4_w4a4", "mxfp4", "fp8_e4m3"])
def test_select_rows_is_those_rows_of_the_layer(fmt):
    smooth = torch.rand(128) + 0.5 if fmt == "int8" else None
    w, qw = make(fmt, n=128, k=128, smooth=smooth)  # N == K: the [K] smoothing factors must not be sliced
    rows = torch.tensor([0, 5, 77, 127])
    part = qw.select_rows(rows)
    assert part.shape == (4, 128)
    assert torch.equal(part.dequantize(torch.float32), qw.dequantize(torch.float32)[rows])
