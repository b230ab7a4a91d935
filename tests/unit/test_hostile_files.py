"""Hostile input to the pack's domain code (no ComfyUI): crafted token and codebook files, user
regexes, file names, the rANS tables; and the bounded state (run reports, tensor caches)."""
from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from comfyui_accel import files, runs
from comfyui_accel.attention.geometry import tensor_cache
from comfyui_accel.quant import checkpoint, formats, policy
from comfyui_accel.vq import codebook
from comfyui_accel.vq import entropy
from comfyui_accel.vq import tokens


def old_quantize_frequencies(counts, total_bits=entropy.SCALE_BITS):
    """The rounding rule as first written (a plain loop): files on disk were coded with it."""
    total = 1 << total_bits
    f = np.maximum(1, np.floor(counts * (total / counts.sum())).astype(np.int64))
    diff = total - int(f.sum())
    order = np.argsort(-counts, kind="stable")
    i = 0
    while diff != 0:
        j = order[i % len(order)]
        if diff > 0:
            f[j] += 1
            diff -= 1
        elif f[j] > 1:
            f[j] -= 1
            diff += 1
        i += 1
    return f.astype(np.uint32)


@pytest.mark.parametrize("seed", range(6))
def test_frequency_rounding_is_the_rule_files_were_written_with(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 3000))
    counts = rng.integers(1, [2, 50, 10 ** 6][seed % 3], k).astype(np.int64)
    counts[rng.integers(0, k)] *= int(rng.integers(1, 10 ** 4))
    for bits in (12, entropy.SCALE_BITS):   # 12 bits: many symbols at 1, so units are taken back
        assert np.array_equal(entropy.quantize_frequencies(counts, bits), old_quantize_frequencies(counts, bits))


def test_a_crafted_table_no_longer_takes_quadratic_time():
    counts = np.ones(65536, np.int64)
    counts[0] = 2 ** 32 - 1        # the issue's 282 KB file: about 4e9 loop turns before
    start = time.perf_counter()
    f = entropy.quantize_frequencies(counts)
    assert time.perf_counter() - start < 2.0
    assert int(f.sum()) == 1 << entropy.SCALE_BITS and f.min() >= 1


def coded(symbols):
    return entropy.encode(np.asarray(symbols))


def test_the_stream_check_refuses_what_the_coder_never_writes():
    c = coded(np.arange(100) % 7)
    entropy.check(c, 8)
    bad = [entropy.Coded(c.words, c.symbols, c.counts, 5 * 10 ** 8, 1),          # counts=[5e8]
           entropy.Coded(c.words, c.symbols, c.counts, c.count, 0),              # no lanes
           entropy.Coded(c.words, c.symbols, c.counts, c.count, 64),             # not the coder's lanes
           entropy.Coded(c.words, c.symbols, c.counts * 2, c.count, c.lanes),    # histogram != count
           entropy.Coded(c.words, c.symbols + 5, c.counts, c.count, c.lanes),    # outside the alphabet
           entropy.Coded(c.words[:1], c.symbols, c.counts, c.count, c.lanes),    # truncated
           entropy.Coded(np.concatenate([c.words] * 30), c.symbols, c.counts, c.count, c.lanes)]
    for stream in bad:
        with pytest.raises(ValueError):
            entropy.check(stream, 8)


def token_file(tmp_path, meta_changes=None, tensors_changes=None, embed=True):
    book = codebook.Codebook(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)), channels=4)
    latent = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    data, _ = tokens.tokens_bytes(tokens.encode_latent(book, latent, pixels=30 * 40), embed_codebook=embed)
    tensors = safetensors.torch.load(data)
    path = tmp_path / "t.vqt"
    path.write_bytes(data)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes or {})
    tensors.update(tensors_changes or {})
    path.write_bytes(safetensors.torch.save({k: v for k, v in tensors.items() if v is not None}, metadata=meta))
    return path, book


@pytest.mark.parametrize("meta, message", [
    ({"counts": "[500000000, 30]"}, "'counts'"),
    ({"counts": "[31, 30]"}, "levels hold .* tokens, its latent shape"),
    ({"counts": "[30]"}, "'counts'"),
    ({"lanes": "[0, 1]"}, "'lanes'"),
    ({"latent_shape": "[1, 4, 100000, 100000]"}, "this reader takes up to"),
    ({"latent_shape": "[1, 4, 0, 5]"}, "'latent_shape'"),
    ({"latent_shape": "[1, 4, 6]"}, "'latent_shape'"),
    ({"latent_shape": "not json"}, "'latent_shape'"),
    ({"patch": "0"}, "'patch'"),
    ({"levels": "99"}, "'levels'"),
    ({"codebook_size": "x"}, "'codebook_size'"),
    ({"pixels": "-1"}, "'pixels'"),
    ({"kind": "other"}, "'kind'"),
    ({"codebook_sha256": "abc"}, "'codebook_sha256'"),
    ({"version": "2"}, "version"),
])
def test_damaged_headers_are_refused_before_decoding(tmp_path, meta, message):
    path, _ = token_file(tmp_path, meta)
    start = time.perf_counter()
    with pytest.raises(tokens.VQFileError, match=message):
        tokens.load_tokens(path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("tensors, message", [
    ({"level0.words": torch.zeros(8, dtype=torch.bfloat16)}, "1-D torch.int32"),
    ({"level0.table": torch.zeros(2, 3, dtype=torch.uint8)}, "1-D torch.uint8"),
    ({"level1.words": None}, "cannot be read"),
    ({"codebook": torch.randn(16, 4)}, "embedded codebook"),
    ({"codebook": torch.full((2, 16, 4), float("nan"))}, "NaN"),
    ({"codebook": torch.zeros(2, 16, 4, dtype=torch.int32)}, "not floating point"),
])
def test_damaged_tensors_are_clear_errors(tmp_path, tensors, message):
    path, _ = token_file(tmp_path, tensors_changes=tensors)
    with pytest.raises(tokens.VQFileError, match=message):
        tokens.load_tokens(path)


def test_the_issues_hanging_file_ends_at_once(tmp_path):
    # counts=[5e8] and a one-symbol table: 1.7 h of decoding and 4 GB before the header check moved.
    table = entropy.pack_table(np.array([0]), np.array([5 * 10 ** 8]), 16)
    tensors = {"level0.words": torch.zeros(2, dtype=torch.int32),
               "level0.table": torch.from_numpy(np.frombuffer(bytearray(table), np.uint8))}
    digest = __import__("hashlib").sha256(np.zeros(2, np.int32).tobytes() + table).hexdigest()
    meta = {"format": tokens.TOKENS_FORMAT, "version": tokens.VERSION, "latent_shape": "[1, 4, 2, 2]", "patch": "1",
            "levels": "1", "codebook_size": "16", "codebook_sha256": "0" * 64, "pixels": "1",
            "counts": "[500000000]", "lanes": "[1]", "payload_sha256": digest}
    path = tmp_path / "hang.vqt"
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    start = time.perf_counter()
    with pytest.raises(tokens.VQFileError, match="damaged"):
        tokens.load_tokens(path)
    assert time.perf_counter() - start < 1.0


def test_codebook_files_are_checked(tmp_path):
    book = codebook.Codebook(torch.randn(1, 8, 4), channels=4)
    good = tmp_path / "good.safetensors"
    good.write_bytes(tokens.codebook_bytes(book))
    assert tokens.load_codebook(good).sha256() == book.sha256()
    for meta, vectors, message in [({"channels": "x"}, None, "'channels'"), ({"patch": "0"}, None, "'patch'"),
                                   ({}, torch.randn(8, 4), "expected float32"), ({}, torch.randn(1, 8, 5), "4-channel"),
                                   ({}, torch.randn(1, 8, 4).bfloat16(), "hash")]:
        tensors = safetensors.torch.load(good.read_bytes())
        with safetensors.safe_open(str(good), framework="pt") as f:
            m = {**f.metadata(), **meta}
        if vectors is not None:
            tensors["codebook"] = vectors
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(safetensors.torch.save(tensors, metadata=m))
        with pytest.raises(tokens.VQFileError, match=message):
            tokens.load_codebook(bad)


def test_quantized_file_metadata_is_type_checked():
    with pytest.raises(ValueError, match="group_size"):
        formats.Spec.from_json({"format": "int4", "group_size": "64"})
    with pytest.raises(ValueError, match="format"):
        formats.Spec.from_json({"group_size": 64})
    with pytest.raises(checkpoint.CheckpointError, match="malformed"):
        checkpoint.expected_parts("x", {"format": "int4", "group_size": True, "shape": [8, 8]})
    with pytest.raises(checkpoint.CheckpointError, match="2-D shape"):
        checkpoint.expected_parts("x", {"format": "int8", "shape": [-8, 8]})
    with pytest.raises(checkpoint.CheckpointError, match="'layers'"):
        checkpoint.parse_layers({checkpoint.META_KEY: json.dumps({"format_version": 1, "layers": [1]})}, "f")


def test_metadata_naming_a_missing_or_non_linear_layer_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    qw = checkpoint.QuantWeight.quantize(torch.randn(8, 8), formats.Spec("int8"), torch.float32)
    for layer in ("5", "1", "0.weight"):
        with pytest.raises(checkpoint.CheckpointError, match=f"layer '{layer}'"):
            checkpoint.install(model, {"0": qw, layer: qw}, "f.safetensors")
        assert type(model[0]) is torch.nn.Linear   # checked before anything was replaced


def test_user_regexes_are_bounded():
    overrides = policy.parse_overrides("^(([a-z_0-9]+\\.?)+)+! = keep")
    start = time.perf_counter()
    plan = policy.plan_layer("double_blocks.0.img_attn.qkv_proj", (64, 64), "int8", None, overrides)
    assert time.perf_counter() - start < 1.0 and plan.spec is not None   # no match, nothing kept
    slow = policy.parse_overrides("(a|b)*c = keep", seconds=0.0)
    with pytest.raises(policy.PatternError, match="took more than"):
        policy.plan_layer("blocks.0", (8, 8), "int8", None, slow)
    with pytest.raises(ValueError, match="at most"):
        policy.parse_overrides("a" * 5000 + " = keep")
    with pytest.raises(ValueError, match="rules"):
        policy.parse_overrides("\n".join(["a = keep"] * 1000))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        policy.parse_overrides("(unclosed = keep")


def test_names_are_kept_inside_their_folder(tmp_path):
    root = tmp_path / "input"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.vqt").write_bytes(b"x")
    outside = tmp_path / "outside.vqt"
    outside.write_bytes(b"secret")
    (root / "link.vqt").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path)
    assert files.inside(root, "sub/a.vqt") == (root / "sub" / "a.vqt").resolve()
    assert files.inside(root, "sub\\a.vqt") == (root / "sub" / "a.vqt").resolve()
    for name in ("../outside.vqt", str(outside), "link.vqt", "linkdir/outside.vqt", "sub/../../outside.vqt",
                 "a\x00.vqt", "x" * 300, "", ".", "C:/x.vqt"):
        assert files.inside(root, name) is None, name
    # a link into another allowed folder is followed; ".." never, even towards an allowed folder
    assert files.inside(root, "link.vqt", [tmp_path]) == outside.resolve()
    assert files.inside(root, "../outside.vqt", [tmp_path]) is None


def test_listings_are_cached_and_follow_changes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "a.vqt").write_bytes(b"")
    (tmp_path / "d" / "b.vqt").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"")
    assert files.listing(tmp_path, ".vqt") == ["a.vqt", "d/b.vqt"]
    os.utime(tmp_path / "d", (1, 1))   # a cached listing is only re-read when a folder's time changes
    stale = files.listing(tmp_path, ".vqt")
    assert stale == ["a.vqt", "d/b.vqt"]
    (tmp_path / "d" / "e.vqt").write_bytes(b"")
    assert files.listing(tmp_path, ".vqt") == ["a.vqt", "d/b.vqt", "d/e.vqt"]


def test_writes_never_replace_a_file_and_refuse_bad_names(tmp_path, monkeypatch):
    first = files.write_new(tmp_path, "r", ".json", b"1")
    (tmp_path / "r_00002_.json").write_bytes(b"user")
    # A file system without hard links: the name is reserved exclusively, then renamed over.
    monkeypatch.setattr(files.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    third = files.write_new(tmp_path, "r", ".json", b"3")
    assert (first.name, third.name) == ("r_00001_.json", "r_00003_.json")
    assert (tmp_path / "r_00002_.json").read_bytes() == b"user" and third.read_bytes() == b"3"
    with pytest.raises(FileExistsError):
        files.write_atomic(tmp_path / "r_00002_.json", b"x")
    monkeypatch.setattr(files.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full")))
    with pytest.raises(OSError, match="disk full"):   # a real error is not taken for "no hard links"
        files.write_new(tmp_path, "r", ".json", b"4")
    for name in ("a\x00b", "x" * 300):
        with pytest.raises(files.FileNameError):
            files.write_new(tmp_path, name, ".json", b"")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_json_reports_are_strict():
    text = files.json_bytes({"a": float("nan"), "b": [float("inf"), 1.5]}).decode()
    assert json.loads(text) == {"a": None, "b": [None, 1.5]} and "NaN" not in text


def test_run_reports_are_matched_to_their_output_and_bounded():
    history = runs.RunHistory(max_reports=3, max_bytes=50_000)
    outs = [torch.full((1, 4), float(i)) for i in range(5)]
    for i, out in enumerate(outs):
        history.add({"summary": {"run": i}, "rows": [{"x": i}] * 10}, out)
    assert len(history.reports) == 3
    assert history.find(outs[4])["summary"]["run"] == 4
    assert history.find(outs[0]) is None                       # dropped, and never another run's
    assert history.find(torch.full((1, 4), 9.0)) is None
    history.add({"summary": {"run": "big"}, "rows": [{"x": "y" * 100}] * 1000}, outs[0])
    big = history.find(outs[0])
    assert big["summary"]["run"] == "big" and big["rows"] == [] and "too large" in big["warnings"][0]
    assert sum(len(json.dumps(r)) for r in history.reports) <= 50_000


def test_tensor_caches_are_bounded_in_bytes():
    made = []

    @tensor_cache(max_bytes=4000)
    def make(n):
        made.append(n)
        return torch.zeros(n, dtype=torch.uint8)

    for n in (1000, 1000, 2000, 1500, 1000):
        make(n)
    assert made == [1000, 2000, 1500, 1000]    # reused once, then dropped (least recently used) for 1500
    assert make.cache_bytes() <= 4000
    make(10_000)                                # over the bound: computed, not kept
    assert make.cache_bytes() <= 4000
