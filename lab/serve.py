"""``make serve``: the host ComfyUI with this pack on 127.0.0.1 (port from PORT, default 8188).

With the bundled ComfyUI the pack is already linked into its custom_nodes by setup.
With COMFYUI_PATH the user's tree is left untouched: the pack is added through an
extra_model_paths file, unless it already lives in that ComfyUI's custom_nodes.
"""
from __future__ import annotations

import logging
import os
import sys

from lab.host import HOST_DIR, PACK_ROOT, HostError, comfyui_dir, comfyui_version, port_is_free

log = logging.getLogger("comfyui_accel.serve")


def command(port: int) -> tuple[list[str], str]:
    root = comfyui_dir()
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    import torch
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    in_custom_nodes = PACK_ROOT.parent.resolve() == (root / "custom_nodes").resolve()
    linked = (root / "custom_nodes" / "ComfyUI-Accel").exists()
    if not (in_custom_nodes or linked):
        extra = HOST_DIR / "serve"
        (extra / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = extra / "custom_nodes" / "ComfyUI-Accel"
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        config = extra / "extra_model_paths.yaml"
        config.write_text(f"comfyui_accel:\n  base_path: {extra}\n  custom_nodes: custom_nodes\n")
        cmd += ["--extra-model-paths-config", str(config)]
    return cmd, str(root)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        port = int(os.environ.get("PORT", "8188"))
    except ValueError:
        log.error("PORT=%s is not a number; use for example PORT=8190 make serve.", os.environ["PORT"])
        return 2
    try:
        if not port_is_free(port):
            raise HostError(f"port {port} on 127.0.0.1 is already in use; stop what runs there "
                            f"or choose another port (PORT={port + 1} make serve).")
        cmd, cwd = command(port)
    except HostError as e:
        log.error("%s", e)
        return 2
    log.info("ComfyUI %s at %s with ComfyUI-Accel: open http://127.0.0.1:%d (Ctrl-C stops it)",
             comfyui_version(), cwd, port)
    os.chdir(cwd)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
