"""The projection's formulas (lab/bench/projection.py) against independent figures: published
parameter counts, the bytes our quantizers really store, and roofline arithmetic."""
import math

import pytest
import torch

from lab.bench import projection
from comfyui_accel.quant import formats


@pytest.mark.parametrize("spec, published, tolerance", [
    (projection.flux_spec(), 11.9e9, 0.01),          # FLUX.1-dev model card: 12B (11.9B transformer)
    (projection.wan21_spec(), 14e9, 0.03),           # Wan2.1-T2V-14B
    (projection.hunyuan_video_spec(), 13e9, 0.03),   # HunyuanVideo: 13B
])
def test_parameter_counts_land_on_the_published_sizes(spec, published, tolerance):
    assert abs(spec.params - published) / published < tolerance


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "int4", "nvfp4"])
def test_format_bytes_are_what_the_quantizer_stores(fmt):
    n, k = 96, 256
    f = formats.get(fmt)
    spec = formats.Spec(fmt, projection.GROUP if f.grouped else None)
    parts = f.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), spec)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    layer = projection.Linear("w", k, n, 1, "img", bias=False)
    assert projection.weight_bytes(layer, fmt) == stored
    assert projection.weight_bytes(layer, "bf16") == 2 * n * k
    kept = projection.Linear("kept", k, n, 1, "img", quantized=False, bias=False)
    assert projection.weight_bytes(kept, fmt) == 2 * n * k


def test_int4_group_64_costs_a_bit_over_four_bits():
    layer = projection.Linear("w", 3072, 3072, 1, "img", bias=False)
    bits = 8 * projection.weight_bytes(layer, "int4") / (3072 * 3072)
    assert 4.0 < bits <= 4.5


def test_roofline_takes_the_slower_of_compute_and_memory():
    gpu = projection.GPUS["H100"]
    memory_bound = projection.Kernel("copy-like", flops=1e9, bytes=1e9, compute="bf16")
    compute_bound = projection.Kernel("gemm-like", flops=1e15, bytes=1e9, compute="bf16", count=3)
    assert memory_bound.bound(gpu) == "memory"
    assert memory_bound.time(gpu) == pytest.approx(1e9 / 3.35e12)
    assert compute_bound.bound(gpu) == "compute"
    assert compute_bound.time(gpu) == pytest.approx(3 * 1e15 / 989.4e12)


def test_weight_only_formats_save_no_time_on_compute_bound_matmuls_w8a8_does():
    spec, gpu = projection.flux_spec(), projection.GPUS["H100"]
    layer = next(layer for layer in spec.linears if layer.name == "single qkv + mlp up")
    bf16, int4, int8 = (projection.linear_kernel(spec, layer, f, gpu) for f in ("bf16", "int4", "int8"))
    assert bf16.bound(gpu) == int4.bound(gpu) == "compute"
    assert int4.time(gpu) == pytest.approx(bf16.time(gpu))
    assert int4.bytes < bf16.bytes
    assert bf16.time(gpu) / int8.time(gpu) == pytest.approx(gpu.peak["int8"] / gpu.peak["bf16"])


def test_self_attention_flops_grow_with_the_square_of_the_video_length():
    short, long = projection.wan21_spec(frames=41), projection.wan21_spec(frames=81)   # 11 and 21 latent frames
    assert long.img_tokens / short.img_tokens == pytest.approx(21 / 11)
    self_short = projection.attention_kernel(short, short.attentions[0]).flops
    self_long = projection.attention_kernel(long, long.attentions[0]).flops
    assert self_long / self_short == pytest.approx((21 / 11) ** 2)
    # Sparse attention thins self-attention only; cross-attention to the text stays dense.
    assert projection.attention_kernel(long, long.attentions[0], 0.25).flops == pytest.approx(0.25 * self_long)
    sparse = projection.attention_kernel(long, long.attentions[1], 0.25)
    assert sparse.flops == projection.attention_kernel(long, long.attentions[1]).flops


def test_bf16_flux_streams_weights_on_a_24gb_card_quantized_fits():
    spec = projection.flux_spec()
    assert projection.offloaded_bytes(spec, projection.GPUS["RTX 4090"], "bf16") > 0
    assert projection.offloaded_bytes(spec, projection.GPUS["H100"], "bf16") == 0
    for fmt in ("fp8_e4m3", "int8", "int4", "nvfp4"):
        assert projection.offloaded_bytes(spec, projection.GPUS["RTX 4090"], fmt) == 0


def test_techniques_compose_and_never_beat_their_bounds():
    for spec in projection.models():
        for gpu in projection.GPUS.values():
            base = projection.generation(spec, gpu, projection.TECHNIQUES[0])["time_s"]
            for t in projection.TECHNIQUES[1:]:
                speedup = base / projection.generation(spec, gpu, t)["time_s"]
                assert speedup >= 1 - 1e-9, (spec.name, gpu.name, t.name)
                if t.cache_speedup > 1 and t.fmt == "bf16" and t.density == 1:
                    assert speedup == pytest.approx(t.cache_speedup)
                if t.density < 1 and t.fmt == "bf16" and t.cache_speedup == 1:
                    assert speedup <= 1 / t.density + 1e-9


def test_markdown_tables_are_well_formed():
    text = projection.markdown()
    for name in ("Flux.1-dev 12B", "Wan 2.1 T2V 14B", "HunyuanVideo 13B", "RTX 4090", "H100"):
        assert name in text
    table = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line.count("|"))
        elif table:
            assert len(set(table)) == 1, table
            table = []
    assert all(math.isfinite(x) and x > 0 for x in projection.flops_per_evaluation(projection.flux_spec()))
