"""The house's boundary: the nodes reach no lab module, no import circles, imports follow the layers.

Counted over every import statement, deferred ones inside functions included (lab/layering.py).
"""
from __future__ import annotations

import ast
import subprocess
import textwrap
from pathlib import Path

import pytest

from lab import layering

GRAPH = layering.import_graph()
PACK = layering.pack_modules(GRAPH)


def test_the_nodes_reach_the_pack_and_no_lab_module():
    assert {"nodes.quant", "quant.model", "kernels.dispatch", "cache.engine"} <= PACK
    assert not [m for m in PACK if m == "lab" or m.startswith("lab.")]


def test_there_is_no_import_circle():
    assert layering.circles(GRAPH) == []


def test_imports_go_down_the_layers_only():
    assert layering.layer_breaks(GRAPH) == []


def test_domain_packages_import_comfyui_only_inside_functions():
    # kernels and algorithms import and run without ComfyUI; the nodes import it lazily too.
    host_modules = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}
    known = layering.modules()
    offenders = []
    for name in PACK:
        if layering.layer_of(name)[0] > 1:
            continue
        for node in ast.parse(known[name].read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [(name, n) for n in names if n.split(".")[0] in host_modules]
    assert offenders == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_the_checks_see_deferred_relative_and_absolute_imports(tmp_path):
    repo = _tree(tmp_path, {
        "__init__.py": "",
        "nodes/__init__.py": "",
        "nodes/a.py": "from ..quant import model, policy\n",
        "quant/__init__.py": "",
        "quant/model.py": "def f():\n    from . import linear\n",
        "quant/linear.py": "def g():\n    from comfyui_accel.quant.model import f\n",
        "quant/policy.py": "def h():\n    import lab.demo\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "from ..nodes import a\n",
        "lab/__init__.py": "",
        "lab/demo.py": "from comfyui_accel.quant import model\n",
        "tests/test_x.py": "import lab.demo\n",
    })
    graph = layering.import_graph(repo)
    assert "tests.test_x" not in graph
    assert layering.circles(graph) == [["quant.linear", "quant.model"]]
    assert {"lab", "lab.demo"} & layering.pack_modules(graph) == {"lab.demo"}
    assert layering.layer_breaks(graph) == [("kernels.k", "nodes.a"), ("quant.policy", "lab.demo")]


def test_the_registry_package_leaves_out_the_lab_and_keeps_what_the_pack_loads():
    root = layering.REPO
    ignored = [line.strip().rstrip("/") for line in (root / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {"lab", "tests"} <= set(ignored)
    attributes = (root / ".gitattributes").read_text()
    for folder in ignored:
        assert f"/{folder} export-ignore" in attributes, folder
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    shipped = {p for p in tracked if not any(p == f or p.startswith(f + "/") for f in ignored)}
    known = layering.modules()
    for name in PACK:
        assert str(known[name].relative_to(root)) in shipped, name
