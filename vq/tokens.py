"""VQ tokens in memory and in files, and what they cost in bits.

A token file is a safetensors file (extension ``.vqt``) holding, per residual level, the rANS-coded
indices and the compact histogram they were coded with, plus either the codebook itself or its
SHA-256 and file name. Metadata records the latent's shape, the patch size, the pixel count of the
decoded image and the bitrate report. Files are written atomically and never replace an existing
file: a name that is taken gets the next counter.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors
import safetensors.torch
import torch

from . import entropy
from .codebook import Codebook, Grid, decode, encode, latent_to_vectors, vectors_problem, vectors_to_latent

TOKENS_FORMAT = "comfyui-accel.vq-tokens"
CODEBOOK_FORMAT = "comfyui-accel.vq-codebook"
VERSION = "1"
TOKENS_EXT = ".vqt"
CODEBOOK_EXT = ".safetensors"


# What a token or codebook file may describe. A reader's work is bounded by these before it
# decodes anything: about 4 s of rANS decoding for MAX_TOKENS on a busy CPU core.
MAX_TOKENS = 1 << 23            # indices per file, all levels together
MAX_LATENT_ELEMENTS = 1 << 28   # elements of the latent it decodes to (1 GiB in float32)
MAX_SIDE = 1 << 20              # any one dimension of that latent
MAX_CHANNELS = 1024
MAX_PATCH = 8
MAX_LEVELS = 8
MAX_CODES = 1 << 16


class VQFileError(ValueError):
    """A token or codebook file that cannot be used, said so a person can act on it."""


class CodebookMismatch(VQFileError):
    """Tokens and a codebook that do not belong together (hash, channels, patch or size)."""


@dataclass
class Tokens:
    indices: torch.Tensor          # int64 [depth, *grid.tokens_shape] on the CPU
    grid: Grid
    codebook_size: int
    codebook_sha256: str
    pixels: int                    # pixels of the decoded image(s), all items and frames
    codebook: Codebook | None = None
    kind: str = "latent"           # "latent" (our codebooks) or "vqgan" (Stable Cascade Stage A)
    codebook_name: str | None = None  # file name of a codebook referred to by hash

    @property
    def depth(self) -> int:
        return self.indices.shape[0]

    @property
    def count(self) -> int:
        return self.indices[0].numel()


def bitrate(tokens: Tokens, coded: list[entropy.Coded] | None = None) -> dict:
    """Fixed-length bits, empirical entropy and actual rANS-coded bits, also per decoded pixel."""
    coded = coded if coded is not None else [entropy.encode(lvl.reshape(-1).numpy()) for lvl in tokens.indices]
    fixed = sum(entropy.bits_fixed(tokens.count, tokens.codebook_size) for _ in range(tokens.depth))
    h = sum(entropy.empirical_entropy_bits(lvl.reshape(-1).numpy()) for lvl in tokens.indices)
    payload = 8 * sum(c.payload_bytes for c in coded)
    table = 8 * sum(c.table_bytes(tokens.codebook_size) for c in coded)
    px = max(tokens.pixels, 1)
    return {
        "tokens": tokens.count, "levels": tokens.depth, "codebook_size": tokens.codebook_size,
        "pixels": tokens.pixels,
        "fixed_bits": fixed, "entropy_bits": round(h, 1), "coded_bits": payload, "table_bits": table,
        "fixed_bpp": fixed / px, "entropy_bpp": h / px, "coded_bpp": payload / px,
        "coded_with_table_bpp": (payload + table) / px,
        "used_codes": [int(torch.unique(lvl).numel()) for lvl in tokens.indices],
    }


def _open(path: Path, what: str):
    if not path.is_file():
        raise VQFileError(f"{what} {path.name} does not exist")
    try:
        return safetensors.safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise VQFileError(f"{what} {path.name} is truncated or not a safetensors file ({e})") from None


def _tensor(f, name: str, path: Path, what: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise VQFileError(f"{what} {path.name} is truncated or damaged: tensor '{name}' cannot be read ({e})") from None


# ---------------------------------------------------------------- codebook files


def codebook_bytes(codebook: Codebook) -> bytes:
    tensors = {"codebook": codebook.vectors.float().contiguous()}
    if codebook.usage is not None:
        tensors["usage"] = codebook.usage.float().contiguous()
    meta = {"format": CODEBOOK_FORMAT, "version": VERSION, "channels": str(codebook.channels),
            "patch": str(codebook.patch), "sha256": codebook.sha256(), "source": codebook.source}
    return safetensors.torch.save(tensors, metadata=meta)


def load_codebook(path: str | Path) -> Codebook:
    path = Path(path)
    with _open(path, "codebook file") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CODEBOOK_FORMAT:
            raise VQFileError(f"{path.name} is not a VQ codebook file (format {_short(meta.get('format'))})")
        channels = _int_field(meta, "channels", 1, MAX_CHANNELS, path)
        patch = _int_field(meta, "patch", 1, MAX_PATCH, path)
        vectors = _float_tensor(f, "codebook", path, "codebook file")
        usage = _float_tensor(f, "usage", path, "codebook file") if "usage" in f.keys() else None
    problem = vectors_problem(vectors, channels, patch)
    if problem is None and usage is not None and tuple(usage.shape) != tuple(vectors.shape[:2]):
        problem = f"its usage counts are {list(usage.shape)}, not [levels, codes] = {list(vectors.shape[:2])}"
    if problem:
        raise VQFileError(f"codebook file {path.name} is damaged: {problem}")
    book = Codebook(vectors, channels, patch, usage, source=str(meta.get("source", ""))[:200], path=str(path))
    if book.sha256() != meta.get("sha256"):
        raise VQFileError(f"codebook file {path.name} is damaged: its content does not match its stored hash")
    return book


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_field(meta: dict, key: str, low: int, high: int, path: Path) -> int:
    text = meta.get(key)
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        raise VQFileError(f"{path.name} has damaged metadata: '{key}' is {_short(text)}, expected a whole number "
                          f"from {low} to {high}")
    return value


def _json_field(meta: dict, key: str, path: Path):
    try:
        return json.loads(meta[key])
    except (KeyError, TypeError, ValueError):
        raise VQFileError(f"{path.name} has damaged metadata: '{key}' is missing or not JSON") from None


def _int_list(value, length: int | None, low: int, high: int, key: str, path: Path) -> list[int]:
    ok = (isinstance(value, list) and (length is None or len(value) == length)
          and all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value))
    if not ok:
        want = f"{length} whole numbers" if length is not None else "whole numbers"
        raise VQFileError(f"{path.name} has damaged metadata: '{key}' is {_short(value)}, expected {want} "
                          f"from {low} to {high}")
    return value


def _float_tensor(f, name: str, path: Path, what: str) -> torch.Tensor:
    t = _tensor(f, name, path, what)
    if not t.is_floating_point():
        raise VQFileError(f"{what} {path.name} is damaged: tensor '{name}' is {t.dtype}, not floating point")
    t = t.float()
    if not torch.isfinite(t).all():
        raise VQFileError(f"{what} {path.name} is damaged: tensor '{name}' holds NaN or infinite values")
    return t


# ---------------------------------------------------------------- token files


def tokens_bytes(tokens: Tokens, embed_codebook: bool, codebook_name: str | None = None) -> tuple[bytes, dict]:
    """The file's bytes and its bitrate report (which the file also carries)."""
    if tokens.count * tokens.depth > MAX_TOKENS:
        raise VQFileError(f"{tokens.depth} level(s) of {tokens.count} tokens are more than a token file holds "
                          f"({MAX_TOKENS}); use fewer residual levels, a bigger patch or a smaller latent")
    coded = [entropy.encode(lvl.reshape(-1).numpy()) for lvl in tokens.indices]
    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    for level, c in enumerate(coded):
        words = c.words.view(np.int32)
        table = np.frombuffer(bytearray(entropy.pack_table(c.symbols, c.counts, tokens.codebook_size)), np.uint8)
        for name, arr in ((f"level{level}.words", words), (f"level{level}.table", table)):
            tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
            digest.update(arr.tobytes())
    if embed_codebook:
        if tokens.codebook is None:
            raise VQFileError("these tokens carry no codebook to embed")
        tensors["codebook"] = tokens.codebook.vectors.float().contiguous()
    report = bitrate(tokens, coded)
    meta = {
        "format": TOKENS_FORMAT, "version": VERSION, "kind": tokens.kind,
        "latent_shape": json.dumps(list(tokens.grid.shape)), "patch": str(tokens.grid.patch),
        "levels": str(tokens.depth), "codebook_size": str(tokens.codebook_size),
        "codebook_sha256": tokens.codebook_sha256, "pixels": str(tokens.pixels),
        "channels": str(tokens.grid.shape[1]),
        "counts": json.dumps([c.count for c in coded]), "lanes": json.dumps([c.lanes for c in coded]),
        "scale_bits": str(entropy.SCALE_BITS), "payload_sha256": digest.hexdigest(),
        "codebook_embedded": "1" if embed_codebook else "0", "bitrate": json.dumps(report),
    }
    if codebook_name:
        meta["codebook_name"] = codebook_name
    return safetensors.torch.save(tensors, metadata=meta), report


@dataclass
class _Header:
    shape: tuple[int, ...]
    patch: int
    levels: int
    k: int
    counts: list[int]
    lanes: list[int]
    pixels: int
    kind: str
    sha256: str
    codebook_name: str | None


def _header(meta: dict, path: Path) -> _Header:
    """The token file's metadata, every field checked, and the token count checked against the
    latent shape: all before a single index is decoded."""
    if meta.get("format") != TOKENS_FORMAT:
        raise VQFileError(f"{path.name} is not a VQ token file (format {_short(meta.get('format'))})")
    if meta.get("version") != VERSION:
        raise VQFileError(f"{path.name} is token format version {_short(meta.get('version'))}; this ComfyUI-Accel "
                          f"reads version {VERSION}")
    shape = _json_field(meta, "latent_shape", path)
    if not (isinstance(shape, list) and len(shape) in (4, 5)):
        raise VQFileError(f"{path.name} has damaged metadata: 'latent_shape' is {_short(shape)}, expected "
                          "[B, C, H, W] or [B, C, T, H, W]")
    shape = tuple(_int_list(shape, None, 1, MAX_SIDE, "latent_shape", path))
    if shape[1] > MAX_CHANNELS or math.prod(shape) > MAX_LATENT_ELEMENTS:
        raise VQFileError(f"{path.name} describes a {list(shape)} latent; this reader takes up to {MAX_CHANNELS} "
                          f"channels and {MAX_LATENT_ELEMENTS} elements")
    patch = _int_field(meta, "patch", 1, MAX_PATCH, path)
    levels = _int_field(meta, "levels", 1, MAX_LEVELS, path)
    k = _int_field(meta, "codebook_size", 2, MAX_CODES, path)
    pixels = _int_field(meta, "pixels", 0, 2 ** 53, path)
    counts = _int_list(_json_field(meta, "counts", path), levels, 0, MAX_TOKENS, "counts", path)
    lanes = _int_list(_json_field(meta, "lanes", path), levels, 1, entropy.MAX_LANES, "lanes", path)
    tokens = math.prod(Grid(shape, patch).tokens_shape)
    if tokens * levels > MAX_TOKENS:
        raise VQFileError(f"{path.name} holds {levels} level(s) of {tokens} tokens; this reader takes up to "
                          f"{MAX_TOKENS} tokens per file")
    if any(c != tokens for c in counts):
        raise VQFileError(f"token file {path.name} is damaged: its levels hold {counts} tokens, its latent shape "
                          f"{list(shape)} with patch {patch} has {tokens}")
    sha = meta.get("codebook_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise VQFileError(f"{path.name} has damaged metadata: 'codebook_sha256' is not a SHA-256")
    kind = meta.get("kind", "latent")
    if kind not in ("latent", "vqgan"):
        raise VQFileError(f"{path.name} has damaged metadata: 'kind' is {_short(kind)}, expected 'latent' or 'vqgan'")
    name = meta.get("codebook_name")
    return _Header(shape, patch, levels, k, counts, lanes, pixels, kind, sha,
                   name if isinstance(name, str) and 0 < len(name) <= 255 else None)


def _stream(f, level: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(words as uint32, table bytes) of one level, their dtypes and ranks checked first."""
    out = []
    for part, dtype in (("words", torch.int32), ("table", torch.uint8)):
        t = _tensor(f, f"level{level}.{part}", path, "token file")
        if t.dtype != dtype or t.dim() != 1:
            raise VQFileError(f"token file {path.name} is damaged: 'level{level}.{part}' is {t.dtype} "
                              f"{list(t.shape)}, expected a 1-D {dtype} tensor")
        out.append(t.numpy())
    return out[0], out[1]


def load_tokens(path: str | Path, codebook: Codebook | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[Tokens, dict]:
    """Read and check a token file. ``codebook``, when given, must be the one the tokens were made
    with. ``progress(done, total)`` is called while decoding (ComfyUI's interrupt check)."""
    path = Path(path)
    with _open(path, "token file") as f:
        meta = f.metadata() or {}
        head = _header(meta, path)
        digest = hashlib.sha256()
        coded = []
        for level in range(head.levels):
            words, table = _stream(f, level, path)
            digest.update(words.tobytes())
            digest.update(table.tobytes())
            coded.append((words, table))
        embedded = _float_tensor(f, "codebook", path, "token file") if "codebook" in f.keys() else None
    if digest.hexdigest() != meta.get("payload_sha256"):
        raise VQFileError(f"token file {path.name} is damaged: its coded indices do not match their stored hash")
    grid = Grid(head.shape, head.patch)
    if codebook is not None:
        check_compatible(codebook, grid, head.k, head.levels)
        if codebook.sha256() != head.sha256:
            raise CodebookMismatch(f"{path.name} was made with another codebook (hash {head.sha256[:12]}…, the given "
                                   f"one is {codebook.sha256()[:12]}…); connect the codebook the tokens were encoded with")
    if codebook is None and embedded is not None:
        problem = vectors_problem(embedded, head.shape[1], head.patch)
        if problem:
            raise VQFileError(f"token file {path.name} is damaged: its embedded codebook {problem}")
        codebook = Codebook(embedded, head.shape[1], head.patch, source=f"embedded in {path.name}")
        if codebook.sha256() != head.sha256:
            raise VQFileError(f"token file {path.name} is damaged: its embedded codebook does not match its hash")
        check_compatible(codebook, grid, head.k, head.levels)
    tokens_shape = grid.tokens_shape
    done = 0
    levels_idx = []
    try:
        for (words, table), n, lane in zip(coded, head.counts, head.lanes):
            symbols, hist = entropy.unpack_table(table.tobytes(), head.k)
            stream = entropy.Coded(words.view(np.uint32), symbols, hist, n, lane)
            entropy.check(stream, head.k)
            step = None if progress is None else (lambda t, steps, base=done: progress(base + t * lane, n * head.levels))
            levels_idx.append(torch.from_numpy(entropy.decode(stream, step)).reshape(tokens_shape))
            done += n
    except ValueError as e:
        raise VQFileError(f"token file {path.name}: {e}") from None
    tokens = Tokens(torch.stack(levels_idx), grid, head.k, head.sha256, head.pixels, codebook=codebook,
                    kind=head.kind, codebook_name=head.codebook_name)
    return tokens, _stored_report(meta)


_REPORT_KEYS = ("pixels", "fixed_bits", "entropy_bits", "coded_bits", "table_bits", "fixed_bpp", "entropy_bpp",
                "coded_bpp", "coded_with_table_bpp")


def _stored_report(meta: dict) -> dict:
    """The bitrate report the file carries, if it is one (else {}: the report is informative only)."""
    try:
        report = json.loads(meta.get("bitrate", "{}"))
    except (TypeError, ValueError):
        return {}
    ok = isinstance(report, dict) and all(isinstance(report.get(k), (int, float)) and not isinstance(report.get(k), bool)
                                          and math.isfinite(report[k]) for k in _REPORT_KEYS)
    return report if ok else {}


def check_compatible(codebook: Codebook, grid: Grid, k: int, levels: int) -> None:
    problem = vectors_problem(codebook.vectors, codebook.channels, codebook.patch)
    if problem:
        raise CodebookMismatch(f"the codebook {problem}")
    if codebook.channels != grid.shape[1]:
        raise CodebookMismatch(f"the codebook is for {codebook.channels}-channel latents but the tokens are of a "
                          f"{grid.shape[1]}-channel latent")
    if codebook.patch != grid.patch:
        raise CodebookMismatch(f"the codebook uses {codebook.patch}x{codebook.patch} patches but the tokens use "
                          f"{grid.patch}x{grid.patch}")
    if codebook.size != k or codebook.depth < levels:
        raise CodebookMismatch(f"the codebook has {codebook.depth} level(s) of {codebook.size} codes; the tokens need "
                          f"{levels} level(s) of {k}")


# ---------------------------------------------------------------- latents <-> tokens


def encode_latent(codebook: Codebook, samples: torch.Tensor, pixels: int, depth: int | None = None,
                  backend: str = "auto") -> Tokens:
    """Tokens of a latent [B, C, H, W] or [B, C, T, H, W] with ``depth`` (default all) levels."""
    if samples.dim() not in (4, 5):
        raise VQFileError(f"a latent is [B, C, H, W] or [B, C, T, H, W]; got {tuple(samples.shape)}")
    vectors, grid = latent_to_vectors(samples, codebook.patch)
    check_compatible(codebook, grid, codebook.size, depth or codebook.depth)
    idx = encode(codebook, vectors, depth, backend)
    return Tokens(idx.reshape(idx.shape[0], *grid.tokens_shape).cpu(), grid, codebook.size, codebook.sha256(),
                  pixels, codebook=codebook, codebook_name=Path(codebook.path).name if codebook.path else None)


def decode_latent(tokens: Tokens, codebook: Codebook | None = None, depth: int | None = None) -> torch.Tensor:
    """The float32 latent the tokens stand for, from their own codebook or the one given."""
    codebook = codebook or tokens.codebook
    if codebook is None:
        raise CodebookMismatch("these tokens carry no codebook; connect the codebook they were encoded with")
    check_compatible(codebook, tokens.grid, tokens.codebook_size, tokens.depth)
    if codebook.sha256() != tokens.codebook_sha256:
        raise CodebookMismatch(f"the tokens were made with another codebook (hash {tokens.codebook_sha256[:12]}…, "
                          f"the given one is {codebook.sha256()[:12]}…)")
    levels = tokens.depth if depth is None else min(depth, tokens.depth)
    flat = tokens.indices[:levels].reshape(levels, -1)
    return vectors_to_latent(decode(codebook, flat), tokens.grid)
