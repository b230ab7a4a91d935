"""The one input check every node passes (nodes/validate.py), in-process on real ComfyUI: it runs
whoever calls ``execute``, on every host, and says node, input, value and what is allowed."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nodes(comfy):
    from comfyui_accel.nodes import registry
    return {n.define_schema().node_id: n for n in registry.all_nodes()}


def test_every_node_runs_on_checked_inputs(nodes):
    from comfyui_accel.nodes.validate import AccelNode
    assert len(nodes) >= 20
    for node_id, node in nodes.items():
        assert issubclass(node, AccelNode), node_id
        assert getattr(node.execute.__func__, "_accel_checked", False), node_id


def schema_of(nodes, node_id):
    return nodes[node_id].define_schema()


@pytest.mark.parametrize("node_id, name, value, message", [
    ("AccelQuantizeModel", "cfg", math.nan, "must be a finite number, got nan"),
    ("AccelQuantizeModel", "auto_budget", math.inf, "must be a finite number"),
    ("AccelQuantizeModel", "auto_min_sqnr_db", -1.0, "allowed: 0.0 to 80.0"),
    ("AccelQuantizeModel", "format", "nope", "not an option; allowed: one of 'int8'"),
    ("AccelQuantizeModel", "group_size", True, "must be a whole number"),
    ("AccelQuantizeModel", "group_size", 4.5, "must be a whole number"),
    ("AccelQuantizeModel", "seed", -1, "allowed: 0 to 18446744073709551615"),
    ("AccelQuantizeModel", "layer_overrides", "a" * 70_000, "at most 65536"),
    ("AccelQuantizeModel", "auto_formats", "int8\x00", "NUL"),
    ("AccelSVDLowRankBranch", "report_format", "vq2", "not an option"),
    ("AccelSVDLowRankBranch", "svd", 3, "not an option"),
    ("AccelTeaCache", "threshold", math.nan, "finite"),
    ("AccelTeaCache", "coefficients", "../flux", "not an option"),
    ("AccelTeaCache", "cache_device", "cuda:7", "not an option"),
    ("AccelTaylorSeer", "forecast", None, "not an option"),
    ("AccelSparseAttention", "density", math.nan, "finite"),
    ("AccelSparseAttention", "block_size", "abc", "not an option; allowed: one of 16, 32, 64, 128"),
    ("AccelSparseAttention", "save_report", "false", "must be true or false"),
    ("AccelVQEncode", "latent", {"samples": "x"}, "must be a LATENT"),
    ("AccelVQDecode", "tokens", "x", "must be VQ tokens"),
    ("AccelTeaCache", "profile", {"coefficients": [1]}, "must be a cache profile"),
    ("AccelTeaCache", "model", object(), "must be a MODEL"),
])
def test_bad_values_name_node_input_value_and_what_is_allowed(nodes, node_id, name, value, message):
    from comfyui_accel.nodes.common import AccelInputError
    from comfyui_accel.nodes.validate import check_inputs
    schema = schema_of(nodes, node_id)
    with pytest.raises(AccelInputError) as e:
        check_inputs(schema, {name: value})
    text = str(e.value)
    assert text.startswith(f"{schema.display_name} ({node_id}): input '{name}' ") and message in text, text


def test_good_values_pass_and_combo_strings_become_their_options(nodes):
    from comfyui_accel.nodes.validate import check_inputs
    values = {"density": 1, "block_size": "64", "policy": "svg", "save_report": False, "min_tokens": 0}
    out = check_inputs(schema_of(nodes, "AccelSparseAttention"), values)
    assert out["block_size"] == 64 and type(out["block_size"]) is int
    assert out["density"] == 1.0 and type(out["density"]) is float
    seed = check_inputs(schema_of(nodes, "AccelQuantizeModel"), {"seed": 2 ** 64 - 1})["seed"]
    assert seed == 2 ** 64 - 1


def test_execute_checks_before_the_node_runs(nodes, comfy):
    from lab import fixtures
    from comfyui_accel.nodes.common import AccelInputError
    model = fixtures.load_model("wan21", "tiny", seed=0)
    with pytest.raises(AccelInputError, match="TeaCache [(]AccelTeaCache[)]: input 'threshold' must be a finite number"):
        nodes["AccelTeaCache"].execute(model, float("nan"), 0.0, 1.0, "auto", "model device", "skip caching")
    with pytest.raises(AccelInputError, match="TaylorSeer [(]AccelTaylorSeer[)]: input 'cache_device' is 'gpu'"):
        nodes["AccelTaylorSeer"].execute(model, 3, 1, 3, 1.0, "auto", "gpu", "skip caching")
    with pytest.raises(AccelInputError, match="TaylorSeer [(]AccelTaylorSeer[)]: .*missing a required argument: 'order'"):
        nodes["AccelTaylorSeer"].execute(model, interval=3)


@pytest.fixture()
def folders(comfy, tmp_path):
    import folder_paths
    base = tmp_path / "comfy"
    for sub in ("input", "output"):
        (base / sub).mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    saved = (folder_paths.get_input_directory(), folder_paths.get_output_directory())
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    yield base, outside
    folder_paths.set_input_directory(saved[0])
    folder_paths.set_output_directory(saved[1])


def test_token_files_outside_comfyuis_folders_are_never_opened(nodes, folders):
    from comfyui_accel.nodes.common import AccelInputError
    from comfyui_accel.vq.codebook import Codebook
    from comfyui_accel.vq.tokens import encode_latent, tokens_bytes
    base, outside = folders
    book = Codebook(torch.randn(1, 8, 4), channels=4)
    data, _ = tokens_bytes(encode_latent(book, torch.randn(1, 4, 3, 3), pixels=9), embed_codebook=True)
    (outside / "secret.vqt").write_bytes(data)
    (base / "input" / "good.vqt").write_bytes(data)
    (base / "input" / "link.vqt").symlink_to(outside / "secret.vqt")
    load = nodes["AccelVQLoadTokens"]
    assert load.execute("good.vqt")[0].count == 9
    messages = {}
    for name in (str(outside / "secret.vqt"), "../../outside/secret.vqt", "link.vqt", "../outside/secret.vqt [output]",
                 "missing.vqt", "../../outside/missing.vqt", "/etc/passwd"):
        with pytest.raises(AccelInputError) as e:
            load.execute(name)
        messages[name] = str(e.value).replace(repr(name), "NAME")
    # No existence oracle: a file that exists outside and one that exists nowhere read alike.
    assert len(set(messages.values())) == 1, messages
    assert "VQ Load Tokens (AccelVQLoadTokens): input 'token_file' is NAME, which is not an option" in messages["missing.vqt"]
    assert load.fingerprint_inputs("link.vqt") == "" and load.fingerprint_inputs("good.vqt") != ""
    # Behind the combo check (which lists no symbolic link), paths are resolved before opening too.
    from comfyui_accel.nodes.validate import folder_file
    roots = [str(base / "input")]
    assert folder_file("N", "f", "good.vqt", roots, "a token file") == (base / "input" / "good.vqt").resolve()
    answers = set()
    for name in (str(outside / "secret.vqt"), "../../outside/secret.vqt", "link.vqt", "missing.vqt"):
        with pytest.raises(AccelInputError) as e:
            folder_file("N", "f", name, roots, "a token file")
        answers.add(str(e.value).replace(repr(name), "NAME"))
    assert len(answers) == 1 and answers.pop().startswith("N: input 'f' is NAME, which is not a token file; choose one")
    # A link from one of ComfyUI's folders into another is followed.
    (base / "output" / "kept.vqt").write_bytes(data)
    (base / "input" / "to_output.vqt").symlink_to(base / "output" / "kept.vqt")
    assert folder_file("N", "f", "to_output.vqt", roots, "a token file") == (base / "output" / "kept.vqt").resolve()


def test_save_names_stay_in_the_output_folder(nodes, folders):
    from comfyui_accel.nodes.common import AccelInputError
    from comfyui_accel.vq.codebook import Codebook
    from comfyui_accel.vq.tokens import encode_latent, tokens_bytes
    base, outside = folders
    (base / "output" / "escape").symlink_to(outside, target_is_directory=True)
    book = Codebook(torch.randn(1, 8, 4), channels=4)
    tokens = encode_latent(book, torch.randn(1, 4, 3, 3), pixels=9)
    save = nodes["AccelVQSaveTokens"]
    for prefix, message in [("../../outside/x", "must be a relative file name"), (str(outside / "x"), "relative"),
                            ("escape/x", "inside the output folder"), ("a\x00b", "NUL"), ("x" * 300, "longer than")]:
        with pytest.raises(AccelInputError, match=f"VQ Save Tokens [(]AccelVQSaveTokens[)]: input 'filename_prefix' .*{message}"):
            save.execute(tokens, prefix, True)
    assert list(outside.iterdir()) == []
    report = save.execute(tokens, "vq_tokens/ok", True)
    assert (base / "output" / "vq_tokens" / "ok_00001_.vqt").is_file() and report.ui["vq_tokens"][0]["subfolder"] == "vq_tokens"
