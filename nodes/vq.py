"""VQ nodes: fit a codebook on latents, shrink it, encode/decode latents to tokens, token and
codebook files with real bitrates, and Stable Cascade Stage A (a real VQGAN) for images.

The algorithms live in ``vq/`` (no ComfyUI there); these nodes check inputs, drive progress bars
and turn results into reports (STRING + IMAGE plot + one log line).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from comfy_api.latest import io

from .. import files, metrics
from ..vq.codebook import Codebook, fit, latent_to_vectors, reconstructions, shrink
from ..vq.tokens import (CODEBOOK_EXT, TOKENS_EXT, CodebookMismatch, Tokens, VQFileError, bitrate, codebook_bytes,
                         decode_latent, encode_latent, load_codebook, load_tokens, tokens_bytes)
from .common import CATEGORY, check_interrupt, fail, node_name, progress, report_text
from .plots import bar_plot
from .validate import AccelNode, annotated_file, comfy_folders, custom_type, folder_file, output_folder

log = logging.getLogger(__name__)

CODEBOOK = custom_type("ACCEL_VQ_CODEBOOK", Codebook, "a codebook (from VQ Fit Codebook or VQ Load Codebook)")
TOKENS = custom_type("ACCEL_VQ_TOKENS", Tokens, "VQ tokens (from VQ Encode, VQGAN Encode or VQ Load Tokens)")
CODEBOOK_FOLDER = "vq_codebooks"   # models/vq_codebooks
TOKENS_SUBFOLDER = "vq_tokens"      # output/vq_tokens, input/ also listed

_TIP_LEVELS_USE = ("Residual levels to use, 0 = all the codebook has. Each level costs log2(codebook size) bits "
                   "per vector and adds detail; fewer levels = lower bitrate.")


def _register_folder() -> None:
    import folder_paths
    folder_paths.add_model_folder_path(CODEBOOK_FOLDER, os.path.join(folder_paths.models_dir, CODEBOOK_FOLDER))


def _samples(node: str, latent: dict) -> torch.Tensor:
    samples = latent["samples"]
    if samples.dim() not in (4, 5):
        fail(node, "latent", "must be an image latent [B, C, H, W] or a video latent [B, C, T, H, W]")
    return samples


def _levels(node: str, name: str, asked: int, available: int) -> int:
    if asked > available:
        fail(node, name, f"is {asked} but only {available} residual level(s) exist; use 0 for all or a number up to {available}")
    return available if asked == 0 else asked


def _pixels(samples: torch.Tensor, vae, spatial: int, temporal: int) -> int:
    """Pixels of the image(s) or video the latent decodes to, for bits per pixel."""
    if vae is not None:
        spatial = int(vae.spacial_compression_decode())
        temporal = vae.temporal_compression_decode() or 1
    b, h, w = samples.shape[0], samples.shape[-2], samples.shape[-1]
    frames = 1
    if samples.dim() == 5:
        t = samples.shape[2]
        up = getattr(vae, "upscale_ratio", None)
        if isinstance(up, (tuple, list)) and callable(up[0]):
            frames = int(up[0](t))
        else:  # causal video VAEs: the first latent frame is one frame, each further one `temporal`
            frames = 1 + (t - 1) * temporal if temporal > 1 else t
    return b * frames * h * spatial * w * spatial


def _fit_report(title: str, book: Codebook, samples: torch.Tensor, extra: dict) -> tuple[str, torch.Tensor]:
    """Utilisation and reconstruction PSNR per residual level, on the given latent."""
    idx, recs = reconstructions(book, samples)
    rows, psnrs = [], []
    for level, rec in enumerate(recs):
        used = int(torch.unique(idx[level]).numel())
        psnrs.append(metrics.psnr(samples, rec))
        rows.append({"levels": level + 1, "bits_per_vector": round((level + 1) * math.log2(book.size), 2),
                     "used_codes": used, "utilisation_%": round(100 * used / book.size, 1),
                     "latent_psnr_db": round(psnrs[-1], 2)})
    summary = {"codebook_size": book.size, "residual_levels": book.depth, "patch": book.patch,
               "vector_dim": book.dim, "vectors": idx.shape[1], "sha256": book.sha256()[:16], **extra,
               "note": "latent PSNR: peak = the latent's value range"}
    plot = bar_plot([f"L{r['levels']}" for r in rows], psnrs, f"{title}: latent PSNR by residual level (dB)", "dB")
    return report_text(title, summary, rows), plot


def _bitrate_rows(report: dict, latent_elements: int | None) -> list[dict]:
    px = max(report["pixels"], 1)
    rows = [{"storage": "fixed-length indices", "bits": report["fixed_bits"], "bpp": report["fixed_bpp"]},
            {"storage": "empirical entropy (bound)", "bits": report["entropy_bits"], "bpp": report["entropy_bpp"]},
            {"storage": "rANS coded indices", "bits": report["coded_bits"], "bpp": report["coded_bpp"]},
            {"storage": "rANS + frequency table", "bits": report["coded_bits"] + report["table_bits"],
             "bpp": report["coded_with_table_bpp"]}]
    if latent_elements:
        rows.append({"storage": "bf16 latent (reference)", "bits": 16 * latent_elements, "bpp": 16 * latent_elements / px})
    return rows


def _bitrate_outputs(title: str, tokens: Tokens, report: dict, extra: dict) -> tuple[str, torch.Tensor]:
    latent_elements = math.prod(tokens.grid.shape) if tokens.kind == "latent" else None
    rows = _bitrate_rows(report, latent_elements)
    summary = {"tokens": report["tokens"], "levels": report["levels"], "codebook_size": report["codebook_size"],
               "pixels": report["pixels"], "coded_bpp": round(report["coded_bpp"], 5),
               "fixed_bpp": round(report["fixed_bpp"], 5), "entropy_bpp": round(report["entropy_bpp"], 5), **extra}
    plot = bar_plot([r["storage"][:10] for r in rows], [r["bpp"] for r in rows], f"{title}: bits per pixel", "bpp",
                    groups=[r["storage"] for r in rows])
    log.info("%s: %s", title, ", ".join(f"{k}={v}" for k, v in summary.items()))
    return report_text(title, summary, rows), plot


class AccelVQFitCodebook(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQFitCodebook",
            display_name="VQ Fit Codebook",
            category=f"{CATEGORY}/vq",
            description=(
                "Fits a vector-quantization codebook to a LATENT batch with k-means (k-means++ seeding, fixed seed, "
                "codes that end up unused are re-seeded). A vector is one latent pixel's channels (patch 1) or a "
                "p x p patch of them. Residual levels quantize what the previous levels left over (residual VQ): "
                "each level adds log2(size) bits per vector and detail. Reports utilisation and latent PSNR."),
            inputs=[
                io.Latent.Input("latent", tooltip="Latents to learn from (image [B,C,H,W] or video [B,C,T,H,W]); "
                                "a batch of several images gives a more general codebook."),
                io.Int.Input("codebook_size", default=256, min=2, max=65536,
                             tooltip="Codes per level, K (2-65536). Bits per vector and level = log2(K): 256 = 8 bits. "
                             "Must not exceed the number of vectors in the latent."),
                io.Int.Input("patch_size", default=1, min=1, max=8,
                             tooltip="p: each vector is a p x p patch of latent pixels (dimension C*p*p). "
                             "Larger patches = p^2 times fewer tokens (lower bitrate), less detail."),
                io.Int.Input("residual_levels", default=1, min=1, max=8,
                             tooltip="Residual VQ depth (1-8): level 2 quantizes level 1's error, and so on."),
                io.Int.Input("iterations", default=10, min=1, max=200,
                             tooltip="k-means (Lloyd) iterations per level; it stops early when nothing changes."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed of the k-means++ seeding and subsampling: same seed, same codebook."),
            ],
            outputs=[CODEBOOK.Output(display_name="codebook"),
                     io.String.Output(display_name="report"), io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, latent, codebook_size, patch_size, residual_levels, iterations, seed) -> io.NodeOutput:
        node = node_name(cls)
        samples = _samples(node, latent)
        vectors, _ = latent_to_vectors(samples, patch_size)
        if codebook_size > vectors.shape[0]:
            fail(node, "codebook_size", f"is {codebook_size} but the latent has only {vectors.shape[0]} vectors "
                 f"(patch {patch_size}); use at most {vectors.shape[0]}, a smaller patch or a bigger latent batch")
        step = progress(residual_levels * iterations)
        book = fit(vectors, codebook_size, samples.shape[1], patch_size, residual_levels, iterations, seed,
                      progress=step, source=f"fit on {tuple(samples.shape)} latent")
        text, plot = _fit_report("VQ Fit Codebook", book, samples, {"seed": seed, "iterations": iterations})
        log.info("VQ Fit Codebook: K=%d levels=%d patch=%d on %d vectors", codebook_size, residual_levels,
                 patch_size, vectors.shape[0])
        return io.NodeOutput(book, text, plot)


class AccelVQShrinkCodebook(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQShrinkCodebook",
            display_name="VQ Shrink Codebook",
            category=f"{CATEGORY}/vq",
            description=(
                "Makes a smaller codebook from a big one by k-means of its codes, weighted by how often each was used "
                "in the fit: one big fit, then cheaper bitrates without the latents (variable-bitrate VQ)."),
            inputs=[
                CODEBOOK.Input("codebook", tooltip="The codebook to shrink."),
                io.Int.Input("codebook_size", default=64, min=2, max=65536,
                             tooltip="New number of codes per level; must be smaller than the codebook's."),
                io.Int.Input("iterations", default=20, min=1, max=200, tooltip="k-means iterations per level."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="k-means seed."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: a latent to measure the new codebook's PSNR and utilisation on."),
            ],
            outputs=[CODEBOOK.Output(display_name="codebook"),
                     io.String.Output(display_name="report"), io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, codebook, codebook_size, iterations, seed, latent=None) -> io.NodeOutput:
        node = node_name(cls)
        if codebook_size >= codebook.size:
            fail(node, "codebook_size", f"is {codebook_size}; it must be smaller than the codebook's {codebook.size} codes")
        book = shrink(codebook, codebook_size, iterations, seed, progress(codebook.depth * iterations))
        extra = {"from_size": codebook.size}
        if latent is not None:
            samples = _samples(node, latent)
            if samples.shape[1] != book.channels:
                fail(node, "latent", f"has {samples.shape[1]} channels; the codebook is for {book.channels}-channel latents")
            text, plot = _fit_report("VQ Shrink Codebook", book, samples, extra)
        else:
            usage = book.usage[0]
            text = report_text("VQ Shrink Codebook", {**extra, "codebook_size": book.size, "levels": book.depth,
                                                       "sha256": book.sha256()[:16]})
            plot = bar_plot([str(i) for i in range(book.size)], usage.sort(descending=True).values.tolist(),
                            "VQ Shrink Codebook: fit vectors per code (level 1, sorted)", "vectors")
        log.info("VQ Shrink Codebook: %d -> %d codes", codebook.size, book.size)
        return io.NodeOutput(book, text, plot)


class AccelVQSaveCodebook(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQSaveCodebook",
            display_name="VQ Save Codebook",
            category=f"{CATEGORY}/vq",
            description=("Saves a codebook to models/vq_codebooks/ (safetensors) so token files can refer to it by "
                         "name and hash instead of embedding it. Never replaces an existing file."),
            inputs=[CODEBOOK.Input("codebook", tooltip="The codebook to save."),
                    io.String.Input("filename_prefix", default="codebook",
                                    tooltip="File name start; a counter is added (codebook_00001_.safetensors).")],
            outputs=[CODEBOOK.Output(display_name="codebook", tooltip="The same codebook, now knowing its file."),
                     io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, codebook, filename_prefix) -> io.NodeOutput:
        import folder_paths
        node = node_name(cls)
        _register_folder()
        root = folder_paths.get_folder_paths(CODEBOOK_FOLDER)[0]
        folder, stem = output_folder(node, "filename_prefix", filename_prefix, root, f"models/{CODEBOOK_FOLDER}")
        if folder != root:
            fail(node, "filename_prefix", "must be a plain file name (no folders), e.g. 'codebook'")
        path = files.write_new(folder, stem, CODEBOOK_EXT, codebook_bytes(codebook))
        saved = Codebook(codebook.vectors, codebook.channels, codebook.patch, codebook.usage, codebook.source, str(path))
        log.info("VQ Save Codebook: %s", path)
        return io.NodeOutput(saved, str(path), ui={"text": [path.name]})


class AccelVQLoadCodebook(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        _register_folder()
        import folder_paths
        return io.Schema(
            node_id="AccelVQLoadCodebook",
            display_name="VQ Load Codebook",
            category=f"{CATEGORY}/vq",
            description="Loads a codebook saved by VQ Save Codebook from models/vq_codebooks/.",
            inputs=[io.Combo.Input("codebook_name", options=folder_paths.get_filename_list(CODEBOOK_FOLDER),
                                   tooltip="A codebook file in models/vq_codebooks/.")],
            outputs=[CODEBOOK.Output(display_name="codebook")],
        )

    @classmethod
    def execute(cls, codebook_name) -> io.NodeOutput:
        import folder_paths
        node = node_name(cls)
        _register_folder()
        path = folder_file(node, "codebook_name", codebook_name, folder_paths.get_folder_paths(CODEBOOK_FOLDER),
                           f"a codebook file in models/{CODEBOOK_FOLDER}/")
        try:
            return io.NodeOutput(load_codebook(path))
        except VQFileError as e:
            fail(node, "codebook_name", str(e))


class AccelVQEncode(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQEncode",
            display_name="VQ Encode",
            category=f"{CATEGORY}/vq",
            description=("Turns a LATENT into VQ tokens: each vector (latent pixel or patch) becomes the index of its "
                         "nearest code, level by level. Reports the bitrate in bits per pixel of the decoded image "
                         "(fixed-length, empirical entropy, actual rANS-coded size) and the latent PSNR."),
            inputs=[
                io.Latent.Input("latent", tooltip="Image [B,C,H,W] or video [B,C,T,H,W] latent to encode."),
                CODEBOOK.Input("codebook", tooltip="Codebook with the latent's channel count."),
                io.Int.Input("residual_levels", default=0, min=0, max=8, tooltip=_TIP_LEVELS_USE),
                io.Vae.Input("vae", optional=True, tooltip="Optional: the VAE of the latent, only to count the decoded "
                             "image's pixels for bits per pixel (its spatial and temporal compression)."),
                io.Int.Input("spatial_compression", default=8, min=1, max=64, optional=True,
                             tooltip="Without a VAE: latent-to-image scale (8 for SD1.5/SDXL/SD3/Flux/Wan 2.1, 16 for "
                             "Wan 2.2 5B, 32 for LTX-Video)."),
                io.Int.Input("temporal_compression", default=4, min=1, max=16, optional=True,
                             tooltip="Without a VAE, for video latents: frames per latent frame (4 for Wan/Hunyuan, "
                             "8 for LTX-Video); the first latent frame counts as one frame."),
            ],
            outputs=[TOKENS.Output(display_name="tokens"), io.String.Output(display_name="report"),
                     io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, latent, codebook, residual_levels, vae=None, spatial_compression=8,
                temporal_compression=4) -> io.NodeOutput:
        node = node_name(cls)
        samples = _samples(node, latent)
        if samples.shape[1] != codebook.channels:
            fail(node, "codebook", f"is for {codebook.channels}-channel latents but the latent has {samples.shape[1]} "
                 "channels; fit a codebook on latents of this model")
        levels = _levels(node, "residual_levels", residual_levels, codebook.depth)
        pixels = _pixels(samples, vae, spatial_compression, temporal_compression)
        tokens = encode_latent(codebook, samples, pixels, levels)
        psnr = metrics.psnr(samples, decode_latent(tokens))
        text, plot = _bitrate_outputs("VQ Encode", tokens, bitrate(tokens), {"latent_psnr_db": round(psnr, 2)})
        return io.NodeOutput(tokens, text, plot)


class AccelVQDecode(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQDecode",
            display_name="VQ Decode",
            category=f"{CATEGORY}/vq",
            description="Turns VQ tokens back into a LATENT (the sum of each level's chosen codes), for VAE Decode.",
            inputs=[
                TOKENS.Input("tokens", tooltip="Tokens from VQ Encode or VQ Load Tokens."),
                CODEBOOK.Input("codebook", optional=True, tooltip="The codebook the tokens were encoded with; optional "
                               "when the tokens carry it (from VQ Encode, or a token file that embeds it)."),
                io.Int.Input("residual_levels", default=0, min=0, max=8, tooltip=_TIP_LEVELS_USE),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, tokens, residual_levels, codebook=None) -> io.NodeOutput:
        node = node_name(cls)
        if tokens.kind != "latent":
            fail(node, "tokens", "are Stable Cascade Stage A image tokens; decode them with VQGAN Decode (Stage A)")
        levels = _levels(node, "residual_levels", residual_levels, tokens.depth)
        try:
            samples = decode_latent(tokens, codebook, levels)
        except VQFileError as e:
            fail(node, "codebook", str(e))
        return io.NodeOutput({"samples": samples})


class AccelVQSaveTokens(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQSaveTokens",
            display_name="VQ Save Tokens",
            category=f"{CATEGORY}/vq",
            description=("Saves tokens to output/vq_tokens/ as a .vqt file (safetensors): rANS entropy-coded indices "
                         "with their frequency tables, and the codebook or its hash and file name. Reports the real "
                         "file size in bits per pixel. Never replaces an existing file (a counter is added)."),
            inputs=[
                TOKENS.Input("tokens", tooltip="Tokens to save."),
                io.String.Input("filename_prefix", default=f"{TOKENS_SUBFOLDER}/ComfyUI",
                                tooltip="Path under output/ and file name start; a counter is added."),
                io.Boolean.Input("embed_codebook", default=True,
                                 tooltip="On: the file holds the codebook (self-contained, bigger). Off: only its hash "
                                 "and file name (the codebook must have been saved with VQ Save Codebook)."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="plot")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, tokens, filename_prefix, embed_codebook) -> io.NodeOutput:
        import folder_paths
        node = node_name(cls)
        if not embed_codebook and not tokens.codebook_name and tokens.kind == "latent":
            fail(node, "embed_codebook", "is off but the codebook has no file: save it first with VQ Save Codebook "
                 "(and encode with that codebook), or turn embed_codebook on")
        if embed_codebook and tokens.codebook is None:
            fail(node, "embed_codebook", "is on but these tokens carry no codebook (they came from a file without "
                 "one); turn it off to refer to the codebook by hash")
        out_dir = folder_paths.get_output_directory()
        folder, stem = output_folder(node, "filename_prefix", filename_prefix, out_dir)
        subfolder = os.path.relpath(folder, os.path.realpath(out_dir)).replace(os.sep, "/").removeprefix(".")
        try:
            data, report = tokens_bytes(tokens, embed_codebook, tokens.codebook_name)
        except VQFileError as e:
            fail(node, "tokens", str(e))
        path = files.write_new(folder, stem, TOKENS_EXT, data)
        file_bits = 8 * path.stat().st_size
        extra = {"file": str(Path(subfolder) / path.name), "file_bytes": path.stat().st_size,
                 "file_bpp": round(file_bits / max(report["pixels"], 1), 5),
                 "codebook_embedded": embed_codebook}
        text, plot = _bitrate_outputs("VQ Save Tokens", tokens, report, extra)
        saved = {"filename": path.name, "subfolder": subfolder, "type": "output"}
        return io.NodeOutput(text, plot, ui={"text": [text], "vq_tokens": [saved]})


def _token_files() -> list[str]:
    """Token files in input/ (any subfolder) and in output/vq_tokens/ (marked [output]); only
    output/vq_tokens, since the whole output folder can hold thousands of images. The listings
    are cached (ComfyUI asks for them on every /object_info and prompt)."""
    import folder_paths
    output = Path(folder_paths.get_output_directory()) / TOKENS_SUBFOLDER
    found = files.listing(folder_paths.get_input_directory(), TOKENS_EXT)
    if output.is_dir():
        found = found + [f"{TOKENS_SUBFOLDER}/{name} [output]" for name in files.listing(output, TOKENS_EXT)]
    return found


def _token_path(value: str) -> Path | None:
    """The token file a combo value names, inside input/ or output/, or None."""
    name, root = annotated_file(value)
    path = files.inside(root, name, comfy_folders())
    return path if path is not None and path.is_file() else None


class AccelVQLoadTokens(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQLoadTokens",
            display_name="VQ Load Tokens",
            category=f"{CATEGORY}/vq",
            description=("Loads a .vqt token file (from input/, or output/ marked [output]) and checks it: complete, "
                         "undamaged, and made with the connected codebook (same hash and channels)."),
            inputs=[
                io.Combo.Input("token_file", options=_token_files(),
                               tooltip="A .vqt file saved by VQ Save Tokens: from input/, or from output/vq_tokens/ "
                               "(marked [output])."),
                CODEBOOK.Input("codebook", optional=True, tooltip="The codebook the tokens were made with. Needed when "
                               "the file does not embed one; when given, it must match the file's hash."),
            ],
            outputs=[TOKENS.Output(display_name="tokens"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, token_file, codebook=None):
        path = _token_path(token_file) if isinstance(token_file, str) else None
        return os.path.getmtime(path) if path is not None else ""

    @classmethod
    def execute(cls, token_file, codebook=None) -> io.NodeOutput:
        node = node_name(cls)
        name, root = annotated_file(token_file)
        path = folder_file(node, "token_file", name, [root], "a token file in input/ or output/vq_tokens/")
        try:
            tokens, stored = load_tokens(path, codebook, progress=lambda *_: check_interrupt())
        except CodebookMismatch as e:   # the connected codebook, or the file's own one
            fail(node, "codebook" if codebook is not None else "token_file", str(e))
        except VQFileError as e:
            fail(node, "token_file", str(e))
        if codebook is not None:
            where = "connected"
        elif tokens.codebook is not None:
            where = "embedded in the file"
        else:
            tokens.codebook = _codebook_by_name(tokens) if tokens.codebook_name else None
            where = (f"models/{CODEBOOK_FOLDER}/{tokens.codebook_name}" if tokens.codebook is not None else
                     f"not found ({tokens.codebook_name or 'the file names none'}): connect it to VQ Decode")
        size = path.stat().st_size
        summary = {"file": path.name, "file_bytes": size, "file_bpp": round(8 * size / max(tokens.pixels, 1), 5),
                   "coded_bpp": round(stored.get("coded_bpp", float("nan")), 5), "codebook": where}
        text = report_text("VQ Load Tokens", summary, _bitrate_rows(stored, None) if stored else None)
        log.info("VQ Load Tokens: %s (%d tokens, %d levels)", path.name, tokens.count, tokens.depth)
        return io.NodeOutput(tokens, text)


def _codebook_by_name(tokens: Tokens) -> Codebook | None:
    """The codebook a token file names, from models/vq_codebooks, if it is there and matches.
    The name comes from the file: it is resolved inside that folder like any user input."""
    import folder_paths
    _register_folder()
    for root in folder_paths.get_folder_paths(CODEBOOK_FOLDER):
        path = files.inside(root, tokens.codebook_name, comfy_folders())
        if path is not None and path.is_file():
            break
    else:
        return None
    try:
        book = load_codebook(path)
    except VQFileError:
        return None
    return book if book.sha256() == tokens.codebook_sha256 else None


# ------------------------------ Stable Cascade Stage A: a real pretrained VQGAN that ComfyUI loads as a VAE


def _stage_a_codebook(node: str, vae) -> Codebook:
    from comfy.ldm.cascade.stage_a import StageA
    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, StageA):
        fail(node, "vae", f"must be Stable Cascade Stage A (stage_a.safetensors loaded with Load VAE); this VAE is a "
             f"{type(model).__name__}")
    weight = model.vquantizer.codebook.weight.detach().float().cpu()
    return Codebook(weight[None].clone(), channels=model.c_latent, patch=1, source="Stable Cascade Stage A")


class AccelVQGANEncode(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQGANEncode",
            display_name="VQGAN Encode (Stage A)",
            category=f"{CATEGORY}/vq",
            description=("Encodes an IMAGE to the discrete tokens of Stable Cascade's Stage A VQGAN (its own 8192-code "
                         "codebook, one token per 4x4 pixels) and reports the bitrate in bits per pixel and, "
                         "optionally, the PSNR of the decoded image."),
            inputs=[
                io.Image.Input("image", tooltip="Images to encode; sides are cropped to a multiple of 4."),
                io.Vae.Input("vae", tooltip="Stable Cascade Stage A (stage_a.safetensors) loaded with Load VAE."),
                io.Boolean.Input("report_psnr", default=True,
                                 tooltip="Also decode the tokens to measure the image PSNR (costs one VAE decode)."),
            ],
            outputs=[TOKENS.Output(display_name="tokens"), io.String.Output(display_name="report"),
                     io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, image, vae, report_psnr) -> io.NodeOutput:
        node = node_name(cls)
        book = _stage_a_codebook(node, vae)
        latent = vae.encode(image[..., :3])
        h, w = latent.shape[-2] * 4, latent.shape[-1] * 4
        tokens = encode_latent(book, latent.float(), pixels=latent.shape[0] * h * w)
        tokens.kind = "vqgan"
        extra = {}
        if report_psnr:
            decoded = vae.decode(decode_latent(tokens).to(latent.dtype))
            ref = image[:, :h, :w, :3].to(decoded.device, decoded.dtype)
            extra["image_psnr_db"] = round(metrics.psnr(ref, decoded.clamp(0, 1), data_range=1.0), 2)
        text, plot = _bitrate_outputs("VQGAN Encode (Stage A)", tokens, bitrate(tokens), extra)
        return io.NodeOutput(tokens, text, plot)


class AccelVQGANDecode(AccelNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccelVQGANDecode",
            display_name="VQGAN Decode (Stage A)",
            category=f"{CATEGORY}/vq",
            description="Decodes Stable Cascade Stage A tokens back to an IMAGE with the same Stage A VAE.",
            inputs=[TOKENS.Input("tokens", tooltip="Tokens from VQGAN Encode (Stage A) or VQ Load Tokens."),
                    io.Vae.Input("vae", tooltip="The Stage A VAE the tokens were made with (its codebook must match).")],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, tokens, vae) -> io.NodeOutput:
        node = node_name(cls)
        book = _stage_a_codebook(node, vae)
        if tokens.kind != "vqgan":
            fail(node, "tokens", "are latent tokens from VQ Encode; decode them with VQ Decode")
        try:
            latent = decode_latent(tokens, book)
        except VQFileError as e:
            fail(node, "vae", f"does not match the tokens: {e}")
        return io.NodeOutput(vae.decode(latent))


NODES = [AccelVQFitCodebook, AccelVQShrinkCodebook, AccelVQSaveCodebook, AccelVQLoadCodebook, AccelVQEncode,
         AccelVQDecode, AccelVQSaveTokens, AccelVQLoadTokens, AccelVQGANEncode, AccelVQGANDecode]
