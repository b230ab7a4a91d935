"""Projection to real models on real GPUs, from formulas: no measurement, nothing typed in by hand.

The CPU benchmarks measure small models; what the techniques are worth on Flux.1-dev (12B),
Wan 2.1 T2V 14B and HunyuanVideo (13B) on a 24 GB RTX 4090 or an H100 follows from:

- the models' published configurations -> every linear layer (K, N, how many, which tokens it
  sees) and every attention call (query and key tokens, heads, head width);
- our weight formats (``quant.formats``: bytes of codes and scales at each layer's shape);
- the GPUs' published peak dense tensor throughput per compute type and memory bandwidth;
- a roofline per kernel: time >= max(FLOPs / peak, bytes / bandwidth).

So each figure is a bound (what the arithmetic and the memory traffic allow), not a prediction
of a particular implementation. ``markdown()`` writes the section that ends ``out/bench.md``.
"""
from __future__ import annotations

import dataclasses
import math

BF16 = 2   # bytes

# --- GPUs: published peak dense tensor throughput (FLOP/s, no 2:4 sparsity) and bandwidth -------


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    bandwidth: float             # bytes/s
    peak: dict                   # compute type -> FLOP/s ("bf16", "fp8", "int8", "fp4")
    source: str
    host_link: float = 32e9      # bytes/s to system memory (PCIe 4.0 / 5.0 x16 per direction), for offloading


GPUS = {
    # Ada whitepaper, GeForce RTX 4090: BF16 and FP8 tensor rates with FP32 accumulation (what
    # PyTorch's matmul and scaled_mm use; GeForce runs them at half the FP16-accumulate rate),
    # INT8 with INT32 accumulation. No FP4 tensor cores.
    "RTX 4090": GPU("RTX 4090 (24 GB)", 24e9, 1008e9, {"bf16": 165.2e12, "fp8": 330.3e12, "int8": 660.6e12},
                    "NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090)"),
    # H100 SXM5 datasheet, dense: BF16 989 TFLOPS, FP8 and INT8 1979; HBM3 3.35 TB/s. No FP4.
    "H100": GPU("H100 SXM (80 GB)", 80e9, 3.35e12, {"bf16": 989.4e12, "fp8": 1978.9e12, "int8": 1978.9e12},
                "NVIDIA H100 Tensor Core GPU datasheet (SXM5)", host_link=64e9),
}

# --- model structure ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Linear:
    name: str
    k: int
    n: int
    count: int                   # how many such layers in the model
    tokens: str                  # which sequence it runs on: "img", "txt", "joint" (img + txt), "vec" (once)
    quantized: bool = True       # our policy: block layers yes; embedders, timestep path, final layer no
    bias: bool = True

    @property
    def params(self) -> int:
        return self.count * (self.k * self.n + (self.n if self.bias else 0))


@dataclasses.dataclass(frozen=True)
class Attention:
    name: str
    count: int
    q: str                       # token kinds as in Linear.tokens
    kv: str
    heads: int
    head_dim: int
    sparse: bool                 # self-attention over the latent: what Sparse Attention thins out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    published_params: float
    linears: tuple
    attentions: tuple
    other_params: int            # norms, modulation tables, convolutions outside the linears
    img_tokens: int
    txt_tokens: int
    setting: str                 # the resolution / length the token counts come from
    evals_per_step: int          # 2 with classifier-free guidance, 1 for guidance-distilled models
    steps: int

    def tokens(self, kind: str) -> int:
        return {"img": self.img_tokens, "txt": self.txt_tokens, "joint": self.img_tokens + self.txt_tokens,
                "vec": 1}[kind]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.linears) + self.other_params


def _dit_double_block(hidden: int, mlp: int, count: int, prefix: str) -> list[Linear]:
    """One MMDiT double block (Flux, HunyuanVideo): image and text streams, each with modulation,
    qkv, projection and MLP; attention is joint over both."""
    out = []
    for stream in ("img", "txt"):
        out += [Linear(f"{prefix} {stream} modulation", hidden, 6 * hidden, count, "vec"),
                Linear(f"{prefix} {stream} qkv", hidden, 3 * hidden, count, stream),
                Linear(f"{prefix} {stream} proj", hidden, hidden, count, stream),
                Linear(f"{prefix} {stream} mlp up", hidden, mlp, count, stream),
                Linear(f"{prefix} {stream} mlp down", mlp, hidden, count, stream)]
    return out


def _dit_single_block(hidden: int, mlp: int, count: int) -> list[Linear]:
    """One parallel single-stream block (Flux, HunyuanVideo): qkv and MLP up in one matmul."""
    return [Linear("single modulation", hidden, 3 * hidden, count, "vec"),
            Linear("single qkv + mlp up", hidden, 3 * hidden + mlp, count, "joint"),
            Linear("single proj + mlp down", hidden + mlp, hidden, count, "joint")]


def _mlp_embedder(name: str, k: int, hidden: int) -> list[Linear]:
    return [Linear(f"{name} in", k, hidden, 1, "vec", False), Linear(f"{name} out", hidden, hidden, 1, "vec", False)]


def flux_spec(hidden=3072, heads=24, depth=19, depth_single=38, mlp_ratio=4.0, in_channels=64, context=4096,
              vec=768, guidance=True, width=1024, height=1024, txt_tokens=512, steps=28) -> ModelSpec:
    """Flux.1-dev (black-forest-labs/FLUX.1-dev transformer config)."""
    mlp, head = int(hidden * mlp_ratio), hidden // heads
    linears = (_dit_double_block(hidden, mlp, depth, "double") + _dit_single_block(hidden, mlp, depth_single)
               + [Linear("img_in", in_channels, hidden, 1, "img", False),
                  Linear("txt_in", context, hidden, 1, "txt", False)]
               + _mlp_embedder("time_in", 256, hidden) + _mlp_embedder("vector_in", vec, hidden)
               + (_mlp_embedder("guidance_in", 256, hidden) if guidance else [])
               + [Linear("final modulation", hidden, 2 * hidden, 1, "vec", False),
                  Linear("final linear", hidden, in_channels, 1, "img", False)])
    # q/k RMSNorm scales: double blocks 2 streams x 2, single blocks 2.
    other = head * (4 * depth + 2 * depth_single)
    img = (height // 16) * (width // 16)   # VAE /8, patch 2
    attn = (Attention("double joint", depth, "joint", "joint", heads, head, True),
            Attention("single joint", depth_single, "joint", "joint", heads, head, True))
    return ModelSpec("Flux.1-dev 12B", 11.9e9, tuple(linears), attn, other, img, txt_tokens,
                     f"{width}x{height}, {txt_tokens} text tokens", 1, steps)


def wan21_spec(dim=5120, ffn=13824, heads=40, layers=40, text_dim=4096, freq_dim=256, in_dim=16, out_dim=16,
               width=1280, height=720, frames=81, txt_tokens=512, steps=50) -> ModelSpec:
    """Wan 2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B config.json)."""
    head = dim // heads
    linears = [Linear("self q/k/v/o", dim, dim, 4 * layers, "img"),
               Linear("cross q/o", dim, dim, 2 * layers, "img"),
               Linear("cross k/v", dim, dim, 2 * layers, "txt"),
               Linear("ffn up", dim, ffn, layers, "img"),
               Linear("ffn down", ffn, dim, layers, "img"),
               Linear("patch embedding", in_dim * 4, dim, 1, "img", False),
               Linear("text embedding in", text_dim, dim, 1, "txt", False),
               Linear("text embedding out", dim, dim, 1, "txt", False),
               Linear("time embedding in", freq_dim, dim, 1, "vec", False),
               Linear("time embedding out", dim, dim, 1, "vec", False),
               Linear("time projection", dim, 6 * dim, 1, "vec", False),
               Linear("head", dim, out_dim * 4, 1, "img", False)]
    # Per block: q/k RMSNorm (self and cross, 4 x dim), the cross-attention LayerNorm (2 x dim),
    # the modulation table (6 x dim); the head's modulation table (2 x dim).
    other = layers * (4 * dim + 2 * dim + 6 * dim) + 2 * dim
    latent_frames = (frames - 1) // 4 + 1   # VAE /4 in time, /8 in space, patch 1x2x2
    img = latent_frames * (height // 16) * (width // 16)
    attn = (Attention("self", layers, "img", "img", heads, head, True),
            Attention("cross", layers, "img", "txt", heads, head, False))
    return ModelSpec("Wan 2.1 T2V 14B", 14e9, tuple(linears), attn, other, img, txt_tokens,
                     f"{width}x{height}, {frames} frames, {txt_tokens} text tokens", 2, steps)


def hunyuan_video_spec(hidden=3072, heads=24, depth=20, depth_single=40, mlp_ratio=4.0, in_channels=16,
                       text_dim=4096, vec=768, refiner_depth=2, width=1280, height=720, frames=129,
                       txt_tokens=256, steps=50) -> ModelSpec:
    """HunyuanVideo 13B (tencent/HunyuanVideo, HYVideo-T/2-cfgdistill)."""
    mlp, head = int(hidden * mlp_ratio), hidden // heads
    refiner = [Linear("refiner qkv", hidden, 3 * hidden, refiner_depth, "txt", False),
               Linear("refiner proj", hidden, hidden, refiner_depth, "txt", False),
               Linear("refiner mlp up", hidden, mlp, refiner_depth, "txt", False),
               Linear("refiner mlp down", mlp, hidden, refiner_depth, "txt", False),
               Linear("refiner modulation", hidden, 2 * hidden, refiner_depth, "vec", False),
               Linear("refiner input", text_dim, hidden, 1, "txt", False)]
    refiner += _mlp_embedder("refiner t", 256, hidden) + _mlp_embedder("refiner c", text_dim, hidden)
    linears = (_dit_double_block(hidden, mlp, depth, "double") + _dit_single_block(hidden, mlp, depth_single)
               + refiner + [Linear("img_in", in_channels * 4, hidden, 1, "img", False)]
               + _mlp_embedder("time_in", 256, hidden) + _mlp_embedder("vector_in", vec, hidden)
               + _mlp_embedder("guidance_in", 256, hidden)
               + [Linear("final modulation", hidden, 2 * hidden, 1, "vec", False),
                  Linear("final linear", hidden, in_channels * 4, 1, "img", False)])
    # q/k RMSNorm scales as in Flux; the refiner's two affine LayerNorms per block.
    other = head * (4 * depth + 2 * depth_single) + refiner_depth * 4 * hidden
    latent_frames = (frames - 1) // 4 + 1
    img = latent_frames * (height // 16) * (width // 16)
    attn = (Attention("double joint", depth, "joint", "joint", heads, head, True),
            Attention("single joint", depth_single, "joint", "joint", heads, head, True))
    return ModelSpec("HunyuanVideo 13B", 13e9, tuple(linears), attn, other, img, txt_tokens,
                     f"{width}x{height}, {frames} frames, {txt_tokens} text tokens", 1, steps)


def models() -> list[ModelSpec]:
    return [flux_spec(), wan21_spec(), hunyuan_video_spec()]


# --- formats: bytes per weight from our own format definitions ------------------------------------

FORMATS = ("bf16", "fp8_e4m3", "int8", "int4", "nvfp4")
GROUP = 64


def weight_bytes(layer: Linear, fmt: str) -> float:
    """Stored bytes of one layer's weight (codes + scales, bias in bf16) in ``fmt``; kept layers: bf16."""
    bias = layer.n * BF16 if layer.bias else 0
    if fmt == "bf16" or not layer.quantized:
        return layer.k * layer.n * BF16 + bias
    from comfyui_accel.quant import formats
    f = formats.get(fmt)
    return f.nbytes((layer.n, layer.k), formats.Spec(fmt, GROUP if f.grouped else None)) + bias


def model_weight_bytes(spec: ModelSpec, fmt: str) -> float:
    return sum(layer.count * weight_bytes(layer, fmt) for layer in spec.linears) + spec.other_params * BF16


def compute_type(fmt: str, gpu: GPU) -> str:
    """The tensor-core type a layer in ``fmt`` multiplies in on ``gpu``: W8A8 formats in 8 bits where
    the GPU has them, weight-only formats (and those it lacks) dequantize to bf16."""
    if fmt == "bf16":
        return "bf16"
    from comfyui_accel.quant import formats
    f = formats.get(fmt)
    if f.act_bits == 8:
        kind = "fp8" if fmt.startswith("fp8") else "int8"
        return kind if kind in gpu.peak else "bf16"
    return "bf16"


# --- kernels and their roofline ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float
    compute: str                 # key into GPU.peak
    count: int = 1

    def time(self, gpu: GPU) -> float:
        return self.count * max(self.flops / gpu.peak[self.compute], self.bytes / gpu.bandwidth)

    def intensity(self) -> float:
        return self.flops / self.bytes

    def bound(self, gpu: GPU) -> str:
        return "compute" if self.intensity() >= gpu.peak[self.compute] / gpu.bandwidth else "memory"


def linear_kernel(spec: ModelSpec, layer: Linear, fmt: str, gpu: GPU) -> Kernel:
    m = spec.tokens(layer.tokens)
    fmt = fmt if layer.quantized else "bf16"
    kind = compute_type(fmt, gpu)
    act = 1 if kind != "bf16" else BF16   # activations read in 8 bits when the matmul is 8-bit
    return Kernel(layer.name, 2.0 * m * layer.k * layer.n,
                  weight_bytes(layer, fmt) + m * layer.k * act + m * layer.n * BF16, kind, layer.count)


def attention_kernel(spec: ModelSpec, a: Attention, density: float = 1.0) -> Kernel:
    """Fused (flash) attention in bf16: QK^T and PV are 4 * q * kv * d FLOPs per head. Bytes: Q, K, V
    and O once from DRAM (one head's K and V, under 40 MB even at 120k tokens, stay in the L2 cache
    while the query tiles stream past them). Block-sparse attention keeps ``density`` of the FLOPs."""
    q, kv, width = spec.tokens(a.q), spec.tokens(a.kv), a.heads * a.head_dim
    flops = 4.0 * q * kv * width * (density if a.sparse else 1.0)
    return Kernel(f"attention {a.name}", flops, 2 * (q + kv) * width * BF16, "bf16", a.count)


def kernels(spec: ModelSpec, gpu: GPU, fmt: str = "bf16", density: float = 1.0) -> list[Kernel]:
    """All kernels of one model evaluation (matmuls and attention; norms and elementwise omitted)."""
    return ([linear_kernel(spec, layer, fmt, gpu) for layer in spec.linears]
            + [attention_kernel(spec, a, density) for a in spec.attentions])


USABLE = 0.9   # of the card's memory, the rest for the CUDA context and allocator slack


def activation_bytes(spec: ModelSpec) -> float:
    """The largest live activations of one block: the MLP's hidden state (bf16) beside its input and output."""
    widest = max((layer for layer in spec.linears if layer.tokens != "vec"),
                 key=lambda layer: spec.tokens(layer.tokens) * layer.n)
    return spec.tokens(widest.tokens) * (widest.n + 2 * widest.k) * BF16


def offloaded_bytes(spec: ModelSpec, gpu: GPU, fmt: str) -> float:
    """Weight bytes that do not fit beside the activations and are streamed from system memory
    on every evaluation (ComfyUI's partial loading)."""
    room = gpu.memory_bytes * USABLE - activation_bytes(spec)
    return max(0.0, model_weight_bytes(spec, fmt) - room)


def evaluation_time(spec: ModelSpec, gpu: GPU, fmt: str = "bf16", density: float = 1.0) -> float:
    """Roofline time of one model evaluation, plus streaming the weights that do not fit."""
    return (sum(k.time(gpu) for k in kernels(spec, gpu, fmt, density))
            + offloaded_bytes(spec, gpu, fmt) / gpu.host_link)


def flops_per_evaluation(spec: ModelSpec, density: float = 1.0) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one model evaluation."""
    linear = sum(2.0 * layer.count * spec.tokens(layer.tokens) * layer.k * layer.n for layer in spec.linears)
    attention = sum(attention_kernel(spec, a, density).flops * a.count for a in spec.attentions)
    return linear, attention


# --- techniques ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Technique:
    name: str
    fmt: str = "bf16"
    density: float = 1.0
    cache_speedup: float = 1.0   # evaluations / computed evaluations


TECHNIQUES = (
    Technique("bf16 (baseline)"),
    Technique("fp8 W8A8", fmt="fp8_e4m3"),
    Technique("int8 W8A8", fmt="int8"),
    Technique("int4 W4A16", fmt="int4"),
    Technique("NVFP4 (weight-only here)", fmt="nvfp4"),
    Technique("TeaCache/TaylorSeer 2x", cache_speedup=2.0),
    Technique("Sparse attention 0.25", density=0.25),
    Technique("int8 + cache 2x + sparse 0.25", fmt="int8", density=0.25, cache_speedup=2.0),
)


def generation(spec: ModelSpec, gpu: GPU, t: Technique) -> dict:
    """Roofline time, FLOPs and bytes moved of a whole generation (steps x evaluations per step)."""
    evaluations = spec.steps * spec.evals_per_step / t.cache_speedup
    ks = kernels(spec, gpu, t.fmt, t.density)
    return dict(time_s=evaluations * evaluation_time(spec, gpu, t.fmt, t.density),
                flops=evaluations * sum(k.flops * k.count for k in ks),
                bytes=evaluations * sum(k.bytes * k.count for k in ks))


# --- the report section ------------------------------------------------------------------------------

def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def markdown() -> str:
    specs = models()
    lines = ["## Projection to real models on GPUs (formulas: lab/bench/projection.py)", "",
             "Computed from the models' published configurations, our weight formats' byte layouts and the GPUs' "
             "published peak dense throughput and bandwidth; each kernel's time is its roofline bound "
             "max(FLOPs / peak, bytes / bandwidth), so these are limits, not measurements. "
             + "; ".join(f"{g.name}: {g.bandwidth / 1e9:.0f} GB/s, "
                         + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in g.peak.items())
                         + f" ({g.source})" for g in GPUS.values()) + ".", "",
             "### Models, work per evaluation and weight memory per format", "",
             "| model | setting | parameters (published) | tokens img + txt | linear TFLOP | attention TFLOP | "
             + " | ".join(f"weights {f} GB" for f in FORMATS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(FORMATS)]
    for s in specs:
        linear, attention = flops_per_evaluation(s)
        lines.append(f"| {s.name} | {s.setting} | {s.params / 1e9:.2f} B ({s.published_params / 1e9:g} B) | "
                     f"{s.img_tokens:,} + {s.txt_tokens} | {linear / 1e12:.0f} | {attention / 1e12:.0f} | "
                     + " | ".join(_gb(model_weight_bytes(s, f)) for f in FORMATS) + " |")
    lines += ["", "Offloaded per evaluation on a 24 GB card (weights beyond 90% of its memory less one block's "
              "activations, streamed over PCIe 4.0 x16 at 32 GB/s): "
              + "; ".join(f"{s.name}: " + ", ".join(f"{f} {_gb(offloaded_bytes(s, GPUS['RTX 4090'], f))} GB"
                                                     for f in FORMATS) for s in specs)
              + ". The generation times below include that streaming.", ""]
    for gpu in GPUS.values():
        lines += [f"### {gpu.name}: roofline time of one generation and bound speedup per technique", "",
                  "| model | steps x evals | " + " | ".join(t.name for t in TECHNIQUES) + " |",
                  "|---|---|" + "---|" * len(TECHNIQUES)]
        for s in specs:
            base = generation(s, gpu, TECHNIQUES[0])
            cells = [f"{base['time_s']:.0f} s"] + [f"{base['time_s'] / generation(s, gpu, t)['time_s']:.2f}x"
                                                   for t in TECHNIQUES[1:]]
            lines.append(f"| {s.name} | {s.steps} x {s.evals_per_step} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### FLOPs and bytes saved per technique (one generation, H100 roofline)", "",
              "| model | technique | PFLOP | saved | weight + activation bytes moved TB | saved |", "|---|---|---|---|---|---|"]
    gpu = GPUS["H100"]
    for s in specs:
        base = generation(s, gpu, TECHNIQUES[0])
        for t in TECHNIQUES:
            g = generation(s, gpu, t)
            lines.append(f"| {s.name} | {t.name} | {g['flops'] / 1e15:.1f} | {1 - g['flops'] / base['flops']:.0%} | "
                         f"{g['bytes'] / 1e12:.2f} | {1 - g['bytes'] / base['bytes']:.0%} |")
    lines += ["", "### Roofline of the main kernels (one call)", "",
              "| model | kernel | format | GPU | GFLOP | MB moved | FLOP/byte | ridge | bound | time ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in specs:
        biggest = max((layer for layer in s.linears if layer.quantized),
                      key=lambda layer: s.tokens(layer.tokens) * layer.k * layer.n)
        sparse_attention = next(a for a in s.attentions if a.sparse)
        for gpu in GPUS.values():
            rows = [(linear_kernel(s, biggest, f, gpu), f) for f in ("bf16", "int8", "int4")]
            rows += [(attention_kernel(s, sparse_attention), "bf16"),
                     (attention_kernel(s, sparse_attention, 0.25), "bf16, density 0.25")]
            for k, f in rows:
                lines.append(f"| {s.name} | {k.name} | {f} | {gpu.name.split(' (')[0]} | {k.flops / 1e9:.0f} | "
                             f"{k.bytes / 1e6:.0f} | {k.intensity():.0f} | {gpu.peak[k.compute] / gpu.bandwidth:.0f} | "
                             f"{k.bound(gpu)} | {k.time(gpu) / k.count * 1e3:.2f} |")
    lines += ["", "Reading: at these token counts the matmuls are compute-bound on both GPUs, so weight-only "
              "formats (int4 W4A16, NVFP4 without FP4 tensor cores) save memory but not time once the weights "
              "fit; W8A8 (int8, fp8) halves the matmul time bound. Video attention (tens of thousands of "
              "tokens) is the largest single cost of Wan and HunyuanVideo and scales with the density that "
              "sparse attention keeps; step caching divides everything by its speedup."]
    return "\n".join(lines)
