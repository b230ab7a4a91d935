"""Sample sheets of the reference models, sampled through ComfyUI and decoded to PNGs.

    python -m lab.reference.samples            # writes docs/reference_*.png

Each row is one caption: on the left a few training examples with that caption, on the
right what the model makes of it (``comfy.sample.sample``, the function KSampler calls:
euler, simple schedule, ``STEPS`` steps, cfg ``CFG``, negative prompt ""), decoded by the
patch autoencoder. Videos show their frames left to right.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lab import fixtures
from lab.sampling import ksampler
from lab.reference import MODELS, decode, empty_latent, load_reference, make_conditioning, reference_spec, train

log = logging.getLogger("comfyui_accel.reference.samples")

DOCS = Path(__file__).resolve().parents[2] / "docs"
STEPS = 20
CFG = 4.0
SCALE = 2          # nearest-neighbour upscaling of the 32-pixel pictures
DATA_SEED = 2_000_003


def sample(name: str, prompt, seeds, model=None, steps: int = STEPS, cfg: float = CFG,
           sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """Pixels (len(seeds), 3, [T,] H, W) sampled with KSampler's settings, one seed per picture."""
    model = model or load_reference(name)
    positive, negative = make_conditioning(name, prompt), make_conditioning(name, "")
    return torch.cat([decode(name, ksampler(model, positive, negative, empty_latent(name)["samples"], steps, cfg, seed,
                                            sampler, scheduler)) for seed in seeds])


def examples(name: str, caption: str, count: int) -> torch.Tensor:
    """The first ``count`` training-distribution examples with this caption."""
    found, index = [], 0
    while len(found) < count:
        pixels, captions = train.batch(name, DATA_SEED, index, 256)
        found += [p for p, c in zip(pixels, captions) if c == caption]
        index += 1
        if index > 50:
            raise ValueError(f"no examples of {caption!r} in the {name} data")
    return torch.stack(found[:count])


def _tile(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (3, H, N*W) side by side."""
    return torch.cat(list(pixels), dim=-1)


def _sheet(rows: list[tuple[str, torch.Tensor]], path: Path, gap_after: int | None = None) -> None:
    from PIL import Image, ImageDraw
    label_w, pad = 150, 4
    height = rows[0][1].shape[-2]
    width = max(r.shape[-1] for _, r in rows)
    sheet = Image.new("RGB", (label_w + width * SCALE, len(rows) * (height * SCALE + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, strip) in enumerate(rows):
        img = (strip.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        tile = Image.fromarray(img).resize((strip.shape[-1] * SCALE, height * SCALE), Image.NEAREST)
        y = i * (height * SCALE + pad)
        sheet.paste(tile, (label_w, y))
        draw.text((4, y + height * SCALE // 2 - 6), label, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    log.info("wrote %s", path)


def image_sheet(name: str, path: Path, seeds=range(6), n_data: int = 3) -> Path:
    spec = reference_spec(name)
    model = load_reference(name)
    white = torch.ones(3, spec.height, 8)
    rows = []
    for prompt in spec.prompts:
        data = _tile(examples(name, prompt, n_data))
        made = _tile(sample(name, prompt, seeds, model))
        rows.append((f"{prompt}", torch.cat([data, white, made], -1)))
    _sheet(rows, path)
    return path


def video_sheet(name: str, path: Path, seeds=range(2)) -> Path:
    spec = reference_spec(name)
    model = load_reference(name)
    rows = []
    for prompt in spec.prompts:
        data = examples(name, prompt, 1)[0]                                    # (3, T, H, W)
        rows.append((f"data: {prompt}", _tile(data.transpose(0, 1))))
        for seed, video in zip(seeds, sample(name, prompt, seeds, model)):
            rows.append((f"  sample, seed {seed}", _tile(video.transpose(0, 1))))
    _sheet(rows, path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=list(MODELS), help="model(s) to sample (default: all)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNGs (default: docs/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)    # tiny models: a second thread mostly waits (see train.py)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fixtures._comfy()
    for name in args.model or list(MODELS):
        spec = MODELS[name]
        sheet = video_sheet if spec.kind == "video" else image_sheet
        sheet(name, args.out / f"reference_{name}.png")


if __name__ == "__main__":
    main()
