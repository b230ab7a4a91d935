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
# Frontend text that means a workflow did not load cleanly.
MISSING_NODES_TEXT = "missing nodes"
VALIDATION_TEXTS = ("Invalid workflow", "Workflow Validation", "Workflow Links Fixed", "does not contain a valid version")


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
    dialogs: list[str]          # text of every dialog open after loading
    toasts: list[str]           # text of every toast (alerts, warnings) shown
    nodes: list[dict]           # per node: id, type, registered, errors, pos, size, min_size
    console_errors: list[str]

    def problems(self) -> list[str]:
        """Missing node types, validation errors, nodes drawn red."""
        out = []
        for text in self.dialogs + self.toasts:
            if MISSING_NODES_TEXT in text.lower() or any(t in text for t in VALIDATION_TEXTS):
                out.append(text.strip().replace("\n", " ")[:300])
        for n in self.nodes:
            if not n["registered"]:
                out.append(f"node {n['id']} has no registered type {n['type']!r}")
            if n["errors"]:
                out.append(f"node {n['id']} ({n['type']}) is marked with errors")
        return out


_NODES_JS = """() => window.app.graph.nodes.map(n => ({
    id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
    errors: !!n.has_errors, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    min_size: (n.computeSize ? Array.from(n.computeSize()) : [0, 0]),
    title_height: LiteGraph.NODE_TITLE_HEIGHT}))"""
_TEXTS_JS = "sel => Array.from(document.querySelectorAll(sel)).map(e => e.innerText)"


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
        # it). For screenshots: no missing-models dialog, minimap or fps counter, and full detail
        # at any zoom. The missing-nodes dialog always stays on.
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
        errors_before = len(self.console_errors)
        self.page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, name])
        self.page.wait_for_timeout(settle_ms)
        return LoadResult(self.page.evaluate(_TEXTS_JS, ".p-dialog"), self.page.evaluate(_TEXTS_JS, ".p-toast-message"),
                          self.page.evaluate(_NODES_JS), self.console_errors[errors_before:])

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
        self.page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
        self.page.evaluate("() => { window.app.canvas.ds.scale = 1; window.app.graph.setDirtyCanvas(true, true); }")
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(path))
