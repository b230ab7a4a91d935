"""VQ benchmarks: nearest-codeword search on the CPU, rate-distortion on real photographs, VQ weights.

1. Nearest codeword for (N, D, K) = (16384, 16, 16384) and (4096, 64, 65536): our CPU path
   (``kernels.kmeans.nearest_centroid``) against faiss-cpu ``IndexFlatL2`` (when installed) and a
   plain chunked search (``|c|^2 - 2 x.c`` with ``argmin``, rows in chunks, as torchao and ComfyUI's
   Stage A do). Timings are medians of interleaved rounds; one thread and all threads. Agreement is
   the share of vectors for which both pick the same code. Target: within 1.5x of faiss.
2. Rate-distortion: VQ of the sample photographs that scikit-image and scikit-learn ship, with
   p x p RGB patches as vectors; codebooks fitted on the four scikit-image photos, measured on the
   two scikit-learn photos (held out). Bits per pixel of the actual rANS-coded indices (and the
   fixed-length bound) against PSNR, for several codebook sizes and residual depths. Table in the
   records, plot ``bench_vq_rate_distortion.png`` in the output folder (``lab/bench/run.py --out``).
3. VQ weights (``quant`` formats vq2, vq3, vq2x8) against int4, nvfp4, mxfp4 and int8: bits per
   weight (as stored) against weight SQNR and output SQNR, data-free and calibrated (codes chosen
   on the inputs' per-channel mean square). (a) One synthetic layer with inputs of uneven channel
   scale, output SQNR on held-out inputs. (b) The medium Wan 2.1 fixture with planted activation
   outliers, every quantizable layer in one format: final-latent PSNR/SSIM against the float model
   on the same seeds, median weight and output SQNR over the layers (on recorded calibration inputs).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from comfyui_accel.kernels import dispatch
from comfyui_accel.kernels.kmeans import nearest_centroid_reference
from comfyui_accel.vq.codebook import fit, latent_to_vectors
from comfyui_accel.vq.tokens import bitrate, decode_latent, encode_latent

log = logging.getLogger(__name__)

SEARCH_SHAPES = [(16384, 16, 16384), (4096, 64, 65536)]


def plain_chunked_search(x: torch.Tensor, c: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """The usual chunked search: materialise rows x K distances per chunk, then argmin."""
    c2 = c.square().sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for n0 in range(0, x.shape[0], rows):
        out[n0:n0 + rows] = torch.addmm(c2, x[n0:n0 + rows], c.t(), alpha=-2).argmin(1)
    return out


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _median_interleaved(fns: dict, reps: int) -> dict:
    """(median time over ``reps`` interleaved rounds, last result) of each function, against
    the plain search (``measure.compare_timings``: a shared machine's load moves between rounds)."""
    from lab import measure
    results = {}

    def keeping(name):
        def call():
            results[name] = fns[name]()
        return call

    calls = {name: keeping(name) for name in fns if name != "plain"}
    timing = measure.compare_timings(keeping("plain"), calls, warmup=0, repeat=reps)
    medians = {"plain": timing["baseline"]["median_s"], **{n: t["median_s"] for n, t in timing["variants"].items()}}
    return {name: (medians[name], results[name]) for name in fns}


def bench_search(quick: bool) -> list[dict]:
    faiss = _faiss()
    records = []
    saved_threads = torch.get_num_threads()
    thread_settings = [1] if quick else sorted({1, saved_threads})
    try:
        for threads in thread_settings:
            torch.set_num_threads(threads)
            if faiss is not None:
                faiss.omp_set_num_threads(threads)
            for n, d, k in SEARCH_SHAPES:
                g = torch.Generator().manual_seed(n + d + k)
                x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
                fns = {"accel": lambda: nearest_centroid_reference(x, c)[0],
                       "plain": lambda: plain_chunked_search(x, c)}
                if faiss is not None:
                    index = faiss.IndexFlatL2(d)
                    index.add(c.numpy())
                    xn = x.numpy()
                    fns["faiss"] = lambda: torch.from_numpy(index.search(xn, 1)[1][:, 0]).long()
                with dispatch.backend("reference"):
                    timed = _median_interleaved(fns, 5 if quick else 7)
                ours_t, ours_i = timed["accel"]
                plain_t, plain_i = timed["plain"]
                rec = {"name": "nearest_codeword", "model": f"N={n} D={d} K={k}, {threads} thread(s)", "threads": threads,
                       "variant": f"accel CPU search {1e3 * ours_t:.0f} ms (plain chunked {1e3 * plain_t:.0f} ms)",
                       "accel_ms": round(1e3 * ours_t, 1), "plain_chunked_ms": round(1e3 * plain_t, 1),
                       "speedup_vs_plain": round(plain_t / ours_t, 2),
                       "agreement_vs_plain": float((ours_i == plain_i).float().mean()),
                       "bound": f"{2 * n * k * d / 1e9:.1f} GFLOP, N x K = {n * k / 1e6:.0f}M distances",
                       "load_average": round(os.getloadavg()[0], 1)}
                if faiss is not None:
                    faiss_t, faiss_i = timed["faiss"]
                    agree = float((ours_i == faiss_i).float().mean())
                    rec.update({"baseline": f"faiss-cpu IndexFlatL2 {1e3 * faiss_t:.0f} ms", "speedup": round(faiss_t / ours_t, 3),
                                "faiss_ms": round(1e3 * faiss_t, 1), "agreement_vs_faiss": agree,
                                "within_1.5x_of_faiss": ours_t <= 1.5 * faiss_t, "agreement_ok": agree >= 0.999})
                else:
                    rec.update({"baseline": "plain chunked search (faiss-cpu not installed)",
                                "speedup": rec["speedup_vs_plain"]})
                log.info("   nearest %s threads=%d: %s", rec["model"], threads,
                         {k2: v for k2, v in rec.items() if k2.endswith("_ms") or k2.startswith("agreement")})
                records.append(rec)
    finally:
        torch.set_num_threads(saved_threads)
    return records


# ---------------------------------------------------------------------------------------------


def photographs(quick: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(train, test) lists of [1, 3, H, W] float images in [0, 1]."""
    import skimage.data
    import sklearn.datasets

    def to_tensor(a):
        t = torch.from_numpy(a[..., :3].copy()).float().div(255).permute(2, 0, 1)[None]
        return torch.nn.functional.avg_pool2d(t, 2) if quick else t

    train = [to_tensor(getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    test = [to_tensor(a) for a in sklearn.datasets.load_sample_images().images]
    return train, test


def rd_point(train_vectors, test, patch: int, k: int, depth: int, iters: int) -> dict:
    book = fit(train_vectors, k, channels=3, patch=patch, depth=depth, iters=iters, seed=0)
    coded_bits = fixed_bits = pixels = 0
    sq_err = 0.0
    for img in test:
        tokens = encode_latent(book, img, pixels=img.shape[-2] * img.shape[-1])
        report = bitrate(tokens)
        rec = decode_latent(tokens).clamp(0, 1)
        coded_bits += report["coded_bits"] + report["table_bits"]
        fixed_bits += report["fixed_bits"]
        pixels += report["pixels"]
        sq_err += (rec.double() - img.double()).square().sum().item()
    mse = sq_err / (3 * pixels)
    psnr = 10 * math.log10(1 / mse)
    bpp = coded_bits / pixels
    return {"name": "vq_rate_distortion", "model": "sklearn photos (china, flower), codebooks fit on 4 skimage photos",
            "baseline": "8-bit RGB, 24 bpp", "variant": f"patch {patch} K={k} levels={depth}: {bpp:.3f} bpp",
            "patch": patch, "codebook_size": k, "levels": depth, "psnr_db": round(psnr, 2),
            "coded_bpp": round(bpp, 4), "fixed_bpp": round(fixed_bits / pixels, 4),
            "weight_bytes_ratio": round(24 / bpp, 1),
            "bound": f"fixed {depth} x log2({k}) / {patch}^2 = {depth * math.log2(k) / patch ** 2:.3f} bpp"}


def bench_rate_distortion(quick: bool, out: str | Path = "out") -> list[dict]:
    from comfyui_accel.nodes.plots import line_plot

    train, test = photographs(quick)
    iters = 6 if quick else 12
    configs = ([(4, k, 1) for k in (16, 64, 256)] + [(4, 64, d) for d in (2, 3)] if quick else
               [(4, k, 1) for k in (16, 64, 256, 1024, 4096)] + [(4, 256, d) for d in (2, 3, 4)]
               + [(2, k, 1) for k in (64, 256, 1024)] + [(2, 256, d) for d in (2, 3)])
    vectors = {p: torch.cat([latent_to_vectors(img, p)[0] for img in train]) for p in {c[0] for c in configs}}
    records = []
    for patch, k, depth in configs:
        start = time.perf_counter()
        rec = rd_point(vectors[patch], test, patch, k, depth, iters)
        rec["seconds"] = round(time.perf_counter() - start, 1)
        log.info("   %s, %.2f dB", rec["variant"], rec["psnr_db"])
        records.append(rec)
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        key = f"p{r['patch']} " + ("K sweep" if r["levels"] == 1 else f"K={r['codebook_size']} depth")
        if r["levels"] > 1:  # the depth series starts from its own one-level point
            base = next((b for b in records if b["patch"] == r["patch"] and b["levels"] == 1
                         and b["codebook_size"] == r["codebook_size"]), None)
            if base is not None and key not in series:
                series[key] = ([base["coded_bpp"]], [base["psnr_db"]])
        xs, ys = series.setdefault(key, ([], []))
        xs.append(r["coded_bpp"])
        ys.append(r["psnr_db"])
    plot = line_plot(series, "VQ rate-distortion on held-out photographs (rANS-coded)", "bits per pixel", "PSNR dB")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    Image.fromarray((plot[0].numpy() * 255).round().astype("uint8")).save(out / "bench_vq_rate_distortion.png")
    return records


WEIGHT_FORMATS = (("int8", None), ("int4", 64), ("nvfp4", None), ("mxfp4", None),
                  ("vq3", None), ("vq2", None), ("vq2x8", None))


def synthetic_layer(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [n, k] and calibration / held-out inputs with channels of uneven scale."""
    g = torch.Generator().manual_seed(0)
    # Student-t (5 dof) weights with rows of different scale: heavier tails than a Gaussian, like real layers.
    chi2 = torch.randn(5, n, k, generator=g).square().sum(0)
    w = torch.randn(n, k, generator=g) / (chi2 / 5).sqrt() / k ** 0.5
    w *= 0.5 + torch.rand(n, 1, generator=g)
    # Inputs: log-normal channel scales (real DiT activations differ 10-100x between channels),
    # partly correlated through a shared low-rank part.
    channel = torch.exp(torch.randn(k, generator=g))
    mix = torch.randn(16, k, generator=g) * 0.5

    def inputs(m):
        return (torch.randn(m, 16, generator=g) @ mix + torch.randn(m, k, generator=g)) * channel
    return w, inputs(512), inputs(1024)


def bench_weights(quick: bool) -> list[dict]:
    """One synthetic layer: bits per weight against weight SQNR and output SQNR on held-out inputs,
    data-free and (VQ) with codes chosen on the calibration inputs' per-channel mean square."""
    from comfyui_accel.metrics import sqnr_db
    from comfyui_accel.quant import formats
    from comfyui_accel.quant.formats import Spec

    n, k = (256, 1024) if quick else (1024, 2048)
    w, calib, held_out = synthetic_layer(n, k)
    input_sq = calib.square().mean(0)
    ref = held_out @ w.t()
    records = []
    for name, group in WEIGHT_FORMATS:
        if quick and name == "vq3":
            continue  # 4096-code k-means takes minutes on a CPU: too slow for the quick run
        fmt, spec = formats.get(name), Spec(name, group, False)
        for calibrated in (False, True) if name.startswith("vq") else (False,):
            start = time.perf_counter()
            parts = fmt.quantize_for_inputs(w, spec, input_sq) if calibrated else fmt.quantize(w, spec)
            seconds = time.perf_counter() - start
            deq = fmt.dequantize(parts, (n, k), spec, torch.float32)
            sqnr, out_sqnr = sqnr_db(w, deq), sqnr_db(ref, held_out @ deq.t())
            bpw = fmt.bits_per_weight((n, k), spec)
            label = name + (f" g{group}" if group else "") + (" calibrated" if calibrated else "")
            records.append({"name": "vq_weights", "model": f"synthetic t(5) weights {n}x{k}, uneven input channels",
                            "baseline": "float layer", "variant": f"{label}: output SQNR {out_sqnr:.2f} dB",
                            "format": name, "calibrated": calibrated, "bits_per_weight": round(bpw, 3),
                            "layer_sqnr_db": round(sqnr, 2), "output_sqnr_db": round(out_sqnr, 2),
                            "weight_bytes_ratio": round(16 / bpw, 2),
                            "quantize_s": round(seconds, 2), "bound": f"{bpw:.2f} / 16 bits"})
            log.info("   %s: %.3f bits/weight, weight SQNR %.2f dB, output SQNR %.2f dB (held-out inputs)",
                     label, bpw, sqnr, out_sqnr)
    return records


def bench_weights_model(quick: bool) -> list[dict]:
    """The medium Wan 2.1 fixture with planted activation outliers, every quantizable layer in one
    format: final-latent PSNR/SSIM against the float model (same seeds), median layer weight and
    output SQNR (on the calibration run's recorded inputs), VQ data-free and calibrated."""
    from lab import fixtures, host
    from lab.quant_checks import plans_for
    from comfyui_accel.metrics import sqnr_db
    from comfyui_accel.quant import calibrate
    from comfyui_accel.quant import model as qmodel
    from comfyui_accel import metrics
    from lab.bench.bench_quant import _runner

    host.import_comfy()
    family, steps = "wan21", (2 if quick else 6)
    model = fixtures.load_model(family, "medium", outliers=True)
    reference = _runner(model, family, steps)()
    layers = [p.path for p in plans_for(model, "int8", 64) if p.spec is not None]
    stats = calibrate.calibrate(model, layers, fixtures.make_conditioning(family, "medium", seed=1),
                                fixtures.make_conditioning(family, "medium", seed=2),
                                fixtures.empty_latent(family, "medium"), steps=steps, seed=0, cfg=3.5)
    rows = {path: s.sample() for path, s in stats.items()}  # one fixed sample per layer for every variant
    weights = {path: qmodel.float_weight(model, path) for path in layers}
    names = ("int4", "nvfp4", "vq2") + (() if quick else ("vq2x8", "vq3"))
    records = []
    for name in names:
        for calibrated in (False, True) if name.startswith("vq") else (False,):
            start = time.perf_counter()
            res = qmodel.quantize_model(model, plans_for(model, name, 64), stats=stats if calibrated else None)
            seconds = time.perf_counter() - start
            out = _runner(res.model, family, steps)()
            log.info("   %s: quantized in %.1f s, sampled in %.1f s", name, seconds, time.perf_counter() - start - seconds)
            q = [r for r in res.rows if r.format != "keep"]
            out_sqnr = []
            for r in q:
                qw = res.model.get_model_object(qmodel.PREFIX + r.layer).weight
                x = rows[r.layer]
                out_sqnr.append(sqnr_db(x @ weights[r.layer].t(), qw.linear(x, None).float()))
            bits = sum(r.bits * r.params for r in q) / sum(r.params for r in q)
            label = name + (" calibrated" if calibrated else "")
            rec = {"name": "vq_weights_model", "model": f"{family} medium (activation outliers), {steps} steps",
                   "baseline": "fp32 model", "variant": label, "format": name, "calibrated": calibrated,
                   "psnr_db": metrics.psnr(reference, out), "ssim": metrics.ssim(reference, out),
                   "bits_per_weight": round(bits, 3), "weight_bytes_ratio": round(16 / bits, 2),
                   "median_layer_sqnr_db": round(sorted(r.weight_sqnr_db for r in q)[len(q) // 2], 2),
                   "median_output_sqnr_db": round(sorted(out_sqnr)[len(q) // 2], 2),
                   "worst_output_sqnr_db": round(min(out_sqnr), 2), "quantize_s": round(seconds, 1),
                   "bound": f"{bits:.2f} / 16 bits", "layers": len(q)}
            log.info("   %s: %.2f bits/weight, final latent PSNR %.2f dB, median layer output SQNR %.2f dB",
                     label, bits, rec["psnr_db"], rec["median_output_sqnr_db"])
            records.append(rec)
    return records


def run(quick: bool, out: str | Path = "out") -> list[dict]:
    return (bench_search(quick) + bench_rate_distortion(quick, out) + bench_weights(quick)
            + bench_weights_model(quick))
