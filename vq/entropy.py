"""Static rANS entropy coder over an empirical histogram, in numpy.

``encode(symbols)`` -> :class:`Coded` (32-bit words, the histogram, lane count);
``decode(coded)`` gives the symbols back exactly. The model is static: the histogram of the
message itself, stored beside the words (``pack_table``: a bitmap or list of the symbols that
occur and their counts at 8/16/32 bits) and quantized to ``SCALE_BITS`` bits the same way by
the encoder and the decoder.

rANS with a 64-bit state and 32-bit renormalisation (the layout of ryg_rans' rans64): state
``x`` in ``[L, 2^32 L)`` with ``L = 2^31``; encoding symbol s with frequency f and cumulative
frequency c maps ``x -> (x // f) << SCALE_BITS | (x % f) + c`` after flushing the low 32 bits
when ``x`` would overflow. Several independent states (lanes) code interleaved symbols in
lockstep so numpy does the per-symbol arithmetic for all lanes at once; each lane costs one
8-byte final state, so short messages use one lane.

The coded size is within a few bytes of ``n * H`` (the empirical entropy) plus 8 bytes per
lane: frequency quantization at 24 bits costs well under 0.01 bit per symbol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

SCALE_BITS = 24
_L = np.uint64(1 << 31)
_MASK32 = np.uint64(0xFFFFFFFF)
_SYMBOLS_PER_LANE = 4096  # one more lane per this many symbols, up to MAX_LANES
MAX_LANES = 64


@dataclass
class Coded:
    words: np.ndarray      # uint32 stream (lane states first)
    symbols: np.ndarray    # int64: the symbols that occur, ascending
    counts: np.ndarray     # int64: how often each occurs (the model; frequencies derive from it)
    count: int             # number of coded symbols
    lanes: int

    @property
    def freqs(self) -> np.ndarray:
        """The quantized frequencies the coder uses: a deterministic function of ``counts``."""
        return quantize_frequencies(self.counts)

    @property
    def payload_bytes(self) -> int:
        return int(self.words.nbytes)

    def table_bytes(self, alphabet_size: int) -> int:
        """Bytes of the model as :func:`pack_table` stores it."""
        return len(pack_table(self.symbols, self.counts, alphabet_size))


def pack_table(symbols: np.ndarray, counts: np.ndarray, alphabet_size: int) -> bytes:
    """The histogram, compactly: which symbols occur (a bitmap of the alphabet or a list of
    16/32-bit ids, whichever is smaller), then their counts at the narrowest of 8/16/32 bits."""
    id_bytes = 2 if alphabet_size <= 1 << 16 else 4
    use_bitmap = -(-alphabet_size // 8) <= id_bytes * len(symbols)
    if use_bitmap:
        present = np.zeros(alphabet_size, np.uint8)
        present[symbols] = 1
        ids = np.packbits(present).tobytes()
    else:
        ids = symbols.astype(f"<u{id_bytes}").tobytes()
    width = next(w for w in (1, 2, 4) if int(counts.max(initial=0)) < 1 << (8 * w))
    header = np.array([len(symbols), width, use_bitmap], "<u4").tobytes()
    return header + ids + counts.astype(f"<u{width}").tobytes()


def unpack_table(data: bytes, alphabet_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_table`: (symbols, counts) as int64. Raises ValueError if damaged."""
    if len(data) < 12:
        raise ValueError("the frequency table is truncated")
    used, width, use_bitmap = (int(v) for v in np.frombuffer(data[:12], "<u4"))
    if width not in (1, 2, 4):
        raise ValueError("the frequency table is damaged")
    id_bytes = 2 if alphabet_size <= 1 << 16 else 4
    ids_len = -(-alphabet_size // 8) if use_bitmap else id_bytes * used
    if len(data) != 12 + ids_len + width * used:
        raise ValueError("the frequency table is truncated or damaged")
    ids = np.frombuffer(data[12:12 + ids_len], np.uint8 if use_bitmap else f"<u{id_bytes}")
    symbols = (np.flatnonzero(np.unpackbits(ids)[:alphabet_size]) if use_bitmap else ids).astype(np.int64)
    counts = np.frombuffer(data[12 + ids_len:], f"<u{width}").astype(np.int64)
    if len(symbols) != used or (counts <= 0).any():
        raise ValueError("the frequency table is damaged")
    return symbols, counts


def empirical_entropy_bits(symbols: np.ndarray) -> float:
    """n * H(p) in bits, p the message's own histogram: the bound a static coder approaches."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum())


def quantize_frequencies(counts: np.ndarray, total_bits: int = SCALE_BITS) -> np.ndarray:
    """Integer frequencies >= 1 proportional to ``counts`` (all > 0) that sum to 2^total_bits.

    The rounding difference goes to the most frequent symbols first, one unit per symbol per
    pass over them (the rule files were written with); the passes are counted, not looped, so a
    crafted table (one huge count among 65536) costs O(K log) instead of O(K^2)."""
    total = 1 << total_bits
    if len(counts) > total:
        raise ValueError(f"{len(counts)} distinct symbols do not fit a {total_bits}-bit frequency table")
    f = np.maximum(1, np.floor(counts * (total / counts.sum())).astype(np.int64))
    order = np.argsort(-counts, kind="stable")
    diff = total - int(f.sum())
    if diff > 0:  # every pass adds one to each symbol, in order, until the difference is gone
        passes, rest = divmod(diff, len(order))
        f += passes
        f[order[:rest]] += 1
    elif diff < 0:  # every pass takes one from each symbol still above 1, in order
        spare = f[order] - 1
        need = -diff
        lo, hi = 0, int(spare.max())  # the number of full passes: most that need no more than `need`
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(spare, mid).sum()) <= need:
                lo = mid
            else:
                hi = mid - 1
        taken = np.minimum(spare, lo)
        rest = need - int(taken.sum())
        if rest:
            taken[np.flatnonzero(spare > lo)[:rest]] += 1
        f[order] -= taken
    return f.astype(np.uint32)


def lanes_for(count: int) -> int:
    """Lanes the encoder uses for ``count`` symbols (the decoder insists on the same number)."""
    return int(min(MAX_LANES, max(1, count // _SYMBOLS_PER_LANE)))


def encode(symbols: np.ndarray, lanes: int | None = None) -> Coded:
    symbols = np.asarray(symbols).reshape(-1).astype(np.int64)
    n = symbols.size
    if lanes is None:
        lanes = lanes_for(n)
    if n == 0:
        return Coded(np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros(0, np.int64), 0, lanes)
    alphabet, local, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    freqs = quantize_frequencies(counts)
    cum = np.concatenate([[0], np.cumsum(freqs, dtype=np.uint64)[:-1]]).astype(np.uint64)
    f64 = freqs.astype(np.uint64)
    steps = -(-n // lanes)
    padded = np.full(steps * lanes, -1, np.int64)
    padded[:n] = local
    grid = padded.reshape(steps, lanes)  # symbol t * lanes + l goes to lane l at step t

    x = np.full(lanes, _L, np.uint64)
    out: list[np.ndarray] = []
    shift = np.uint64(SCALE_BITS)
    limit_base = (_L >> shift) << np.uint64(32)
    for t in range(steps - 1, -1, -1):
        row = grid[t]
        live = row >= 0
        s = np.where(live, row, 0)
        f, c = f64[s], cum[s]
        flush = live & (x >= limit_base * f)
        if flush.any():
            out.append((x[flush] & _MASK32).astype(np.uint32)[::-1])
            x[flush] >>= np.uint64(32)
        x = np.where(live, ((x // f) << shift) + (x % f) + c, x)
    # The decoder reads the final states first, then the flushed words in forward order.
    body = np.concatenate(out)[::-1] if out else np.zeros(0, np.uint32)
    head = np.stack([(x >> np.uint64(32)).astype(np.uint32), (x & _MASK32).astype(np.uint32)], 1).reshape(-1)
    return Coded(np.concatenate([head, body]), alphabet, counts.astype(np.int64), n, lanes)


def check(coded: Coded, alphabet_size: int) -> None:
    """Raise ValueError unless ``coded`` is what :func:`encode` writes for ``coded.count`` symbols
    of an alphabet of ``alphabet_size``: the lane count of its rule, a histogram of exactly
    ``count`` symbols in the alphabet, and no more words than the symbols can have flushed.
    Bounds the work of :func:`decode` by the count, which callers check against a shape first."""
    n, lanes = coded.count, coded.lanes
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"the symbol count {n!r} is not a count: damaged")
    if lanes != lanes_for(n):
        raise ValueError(f"{lanes!r} lanes for {n} symbols; the coder uses {lanes_for(n)}: damaged")
    symbols, counts = coded.symbols, coded.counts
    if len(symbols) != len(counts) or (n > 0) != (len(symbols) > 0):
        raise ValueError("the frequency table does not match the symbol count: damaged")
    if len(symbols) and (symbols[0] < 0 or symbols[-1] >= alphabet_size or (np.diff(symbols) <= 0).any()):
        raise ValueError(f"the frequency table lists symbols outside 0..{alphabet_size - 1} or out of order: damaged")
    if (counts <= 0).any() or int(counts.sum()) != n:
        raise ValueError(f"the frequency table counts {int(counts.sum())} symbols, the stream {n}: damaged")
    if n and not 2 * lanes <= coded.words.size <= 2 * lanes + n:
        raise ValueError("the coded stream has a length no coder output of this size has: truncated or damaged")


def decode(coded: Coded, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The symbols back. ``progress(step, steps)`` is called every few thousand steps (ComfyUI's
    interrupt check)."""
    n, lanes = coded.count, coded.lanes
    if n == 0:
        return np.zeros(0, np.int64)
    words = coded.words.astype(np.uint64)
    if lanes < 1 or words.size < 2 * lanes:
        raise ValueError("the coded stream is shorter than its lane states: truncated")
    freqs = coded.freqs.astype(np.uint64)
    if int(freqs.sum()) != 1 << SCALE_BITS:
        raise ValueError("the frequency table does not sum to 2^%d: corrupted" % SCALE_BITS)
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.uint64)
    # Slot -> symbol lookup through a search over cumulative frequencies.
    x = (words[0:2 * lanes:2] << np.uint64(32)) | words[1:2 * lanes:2]
    pos = 2 * lanes
    steps = -(-n // lanes)
    mask = np.uint64((1 << SCALE_BITS) - 1)
    shift = np.uint64(SCALE_BITS)
    out = np.empty(steps * lanes, np.int64)
    for t in range(steps):
        if progress is not None and t % 4096 == 0:
            progress(t, steps)
        live = np.arange(lanes) < (n - t * lanes)
        slot = x & mask
        s = np.searchsorted(cum, slot, side="right") - 1
        out[t * lanes:(t + 1) * lanes] = s
        x = np.where(live, freqs[s] * (x >> shift) + slot - cum[s], x)
        need = live & (x < _L)
        k = int(need.sum())
        if k:
            if pos + k > words.size:
                raise ValueError("the coded stream ended early: truncated")
            x[need] = (x[need] << np.uint64(32)) | words[pos:pos + k]
            pos += k
    if pos != words.size:
        raise ValueError("the coded stream has bytes left over: corrupted")
    return coded.symbols[out[:n]]


def bits_fixed(count: int, alphabet_size: int) -> int:
    """Bits of the same symbols stored at a fixed ceil(log2 K) bits each."""
    return count * max(1, math.ceil(math.log2(max(alphabet_size, 2))))
