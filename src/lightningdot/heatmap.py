"""An image with a heat map of its region weights laid over it (`lightningdot.explain`)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from lightningdot.explain import RegionWeights

CANVAS = 64  # the heat map's resolution before it is smoothed up to the image's size


def heat(weights: RegionWeights, size: int = CANVAS) -> np.ndarray:
    """(size, size) map in [0, 1]: each region's positive weight spread over its box (regions
    that lowered the score show nothing), scaled so that the hottest point is 1."""
    grid = np.zeros((size, size), dtype=np.float32)
    for (x1, y1, x2, y2), w in zip(weights.boxes, weights.weights, strict=True):
        if w <= 0:
            continue
        c1, r1 = int(np.floor(x1 * size)), int(np.floor(y1 * size))
        c2, r2 = max(int(np.ceil(x2 * size)), c1 + 1), max(int(np.ceil(y2 * size)), r1 + 1)
        grid[r1:r2, c1:c2] += w
    top = grid.max()
    return grid / top if top > 0 else grid


def colour(h: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 from dark blue through red to yellow."""
    r = np.clip(2.0 * h, 0, 1)
    g = np.clip(2.0 * h - 1.0, 0, 1)
    b = np.clip(0.6 - 1.2 * h, 0, 1)
    return (255 * np.stack([r, g, b], axis=-1)).astype(np.uint8)


def overlay(image: Image.Image, weights: RegionWeights, alpha: float = 0.55) -> Image.Image:
    """The image in RGB with the heat map blended over it, hotter regions more opaque."""
    image = image.convert("RGB")
    h = Image.fromarray((255 * heat(weights)).astype(np.uint8)).resize(
        image.size, Image.Resampling.BILINEAR
    )
    h = np.asarray(h, dtype=np.float32) / 255
    mix = (alpha * np.sqrt(h))[..., None]  # sqrt: weak regions still tint the picture
    out = (1 - mix) * np.asarray(image, dtype=np.float32) + mix * colour(h)
    return Image.fromarray(out.round().astype(np.uint8))


def overlay_png(image: Image.Image, weights: RegionWeights) -> bytes:
    buf = io.BytesIO()
    overlay(image, weights).save(buf, "PNG")
    return buf.getvalue()
