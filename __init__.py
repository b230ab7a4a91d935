"""ComfyUI-Accel: quantization, low-rank branches, step caching, sparse attention
and vector quantization as ComfyUI nodes.

ComfyUI loads this package from custom_nodes/ and calls ``comfy_entrypoint``.
Without ComfyUI (unit tests, benchmarks, scripts) the import must still work,
so the node layer is only imported when ComfyUI's API is importable.
"""
import importlib.util
import logging

log = logging.getLogger("comfyui_accel")

__version__ = "0.1.0"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
