"""The low-rank branch math (quant/lowrank.py) on plain tensors: SVD factors, the SVDQuant split,
error fitting, and LoRA factors recovered and appended without requantization."""
import pytest
import torch

from comfyui_accel.metrics import sqnr_db
from comfyui_accel.quant import formats, lowrank, qweight, svdquant
from comfyui_accel.quant.qweight import QuantWeight

W4A4 = formats.Spec("w4a4", 64, True)


def outlier_layer(seed=0, n=96, k=256, m=256):
    """A weight with a few strong directions and inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w += 0.5 * torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g) / k ** 0.5
    x = torch.randn(m, k, generator=g)
    hot = torch.randperm(k, generator=g)[:4]
    x[:, hot] *= 40
    return w, x


@pytest.mark.parametrize("method", lowrank.METHODS)
def test_svd_factors_are_the_best_rank_r_approximation(method):
    w, _ = outlier_layer()
    down, up, energy = lowrank.svd_factors(w, 16, method)
    assert down.shape == (256, 16) and up.shape == (16, 96)
    s = torch.linalg.svdvals(w)
    best_err = s[16:].pow(2).sum().sqrt()
    err = torch.linalg.matrix_norm(w - up.t() @ down.t())
    assert err <= best_err * 1.02
    assert abs(energy - (s[:16].pow(2).sum() / s.pow(2).sum()).item()) < 0.01


def test_svdquant_split_beats_plain_w4a4_on_outliers():
    w, x = outlier_layer(1)
    smooth = qweight.smoothing_factors(x.abs().amax(0), w, 0.5)
    branch, energy = lowrank.make_branch(w, 32, smooth)
    assert 0 < energy < 1
    svdq = lowrank.quantize_branched(w, branch, W4A4, torch.float32)
    plain = QuantWeight.quantize(w, W4A4, torch.float32)
    ref = x @ w.t()
    assert svdq.rank == 32 and torch.equal(svdq.parts["lora_down"], branch.down)
    assert sqnr_db(ref, svdq.linear(x, None)) > sqnr_db(ref, plain.linear(x, None)) + 6
    # dequantize() is the weight that linear() computes with (up to activation rounding)
    assert sqnr_db(w, svdq.dequantize(torch.float32)) > sqnr_db(w, plain.dequantize(torch.float32))


def test_fit_error_branch_reduces_the_error():
    w, _ = outlier_layer(2)
    qw = QuantWeight.quantize(w, formats.Spec("int4", 64, False), torch.float32)
    fitted, energy = lowrank.fit_error_branch(w, qw, 32)
    assert torch.equal(fitted.parts["weight"], qw.parts["weight"])   # no requantization
    assert sqnr_db(w, fitted.dequantize(torch.float32)) > sqnr_db(w, qw.dequantize(torch.float32)) + 0.5
    assert 0 < energy < 1


def test_lowrank_of_recovers_the_rank():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(96, 5, generator=g) @ torch.randn(5, 256, generator=g)
    down, up = lowrank.lowrank_of(delta, 64, 1e-4 * delta.norm().item())
    assert down.shape == (256, 5) and up.shape == (5, 96)
    assert torch.allclose(up.t() @ down.t(), delta, atol=1e-4 * delta.abs().max().item())
    assert lowrank.lowrank_of(torch.randn(96, 256, generator=g), 32, 1e-3) is None


def test_absorb_patch_appends_lora_and_keeps_the_residual():
    w, _ = outlier_layer(4)
    smooth = torch.rand(256) + 0.5
    branch, _ = lowrank.make_branch(w, 16, smooth)
    qw = lowrank.quantize_branched(w, branch, W4A4, torch.float32)
    g = torch.Generator().manual_seed(5)
    lora = 0.05 * torch.randn(96, 4, generator=g) @ torch.randn(4, 256, generator=g)
    target = qw.dequantize(torch.float32) + lora
    new = lowrank.absorb_patch(qw, target)
    assert new.rank == 20
    for part in ("weight", "group_scale", "scale", "smooth"):
        assert torch.equal(new.parts[part], qw.parts[part])
    # bf16 factors: within bf16 rounding of the LoRA itself
    assert sqnr_db(lora, new.dequantize(torch.float32) - qw.dequantize(torch.float32)) > 40
    # a patch that is not low rank: requantized around the same branch
    full = qw.dequantize(torch.float32) + 0.01 * torch.randn(96, 256, generator=g)
    requant = lowrank.absorb_patch(qw, full)
    assert requant.rank == 16 and not torch.equal(requant.parts["weight"], qw.parts["weight"])
    assert sqnr_db(full, requant.dequantize(torch.float32)) > 15


def test_select_rows_of_a_branched_weight():
    w, _ = outlier_layer(6)
    branch, _ = lowrank.make_branch(w, 8, None)
    qw = lowrank.quantize_branched(w, branch, formats.Spec("int8"), torch.float32)
    rows = torch.tensor([0, 5, 17, 95])
    assert torch.allclose(qw.select_rows(rows).dequantize(torch.float32), qw.dequantize(torch.float32)[rows])


def test_best_smoothing_picks_the_grid_alpha_with_the_best_layer_output():
    """The searched factors are one grid alpha's, and no grid alpha gives a better output SQNR
    of the full layer (branch + 4-bit residual) on the rows, computed here independently."""
    w, x = outlier_layer(3)
    absmax = x.abs().amax(0)
    chosen = svdquant.best_smoothing(w, absmax, x, 16, "full", W4A4, torch.float32)

    def layer_db(smooth):
        branch, _ = lowrank.make_branch(w, 16, smooth, "full")
        y = lowrank.quantize_branched(w, branch, W4A4, torch.float32).linear(x, None)
        return sqnr_db(x @ w.t(), y.float())

    grid = {a: qweight.smoothing_factors(absmax, w, a) for a in svdquant.ALPHA_GRID}
    picked = [a for a, s in grid.items() if torch.equal(s, chosen)]
    assert len(picked) == 1
    scores = {a: layer_db(s) for a, s in grid.items()}
    assert scores[picked[0]] >= max(scores.values()) - 1e-6
    assert scores[picked[0]] > min(scores.values())   # the grid matters on this layer
