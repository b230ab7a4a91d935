"""W4A4 with a fused low-rank branch: the Triton kernels (interpreter) against the PyTorch
references, and the references against plain float math."""
import pytest
import torch

from comfyui_accel.kernels import dispatch, lowbit_gemm, lowrank_gemm
from comfyui_accel.quant import formats
from comfyui_accel.quant.qweight import QuantWeight


def _data(seed, m=37, k=128, n=48, r=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * (1 + 9 * torch.rand(k, generator=g))).to(dtype)
    inv = torch.rand(k, generator=g) + 0.5
    down = torch.randn(k, r, generator=g).to(torch.bfloat16)
    up = torch.randn(r, n, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    return x, inv, down, up, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth,branch", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("seed", [10, 11])
def test_act_quant_triton_matches_reference(dtype, smooth, branch, seed):
    x, inv, down, _, _ = _data(seed + 2 * smooth + 4 * branch, dtype=dtype)
    inv = inv if smooth else None
    down = down if branch else None
    q0, s0, la0 = lowrank_gemm.quantize_act_4bit_reference(x, inv, down, 64)
    with dispatch.backend("triton"):
        q1, s1, la1 = lowrank_gemm.quantize_act_4bit(x, inv, down, 64)
    assert q1.dtype == torch.int8 and q1.shape == x.shape
    assert torch.allclose(s1, s0, rtol=1e-6)
    # rounding ties may differ (half away from zero vs half to even; bf16 inputs hit exact halves
    # more often): one code step of the group at most, and rarely
    diff = (q1.int() - q0.int()).abs()
    assert (diff > 0).float().mean() < 1e-2 and diff.max() <= 17
    if branch:
        assert torch.allclose(la1, la0, rtol=1e-4, atol=1e-4 * la0.abs().max().item())
    else:
        assert la1 is None


def test_act_quant_reference_is_two_level_4bit():
    x, inv, down, _, _ = _data(1)
    q, s, la = lowrank_gemm.quantize_act_4bit_reference(x, inv, down, 64)
    xs = x * inv
    assert torch.allclose(la, xs @ down.float(), rtol=1e-4, atol=1e-3)
    groups = q.int().reshape(q.shape[0], -1, 64)
    # every group is g * c with one integer g in 1..17 and codes |c| <= 7: take the largest such g
    g = torch.zeros(groups.shape[:2] + (1,))
    for cand in range(1, 18):
        ok = ((groups % cand == 0) & (groups.abs() <= 7 * cand)).all(-1, keepdim=True)
        g = torch.where(ok, torch.full_like(g, cand), g)
    assert (g > 0).all()
    # the error is at most half a step of that group (a step is never finer than g * token scale)
    step = g * s[:, :, None]
    err = (xs.reshape(groups.shape) - groups.float() * s[:, :, None]).abs()
    assert (err <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_epilogue_triton_matches_reference(out_dtype):
    x, inv, down, up, w = _data(2)
    qw = QuantWeight.quantize(w, formats.Spec("w4a4", 64, True), torch.float32)
    q, s, la = lowrank_gemm.quantize_act_4bit_reference(x, inv, down, 64)
    bias = torch.randn(w.shape[0])
    args = (q, s, qw.parts["weight"], qw.parts["group_scale"], qw.parts["scale"], 64, bias, out_dtype, la, up)
    ref = lowbit_gemm.w4a8_gemm_reference(*args)
    with dispatch.backend("triton"):
        out = lowbit_gemm.w4a8_gemm(*args)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert out.dtype == out_dtype
    assert torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    # the epilogue really adds the branch
    plain = lowbit_gemm.w4a8_gemm_reference(*args[:8])
    assert torch.allclose(ref.float() - plain.float(), (la @ up.float()).to(out_dtype).float(),
                          rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_w4a4_linear_equals_float_math_on_the_quantized_values():
    x, inv, down, up, w = _data(3)
    qw = QuantWeight.quantize(w, formats.Spec("w4a4", 64, True), torch.float32)
    q, s, _ = lowrank_gemm.quantize_act_4bit_reference(x, inv, None, 64)
    expect = (q.float() * s) @ (qw.fmt.int8_weight(qw.parts, w.shape, qw.spec).float()
                                * qw.parts["scale"][:, None]).t() + ((x * inv) @ down.float()) @ up.float()
    out = lowrank_gemm.w4a4_linear(x, qw.parts["weight"], qw.parts["group_scale"], qw.parts["scale"], 64,
                                   None, inv, down, up)
    assert torch.allclose(out, expect, rtol=1e-4, atol=1e-4 * expect.abs().max().item())
