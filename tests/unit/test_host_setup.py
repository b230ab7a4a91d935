"""Host checks a user meets before anything runs: a ComfyUI too old for the pack, a host package
missing from the environment. Each gets one sentence naming the problem and the fix."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab import host

ROOT = Path(__file__).resolve().parents[2]


def _fake_comfyui(folder: Path, version: str, requirements: str = "") -> Path:
    (folder / "comfy").mkdir(parents=True)
    (folder / "main.py").write_text("")
    (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    (folder / "requirements.txt").write_text(requirements)
    return folder


def _setup(tmp_path: Path, comfy: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFYUI_PATH=str(comfy), VENV=str(tmp_path / "venv"))
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_setup_refuses_a_comfyui_older_than_the_minimum_before_installing_anything(tmp_path):
    old = _fake_comfyui(tmp_path / "ComfyUI", "0.3.64")
    result = _setup(tmp_path, old)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "0.3.64" in message and "0.3.75" in message and "update" in message
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("version", ["0.3.75", "0.33.0", "1.0.0"])
def test_the_minimum_itself_and_newer_pass_the_version_check(tmp_path, version):
    # A stand-in environment whose python fails stops setup at its first install, after the
    # version check: that it gets there shows the tree was not refused as too old.
    new = _fake_comfyui(tmp_path / "ComfyUI", version)
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    fake_python.chmod(0o755)
    result = _setup(tmp_path, new)
    assert result.returncode != 0
    assert "older than" not in result.stderr
    assert "setup: installing torch" in result.stdout


def test_a_missing_host_package_is_named_with_the_fix(tmp_path):
    comfy = _fake_comfyui(tmp_path / "ComfyUI", "0.33.0",
                          "torch\nnumpy>=1.25.0\nsurely-not-installed-pkg==1.0  # a comment\n"
                          "#non essential dependencies:\nalso-not-installed\n")
    assert host.missing_requirements(comfy) == ["surely-not-installed-pkg"]
    with pytest.raises(host.HostError) as err:
        host.check_requirements(comfy)
    message = str(err.value)
    assert "surely-not-installed-pkg" in message and "make setup" in message and "\n" not in message
