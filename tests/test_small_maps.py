"""Convolutions on maps smaller than their kernels (noisy_student/training/small_maps.py):
the same outputs and gradients as nn.Conv2d, from fewer taps."""

import copy

import pytest
import timm
import torch
from torch import nn

from noisy_student.training import models
from noisy_student.training.small_maps import SmallMapConv2d, use_small_map_convs, window


def _pair(conv: nn.Conv2d) -> tuple[nn.Conv2d, nn.Conv2d]:
    fast = copy.deepcopy(conv)
    assert use_small_map_convs(fast) == 1
    return conv, fast


def _grads(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = module(x)
    (out * target).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad()
    return [out.detach(), *grads]


@pytest.mark.parametrize(
    "size, kernel, stride, padding, groups, taps",
    [
        ((1, 1), 3, 1, 1, 1, (1, 2, 1, 2)),  # resnet's last stage at 28 px: the centre tap
        ((2, 2), 3, 2, 1, 1, (1, 3, 1, 3)),  # the stride-2 convolution into it: 2x2 taps
        ((1, 1), 1, 1, 0, 1, (0, 1, 0, 1)),  # a 1x1 convolution on a 1x1 map: a product
        ((2, 2), 5, 1, 2, 1, (1, 4, 1, 4)),  # 5x5 on 2x2: the inner 3x3 taps
        ((1, 2), 3, 1, 1, 1, (1, 2, 0, 3)),  # not square
        ((1, 1), 3, 1, 1, 8, (1, 2, 1, 2)),  # depthwise
        ((2, 3), 5, 2, 2, 2, (2, 4, 0, 5)),  # grouped, strided, 5x5
        ((7, 7), 3, 1, 1, 1, (0, 3, 0, 3)),  # a map the kernel covers: nn.Conv2d's own path
        ((1, 1), 3, 2, 1, 1, (1, 2, 1, 2)),  # strided on a single pixel
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_same_outputs_and_gradients_as_conv2d(size, kernel, stride, padding, groups, taps, bias):
    torch.manual_seed(0)
    h, w = size
    assert window(h, w, (kernel, kernel), (stride, stride), (padding, padding)) == taps
    plain, fast = _pair(nn.Conv2d(8, 16, kernel, stride, padding, groups=groups, bias=bias))
    x = torch.randn(4, 8, h, w)
    out = plain(x)
    target = torch.randn_like(out)
    for a, b in zip(_grads(plain, x, target), _grads(fast, x, target), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_left_out_taps_get_zero_gradient_and_keep_their_shape():
    plain, fast = _pair(nn.Conv2d(4, 4, 3, padding=1, bias=False))
    fast(torch.randn(2, 4, 1, 1)).sum().backward()
    assert fast.weight.grad.shape == (4, 4, 3, 3)
    assert fast.weight.grad[:, :, 1, 1].abs().sum() > 0
    ring = fast.weight.grad.clone()
    ring[:, :, 1, 1] = 0
    assert ring.abs().sum() == 0


def test_only_plain_zero_padded_convolutions_change():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        timm.layers.Conv2dSame(4, 4, 3),
    )
    assert use_small_map_convs(net) == 1
    assert [type(m).__name__ for m in net] == [
        "SmallMapConv2d",
        "Conv2d",
        "Conv2d",
        "Conv2d",
        "Conv2dSame",
    ]


@pytest.mark.parametrize("stem", ["imagenet", "half"])
def test_a_created_network_computes_timms(stem):
    """The network `create` builds at 28 px gives timm's network's outputs and gradients
    (same weights), keeps its state dict and survives a deep copy (the EMA's)."""
    torch.manual_seed(0)
    net = models.create("resnet10t", 10, 1, stem=stem)
    plain = models.apply_stem(timm.create_model("resnet10t", num_classes=10, in_chans=1), "", stem)
    assert plain.load_state_dict(net.state_dict()) is not None
    assert list(plain.state_dict()) == list(net.state_dict())
    assert any(isinstance(m, SmallMapConv2d) for m in copy.deepcopy(net).modules())
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    target = torch.randn(6, 10)
    net.train(), plain.train()
    for a, b in zip(_grads(plain, x, target), _grads(net, x, target), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    net.eval(), plain.eval()
    torch.testing.assert_close(net(x), plain(x), rtol=1e-4, atol=1e-5)


def test_plain_convolutions_builds_networks_as_before():
    from noisy_student.training.small_maps import plain_convolutions

    with plain_convolutions():
        inside = models.create("resnet10t", 10, 1)
    assert not any(isinstance(m, SmallMapConv2d) for m in inside.modules())
    assert any(isinstance(m, SmallMapConv2d) for m in models.create("resnet10t", 10, 1).modules())


def test_the_benchmarks_table_gives_each_rounds_ratio():
    from benchmarks import precision, small_maps

    rates = {"training loop": {"plain": [400.0, 420.0], "small maps": [600.0, 630.0]}}
    result = {
        "date": "2026-12-07T09:00:00+00:00",
        "hardware": {"cpu": "AMD EPYC", "cpu_cores": 2, "torch_threads": 2,
                     "load_average_1min": 1.9, "torch": "2.x"},
        "student_model": "resnet10t", "student_batch": 128, "teacher_model": "resnet10t",
        "inference_batch": 1024, "unlabelled_images": 16384, "rounds": 2, "rates": rates,
        "ratios": {w: precision.ratios(by, "plain", "small maps") for w, by in rates.items()},
    }  # fmt: skip
    text = small_maps.markdown(result, "uv run python -m benchmarks.small_maps")
    assert "| training loop | 410 | 615 | 1.50, 1.50 | **1.50** |" in text
    assert "2 round(s), fp32" in text and "16,384" in text
