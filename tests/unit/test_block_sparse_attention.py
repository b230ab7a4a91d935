"""The block-sparse attention op: Triton (interpreter) and the CPU gather path against the
dense masked reference, on fresh random data."""
import math

import pytest
import torch

from comfyui_accel.kernels import block_sparse_attention
from comfyui_accel.kernels import dispatch

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def random_lists(lead, n_q_blocks, n_k_blocks, max_k, generator, empty_row=False):
    """Unique kept key blocks per row, variable counts (1..max_k), junk in the unused slots."""
    rows = math.prod(lead) * n_q_blocks
    idx = torch.stack([torch.randperm(n_k_blocks, generator=generator)[:max_k] for _ in range(rows)])
    counts = torch.randint(1, max_k + 1, (rows,), generator=generator)
    if empty_row:
        counts[0] = 0
    return (idx.view(*lead, n_q_blocks, max_k).int(), counts.view(*lead, n_q_blocks).int())


def inputs(B, H, N, D, dtype, seed, n_k=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, H, n_k or N, D, generator=g).to(dtype)
    v = torch.randn(B, H, n_k or N, D, generator=g).to(dtype)
    return q, k, v, g


def close(a, b, dtype):
    return (a.float() - b.float()).abs().max().item() <= TOL[dtype] * max(1.0, b.float().abs().max().item())


@pytest.mark.parametrize("B,H,N,D,bs,dtype", [
    (1, 2, 96, 64, 32, torch.float32),     # dividing length
    (2, 1, 70, 128, 16, torch.float32),    # ragged tail, head_dim 128
    (1, 2, 50, 64, 16, torch.float16),
    (1, 1, 45, 128, 16, torch.bfloat16),   # loaded as bf16, converted in the kernel
    (1, 1, 40, 40, 16, torch.float32),     # head_dim padded to 64 inside the kernel
])
def test_triton_matches_reference(B, H, N, D, bs, dtype):
    q, k, v, g = inputs(B, H, N, D, dtype, seed=N + D)
    nb = -(-N // bs)
    idx, cnt = random_lists((B, H), nb, nb, max(1, nb - 1), g)
    want, want_lse = block_sparse_attention.block_sparse_attention_reference(q, k, v, idx, cnt, bs, return_lse=True)
    with dispatch.backend("triton"):
        got, got_lse = block_sparse_attention.block_sparse_attention(q, k, v, idx, cnt, bs, return_lse=True)
    assert got.dtype == dtype and got.shape == q.shape
    assert close(got, want, dtype)
    assert torch.allclose(got_lse, want_lse, atol=1e-3 if dtype != torch.float32 else 1e-5)


def test_triton_broadcast_lists_and_empty_row():
    q, k, v, g = inputs(2, 3, 48, 64, torch.float32, seed=1)
    idx, cnt = random_lists((1, 1), 3, 3, 2, g, empty_row=True)
    want, want_lse = block_sparse_attention.block_sparse_attention_reference(q, k, v, idx, cnt, 16, return_lse=True)
    with dispatch.backend("triton"):
        got, got_lse = block_sparse_attention.block_sparse_attention(q, k, v, idx, cnt, 16, return_lse=True)
    assert torch.allclose(got, want, atol=2e-5)
    assert torch.all(got[:, :, :16] == 0) and torch.all(torch.isneginf(got_lse[:, :, :16]))
    assert torch.allclose(got_lse[:, :, 16:], want_lse[:, :, 16:], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(2, 3), (1, 1), (1, 3)])
def test_gather_path_matches_reference(dtype, lead):
    q, k, v, g = inputs(2, 3, 150, 32, dtype, seed=7)
    nb = -(-150 // 32)
    idx, cnt = random_lists(lead, nb, nb, 3, g, empty_row=True)
    want, want_lse = block_sparse_attention.block_sparse_attention_reference(q, k, v, idx, cnt, 32, return_lse=True)
    # A tiny chunk budget forces many chunks.
    got = block_sparse_attention.block_sparse_attention_gather(q, k, v, idx, cnt, 32, chunk_bytes=4096)
    got2, got_lse = block_sparse_attention.block_sparse_attention_gather(q, k, v, idx, cnt, 32, return_lse=True)
    assert got.dtype == dtype
    assert close(got, want, dtype) and close(got2, want, dtype)
    assert torch.allclose(got_lse, want_lse, atol=1e-4)


def test_gather_path_full_lists_equal_dense_sdpa():
    q, k, v, _ = inputs(1, 2, 256, 64, torch.float32, seed=3)
    idx = torch.arange(4, dtype=torch.int32).expand(1, 1, 4, 4)
    cnt = torch.full((1, 1, 4), 4, dtype=torch.int32)
    got = block_sparse_attention.block_sparse_attention_gather(q, k, v, idx, cnt, 64)
    assert torch.allclose(got, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_dispatcher_uses_the_gather_path_on_cpu():
    q, k, v, g = inputs(1, 1, 64, 32, torch.float32, seed=5)
    idx, cnt = random_lists((1, 1), 4, 4, 2, g)
    want = block_sparse_attention.block_sparse_attention_reference(q, k, v, idx, cnt, 16)
    assert dispatch.pick(q) == "reference"
    assert torch.allclose(block_sparse_attention.block_sparse_attention(q, k, v, idx, cnt, 16), want, atol=1e-5)


def test_block_mask_and_shape_errors():
    idx = torch.tensor([[[[2, 0, 1], [1, 9, 9]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    assert block_sparse_attention.block_mask(idx, cnt, 3).tolist() == [[[[True, False, True], [False, True, False]]]]
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="kv_indices"):
        block_sparse_attention.block_sparse_attention_gather(q, q, q, idx[:, :, :1], cnt[:, :, :1], 16)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        block_sparse_attention.block_sparse_attention_gather(q[0], q[0], q[0], idx, cnt, 16)
