"""The host ComfyUI: where it is, importing it in-process, and running it as a server.

Used by the tests, the demo, the benchmarks and ``make serve``; never by the nodes.
The ComfyUI in use is ``COMFYUI_PATH`` when set, else the copy that
``scripts/setup.sh`` put under ``.host/ComfyUI``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

PACK_ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = PACK_ROOT / ".host"
FIXTURE_NODES = PACK_ROOT / "lab" / "fixture_nodes"


class HostError(RuntimeError):
    """A problem with the host ComfyUI, said in one sentence a person can act on."""


def comfyui_dir() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise HostError(f"COMFYUI_PATH={env} is not a directory; point it at a ComfyUI checkout "
                            "(the folder with main.py) or unset it to use the bundled ComfyUI.")
        origin = "COMFYUI_PATH"
    else:
        path = HOST_DIR / "ComfyUI"
        origin = "the bundled copy"
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        if origin == "COMFYUI_PATH":
            raise HostError(f"COMFYUI_PATH={env} has no main.py and comfy/ folder; point it at a "
                            "ComfyUI checkout or unset it to use the bundled ComfyUI.")
        raise HostError(f"no ComfyUI at {path}; run `make setup` first.")
    return path.resolve()


def comfyui_version(path: Path | None = None) -> str:
    version_file = (path or comfyui_dir()) / "comfyui_version.py"
    text = version_file.read_text() if version_file.exists() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def missing_requirements(root: Path) -> list[str]:
    """The packages ComfyUI at ``root`` requires (its requirements.txt up to the non-essential
    part) that this Python environment lacks."""
    import importlib.metadata
    import re
    path = root / "requirements.txt"
    missing = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.strip().lower().startswith("#non essential"):
            break
        name = re.match(r"\s*([A-Za-z0-9_.\-]+)", line.split("#", 1)[0])
        if not name:
            continue
        try:
            importlib.metadata.version(name.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group(1))
    return missing


def check_requirements(root: Path) -> None:
    """Raise a one-sentence HostError when this environment lacks a package the host needs."""
    missing = missing_requirements(root)
    if missing:
        fix = "make setup" if not os.environ.get("COMFYUI_PATH") else f"COMFYUI_PATH={root} make setup"
        raise HostError(f"ComfyUI {comfyui_version(root)} at {root} needs {', '.join(missing)}, which the "
                        f"environment {sys.prefix} lacks; run `{fix}` to install its requirements there.")


_imported = False


def import_comfy() -> Path:
    """Make ComfyUI importable in this process, on the CPU when there is no GPU.

    ComfyUI's top-level modules (``comfy``, ``nodes``, ``folder_paths``...) live in its
    root folder, which goes first on ``sys.path``. Idempotent.
    """
    global _imported
    root = comfyui_dir()
    if _imported:
        return root
    check_requirements(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch
    if not torch.cuda.is_available():
        # comfy.model_management raises at import on a machine with no GPU otherwise.
        comfy.cli_args.args.cpu = True
    _load_aimdo()
    import comfy.model_management  # noqa: F401
    _imported = True
    return root


@contextlib.contextmanager
def in_process(output_dir: str | None = None, threads: int = 1):
    """ComfyUI imported in this process, with ``threads`` torch threads (small models on a shared
    machine: more threads add contention noise) and its output folder at ``output_dir`` (a temporary
    one when None: nodes that save, such as Cache Calibrate's profiles, write there); both restored."""
    import_comfy()
    import folder_paths
    import torch
    saved_threads, saved_output = torch.get_num_threads(), folder_paths.get_output_directory()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder_paths.set_output_directory(output_dir or tmp)
            yield
    finally:
        folder_paths.set_output_directory(saved_output)
        torch.set_num_threads(saved_threads)


def _load_aimdo() -> None:
    """Load comfy-aimdo's library before ComfyUI imports the package, as ComfyUI's main.py does
    on GPUs (hosts from 0.33 have it): its host buffers bind the library when first imported, and
    the dynamic-VRAM patcher needs them, also on the CPU (lab.dynamic_vram). Nothing else
    changes: ComfyUI turns dynamic VRAM on only in main.py. A host without the package (0.3.75)
    has no dynamic VRAM."""
    try:
        import comfy_aimdo.control
    except ImportError:
        return
    comfy_aimdo.control.init()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PromptError(RuntimeError):
    """A prompt the server rejected or that failed while it ran."""


class ComfyServer:
    """A real ComfyUI server (``main.py --cpu``) on 127.0.0.1 in its own base directory.

    The base directory holds ``models/``, ``input/``, ``output/`` and ``custom_nodes/``
    (our pack and, when asked, the test-only fixture nodes, both as symlinks), so the
    host ComfyUI's own folders are never touched.
    """

    def __init__(self, base_dir: Path | None = None, port: int | None = None,
                 fixture_nodes: bool = True, extra_args: tuple[str, ...] = (),
                 comfy_root: Path | None = None, link_pack: bool = True, extra_models: Path | None = None):
        """``comfy_root``: the ComfyUI to run (default ``comfyui_dir()``); ``link_pack=False``: do not
        link this checkout into custom_nodes (a test that installed the pack there itself);
        ``extra_models``: a ComfyUI ``models`` folder whose files the server lists too."""
        self.base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="accel-comfy-"))
        self.port = port or free_port()
        self.fixture_nodes = fixture_nodes
        self.comfy_root = Path(comfy_root) if comfy_root else None
        self.link_pack = link_pack
        self.extra_models = Path(extra_models) if extra_models else None
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def _prepare(self) -> None:
        for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        links = {"ComfyUI-Accel": PACK_ROOT} if self.link_pack else {}
        if self.fixture_nodes:
            links["accel_fixture_nodes"] = FIXTURE_NODES
        for name, target in links.items():
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        if self.extra_models:
            folders = ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "vae_approx", "loras")
            lines = ["host_models:", f"    base_path: {json.dumps(str(self.extra_models))}"]
            lines += [f"    {name}: {name}" for name in folders]
            (self.base / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not port_is_free(self.port):
            raise HostError(f"port {self.port} on 127.0.0.1 is already in use; stop what runs there "
                            "or choose another port (PORT=8190 make serve).")
        root = self.comfy_root or comfyui_dir()
        check_requirements(root)
        self._prepare()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.link_pack or self.fixture_nodes:   # the fixture nodes import comfyui_accel
            pkgroot = str(HOST_DIR / "pkgroot")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pkgroot, env.get("PYTHONPATH", "")) if p)
        else:
            env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        if self.extra_models:
            cmd += ["--extra-model-paths-config", str(self.base / "extra_model_paths.yaml")]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} while starting; "
                                f"its log ends:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise HostError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s; its log ends:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- the HTTP API -----------------------------------------------------------------

    def get(self, path: str):
        r = requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def object_info(self) -> dict:
        return self.get("/object_info")

    def submit(self, prompt: dict) -> str:
        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=30)
        if r.status_code != 200:
            raise PromptError(f"the server rejected the prompt ({r.status_code}): {_short_json(r)}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Wait for a prompt to finish; return its /history entry or raise PromptError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise PromptError(f"the server died while running the prompt; its log ends:\n{self.log_tail()}")
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise PromptError(_execution_error(status))
                if status.get("completed", True):
                    return entry
            time.sleep(0.1)
        raise PromptError(f"the prompt did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.submit(prompt), timeout)

    def output_files(self, entry: dict, node_id: str, kind: str = "images") -> list[Path]:
        files = []
        for item in entry["outputs"].get(str(node_id), {}).get(kind, []):
            folder = self.base / item.get("type", "output") / item.get("subfolder", "")
            files.append(folder / item["filename"])
        return files


def exec_seconds(entry: dict) -> float:
    """How long a finished prompt ran (its /history entry: execution start to success), in seconds."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"].get("messages", [])}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def _short_json(r: requests.Response) -> str:
    try:
        return json.dumps(r.json())[:2000]
    except ValueError:
        return r.text[:2000]


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
    return f"the prompt failed: {json.dumps(status)[:2000]}"
