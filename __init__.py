"""ComfyUI-Accel: quantization, low-rank branches, step caching, sparse attention
and vector quantization as ComfyUI nodes.

ComfyUI loads this package from custom_nodes/ and calls ``comfy_entrypoint``, which
imports the node layer; without ComfyUI (unit tests, benchmarks, scripts) nothing
here touches ComfyUI, so kernels and algorithms import and run alone.
"""
from .nodes import comfy_entrypoint  # noqa: F401

__version__ = "0.1.0"
