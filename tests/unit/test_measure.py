"""The measurement toolkit against values computed independently of it."""
import math
import time

import pytest
import torch

from lab import measure
from comfyui_accel import metrics


# ---------------------------------------------------------------- PSNR / SQNR


def test_psnr_of_identical_tensors_is_infinite():
    x = torch.randn(2, 4, 16, 16)
    assert metrics.psnr(x, x.clone()) == math.inf
    assert metrics.sqnr_db(x, x.clone()) == math.inf


def test_psnr_matches_the_formula_for_known_noise():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 64, 64, generator=g)
    # Uniform noise on [-a, a] has variance a**2 / 3; use the realized MSE so the check is exact.
    a = 0.05
    x = ref + (torch.rand(ref.shape, generator=g) * 2 - 1) * a
    mse = ((ref.double() - x.double()) ** 2).mean().item()
    assert mse == pytest.approx(a**2 / 3, rel=0.05)
    assert metrics.psnr(ref, x, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-9)
    # Default data range: the reference's max - min.
    span = (ref.max() - ref.min()).item()
    assert metrics.psnr(ref, x) == pytest.approx(10 * math.log10(span**2 / mse), abs=1e-9)


def test_psnr_needs_a_range_for_a_constant_reference():
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(torch.ones(4, 4), torch.zeros(4, 4))


def test_sqnr_matches_an_independent_computation():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(128, 64, generator=g) * 3
    x = ref + torch.randn(ref.shape, generator=g) * 0.1
    # Signal power 9, noise power 0.01: about 29.5 dB; compare with a plain-Python sum.
    signal = sum(v * v for v in ref.double().flatten().tolist())
    noise = sum((a - b) ** 2 for a, b in zip(ref.double().flatten().tolist(), x.double().flatten().tolist()))
    assert metrics.sqnr_db(ref, x) == pytest.approx(10 * math.log10(signal / noise), abs=1e-9)
    assert metrics.sqnr_db(ref, x) == pytest.approx(10 * math.log10(9 / 0.01), abs=0.3)


# ---------------------------------------------------------------- SSIM


def test_ssim_of_identical_is_one_on_latents_video_and_images():
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(2, 4, 32, 32, generator=g)
    video = torch.randn(1, 16, 5, 24, 24, generator=g)
    image = torch.rand(2, 48, 40, 3, generator=g)
    assert metrics.ssim(latent, latent.clone()) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(video, video.clone()) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim_image(image, image.clone()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_falls_with_noise_and_is_symmetric():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(1, 4, 48, 48, generator=g)
    noise = torch.randn(ref.shape, generator=g)
    scores = [metrics.ssim(ref, ref + s * noise, data_range=8.0) for s in (0.01, 0.1, 0.5, 1.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0.99 and scores[-1] < 0.6
    other = ref + 0.3 * noise
    assert metrics.ssim(ref, other, data_range=8.0) == pytest.approx(metrics.ssim(other, ref, data_range=8.0), abs=1e-12)


def test_ssim_of_two_constant_planes_is_the_luminance_term():
    # Flat planes have zero variance and covariance, so SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1).
    a, b, data_range = 0.3, 0.5, 1.0
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = metrics.ssim(torch.full((1, 1, 20, 20), a), torch.full((1, 1, 20, 20), b), data_range=data_range)
    assert got == pytest.approx(expected, rel=1e-6)


def test_ssim_works_on_planes_smaller_than_the_window():
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(1, 4, 6, 8, generator=g)
    assert metrics.ssim(ref, ref.clone()) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(ref, ref + torch.randn(ref.shape, generator=g)) < 0.9


def test_ssim_image_channels_are_planes():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 32, 32, 3, generator=g)
    noisy = (image + 0.1 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    channel_first = metrics.ssim(image.permute(0, 3, 1, 2), noisy.permute(0, 3, 1, 2), data_range=1.0)
    assert metrics.ssim_image(image, noisy) == pytest.approx(channel_first, abs=1e-12)


# ---------------------------------------------------------------- timing


def test_time_fn_reports_median_min_and_runs():
    result = measure.time_fn(lambda: time.sleep(0.01), warmup=1, repeat=3)
    assert len(result["runs"]) == 3
    assert result["min_s"] <= result["median_s"]
    assert result["min_s"] >= 0.01


def test_compare_timings_ratio_of_a_function_twice_as_slow():
    calls = []
    result = measure.compare_timings(
        lambda: (calls.append("b"), time.sleep(0.05)),
        {"slow": lambda: (calls.append("s"), time.sleep(0.1))},
        warmup=1,
        repeat=5,
    )
    slow = result["variants"]["slow"]
    assert slow["time_ratio"] == pytest.approx(2.0, rel=0.25)
    assert slow["speedup"] == pytest.approx(0.5, rel=0.25)
    assert len(result["baseline"]["runs"]) == len(slow["runs"]) == 5
    # Interleaved: the timed rounds alternate between the two, not five of one then five of the other.
    assert calls[2:] != ["b"] * 5 + ["s"] * 5
    assert sorted(calls[2:4]) == ["b", "s"]


def test_compare_timings_with_the_benchmark_timer_keeps_the_rounds_interleaved():
    calls = []
    result = measure.compare_timings(
        lambda: (calls.append("b"), time.sleep(0.002)),
        {"slow": lambda: (calls.append("s"), time.sleep(0.004))},
        warmup=0,
        repeat=3,
        autorange=True,
    )
    slow = result["variants"]["slow"]
    assert slow["time_ratio"] == pytest.approx(2.0, rel=0.35)
    assert len(result["baseline"]["runs"]) == len(slow["runs"]) == 3
    assert 0.002 <= result["baseline"]["median_s"] < 0.004   # per call, not per block of calls
    # Each round times many calls of one, then of the other, the order rotated: b..s..s..b..b..s
    turns = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert turns == ["b", "s", "b", "s"]


def test_speed_is_a_ratio_of_medians_with_the_per_round_range():
    t = measure.speed([1.0, 1.2, 0.9], [0.5, 0.8, 0.3])
    assert t["median_s"] == 0.5 and (t["min_s"], t["max_s"]) == (0.3, 0.8)
    assert abs(t["speedup"] - 1.0 / 0.5) < 1e-9
    assert abs(t["ratio_min"] - 1.5) < 1e-9 and abs(t["ratio_max"] - 3.0) < 1e-9


# ---------------------------------------------------------------- memory


def test_weight_bytes_counts_storage_dtypes_once():
    linear = torch.nn.Linear(64, 32)  # fp32: (64*32 + 32) * 4 bytes
    assert measure.weight_bytes(linear) == (64 * 32 + 32) * 4
    assert measure.weight_bytes(linear.to(torch.bfloat16)) == (64 * 32 + 32) * 2
    packed_int4 = {"w": torch.zeros(32, 32, dtype=torch.uint8), "scale": torch.ones(32, dtype=torch.float16)}
    assert measure.weight_bytes(packed_int4) == 32 * 32 + 32 * 2  # two 4-bit weights per byte
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert measure.weight_bytes(tied) == 8 * 8 * 4
    assert measure.weight_bytes(tied.state_dict()) == 8 * 8 * 4
    module = torch.nn.BatchNorm1d(16)  # buffers count: running mean/var fp32, num_batches_tracked int64
    assert measure.weight_bytes(module) == 16 * 4 * 4 + 8


def test_weight_bytes_opens_tensor_subclasses():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a, b = torch.zeros(16, dtype=torch.int8), torch.zeros(16, dtype=torch.int8)
    assert measure.weight_bytes({"w": two_tensor.TwoTensor(a, b)}) == 32


def test_peak_rss_grows_by_what_a_fresh_process_allocates():
    assert measure.peak_rss_bytes() > 10 * 2**20
    # 50M fp32 ones = 200 MB touched in the child; allow for allocator slack.
    grew = measure.peak_rss_increase_bytes(torch.ones, 50_000_000)
    assert 190e6 < grew < 260e6
