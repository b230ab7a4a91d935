"""kernels/kmeans.py: nearest-centroid search, the k-means update and k-means itself.

Backends are compared on fresh random data at shapes that divide none of the block sizes; the
brute-force truth is the full distance matrix computed directly as sum((x - c)^2).
"""
from __future__ import annotations

import pytest
import torch

from comfyui_accel.kernels import dispatch
from comfyui_accel.kernels import kmeans as km


def brute_force(x, c):
    d2 = (x.double()[..., :, None, :] - c.double()[..., None, :, :]).square().sum(-1)
    return d2.argmin(-1), d2.min(-1).values


def check_nearest(x, c, idx, d2, min_agreement=0.999):
    c_full = c if c.dim() == x.dim() else c.expand(*x.shape[:-2], *c.shape)
    truth_i, truth_d = brute_force(x, c_full)
    assert idx.dtype == torch.int64 and d2.dtype == torch.float32
    assert idx.shape == x.shape[:-1] and d2.shape == x.shape[:-1]
    assert (idx == truth_i).float().mean().item() >= min_agreement
    # Whatever was chosen is a nearest code up to float32 rounding, and d2 is its true distance.
    chosen = torch.gather(c_full.double(), -2, idx[..., None].expand(*idx.shape, x.shape[-1]))
    chosen_d = (x.double() - chosen).square().sum(-1)
    assert torch.allclose(d2.double(), chosen_d, rtol=1e-5, atol=1e-5)
    assert (chosen_d <= truth_d * (1 + 1e-5) + 1e-5).all()


# Shapes chosen to exercise: plain argmax (K < 64), grouped argmax with padding (K % 16 != 0),
# several code blocks (K > 2048), D above the Triton D tile, leading batch dims.
REFERENCE_SHAPES = [((), 97, 10, 3), ((2, 3), 37, 45, 5), ((), 301, 1000, 7), ((), 203, 2500, 16),
                    ((3,), 50, 70, 70)]


@pytest.mark.parametrize("lead,n,k,d", REFERENCE_SHAPES)
def test_reference_matches_brute_force(lead, n, k, d):
    g = torch.Generator().manual_seed(n * k + d)
    x = torch.randn(*lead, n, d, generator=g) * 3 + 1
    c = torch.randn(*lead, k, d, generator=g) * 3 + 1
    with dispatch.backend("reference"):
        idx, d2 = km.nearest_centroid(x, c)
    check_nearest(x, c, idx, d2)


def test_reference_row_ranges_in_threads(monkeypatch):
    # Large searches on a multi-core CPU run row ranges in threads; force that path on a small shape.
    monkeypatch.setattr(km, "_PARALLEL_MIN_SCORES", 0)
    monkeypatch.setattr(km, "_BLOCK_N", 64)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(5)
        x, c = torch.randn(2, 1001, 6, generator=g), torch.randn(2, 300, 6, generator=g)
        with dispatch.backend("reference"):
            idx, d2 = km.nearest_centroid(x, c)
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(saved)
    check_nearest(x, c, idx, d2)


# Interpreter shapes: small (the interpreter runs every tile in numpy), none a multiple of 32.
TRITON_SHAPES = [((), 45, 37, 3), ((2, 3), 19, 45, 5), ((2,), 40, 23, 40)]


@pytest.mark.parametrize("lead,n,k,d", TRITON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(lead, n, k, d, dtype):
    g = torch.Generator().manual_seed(7 * n + k)
    x = torch.randn(*lead, n, d, generator=g).to(dtype)
    c = torch.randn(*lead, k, d, generator=g).to(dtype)
    with dispatch.backend("triton"):
        idx_t, d2_t = km.nearest_centroid(x, c)
    with dispatch.backend("reference"):
        idx_r, d2_r = km.nearest_centroid(x, c)
    check_nearest(x.float(), c.float(), idx_t, d2_t)
    assert (idx_t == idx_r).float().mean().item() >= 0.999


def test_shared_codebook_broadcasts_over_leading_dims():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 21, 6, generator=g)
    c = torch.randn(33, 6, generator=g)
    for backend in ("reference", "triton"):
        with dispatch.backend(backend):
            idx, d2 = km.nearest_centroid(x, c)
        check_nearest(x, c, idx, d2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("k", [40, 300])
def test_exact_ties_go_to_the_lowest_index(backend, k):
    g = torch.Generator().manual_seed(k)
    c = torch.randn(k, 8, generator=g)
    perm = torch.randperm(k, generator=g)
    a, b = perm[: k // 4], perm[k // 4: k // 2]  # disjoint pairs of codes
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    c[hi] = c[lo]  # code hi is an exact copy of the lower code lo
    x = c[lo] + 0.001 * torch.randn(len(lo), 8, generator=g)
    with dispatch.backend(backend):
        idx, _ = km.nearest_centroid(x, c)
    # The nearest is the pair (lo, hi) for each x (noise is tiny); the lower index must win.
    assert torch.equal(idx, lo)


@pytest.mark.parametrize("weighted", [False, True])
def test_centroid_sums_triton_matches_reference(weighted):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 53, 19, generator=g)
    idx = torch.randint(0, 13, (3, 53), generator=g)
    w = torch.rand(3, 53, generator=g) if weighted else None
    with dispatch.backend("reference"):
        s_r, n_r = km.centroid_sums(x, idx, 13, w)
    with dispatch.backend("triton"):
        s_t, n_t = km.centroid_sums(x, idx, 13, w)
    # Truth by a loop over codes.
    ww = torch.ones(3, 53) if w is None else w
    for b in range(3):
        for code in range(13):
            sel = idx[b] == code
            assert torch.allclose(s_r[b, code], (x[b][sel] * ww[b][sel, None]).sum(0), atol=1e-5)
            assert torch.allclose(n_r[b, code], ww[b][sel].sum(), atol=1e-6)
    assert torch.allclose(s_t, s_r, atol=1e-5) and torch.allclose(n_t, n_r, atol=1e-6)


def blobs(n_per, centers, spread, seed):
    g = torch.Generator().manual_seed(seed)
    pts = [cen + spread * torch.randn(n_per, centers.shape[1], generator=g) for cen in centers]
    return torch.cat(pts)[torch.randperm(n_per * len(centers), generator=g)]


def distortion(x, c):
    with dispatch.backend("reference"):
        return km.nearest_centroid(x, c)[1].double().mean().item()


def test_kmeans_is_deterministic_and_seed_dependent():
    x = torch.randn(3, 400, 5, generator=torch.Generator().manual_seed(0))
    c1, i1 = km.kmeans(x, 12, iters=4, seed=5)
    c2, i2 = km.kmeans(x, 12, iters=4, seed=5)
    c3, _ = km.kmeans(x, 12, iters=4, seed=6)
    assert torch.equal(c1, c2) and torch.equal(i1, i2)
    assert not torch.equal(c1, c3)
    assert c1.shape == (3, 12, 5) and i1.shape == (3, 400)
    # The returned indices are the nearest of the returned centroids.
    assert torch.equal(i1, km.nearest_centroid(x, c1)[0])


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_distortion_never_increases(init):
    x = torch.randn(600, 6, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    curve = [distortion(x, km.kmeans(x, 24, iters=t, seed=2, init=init)[0]) for t in range(0, 7)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] < 0.9 * curve[0], curve  # and it does improve on the seeding


def test_kmeans_finds_well_separated_blobs_and_kmeanspp_beats_random_seeding():
    centers = torch.tensor([[10.0 * i, (-1) ** i * 5.0, 0.0] for i in range(8)])
    x = blobs(50, centers, 0.1, seed=4)
    c, idx = km.kmeans(x, 8, iters=20, seed=0)
    # Each true center has exactly one code next to it.
    d = torch.cdist(centers, c)
    assert (d.min(1).values < 0.2).all()
    assert idx.bincount(minlength=8).tolist() == [50] * 8
    # Seeding alone: k-means++ lands closer to the optimum than random picks on average.
    pp = sum(distortion(x, km.kmeans(x, 8, iters=0, seed=s)[0]) for s in range(5))
    rnd = sum(distortion(x, km.kmeans(x, 8, iters=0, seed=s, init="random")[0]) for s in range(5))
    assert pp < rnd


def test_dead_codes_are_reseeded():
    # Half the vectors are one repeated point, so random seeding picks duplicate codes, and a
    # duplicate loses every tie to its lower-index twin: it starts dead.
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.zeros(300, 4), torch.randn(300, 4, generator=g) + 3])
    x = x[torch.randperm(600, generator=g)]
    k = 16
    c0, i0 = km.kmeans(x, k, iters=0, seed=1, init="random")
    assert i0.bincount(minlength=k).eq(0).sum() > 0, "the setup must start with dead codes"
    c, idx = km.kmeans(x, k, iters=8, seed=1, init="random")
    assert idx.bincount(minlength=k).eq(0).sum() == 0
    assert distortion(x, c) < distortion(x, c0)


def test_kmeans_with_batch_dims_solves_each_problem_independently():
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    a = blobs(30, centers, 0.1, seed=1)
    b = blobs(30, centers * -1 + 7, 0.1, seed=2)
    c, idx = km.kmeans(torch.stack([a, b]), 3, iters=10, seed=0)
    assert torch.cdist(centers, c[0]).min(1).values.max() < 0.2
    assert torch.cdist(centers * -1 + 7, c[1]).min(1).values.max() < 0.2


def test_weighted_kmeans_uses_weights_for_the_means():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    w = torch.tensor([3.0, 1.0, 0.0])
    c, _ = km.kmeans(x, 1, iters=3, weights=w)
    assert torch.allclose(c, torch.tensor([[0.25, 0.0]]))


def test_kmeans_on_the_triton_path_matches_the_reference():
    centers = torch.randn(6, 5, generator=torch.Generator().manual_seed(2)) * 10
    x = blobs(20, centers, 0.3, seed=3)
    with dispatch.backend("triton"):
        c_t, i_t = km.kmeans(x, 6, iters=5, seed=0)
    with dispatch.backend("reference"):
        c_r, i_r = km.kmeans(x, 6, iters=5, seed=0)
    assert torch.equal(i_t, i_r)
    assert torch.allclose(c_t, c_r, atol=1e-5)


def test_progress_reports_iterations_and_can_interrupt():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    km.kmeans(x, 5, iters=4, progress=seen.append)
    assert seen[-1] == 4 and seen == sorted(seen)

    class Stop(Exception):
        pass

    def stop_at_two(done):
        if done >= 2:
            raise Stop
    with pytest.raises(Stop):
        km.kmeans(x, 5, iters=50, progress=stop_at_two)


def test_warm_start_from_given_centroids():
    x = torch.randn(2, 200, 3, generator=torch.Generator().manual_seed(8))
    c5, _ = km.kmeans(x, 6, iters=5, seed=1)
    same, idx = km.kmeans(x, 6, iters=0, init=c5)
    assert torch.equal(same, c5) and torch.equal(idx, km.nearest_centroid(x, c5)[0])
    # Continuing from 5 iterations for 3 more equals running 8 from the start.
    c8, _ = km.kmeans(x, 6, iters=8, seed=1)
    assert torch.allclose(km.kmeans(x, 6, iters=3, init=c5)[0], c8, atol=1e-6)
    with pytest.raises(ValueError, match="init centroids"):
        km.kmeans(x, 6, init=torch.zeros(6, 3))


def test_bad_arguments_are_refused():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k=11"):
        km.kmeans(x, 11)
    with pytest.raises(ValueError, match="init"):
        km.kmeans(x, 2, init="nope")
    with pytest.raises(ValueError, match="D=3"):
        km.nearest_centroid(x, torch.randn(4, 5))


def clustered_near_ties(seed: int):
    """Codes ~10 from the origin and close together, vectors right next to them: a bfloat16
    screen's rounding (~2^-8 |x| |c|, about 0.8 here) is far larger than the gaps between the
    nearest codes (~1e-3), which are far larger than float32's rounding (~1e-5)."""
    g = torch.Generator().manual_seed(seed)
    c = 4 + 0.05 * torch.randn(300, 6, generator=g)
    x = c[torch.randint(0, 300, (400,), generator=g)] + 0.02 * torch.randn(400, 6, generator=g)
    return x, c


def agreement_with_truth(x, c, idx):
    truth_i, truth_d = brute_force(x, c)
    chosen_d = (x.double() - c.double()[idx]).square().sum(-1)
    return (idx == truth_i).float().mean().item(), (chosen_d - truth_d).max().item()


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float32])
def test_screen_rounding_never_changes_the_answer(monkeypatch, screen):
    monkeypatch.setattr(km, "_screen_dtype", lambda device: screen)
    x, c = clustered_near_ties(1)
    with dispatch.backend("reference"):
        idx, _ = km.nearest_centroid(x, c)
    agreement, worst_excess = agreement_with_truth(x, c, idx)
    assert agreement >= 0.995 and worst_excess < 1e-4


def test_near_tie_case_needs_the_screen_bound(monkeypatch):
    # Without the rounding bound, the bfloat16 screen alone would pick wrong codes on this data:
    # the test above is a real test of the bound, not of an easy case.
    monkeypatch.setattr(km, "_screen_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(km, "_screen_slack", lambda x, c, screen: torch.zeros(x.shape[:2]))
    x, c = clustered_near_ties(1)
    with dispatch.backend("reference"):
        idx, _ = km.nearest_centroid(x, c)
    agreement, worst_excess = agreement_with_truth(x, c, idx)
    assert agreement < 0.9 and worst_excess > 1e-3
