"""Hostile prompts and files against a real ComfyUI server, as an attacker with HTTP access would
send them: through ``/prompt`` and ``/upload/image`` only.

Every case asserts:
- the server is alive afterwards (``/system_stats`` answers, the process runs);
- it ended within ``CASE_SECONDS`` (else it is a hang; the harness interrupts it);
- it failed with a clear error naming the node and the input: the pack's ``AccelInputError``
  ("<node>: input '<name>' ...") raised by the node, or the host's own prompt validation
  naming that node and input (ComfyUI 0.33 checks combos when the prompt is queued, every host
  checks INT/FLOAT ranges); cases marked ``ok`` must succeed instead;
- nothing outside ComfyUI's folders was read or written: a sentinel folder beside the server's
  base folder holds valid token, codebook and model files that cases aim at (absolute paths,
  ``..``, symbolic links planted inside input/, output/ and models/); their access times are set
  before their modification times, so under ``relatime`` any read moves them, and any write or
  new file moves a modification time;
- a good prompt afterwards (quantization, TaylorSeer, sparse attention and VQ on the tiny Wan
  fixture, ComfyUI's caches dropped first through ``/free``) gives bit-identical output.

Cases run in batches; the sentinel and good-prompt checks run after each batch, so a failure
names the batch. The counts (cases, crashes, hangs, unclear errors, reads/writes outside, leaks)
are asserted at the end and written to ``out/fuzz_summary.txt``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import safetensors.torch
import torch

from lab import fixtures
from lab.host import ComfyServer
from lab.prompts import QUANTIZE_DEFAULTS, read_latent, sampling_prompt
from comfyui_accel.vq.codebook import Codebook
from comfyui_accel.vq import entropy
from comfyui_accel.vq.tokens import codebook_bytes, encode_latent, tokens_bytes

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

CASE_SECONDS = 10.0
BATCH = 25
MIN_CASES = 150
RSS_GROWTH_LIMIT = 1 << 30   # a prompt that decoded a crafted count would allocate GBs
AGO = 3 * 86400              # sentinel access times: this long before their modification times
SUMMARY_FILE = Path(__file__).resolve().parents[2] / "out" / "fuzz_summary.txt"   # the counts of the last run


# ---------------------------------------------------------------------------------------------
# the server and its folders


@dataclasses.dataclass
class Case:
    name: str
    prompt: dict
    node: str | None = None                     # id of the node whose error is expected
    inputs: tuple[str, ...] = ()                # the inputs that error may name
    expect: str = "error"                       # "error" | "ok"
    upload: tuple | None = None                 # (filename, bytes, type, subfolder) sent first
    check: object = None                        # extra check of a finished run's /history entry


@dataclasses.dataclass
class Outcome:
    case: Case
    kind: str           # "ok", "error" (execution), "rejected" (prompt validation), "hang", "crash"
    seconds: float
    detail: dict


class Harness:
    def __init__(self, root: Path):
        self.root = root
        self.outside = root / "outside"
        self.server = ComfyServer(base_dir=root / "comfy")
        self.base = self.server.base
        self.info = None   # the tiny Wan fixture, once written

    # --- HTTP -----------------------------------------------------------------------------

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        # NaN and Infinity as JSON literals: what a client's json.dumps sends (ComfyUI's parser takes them)
        body = json.dumps({"prompt": prompt, "client_id": self.server.client_id})
        r = requests.post(self.server.url + "/prompt", data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"text": r.text[:500]}

    def upload(self, name: str, data: bytes, kind: str = "input", subfolder: str = "") -> int:
        r = requests.post(self.server.url + "/upload/image", files={"image": (name, data)},
                          data={"type": kind, "subfolder": subfolder, "overwrite": "true"}, timeout=30)
        return r.status_code

    def alive(self) -> bool:
        if self.server.proc is None or self.server.proc.poll() is not None:
            return False
        try:
            return requests.get(self.server.url + "/system_stats", timeout=10).ok
        except requests.RequestException:
            return False

    def run_case(self, case: Case) -> Outcome:
        start = time.monotonic()
        if case.upload is not None:
            self.upload(*case.upload)
        status, body = self.post_prompt(case.prompt)
        if status != 200:
            return Outcome(case, "rejected", time.monotonic() - start, body)
        prompt_id = body["prompt_id"]
        while time.monotonic() - start < CASE_SECONDS:
            if not self.alive():
                return Outcome(case, "crash", time.monotonic() - start, {})
            entry = requests.get(f"{self.server.url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                seconds = time.monotonic() - start
                messages = dict((k, v) for k, v in entry["status"].get("messages", []))
                if entry["status"].get("status_str") == "error":
                    return Outcome(case, "error", seconds, messages.get("execution_error", {}))
                return Outcome(case, "ok", seconds, entry)
            time.sleep(0.03)
        requests.post(self.server.url + "/interrupt", timeout=10)
        return Outcome(case, "hang", time.monotonic() - start, {})

    def run_good(self) -> list[torch.Tensor]:
        """The good prompt on fresh caches (``/free`` drops ComfyUI's cached outputs and models;
        a tiny prompt after it makes sure the worker applied that first)."""
        requests.post(self.server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=10)
        sync = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "fuzz_sync"}}}
        self.server.run(sync, timeout=60)
        entry = self.server.run(good_prompt(self.info), timeout=120)
        return [read_latent(self.server.output_files(entry, n, kind="latents")[0]) for n in ("6", "9")]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    # --- the sentinel ---------------------------------------------------------------------

    def arm_sentinel(self) -> None:
        """Access times before modification times on everything outside, and a record of them."""
        for path in [self.outside, *self.outside.iterdir()]:
            st = path.stat()
            os.utime(path, ns=(st.st_mtime_ns - AGO * 10 ** 9, st.st_mtime_ns))
        self.sentinel = self.sentinel_state()

    def sentinel_state(self) -> dict:
        # stat only: reading or listing here would move the times this watches
        paths = [self.root, self.outside, *(self.outside / n for n in SENTINEL_FILES)]
        return {str(p): (p.stat().st_atime_ns, p.stat().st_mtime_ns, p.stat().st_size) for p in paths}

    def outside_touched(self) -> list[str]:
        now = self.sentinel_state()
        return [f"{p}: {'read' if now[p][0] != was[0] else 'written'}" for p, was in self.sentinel.items()
                if now[p] != was]


SENTINEL_FILES = ("secret.vqt", "secret.safetensors", "secret_model.safetensors", "passwd")


# ---------------------------------------------------------------------------------------------
# prompts


def base_graph(info) -> dict:
    """Tiny Wan loader "1", conditionings "2"/"3", latent "4", a 2-step sample "5", a VQ codebook
    "20" fitted on it and its tokens "21": what the node under test ("30") takes its links from.
    Only the nodes an output needs run, and ComfyUI caches them between cases."""
    prompt = sampling_prompt(info, seed=11, steps=2, prefix="fuzz_base")
    del prompt["6"]
    prompt["20"] = {"class_type": "AccelVQFitCodebook", "inputs": {"latent": ["5", 0], "codebook_size": 16,
                    "patch_size": 1, "residual_levels": 2, "iterations": 2, "seed": 0}}
    prompt["21"] = {"class_type": "AccelVQEncode", "inputs": {"latent": ["5", 0], "codebook": ["20", 0],
                    "residual_levels": 0}}
    return prompt


LINKS = {"MODEL": ["1", 0], "LATENT": ["5", 0], "ACCEL_VQ_CODEBOOK": ["20", 0], "ACCEL_VQ_TOKENS": ["21", 0]}


def good_prompt(info) -> dict:
    chain = [("AccelQuantizeModel", dict(QUANTIZE_DEFAULTS)),
             ("AccelTaylorSeer", {"interval": 2, "order": 1, "warmup_steps": 1, "end": 1.0, "forecast": "auto",
                                  "cache_device": "model device", "short_schedule": "cache anyway"}),
             ("AccelSparseAttention", {"policy": "radial", "density": 0.5, "block_size": 16, "top_p": 0.9,
                                       "dense_steps": 1, "dense_first_layers": 1, "dense_last_layers": 0,
                                       "min_tokens": 0, "retention": False, "probe_rows": 8, "save_report": False})]
    prompt = sampling_prompt(info, seed=5, steps=4, chain=chain, prefix="fuzz_good")
    prompt["20"] = {"class_type": "AccelVQFitCodebook", "inputs": {"latent": ["5", 0], "codebook_size": 8,
                    "patch_size": 1, "residual_levels": 2, "iterations": 3, "seed": 1}}
    prompt["21"] = {"class_type": "AccelVQEncode", "inputs": {"latent": ["5", 0], "codebook": ["20", 0],
                    "residual_levels": 0}}
    prompt["22"] = {"class_type": "AccelVQDecode", "inputs": {"tokens": ["21", 0], "residual_levels": 0}}
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": "fuzz_good_vq"}}
    return prompt


class Schemas:
    """Our nodes' inputs as /object_info gives them, on either host's notation."""

    def __init__(self, info: dict):
        self.info = {k: v for k, v in info.items() if k.startswith("Accel") and not k.startswith("AccelTest")}

    def display(self, node: str) -> str:
        return self.info[node]["display_name"]

    def inputs(self, node: str, section: str = "required") -> dict[str, tuple[str, dict]]:
        out = {}
        for name, spec in self.info[node]["input"].get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                kind, opts = "COMBO", {**opts, "options": kind}
            out[name] = (kind, opts)
        return out

    def default(self, kind: str, opts: dict):
        if "default" in opts:
            return opts["default"]
        if kind == "COMBO":
            return opts["options"][0] if opts["options"] else ""
        return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}[kind]

    def prompt(self, info, node: str, **values) -> dict | None:
        """A prompt with ``node`` as "30", every required input valid (links from the base graph,
        widgets at their defaults) except ``values``; None if it needs a link we do not provide."""
        prompt = base_graph(info)
        inputs = {}
        for name, (kind, opts) in self.inputs(node).items():
            if name in values:
                inputs[name] = values[name]
            elif kind in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"):
                inputs[name] = self.default(kind, opts)
            elif name == "negative":
                inputs[name] = ["3", 0]
            elif kind == "CONDITIONING":
                inputs[name] = ["2", 0]
            elif kind in LINKS:
                inputs[name] = LINKS[kind]
            else:
                return None
        prompt["30"] = {"class_type": node, "inputs": inputs}
        if not self.info[node].get("output_node"):
            prompt["31"] = {"class_type": "PreviewAny", "inputs": {"source": ["30", 0]}}
        return prompt


# ---------------------------------------------------------------------------------------------
# hostile files


def token_file_parts(embed: bool = True) -> tuple[dict, dict]:
    book = Codebook(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(3)), channels=4)
    latent = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(4))
    data, _ = tokens_bytes(encode_latent(book, latent, pixels=48 * 40), embed_codebook=embed)
    return _parts(data)


def _parts(data: bytes) -> tuple[dict, dict]:
    import safetensors
    tensors = safetensors.torch.load(data)
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    return meta, tensors


def _pack(meta: dict, tensors: dict, rehash: bool = True) -> bytes:
    """Token file bytes; ``rehash`` recomputes the payload hash as an attacker can, so the
    deeper checks are reached."""
    meta = dict(meta)
    if rehash:
        digest = hashlib.sha256()
        for level in range(64):
            if f"level{level}.words" not in tensors:
                break
            for part in ("words", "table"):
                t = tensors.get(f"level{level}.{part}")
                if t is not None:
                    digest.update(t.contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else b"")
        meta["payload_sha256"] = digest.hexdigest()
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items() if v is not None}, metadata=meta)


def _table(symbols, counts, k=16) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(bytearray(entropy.pack_table(np.asarray(symbols), np.asarray(counts), k)),
                                          np.uint8).copy())


def _raw_table(used, width, bitmap, ids: bytes, counts: bytes) -> torch.Tensor:
    head = np.array([used, width, bitmap], "<u4").tobytes()
    return torch.from_numpy(np.frombuffer(bytearray(head + ids + counts), np.uint8).copy())


def hostile_token_files() -> list[tuple[str, bytes, str, str]]:
    """(name, bytes, where: "ok", "load" or "decode" (the node whose error names the input) or
    "either" (a damaged stream that may still decode to valid indices), the input it names)."""
    meta, tensors = token_file_parts()
    n = json.loads(meta["counts"])[0]
    good = _pack(meta, tensors, rehash=False)
    out = [("valid", good, "ok", "")]

    def variant(name, meta_changes=None, tensor_changes=None, where="load", input_name="token_file", rehash=True):
        m, t = dict(meta), dict(tensors)
        m.update(meta_changes or {})
        t.update(tensor_changes or {})
        out.append((name, _pack(m, t, rehash), where, input_name))

    # the hanging file: counts=[5e8] over a one-symbol table
    variant("counts_5e8", {"counts": "[500000000, 500000000]"},
            {"level0.table": _table([0], [500_000_000]), "level1.table": _table([0], [500_000_000])})
    variant("counts_mismatch", {"counts": json.dumps([n + 1, n])})
    variant("counts_negative", {"counts": json.dumps([-1, n])})
    variant("counts_float", {"counts": json.dumps([n + 0.5, n])})
    variant("counts_not_list", {"counts": "7"})
    variant("huge_shape", {"latent_shape": "[1, 4, 65536, 65536]"})
    variant("shape_3d", {"latent_shape": "[1, 4, 6]"})
    variant("shape_zero", {"latent_shape": "[1, 4, 0, 5]"})
    variant("shape_nested", {"latent_shape": "[[1], 4, 6, 5]"})
    variant("shape_garbage", {"latent_shape": "{not json"})
    variant("channels_1e6", {"latent_shape": "[1, 1000000, 1, 1]"})
    variant("lanes_zero", {"lanes": "[0, 0]"})
    variant("lanes_64", {"lanes": "[64, 64]"})
    variant("lanes_text", {"lanes": '["a", "b"]'})
    variant("levels_zero", {"levels": "0"})
    variant("levels_99", {"levels": "99"})
    variant("k_one", {"codebook_size": "1"})
    variant("k_huge", {"codebook_size": "1000000"})
    variant("patch_zero", {"patch": "0"})
    variant("patch_text", {"patch": "abc"})
    variant("pixels_negative", {"pixels": "-5"})
    variant("version_2", {"version": "2"})
    variant("format_other", {"format": "something-else"})
    variant("kind_other", {"kind": "video"})
    variant("sha_short", {"codebook_sha256": "abc"})
    # a 282 KB table: 65536 symbols, one count of 2^32 - 1 (quadratic rounding before)
    big = np.ones(65536, np.int64)
    big[0] = 2 ** 32 - 1
    variant("table_65536", {"codebook_size": "65536"},
            {"level0.table": _table(np.arange(65536), big, 65536)})
    variant("table_symbol_out_of_range", None, {"level0.table": _raw_table(1, 4, 0, np.array([40], "<u2").tobytes(),
                                                                           np.array([n], "<u4").tobytes())})
    variant("table_unsorted", None, {"level0.table": _raw_table(2, 4, 0, np.array([5, 3], "<u2").tobytes(),
                                                                np.array([n - 1, 1], "<u4").tobytes())})
    variant("table_truncated", None, {"level0.table": tensors["level0.table"][:10]})
    variant("table_width_3", None, {"level0.table": _raw_table(1, 3, 0, b"\x00\x00", b"\x01\x00\x00")})
    variant("table_float", None, {"level0.table": tensors["level0.table"].float()})
    variant("words_bf16", None, {"level0.words": tensors["level0.words"].bfloat16()})
    variant("words_2d", None, {"level0.words": tensors["level0.words"].reshape(1, -1)})
    variant("words_truncated", None, {"level0.words": tensors["level0.words"][:3]}, where="either")
    variant("words_extra", None, {"level0.words": torch.cat([tensors["level0.words"]] * 40)})
    variant("words_flipped", None, {"level0.words": tensors["level0.words"] ^ 0x5A5A5A5A}, where="either")
    variant("level_missing", None, {"level1.words": None})
    variant("payload_hash_mismatch", None, {"level0.words": tensors["level0.words"] ^ 1}, rehash=False)
    variant("codebook_2d", None, {"codebook": tensors["codebook"][0]})
    variant("codebook_4d", None, {"codebook": tensors["codebook"][None]})
    variant("codebook_nan", None, {"codebook": torch.full_like(tensors["codebook"], float("nan"))})
    variant("codebook_bf16", None, {"codebook": tensors["codebook"].bfloat16()})
    variant("codebook_int", None, {"codebook": tensors["codebook"].int()})
    variant("codebook_other", None, {"codebook": torch.randn_like(tensors["codebook"])})
    variant("codebook_huge_dim", {"latent_shape": "[1, 5, 6, 5]"})
    variant("bitrate_garbage", {"bitrate": '{"pixels": "x"}'}, where="ok")
    variant("vqgan_kind", {"kind": "vqgan"}, where="decode", input_name="tokens")
    variant("codebook_name_huge", {"codebook_name": "x" * 1_000_000}, where="ok")
    # no embedded codebook, and a name that climbs out of models/vq_codebooks to a real codebook file
    m2, t2 = token_file_parts(embed=False)
    m2["codebook_name"] = "../../../outside/secret.safetensors"
    out.append(("codebook_name_traversal", _pack(m2, t2), "decode", "codebook"))
    m3 = dict(m2, codebook_name="/" + "x" * 10)
    out.append(("codebook_name_absolute", _pack(m3, t2), "decode", "codebook"))
    out.append(("truncated", good[:len(good) // 2], "load", "token_file"))
    out.append(("random_bytes", np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes(), "load",
                "token_file"))
    out.append(("empty", b"", "load", "token_file"))
    out.append(("header_garbage", (9).to_bytes(8, "little") + b"{not json", "load", "token_file"))
    out.append(("header_huge_length", (2 ** 62).to_bytes(8, "little") + b"{}", "load", "token_file"))
    return out


def hostile_quantized_files(good: bytes) -> list[tuple[str, bytes]]:
    """Variants of a file Save Quantized Model wrote, with their metadata or tensors changed."""
    import safetensors
    meta, tensors = _parts(good)
    accel = json.loads(meta["accel_quant"])
    layers = accel["layers"]
    first = next(iter(layers))
    out = []

    def variant(name, change_layers=None, change_accel=None, change_tensors=None, raw_meta=None):
        m, a, t = dict(meta), copy.deepcopy(accel), dict(tensors)
        if change_layers:
            change_layers(a["layers"])
        if change_accel:
            change_accel(a)
        if change_tensors:
            change_tensors(t)
        m["accel_quant"] = raw_meta if raw_meta is not None else json.dumps(a)
        out.append((name, safetensors.torch.save(t, metadata=m)))

    def rename(new):
        def change(t):
            for key in [k for k in t if k.startswith(first + ".")]:
                t[new + key[len(first):]] = t.pop(key)
        return change

    variant("layer_missing", lambda ls: ls.update({"no_such.layer": ls.pop(first)}), change_tensors=rename("no_such.layer"))
    variant("layer_not_linear", lambda ls: ls.update({"blocks.0.norm3": ls.pop(first)}),
            change_tensors=rename("blocks.0.norm3"))
    variant("layer_dunder", lambda ls: ls.update({"__class__": ls.pop(first)}), change_tensors=rename("__class__"))
    variant("group_size_text", lambda ls: ls[first].update(group_size="64"))
    variant("group_size_bool", lambda ls: ls[first].update(group_size=True))
    variant("format_unknown", lambda ls: ls[first].update(format="int3"))
    variant("format_number", lambda ls: ls[first].update(format=8))
    variant("shape_negative", lambda ls: ls[first].update(shape=[-64, 64]))
    variant("shape_huge", lambda ls: ls[first].update(shape=[2 ** 40, 2 ** 40]))
    variant("shape_3d", lambda ls: ls[first].update(shape=[4, 4, 4]))
    variant("layer_not_object", lambda ls: ls.update({first: [1, 2]}))
    variant("extras_not_list", lambda ls: ls[first].update(extras="smooth"))
    variant("rank_huge", lambda ls: ls[first].update(extras=["lora_down", "lora_up"], rank=10 ** 9))
    variant("layers_list", change_accel=lambda a: a.update(layers=[1]))
    variant("version_99", change_accel=lambda a: a.update(format_version=99))
    variant("meta_garbage", raw_meta="{not json")
    variant("tensor_dtype", change_tensors=lambda t: t.update({k: v.float() for k, v in t.items()
                                                              if k.startswith(first + ".") and v.dtype == torch.int8}))
    variant("tensor_shape", change_tensors=lambda t: t.update({k: v.reshape(-1)[:5].clone() for k, v in t.items()
                                                              if k.startswith(first + ".")}))
    out.append(("truncated", good[:len(good) // 3]))
    out.append(("garbage", b"\x00" * 64))
    return out


# ---------------------------------------------------------------------------------------------
# the cases


def vq_load_prompt(token_file) -> dict:
    return {"1": {"class_type": "AccelVQLoadTokens", "inputs": {"token_file": token_file}},
            "2": {"class_type": "AccelVQDecode", "inputs": {"tokens": ["1", 0], "residual_levels": 0}},
            "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "fuzz_vq"}}}


HOSTILE_NAMES = ("/etc/passwd", "../../../etc/hostname", "{outside}/{file}", "../../outside/{file}",
                 "../outside/{file} [output]", "link.{ext}", "linkdir/{file}", "missing.{ext}", "a\x00b.{ext}",
                 "x" * 300 + ".{ext}", "", ".", "/", "..\\..\\outside\\{file}", "~/{file}", "file:///etc/passwd",
                 "{file} [temp]", "sub/../../../outside/{file}")


def make_cases(h: Harness, s: Schemas, files: dict) -> list[Case]:
    info = h.info
    cases: list[Case] = []
    add = cases.append

    def names(file: str, ext: str):
        for raw in HOSTILE_NAMES:
            yield raw.format(outside=h.outside, file=file, ext=ext)

    # 1. paths in file combos: never opened outside ComfyUI's folders, one message for all
    for value in [*names("secret.vqt", "vqt"), "vq_tokens/link.vqt [output]", "fuzz_image.png", 123, None]:
        add(Case(f"token_file={value!r:.40}", vq_load_prompt(value), "1", ("token_file",)))
    for value in names("secret.safetensors", "safetensors"):
        add(Case(f"codebook_name={value!r:.40}", s.prompt(info, "AccelVQLoadCodebook", codebook_name=value),
                 "30", ("codebook_name",)))
    for value in names("secret_model.safetensors", "safetensors"):
        add(Case(f"unet_name={value!r:.40}", s.prompt(info, "AccelLoadQuantized", unet_name=value),
                 "30", ("unet_name",)))
    # 2. save names: no writes outside, no overwrite of a user's file
    bad_prefixes = ["../../outside/x", f"{h.outside}/x", "escape/x", "a\x00b", "x" * 300, "", "/",
                    "vq_tokens/../../../outside/x", "..", "%year%/../../outside/x"]
    for value in bad_prefixes:
        add(Case(f"save tokens prefix={value!r:.40}", s.prompt(info, "AccelVQSaveTokens", filename_prefix=value),
                 "30", ("filename_prefix",)))
    for value in ["../x", "sub/x", f"{h.outside}/x", "a\x00b", "x" * 300, ""]:
        add(Case(f"save codebook prefix={value!r:.40}", s.prompt(info, "AccelVQSaveCodebook", filename_prefix=value),
                 "30", ("filename_prefix",)))
    quantized = s.prompt(info, "AccelQuantizeModel")
    for value in ["../../../outside/x", f"{h.outside}/x", "a\x00b", "x" * 300, "", "fuzz/good"]:
        prompt = copy.deepcopy(quantized)
        prompt["40"] = {"class_type": "AccelSaveQuantized", "inputs": {
            "model": ["30", 0], "filename": value, "overwrite": False, "other_weights_dtype": "keep"}}
        add(Case(f"save quantized filename={value!r:.40}", prompt, "40", ("filename",)))
    # 3. crafted token files, uploaded through the stock endpoint
    for name, data, where, input_name in files["tokens"]:
        upload = (f"fuzz_{name}.vqt", data, "input", "")
        prompt = vq_load_prompt(f"fuzz_{name}.vqt")
        if where == "ok":
            add(Case(f"token file {name}", prompt, expect="ok", upload=upload))
        else:
            add(Case(f"token file {name}", prompt, "2" if where == "decode" else "1", (input_name,), upload=upload,
                     expect="either" if where == "either" else "error"))
    add(Case("token file uploaded to output/vq_tokens", vq_load_prompt("vq_tokens/fuzz_out.vqt [output]"),
             expect="ok", upload=("fuzz_out.vqt", files["tokens"][0][1], "output", "vq_tokens")))
    add(Case("upload name climbing out", vq_load_prompt("../../outside/up.vqt"), "1", ("token_file",),
             upload=("../../outside/up.vqt", files["tokens"][0][1], "input", "")))
    add(Case("upload subfolder climbing out", vq_load_prompt("../../outside/up2.vqt"), "1", ("token_file",),
             upload=("up2.vqt", files["tokens"][0][1], "input", "../../outside")))
    # 4. crafted quantized files in models/diffusion_models
    for name, _ in files["quantized"]:
        add(Case(f"quantized file {name}", s.prompt(info, "AccelLoadQuantized", unet_name=f"fuzz/{name}.safetensors"),
                 "30", ("unet_name",)))
    # 5. user regexes
    # patterns that backtrack for hours in Python's re: valid, so they run (bounded) or say they took too long
    slow = ["^(([a-z_0-9]+\\.?)+)+! = keep", "(a|a)*b = keep", "(x+x+)+y = int8", "(.*a){25} = keep",
            "(?<=a+)b = keep", "(a)\\1\\1\\1 = keep", "((((((((((a*)*)*)*)*)*)*)*)*)*)*! = keep"]
    invalid = ["a" * 2000 + " = keep", "(unclosed = keep", "blocks = nope", "blocks = int8 sideways",
               "no equals sign", "\n".join(["a = keep"] * 300), "x" * 70_000]
    for node in ("AccelQuantizeModel", "AccelSVDLowRankBranch"):
        for value in slow + invalid:
            add(Case(f"{node} layer_overrides={value!r:.30}", s.prompt(info, node, layer_overrides=value),
                     "30", ("layer_overrides",), expect="either" if value in slow else "error"))
    # 6. every FLOAT of every node: NaN (JSON and text) and infinity
    for node in s.info:
        for name, (kind, opts) in s.inputs(node).items():
            if kind == "FLOAT":
                for value in (math.nan, "nan", math.inf):
                    prompt = s.prompt(info, node, **{name: value})
                    if prompt is not None:
                        add(Case(f"{node}.{name}={value!r}", prompt, "30", (name,)))
    # 7. every COMBO of every node: not an option, another type, a path-like neighbour
            if kind == "COMBO" and name not in ("token_file", "codebook_name", "unet_name"):
                for value in ("nope", 7, "../" + str(s.default(kind, opts))):
                    prompt = s.prompt(info, node, **{name: value})
                    if prompt is not None:
                        add(Case(f"{node}.{name}={value!r}", prompt, "30", (name,)))
    # 8. every INT: text and one past the maximum (the seed widgets go to 2^64 - 1)
            if kind == "INT":
                for value in ("abc", opts.get("max", 2 ** 64) + 1):
                    prompt = s.prompt(info, node, **{name: value})
                    if prompt is not None:
                        add(Case(f"{node}.{name}={value!r:.30}", prompt, "30", (name,)))
    # 9. every STRING: a NUL character
            if kind == "STRING":
                prompt = s.prompt(info, node, **{name: "ok\x00" + str(s.default(kind, opts))})
                if prompt is not None:
                    add(Case(f"{node}.{name} with NUL", prompt, "30", (name,)))
    # 10. the widest seed runs (calibration seeds layer by layer from it)
    calibrate = {"positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0], "calibration_steps": 1,
                 "seed": 2 ** 64 - 1}
    prompt = s.prompt(info, "AccelQuantizeModel", **calibrate, cfg=1.0)
    prompt["30"]["inputs"].update(calibrate)
    add(Case("quantize seed 2^64-1 calibrated", prompt, expect="ok"))
    prompt = s.prompt(info, "AccelSVDLowRankBranch", rank=16, smooth_alpha=0.5, seed=2 ** 64 - 1, calibration_steps=1)
    prompt["30"]["inputs"].update(calibrate)
    add(Case("svd seed 2^64-1 calibrated", prompt, expect="ok"))
    # 11. semantic checks behind the schema's
    add(Case("quantize auto with no budget and no floor",
             s.prompt(info, "AccelQuantizeModel", format="auto", auto_budget=0.0, auto_min_sqnr_db=0.0),
             "30", ("auto_budget",)))
    add(Case("svg without probe rows", s.prompt(info, "AccelSparseAttention", policy="svg", probe_rows=0),
             "30", ("probe_rows",)))
    add(Case("teacache empty window", s.prompt(info, "AccelTeaCache", start=0.5, end=0.5), "30", ("start/end",)))
    add(Case("codebook bigger than the latent", s.prompt(info, "AccelVQFitCodebook", codebook_size=60000),
             "30", ("codebook_size",)))
    add(Case("shrink to a bigger codebook", s.prompt(info, "AccelVQShrinkCodebook", codebook_size=64),
             "30", ("codebook_size",)))
    add(Case("decode more levels than coded", s.prompt(info, "AccelVQDecode", residual_levels=5),
             "30", ("residual_levels",)))
    add(Case("svd on a model that has its branch", _twice(s.prompt(info, "AccelSVDLowRankBranch")), "32", ("model",)))
    add(Case("sparse attention block size as text", s.prompt(info, "AccelSparseAttention", block_size="64"),
             "30", ("block_size",), expect="either"))
    # 12. reports are matched to their own run: a latent no run made has no report
    prompt = sampling_prompt(info, seed=23, steps=2, prefix="fuzz_report", chain=[("AccelTaylorSeer", {
        "interval": 2, "order": 1, "warmup_steps": 1, "end": 1.0, "forecast": "auto", "cache_device": "model device",
        "short_schedule": "cache anyway"})])
    prompt["40"] = {"class_type": "AccelCacheReport", "inputs": {"model": ["10", 0], "latent": ["4", 0]}}
    add(Case("cache report for a latent no run made", prompt, expect="ok",
             check=lambda entry: "No report for this latent" in entry["outputs"]["40"]["text"][0]))
    prompt = sampling_prompt(info, seed=24, steps=2, prefix="fuzz_report2", chain=[("AccelSparseAttention", {
        "policy": "radial", "density": 0.5, "block_size": 16, "top_p": 0.9, "dense_steps": 0,
        "dense_first_layers": 0, "dense_last_layers": 0, "min_tokens": 0, "retention": False, "probe_rows": 0,
        "save_report": False})])
    prompt["40"] = {"class_type": "AccelSparseAttentionReport", "inputs": {"model": ["10", 0], "latent": ["4", 0]}}
    prompt["41"] = {"class_type": "PreviewAny", "inputs": {"source": ["40", 0]}}
    add(Case("sparse report for a latent no run made", prompt, "40", ("latent",)))
    return cases


def _twice(prompt: dict) -> dict:
    """The node "30" applied again ("32") on its own MODEL output."""
    prompt["32"] = {"class_type": prompt["30"]["class_type"], "inputs": {**prompt["30"]["inputs"], "model": ["30", 0]}}
    prompt["33"] = {"class_type": "PreviewAny", "inputs": {"source": ["32", 0]}}
    return prompt


# ---------------------------------------------------------------------------------------------
# judging


def unclear(case: Case, outcome: Outcome, schemas: Schemas) -> str | None:
    """Why the outcome is not what the case asks for, or None."""
    if case.expect in ("ok", "either") and outcome.kind == "ok":
        if case.check is not None and not case.check(outcome.detail):
            return "ran, but its output is not what the case checks"
        return None
    if case.expect == "ok":
        return f"should have run, got {outcome.kind}: {json.dumps(outcome.detail)[:300]}"
    if outcome.kind == "rejected":   # the host's own validation: must name the node and the input
        errors = outcome.detail.get("node_errors", {}).get(case.node, {}).get("errors", [])
        named = {e.get("extra_info", {}).get("input_name") for e in errors}
        if errors and named & set(case.inputs):
            return None
        return f"rejected without naming input {case.inputs} of node {case.node}: {json.dumps(outcome.detail)[:300]}"
    if outcome.kind == "error":
        d = outcome.detail
        node = f"{schemas.display(case_node_type(case))} ({case_node_type(case)})"   # display name and id
        message = d.get("exception_message", "")
        if (d.get("node_id") == case.node and str(d.get("exception_type", "")).endswith("AccelInputError")
                and any(message.startswith(f"{node}: input '{name}' ") for name in case.inputs)):
            return None
        return (f"node {d.get('node_id')} raised {d.get('exception_type')}: {message[:300]} "
                f"(expected {node}: input {case.inputs})")
    return f"{outcome.kind}"


def case_node_type(case: Case) -> str:
    return case.prompt[case.node]["class_type"]


# ---------------------------------------------------------------------------------------------
# the test


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    h = Harness(root)
    h.outside.mkdir()
    base = h.base
    for sub in ("input", "output/vq_tokens", "models/vq_codebooks", "models/diffusion_models/fuzz"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    h.info = fixtures.write_fixture("wan21", "tiny", h.server.models_dir)
    meta, tensors = token_file_parts()
    secret_tokens = _pack(meta, tensors, rehash=False)
    book = Codebook(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(3)), channels=4)
    (h.outside / "secret.vqt").write_bytes(secret_tokens)
    (h.outside / "secret.safetensors").write_bytes(codebook_bytes(book))
    (h.outside / "passwd").write_text("root:x:0:0:sentinel\n")
    (base / "input" / "fuzz_image.png").write_bytes(b"\x89PNG not really")
    (base / "input" / "link.vqt").symlink_to(h.outside / "secret.vqt")
    (base / "input" / "linkdir").symlink_to(h.outside, target_is_directory=True)
    (base / "output" / "vq_tokens" / "link.vqt").symlink_to(h.outside / "secret.vqt")
    (base / "output" / "escape").symlink_to(h.outside, target_is_directory=True)
    (base / "models" / "vq_codebooks" / "link.safetensors").symlink_to(h.outside / "secret.safetensors")
    h.server.start()
    yield h
    h.server.stop()


def test_hostile_prompts_and_files_end_in_clear_errors(harness):
    h = harness
    started = time.monotonic()
    schemas = Schemas(h.server.object_info())
    # A real quantized file (the good prompt's quantization, saved), copied outside as a sentinel
    # and turned into crafted variants inside models/diffusion_models/fuzz.
    save = schemas.prompt(h.info, "AccelQuantizeModel")
    save["40"] = {"class_type": "AccelSaveQuantized", "inputs": {"model": ["30", 0], "filename": "fuzz/good",
                  "overwrite": False, "other_weights_dtype": "keep"}}
    h.server.run(save, timeout=120)
    good_file = h.base / "models" / "diffusion_models" / "fuzz" / "good.safetensors"
    good_bytes = good_file.read_bytes()
    (h.outside / "secret_model.safetensors").write_bytes(good_bytes)
    (h.base / "models" / "diffusion_models" / "link.safetensors").symlink_to(h.outside / "secret_model.safetensors")
    files = {"tokens": hostile_token_files(), "quantized": hostile_quantized_files(good_bytes)}
    for name, data in files["quantized"]:
        (good_file.parent / f"{name}.safetensors").write_bytes(data)
    cases = make_cases(h, schemas, files)
    assert len(cases) >= MIN_CASES

    reference = h.run_good()
    rss_start = h.rss_bytes()
    h.arm_sentinel()
    counts = dict(cases=len(cases), crashes=0, hangs=0, unclear=0, outside=0, leaks=0)
    problems, slowest, kinds = [], (0.0, ""), {}
    for first in range(0, len(cases), BATCH):
        batch = cases[first:first + BATCH]
        for case in batch:
            outcome = h.run_case(case)
            slowest = max(slowest, (outcome.seconds, case.name))
            kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
            if outcome.kind == "crash" or not h.alive():
                counts["crashes"] += 1
                problems.append(f"crash: {case.name}\n{h.server.log_tail(40)}")
                break
            if outcome.kind == "hang" or outcome.seconds > CASE_SECONDS:
                counts["hangs"] += 1
                problems.append(f"hang ({outcome.seconds:.1f} s): {case.name}")
                continue
            why = unclear(case, outcome, schemas)
            if why:
                counts["unclear"] += 1
                problems.append(f"unclear: {case.name}: {why}")
        if counts["crashes"]:
            break
        touched = h.outside_touched()
        if touched:
            counts["outside"] += len(touched)
            problems.append(f"batch {first // BATCH}: outside ComfyUI's folders: {touched}")
            h.arm_sentinel()
        outputs = h.run_good()
        if not all(torch.equal(a, b) for a, b in zip(outputs, reference)):
            counts["leaks"] += 1
            problems.append(f"batch {first // BATCH} ({batch[0].name} .. {batch[-1].name}): the good prompt's "
                            "output changed")
    leftovers = [str(p) for p in h.base.rglob("*.part")]
    if leftovers:
        counts["leaks"] += len(leftovers)
        problems.append(f"temporary files left: {leftovers}")
    if good_file.read_bytes() != good_bytes:
        counts["outside"] += 1
        problems.append("Save Quantized Model replaced a user's file without overwrite")
    rss_growth = h.rss_bytes() - rss_start
    if rss_growth > RSS_GROWTH_LIMIT:
        counts["leaks"] += 1
        problems.append(f"the server grew by {rss_growth / 2 ** 20:.0f} MB")
    summary = (f"fuzz: {counts['cases']} cases, {counts['crashes']} crashes, {counts['hangs']} hangs, "
               f"{counts['unclear']} unclear errors, {counts['outside']} reads/writes outside ComfyUI's folders, "
               f"{counts['leaks']} leaks; outcomes {kinds} (error: the pack's, rejected: the host's own prompt "
               f"validation); slowest case {slowest[0]:.2f} s ({slowest[1]}); server RSS "
               f"{rss_growth / 2 ** 20:+.0f} MB; {time.monotonic() - started:.0f} s")
    log.warning("%s", summary)
    SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_FILE.write_text(summary + "\n" + "\n".join(problems) + "\n")
    assert not problems, summary + "\n" + "\n".join(problems[:40])
