"""4-bit packing and the FP4/E8M0 codecs, checked against their definitions."""
import torch

from comfyui_accel.kernels import lowbit

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_pack_unpack_is_exact_and_low_nibble_first():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 6, 34), generator=g, dtype=torch.uint8)
    packed = lowbit.pack_int4(codes)
    assert packed.shape == (5, 6, 17) and packed.dtype == torch.uint8
    assert torch.equal(lowbit.unpack_int4(packed), codes)
    # element 0 in the low nibble, element 1 in the high nibble
    assert lowbit.pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]


def test_e2m1_decode_table():
    vals = lowbit.e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert vals[:8].tolist() == E2M1
    assert vals[8:].tolist() == [-v for v in E2M1]


def test_e2m1_encode_is_nearest_value_with_saturation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, generator=g) * 3
    got = lowbit.e2m1_decode(lowbit.e2m1_encode(x))
    grid = torch.tensor(E2M1 + [-v for v in E2M1[1:]])
    nearest_err = (x[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.allclose((x - got).abs(), nearest_err)
    assert got.abs().max() <= 6.0
    assert torch.equal(torch.sign(got[got != 0]), torch.sign(x[got != 0]))


def test_e2m1_ties_go_to_even_code():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]
    assert lowbit.e2m1_decode(lowbit.e2m1_encode(ties)).tolist() == expected


def test_e8m0_ceil_is_smallest_power_of_two_not_below():
    s = torch.tensor([1e-6, 0.3, 0.5, 1.0, 1.5, 7.9, 1024.0])
    dec = lowbit.e8m0_decode(lowbit.e8m0_encode_ceil(s))
    assert torch.all(dec >= s) and torch.all(dec < 2 * s)
    assert torch.equal(torch.log2(dec), torch.round(torch.log2(dec)))
