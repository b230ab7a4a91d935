"""Small report plots drawn with PIL (no matplotlib in ComfyUI's environment).

Each function returns a ComfyUI IMAGE: a float tensor [1, H, W, 3] in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (23, 190, 207), (188, 189, 34)]
W, H = 768, 432
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 48, 48


def _to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN_L, 10), title, fill="black")
    return img, draw


def _legend(draw, i: int, name: str, color) -> None:
    # Legend entries in a row at the top right, above the plot area.
    x = W // 2 + 120 * (i % 3)
    draw.rectangle([x, 8 + 12 * (i // 3), x + 8, 16 + 12 * (i // 3)], fill=color)
    draw.text((x + 12, 6 + 12 * (i // 3)), name[:16], fill=color)


def _range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _axes(draw, xlo, xhi, ylo, yhi, xlabel, ylabel):
    x0, y0, x1, y1 = MARGIN_L, H - MARGIN_B, W - MARGIN_R, MARGIN_T
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
    for i in range(5):
        yv = ylo + (yhi - ylo) * i / 4
        yp = y0 - (y0 - y1) * i / 4
        draw.line([(x0 - 4, yp), (x0, yp)], fill="black")
        draw.text((4, yp - 6), f"{yv:.3g}", fill="black")
        xv = xlo + (xhi - xlo) * i / 4
        xp = x0 + (x1 - x0) * i / 4
        draw.line([(xp, y0), (xp, y0 + 4)], fill="black")
        draw.text((xp - 10, y0 + 6), f"{xv:.3g}", fill="black")
    draw.text(((x0 + x1) // 2 - 3 * len(xlabel), H - 18), xlabel, fill="black")
    draw.text((4, MARGIN_T - 20), ylabel, fill="black")

    def to_px(x, y):
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y0 - (y - ylo) / (yhi - ylo) * (y0 - y1))
    return to_px


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
              xlabel: str = "", ylabel: str = "", markers: bool = True, colors: dict | None = None,
              hollow: Sequence[str] = (), dots: Sequence[str] = ()) -> torch.Tensor:
    """One line per named series of (xs, ys). ``colors`` maps a series to a palette index (so two
    series can share one); series in ``hollow`` get a thin line, open markers and no legend entry
    (companions of a series of the same colour); series in ``dots`` get markers and no line."""
    img, draw = _canvas(title)
    xs_all = np.concatenate([np.asarray(x, dtype=float) for x, _ in series.values()] or [np.zeros(1)])
    ys_all = np.concatenate([np.asarray(y, dtype=float) for _, y in series.values()] or [np.zeros(1)])
    to_px = _axes(draw, *_range(xs_all), *_range(ys_all), xlabel, ylabel)
    legend = 0
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[(colors or {}).get(name, i) % len(PALETTE)]
        open_ = name in hollow
        pts = [to_px(x, y) for x, y in zip(xs, ys) if np.isfinite(x) and np.isfinite(y)]
        if len(pts) > 1 and name not in dots:
            draw.line(pts, fill=color, width=1 if open_ else 2)
        if markers:
            for px, py in pts:
                r = 4 if name in dots else 3
                draw.ellipse([px - r, py - r, px + r, py + r], outline=color, fill=None if open_ else color)
        if not open_:
            _legend(draw, legend, name, color)
            legend += 1
    return _to_image(img)


def bar_plot(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str = "",
             groups: Sequence[str] | None = None) -> torch.Tensor:
    """Vertical bars; bars of the same ``groups`` entry share a colour (with a legend)."""
    img, draw = _canvas(title)
    vals = np.asarray(values, dtype=float)
    lo, hi = _range(np.append(vals, 0.0))
    to_px = _axes(draw, 0, max(len(vals), 1), lo, hi, "", ylabel)
    names = list(dict.fromkeys(groups)) if groups else []
    n = max(len(vals), 1)
    for i, v in enumerate(vals):
        color = PALETTE[names.index(groups[i]) % len(PALETTE)] if groups else PALETTE[0]
        (xa, ya), (xb, yb) = to_px(i + 0.1, max(v, 0) if np.isfinite(v) else 0), to_px(i + 0.9, min(v, 0) if np.isfinite(v) else 0)
        draw.rectangle([xa, ya, xb, yb], fill=color)
        if n <= 24:
            draw.text((xa, H - MARGIN_B + 20), str(labels[i])[:10], fill="black")
    for j, name in enumerate(names):
        _legend(draw, j, name, PALETTE[j % len(PALETTE)])
    return _to_image(img)


def heatmap(matrix, title: str, xlabel: str = "", ylabel: str = "",
            vmin: float | None = None, vmax: float | None = None) -> torch.Tensor:
    """A matrix as colours (dark blue = low, yellow = high), rows top to bottom."""
    m = np.asarray(matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=float)
    m = np.atleast_2d(m)
    lo, hi = _range(m)
    lo, hi = (vmin if vmin is not None else lo), (vmax if vmax is not None else hi)
    t = np.clip((np.nan_to_num(m, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.stack([0.27 + 0.72 * t, 0.0 + 0.9 * t, 0.33 + 0.2 * t - 0.5 * t ** 2], -1)
    cell = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    img, draw = _canvas(f"{title}  [{lo:.3g} .. {hi:.3g}]")
    box = (MARGIN_L, MARGIN_T, W - MARGIN_R, H - MARGIN_B)
    img.paste(cell.resize((box[2] - box[0], box[3] - box[1]), Image.NEAREST), box[:2])
    draw.text(((box[0] + box[2]) // 2 - 3 * len(xlabel), H - 30), xlabel, fill="black")
    draw.text((4, MARGIN_T - 20), ylabel, fill="black")
    return _to_image(img)
