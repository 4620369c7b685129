"""Convolutions on feature maps smaller than their kernel, computed without the padding.

At 28 px an ImageNet network downsamples 32x: its last stage sees 1x1 maps, and the
stride-2 convolution before it turns 2x2 maps into 1x1. A 3x3 convolution padded by 1 on
a 1x1 map multiplies eight of its nine taps by padding zeros, and on 2 CPU cores the
backward pass of such a convolution is slower still than that (oneDNN's kernels are made
for larger maps): resnet10t's 512-channel convolutions on 1x1 maps took a third of its
training step (benchmarks.small_maps measures the step both ways).

`SmallMapConv2d` computes the same convolution from the taps that can reach a real pixel
of the input it is given: the kernel cropped to them, the padding reduced to match, and a
matrix product where one output pixel sees the whole input. The taps left out only ever
multiply zeros, so the output is the convolution's, and so is every gradient (a left-out
tap's gradient is zero either way; weight decay and momentum see the same parameter).
Inputs the kernel covers in full take `nn.Conv2d`'s own path, unchanged. The weights keep
their shape and names: checkpoints, the EMA copy and DistributedDataParallel are as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@lru_cache(maxsize=1024)
def _taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The first and one past the last kernel tap that reaches a real pixel of an input
    `size` long, over every output position."""
    out = (size + 2 * padding - kernel) // stride + 1
    used = [
        a for a in range(kernel) if any(0 <= i * stride - padding + a < size for i in range(out))
    ]
    return used[0], used[-1] + 1


@lru_cache(maxsize=1024)
def window(
    h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The taps (rows a0:a1, columns b0:b1) that reach a real pixel of an h x w input, or
    None where cropping the kernel to them would not give the same output size."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return None  # an input too small for the convolution: nn.Conv2d says so
    a0, a1 = _taps(h, kh, sh, ph)
    b0, b1 = _taps(w, kw, sw, pw)
    # the cropped kernel with the padding reduced by a0 (b0) must give as many outputs
    rows = (h + 2 * (ph - a0) - (a1 - a0)) // sh == (h + 2 * ph - kh) // sh
    cols = (w + 2 * (pw - b0) - (b1 - b0)) // sw == (w + 2 * pw - kw) // sw
    return (a0, a1, b0, b1) if rows and cols else None


class SmallMapConv2d(nn.Conv2d):
    """`nn.Conv2d` that leaves out the kernel taps which only see padding (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        crop = window(h, w, self.kernel_size, self.stride, self.padding)
        if crop is None:
            return super().forward(x)
        a0, a1, b0, b1 = crop
        padding = (self.padding[0] - a0, self.padding[1] - b0)
        if padding == (0, 0) and (a1 - a0, b1 - b0) == (h, w) and self.groups == 1:
            # one output pixel that sees the whole input: a matrix product
            weight = self.weight[:, :, a0:a1, b0:b1].flatten(1)
            return F.linear(x.flatten(1), weight, self.bias).view(x.shape[0], -1, 1, 1)
        if (a1 - a0, b1 - b0) == self.kernel_size:
            return super().forward(x)  # every tap reaches the input
        weight = self.weight[:, :, a0:a1, b0:b1]
        return F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)


_plain = False


@contextmanager
def plain_convolutions() -> Iterator[None]:
    """Networks built inside this block keep nn.Conv2d throughout (`use_small_map_convs`
    changes nothing): the comparison benchmarks.small_maps makes."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def use_small_map_convs(model: nn.Module) -> int:
    """Make the plain convolutions of `model` `SmallMapConv2d`, in place (the same weights
    and state dict); returns how many. Subclasses of nn.Conv2d (timm's dynamic "same"
    padding, for one) and convolutions with dilation, string padding or a padding mode
    other than zeros are left as they are; so is every one inside `plain_convolutions`."""
    n = 0
    if _plain:
        return n
    for module in model.modules():
        if (
            type(module) is nn.Conv2d
            and module.dilation == (1, 1)
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        ):
            module.__class__ = SmallMapConv2d
            n += 1
    return n
