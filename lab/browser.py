"""The real ComfyUI frontend in headless Chromium, driven through Playwright.

Debian's ``chromium`` package (installed by ``scripts/setup.sh`` where apt-get can) and the
PyPI ``playwright`` client (no browser download). The frontend is the one the server serves;
``window.app`` gives ``loadGraphData``, ``graphToPrompt``, ``loadApiJson`` and ``queuePrompt``.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import requests

# Flags that work on these machines (no GPU, no sandbox as root, no network beyond localhost).
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}
SCREENSHOT_VIEWPORT = {"width": 2560, "height": 1440}   # fit-to-view keeps node text readable
# What a frontend shows when a workflow did not load cleanly. Frontend 1.32 (ComfyUI 0.3.75) opens
# dialogs ("This workflow has missing nodes", "Missing Models"); 1.49 (ComfyUI 0.33) shows an error
# overlay ("3 errors found", "View details") whose details are the Errors tab of the right side
# panel, one section per kind (data-testid "error-group-<kind>"), and draws nodes whose model or
# input file is missing with a red outline (node.has_errors); an unknown node type is drawn plain.
MISSING_NODES_TEXT = "missing nodes"
MISSING_FILES_TEXT = "missing models"
VALIDATION_TEXTS = ("Invalid workflow", "Workflow Validation", "Workflow Links Fixed", "does not contain a valid version")
MISSING_NODE_GROUPS = ("missing-node", "swap-nodes")        # an unknown node type (one with a known replacement)
MISSING_FILE_GROUPS = ("missing-model", "missing-media")    # a model or input file the server does not have


class BrowserUnavailable(RuntimeError):
    """No Chromium or no Playwright: what to install, in one sentence."""


def chromium_path() -> str:
    for candidate in (os.environ.get("ACCEL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BrowserUnavailable("Chromium was not found: install Debian's package (`apt-get install -y chromium`, "
                             "which `make setup` does where apt-get works) or point ACCEL_CHROMIUM at a Chromium "
                             "binary.")


@dataclass
class LoadResult:
    dialogs: list[str]            # text of every dialog open after loading (1.32)
    toasts: list[str]             # text of every toast (alerts, warnings) shown
    overlay: str                  # the error overlay's text, "" when none (1.49)
    error_groups: dict[str, str]  # the Errors tab behind the overlay: kind -> its section's text (1.49)
    nodes: list[dict]             # per node: id, type, title, registered, errors, values (strings), pos,
                                  # size, min_size
    console_errors: list[str]

    def missing_nodes_shown(self) -> str:
        """What the frontend showed about node types it does not know ("" when nothing)."""
        shown = [t for t in self.dialogs if MISSING_NODES_TEXT in t.lower()]
        shown += [self.error_groups[k] for k in MISSING_NODE_GROUPS if k in self.error_groups]
        return "\n".join(shown)

    def missing_files_shown(self) -> str:
        """What the frontend showed about model and input files the server lacks ("" when nothing)."""
        shown = [t for t in self.dialogs if MISSING_FILES_TEXT in t.lower()]
        shown += [self.error_groups[k] for k in MISSING_FILE_GROUPS if k in self.error_groups]
        return "\n".join(shown)

    def problems(self) -> list[str]:
        """Missing node types, validation errors, any other error shown, nodes drawn red for a
        reason other than a missing model or input file (the fixture server has none of them)."""
        out = []
        missing_nodes = self.missing_nodes_shown()
        if missing_nodes:
            out.append("missing nodes shown: " + _one_line(missing_nodes))
        out += [_one_line(t) for t in self.dialogs + self.toasts if any(v in t for v in VALIDATION_TEXTS)]
        expected = MISSING_NODE_GROUPS + MISSING_FILE_GROUPS
        out += [f"error shown ({kind}): {_one_line(text)}" for kind, text in self.error_groups.items()
                if kind not in expected]
        if self.overlay and not self.error_groups:
            out.append(f"error overlay without details: {_one_line(self.overlay)}")
        missing_files = self.missing_files_shown()
        for n in self.nodes:
            if not n["registered"]:
                out.append(f"node {n['id']} has no registered type {n['type']!r}")
            elif n["errors"] and not _names_a_missing_file(n, missing_files):
                out.append(f"node {n['id']} ({n['type']}) is marked with errors")
        return out


def _names_a_missing_file(node: dict, missing_files: str) -> bool:
    """The frontend lists the node's file among the missing ones: a model by its file name, an
    input (1.49's "Missing Inputs") as "<node title> - <input>"."""
    return (any(v and v in missing_files for v in node["values"])
            or f"{node['title']} - " in missing_files)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


_NODES_JS = """() => window.app.graph.nodes.map(n => ({
    id: n.id, type: n.type, title: n.title, registered: n.type in LiteGraph.registered_node_types,
    errors: !!n.has_errors, values: (n.widgets || []).map(w => typeof w.value === 'string' ? w.value : null),
    pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    min_size: (n.computeSize ? Array.from(n.computeSize()) : [0, 0]),
    title_height: LiteGraph.NODE_TITLE_HEIGHT}))"""
_TEXTS_JS = "sel => Array.from(document.querySelectorAll(sel)).map(e => e.innerText)"
_ERROR_GROUPS_JS = """kinds => Object.fromEntries(kinds.flatMap(k => Array.from(
    document.querySelectorAll(`[data-testid="error-group-${k}"]`)).map(e => [k, e.innerText])))"""
# Every section kind of 1.49's Errors tab (useErrorGroups.ts).
ERROR_GROUP_KINDS = MISSING_NODE_GROUPS + MISSING_FILE_GROUPS + ("execution",)


class Frontend:
    """One Chromium page on the server's frontend; use as a context manager."""

    def __init__(self, server, for_screenshots: bool = False):
        self.server = server
        self.for_screenshots = for_screenshots
        self._pw = self._browser = self.page = None
        self.console_errors: list[str] = []

    def __enter__(self) -> "Frontend":
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise BrowserUnavailable("the Python package playwright is missing: run `make setup` "
                                     "(it is in requirements-dev.txt)") from None
        executable = chromium_path()
        # First-run behaviour off: the templates browser opens for a new user (Escape also closes
        # it). For screenshots: no missing-models dialog (1.32; 1.49 ignores the setting, so the
        # screenshot server gets stand-in files), minimap or fps counter, and full detail at any
        # zoom. Missing node types are always reported.
        self._setting("Comfy.TutorialCompleted", True)
        if self.for_screenshots:
            for key, value in (("Comfy.Workflow.ShowMissingModelsWarning", False), ("Comfy.Minimap.Visible", False),
                               ("Comfy.Graph.CanvasInfo", False), ("LiteGraph.Canvas.MinFontSizeForLOD", 0)):
                self._setting(key, value)
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
            self.page = self._browser.new_page(viewport=SCREENSHOT_VIEWPORT if self.for_screenshots else VIEWPORT)
            # The "try Nodes 2.0" banner remembers its dismissal in localStorage.
            self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
            self.page.goto(self.server.url)
            self.page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady",
                                        timeout=120_000)
            self.close_dialogs()
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._browser:
            self._browser.close()
        if self._pw:
            self._pw.stop()
        self._browser = self._pw = None

    def _setting(self, key: str, value) -> None:
        r = requests.post(f"{self.server.url}/settings/{key}", json=value, timeout=30)
        r.raise_for_status()

    def _dismiss_error_overlay(self) -> None:
        button = self.page.query_selector('[data-testid="error-overlay-dismiss"]')
        if button:
            button.click()

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.page.query_selector(".p-dialog"):
                break
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def load(self, workflow: dict, name: str | None = None, settle_ms: int = 800) -> LoadResult:
        """Load a UI-format workflow as the user's file would be (``name``: the tab's title);
        report what the frontend showed."""
        self.close_dialogs()
        self.page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
        self._dismiss_error_overlay()
        errors_before = len(self.console_errors)
        self.page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, name])
        self.page.wait_for_timeout(settle_ms)
        dialogs, toasts = self.page.evaluate(_TEXTS_JS, ".p-dialog"), self.page.evaluate(_TEXTS_JS, ".p-toast-message")
        overlay, groups = self._error_details()
        return LoadResult(dialogs, toasts, overlay, groups, self.page.evaluate(_NODES_JS),
                          self.console_errors[errors_before:])

    def _error_details(self) -> tuple[str, dict[str, str]]:
        """1.49's error overlay and, behind its "View details", the Errors tab's sections; the
        panel is closed again afterwards. ("", {}) on frontends without the overlay."""
        overlay = self.page.query_selector('[data-testid="error-overlay"]')
        if overlay is None:
            return "", {}
        text = overlay.inner_text()
        self.page.click('[data-testid="error-overlay-see-errors"]')
        try:
            self.page.wait_for_selector('[data-testid^="error-group-"]', timeout=5_000)
        except Exception:      # playwright's TimeoutError: no section appeared
            pass
        groups = self.page.evaluate(_ERROR_GROUPS_JS, list(ERROR_GROUP_KINDS))
        close = self.page.query_selector('[data-testid="properties-panel"] button[aria-label="Toggle properties panel"]')
        if close:
            close.click()
        return text, groups

    def graph_to_prompt(self) -> dict:
        """The API prompt the frontend would queue for the loaded graph."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def queue_api_prompt(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Load an API prompt into the page, press Queue (``app.queuePrompt``), wait for /history."""
        self.close_dialogs()
        before = set(self.server.get("/history"))
        self.page.evaluate("p => window.app.loadApiJson(p, 'accel-test')", prompt)
        self.page.wait_for_timeout(300)
        self.page.evaluate("() => window.app.queuePrompt(0, 1)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = set(self.server.get("/history")) - before
            if new:
                return self.server.wait(new.pop(), timeout=max(1.0, deadline - time.monotonic()))
            time.sleep(0.2)
        raise TimeoutError(f"nothing reached the server's history within {timeout:.0f} s of queueing")

    def screenshot(self, path: Path) -> None:
        self.close_dialogs()
        self._dismiss_error_overlay()
        self.page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
        self.page.evaluate("() => { window.app.canvas.ds.scale = 1; window.app.graph.setDirtyCanvas(true, true); }")
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(path))
