"""The example workflows: current with their generator, self-explaining, laid out without overlap,
and each one converted to an API prompt and run through the real server on the fixture models."""
from __future__ import annotations

import json

import pytest

from lab import make_workflows, workflows

pytestmark = pytest.mark.e2e

WORKFLOWS = workflows.example_workflows()
IDS = [p.stem for p in WORKFLOWS]
# What each of our report nodes' text starts with, when a workflow shows it.
REPORT_TITLES = {"AccelCacheReport": "Cache report", "AccelCacheCalibrate": "Cache calibration",
                 "AccelSparseAttentionReport": "Sparse attention report", "AccelQuantizeModel": "Quantize Model",
                 "AccelSaveQuantized": "Save Quantized Model", "AccelLoadQuantized": "Load Quantized Model",
                 "AccelVQFitCodebook": "VQ Fit Codebook", "AccelVQEncode": "VQ Encode",
                 "AccelVQSaveTokens": "VQ Save Tokens", "AccelVQLoadTokens": "VQ Load Tokens",
                 "AccelSVDLowRankBranch": "SVD Low-Rank Branch"}


def test_there_are_example_workflows():
    assert WORKFLOWS, "example_workflows/ is empty: run python -m lab.make_workflows"


def test_workflows_are_what_the_generator_writes(comfy_server, tmp_path):
    written, skipped = make_workflows.build_all(comfy_server.object_info(), tmp_path)
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in WORKFLOWS}
    hint = "regenerate them: python -m lab.make_workflows --screenshots"
    assert sorted(fresh) == sorted(committed), f"workflow files differ from the generator's ({skipped}); {hint}"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from what the generator writes now; {hint}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_explains_itself(path):
    wf = workflows.load(path)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert any("Needs" in text and "Expect" in text for text in notes), "no Note saying what it needs and expects"
    for node in wf["nodes"]:
        files = [v for v in node.get("widgets_values", []) if isinstance(v, str) and v.endswith(".safetensors")]
        listed = {m["name"] for m in node.get("properties", {}).get("models", [])}
        for name in files:
            if name in workflows.PRODUCED_FILES:     # written by another example workflow
                assert any(name in text for text in notes), f"the Note does not say where {name} comes from"
                continue
            assert name in make_workflows.MODELS, f"{name} is not a standard release file we know"
            assert name in listed, f"node {node['id']} names {name} without its download link"
            assert any(name in text for text in notes), f"the Note does not mention {name}"


def _template_models() -> dict[str, str]:
    """Model file name -> folder, from ComfyUI's own workflow templates (installed with ComfyUI)."""
    models = {}
    for path in workflows.comfyui_templates().values():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        for node in data.get("nodes", []) if isinstance(data, dict) else []:
            for m in (node.get("properties") or {}).get("models") or []:
                models.setdefault(m["name"], m.get("directory"))
    return models


def test_model_files_are_the_names_comfyui_templates_use():
    templates = _template_models()
    assert templates, "ComfyUI's workflow templates package is not installed (it comes with ComfyUI's requirements)"
    for name, (directory, url) in make_workflows.MODELS.items():
        assert templates.get(name) == directory, f"{name} ({directory}) is not in ComfyUI's templates"
        assert url.startswith("https://huggingface.co/") and url.endswith(name)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_layout_has_no_overlaps_and_consistent_links(path):
    wf = workflows.load(path)
    title = make_workflows.TITLE_H
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert kind == nodes[src]["outputs"][slot]["type"]
    # Data flows left to right: every link goes to a node further right, or down its column.
    for _, src, _, dst, _, _ in wf["links"]:
        (sx, sy), (dx, dy) = nodes[src]["pos"], nodes[dst]["pos"]
        assert sx < dx or (sx == dx and sy < dy), f"link {src} -> {dst} runs right to left or upwards"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_runs_on_the_fixture_models(comfy_server, path):
    object_info = comfy_server.object_info()
    run = workflows.run(comfy_server, path)
    assert run.mapping.family is not None and run.mapping.missing, "expected the standard files to be absent here"
    problems = workflows.check(run, object_info)
    assert not problems, "\n".join(problems + run.mapping.notes)
    prompt = run.mapping.prompt
    # Each report of ours reaches the UI (on its node or through a text preview).
    ours = [i for i, n in prompt.items() if n["class_type"].startswith("Accel") and "Test" not in n["class_type"]]
    assert ours, "the workflow uses none of our nodes"
    texts = "\n".join(t for items in run.texts.values() for t in items)
    for node_id in ours:
        title = REPORT_TITLES.get(prompt[node_id]["class_type"])
        if title:
            assert title in texts, f"{prompt[node_id]['class_type']} report not shown"
    assert any(p.suffix == ".mp4" or p.suffix == ".png" for paths in run.files.values() for p in paths)
    check = WORKFLOW_CHECKS.get(path.stem)
    if check:
        check(run, comfy_server)


def _summaries(run) -> dict[str, list[dict]]:
    """Report title -> the JSON summaries of every report with that title the run showed."""
    out: dict[str, list[dict]] = {}
    for items in run.texts.values():
        for text in items:
            if "JSON:" in text:
                out.setdefault(text.splitlines()[0].strip(), []).append(json.loads(text.split("JSON:", 1)[1])["summary"])
    return out


def _quantized(summary: dict) -> int:
    return int(str(summary["layers quantized"]).split(" of ")[0])


def _cache_reused(run) -> int:
    """Model evaluations the Cache Report says were reused (it shows its report on its node)."""
    texts = [t for items in run.texts.values() for t in items if t.startswith("Cache report")]
    assert texts, "no Cache Report shown"
    return int(next(line for line in texts[0].splitlines() if line.startswith("reused:")).split(":")[1])


def _check_wan21_chain(run, server):
    quant = _summaries(run)["Quantize Model"][0]
    assert quant["format"] == "int8" and _quantized(quant) > 0 and quant["quantized layers vs bf16"] > 1.8
    assert "calibration" in quant, "Quantize Model was not calibrated on the workflow's prompt"
    assert _cache_reused(run) > 0, "TaylorSeer forecast no step"


def _check_flux_svdquant(run, server):
    reports = _summaries(run)
    svd, quant = reports["SVD Low-Rank Branch"][0], reports["Quantize Model"][0]
    assert svd["layers branched"] > 0 and svd["rank"] == 32 and svd["report format"] == "w4a4"
    assert "calibration" not in svd.get("notice", ""), "SVD Low-Rank Branch was not calibrated"
    # SVDQuant's point: branch + 4-bit residual is closer than plain 4-bit on the same layers
    assert svd["median SQNR branched dB"] > svd["median SQNR plain dB"], svd
    assert quant["format"] == "w4a4" and _quantized(quant) > 0 and "notice" not in quant, quant
    assert _cache_reused(run) > 0, "TeaCache reused no step"


def _check_sdxl_auto(run, server):
    quant = _summaries(run)["Quantize Model"][0]
    assert quant["format"] == "auto" and _quantized(quant) > 0
    # auto_budget 0.35: the quantized layers take at most 35% of their bf16 bytes
    assert quant["quantized layers vs bf16"] >= 1 / 0.35 - 1e-3, quant
    assert _cache_reused(run) > 0, "TaylorSeer forecast no step"


def _check_quantize_save(run, server):
    saved = server.models_dir / "diffusion_models" / make_workflows.QUANTIZED_WAN
    assert saved.is_file() and saved.stat().st_size > 0
    assert _summaries(run)["Quantize Model"][0]["format"] == "int8"


def _check_load_quantized(run, server):
    loaded = _summaries(run)["Load Quantized Model"][0]
    assert loaded["file"] == make_workflows.QUANTIZED_WAN
    assert loaded["quantized layers"] > 0 and loaded["formats"] == ["int8"]


def _check_vq_encode_save(run, server):
    reports = _summaries(run)
    fit, encode, saved = reports["VQ Fit Codebook"][0], reports["VQ Encode"][0], reports["VQ Save Tokens"][0]
    assert fit["codebook_size"] == 256 and fit["residual_levels"] == 2
    side = workflows.FIXTURE_IMAGE_SIDE
    assert saved["pixels"] == side * side and saved["tokens"] == (side // 8) ** 2
    # two 8-bit levels per latent pixel (one per 8x8 pixels): 16/64 bits per pixel before entropy coding
    assert saved["fixed_bpp"] == pytest.approx(16 / 64) and 0 < saved["coded_bpp"] <= saved["fixed_bpp"] + 1e-9
    token_file = server.output_dir / saved["file"]
    assert token_file.is_file() and token_file.stat().st_size == saved["file_bytes"]
    assert encode["latent_psnr_db"] > 15, "the tokens do not reconstruct the latent"


def _check_vq_load_decode(run, server):
    from PIL import Image
    loaded = _summaries(run)["VQ Load Tokens"][0]
    assert loaded["codebook"] == "embedded in the file"
    images = [p for paths in run.files.values() for p in paths if p.name.startswith("accel_vq_decoded")]
    side = workflows.FIXTURE_IMAGE_SIDE
    assert len(images) == 1 and Image.open(images[0]).size == (side, side)


# Outputs each workflow must show beyond the generic checks (reports' figures, files written).
WORKFLOW_CHECKS = {
    "accel_flux_svdquant_teacache": _check_flux_svdquant,
    "accel_wan21_quant_sparse_taylorseer": _check_wan21_chain,
    "accel_sdxl_auto_quant_taylorseer": _check_sdxl_auto,
    "accel_wan21_quantize_1_save": _check_quantize_save,
    "accel_wan21_quantize_2_load": _check_load_quantized,
    "accel_vq_latent_1_encode_save": _check_vq_encode_save,
    "accel_vq_latent_2_load_decode": _check_vq_load_decode,
}


def test_every_output_check_names_a_workflow():
    assert set(WORKFLOW_CHECKS) <= set(IDS), set(WORKFLOW_CHECKS) - set(IDS)


def test_nothing_is_mapped_when_the_model_files_are_present(comfy_server, tmp_path):
    object_info = comfy_server.object_info()
    for path in WORKFLOWS:
        models_dir = tmp_path / path.stem
        models_dir.mkdir()
        prompt = workflows.to_api(workflows.load(path), object_info)
        named = workflows.named_files(prompt)
        assert named, f"{path.name} names no model file"
        # The loaders of a server that has every named file list them among their choices.
        have_all = json.loads(json.dumps(object_info))
        for node_id, name, value in named:
            spec = have_all[prompt[node_id]["class_type"]]["input"]["required"][name]
            options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
            if value not in options:
                options.append(value)
        kept = workflows.map_to_fixtures(prompt, have_all, models_dir)
        assert kept.family is None and kept.missing == [] and kept.prompt == prompt
        assert not any(models_dir.iterdir()), "fixtures were written although nothing was mapped"
        # One file missing is enough to run the whole workflow on fixtures.
        first = named[0]
        spec = have_all[prompt[first[0]]["class_type"]]["input"]["required"][first[1]]
        (spec[0] if isinstance(spec[0], list) else spec[1]["options"]).remove(first[2])
        assert workflows.missing_files(prompt, have_all) == [first[2]]
