"""Input noise and ordinary augmentation, on batches of uint8 images (N x C x H x W).

RandAugment is timm's: every image draws its own operations and magnitudes (timm picks
them per call, and we call it once per image), which is what the paper's student sees.
Crop and flip are vectorised with per-image offsets, so they cost nothing noticeable.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from noisy_student.errors import UserError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]: the only normalisation models here ever see."""
    return images.float().div_(127.5).sub_(1.0)


# timm's grammar: rand-m9-n2-mstd0.5-mmax10-inc1-p0.5-t<choices>; timm skips parts it cannot
# read, so a typo would silently fall back to defaults.
_RAND_PART = re.compile(r"^((mstd|mmax|inc|m|n|p)\d+(\.\d+)?|t\w+)$")


def check_rand_augment(spec: str) -> None:
    parts = spec.split("-")
    bad = [p for p in parts[1:] if not _RAND_PART.match(p)]
    if parts[0] != "rand" or bad:
        what = f"part {bad[0]!r}" if bad else "it must start with 'rand'"
        raise ValueError(
            f"RandAugment string {spec!r}: {what} is not timm's rand-m9-n2-mstd0.5 grammar"
        )


def rand_augment(spec: str, height: int, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch function applying timm's RandAugment (e.g. "rand-n2-m9-mstd0.5") per image.

    M is on timm's 0-10 scale; the paper's M=27 of 30 on TensorFlow's scale is m9.
    """
    fill = (128,) * channels
    try:
        check_rand_augment(spec)
        op = rand_augment_transform(spec, {"translate_const": int(height * 0.45), "img_mean": fill})
    except Exception as e:  # timm raises bare AssertionError/ValueError on a bad string
        raise UserError(f"rand_augment: cannot parse {spec!r}: {e}") from None

    def apply(images: torch.Tensor) -> torch.Tensor:
        arr = images.permute(0, 2, 3, 1).numpy()
        out = np.empty_like(arr)
        for i, a in enumerate(arr):
            img = Image.fromarray(a[..., 0] if channels == 1 else a)
            res = np.asarray(op(img))
            out[i] = res[..., None] if res.ndim == 2 else res
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    return apply


def crop_and_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random translation by up to `padding` pixels (zero fill) and horizontal flips,
    drawn independently for every image in one gather."""
    n, c, h, w = x.shape
    if padding == 0 and not flip:
        return x
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    rows = torch.arange(h).unsqueeze(0) + dy
    cols = torch.arange(w).unsqueeze(0) + dx
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(mirrored.unsqueeze(1), cols.flip(1), cols)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(c).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
