"""Pieces every node family uses: input errors, progress, interruption, report outputs."""
from __future__ import annotations

import json
from typing import Callable

import comfy.model_management
import comfy.utils

from .. import families


CATEGORY = "accel"  # the pack's menu; each family adds its folder: f"{CATEGORY}/quant"


class AccelInputError(ValueError):
    """Bad input to one of our nodes. ComfyUI shows the message; the server keeps running."""


def node_name(node) -> str:
    """How every message names a node: the display name the user sees on the canvas and the id a
    workflow file holds, e.g. ``Quantize Model (AccelQuantizeModel)``. ``node``: a node class or schema."""
    schema = node.define_schema() if hasattr(node, "define_schema") else node
    return f"{schema.display_name} ({schema.node_id})"


def fail(node: str, input_name: str, message: str) -> None:
    """Raise an error that names the node (:func:`node_name`), the input and what is allowed."""
    raise AccelInputError(f"{node}: input '{input_name}' {message}")


def require_diffusion_model(node: str, model) -> None:
    """Refuse the supported_models entries that load as a MODEL but are not diffusion models."""
    what = families.not_diffusion(model)
    if what is not None:
        fail(node, "model", f"is {families.a_model(model)} for {what}, not a diffusion model: nothing "
                            f"samples it, so this node has nothing to speed up. Connect a diffusion model.")


def progress(total: int) -> Callable[[int], None]:
    """A callback ``step(n_done)`` for domain code: drives ComfyUI's progress bar and
    raises ComfyUI's interrupt exception when the user pressed Cancel."""
    bar = comfy.utils.ProgressBar(max(int(total), 1))

    def step(done: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done)

    return step


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def report_text(title: str, summary: dict, rows: list[dict] | None = None, max_rows: int = 200) -> str:
    """A report as readable text: a summary block, a table, then the JSON for tools."""
    lines = [title, "=" * len(title)]
    lines += [f"{k}: {v}" for k, v in summary.items()]
    if rows:
        keys = list(rows[0].keys())
        cells = [[_fmt(r.get(k)) for k in keys] for r in rows[:max_rows]]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines += ["", "  ".join(k.ljust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more rows in the JSON below")
    lines += ["", "JSON:", json.dumps({"summary": summary, "rows": rows or []}, default=str)]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
