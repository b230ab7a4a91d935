"""Pictures of the stack benchmark: speed against PSNR (ours and ComfyUI's peers on the same axes)
and the decoded outputs side by side. PIL only (``nodes/plots.py`` draws the charts)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PSNR_CAP = 60.0   # identical outputs (inf dB) are drawn at the cap
SCALE = 3         # 32x32 pictures are small: nearest-neighbour upscale
LABEL_H = 28
# Legend entries hold 16 characters.
SHORT = {"Quantize Model": "Quantize (ours)", "ComfyUI weight dtype": "ComfyUI fp8/bf16", "TeaCache": "TeaCache (ours)",
         "TaylorSeer": "TaylorSeer (ours)", "Forecast Cache": "Forecast (ours)", "EasyCache (ComfyUI)": "EasyCache [Cfy]", "LazyCache (ComfyUI)": "LazyCache [Cfy]",
         "Sparse Attention": "Sparse attn", "ComfyUI attention": "ComfyUI attn", "Stacked": "Stacked (ours)",
         "SVD Low-Rank Branch": "SVDQuant (ours)"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def to_png(image: torch.Tensor, path: Path) -> Path:
    """A ComfyUI IMAGE [1, H, W, 3] in [0, 1] -> PNG file."""
    array = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def speed_psnr_plot(records: list[dict], model: str) -> torch.Tensor:
    from comfyui_accel.nodes.plots import line_plot
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        if r.get("name") != "stack" or r["model"] != model or r.get("group") == "interaction":
            continue
        key = SHORT.get(r["technique"], r["technique"])
        xs, ys = series.setdefault(key, ([], []))
        xs.append(r["speedup"])
        ys.append(min(r["psnr_db"], PSNR_CAP))
    for key, (xs, ys) in series.items():
        order = np.argsort(xs)
        series[key] = ([xs[i] for i in order], [ys[i] for i in order])
    return line_plot(series, f"{model}: speed vs fidelity", xlabel="speedup (x)",
                     ylabel=f"PSNR dB (cap {PSNR_CAP:g})")


def _tile(picture: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (1, 3, T, H, W) in [0, 1] -> one image (video: first, middle, last frame in a row)."""
    x = picture[0]
    if x.dim() == 4:
        t = x.shape[1]
        x = torch.cat([x[:, i] for i in sorted({0, t // 2, t - 1})], dim=-1)
    array = (x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array)
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def side_by_side(pictures: dict[str, torch.Tensor], columns: int = 6) -> Image.Image:
    """Labelled tiles of decoded outputs, the unaccelerated one first."""
    tiles = [(name, _tile(p)) for name, p in pictures.items()]
    w = max(t.width for _, t in tiles) + 8
    h = max(t.height for _, t in tiles) + LABEL_H
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        x, y = (i % columns) * w, (i // columns) * h
        words = name.replace(": ", ":\n", 1)
        draw.multiline_text((x + 2, y + 1), words[: 2 * w // 6], fill="black", spacing=1)
        sheet.paste(tile, (x + 4, y + LABEL_H))
    return sheet


def write(records: list[dict], images: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in dict.fromkeys(r["model"] for r in records if r.get("name") == "stack"):
        written.append(to_png(speed_psnr_plot(records, model), out / f"stack_speed_psnr_{slug(model)}.png"))
        pictures = images.get(model)
        if pictures and next(iter(pictures.values())).dim() >= 4 and next(iter(pictures.values())).shape[1] == 3:
            path = out / f"stack_outputs_{slug(model)}.png"
            side_by_side(pictures).save(path)
            written.append(path)
    return written
