"""Every node's public schema against the committed snapshot, and the metadata every node owes
its users (description, a tooltip on every input)."""
from __future__ import annotations

import json

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from lab import node_schema

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def infos(comfy):
    infos = node_schema.node_infos()
    assert infos, "the pack registered no nodes"
    return infos


def test_node_schemas_match_the_snapshot(infos, snapshot):
    current = node_schema.snapshot()
    path = node_schema.SNAPSHOT_PATH
    assert current == snapshot(extension_class=JSONSnapshotExtension), (
        f"node names, inputs, outputs or tooltips differ from {path.relative_to(path.parents[4])} (saved workflows "
        "depend on them):\n  "
        + "\n  ".join(node_schema.differences(json.loads(path.read_text()) if path.exists() else {}, current))
        + f"\nIf the change is intended, update the snapshot: {node_schema.UPDATE_COMMAND}")


def test_snapshot_differences_name_what_changed():
    base = {"AccelX": {"display_name": "X", "category": "accel/x", "output_node": False, "outputs": [],
                       "inputs": [{"name": "a", "section": "required", "type": "INT", "default": 1},
                                  {"name": "b", "section": "required", "type": "FLOAT", "default": 0.5}]}}
    changed = json.loads(json.dumps(base))
    changed["AccelX"]["inputs"][0]["default"] = 2
    swapped = json.loads(json.dumps(base))
    swapped["AccelX"]["inputs"].reverse()
    assert node_schema.differences(base, base) == []
    (line,) = node_schema.differences(base, changed)
    assert line.startswith("AccelX.a: ") and "'default': 1} -> {" in line and line.endswith("'default': 2}")
    assert any("input order" in line for line in node_schema.differences(base, swapped))
    assert node_schema.differences(base, {**base, "AccelY": base["AccelX"]}) == ["AccelY: added"]
    assert node_schema.differences(base, {}) == ["AccelX: removed"]


def test_every_node_has_a_description_and_every_input_a_tooltip(infos):
    problems = []
    for node_id, info in sorted(infos.items()):
        if not node_id.startswith("Accel"):
            problems.append(f"{node_id}: node id must start with 'Accel'")
        if not info.get("category", "").startswith("accel/"):
            problems.append(f"{node_id}: category {info.get('category')!r} is not under accel/")
        if not (info.get("display_name") or "").strip():
            problems.append(f"{node_id}: no display name")
        if len((info.get("description") or "").strip()) < 20:
            problems.append(f"{node_id}: no description (say what the node does)")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                if len((opts.get("tooltip") or "").strip()) < 10:
                    problems.append(f"{node_id}.{name}: no tooltip (say what it does and its unit/range)")
    assert not problems, "\n".join(problems)
