"""Token orders over the latent grid and block positions, for the geometric policies.

Grid tokens are numbered in raster order (frame, row, column). A policy may reorder them
so that each attention block of ``block_size`` consecutive tokens is compact in the grid
(3-D tiles), or groups one spatial position across frames (for temporal heads), then
choose key blocks by the distance between block centres. Orders are plain permutations of
the grid tokens, so any grid size works: a tile cut by the grid edge just holds fewer tokens
and a block may span two tiles.
"""
from __future__ import annotations

import collections
import functools

import torch

from .layout import TokenGrid

CACHE_BYTES = 64 << 20   # per cached function: the orders of the grids in use, on the CPU


def tensor_cache(max_bytes: int = CACHE_BYTES):
    """Cache a function of hashable arguments that returns CPU tensors (or a tuple of them),
    least recently used first out, bounded by the bytes it holds (a count bound alone lets a
    few large video grids pin hundreds of MB). A result over the bound is not kept."""
    def wrap(fn):
        store: collections.OrderedDict = collections.OrderedDict()
        sizes: dict = {}

        @functools.wraps(fn)
        def cached(*args):
            if args in store:
                store.move_to_end(args)
                return store[args]
            value = fn(*args)
            size = sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))
            if size <= max_bytes:
                store[args], sizes[args] = value, size
                while sum(sizes.values()) > max_bytes:
                    old, _ = store.popitem(last=False)
                    del sizes[old]
            return value

        cached.cache_clear = lambda: (store.clear(), sizes.clear())
        cached.cache_bytes = lambda: sum(sizes.values())
        return cached
    return wrap


def tile_shape(grid: TokenGrid, block_size: int) -> tuple[int, int, int]:
    """A 3-D tile of ``block_size`` tokens: two frames deep for video, square-ish in space."""
    depth = 2 if grid.frames > 1 and block_size >= 32 else 1
    area = block_size // depth
    if grid.height == 1:
        return depth, 1, area
    rows = 1 << ((area.bit_length() - 1 + 1) // 2)  # the larger power-of-two side
    return depth, rows, max(1, area // rows)


@tensor_cache()
def _coords(frames: int, height: int, width: int) -> torch.Tensor:
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3)


def grid_coords(grid: TokenGrid) -> torch.Tensor:
    """[G, 3] long (frame, row, column) of every grid token in raster order."""
    return _coords(grid.frames, grid.height, grid.width)


@tensor_cache()
def _tile_order(frames: int, height: int, width: int, block_size: int) -> torch.Tensor:
    grid = TokenGrid(frames, height, width)
    tt, th, tw = tile_shape(grid, block_size)
    c = grid_coords(grid)
    n_h, n_w = -(-height // th), -(-width // tw)
    tile = ((c[:, 0] // tt) * n_h + c[:, 1] // th) * n_w + c[:, 2] // tw
    inside = ((c[:, 0] % tt) * th + c[:, 1] % th) * tw + c[:, 2] % tw
    return torch.argsort(tile * (tt * th * tw) + inside)


def tile_order(grid: TokenGrid, block_size: int) -> torch.Tensor:
    """Raster indices of the grid tokens listed tile by tile (a permutation, [G] long)."""
    return _tile_order(grid.frames, grid.height, grid.width, block_size)


def raster_order(grid: TokenGrid) -> torch.Tensor:
    return torch.arange(grid.tokens)


def spatial_major_order(grid: TokenGrid) -> torch.Tensor:
    """Tokens sorted by (row, column, frame): one spatial position through time is contiguous."""
    c = grid_coords(grid)
    return torch.argsort((c[:, 1] * grid.width + c[:, 2]) * grid.frames + c[:, 0])


def block_centres(grid: TokenGrid, order: torch.Tensor, block_size: int) -> torch.Tensor:
    """[S, 3] float mean (frame, row, column) of each full block of ``order`` (S = G // bs)."""
    n_blocks = grid.tokens // block_size
    c = grid_coords(grid)[order[: n_blocks * block_size]].float()
    return c.view(n_blocks, block_size, 3).mean(1)


def pair_offsets(centres: torch.Tensor, unit: tuple[int, int, int] = (1, 1, 1)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frame distance, spatial Chebyshev distance and Euclidean distance between block centres,
    each axis measured in ``unit`` tokens (e.g. the tile shape, so windows span whole tiles)."""
    d = (centres[:, None, :] - centres[None, :, :]).abs() / torch.tensor(unit, dtype=centres.dtype)
    spatial_cheb = torch.maximum(d[..., 1], d[..., 2])
    euclid = d.pow(2).sum(-1).sqrt()
    return d[..., 0], spatial_cheb, euclid


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation along the last dimension."""
    inv = torch.empty_like(order)
    inv.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return inv
