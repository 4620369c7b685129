"""Input noise and ordinary augmentation on batches of uint8 images (N x C x H x W), on
whatever device the batch lives on.

RandAugment follows the official Noisy Student code (google-research/noisystudent,
randaugment.py): its operations (Cutout among them, as its `--cutout_op` default has it),
each image drawing N of them uniformly, and the magnitude M on that code's scale, where 10
is an operation's nominal maximum and larger values extrapolate (the paper's largest
students use M=27; timm clips at 10). Every image draws its own operations, magnitudes,
signs and Cutout centres. Images are grouped by the operation they drew, so each layer
costs one batched call per operation (and one `grid_sample` for all geometric ones), never
a Python loop over images.

That code has two sets of constants, and so has this module (`RandAugment.for_image`):
photos (ImageNet at 224 px) translate by up to 100 px and cut out squares of up to 80 px
at M=10; small images (its CIFAR/SVHN path, 32 px) by up to 1/8 of the side and squares
of 1/4 of the side. Here both are fractions of the image, so they hold at any size:
images of at most SMALL_IMAGE pixels a side get the small-image settings, larger ones the
photos'. Small images also get their own border where a transform uncovers or cuts out
pixels, not the official grey: on Fashion-MNIST's black backgrounds grey borders made 70%
of the noised images unlike any clean one. A 224-px photo gets the paper's noise exactly.
Where the official code's mapping of M weakens an operation as M grows (posterize,
solarize), `levels="increasing"` makes it stronger instead, as timm's variants do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

NOMINAL_LEVEL = 10.0  # the magnitude at which every operation reaches its nominal maximum
MAX_MAGNITUDE = 30.0
GREY = 128  # the official code's fill where an operation uncovers or cuts out pixels
SMALL_IMAGE = 64  # px, the shorter side up to which an image gets the small-image settings
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")

Fill = Literal["border", "mean"] | int
Levels = Literal["official", "increasing"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]: the only normalisation models here ever see."""
    return images.float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class RandAugment:
    """RandAugment's settings for one image size. The defaults are the official code's for
    photos; `for_image` fills the settings left as None by the image's size."""

    num_ops: int = 2  # N
    magnitude: float = 9.0  # M
    magnitude_std: float = 0.0  # per-image Gaussian jitter of M
    translate: float = 100 / 224  # the largest shift at M=10, as a fraction of the side
    cutout: float = 80 / 224  # Cutout's square at M=10, a fraction of the shorter side; 0: none
    fill: Fill = GREY  # what uncovered and cut-out pixels get: "border", "mean" or a value
    invert: bool = True  # whether invert is among the operations drawn
    levels: Levels = "official"  # how M maps to solarize, posterize and the enhancements

    @classmethod
    def for_image(cls, height: int, width: int, **given: float | str | bool | None) -> RandAugment:
        """The settings for images of this size: each one given (not None) as it is, the
        others the official photo settings, or the small-image ones up to SMALL_IMAGE px."""
        base = cls()
        if min(height, width) <= SMALL_IMAGE:
            base = SMALL_IMAGES
        return replace(base, **{k: v for k, v in given.items() if v is not None})

    def ops(self) -> tuple[str, ...]:
        """The operations an image draws from, pixel operations first, geometric ones last."""
        pixel = tuple(op for op in PIXEL_OPS if op != "invert" or self.invert)
        return (*pixel, *(("cutout",) if self.cutout > 0 else ()), *GEOMETRIC_OPS)


# The official small-image settings (translate and Cutout at 1/8 and 1/4 of the side), but
# for the fill: the image's own border rather than grey (docs/algorithm.md, "The noise,
# measured", has what each choice measured on 28-px Fashion-MNIST).
SMALL_IMAGES = RandAugment(translate=1 / 8, cutout=1 / 4, fill="border")


# ---------------------------------------------------------------- pixel operations
# Each takes float images in [0, 255] (n x C x H x W) and one argument per image (n,), and
# returns images in [0, 255] with integer values. `_ARGUMENTS` maps a level (M / 10) and a
# sign (+1 or -1) to that argument, as the official code's `level_to_arg` does.


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, above 1 extrapolates."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp_(0, 255).round_()


def auto_contrast(x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scaled = ((x - lo) * (255.0 / (hi - lo).clamp(min=1.0))).round_()
    return torch.where(hi > lo, scaled, x)


def equalize(x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel, from batched histograms."""
    n, c, h, w = x.shape
    values = x.long().flatten(2)  # n, C, HW
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, values, torch.ones_like(values))
    # the count of the brightest value present does not widen the spread, as in PIL
    top = hist.gather(2, values.amax(2, keepdim=True))
    step = (h * w - top) // 255
    below = hist.cumsum(2) - hist  # pixels strictly darker than each value
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    out = lut.gather(2, values).view(n, c, h, w).to(x.dtype)
    return torch.where(step.view(n, c, 1, 1) > 0, out, x)


def invert(x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def posterize(x: torch.Tensor, dropped_bits: torch.Tensor) -> torch.Tensor:
    step = torch.pow(2.0, dropped_bits).view(-1, 1, 1, 1)
    return torch.div(x, step, rounding_mode="floor") * step


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above the threshold."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255.0 - x, x)


def solarize_add(x: torch.Tensor, addition: torch.Tensor) -> torch.Tensor:
    added = (x + addition.view(-1, 1, 1, 1)).clamp(0, 255)
    return torch.where(x < 128, added, x)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(_luma(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True).round()
    return _blend(mean.expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter of the image (the border pixels stay as they are)."""
    c = x.shape[1]
    kernel = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device
    ).div_(13.0)
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round_()
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


PIXEL_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "auto_contrast": auto_contrast,
    "equalize": equalize,
    "invert": invert,
    "posterize": posterize,
    "solarize": solarize,
    "solarize_add": solarize_add,
    "color": color,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
}
# Geometric operations are one affine map each; all of them in a layer share one grid_sample.
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_ENHANCEMENTS = ("color", "contrast", "brightness", "sharpness")

Argument = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (level, sign) -> argument


def _official_arguments() -> dict[str, Argument]:
    """randaugment.py's `level_to_arg`: posterize keeps int(4 M/10) bits and solarize
    inverts from int(256 M/10) up, so both weaken as M grows (at M=9: 3 bits kept, pixels
    >= 230 inverted); every enhancement factor is 0.1 + 1.8 M/10 (1.72 at M=9: always
    more, never less)."""
    bits_kept = lambda level: (level * 4).floor().clamp(0, 8)  # noqa: E731
    return {
        "posterize": lambda level, sign: 8 - bits_kept(level),
        "solarize": lambda level, sign: (level * 256).floor(),
        **{op: (lambda level, sign: level * 1.8 + 0.1) for op in _ENHANCEMENTS},
    }


def _increasing_arguments() -> dict[str, Argument]:
    """Every operation stronger as M grows (timm's "increasing" variants): posterize drops
    round(4 M/10) of 8 bits, solarize's threshold falls from 256 (no change) to 0 at M=10,
    enhancement factors spread both ways around 1 (1 +- 0.09 M), with a random sign."""
    return {
        "posterize": lambda level, sign: (level * 4).round().clamp(0, 7),
        "solarize": lambda level, sign: 256.0 * (1.0 - level),
        **{
            op: (lambda level, sign: (1.0 + sign * level * 0.9).clamp(min=0.0))
            for op in _ENHANCEMENTS
        },
    }


_ARGUMENTS: dict[str, dict[str, Argument]] = {
    "official": _official_arguments(),
    "increasing": _increasing_arguments(),
}
_SHARED: dict[str, Argument] = {
    "solarize_add": lambda level, sign: (level * 110.0).floor(),
}


def argument(op: str, levels: Levels, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The argument a pixel operation gets at these per-image levels and signs."""
    mapping = _ARGUMENTS[levels].get(op) or _SHARED.get(op)
    return mapping(level, sign) if mapping is not None else level


# ---------------------------------------------------------------- fill, geometry, Cutout


def fill_values(x: torch.Tensor, fill: Fill) -> torch.Tensor:
    """Per image and channel (n x C x 1 x 1, float), what uncovered and cut-out pixels get:
    the mean of the image's outermost pixels ("border"), of all its pixels ("mean"), or a
    constant. Computed on the clean images, before any noise moves them."""
    n, c, h, w = x.shape
    if fill == "border":
        x = x.float()
        frame = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
        return frame.mean(-1).round().view(n, c, 1, 1)
    if fill == "mean":
        return x.float().mean(dim=(2, 3), keepdim=True).round()
    return torch.full((n, c, 1, 1), float(fill), device=x.device)


def _affine(
    x: torch.Tensor,
    op: torch.Tensor,
    level: torch.Tensor,
    sign: torch.Tensor,
    fill: torch.Tensor,
    translate: float,
) -> torch.Tensor:
    """One rotation, shear or translation per image (`op` indexes GEOMETRIC_OPS), about the
    centre, in grid_sample's normalised coordinates (a side is 2 long); uncovered pixels get
    the image's fill."""
    h, w = x.shape[-2:]
    amount = sign * level
    angle = torch.where(op == 0, amount * math.radians(30.0), 0.0)
    shear_x = torch.where(op == 1, amount * 0.3, 0.0)
    shear_y = torch.where(op == 2, amount * 0.3, 0.0)
    shift_x = torch.where(op == 3, amount * 2 * translate, 0.0)
    shift_y = torch.where(op == 4, amount * 2 * translate, 0.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [
            torch.stack([cos, (shear_x - sin) * (h / w), shift_x], 1),
            torch.stack([(sin + shear_y) * (w / h), cos, shift_y], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved + fill


def cut_out(
    x: torch.Tensor, side: torch.Tensor, centre: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017), as the official code draws it: per image a square of
    `side` pixels (n,) around a centre anywhere in the image (`centre`, n x 2, fractions of
    the height and width), clipped to the image, set to the fill."""
    h, w = x.shape[-2:]
    half = (side / 2).round().view(-1, 1)
    cy = (centre[:, :1] * h).floor()
    cx = (centre[:, 1:] * w).floor()
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    inside_rows = (rows >= cy - half) & (rows < cy + half)  # n x h
    inside_cols = (cols >= cx - half) & (cols < cx + half)  # n x w
    mask = (inside_rows.unsqueeze(2) & inside_cols.unsqueeze(1)).unsqueeze(1)
    return torch.where(mask, fill, x)


# ---------------------------------------------------------------- RandAugment


@dataclass(frozen=True)
class Draws:
    """Per image and layer: the operation (an index into `RandAugment.ops()`), its level
    (M / 10, with the optional jitter), its sign, and where a Cutout would be centred."""

    ops: torch.Tensor  # n x N, int64
    levels: torch.Tensor  # n x N
    signs: torch.Tensor  # n x N, +1 or -1
    centres: torch.Tensor  # n x N x 2, in [0, 1)


def draw(n: int, settings: RandAugment, generator: torch.Generator) -> Draws:
    num_ops = settings.num_ops
    ops = torch.randint(len(settings.ops()), (n, num_ops), generator=generator)
    mags = torch.full((n, num_ops), float(settings.magnitude))
    if settings.magnitude_std > 0:
        mags += settings.magnitude_std * torch.randn(n, num_ops, generator=generator)
    levels = mags.clamp_(0.0, MAX_MAGNITUDE) / NOMINAL_LEVEL
    signs = torch.randint(2, (n, num_ops), generator=generator).float() * 2 - 1
    centres = torch.rand(n, num_ops, 2, generator=generator)
    return Draws(ops, levels, signs, centres)


def apply_op(
    name: str,
    x: torch.Tensor,
    level: torch.Tensor,
    sign: torch.Tensor,
    fill: torch.Tensor,
    settings: RandAugment,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """One operation on float images in [0, 255], every image at its own level and sign."""
    if name in PIXEL_OPS:
        return PIXEL_OPS[name](x, argument(name, settings.levels, level, sign))
    if name == "cutout":
        side = level * settings.cutout * min(x.shape[-2:])
        if centre is None:
            centre = torch.full((len(x), 2), 0.5, device=x.device)
        return cut_out(x, side, centre, fill)
    op = torch.full_like(level, GEOMETRIC_OPS.index(name), dtype=torch.long)
    return _affine(x, op, level, sign, fill, settings.translate)


def rand_augment(
    images: torch.Tensor,
    settings: RandAugment,
    generator: torch.Generator,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """RandAugment with independent draws for every image; uint8 in, uint8 out. `fill`
    (n x C x 1 x 1) is what uncovered pixels get, by default `fill_values` of `images`.

    `generator` is a CPU generator (the draws are tiny); the images may be on any device.
    """
    n = len(images)
    if n == 0 or settings.num_ops == 0:
        return images
    names = settings.ops()
    d = draw(n, settings, generator)
    dev = images.device
    ops, levels, signs, centres = (t.to(dev) for t in (d.ops, d.levels, d.signs, d.centres))
    fill = (fill_values(images, settings.fill) if fill is None else fill).to(dev)
    x = images.float()
    n_single = len(names) - len(GEOMETRIC_OPS)  # the operations applied one group each
    for layer in range(settings.num_ops):
        op = ops[:, layer]
        # sort the batch by operation so that each one gets a contiguous slice
        order = torch.argsort(op)
        counts = torch.bincount(op, minlength=len(names)).tolist()  # the one sync per layer
        xs, lv, sg, fl = x[order], levels[order, layer], signs[order, layer], fill[order]
        parts, start = [], 0
        for name, count in zip(names[:n_single], counts[:n_single], strict=True):
            if count:
                sl = slice(start, start + count)
                parts.append(
                    apply_op(
                        name, xs[sl], lv[sl], sg[sl], fl[sl], settings, centres[order[sl], layer]
                    )
                )
            start += count
        if start < n:
            geometric = op[order][start:] - n_single
            parts.append(
                _affine(
                    xs[start:], geometric, lv[start:], sg[start:], fl[start:], settings.translate
                )
            )
        x = torch.empty_like(x).index_copy_(0, order, torch.cat(parts))
    return x.clamp_(0, 255).to(torch.uint8)


def cutout_every_image(
    x: torch.Tensor, fraction: float, fill: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A square of `fraction` of the shorter side cut out of every image at a random centre,
    as the official small-image code does after RandAugment (half the side there)."""
    if fraction <= 0 or len(x) == 0:
        return x
    centre = torch.rand(len(x), 2, generator=generator).to(x.device)
    side = torch.full((len(x),), fraction * min(x.shape[-2:]), device=x.device)
    return cut_out(x.float(), side, centre, fill.to(x.device)).to(x.dtype)


def grid(rows: list[torch.Tensor], scale: int = 1, gap: int = 2) -> torch.Tensor:
    """Batches of uint8 images (each n x C x H x W) laid out as one picture (C x H' x W'):
    a row per batch, its images side by side, `gap` black pixels between them, every pixel
    repeated `scale` times each way."""
    n, c, h, w = rows[0].shape
    out = torch.zeros(c, len(rows) * (h + gap) - gap, n * (w + gap) - gap, dtype=torch.uint8)
    for i, batch in enumerate(rows):
        for j, image in enumerate(batch):
            out[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    return out.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def crop_and_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random translation by up to `padding` pixels (zero fill) and horizontal flips,
    drawn independently for every image in one gather. `generator` is a CPU generator."""
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
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
