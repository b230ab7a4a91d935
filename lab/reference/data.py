"""Training data for the reference models, made here or shipped by scikit-image / scikit-learn.

Images (32x32): one coloured shape on a plain or graded background ("red circle"), a
procedural texture ("stripes", "checkerboard"), or a crop of one of the sample photographs
that scikit-image and scikit-learn ship ("astronaut photo").
Videos (4 frames of 32x32): one coloured shape moving in a straight line, rotating, on a
plain, graded or scrolling-stripes background ("red square moving right"). The clips move in
``VIDEO_DIRECTIONS`` only, at ``VIDEO_STEP`` pixels per frame (see there).

Every batch is a pure function of ``(seed, index)``: one ``torch.Generator`` per batch,
vectorised rendering, no global random state. Pixels are ``float32`` in [0, 1]; captions
are short space-separated strings over ``VOCABULARY``.
"""
from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
VIDEO_SIZE = 32
VIDEO_FRAMES = 4

COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.12, 0.78, 0.22), "blue": (0.15, 0.32, 0.95),
           "yellow": (0.96, 0.85, 0.12)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# What the video clips do. One direction, one latent token (4 pixels) per frame: the Wan
# reference has only relative (rotary) positions, so motion is an attention offset it must learn,
# and within its 20-minute training budget it learns one whole-token offset but not to pick one
# of four by the direction word (docs/reference_models.md).
VIDEO_DIRECTIONS = ("right",)
VIDEO_STEP = 4.0
TEXTURES = ("stripes", "checkerboard")
# caption word -> (package, name): skimage.data.<name>() or sklearn's load_sample_image(<name>)
PHOTOS = {"astronaut": ("skimage", "astronaut"), "coffee": ("skimage", "coffee"), "cat": ("skimage", "chelsea"),
          "rocket": ("skimage", "rocket"), "temple": ("sklearn", "china.jpg"), "flower": ("sklearn", "flower.jpg")}
PHOTO_SIDE = 64          # photos are downscaled so their shorter side has this many pixels
VOCABULARY = (*COLOURS, *SHAPES, "moving", *DIRECTIONS, *TEXTURES, "photo", *PHOTOS)

# Share of each kind of image in a batch (shapes, textures, photos).
IMAGE_MIX = (0.45, 0.15, 0.40)


def generator(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}".encode()))


def _uniform(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _pick(g, n, k):
    return torch.randint(0, k, (n,), generator=g)


def _hsv(h, s, v):
    """Vectorised HSV -> RGB, all (n,) in [0, 1] -> (n, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _muted(g, n):
    """Background colours: low saturation, dark or light, never mid-grey against a bright shape."""
    dark = torch.rand(n, generator=g) < 0.6
    v = torch.where(dark, _uniform(g, n, 0.08, 0.35), _uniform(g, n, 0.65, 0.9))
    return _hsv(torch.rand(n, generator=g), _uniform(g, n, 0.0, 0.35), v)


def _named(g, idx):
    base = torch.tensor(list(COLOURS.values()))[idx]
    return (base + (torch.rand(base.shape, generator=g) - 0.5) * 0.1).clamp(0, 1)


def _coords(size):
    c = torch.arange(size, dtype=torch.float32) + 0.5
    return c[None, :].expand(size, size), c[:, None].expand(size, size)   # x (columns), y (rows)


def _sdf(kind, ux, uy, r):
    """Signed distance (pixels) to a circle / square / equilateral triangle of half-size r."""
    circle = torch.sqrt(ux ** 2 + uy ** 2) - r
    qx, qy = ux.abs() - r * 0.85, uy.abs() - r * 0.85
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    k = math.sqrt(3.0)
    px, py = ux.abs() - r, uy + r / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.maximum(px, -2 * r), torch.zeros_like(px))
    triangle = -torch.sqrt(px ** 2 + py ** 2) * torch.sign(py)
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def _shape_alpha(kind, cx, cy, r, angle, size):
    """Anti-aliased coverage of shapes; parameters broadcast against (..., size, size)."""
    x, y = _coords(size)
    dx, dy = x - cx, y - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    ux, uy = cos * dx + sin * dy, -sin * dx + cos * dy
    return (0.5 - _sdf(kind, ux, uy, r)).clamp(0, 1)


def _gradient(g, n, size):
    """Two muted colours blended along a random direction: (n, 3, size, size)."""
    a, b = _muted(g, n), _muted(g, n)
    theta = _uniform(g, n, 0, 2 * math.pi)
    x, y = _coords(size)
    t = ((x - size / 2) * torch.cos(theta)[:, None, None] + (y - size / 2) * torch.sin(theta)[:, None, None])
    t = (t / size + 0.5).clamp(0, 1)[:, None]
    return a[:, :, None, None] * (1 - t) + b[:, :, None, None] * t


def _textures(g, n, size, kind):
    """Stripes (kind 0) or checkerboard (kind 1) in two random colours, random angle and scale."""
    a = _hsv(torch.rand(n, generator=g), _uniform(g, n, 0.3, 0.9), _uniform(g, n, 0.5, 1.0))
    b = _muted(g, n)
    theta = _uniform(g, n, 0, math.pi)[:, None, None]
    period = _uniform(g, n, 5.0, 11.0)[:, None, None]
    phase = _uniform(g, n, 0, 1)[:, None, None]
    x, y = _coords(size)
    u = (x * torch.cos(theta) + y * torch.sin(theta)) / period + phase
    v = (-x * torch.sin(theta) + y * torch.cos(theta)) / period + phase
    stripes = torch.sin(2 * math.pi * u)
    checker = torch.sin(2 * math.pi * u) * torch.sin(2 * math.pi * v)
    wave = torch.where(kind[:, None, None] == 0, stripes, checker)
    t = (wave * 3).clamp(-1, 1)[:, None] * 0.5 + 0.5   # soft square wave
    return a[:, :, None, None] * t + b[:, :, None, None] * (1 - t)


@functools.lru_cache(maxsize=None)
def photo(name: str) -> torch.Tensor:
    """A sample photograph, (3, h, w) in [0, 1], shorter side ``PHOTO_SIDE`` pixels."""
    package, key = PHOTOS[name]
    if package == "skimage":
        import skimage.data
        array = getattr(skimage.data, key)()
    else:
        from sklearn.datasets import load_sample_image
        array = load_sample_image(key)
    x = torch.tensor(array).permute(2, 0, 1).float()[None] / 255.0
    h, w = x.shape[-2:]
    scale = PHOTO_SIDE / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                      align_corners=False)
    return x[0].clamp(0, 1)


def _photo_crops(g, names, size):
    out = []
    for name in names:
        img = photo(name)
        h, w = img.shape[-2:]
        side = int(torch.randint(int(PHOTO_SIDE * 0.55), PHOTO_SIDE + 1, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = img[None, :, top:top + side, left:left + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        out.append(crop[0])
    return torch.stack(out).clamp(0, 1)


def image_batch(seed: int, index: int, n: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """``n`` images (n, 3, size, size) and their captions."""
    g = generator(seed, f"image:{index}")
    kind = torch.multinomial(torch.tensor(IMAGE_MIX), n, replacement=True, generator=g)
    # Shapes on plain or graded backgrounds.
    plain = _muted(g, n)[:, :, None, None].expand(n, 3, size, size)
    background = torch.where((torch.rand(n, generator=g) < 0.5)[:, None, None, None], plain, _gradient(g, n, size))
    shape, colour = _pick(g, n, len(SHAPES)), _pick(g, n, len(COLOURS))
    r = _uniform(g, n, size * 0.18, size * 0.34)
    cx, cy = (_uniform(g, n, 0, 1) * (size - 2 * r) + r), (_uniform(g, n, 0, 1) * (size - 2 * r) + r)
    angle = _uniform(g, n, 0, 2 * math.pi)
    alpha = _shape_alpha(shape[:, None, None], cx[:, None, None], cy[:, None, None], r[:, None, None],
                         angle[:, None, None], size)[:, None]
    shapes = background * (1 - alpha) + _named(g, colour)[:, :, None, None] * alpha
    texture = _pick(g, n, len(TEXTURES))
    textures = _textures(g, n, size, texture)
    photo_names = list(PHOTOS)
    which = _pick(g, n, len(photo_names))
    crops = _photo_crops(g, [photo_names[i] for i in which.tolist()], size)
    pixels = torch.where((kind == 0)[:, None, None, None], shapes,
                         torch.where((kind == 1)[:, None, None, None], textures, crops))
    captions = []
    for i in range(n):
        if kind[i] == 0:
            captions.append(f"{list(COLOURS)[colour[i]]} {SHAPES[shape[i]]}")
        elif kind[i] == 1:
            captions.append(TEXTURES[texture[i]])
        else:
            captions.append(f"{photo_names[which[i]]} photo")
    return pixels, captions


def video_batch(seed: int, index: int, n: int, size: int = VIDEO_SIZE,
                frames: int = VIDEO_FRAMES) -> tuple[torch.Tensor, list[str]]:
    """``n`` videos (n, 3, frames, size, size) and their captions."""
    g = generator(seed, f"video:{index}")
    t = torch.arange(frames, dtype=torch.float32)[None, :, None, None]          # (1, T, 1, 1)
    # Background: plain, graded, or low-contrast stripes scrolling at a constant speed.
    plain = _muted(g, n)[:, :, None, None].expand(n, 3, size, size)
    graded = _gradient(g, n, size)
    a, b = _muted(g, n), _muted(g, n)
    theta = _uniform(g, n, 0, math.pi)[:, None, None, None]
    period = _uniform(g, n, 6.0, 12.0)[:, None, None, None]
    speed = _uniform(g, n, -1.5, 1.5)[:, None, None, None]
    x, y = _coords(size)
    u = (x * torch.cos(theta) + y * torch.sin(theta) + speed * t) / period      # (n, T, H, W)
    s = (torch.sin(2 * math.pi * u) * 2).clamp(-1, 1)[:, None] * 0.5 + 0.5      # (n, 1, T, H, W)
    scrolling = a[:, :, None, None, None] * s + b[:, :, None, None, None] * (1 - s)
    bg_kind = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), n, replacement=True, generator=g)
    still = torch.where((bg_kind == 0)[:, None, None, None], plain, graded)[:, :, None].expand(-1, -1, frames, -1, -1)
    background = torch.where((bg_kind == 2)[:, None, None, None, None], scrolling, still)
    # One shape moving in a straight line and rotating.
    names = list(DIRECTIONS)
    moves = torch.tensor([names.index(d) for d in VIDEO_DIRECTIONS])
    shape, colour = _pick(g, n, len(SHAPES)), _pick(g, n, len(COLOURS))
    direction = moves[_pick(g, n, len(moves))]
    r = _uniform(g, n, size * 0.16, size * 0.26)
    step = torch.full((n,), VIDEO_STEP)
    travel = step * (frames - 1)
    vx, vy = torch.tensor(list(DIRECTIONS.values()))[direction].unbind(-1)
    # start so the whole path stays inside the frame
    lo_x = r + torch.where(vx < 0, travel, torch.zeros(n))
    hi_x = size - r - torch.where(vx > 0, travel, torch.zeros(n))
    lo_y = r + torch.where(vy < 0, travel, torch.zeros(n))
    hi_y = size - r - torch.where(vy > 0, travel, torch.zeros(n))
    x0 = lo_x + (hi_x - lo_x) * torch.rand(n, generator=g)
    y0 = lo_y + (hi_y - lo_y) * torch.rand(n, generator=g)
    spin = _uniform(g, n, -0.3, 0.3)
    angle0 = _uniform(g, n, 0, 2 * math.pi)
    view = lambda v: v[:, None, None, None]                                     # noqa: E731
    alpha = _shape_alpha(view(shape), view(x0) + view(vx * step) * t, view(y0) + view(vy * step) * t, view(r),
                         view(angle0) + view(spin) * t, size)[:, None]          # (n, 1, T, H, W)
    pixels = background * (1 - alpha) + _named(g, colour)[:, :, None, None, None] * alpha
    captions = [f"{list(COLOURS)[colour[i]]} {SHAPES[shape[i]]} moving {names[direction[i]]}" for i in range(n)]
    return pixels.contiguous(), captions
