"""vq/: latents <-> vectors, codebook fit/shrink/encode/decode, the rANS coder, token files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_accel import files
from comfyui_accel.metrics import psnr
from comfyui_accel.vq import codebook
from comfyui_accel.vq import entropy
from comfyui_accel.vq import tokens as tk


def smooth_latent(shape, seed):
    """A latent with spatial structure (so VQ has something to learn), like a VAE's output."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(*shape[:-2], max(2, shape[-2] // 3), max(2, shape[-1] // 3), generator=g)
    flat = coarse.reshape(-1, 1, *coarse.shape[-2:])
    up = torch.nn.functional.interpolate(flat, size=shape[-2:], mode="bilinear", align_corners=False)
    return up.reshape(shape) * 2 + 0.1 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("shape,patch", [((2, 4, 9, 13), 1), ((2, 4, 9, 13), 2), ((1, 16, 7, 5), 3),
                                         ((2, 16, 3, 10, 6), 2), ((1, 4, 2, 5, 5), 1)])
def test_latent_vectors_round_trip(shape, patch):
    lat = torch.randn(shape)
    vectors, grid = codebook.latent_to_vectors(lat, patch)
    assert vectors.shape == (math.prod(grid.tokens_shape), shape[1] * patch * patch)
    assert torch.equal(codebook.vectors_to_latent(vectors, grid), lat)
    # A vector holds one patch's channels: check one element by hand.
    if len(shape) == 4:
        b, y, x, ch = 0, 0, 0, shape[1] - 1
        assert vectors[0, ch * patch * patch] == lat[b, ch, y, x]


def test_residual_levels_and_patches_trade_bits_for_quality():
    lat = smooth_latent((2, 4, 24, 24), seed=0)
    vectors, _ = codebook.latent_to_vectors(lat, 1)
    book = codebook.fit(vectors, 32, channels=4, depth=3, iters=8, seed=0)
    assert book.vectors.shape == (3, 32, 4)
    assert book.usage.sum(1).tolist() == [vectors.shape[0]] * 3
    psnrs = []
    for depth in (1, 2, 3):
        tokens = tk.encode_latent(book, lat, pixels=1, depth=depth)
        psnrs.append(psnr(lat, tk.decode_latent(tokens)))
    assert psnrs[0] > 10 and psnrs[1] > psnrs[0] + 1 and psnrs[2] > psnrs[1] + 1, psnrs
    # Same codebook size on 2x2 patches: 4x fewer bits, lower quality.
    pv, _ = codebook.latent_to_vectors(lat, 2)
    patch_book = codebook.fit(pv, 32, channels=4, patch=2, iters=8)
    patch_psnr = psnr(lat, tk.decode_latent(tk.encode_latent(patch_book, lat, pixels=1)))
    assert patch_psnr < psnrs[0]


def test_encoding_picks_the_nearest_code():
    lat = smooth_latent((1, 4, 10, 10), seed=1)
    vectors, _ = codebook.latent_to_vectors(lat, 1)
    book = codebook.fit(vectors, 16, channels=4, iters=3)
    idx = codebook.encode(book, vectors, backend="kernel")[0]
    d = torch.cdist(vectors.double(), book.vectors[0].double())
    assert torch.equal(idx, d.argmin(1))
    # faiss (when installed) agrees.
    if codebook._faiss() is not None:
        assert (codebook.encode(book, vectors, backend="faiss")[0] == idx).float().mean() >= 0.99


def test_video_latents_encode_per_frame():
    lat = smooth_latent((1, 4, 3, 12, 12), seed=2)
    vectors, _ = codebook.latent_to_vectors(lat, 2)
    book = codebook.fit(vectors, 16, channels=4, patch=2, iters=5)
    tokens = tk.encode_latent(book, lat, pixels=9 * 96 * 96)
    assert tokens.indices.shape == (1, 1, 3, 6, 6)
    rec = tk.decode_latent(tokens)
    assert rec.shape == lat.shape and psnr(lat, rec) > 10


def test_shrink_gives_a_smaller_codebook_close_to_the_big_one():
    lat = smooth_latent((2, 4, 24, 24), seed=3)
    vectors, _ = codebook.latent_to_vectors(lat, 1)
    big = codebook.fit(vectors, 128, channels=4, iters=8)
    small = codebook.shrink(big, 16, iters=10)
    direct = codebook.fit(vectors, 16, channels=4, iters=10)
    assert small.vectors.shape == (1, 16, 4) and small.channels == 4
    assert small.usage.sum().item() == pytest.approx(big.usage.sum().item())
    p_big, p_small, p_direct = (psnr(lat, tk.decode_latent(tk.encode_latent(b, lat, 1))) for b in (big, small, direct))
    assert p_small < p_big
    assert p_small > p_direct - 1.0  # nearly as good as fitting 16 codes on the latents themselves
    with pytest.raises(ValueError, match="between 2"):
        codebook.shrink(big, 129)


def test_fit_refuses_more_codes_than_vectors():
    with pytest.raises(ValueError, match="number of vectors"):
        codebook.fit(torch.randn(10, 4), 11, channels=4)


# --- entropy coder ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,lanes", [(1, 1, None), (5, 3, None), (3000, 50, 1), (30000, 70000, None), (9000, 4, 7)])
def test_rans_round_trips_exactly(n, k, lanes):
    rng = np.random.default_rng(n + k)
    symbols = rng.integers(0, k, n) if k > 1 else np.zeros(n, np.int64)
    coded = entropy.encode(symbols, lanes)
    assert np.array_equal(entropy.decode(coded), symbols)


def test_rans_size_is_within_a_few_bytes_of_the_entropy_bound():
    rng = np.random.default_rng(0)
    p = 0.5 ** np.arange(1, 21)
    p /= p.sum()  # geometric: about 2 bits per symbol out of log2(20) = 4.3
    symbols = rng.choice(20, size=20000, p=p)
    bound_bytes = entropy.empirical_entropy_bits(symbols) / 8
    coded = entropy.encode(symbols, lanes=1)
    assert np.array_equal(entropy.decode(coded), symbols)
    assert bound_bytes <= coded.payload_bytes <= bound_bytes + 16
    # The bound itself is far below fixed-length coding on this skewed source.
    assert bound_bytes * 8 < 0.6 * entropy.bits_fixed(20000, 20)


def test_rans_refuses_a_truncated_stream():
    symbols = np.random.default_rng(1).integers(0, 300, 5000)
    coded = entropy.encode(symbols)
    coded.words = coded.words[:-3]
    with pytest.raises(ValueError, match="truncated|early"):
        entropy.decode(coded)


# --- token files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted():
    lat = smooth_latent((2, 4, 16, 16), seed=5)
    vectors, _ = codebook.latent_to_vectors(lat, 1)
    return lat, codebook.fit(vectors, 32, channels=4, depth=2, iters=5)


def test_token_file_round_trip_embedded_and_by_hash(tmp_path, fitted):
    lat, book = fitted
    tokens = tk.encode_latent(book, lat, pixels=2 * 128 * 128)
    for embed in (True, False):
        data, report = tk.tokens_bytes(tokens, embed_codebook=embed)
        path = files.write_new(tmp_path, "t", ".vqt", data)
        loaded, stored_report = tk.load_tokens(path, None if embed else book)
        assert torch.equal(loaded.indices, tokens.indices)
        assert torch.equal(tk.decode_latent(loaded), tk.decode_latent(tokens))
        assert stored_report == report
    # The report's numbers, computed independently here.
    n = 2 * 16 * 16
    assert report["fixed_bits"] == 2 * n * 5
    assert report["fixed_bpp"] == pytest.approx(2 * n * 5 / (2 * 128 * 128))
    h = sum(entropy.empirical_entropy_bits(lvl.reshape(-1).numpy()) for lvl in tokens.indices)
    assert report["entropy_bits"] == pytest.approx(h, abs=0.1)
    assert h <= report["coded_bits"] <= h + 8 * 8 * 2 + 64  # a few bytes per lane and level


def test_token_file_without_codebook_needs_one(tmp_path, fitted):
    lat, book = fitted
    data, _ = tk.tokens_bytes(tk.encode_latent(book, lat, pixels=1), embed_codebook=False)
    loaded, _ = tk.load_tokens(files.write_new(tmp_path, "t", ".vqt", data))
    with pytest.raises(tk.VQFileError, match="no codebook"):
        tk.decode_latent(loaded)


def test_truncated_token_file_is_refused(tmp_path, fitted):
    lat, book = fitted
    data, _ = tk.tokens_bytes(tk.encode_latent(book, lat, pixels=1), embed_codebook=True)
    for cut in (len(data) // 2, len(data) - 5, 6):
        path = tmp_path / f"cut{cut}.vqt"
        path.write_bytes(data[:cut])
        with pytest.raises(tk.VQFileError, match="truncated|damaged"):
            tk.load_tokens(path)


def test_corrupted_payload_is_refused(tmp_path, fitted):
    lat, book = fitted
    data, _ = tk.tokens_bytes(tk.encode_latent(book, lat, pixels=1), embed_codebook=True)
    broken = bytearray(data)
    broken[-20] ^= 0xFF  # inside the last tensor
    path = tmp_path / "bad.vqt"
    path.write_bytes(bytes(broken))
    with pytest.raises(tk.VQFileError, match="damaged"):
        tk.load_tokens(path)


def test_other_codebook_and_channel_mismatch_are_refused(tmp_path, fitted):
    lat, book = fitted
    data, _ = tk.tokens_bytes(tk.encode_latent(book, lat, pixels=1), embed_codebook=False)
    path = files.write_new(tmp_path, "t", ".vqt", data)
    vectors, _ = codebook.latent_to_vectors(lat, 1)
    other = codebook.fit(vectors, 32, channels=4, depth=2, iters=5, seed=1)
    with pytest.raises(tk.VQFileError, match="another codebook"):
        tk.load_tokens(path, other)
    wide = codebook.Codebook(torch.randn(2, 32, 16), channels=16)
    with pytest.raises(tk.VQFileError, match="16-channel"):
        tk.load_tokens(path, wide)
    with pytest.raises(tk.VQFileError, match="16-channel"):
        tk.encode_latent(wide, lat, pixels=1)


def test_saving_never_overwrites(tmp_path):
    mine = tmp_path / "t_00001_.vqt"
    mine.write_bytes(b"the user's own file")
    a = files.write_new(tmp_path, "t", ".vqt", b"one")
    b = files.write_new(tmp_path, "t", ".vqt", b"two")
    assert mine.read_bytes() == b"the user's own file"
    assert (a.name, b.name) == ("t_00002_.vqt", "t_00003_.vqt")
    assert a.read_bytes() == b"one" and b.read_bytes() == b"two"
    assert not list(tmp_path.glob(".accel-*"))  # no temporary files left behind


def test_codebook_file_round_trip_and_damage(tmp_path, fitted):
    _, book = fitted
    path = files.write_new(tmp_path, "book", ".safetensors", tk.codebook_bytes(book))
    loaded = tk.load_codebook(path)
    assert torch.equal(loaded.vectors, book.vectors) and loaded.sha256() == book.sha256()
    assert (loaded.channels, loaded.patch) == (4, 1)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(tk.VQFileError, match="truncated|damaged"):
        tk.load_codebook(path)


@pytest.mark.parametrize("k,used,big", [(4096, 3000, False), (65536, 40, False), (300, 7, True), (1 << 20, 5, False)])
def test_histogram_table_round_trips_compactly(k, used, big):
    rng = np.random.default_rng(used)
    symbols = np.sort(rng.choice(k, used, replace=False)).astype(np.int64)
    counts = rng.integers(1, (1 << 20) if big else 200, used).astype(np.int64)
    data = entropy.pack_table(symbols, counts, k)
    back_s, back_c = entropy.unpack_table(data, k)
    assert np.array_equal(back_s, symbols) and np.array_equal(back_c, counts)
    # Never more than a bitmap of the alphabet or a list of ids, plus the narrowest counts.
    id_bytes = 2 if k <= 65536 else 4
    width = 4 if big else 1
    assert len(data) == 12 + min(-(-k // 8), id_bytes * used) + width * used
    with pytest.raises(ValueError):
        entropy.unpack_table(data[:-1], k)
