"""Collects the node classes of every family module into one ComfyExtension.

Each family module in this package exposes ``NODES``, a list of V3 node classes.
A family that fails to import is logged and skipped, so one broken optional
dependency never takes the whole pack down.
"""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger(__name__)

# Family modules, in the order their nodes appear in the UI's menus.
FAMILIES: tuple[str, ...] = ("quant", "svd", "cache", "attention", "vq")


def all_nodes() -> list[type[io.ComfyNode]]:
    nodes = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(f".{family}", __package__)
        except Exception:
            log.warning("ComfyUI-Accel: the %s nodes failed to load", family, exc_info=True)
            continue
        nodes.extend(module.NODES)
    return nodes


class AccelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
