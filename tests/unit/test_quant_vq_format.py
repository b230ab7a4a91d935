"""quant/vq_format.py: VQ weight formats (vq2, vq3, vq2x8) in QuantizeModel's format registry."""
import pytest
import torch

from comfyui_accel.quant import formats, vq_format
from comfyui_accel.quant.formats import Spec


def weight(n=64, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5 * (1 + torch.rand(n, 1, generator=g) * 4)  # rows of mixed scale
    w[5] = 0.0
    return w


def sqnr(w, d):
    return (10 * torch.log10(w.square().sum() / (w - d).square().sum())).item()


def test_registered_next_to_the_other_formats():
    assert {"vq2", "vq3", "vq2x8"} <= set(formats.FORMATS)
    assert formats.get("vq2").problem((8, 12), Spec("vq2")) is None
    assert "divisible by 8" in formats.get("vq3").problem((8, 12), Spec("vq3"))
    assert "divisible by 8" in formats.get("vq2x8").problem((8, 12), Spec("vq2x8"))
    assert formats.get("vq2x8").problem((8, 16), Spec("vq2x8")) is None


def test_uint12_packing_round_trips():
    idx = torch.randint(0, 4096, (5, 10), generator=torch.Generator().manual_seed(1))
    packed = vq_format.pack_uint12(idx)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 15)
    assert torch.equal(vq_format.unpack_uint12(packed), idx)


@pytest.mark.parametrize("name,bits,min_sqnr,n", [("vq2", 2, 8.0, 64), ("vq3", 3, 13.0, 48)])
def test_dequantized_weight_is_scaled_codes_with_the_expected_error(name, bits, min_sqnr, n):
    fmt, spec = formats.get(name), Spec(name)
    w = weight(n=n)
    parts = fmt.quantize(w, spec)
    deq = fmt.dequantize(parts, w.shape, spec, torch.float32)
    # Structure: every group of 4 weights is one stored code times its row's stored scale.
    idx = fmt.indices(parts)
    assert idx.max() < 2 ** (4 * bits)
    expect = parts["codebook"].float()[idx].reshape(w.shape) * parts["scale"].float()[:, None]
    assert torch.equal(deq, expect)
    assert torch.all(deq[5] == 0)
    # Each sub-vector got its nearest code (in the row-normalised space).
    scale = parts["scale"].float()
    v = (w / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).reshape(-1, 4)
    d = torch.cdist(v.double(), parts["codebook"].double())
    chosen = d.gather(1, idx.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= d.min(1).values * (1 + 1e-5) + 1e-6)
    # Quality: VQ of Gaussian-like weights at 2 / 3 bits. With many vectors per code (vq2 here: 32)
    # the codebook carries little information and the Shannon bound (6.02 dB per bit) holds.
    assert min_sqnr < sqnr(w, deq)
    if bits == 2:
        assert sqnr(w, deq) < 6.03 * bits
    n, k = w.shape
    codes = 2 ** (4 * bits)  # indices + fp16 codebook + fp16 row scales
    assert fmt.bits_per_weight((n, k), spec) == pytest.approx((n * k * bits + codes * 4 * 16 + n * 16) / (n * k))
    assert fmt.bits_per_weight((3072, 3072), spec) == pytest.approx(bits, abs=0.05)  # a real layer's size


def test_more_bits_more_quality_and_determinism():
    w = weight(n=32, seed=3)
    out = {}
    for name in ("vq2", "vq3"):
        fmt, spec = formats.get(name), Spec(name)
        a, b = fmt.quantize(w, spec), fmt.quantize(w, spec)
        assert all(torch.equal(a[key], b[key]) for key in a)
        out[name] = sqnr(w, fmt.dequantize(a, w.shape, spec, torch.float32))
    assert out["vq3"] > out["vq2"] + 3
    # And vq2 at 2 bits beats nothing-fancy 2-bit scalar rounding per row (4 levels).
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 1.5
    scalar = (w / scale + 1.5).round().clamp(0, 3).sub(1.5) * scale
    assert out["vq2"] > sqnr(w, scalar)


@pytest.mark.parametrize("name", ["vq2", "vq2x8"])
def test_vq_layer_runs_and_survives_a_checkpoint_round_trip(tmp_path, name):
    from comfyui_accel.quant import checkpoint
    from comfyui_accel.quant.linear import QuantLinear
    from comfyui_accel.quant.qweight import QuantWeight
    w = weight(n=32, k=128, seed=4)
    qw = QuantWeight.quantize(w, Spec(name), torch.bfloat16)
    x = torch.randn(3, 128)
    out = QuantLinear(qw, None)(x)
    assert torch.allclose(out, x @ qw.dequantize(torch.float32).t(), atol=1e-5)
    tensors, meta = checkpoint.state_to_save({"blocks.0.q.weight": qw, "norm.weight": torch.ones(4)})
    path = str(tmp_path / "vq.safetensors")
    checkpoint.write_atomic(tensors, meta, path)
    _, packed, _, _ = checkpoint.load_quantized_state(path)
    back = packed["blocks.0.q"]
    assert back.spec.format == name
    assert torch.equal(back.dequantize(torch.float32), qw.dequantize(torch.float32))


def test_vq2x8_is_two_residual_levels_of_8_weight_codes():
    fmt, spec = formats.get("vq2x8"), Spec("vq2x8")
    w = weight(n=32, k=512, seed=5)
    parts = fmt.quantize(w, spec)
    idx = fmt.indices(parts).reshape(32, 64, 2)
    book = parts["codebook"].float()
    assert book.shape == (512, 8) and idx.max() < 256
    first, second = book[:256][idx[..., 0]], book[256:][idx[..., 1]]
    scale = parts["scale"].float()
    deq = fmt.dequantize(parts, w.shape, spec, torch.float32)
    assert torch.equal(deq, (first + second).reshape(w.shape) * scale[:, None])
    # The second level quantizes what the first left over: its code is the nearest to that residual.
    v = (w / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).reshape(32, 64, 8)
    d = torch.cdist((v - first).reshape(-1, 8).double(), book[256:].double())
    chosen = d.gather(1, idx[..., 1].reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= d.min(1).values * (1 + 1e-5) + 1e-6)
    assert sqnr(w, deq) > 8.0
    assert fmt.bits_per_weight(w.shape, spec) == pytest.approx((32 * 512 * 2 + 512 * 8 * 16 + 32 * 16) / (32 * 512))


def activations(m, k, seed):
    """Inputs whose channels differ in scale (log-normal, as in real DiT layers), partly correlated."""
    g = torch.Generator().manual_seed(seed)
    channel = torch.exp(torch.randn(k, generator=torch.Generator().manual_seed(7)))
    mix = torch.randn(8, k, generator=torch.Generator().manual_seed(8))
    return (torch.randn(m, 8, generator=g) @ mix * 0.5 + torch.randn(m, k, generator=g)) * channel


@pytest.mark.parametrize("name", ["vq2", "vq2x8"])
def test_calibrated_codes_lower_the_output_error_on_held_out_inputs(name):
    fmt, spec = formats.get(name), Spec(name)
    w = weight(n=48, k=256, seed=6)
    calib, held_out = activations(256, 256, 1), activations(512, 256, 2)
    free = fmt.dequantize(fmt.quantize(w, spec), w.shape, spec, torch.float32)
    refined = fmt.dequantize(fmt.quantize_for_inputs(w, spec, calib.square().mean(0)), w.shape, spec, torch.float32)
    ref = held_out @ w.t()
    err_free = (ref - held_out @ free.t()).square().sum()
    err_refined = (ref - held_out @ refined.t()).square().sum()
    assert err_refined < 0.5 * err_free  # at least 3 dB better output SQNR on inputs it never saw
    # The weights themselves get worse: the error moved to the channels the inputs barely use.
    assert sqnr(w, refined) < sqnr(w, free)


def test_quantize_model_feeds_the_calibration_mean_square_to_the_format():
    from comfyui_accel.quant import calibrate
    from comfyui_accel.quant.model import quantize_layer
    w = weight(n=16, k=128, seed=9)
    x = activations(96, 128, 3)
    stats = calibrate.LayerStats(128, calibrate.Recorder(), rows_per_call=8, max_rows=32, seed=0)
    for chunk in x.reshape(3, 32, 128):
        stats.observe(chunk)
    # Every token counts, not only the kept sample of rows.
    assert torch.allclose(stats.channel_mean_square(), x.square().mean(0), rtol=1e-5)
    qw = quantize_layer(w, Spec("vq2"), torch.float32, stats)
    direct = formats.get("vq2").quantize_for_inputs(w, Spec("vq2"), x.square().mean(0))
    assert torch.equal(qw.parts["weight"], direct["weight"])
    assert not torch.equal(qw.parts["weight"], formats.get("vq2").quantize(w, Spec("vq2"))["weight"])
