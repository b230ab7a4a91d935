"""Weight formats: round-trip error within bounds derived from each format's definition,
stored tensors matching the declared layout, and the quantized matmuls against an
independent computation."""
import pytest
import torch

from comfyui_accel.kernels import lowbit
from comfyui_accel.quant import formats
from comfyui_accel.quant.formats import Spec

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def weight(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[3, 17] *= 25.0  # one outlier weight, as real layers have
    w[5] = 0.0        # an all-zero row must not divide by zero
    return w


def spec(name, group=64, act=True):
    return Spec(name, group if formats.get(name).grouped else None, act)


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_parts_match_declared_layout(name):
    w = weight()
    s = spec(name)
    fmt = formats.get(name)
    parts = fmt.quantize(w, s)
    declared = fmt.part_specs(tuple(w.shape), s)
    assert set(parts) == set(declared)
    for key, (shape, dtype) in declared.items():
        assert tuple(parts[key].shape) == shape and parts[key].dtype == dtype, key


def test_int8_error_is_at_most_half_a_step_per_row():
    w = weight()
    fmt = formats.get("int8")
    parts = fmt.quantize(w, spec("int8"))
    step = w.abs().amax(dim=1, keepdim=True) / 127
    err = (fmt.dequantize(parts, w.shape, spec("int8"), torch.float32) - w).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-12)
    assert parts["weight"].abs().max() <= 127


def test_fp8_error_is_half_an_ulp_of_e4m3():
    w = weight()
    fmt = formats.get("fp8_e4m3")
    parts = fmt.quantize(w, spec("fp8_e4m3"))
    scale = w.abs().max() / 448
    deq = fmt.dequantize(parts, w.shape, spec("fp8_e4m3"), torch.float32)
    # 3 mantissa bits: relative half-ulp 2^-4 for normals; subnormal spacing 2^-9 (scaled units)
    bound = torch.maximum(w.abs() * 2 ** -4, torch.full_like(w, 2 ** -10) * scale)
    assert torch.all((deq - w).abs() <= bound * (1 + 1e-5))


def test_int4_asymmetric_groups_error_and_grid():
    w = weight()
    s = spec("int4", 64)
    fmt = formats.get("int4")
    parts = fmt.quantize(w, s)
    wg = w.reshape(48, 4, 64)
    step = ((wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    deq = fmt.dequantize(parts, w.shape, s, torch.float32).reshape(48, 4, 64)
    assert torch.all((deq - wg).abs() <= 0.51 * step[..., None] + 1e-7)
    codes = lowbit.unpack_int4(parts["weight"]).reshape(48, 4, 64).float()
    assert codes.max() <= 15 and parts["zero"].max() <= 15
    # every value is (code - zero) * scale exactly
    assert torch.allclose(deq, (codes - parts["zero"].float()[..., None]) * step[..., None], atol=1e-7)


def test_w4a8_error_and_exact_int8_weights():
    w = weight()
    s = spec("w4a8", 64)
    fmt = formats.get("w4a8")
    parts = fmt.quantize(w, s)
    s_ch = w.abs().amax(dim=1) / 119
    s_ch = torch.where(s_ch > 0, s_ch, torch.ones_like(s_ch))
    gs = parts["group_scale"].float()
    assert gs.min() >= 1 and gs.max() <= 17
    step = (s_ch[:, None] * gs).repeat_interleave(64, dim=1)
    deq = fmt.dequantize(parts, w.shape, s, torch.float32)
    assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12)
    w8 = fmt.int8_weight(parts, w.shape, s)
    assert w8.dtype == torch.int8 and w8.abs().max() <= 119
    assert torch.allclose(w8.float() * s_ch[:, None], deq)


def _nearest_grid_error(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    grid = torch.cat([E2M1, -E2M1[1:]])
    return (x[..., None] - grid * scale[..., None]).abs().min(dim=-1).values


def test_nvfp4_scales_and_nearest_value():
    w = weight()
    fmt = formats.get("nvfp4")
    parts = fmt.quantize(w, spec("nvfp4"))
    gscale = w.abs().max() / (448 * 6)
    wb = w.reshape(48, 16, 16)
    expected_bs = (wb.abs().amax(-1) / 6 / gscale).to(torch.float8_e4m3fn)
    assert torch.equal(parts["block_scale"].float(), expected_bs.float())
    total = expected_bs.float() * gscale
    deq = fmt.dequantize(parts, w.shape, spec("nvfp4"), torch.float32).reshape(48, 16, 16)
    best = _nearest_grid_error(wb, total[..., None].expand_as(wb))
    assert torch.allclose((deq - wb).abs(), best, atol=1e-7)


def test_mxfp4_power_of_two_scales_and_nearest_value():
    w = weight()
    fmt = formats.get("mxfp4")
    parts = fmt.quantize(w, spec("mxfp4"))
    wb = w.reshape(48, 8, 32)
    amax = wb.abs().amax(-1)
    scale = lowbit.e8m0_decode(parts["block_scale"])
    nonzero = amax > 0
    # smallest power of two with amax / scale <= 6: nothing saturates
    assert torch.all(amax[nonzero] / scale[nonzero] <= 6) and torch.all(amax[nonzero] / scale[nonzero] > 3)
    deq = fmt.dequantize(parts, w.shape, spec("mxfp4"), torch.float32).reshape(48, 8, 32)
    best = _nearest_grid_error(wb, scale[..., None].expand_as(wb))
    assert torch.allclose((deq - wb).abs(), best, atol=1e-7)


def _per_token_int8(x):
    s = x.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(x / s), s


def test_int8_w8a8_linear_matches_independent_integer_product():
    w, x = weight(), torch.randn(9, 256, generator=torch.Generator().manual_seed(3))
    fmt = formats.get("int8")
    parts = fmt.quantize(w, spec("int8"))
    bias = torch.randn(48)
    xq, sx = _per_token_int8(x)
    expected = (xq @ parts["weight"].double().t().float()) * sx * parts["scale"] + bias
    got = fmt.linear(x, parts, tuple(w.shape), spec("int8"), bias)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    # and it approximates the float product
    assert (got - (x @ w.t() + bias)).norm() / (x @ w.t() + bias).norm() < 0.02


def test_w4a8_linear_uses_int8_activations():
    w, x = weight(), torch.randn(9, 256, generator=torch.Generator().manual_seed(4))
    fmt = formats.get("w4a8")
    s = spec("w4a8", 64)
    parts = fmt.quantize(w, s)
    xq, sx = _per_token_int8(x)
    expected = (xq @ fmt.int8_weight(parts, w.shape, s).float().t()) * sx * parts["scale"]
    assert torch.allclose(fmt.linear(x, parts, tuple(w.shape), s, None), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int4", "nvfp4", "mxfp4", "fp8_e4m3"])
def test_weight_only_linear_is_dequantized_matmul(name):
    w, x = weight(), torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    fmt = formats.get(name)
    s = spec(name)
    parts = fmt.quantize(w, s)
    expected = x @ fmt.dequantize(parts, w.shape, s, torch.float32).t()
    assert torch.allclose(fmt.linear(x, parts, tuple(w.shape), s, None), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "int4", "w4a8"])
def test_stochastic_rounding_is_unbiased(name):
    w = weight(n=16, k=128)
    fmt = formats.get(name)
    s = spec(name, 64)
    nearest = fmt.dequantize(fmt.quantize(w, s), w.shape, s, torch.float32)
    runs = [fmt.dequantize(fmt.quantize(w, s, torch.Generator().manual_seed(i)), w.shape, s, torch.float32)
            for i in range(64)]
    mean = torch.stack(runs).mean(0)
    assert (mean - w).abs().mean() < 0.4 * (nearest - w).abs().mean()
    assert not torch.equal(runs[0], runs[1])


def test_bits_per_weight_formula():
    shape = (64, 512)
    assert formats.get("int8").bits_per_weight(shape, spec("int8")) == pytest.approx(8 + 32 / 512)
    assert formats.get("int4").bits_per_weight(shape, spec("int4", 128)) == pytest.approx(4 + 24 / 128)
    assert formats.get("nvfp4").bits_per_weight(shape, spec("nvfp4")) == pytest.approx(4 + 8 / 16 + 32 / (64 * 512))
    assert formats.get("mxfp4").bits_per_weight(shape, spec("mxfp4")) == pytest.approx(4 + 8 / 32)


def test_problems_are_reported():
    assert "does not divide" in formats.get("int4").problem((8, 96), spec("int4", 64))
    assert formats.get("int4").problem((8, 128), spec("int4", 64)) is None
    assert "does not divide" in formats.get("mxfp4").problem((8, 48), spec("mxfp4"))
    assert formats.get("int8").problem((8, 7), spec("int8")) is None
    with pytest.raises(KeyError, match="unknown weight format"):
        formats.get("int3")


@pytest.mark.parametrize("name", ["w4a8", "w4a4", "nvfp4_w4a4"])
def test_weight_only_layers_of_activation_quantizing_formats(name):
    # Modulation layers are quantized weight-only (act_quant False): a dequantized matmul, with
    # and without a low-rank branch (w4a4 recursed forever here once).
    w, x = weight(), torch.randn(5, 256, generator=torch.Generator().manual_seed(6))
    fmt = formats.get(name)
    s = Spec(name, 64, act_quant=False)
    parts = fmt.quantize(w, s)
    expected = x @ fmt.dequantize(parts, w.shape, s, torch.float32).t()
    assert torch.allclose(fmt.linear(x, parts, tuple(w.shape), s, None), expected, atol=1e-5)
    g = torch.Generator().manual_seed(7)
    down, up = torch.randn(256, 4, generator=g), torch.randn(4, w.shape[0], generator=g)
    with_branch = fmt.linear_with_branch(x, parts, tuple(w.shape), s, None, None, down, up)
    assert torch.allclose(with_branch, expected + (x @ down) @ up, atol=1e-4)


def _nearest_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The nearest of +-E2M1 * scale; a tie goes to the even code (magnitudes 0, 1, 2, 4)."""
    grid = torch.cat([E2M1, -E2M1[1:]])
    even = torch.tensor([i % 2 == 0 for i in range(8)] + [i % 2 == 0 for i in range(1, 8)])
    candidates = grid * scale[..., None]
    dist = (x[..., None] - candidates).abs()
    nearest = dist <= dist.min(dim=-1, keepdim=True).values + 1e-6 * scale[..., None]   # ties up to rounding
    pick = (nearest.float() * 2 + (nearest & even).float()).argmax(dim=-1, keepdim=True)
    return candidates.gather(-1, pick).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_w4a4_rounds_activations_to_their_own_nvfp4_grid(dtype):
    """Each token: an fp32 scale amax / (448 * 6), an e4m3 scale per block of 16 and the nearest
    e2m1 value; the product with the NVFP4 weight is that of the decoded values."""
    w = weight()
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(8))
    x[:, 40] *= 30.0                      # an outlier channel
    x[2] = 0.0                            # an all-zero token
    x = x.to(dtype)
    fmt, s = formats.get("nvfp4_w4a4"), spec("nvfp4_w4a4")
    parts = fmt.quantize(w, s)
    bias = torch.randn(48)
    token = (x.float().abs().amax(dim=1) / (448 * 6)).clamp(min=1e-30)
    xb = x.float().reshape(7, 16, 16)
    block = (xb.abs().amax(-1) / 6 / token[:, None]).to(torch.float8_e4m3fn).float() * token[:, None]
    xq = _nearest_grid(xb, block[..., None].expand_as(xb)).reshape(7, 256)
    expected = xq @ fmt.dequantize(parts, w.shape, s, torch.float32).t() + bias
    got = fmt.linear(x, parts, tuple(w.shape), s, bias.to(dtype))
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert torch.allclose(got[2].float(), bias, rtol=tol, atol=tol)
    # activations are quantized (not the W4A16 product) and the result still approximates x @ w^T
    w4a16 = formats.get("nvfp4").linear(x.float(), parts, tuple(w.shape), s, bias)
    assert not torch.allclose(got.float(), w4a16, atol=1e-3)
    exact = x.float() @ w.t() + bias
    assert (got.float() - exact).norm() / exact.norm() < 0.2


def test_activation_labels():
    from comfyui_accel.quant.model import act_label
    assert act_label(spec("nvfp4_w4a4")) == "fp4" and act_label(spec("w4a4")) == "int4"
    assert act_label(spec("fp8_e4m3")) == "fp8" and act_label(spec("w4a8")) == "int8"
    assert act_label(spec("nvfp4")) == "float" and act_label(Spec("nvfp4_w4a4", None, False)) == "float"
