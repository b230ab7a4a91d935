"""The example workflows in the real ComfyUI frontend (headless Chromium, one page for all):
they load with every node type known, no validation error and no clipped or overlapping node,
the frontend queues the same prompt our converter makes, and a workflow queued from the page runs.

Needs Debian's chromium (``make setup`` installs it where apt-get works) and the playwright client:
without them this fails with what to install, it does not skip.
"""
from __future__ import annotations

import json

import pytest

from lab import make_workflows, workflows
from lab.browser import Frontend

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def frontend(comfy_server):
    with Frontend(comfy_server) as fe:
        yield fe


def _known_inputs(prompt: dict, object_info: dict) -> dict:
    """The prompt without inputs the server does not define (frontend-only widgets such as
    PreviewAny's text box, which the server ignores)."""
    out = {}
    for node_id, node in prompt.items():
        names = workflows.input_names(object_info[node["class_type"]])
        out[node_id] = {**node, "inputs": {k: v for k, v in node["inputs"].items() if k in names}}
    return out


def _overlaps(nodes: list[dict]) -> list[str]:
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - n["title_height"], n["pos"][0] + n["size"][0],
              n["pos"][1] + n["size"][1]) for n in nodes]
    out = []
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            if not (ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0):
                out.append(f"nodes {a} and {b} overlap")
    return out


def _compare(path_name: str, frontend_prompt: dict, ours: dict, object_info: dict) -> list[str]:
    theirs = _known_inputs(frontend_prompt, object_info)
    problems = []
    for node_id in sorted(set(theirs) | set(ours), key=str):
        a, b = theirs.get(node_id), ours.get(node_id)
        if a is None or b is None or a["class_type"] != b["class_type"] or a["inputs"] != b["inputs"]:
            problems.append(f"{path_name}: node {node_id}: frontend {json.dumps(a)} vs ours {json.dumps(b)}")
    return problems


def test_every_workflow_loads_cleanly_and_converts_like_the_frontend(frontend, comfy_server):
    object_info = comfy_server.object_info()
    problems = []
    for path in workflows.example_workflows():
        wf = workflows.load(path)
        result = frontend.load(wf, name=path.name)
        problems += [f"{path.name}: {p}" for p in result.problems()]
        for n in result.nodes:
            if n["size"][0] < n["min_size"][0] - 1 or n["size"][1] < n["min_size"][1] - 1:
                problems.append(f"{path.name}: node {n['id']} ({n['type']}) is smaller than its content "
                                f"({n['size']} < {n['min_size']})")
        problems += [f"{path.name}: {p}" for p in _overlaps(result.nodes)]
        problems += _compare(path.name, frontend.graph_to_prompt(), workflows.to_api(wf, object_info), object_info)
        shot = make_workflows.SCREENSHOT_DIR / f"{path.stem}.png"
        if not shot.is_file():
            problems.append(f"{path.name}: no screenshot {shot.name} in docs/workflows/ "
                            "(python -m lab.make_workflows --screenshots)")
    assert not problems, "\n".join(problems)


def test_a_missing_node_type_is_caught(frontend):
    """The check above can fail: a workflow naming a node nobody registered makes the frontend say
    so (1.32: the "missing nodes" dialog; 1.49: the error overlay, whose Errors tab lists it)."""
    wf = workflows.load(workflows.example_workflows()[0])
    wf["nodes"][1]["type"] = "AccelNoSuchNode"
    result = frontend.load(wf)
    frontend.close_dialogs()
    assert "AccelNoSuchNode" in result.missing_nodes_shown(), (result.dialogs, result.overlay, result.error_groups)
    assert any("missing nodes shown" in p and "AccelNoSuchNode" in p for p in result.problems()), result.problems()


@pytest.mark.parametrize("template", ["sdxl_simple_example", "text_to_video_wan"])
def test_converter_matches_the_frontend_on_comfyui_templates(frontend, comfy_server, template):
    """ComfyUI's own templates: primitive nodes, converted widgets, notes, seeds with controls,
    and (0.33) SaveVideo's DynamicCombo format."""
    path = workflows.comfyui_templates().get(template)
    assert path, f"ComfyUI's template {template} is not installed (it comes with ComfyUI's requirements)"
    wf = workflows.load(path)
    object_info = comfy_server.object_info()
    frontend.load(wf)
    frontend.close_dialogs()
    problems = _compare(template, frontend.graph_to_prompt(), workflows.to_api(wf, object_info), object_info)
    assert not problems, "\n".join(problems)


def test_a_workflow_queued_from_the_page_runs(frontend, comfy_server):
    path = workflows.WORKFLOWS_DIR / "accel_sdxl_auto_quant_taylorseer.json"   # one of the quick ones on fixtures
    object_info = comfy_server.object_info()
    mapping = workflows.map_to_fixtures(workflows.to_api(workflows.load(path), object_info), object_info,
                                        comfy_server.models_dir)
    entry = frontend.queue_api_prompt(mapping.prompt)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    assert set(workflows.output_nodes(mapping.prompt, object_info)) <= set(outputs)


def test_converter_matches_the_frontend_on_every_dynamic_combo(frontend, comfy_server):
    """Every node of this ComfyUI with a DynamicCombo input (0.33: SaveVideo, image and audio savers,
    API nodes...), each combo set to another option than its first (nested ones too, so the values
    after it fill that option's inputs), loads to the prompt our converter makes."""
    object_info = comfy_server.object_info()
    # The widget kinds this frontend draws; a node with one the converter does not know is left out.
    frontend_widgets = set(frontend.page.evaluate("() => Object.keys(window.app.widgets)"))
    unknown_widgets = frontend_widgets - workflows.WIDGET_TYPES

    def kinds(spec_inputs: dict):
        for section in ("required", "optional"):
            for spec in (spec_inputs.get(section) or {}).values():
                kind, opts = workflows._kind(spec)
                yield kind
                if kind == workflows.DYNAMIC_COMBO:
                    for option in opts.get("options", []):
                        yield from kinds(option.get("inputs") or {})

    types = sorted(t for t, info in object_info.items()
                   if workflows.DYNAMIC_COMBO in set(kinds(info["input"])) and not set(kinds(info["input"])) & unknown_widgets)
    if not types:
        pytest.skip("this ComfyUI has no DynamicCombo input (COMFY_DYNAMICCOMBO_V3 came after 0.3.75)")
    for pick in (1, -1):      # the second option, the last one
        def choose(widget):
            if widget.kind == workflows.DYNAMIC_COMBO and len(widget.choices) > 1:
                return widget.choices[pick]
            return "fixed" if widget.name is None else widget.default
        nodes = [{"id": i, "type": t, "pos": [0, 200 * i], "size": [300, 100], "flags": {}, "order": i, "mode": 0,
                  "inputs": [], "outputs": [], "properties": {},
                  "widgets_values": [v for _, v in workflows.widgets(object_info[t], choose)]}
                 for i, t in enumerate(types, 1)]
        wf = {"last_node_id": len(nodes), "last_link_id": 0, "nodes": nodes, "links": [], "groups": [],
              "config": {}, "extra": {}, "version": 0.4}
        frontend.load(wf)
        problems = _compare(f"option {pick}", frontend.graph_to_prompt(), workflows.to_api(wf, object_info), object_info)
        assert not problems, "\n".join(problems)
