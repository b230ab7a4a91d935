"""int8 GEMM: quantizers, the torch._int_mm reference, and the Triton kernel in the interpreter."""
import os

# The interpreter must be chosen before the kernel is jitted (tests/conftest.py sets it too).
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from comfyui_accel.kernels import dispatch  # noqa: E402
from comfyui_accel.kernels import int8_gemm as gemm  # noqa: E402
from comfyui_accel.kernels.quant_primitives import (  # noqa: E402
    dequantize_int8,
    quantize_per_channel_int8,
    quantize_per_token_int8,
)

needs_triton = pytest.mark.skipif(not dispatch.triton_available(), reason="Triton does not import")

# Shapes below, at, and across the interpreter's 16-wide tiles: M=1, 7, 33; K=40, 72; N=24, 100.
SHAPES = [(1, 40, 24), (7, 72, 100), (33, 40, 24), (33, 72, 100), (16, 16, 16)]

# The int32 sums are exact on both paths, so they differ only in the fp32 epilogue's rounding and
# the final cast. The interpreter casts fp32 -> bf16 by truncation (torch rounds to nearest), so a
# bf16 result may be one unit in the last place off: rtol 2**-7 covers that, not a wrong sum.
TOLERANCE = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


def _operands(M, K, N, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    xq, x_scale = quantize_per_token_int8(x)
    wq, w_scale = quantize_per_channel_int8(w)
    return xq, x_scale, wq, w_scale, b


# ---------------------------------------------------------------- quantizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_round_trip_within_half_a_step(dtype):
    x = (torch.randn(5, 9, 64) * torch.linspace(0.01, 30, 64)).to(dtype)  # rows with varied ranges
    q, scale = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (5, 9, 1)
    x32 = x.float()
    torch.testing.assert_close(scale, x32.abs().amax(-1, keepdim=True) / 127)
    error = (x32 - dequantize_int8(q, scale)).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()
    assert q.abs().max() == 127 and q.min() >= -127


def test_per_channel_scales_are_per_output_row():
    w = torch.randn(24, 40) * torch.rand(24, 1) * 5
    q, scale = quantize_per_channel_int8(w)
    assert q.shape == (24, 40) and scale.shape == (24,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert ((w - dequantize_int8(q, scale[:, None])).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()


def test_zero_rows_quantize_to_zeros_with_a_finite_scale():
    x = torch.randn(3, 16)
    x[1] = 0
    q, scale = quantize_per_token_int8(x)
    assert (q[1] == 0).all() and torch.isfinite(scale).all() and (scale > 0).all()


def test_quantizer_leaves_its_input_alone():
    x = torch.randn(4, 32)
    before = x.clone()
    quantize_per_token_int8(x)
    assert torch.equal(x, before)


# ---------------------------------------------------------------- reference


def _exact_int32(xq, wq):
    return xq.to(torch.int64) @ wq.to(torch.int64).t()


@pytest.mark.parametrize("M,K,N", [(1, 1, 8), (17, 1, 3), (1, 8, 8), (16, 40, 24), (33, 72, 100), (0, 8, 8), (4, 0, 8)])
def test_int32_matmul_is_exact_on_any_shape(M, K, N):
    # K == 1 is where CPU torch._int_mm returns garbage for a transposed mat2.
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    out = gemm.int8_matmul_int32(xq, wq)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    assert torch.equal(out.long(), _exact_int32(xq, wq))


@pytest.mark.parametrize("M,K,N", [(1, 40, 24), (7, 72, 100), (16, 13, 5), (33, 8, 9)])
def test_padding_for_cublas_rules_is_exact(M, K, N):
    # The CUDA path pads to M > 16 and K, N multiples of 8; CPU _int_mm takes the padded shapes too.
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    assert torch.equal(gemm._int_mm_padded(xq, wq).long(), _exact_int32(xq, wq))


def test_reference_matches_dequantized_float_math():
    xq, x_scale, wq, w_scale, b = _operands(33, 72, 100)
    expected = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double() + b.double()
    out = gemm.int8_gemm_reference(xq, x_scale, wq, w_scale, b)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


def test_int8_linear_is_close_to_the_float_linear():
    x = torch.randn(2, 20, 64)
    w = torch.randn(48, 64) / 8
    b = torch.randn(48)
    wq, w_scale = quantize_per_channel_int8(w)
    out = gemm.int8_linear(x, wq, w_scale, b)
    assert out.shape == (2, 20, 48) and out.dtype == x.dtype
    exact = torch.nn.functional.linear(x, w, b)
    sqnr_db = 10 * torch.log10(exact.pow(2).sum() / (out - exact).pow(2).sum())
    assert sqnr_db > 30  # W8A8 on Gaussian data lands near 35 dB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunked_linear_equals_one_pass(monkeypatch, dtype):
    # Large CPU inputs run in row chunks; every row's result must be the one a single pass gives.
    x = torch.randn(3, 101, 64).to(dtype)
    wq, w_scale = quantize_per_channel_int8(torch.randn(48, 64))
    b = torch.randn(48)
    whole = gemm.int8_linear_reference(x, wq, w_scale, b)
    monkeypatch.setattr(gemm, "_CHUNK_BYTES", 64 * 4 * 64)  # 64-row chunks: 5 of them, the last short
    chunked = gemm.int8_linear_reference(x, wq, w_scale, b)
    assert chunked.shape == whole.shape == (3, 101, 48) and chunked.dtype == dtype
    assert torch.equal(chunked, whole)
    empty = gemm.int8_linear_reference(x[:, :0], wq, w_scale, b)  # no tokens: no chunks, no division by zero
    assert empty.shape == (3, 0, 48) and empty.dtype == dtype


def test_dispatcher_picks_the_reference_on_cpu_tensors(monkeypatch):
    called = []
    monkeypatch.setattr(gemm, "int8_gemm_triton", lambda *a, **k: called.append("triton"))
    monkeypatch.setattr(gemm, "int8_gemm_reference", lambda *a, **k: called.append("reference"))
    gemm.int8_gemm(*_operands(7, 40, 24))
    assert called == ["reference"]


# ---------------------------------------------------------------- Triton (interpreter)


@needs_triton
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_matches_reference(M, K, N, out_dtype, with_bias):
    xq, x_scale, wq, w_scale, b = _operands(M, K, N, seed=M * 1000 + K + N, bias=with_bias)
    expected = gemm.int8_gemm_reference(xq, x_scale, wq, w_scale, b, out_dtype)
    with dispatch.backend("triton"):
        out = gemm.int8_gemm(xq, x_scale, wq, w_scale, b, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[out_dtype])


@needs_triton
def test_triton_int32_accumulation_does_not_overflow_narrower_types():
    # All +-127 with K=72: sums reach 72 * 127**2 ~ 1.2e6, beyond int16; a narrow accumulator would wrap.
    M, K, N = 17, 72, 24
    xq = torch.full((M, K), 127, dtype=torch.int8)
    wq = torch.where(torch.rand(N, K) < 0.9, 127, -127).to(torch.int8)
    ones_m, ones_n = torch.ones(M, 1), torch.ones(N)
    with dispatch.backend("triton"):
        out = gemm.int8_gemm(xq, ones_m, wq, ones_n)
    assert torch.equal(out.double(), _exact_int32(xq, wq).double())


@needs_triton
def test_triton_takes_strided_weights():
    # A weight kept as [K, N] and viewed as [N, K] (strides (1, N)) must give the same answer.
    xq, x_scale, wq, w_scale, b = _operands(7, 40, 24)
    wq_strided = wq.t().contiguous().t()
    expected = gemm.int8_gemm_reference(xq, x_scale, wq, w_scale, b)
    with dispatch.backend("triton"):
        out = gemm.int8_gemm(xq, x_scale, wq_strided, w_scale, b)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_int8_linear_matches_reference(dtype):
    x = torch.randn(2, 9, 40).to(dtype)
    wq, w_scale = quantize_per_channel_int8(torch.randn(24, 40))
    b = torch.randn(24).to(dtype)
    expected = gemm.int8_linear_reference(x, wq, w_scale, b)
    with dispatch.backend("triton"):
        out = gemm.int8_linear(x, wq, w_scale, b)
    assert out.shape == (2, 9, 24) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


@needs_triton
@pytest.mark.parametrize("case", ["int32 output", "float operands", "inner dims differ", "scale length"])
def test_forced_triton_refuses_unsupported_input(case):
    xq, x_scale, wq, w_scale, b = _operands(7, 40, 24)
    args = dict(xq=xq, x_scale=x_scale, wq=wq, w_scale=w_scale, bias=b, out_dtype=torch.float32)
    if case == "int32 output":
        args["out_dtype"] = torch.int32
    elif case == "float operands":
        args["xq"] = xq.float()
    elif case == "inner dims differ":
        args["wq"] = wq[:, :32]
    else:
        args["w_scale"] = w_scale[:10]
    with dispatch.backend("triton"), pytest.raises(RuntimeError, match="does not support"):
        gemm.int8_gemm(**args)


def test_kernels_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from comfyui_accel.kernels import dispatch, int8_gemm as g, quant_primitives as qp\n"
        "assert not dispatch.triton_available()\n"
        "wq, ws = qp.quantize_per_channel_int8(torch.randn(8, 16))\n"
        "print(tuple(g.int8_linear(torch.randn(3, 16), wq, ws).shape))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 8)"
