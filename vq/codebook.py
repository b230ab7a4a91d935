"""Codebooks fitted on latents: vectors, residual levels, fitting, shrinking, encode/decode.

A latent ``[B, C, H, W]`` (or a video latent ``[B, C, T, H, W]``) is cut into vectors of one
latent pixel's channels (``patch=1``, D = C) or of ``p x p`` patches (D = C p^2); the edges are
padded by replication to a multiple of ``p`` and cropped again on decode. A codebook holds
``depth`` levels of ``K`` codes: level 1 quantizes the vectors, each further level quantizes
what the levels before left over (residual VQ), so one vector costs ``depth * log2(K)`` bits.

No ComfyUI import here: the nodes pass latents in and get tensors out.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels.kmeans import kmeans, nearest_centroid

log = logging.getLogger(__name__)

# Fitting uses at most this many vectors per code (a random subset), as faiss does: more
# vectors barely move the centroids and cost time linearly.
MAX_VECTORS_PER_CODE = 256


@dataclass
class Codebook:
    vectors: torch.Tensor          # float32 [depth, K, D] on the CPU
    channels: int                  # latent channels C
    patch: int = 1                 # p: D = C * p * p
    usage: torch.Tensor | None = None  # vectors per code in the fit, float32 [depth, K]
    source: str = ""               # where it came from (for reports)
    path: str | None = None        # the file it was loaded from or saved to, if any
    _hash: str | None = field(default=None, repr=False, compare=False)

    @property
    def depth(self) -> int:
        return self.vectors.shape[0]

    @property
    def size(self) -> int:
        return self.vectors.shape[1]

    @property
    def dim(self) -> int:
        return self.vectors.shape[2]

    def sha256(self) -> str:
        """Content hash: the code values and the layout (channels, patch); names a codebook in token files."""
        if self._hash is None:
            h = hashlib.sha256(f"accel-vq-codebook:C={self.channels}:p={self.patch}:{tuple(self.vectors.shape)}".encode())
            h.update(self.vectors.float().contiguous().numpy().tobytes())
            self._hash = h.hexdigest()
        return self._hash


def vectors_problem(vectors, channels: int, patch: int) -> str | None:
    """Why ``vectors`` cannot be the codes of a codebook for ``channels``-channel latents cut in
    ``patch`` x ``patch`` patches, or None: a float32 [levels, K, C p^2] tensor, 1 to 8 levels,
    2 to 65536 codes."""
    if not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32 or vectors.dim() != 3:
        what = f"a {vectors.dtype} tensor of shape {list(vectors.shape)}" if isinstance(vectors, torch.Tensor) else "not a tensor"
        return f"is {what}; expected float32 [levels, codes, vector dimension]"
    depth, k, d = vectors.shape
    if not 1 <= depth <= 8 or not 2 <= k <= 1 << 16:
        return f"has {depth} level(s) of {k} codes; expected 1-8 levels of 2-65536 codes"
    if d != channels * patch * patch:
        return (f"has {d}-dimensional codes; {channels}-channel latents in {patch}x{patch} patches need "
                f"{channels * patch * patch}")
    return None


# ---------------------------------------------------------------- latents <-> vectors


@dataclass(frozen=True)
class Grid:
    """How a latent was cut into vectors, to put it back together."""
    shape: tuple[int, ...]         # the latent's shape, [B, C, H, W] or [B, C, T, H, W]
    patch: int

    @property
    def video(self) -> bool:
        return len(self.shape) == 5

    @property
    def tokens_shape(self) -> tuple[int, ...]:
        """Vector grid: [B, h, w] or [B, T, h, w] with h = ceil(H / p)."""
        p = self.patch
        hw = (-(-self.shape[-2] // p), -(-self.shape[-1] // p))
        return (self.shape[0], self.shape[2], *hw) if self.video else (self.shape[0], *hw)


def latent_to_vectors(samples: torch.Tensor, patch: int) -> tuple[torch.Tensor, Grid]:
    """[B, C, H, W] or [B, C, T, H, W] -> float32 vectors [M, C p^2] in (B, T, h, w) order."""
    if samples.dim() not in (4, 5):
        raise ValueError(f"a latent is [B, C, H, W] or [B, C, T, H, W]; got {tuple(samples.shape)}")
    grid = Grid(tuple(samples.shape), patch)
    x = samples.detach().float().cpu()
    if grid.video:  # frames become batch items: patches are spatial only
        x = x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
    n, c, h, w = x.shape
    ph, pw = -h % patch, -w % patch
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    hp, wp = x.shape[-2] // patch, x.shape[-1] // patch
    x = x.reshape(n, c, hp, patch, wp, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * patch * patch).contiguous(), grid


def vectors_to_latent(vectors: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`latent_to_vectors` (float32)."""
    p = grid.patch
    if grid.video:
        b, c, t, h, w = grid.shape
        n = b * t
    else:
        b, c, h, w = grid.shape
        n = b
    hp, wp = -(-h // p), -(-w // p)
    x = vectors.reshape(n, hp, wp, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hp * p, wp * p)
    x = x[..., :h, :w]
    if grid.video:
        x = x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
    return x.contiguous()


def reconstructions(codebook: Codebook, samples: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The indices [depth, M] of a latent's vectors and the latent rebuilt from 1, 2, ... levels."""
    vectors, grid = latent_to_vectors(samples, codebook.patch)
    idx = encode(codebook, vectors)
    return idx, [vectors_to_latent(decode(codebook, idx[:level + 1]), grid) for level in range(codebook.depth)]


# ------------------------------ nearest code: faiss when installed (CPU), else our kernel


def nearest(vectors: torch.Tensor, codes: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each vector: (int64 indices, float32 squared distances).

    ``backend``: ``"auto"`` (faiss on CPU tensors when it is installed, else ``kernels.kmeans``),
    ``"faiss"`` or ``"kernel"``. faiss computes distances in another order, so near-ties can go
    the other way than on the kernel path; exact duplicates of codes are not a concern here.
    """
    if backend in ("auto", "faiss") and vectors.device.type == "cpu" and vectors.dim() == 2:
        faiss = _faiss()
        if faiss is not None:
            index = faiss.IndexFlatL2(codes.shape[-1])
            index.add(codes.float().contiguous().numpy())
            _, idx = index.search(vectors.float().contiguous().numpy(), 1)
            idx = torch.from_numpy(idx[:, 0]).long()
            d2 = (vectors.float() - codes.float()[idx]).square().sum(-1)
            return idx, d2
        if backend == "faiss":
            raise RuntimeError("backend 'faiss' was asked for but faiss is not installed (pip install faiss-cpu)")
    return nearest_centroid(vectors, codes)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


# ---------------------------------------------------------------- fit, shrink, encode, decode


def fit(vectors: torch.Tensor, k: int, channels: int, patch: int = 1, depth: int = 1, iters: int = 10,
        seed: int = 0, progress: Callable[[int], None] | None = None, source: str = "") -> Codebook:
    """k-means codebook (``depth`` residual levels of ``k`` codes) for float vectors [M, D].

    ``progress(done)`` counts finished iterations over all levels (``depth * iters`` in total).
    """
    m, d = vectors.shape
    if not 2 <= k <= m:
        raise ValueError(f"codebook size {k} must be between 2 and the number of vectors ({m})")
    gen = torch.Generator().manual_seed(seed)
    cap = MAX_VECTORS_PER_CODE * k
    if m > cap:
        log.info("VQ fit: %d vectors, using a random subset of %d (%d per code)", m, cap, MAX_VECTORS_PER_CODE)
        vectors = vectors[torch.randperm(m, generator=gen)[:cap]]
    residual = vectors.float().clone()
    levels, usage = [], []
    for level in range(depth):
        step = None if progress is None else (lambda done, base=level * iters: progress(base + done))
        codes, idx = kmeans(residual, k, iters=iters, seed=seed + level, progress=step)
        residual -= codes[idx]
        levels.append(codes)
        usage.append(torch.bincount(idx, minlength=k).float())
    return Codebook(torch.stack(levels), channels, patch, torch.stack(usage), source=source)


def shrink(codebook: Codebook, k: int, iters: int = 20, seed: int = 0,
           progress: Callable[[int], None] | None = None) -> Codebook:
    """A smaller codebook: k-means of each level's codes, weighted by how often each was used.

    The variable-bitrate trick of "Extreme Image Compression using Fine-tuned VQGANs": one big
    fit, then cheaper codebooks cut from it without the latents.
    """
    if not 2 <= k <= codebook.size:
        raise ValueError(f"the new size {k} must be between 2 and the codebook's size ({codebook.size})")
    levels, usage = [], []
    for level in range(codebook.depth):
        w = None if codebook.usage is None else codebook.usage[level]
        if w is not None and int((w > 0).sum()) < k:
            w = w + 1e-3  # fewer used codes than asked for: let unused ones count a little
        step = None if progress is None else (lambda done, base=level * iters: progress(base + done))
        codes, idx = kmeans(codebook.vectors[level], k, iters=iters, seed=seed + level, progress=step, weights=w)
        levels.append(codes)
        ones = torch.ones(codebook.size) if w is None else w
        usage.append(torch.zeros(k).index_add_(0, idx, ones))
    return Codebook(torch.stack(levels), codebook.channels, codebook.patch, torch.stack(usage),
                    source=f"{codebook.source} shrunk {codebook.size}->{k}".strip())


def encode(codebook: Codebook, vectors: torch.Tensor, depth: int | None = None,
           backend: str = "auto") -> torch.Tensor:
    """int64 indices [depth, M] of vectors [M, D], level by level on the residual."""
    depth = codebook.depth if depth is None else depth
    residual = vectors.float().clone()
    out = []
    for level in range(depth):
        codes = codebook.vectors[level].to(residual.device)
        idx, _ = nearest(residual, codes, backend)
        residual -= codes[idx]
        out.append(idx)
    return torch.stack(out)


def decode(codebook: Codebook, indices: torch.Tensor) -> torch.Tensor:
    """float32 vectors [M, D]: the sum over levels of each level's chosen code."""
    out = torch.zeros(indices.shape[1], codebook.dim)
    for level in range(indices.shape[0]):
        out += codebook.vectors[level][indices[level].cpu()]
    return out

