"""Generated photo-like scenes: RGB images of varied sizes with real texture, for the photo
tests (tests/test_photos.py) and the photo benchmark (benchmarks/photo_students.py), where
no photo set can be downloaded.

Six classes in three pairs that share a palette and differ in one feature (dawn / dusk: the
sun's height and the sky's hue; forest / meadow: tree trunks or a sky band; sea / lake:
waves or calm water with a shore), under nuisances that keep a classifier honest: each
scene's own brightness and contrast, an occluding shape, sensor noise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLASSES = ("dawn", "forest", "sea", "dusk", "meadow", "lake")


def _sky(cls: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """dawn: warm, brighter towards a low sun; dusk: the sun lower, the sky above it cooler."""
    cx = rng.uniform(0.2, 0.8)
    cy = rng.uniform(0.5, 0.9) if cls == "dawn" else rng.uniform(0.75, 1.05)
    glow = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) * rng.uniform(4, 10))
    if cls == "dawn":
        return np.stack([200 + 55 * glow, 90 + 150 * glow * (1 - y), 40 + 60 * y], -1)
    return np.stack([170 + 80 * glow, 70 + 130 * glow * (1 - y), 70 + 50 * (1 - y)], -1)


def _green(cls: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """forest: dark green with tree trunks; meadow: lighter grass under a band of sky."""
    img = np.stack([30 + 20 * y, 90 + 60 * np.sin(x * rng.uniform(8, 20)) ** 2, 30 + 0 * x], -1)
    if cls == "forest":
        for left in rng.uniform(0, 1, 5):
            trunk = np.abs(x - left) < rng.uniform(0.01, 0.04)
            img[trunk] = (90, 60, 30)
        return img
    img[..., 1] += 40
    sky = y < rng.uniform(0.15, 0.35)
    img[sky] = (150, 190, 230)
    return img


def _water(
    cls: str, xx: np.ndarray, yy: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """sea: waves under a pale sky; lake: calm water with a darker shore line."""
    horizon = rng.uniform(0.25, 0.5)
    amplitude = 20 if cls == "sea" else 4
    waves = np.sin(xx / rng.uniform(4, 9) + 3 * np.sin(yy / 5)) * amplitude
    water = np.stack([20 + 0 * y, 70 + waves, 150 + waves + 60 * y], -1)
    sky = np.stack([170 + 0 * y, 200 + 0 * y, 235 - 30 * y], -1)
    img = np.where((y < horizon)[..., None], sky, water)
    if cls == "lake":
        shore = np.abs(y - horizon) < rng.uniform(0.02, 0.06)
        img[shore] = (70, 80, 50)
    return img


def photo(cls: str, rng: np.random.Generator, hard: bool = False) -> Image.Image:
    """A scene of class `cls` at a random size and aspect ratio. `hard` adds the nuisances
    (its own brightness and contrast, an occluding shape) that make the pairs confusable."""
    w, h = (int(v) for v in rng.integers(70, 260, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = yy / h, xx / w
    if cls in ("dawn", "dusk"):
        img = _sky(cls, x, y, rng)
    elif cls in ("forest", "meadow"):
        img = _green(cls, x, y, rng)
    elif cls in ("sea", "lake"):
        img = _water(cls, xx, yy, y, rng)
    else:
        raise ValueError(f"unknown scene class {cls!r} (known: {', '.join(CLASSES)})")
    if hard:  # its own exposure, contrast and colour cast, and something in front of it
        mean = img.mean()
        img = (img - mean) * rng.uniform(0.5, 1.3) + mean * rng.uniform(0.6, 1.3)
        img = img * rng.uniform(0.75, 1.25, 3)
        cy, cx = rng.uniform(0, 1, 2)
        ry, rx = rng.uniform(0.1, 0.35, 2)
        blob = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        img[blob] = rng.uniform(0, 255, 3)
    img = img + rng.normal(0, 10 if hard else 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
