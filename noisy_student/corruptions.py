"""Common corruptions at five severities, batched and seeded, on uint8 N x C x H x W.

Severity constants follow ImageNet-C (Hendrycks & Dietterich, 2019) where the corruption
is resolution-free (noise, contrast, brightness); blur radii and pixelation scale with
the image's size; rotation follows MNIST-C's geometric corruptions. Every model is judged
on the same corrupted images: the draws depend only on the seed, severity and corruption.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def gaussian_noise(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    sigma = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    u = _unit(x)
    return _uint8(u + sigma * torch.randn(u.shape, generator=gen))


def shot_noise(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    photons = [60.0, 25.0, 12.0, 5.0, 3.0][severity - 1]
    return _uint8(torch.poisson(_unit(x) * photons, generator=gen) / photons)


def gaussian_blur(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # ImageNet-C's sigmas [1, 2, 3, 4, 6] are for 224 px; a 28 px image gets ~1/4 of them,
    # floored so that severity 1 still visibly blurs.
    sigma = [1.0, 2.0, 3.0, 4.0, 6.0][severity - 1] * max(x.shape[-1] / 112.0, 0.25) + 0.25
    kernel = 2 * math.ceil(3 * sigma) + 1
    return _uint8(TF.gaussian_blur(_unit(x), [kernel, kernel], [sigma, sigma]))


def contrast(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    u = _unit(x)
    mean = u.mean(dim=(1, 2, 3), keepdim=True)
    return _uint8((u - mean) * c + mean)


def brightness(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    delta = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    return _uint8(_unit(x) + delta)


def pixelate(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # ImageNet-C uses 0.6..0.25 at 224 px; on 28-32 px images those block sizes alias
    # (severity 2 came out milder than 1), these grow steadily.
    scale = [0.8, 0.6, 0.45, 0.35, 0.25][severity - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(
        _unit(x), size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area"
    )
    return _uint8(F.interpolate(small, size=(h, w), mode="nearest"))


def rotate(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    """Rotation by a per-image angle of the severity's size and random sign (zero fill)."""
    degrees = [15.0, 30.0, 45.0, 60.0, 75.0][severity - 1]
    n = len(x)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.deg2rad(degrees * sign)
    cos, sin = theta.cos(), theta.sin()
    affine = torch.stack(
        [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)],
        1,
    )
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return _uint8(F.grid_sample(_unit(x), grid, mode="bilinear", align_corners=False))


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "rotate": rotate,
}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """The same inputs, name, severity and seed always give the same images."""
    # crc32, not hash(): Python salts str hashes per process
    gen = torch.Generator().manual_seed(
        seed * 1000 + zlib.crc32(name.encode()) % 997 * 5 + severity
    )
    return CORRUPTIONS[name](images, severity, gen)
