"""4-bit weight matmuls: Triton kernels (interpreter) against the PyTorch references."""
import pytest
import torch

from comfyui_accel.kernels import dispatch, lowbit
from comfyui_accel.kernels.quant_primitives import quantize_per_token_int8
from comfyui_accel.kernels import lowbit_gemm


def packed_weight(code, n, k, g, block):
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = lowbit.pack_int4(codes)
    nb = k // block
    if code == "int4":
        scale = (torch.rand(n, nb, generator=g) * 0.02 + 0.001).half()
        zero = torch.randint(0, 16, (n, nb), generator=g, dtype=torch.uint8)
        return packed, scale, zero, None
    if code == "nvfp4":
        scale = (torch.rand(n, nb, generator=g) * 4 + 0.01).to(torch.float8_e4m3fn)
        return packed, scale, None, torch.tensor(0.013)
    return packed, torch.randint(118, 128, (n, nb), generator=g, dtype=torch.uint8), None, None


@pytest.mark.parametrize("code,block", [("int4", 64), ("int4", 32), ("nvfp4", 16), ("mxfp4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowbit_linear_triton_matches_reference(code, block, dtype):
    g = torch.Generator().manual_seed(hash((code, block, str(dtype))) % 2**31)
    m, n, k = 21, 37, 192
    packed, scale, zero, gscale = packed_weight(code, n, k, g, block)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = lowbit_gemm.lowbit_linear_reference(x.float(), code, packed, scale, zero, gscale, block, bias.float())
    with dispatch.backend("triton"):
        out = lowbit_gemm.lowbit_linear(x, code, packed, scale, zero, gscale, block, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_fp4_decoders_read_the_codes_as_defined():
    # one block per row, code 1 (0.5) everywhere: NVFP4 value = 0.5 * e4m3 scale * global
    packed = torch.full((2, 8), 0x11, dtype=torch.uint8)
    scale = torch.tensor([[2.0], [0.25]]).to(torch.float8_e4m3fn)
    w = lowbit_gemm.dequant_fp4(packed, scale, 16, torch.tensor(3.0))
    assert torch.equal(w, torch.tensor([[3.0] * 16, [0.375] * 16]))
    e8m0 = torch.tensor([[128], [125]], dtype=torch.uint8)   # 2^1, 2^-2
    packed = torch.full((2, 16), 0x99, dtype=torch.uint8)    # code 9 = -0.5
    assert torch.equal(lowbit_gemm.dequant_fp4(packed, e8m0, 32), torch.tensor([[-1.0] * 32, [-0.125] * 32]))


@pytest.mark.parametrize("block", [64, 128])
def test_w4a8_triton_is_exact(block):
    g = torch.Generator().manual_seed(block)
    m, n, k = 19, 33, 256
    packed = lowbit.pack_int4(torch.randint(1, 16, (n, k), generator=g, dtype=torch.uint8))
    group_scale = torch.randint(1, 18, (n, k // block), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, generator=g) * 0.01
    xq, xs = quantize_per_token_int8(torch.randn(m, k, generator=g))
    bias = torch.randn(n, generator=g)
    ref = lowbit_gemm.w4a8_gemm_reference(xq, xs, packed, group_scale, scale, block, bias)
    with dispatch.backend("triton"):
        out = lowbit_gemm.w4a8_gemm(xq, xs, packed, group_scale, scale, block, bias)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    # the int8 weight is exact: compare with an int64 product
    w8 = lowbit_gemm.w4a8_int8_weight(packed, group_scale, block)
    assert w8.abs().max() <= 119
    exact = (xq.long() @ w8.long().t()).double() * xs.double().reshape(-1, 1) * scale.double() + bias.double()
    assert torch.allclose(ref.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_triton_matches_reference(wdtype, dtype):
    g = torch.Generator().manual_seed(7)
    m, n, k = 18, 35, 160
    if wdtype == torch.int8:
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) * 0.01
    else:
        weight = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)
        scale = torch.tensor(0.003)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = lowbit_gemm.w8a16_linear_reference(x.float(), weight, scale, bias.float())
    with dispatch.backend("triton"):
        out = lowbit_gemm.w8a16_linear(x, weight, scale, bias)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and torch.allclose(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_w8a16_reference_fused_cpu_path_matches_dequantized_matmul():
    # few bf16 rows take ATen's fused int8-weight kernel; it must agree with the plain definition
    g = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (64, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(64, generator=g) * 0.01
    bias = torch.randn(64, generator=g)
    for rows in (2, 300):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        ref = torch.nn.functional.linear(x.float(), weight.float() * scale[:, None], bias)
        out = lowbit_gemm.w8a16_linear_reference(x, weight, scale, bias.bfloat16())
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).norm() / ref.norm() < 0.01
