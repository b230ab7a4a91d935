"""The dispatcher's first-use check: a Triton kernel that fails or disagrees with its reference
on a small slice is not used for that shape class; the reference computes, after one warning.

Runs on the CPU: ``backend("checked")`` applies the CUDA rule to the Triton interpreter, and
``dispatch.fault`` makes a kernel raise (as a compile error would) or return wrong numbers.
"""
from __future__ import annotations

import logging

import pytest
import torch

from comfyui_accel.kernels import block_sparse_attention
from comfyui_accel.kernels import dispatch, int8_gemm, kmeans

pytestmark = pytest.mark.skipif(not dispatch.triton_available(), reason="Triton does not import")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    dispatch.reset()
    yield
    dispatch.reset()


def gemm_inputs(m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (m, 48), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (40, 48), generator=g, dtype=torch.int8)
    return xq, torch.rand(m, generator=g) + 0.1, wq, torch.rand(40, generator=g) + 0.1, torch.randn(40, generator=g)


def warnings_about(caplog, op):
    return [r for r in caplog.records if r.levelno == logging.WARNING and f"Triton kernel {op} " in r.getMessage()]


@pytest.mark.parametrize("kind, reason", [("error", "injected failure"), ("mismatch", "off by")])
def test_a_failing_kernel_falls_back_to_the_reference_with_one_warning(caplog, kind, reason):
    args = gemm_inputs(40)
    want = int8_gemm.int8_gemm_reference(*args)
    with dispatch.backend("checked"), dispatch.fault("int8_gemm", kind), caplog.at_level(logging.WARNING):
        first = int8_gemm.int8_gemm(*args)
        second = int8_gemm.int8_gemm(*gemm_inputs(33, seed=1))   # same shape class (rows 33..64)
    assert torch.equal(first, want)
    assert torch.equal(second, int8_gemm.int8_gemm_reference(*gemm_inputs(33, seed=1)))
    [warning] = warnings_about(caplog, "int8_gemm")
    text = warning.getMessage()
    assert "cpu (Triton interpreter)" in text and reason in text and "reference" in text
    [(key, problem)] = dispatch.verdict("int8_gemm").items()
    assert reason in problem


def test_a_good_kernel_is_checked_once_per_shape_class_and_then_used(caplog):
    calls = []
    real = int8_gemm.int8_gemm_triton

    def counting(*a):
        calls.append(a[0].shape[0])
        return real(*a)

    args = gemm_inputs(40)
    with dispatch.backend("checked"), caplog.at_level(logging.WARNING):
        dispatch.run("int8_gemm", counting, int8_gemm.int8_gemm_reference, (*args, torch.float32),
                     lambda a: (dispatch.first_rows(a[0]), dispatch.first_rows(a[1]), *a[2:]))
        dispatch.run("int8_gemm", counting, int8_gemm.int8_gemm_reference, (*gemm_inputs(50, 2), torch.float32),
                     lambda a: (dispatch.first_rows(a[0]), dispatch.first_rows(a[1]), *a[2:]))
        dispatch.run("int8_gemm", counting, int8_gemm.int8_gemm_reference, (*gemm_inputs(100, 3), torch.float32),
                     lambda a: (dispatch.first_rows(a[0]), dispatch.first_rows(a[1]), *a[2:]))
    # 40 rows: slice of 16 then the call; 50 rows: same class, the call only; 100 rows: a new class.
    assert calls == [16, 40, 50, 16, 100]
    assert list(dispatch.verdict("int8_gemm").values()) == [None, None]
    assert not warnings_about(caplog, "int8_gemm")
    out = int8_gemm.int8_gemm(*gemm_inputs(40))
    assert torch.allclose(out, int8_gemm.int8_gemm_reference(*gemm_inputs(40)), rtol=1e-5, atol=1e-4)


def test_attention_and_kmeans_fall_back_too(caplog):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    idx = torch.tensor([[[[0, 1], [1, 0], [2, 1], [3, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2, 2, 1]]], dtype=torch.int32)
    x, c = torch.randn(300, 8, generator=g), torch.randn(10, 8, generator=g)
    with dispatch.backend("checked"), caplog.at_level(logging.WARNING), \
            dispatch.fault("block_sparse_attention"), dispatch.fault("nearest_centroid", "mismatch"):
        out = block_sparse_attention.block_sparse_attention(q, k, v, idx, cnt, 16)
        idx_out, d2 = kmeans.nearest_centroid(x, c)
    assert torch.equal(out, block_sparse_attention.block_sparse_attention_gather(q, k, v, idx, cnt, 16))
    ref_idx, ref_d2 = kmeans.nearest_centroid_reference(x, c)
    assert torch.equal(idx_out, ref_idx) and torch.equal(d2, ref_d2)
    assert len(warnings_about(caplog, "block_sparse_attention")) == 1
    assert len(warnings_about(caplog, "nearest_centroid")) == 1


def test_forcing_the_kernel_never_falls_back():
    # Tests that force "triton" must fail on a broken kernel rather than pass on the reference.
    with dispatch.backend("triton"), dispatch.fault("int8_gemm"), pytest.raises(RuntimeError, match="injected"):
        int8_gemm.int8_gemm(*gemm_inputs(20))


def test_difference_measures_what_it_says():
    a = torch.randn(100, generator=torch.Generator().manual_seed(5))
    assert dispatch.difference(a, a.clone()) is None
    assert dispatch.difference(a * 1.001, a) is None
    assert "off by" in dispatch.difference(a * 1.5, a)
    assert "NaN" in dispatch.difference(torch.full_like(a, float("nan")), a)
    assert "shape" in dispatch.difference(a[:50], a)
