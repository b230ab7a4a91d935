"""Comfy Registry metadata in pyproject.toml: the fields the registry and ComfyUI-Manager need."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_project_section_has_the_registry_fields():
    project = _pyproject()["project"]
    # The registry's node id: letters, digits, - _ . ; no leading digit or special character.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert len(project["description"]) > 40
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert "dependencies" in project.get("dynamic", []) or project.get("dependencies") is not None


def test_version_matches_the_package():
    text = (ROOT / "__init__.py").read_text()
    assert f'__version__ = "{_pyproject()["project"]["version"]}"' in text


def test_tool_comfy_is_complete():
    comfy = _pyproject()["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert comfy["requires-comfyui"].startswith(">=")
    for path in comfy["includes"]:
        assert (ROOT / path).exists(), f"includes names {path}, which does not exist"


def test_icon_url_points_at_the_committed_icon_within_the_size_limit():
    pyproject = _pyproject()
    repo = pyproject["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    icon = pyproject["tool"]["comfy"]["Icon"]
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), icon
    path = ROOT / icon.removeprefix(prefix)
    assert path.suffix in (".png", ".svg", ".jpg", ".gif") and path.is_file(), path
    with Image.open(path) as im:
        width, height = im.size
    assert 0 < width <= 800 and 0 < height <= 400, (width, height)
