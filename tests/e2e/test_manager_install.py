"""Installing the pack the way ComfyUI-Manager does: ``git clone`` into ``custom_nodes/`` of a fresh
ComfyUI, ``pip install -r requirements.txt`` in ComfyUI's environment, start ComfyUI.

Checks that every node of ours registers, that torch is left as it was, and that nothing needs a
compiler (pip resolves every requirement to a wheel). The clone is of the committed HEAD, which
is what users get.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import node_schema
from lab.host import PACK_ROOT, ComfyServer, comfyui_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "triton"}
ROOT_ONLY = {"custom_nodes", "models", "input", "output", "temp", "user"}   # a fresh install's own folders


def _fresh_comfyui(dest: Path) -> Path:
    """A copy of the host ComfyUI's code, without its custom nodes, models or outputs."""
    source = comfyui_dir()

    def ignore(folder, names):
        skip = {"__pycache__", ".git"}
        if Path(folder) == source:
            skip |= ROOT_ONLY
        return [n for n in names if n in skip]

    shutil.copytree(source, dest, ignore=ignore, symlinks=True)
    (dest / "custom_nodes").mkdir()
    return dest


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=600)


def _installs(report_path: Path) -> list[dict]:
    return json.loads(report_path.read_text())["install"]


def test_git_clone_and_pip_install_like_comfyui_manager(tmp_path):
    torch_before = importlib.metadata.version("torch")
    comfy = _fresh_comfyui(tmp_path / "ComfyUI")
    pack = comfy / "custom_nodes" / "ComfyUI-Accel"
    clone = subprocess.run(["git", "clone", "--quiet", str(PACK_ROOT), str(pack)], capture_output=True, text=True)
    assert clone.returncode == 0, clone.stderr
    requirements = pack / "requirements.txt"

    # Resolve from scratch, wheels only: what a fresh environment would fetch. No sdist (nothing
    # to compile) and nothing of torch's family.
    dry = _pip("install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--report",
               str(tmp_path / "dry.json"), "-r", str(requirements))
    assert dry.returncode == 0, f"requirements do not resolve to wheels only:\n{dry.stderr[-3000:]}"
    fresh = _installs(tmp_path / "dry.json")
    assert fresh, "the dry run resolved nothing"
    assert not TORCH_FAMILY & {i["metadata"]["name"].lower() for i in fresh}
    assert all(i["download_info"]["url"].endswith(".whl") for i in fresh), [i["download_info"]["url"] for i in fresh]

    # The real install into ComfyUI's environment, as the Manager runs it.
    real = _pip("install", "--report", str(tmp_path / "real.json"), "-r", str(requirements))
    assert real.returncode == 0, real.stderr[-3000:]
    installed = _installs(tmp_path / "real.json")
    assert not TORCH_FAMILY & {i["metadata"]["name"].lower() for i in installed}
    assert all(i["download_info"]["url"].endswith(".whl") for i in installed)
    assert importlib.metadata.version("torch") == torch_before

    server = ComfyServer(base_dir=comfy, comfy_root=comfy, fixture_nodes=False, link_pack=False)
    try:
        server.start()
        info = server.object_info()
        templates = server.get("/api/workflow_templates")
        log = server.log_path.read_text(errors="replace")
    finally:
        server.stop()
    expected = set(json.loads(node_schema.SNAPSHOT_PATH.read_text()))
    assert expected, "the node schema snapshot lists no nodes"
    missing = sorted(expected - set(info))
    assert not missing, f"not registered after a Manager-style install: {missing}\n{log[-3000:]}"
    assert all(info[n]["python_module"] == "custom_nodes.ComfyUI-Accel" for n in expected)
    ours = [line for line in log.splitlines() if "ComfyUI-Accel" in line]
    assert ours and not any("IMPORT FAILED" in line for line in ours), log[-3000:]
    assert "nodes failed to load" not in log, log[-3000:]
    assert not any(n.startswith("AccelTest") for n in info), "test-only nodes must not ship with the pack"
    # ComfyUI offers the pack's example workflows in its template browser.
    shipped = sorted(p.stem for p in (pack / "example_workflows").glob("*.json"))
    assert sorted(templates.get("ComfyUI-Accel", [])) == shipped
