"""The ComfyUI layer: thin V3 nodes over the domain packages.

ComfyUI's API is imported lazily so that ComfyUI-free helpers in this package
(plots, report formatting) import and test without ComfyUI.
"""
from __future__ import annotations
