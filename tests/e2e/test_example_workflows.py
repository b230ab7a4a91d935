"""The example workflows: current with their generator, self-explaining, laid out without overlap,
and each one converted to an API prompt and run through the real server on the fixture models."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from comfyui_accel.devtools import make_workflows, workflows

pytestmark = pytest.mark.e2e

WORKFLOWS = workflows.example_workflows()
IDS = [p.stem for p in WORKFLOWS]
# What each of our report nodes' text starts with, when a workflow shows it.
REPORT_TITLES = {"AccelCacheReport": "Cache report", "AccelCacheCalibrate": "Cache calibration",
                 "AccelSparseAttentionReport": "Sparse attention report", "AccelQuantizeModel": "Quantize Model",
                 "AccelSaveQuantized": "Save Quantized Model", "AccelLoadQuantized": "Load Quantized Model"}


def test_there_are_example_workflows():
    assert WORKFLOWS, "example_workflows/ is empty: run python -m comfyui_accel.devtools.make_workflows"


def test_workflows_are_what_the_generator_writes(comfy_server, tmp_path):
    written, skipped = make_workflows.build_all(comfy_server.object_info(), tmp_path)
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in WORKFLOWS}
    hint = "regenerate them: python -m comfyui_accel.devtools.make_workflows --screenshots"
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
            assert name in make_workflows.MODELS, f"{name} is not a standard release file we know"
            assert name in listed, f"node {node['id']} names {name} without its download link"
            assert any(name in text for text in notes), f"the Note does not mention {name}"


def _template_models() -> dict[str, str]:
    """Model file name -> folder, from ComfyUI's own workflow templates (installed with ComfyUI)."""
    models = {}
    for spec_name in ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_video",
                      "comfyui_workflow_templates_media_other"):
        spec = importlib.util.find_spec(spec_name)
        if spec is None:
            continue
        for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "templates", "*.json")):
            try:
                data = json.loads(open(path, encoding="utf-8").read())
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
