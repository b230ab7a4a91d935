"""Block-sparse attention, forward only.

The block mask is a list of kept key blocks per (batch, head, query block):
``kv_indices [B|1, H|1, Qb, maxK] int32`` (entries past the count are ignored) and
``kv_counts [B|1, H|1, Qb] int32``. Query block ``i`` is rows ``i*bs .. i*bs+bs-1`` and key
block ``j`` is keys ``j*bs ..``; a ragged tail (a length that ``block_size`` does not
divide) is padded inside and masked, never an error. Size-1 batch or head dimensions
broadcast. q, k, v are ``[B, H, N, D]`` with any head_dim; the output has q's dtype and
shape, and accumulation is fp32. With ``return_lse`` the natural-log log-sum-exp of every
row's kept scores comes back too (``[B, H, Nq]`` fp32; ``-inf`` for a row with no keys).

Three implementations of the same function:
- ``block_sparse_attention_reference``: dense attention with the block mask expanded to
  tokens. The truth, for tests; O(N^2) memory.
- ``block_sparse_attention_gather``: the CPU path. Gathers each query block's kept key
  and value blocks and runs SDPA on them, in chunks of bounded memory, so the work really
  shrinks with the density.
- ``block_sparse_attention_triton``: an online-softmax flash kernel that walks only the
  listed key blocks.
``block_sparse_attention`` dispatches: Triton on CUDA, the gather path otherwise.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import tl, triton

TRITON_BLOCK_SIZES = (16, 32, 64, 128)
TRITON_MAX_HEAD_DIM = 256
# Memory one chunk of gathered keys and values may take on the CPU path (buffers reused by
# every chunk of a call).
GATHER_CHUNK_BYTES = 32 << 20


def _check(q, k, v, kv_indices, kv_counts, block_size):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_q_blocks = -(-q.shape[2] // block_size)
    if kv_indices.ndim != 4 or kv_counts.ndim != 3 or kv_indices.shape[2] != n_q_blocks \
            or kv_counts.shape[2] != n_q_blocks or kv_indices.shape[:3] != kv_counts.shape:
        raise ValueError(f"kv_indices must be [B|1, H|1, {n_q_blocks}, maxK] and kv_counts [B|1, H|1, {n_q_blocks}] "
                         f"for {q.shape[2]} queries in blocks of {block_size}; got "
                         f"{tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}")


def _expand_lists(q, kv_indices, kv_counts):
    B, H = q.shape[:2]
    idx = kv_indices.expand(B, H, *kv_indices.shape[2:])
    cnt = kv_counts.expand(B, H, kv_counts.shape[2])
    return idx, cnt


def block_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """The kept-block lists as a boolean ``[B|1, H|1, Qb, Kb]`` matrix."""
    max_k = kv_indices.shape[-1]
    slot_used = torch.arange(max_k, device=kv_indices.device) < kv_counts[..., None]
    mask = torch.zeros(*kv_indices.shape[:3], n_kv_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    # Unused slots write into a spare column that is dropped.
    target = torch.where(slot_used, kv_indices.long(), torch.full_like(kv_indices, n_kv_blocks, dtype=torch.long))
    mask.scatter_(-1, target, True)
    return mask[..., :n_kv_blocks]


def _finish(out, lse, q, return_lse):
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def block_sparse_attention_reference(q, k, v, kv_indices, kv_counts, block_size: int, scale: float | None = None,
                                     return_lse: bool = False):
    """Dense attention under the block mask expanded to tokens (the truth; small shapes)."""
    _check(q, k, v, kv_indices, kv_counts, block_size)
    n_q, n_k = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = block_mask(kv_indices, kv_counts, -(-n_k // block_size))
    mask = mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n_q, :n_k]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    out = torch.matmul(probs, v.float())
    return _finish(out, lse, q, return_lse)


def block_sparse_attention_gather(q, k, v, kv_indices, kv_counts, block_size: int, scale: float | None = None,
                                  return_lse: bool = False, chunk_bytes: int = GATHER_CHUNK_BYTES):
    """Gather each query block's kept key/value blocks and attend to just those (the CPU path)."""
    _check(q, k, v, kv_indices, kv_counts, block_size)
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    bs = block_size
    n_qb, n_kb = -(-n_q // bs), -(-n_k // bs)
    scale = D ** -0.5 if scale is None else scale
    # fp16 matmuls on the CPU are orders of magnitude slower than fp32 (bf16 is fine); the LSE wants fp32.
    cpu_fp16 = q.device.type == "cpu" and q.dtype == torch.float16
    dtype = torch.float32 if return_lse or cpu_fp16 else q.dtype
    idx, cnt = _expand_lists(q, kv_indices, kv_counts)
    max_k = idx.shape[-1]
    rows = B * H * n_qb

    def blocks(t, n, nb):
        t = t.to(dtype)
        if nb * bs != n:
            t = F.pad(t, (0, 0, 0, nb * bs - n))
        return t.reshape(B * H * nb, bs, D)

    qb, kb, vb = blocks(q, n_q, n_qb), blocks(k, n_k, n_kb), blocks(v, n_k, n_kb)
    # Global key-block number of every slot: (batch*head) * Kb + listed block.
    bh = torch.arange(B * H, device=q.device).repeat_interleave(n_qb)
    slot_block = (bh[:, None] * n_kb + idx.reshape(rows, max_k).long().clamp(0, n_kb - 1))
    slot_used = torch.arange(max_k, device=q.device) < cnt.reshape(rows, 1)
    ragged = n_k % bs != 0
    need_mask = ragged or not bool(slot_used.all())
    token_ok = (torch.arange(n_kb * bs, device=q.device) < n_k).view(n_kb, bs)

    out = torch.empty(rows, bs, D, dtype=torch.float32 if return_lse else dtype, device=q.device)
    lse = torch.empty(rows, bs, dtype=torch.float32, device=q.device) if return_lse else None
    per_row = 2 * max_k * bs * D * kb.element_size()
    step = max(1, min(rows, chunk_bytes // max(per_row, 1)))
    # Gather into buffers reused by every chunk: a fresh large tensor per chunk costs more in
    # page faults than the copy itself.
    k_buf = torch.empty(step * max_k, bs, D, dtype=kb.dtype, device=q.device)
    v_buf = torch.empty_like(k_buf)
    for start in range(0, rows, step):
        sl = slice(start, min(start + step, rows))
        n = sl.stop - sl.start
        picked = slot_block[sl].reshape(-1)
        kk = torch.index_select(kb, 0, picked, out=k_buf[:n * max_k]).view(n, max_k * bs, D)
        vv = torch.index_select(vb, 0, picked, out=v_buf[:n * max_k]).view(n, max_k * bs, D)
        mask = None
        if need_mask:
            ok = slot_used[sl, :, None] & token_ok[slot_block[sl] % n_kb]
            mask = ok.reshape(n, 1, max_k * bs)
        if return_lse:
            s = torch.matmul(qb[sl], kk.transpose(-1, -2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - row_lse[..., None].clamp_min(torch.finfo(torch.float32).min))
            out[sl] = torch.matmul(p, vv)
            lse[sl] = row_lse
        else:
            o = F.scaled_dot_product_attention(qb[sl], kk, vv, attn_mask=mask, scale=scale)
            if mask is not None:  # a row with no kept key gives NaN in SDPA; define it as 0
                o = torch.nan_to_num(o, nan=0.0)
            out[sl] = o
    out = out.view(B, H, n_qb * bs, D)[:, :, :n_q]
    if return_lse:
        lse = lse.view(B, H, n_qb * bs)[:, :, :n_q]
    return _finish(out, lse, q, return_lse)


@functools.cache
def _kernel():
    @triton.jit
    def _bsa_fwd(Q, K, V, O, LSE, IDX, CNT,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sob, soh, son, sod, slb, slh, sln,
                 sib, sih, siq, sik, scb, sch, scq,
                 H, N_Q, N_K, D, qk_scale,
                 BLOCK: tl.constexpr, D_PAD: tl.constexpr, STORE_LSE: tl.constexpr,
                 DOT_FP32: tl.constexpr):
        qblock = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = qblock * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK)
        dims = tl.arange(0, D_PAD)
        row_ok = rows < N_Q
        dim_ok = dims < D
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D_PAD], tl.float32)
        count = tl.load(CNT + b * scb + h * sch + qblock * scq)
        for i in range(0, count):
            kblock = tl.load(IDX + b * sib + h * sih + qblock * siq + i * sik)
            keys = kblock * BLOCK + cols
            key_ok = keys < N_K
            kt = tl.load(K + b * skb + h * skh + keys[None, :] * skn + dims[:, None] * skd,
                         mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
            vt = tl.load(V + b * svb + h * svh + keys[:, None] * svn + dims[None, :] * svd,
                         mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if DOT_FP32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            # Scores in log2 units (qk_scale includes log2(e)) so exp2 does the softmax.
            s = tl.dot(q, kt) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys keeps m = -inf; shift by 0 instead.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        if STORE_LSE:
            lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + b * slb + h * slh + rows * sln, lse, mask=row_ok)

    return _bsa_fwd


def triton_supported(q, block_size: int) -> bool:
    return (block_size in TRITON_BLOCK_SIZES and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[-1] <= TRITON_MAX_HEAD_DIM)


def block_sparse_attention_triton(q, k, v, kv_indices, kv_counts, block_size: int, scale: float | None = None,
                                  return_lse: bool = False):
    """Online-softmax flash attention over the listed key blocks only (Triton)."""
    _check(q, k, v, kv_indices, kv_counts, block_size)
    if not triton_supported(q, block_size):
        raise ValueError(f"the Triton kernel takes block sizes {TRITON_BLOCK_SIZES}, fp16/bf16/fp32 and "
                         f"head_dim <= {TRITON_MAX_HEAD_DIM}; got {block_size}, {q.dtype}, {q.shape[-1]}")
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    idx, cnt = _expand_lists(q, kv_indices.to(torch.int32), kv_counts.to(torch.int32))
    out = torch.empty_like(q)
    # Without return_lse the kernel never stores it: a 1-element placeholder stands in.
    lse = torch.empty(B, H, n_q if return_lse else 1, dtype=torch.float32, device=q.device)
    d_pad = max(16, 1 << (D - 1).bit_length())
    # The interpreter's bf16 dot is unreliable, and fp32 inputs want an fp32 dot anyway.
    dot_fp32 = dispatch.interpreting() or q.dtype == torch.float32
    grid = (-(-n_q // block_size), B * H)
    _kernel()[grid](q, k, v, out, lse, idx, cnt,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *idx.stride(), *cnt.stride(),
                    H, n_q, n_k, D, scale * math.log2(math.e),
                    BLOCK=block_size, D_PAD=d_pad, STORE_LSE=return_lse, DOT_FP32=dot_fp32,
                    num_warps=4 if block_size * d_pad <= 64 * 128 else 8)
    return (out, lse) if return_lse else out


def block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size: int, scale: float | None = None,
                           return_lse: bool = False):
    """Attention of every query block to its listed key blocks (see the module notes)."""
    return dispatch.route("block_sparse_attention", block_sparse_attention_triton, block_sparse_attention_gather,
                          (q, k, v, kv_indices, kv_counts, block_size, scale, return_lse), (q, k, v),
                          triton_supported(q, block_size), _check_slice)


def _check_slice(args: tuple) -> tuple:
    """The first-use check's slice: one batch item and head, the first two query blocks, all keys."""
    q, k, v, idx, cnt, block_size = args[:6]
    blocks = min(2, idx.shape[2])
    return (q[:1, :1, :blocks * block_size], k[:1, :1], v[:1, :1], idx[:1, :1, :blocks], cnt[:1, :1, :blocks],
            *args[5:])
