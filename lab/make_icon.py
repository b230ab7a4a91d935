"""Draws the pack's registry icon, ``docs/icon.png`` (400x400; the registry allows up to 800x400).

    python -m lab.make_icon

A dark rounded tile with three fast-forward chevrons fading from cyan to green (ComfyUI's
colours for our nodes and for a finished run) over a thin node-graph wire.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

ICON_PATH = Path(__file__).resolve().parents[1] / "docs" / "icon.png"
SIZE = 400


def draw(size: int = SIZE) -> Image.Image:
    scale = 4                                   # draw large, shrink: smooth edges without antialias support
    s = size * scale
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, s - 1, s - 1], radius=s // 6, fill=(31, 42, 48, 255))
    # A wire with two sockets, like a link between two nodes.
    y = s // 2
    d.line([(s * 0.10, y), (s * 0.90, y)], fill=(90, 110, 120, 255), width=s // 80)
    for x in (s * 0.10, s * 0.90):
        r = s // 28
        d.ellipse([x - r, y - r, x + r, y + r], fill=(120, 200, 120, 255))
    colours = [(63, 180, 200), (80, 190, 160), (110, 200, 120)]
    half, depth, thick = s * 0.22, s * 0.17, s * 0.075
    for i, colour in enumerate(colours):
        x0 = s * 0.26 + i * s * 0.16
        tip = x0 + depth
        d.polygon([(x0, y - half), (x0 + thick, y - half), (tip + thick, y), (x0 + thick, y + half), (x0, y + half),
                   (tip, y)], fill=(*colour, 255))
    return img.resize((size, size), Image.LANCZOS)


def main() -> int:
    ICON_PATH.parent.mkdir(parents=True, exist_ok=True)
    draw().save(ICON_PATH, optimize=True)
    log.info("wrote %s", ICON_PATH)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
