"""Input noise and ordinary augmentation on batches of uint8 images (N x C x H x W), on
whatever device the batch lives on.

RandAugment follows the official Noisy Student code (google-research/noisystudent,
randaugment.py): the same 15 operations, each image draws N of them uniformly, and the
magnitude M is on that code's scale, where 10 is an operation's nominal maximum (30 degrees
of rotation, 0.3 shear, 45% translation, enhancement factors 0.1..1.9) and larger values
extrapolate: the paper's largest students use M=27 (`_MAX_LEVEL = 10` there; timm clips at 10).
Every image draws its own operations, magnitudes and signs. Images are grouped by the
operation they drew, so each layer costs one batched call per operation (and one
`grid_sample` for all geometric ones), never a Python loop over images.

Two choices differ from the TensorFlow code, both so that a larger M is always stronger noise:
posterize and solarize grow with M (there, posterize keeps `int(M/10*4)` bits and solarize's
threshold rises with M), and enhancement factors spread both ways around 1 (1 +- 0.09 M) with
a random sign, like the geometric operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NOMINAL_LEVEL = 10.0  # the magnitude at which every operation reaches its nominal maximum
MAX_MAGNITUDE = 30.0
FILL = 128.0  # grey fill where a geometric operation uncovers the border, as in the paper's code
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]: the only normalisation models here ever see."""
    return images.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------- pixel operations
# Each takes float images in [0, 255] (n x C x H x W), the per-image level (magnitude / 10)
# and sign (+1 or -1), and returns images in [0, 255] with integer values.


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, above 1 extrapolates."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp_(0, 255).round_()


def _factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (1.0 + sign * level * 0.9).clamp(min=0.0)


def auto_contrast(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scaled = ((x - lo) * (255.0 / (hi - lo).clamp(min=1.0))).round_()
    return torch.where(hi > lo, scaled, x)


def equalize(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
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


def invert(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def posterize(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Drop the low 4 bits at M=10 (the official code keeps 4), up to 7 of 8 bits."""
    step = torch.pow(2.0, (level * 4).round().clamp(0, 7)).view(-1, 1, 1, 1)
    return torch.div(x, step, rounding_mode="floor") * step


def solarize(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Invert pixels at or above a threshold that falls from 256 (no change) to 0 at M=10."""
    threshold = (256.0 * (1.0 - level)).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255.0 - x, x)


def solarize_add(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    added = (x + (level * 110.0).round().view(-1, 1, 1, 1)).clamp(0, 255)
    return torch.where(x < 128, added, x)


def color(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(_luma(x).expand_as(x), x, _factor(level, sign))


def contrast(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True).round()
    return _blend(mean.expand_as(x), x, _factor(level, sign))


def brightness(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, _factor(level, sign))


def sharpness(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter of the image (the border pixels stay as they are)."""
    c = x.shape[1]
    kernel = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device
    ).div_(13.0)
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round_()
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, _factor(level, sign))


PIXEL_OPS = {
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
OPS = (*PIXEL_OPS, *GEOMETRIC_OPS)


def _affine(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor):
    """One rotation, shear or translation per image (`op` indexes GEOMETRIC_OPS), about the
    centre, in grid_sample's normalised coordinates; uncovered pixels get the grey FILL."""
    h, w = x.shape[-2:]
    amount = sign * level
    angle = torch.where(op == 0, amount * math.radians(30.0), 0.0)
    shear_x = torch.where(op == 1, amount * 0.3, 0.0)
    shear_y = torch.where(op == 2, amount * 0.3, 0.0)
    # 45% of the side at M=10, as timm's TranslateRel and the official 100 px at 224 px
    shift_x = torch.where(op == 3, amount * 0.9, 0.0)
    shift_y = torch.where(op == 4, amount * 0.9, 0.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [
            torch.stack([cos, (shear_x - sin) * (h / w), shift_x], 1),
            torch.stack([(sin + shear_y) * (w / h), cos, shift_y], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x - FILL, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved + FILL


def draw(
    n: int,
    num_ops: int,
    magnitude: float,
    magnitude_std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and layer: the operation (index into OPS), its level (magnitude / 10, with
    optional Gaussian jitter) and its sign."""
    ops = torch.randint(len(OPS), (n, num_ops), generator=generator)
    mags = torch.full((n, num_ops), float(magnitude))
    if magnitude_std > 0:
        mags += magnitude_std * torch.randn(n, num_ops, generator=generator)
    levels = mags.clamp_(0.0, MAX_MAGNITUDE) / NOMINAL_LEVEL
    signs = torch.randint(2, (n, num_ops), generator=generator).float() * 2 - 1
    return ops, levels, signs


def rand_augment(
    images: torch.Tensor,
    num_ops: int,
    magnitude: float,
    generator: torch.Generator,
    magnitude_std: float = 0.0,
) -> torch.Tensor:
    """RandAugment with independent draws for every image; uint8 in, uint8 out.

    `generator` is a CPU generator (the draws are tiny); the images may be on any device.
    """
    n = len(images)
    if n == 0 or num_ops == 0:
        return images
    ops, levels, signs = draw(n, num_ops, magnitude, magnitude_std, generator)
    dev = images.device
    ops, levels, signs = ops.to(dev), levels.to(dev), signs.to(dev)
    x = images.float()
    n_pixel = len(PIXEL_OPS)
    for layer in range(num_ops):
        op = ops[:, layer]
        # sort the batch by operation so that each one gets a contiguous slice
        order = torch.argsort(op)
        counts = torch.bincount(op, minlength=len(OPS)).tolist()  # the one sync per layer
        xs, lv, sg, op_sorted = x[order], levels[order, layer], signs[order, layer], op[order]
        parts, start = [], 0
        for fn, count in zip(PIXEL_OPS.values(), counts[:n_pixel], strict=True):
            if count:
                sl = slice(start, start + count)
                parts.append(fn(xs[sl], lv[sl], sg[sl]))
            start += count
        if start < n:
            parts.append(_affine(xs[start:], op_sorted[start:] - n_pixel, lv[start:], sg[start:]))
        x = torch.empty_like(x).index_copy_(0, order, torch.cat(parts))
    return x.clamp_(0, 255).to(torch.uint8)


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
