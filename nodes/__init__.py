"""The ComfyUI layer: thin V3 nodes over the domain packages."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .registry import all_nodes


class AccelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> AccelExtension:
    return AccelExtension()
