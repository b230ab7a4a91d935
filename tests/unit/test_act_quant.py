"""Per-token int8 activation quantization: Triton (interpreter) against the reference."""
import pytest
import torch

from comfyui_accel.kernels import act_quant, dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference(dtype):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(7, 1500, generator=g) * 3).to(dtype)
    x[4] = 0
    with dispatch.backend("triton"):
        q, s = act_quant.quantize_rows_int8(x)
    qr, sr = act_quant.quantize_rows_int8_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.allclose(s, sr)
    # rounding ties may differ by one code (half-away-from-zero vs half-to-even)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 1e-3


def test_reference_error_bound_and_zero_rows():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.1, 1e-3, 0.0])[:, None]
    q, s = act_quant.quantize_rows_int8_reference(x)
    assert torch.all((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-9)
    assert torch.equal(q[4], torch.zeros(64, dtype=torch.int8))
    assert q.abs().max() == 127
