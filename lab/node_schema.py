"""The public face of every node of ours: ids, names, inputs, outputs and tooltips, as a snapshot.

Saved workflows refer to nodes by id and to inputs by name and position; a renamed input, a
removed option or a changed default silently changes or breaks them, and a tooltip is what the
user reads. ``tests/integration/test_node_schema.py`` compares ``snapshot()`` with the committed
one (``SNAPSHOT_PATH``, a syrupy snapshot) and fails on any difference, added nodes included,
until the snapshot is updated on purpose (``UPDATE_COMMAND``).

Choice lists that come from the host (samplers, schedulers) or from files on disk are recorded
by what they are, not by their current content, so both hosts give the same snapshot.
"""
from __future__ import annotations

import os
from pathlib import Path

SNAPSHOT_PATH = (Path(__file__).resolve().parents[1] / "tests" / "integration" / "__snapshots__" / "test_node_schema"
                 / "test_node_schemas_match_the_snapshot.json")
UPDATE_COMMAND = 'make test PYTEST_ARGS="tests/integration/test_node_schema.py --snapshot-update"'
_KEPT_OPTIONS = ("default", "min", "max", "step", "multiline", "forceInput", "control_after_generate", "tooltip")


def our_nodes() -> list:
    """Our node classes, through the pack's own registry (ComfyUI imported in-process)."""
    from lab.host import import_comfy
    import_comfy()
    from comfyui_accel.nodes.registry import all_nodes
    return all_nodes()


def node_infos() -> dict[str, dict]:
    """node id -> the /object_info entry ComfyUI serves for it."""
    out = {}
    for cls in our_nodes():
        info = cls.GET_NODE_INFO_V1()
        out[info["name"]] = info
    return out


def _host_lists() -> dict[str, list]:
    import comfy.samplers
    return {"<comfy samplers>": list(comfy.samplers.KSampler.SAMPLERS),
            "<comfy schedulers>": list(comfy.samplers.KSampler.SCHEDULERS)}


def _known_files() -> set[str]:
    """Every file name a file combo could list on this machine (model folders, input, output)."""
    import folder_paths
    names: set[str] = set()
    for folder in folder_paths.folder_names_and_paths:
        if folder == "custom_nodes":   # code, not files a combo offers (and a symlink loop here)
            continue
        try:
            names.update(folder_paths.get_filename_list(folder))
        except Exception:  # a folder type some other pack registered oddly
            continue
    for root in (folder_paths.get_input_directory(), folder_paths.get_output_directory()):
        for dirpath, _, files in os.walk(root):
            names.update(os.path.relpath(os.path.join(dirpath, f), root) for f in files)
    return names


def _options(options: list, host_lists: dict, files: set):
    for token, values in host_lists.items():
        if list(options) == values:
            return token
    if not options or all(isinstance(o, str) and o in files for o in options):
        return "<files>"
    return list(options)


def schema(info: dict, host_lists: dict | None = None, files: set | None = None) -> dict:
    """One node's entry in the snapshot, from its /object_info entry."""
    host_lists = _host_lists() if host_lists is None else host_lists
    files = _known_files() if files is None else files
    inputs = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        for name in order.get(section, info["input"].get(section, {})):
            spec = info["input"][section][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            entry = {"name": name, "section": section}
            if isinstance(kind, list):
                entry["type"], entry["options"] = "COMBO", _options(kind, host_lists, files)
            else:
                entry["type"] = kind
                if "options" in opts:
                    entry["options"] = _options(opts["options"], host_lists, files)
            entry.update({k: opts[k] for k in _KEPT_OPTIONS if k in opts})
            inputs.append(entry)
    names = info.get("output_name") or info["output"]
    lists = info.get("output_is_list") or [False] * len(info["output"])
    tips = info.get("output_tooltips") or [None] * len(info["output"])
    outputs = [{"type": t, "name": n, "is_list": bool(lst), **({"tooltip": tip} if tip else {})}
               for t, n, lst, tip in zip(info["output"], names, lists, tips)]
    return {"display_name": info.get("display_name"), "category": info.get("category"),
            "output_node": bool(info.get("output_node")), "inputs": inputs, "outputs": outputs}


def snapshot() -> dict:
    infos = node_infos()
    host_lists, files = _host_lists(), _known_files()
    return {node_id: schema(info, host_lists, files) for node_id, info in sorted(infos.items())}


def differences(old: dict, new: dict) -> list[str]:
    """What changed from ``old`` to ``new``, one line per node or input."""
    lines = []
    for node_id in sorted(set(old) | set(new)):
        if node_id not in new:
            lines.append(f"{node_id}: removed")
        elif node_id not in old:
            lines.append(f"{node_id}: added")
        elif old[node_id] != new[node_id]:
            a, b = old[node_id], new[node_id]
            for key in ("display_name", "category", "output_node", "outputs"):
                if a.get(key) != b.get(key):
                    lines.append(f"{node_id}: {key} {a.get(key)!r} -> {b.get(key)!r}")
            a_in = {i["name"]: i for i in a["inputs"]}
            b_in = {i["name"]: i for i in b["inputs"]}
            for name in sorted(set(a_in) | set(b_in)):
                if a_in.get(name) != b_in.get(name):
                    lines.append(f"{node_id}.{name}: {a_in.get(name, 'absent')} -> {b_in.get(name, 'absent')}")
            if [i["name"] for i in a["inputs"]] != [i["name"] for i in b["inputs"]] and set(a_in) == set(b_in):
                lines.append(f"{node_id}: input order {[i['name'] for i in a['inputs']]} -> "
                             f"{[i['name'] for i in b['inputs']]} (moves saved widget values)")
    return lines
