"""int8 GEMM against fp32 and bf16 matmul on the same inputs, timed side by side.

The int8 variants are what a W8A8 layer pays per call: quantize x per token, torch._int_mm
(or the Triton kernel on a GPU), dequantize with both scales. Weight quantization happens once,
when the model is converted, so it is outside the timed call.

On a CPU shared with other busy processes, run with ``OMP_WAIT_POLICY=PASSIVE`` (it must be set
before torch starts): with the default spinning OpenMP barriers, each of the int8 call's ~10
small elementwise ops can stall for a scheduler slice, and int8 measured slower than bf16 at a
load of 8 on 2 cores; with PASSIVE it measured 1.4x faster than bf16 (1024x3072x3072).
"""
from __future__ import annotations

import torch

from comfyui_accel.kernels.int8_gemm import int8_linear
from comfyui_accel.kernels.quant_primitives import quantize_per_channel_int8, quantize_per_token_int8
from comfyui_accel.metrics import sqnr_db
from lab.measure import compare_timings, time_fn, weight_bytes

FULL_SHAPES = [(256, 3072, 3072), (1024, 3072, 3072), (1024, 3072, 12288)]
QUICK_SHAPES = [(256, 1024, 1024)]


def _bench_shape(M: int, K: int, N: int, quick: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    x_bf16, w_bf16 = x.bfloat16(), w.bfloat16()
    wq, w_scale = quantize_per_channel_int8(w)

    reference = x @ w.t()  # the unaccelerated output that fidelity is measured against
    # name -> (call, weight format it reads, activations it takes)
    cases = {
        "fp32 matmul": (lambda: x @ w.t(), "fp32", x),
        "bf16 matmul": (lambda: x_bf16 @ w_bf16.t(), "bf16", x_bf16),
        "int8 from fp32": (lambda: int8_linear(x, wq, w_scale), "int8", x),
        "int8 from bf16": (lambda: int8_linear(x_bf16, wq, w_scale), "int8", x_bf16),
    }
    bytes_of = {
        "fp32": weight_bytes({"w": w}),
        "bf16": weight_bytes({"w": w_bf16}),
        "int8": weight_bytes({"w": wq, "scale": w_scale}),
    }
    repeat = 3 if quick else 7
    timings = compare_timings(
        cases["fp32 matmul"][0],
        {name: fn for name, (fn, _, _) in cases.items() if name != "fp32 matmul"},
        warmup=1 if quick else 2,
        repeat=repeat,
        autorange=True,
    )
    medians = {"fp32 matmul": timings["baseline"]["median_s"]}
    medians.update({name: v["median_s"] for name, v in timings["variants"].items()})
    # The parts of the int8 call on their own, to see where its time goes.
    quantize_s = {a.dtype: time_fn(lambda: quantize_per_token_int8(a), repeat=repeat, autorange=True)["median_s"]
                  for a in (x, x_bf16)}
    xq, _ = quantize_per_token_int8(x)
    int_mm_s = time_fn(lambda: torch._int_mm(xq, wq.t()), repeat=repeat, autorange=True)["median_s"]

    def record(baseline: str, variant: str) -> dict:
        fn, weights, activations = cases[variant]
        base_weights = cases[baseline][1]
        ratio = bytes_of[weights] / bytes_of[base_weights]
        is_int8 = weights == "int8"
        return dict(
            name="int8_gemm",
            model=f"gemm {M}x{K}x{N}",
            baseline=baseline,
            variant=variant,
            speedup=medians[baseline] / medians[variant],
            psnr_db=None,
            sqnr_db=sqnr_db(reference, fn()),
            ssim=None,
            weight_bytes_ratio=ratio,
            bound=f"{weights} bytes/{base_weights} bytes = {ratio:.3f}",
            time_s=medians[variant],
            baseline_time_s=medians[baseline],
            quantize_x_s=quantize_s[activations.dtype] if is_int8 else None,  # per-token quantization alone
            int_mm_s=int_mm_s if is_int8 else None,  # torch._int_mm alone
        )

    records = [record("fp32 matmul", name) for name in cases if name != "fp32 matmul"]
    # The comparison that matters for a bf16 model: the int8 layer against the bf16 layer it replaces.
    records.append(record("bf16 matmul", "int8 from bf16"))
    return records


def run(quick: bool) -> list[dict]:
    records = []
    for M, K, N in QUICK_SHAPES if quick else FULL_SHAPES:
        records += _bench_shape(M, K, N, quick)
    return records
