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

import numpy as np
import safetensors
import safetensors.torch
import torch

from ..files import write_new  # noqa: F401  (re-exported: the nodes save through it)
from . import entropy
from . import codebook as cbmod
from .codebook import Codebook, Grid

TOKENS_FORMAT = "comfyui-accel.vq-tokens"
CODEBOOK_FORMAT = "comfyui-accel.vq-codebook"
VERSION = "1"
TOKENS_EXT = ".vqt"
CODEBOOK_EXT = ".safetensors"


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


# ---------------------------------------------------------------------------------------------
# codebook files


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
            raise VQFileError(f"{path.name} is not a VQ codebook file (format {meta.get('format')!r})")
        vectors = _tensor(f, "codebook", path, "codebook file")
        usage = _tensor(f, "usage", path, "codebook file") if "usage" in f.keys() else None
    cb = Codebook(vectors.float(), int(meta["channels"]), int(meta["patch"]), usage,
                  source=meta.get("source", ""), path=str(path))
    if cb.sha256() != meta.get("sha256"):
        raise VQFileError(f"codebook file {path.name} is damaged: its content does not match its stored hash")
    return cb


# ---------------------------------------------------------------------------------------------
# token files


def tokens_bytes(tokens: Tokens, embed_codebook: bool, codebook_name: str | None = None) -> tuple[bytes, dict]:
    """The file's bytes and its bitrate report (which the file also carries)."""
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


def load_tokens(path: str | Path, codebook: Codebook | None = None) -> tuple[Tokens, dict]:
    """Read and check a token file. ``codebook``, when given, must be the one the tokens were made with."""
    path = Path(path)
    with _open(path, "token file") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TOKENS_FORMAT:
            raise VQFileError(f"{path.name} is not a VQ token file (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise VQFileError(f"{path.name} is token format version {meta.get('version')}; this ComfyUI-Accel reads version {VERSION}")
        try:
            shape = tuple(json.loads(meta["latent_shape"]))
            patch, levels, k = int(meta["patch"]), int(meta["levels"]), int(meta["codebook_size"])
            counts, lanes = json.loads(meta["counts"]), json.loads(meta["lanes"])
            pixels = int(meta["pixels"])
        except (KeyError, ValueError) as e:
            raise VQFileError(f"token file {path.name} has damaged metadata ({e})") from None
        digest = hashlib.sha256()
        coded = []
        for level in range(levels):
            words, table = (_tensor(f, f"level{level}.{n}", path, "token file").numpy() for n in ("words", "table"))
            digest.update(words.tobytes())
            digest.update(table.tobytes())
            coded.append((words, table))
        embedded = _tensor(f, "codebook", path, "token file").float() if "codebook" in f.keys() else None
    if digest.hexdigest() != meta.get("payload_sha256"):
        raise VQFileError(f"token file {path.name} is damaged: its coded indices do not match their stored hash")
    grid = Grid(shape, patch)
    want = meta["codebook_sha256"]
    if codebook is not None:
        check_compatible(codebook, grid, k, levels)
    if codebook is not None and codebook.sha256() != want:
        raise CodebookMismatch(f"{path.name} was made with another codebook (hash {want[:12]}…, the given one is "
                          f"{codebook.sha256()[:12]}…); connect the codebook the tokens were encoded with")
    if codebook is None and embedded is not None:
        codebook = Codebook(embedded, shape[1], patch, source=f"embedded in {path.name}")
        if codebook.sha256() != want:
            raise VQFileError(f"token file {path.name} is damaged: its embedded codebook does not match its hash")
        check_compatible(codebook, grid, k, levels)
    try:
        levels_idx = []
        for (words, table), n, lane in zip(coded, counts, lanes):
            symbols, hist = entropy.unpack_table(table.tobytes(), k)
            levels_idx.append(torch.from_numpy(entropy.decode(entropy.Coded(words.view(np.uint32), symbols, hist, n, lane))))
    except ValueError as e:
        raise VQFileError(f"token file {path.name}: {e}") from None
    tokens_shape = grid.tokens_shape
    if any(t.numel() != math.prod(tokens_shape) for t in levels_idx):
        raise VQFileError(f"token file {path.name} is damaged: it holds a different number of tokens than its shape says")
    if any(int(t.max()) >= k for t in levels_idx if t.numel()):
        raise VQFileError(f"token file {path.name} is damaged: an index is outside its {k}-code codebook")
    tokens = Tokens(torch.stack([t.reshape(tokens_shape) for t in levels_idx]), grid, k, want, pixels,
                    codebook=codebook, kind=meta.get("kind", "latent"), codebook_name=meta.get("codebook_name"))
    return tokens, json.loads(meta.get("bitrate", "{}"))


def check_compatible(codebook: Codebook, grid: Grid, k: int, levels: int) -> None:
    if codebook.channels != grid.shape[1]:
        raise CodebookMismatch(f"the codebook is for {codebook.channels}-channel latents but the tokens are of a "
                          f"{grid.shape[1]}-channel latent")
    if codebook.patch != grid.patch:
        raise CodebookMismatch(f"the codebook uses {codebook.patch}x{codebook.patch} patches but the tokens use "
                          f"{grid.patch}x{grid.patch}")
    if codebook.size != k or codebook.depth < levels:
        raise CodebookMismatch(f"the codebook has {codebook.depth} level(s) of {codebook.size} codes; the tokens need "
                          f"{levels} level(s) of {k}")


# ---------------------------------------------------------------------------------------------
# latents <-> tokens


def encode_latent(codebook: Codebook, samples: torch.Tensor, pixels: int, depth: int | None = None,
                  backend: str = "auto") -> Tokens:
    """Tokens of a latent [B, C, H, W] or [B, C, T, H, W] with ``depth`` (default all) levels."""
    if samples.dim() not in (4, 5):
        raise VQFileError(f"a latent is [B, C, H, W] or [B, C, T, H, W]; got {tuple(samples.shape)}")
    vectors, grid = cbmod.latent_to_vectors(samples, codebook.patch)
    check_compatible(codebook, grid, codebook.size, depth or codebook.depth)
    idx = cbmod.encode(codebook, vectors, depth, backend)
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
    return cbmod.vectors_to_latent(cbmod.decode(codebook, flat), tokens.grid)
