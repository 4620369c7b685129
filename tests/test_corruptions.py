"""Common corruptions: seeded, shape-preserving, and harsher at every severity."""

from __future__ import annotations

import pytest
import torch

from noisy_student import dataset, storage
from noisy_student.corruptions import CORRUPTIONS, corrupt

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RANDOM = {"gaussian_noise", "shot_noise", "rotate"}  # the ones that draw from the generator


@pytest.fixture(scope="module")
def test_images(tiny_dataset) -> torch.Tensor:
    """64 real Fashion-MNIST test images (uint8, 1 x 28 x 28)."""
    _, images = dataset.load(storage.join(tiny_dataset, dataset.TEST))
    return images.images[:64]


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_every_corruption_the_config_mentions_exists():
    assert set(CORRUPTIONS) == {
        "gaussian_noise",
        "shot_noise",
        "gaussian_blur",
        "contrast",
        "brightness",
        "pixelate",
        "rotate",
    }


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_deterministic_for_a_seed(name, test_images):
    a = corrupt(test_images, name, 3, seed=0)
    b = corrupt(test_images, name, 3, seed=0)
    assert torch.equal(a, b)
    if name in RANDOM:
        assert not torch.equal(a, corrupt(test_images, name, 3, seed=1))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_keeps_shape_and_uint8(name, test_images):
    out = corrupt(test_images, name, 5, seed=0)
    assert out.shape == test_images.shape
    assert out.dtype == torch.uint8


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_grows_with_severity(name, test_images):
    mad = [_mad(corrupt(test_images, name, s, seed=0), test_images) for s in range(1, 6)]
    assert mad[0] > 0
    assert all(a <= b for a, b in zip(mad, mad[1:], strict=False)), mad
    # and 5 is clearly harsher than 1, not just equal
    assert mad[4] > mad[0]


def test_corruption_does_not_modify_its_input(test_images):
    before = test_images.clone()
    for name in CORRUPTIONS:
        corrupt(test_images, name, 5, seed=0)
    assert torch.equal(test_images, before)


def test_rotation_of_a_corner_free_image_keeps_its_brightness():
    # a centred blob rotates without leaving the frame: same mass, different pixels
    blob = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    blob[..., 10:18, 8:20] = 200
    out = corrupt(blob, "rotate", 2, seed=0)
    assert not torch.equal(out, blob)
    assert abs(out.float().sum() - blob.float().sum()) / blob.float().sum() < 0.1
