"""ComfyUI-Accel: quantization, low-rank branches, step caching, sparse attention
and vector quantization as ComfyUI nodes.

ComfyUI loads this package from custom_nodes/ and calls ``comfy_entrypoint``, which
imports the node layer then; importing this file imports nothing else. That keeps it
importable under any folder name: pytest imports it as a plain module (no parent package)
when the checkout's folder is named ``ComfyUI-Accel``, and kernels and algorithms import
and run without ComfyUI.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    import logging
    from .compat import host_problem
    problem = host_problem()
    if problem:  # said once, at load; the nodes still register where they can
        logging.getLogger(__name__).error("%s", problem)
    from .nodes.registry import AccelExtension
    return AccelExtension()
