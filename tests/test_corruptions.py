"""Common corruptions: seeded, shape-preserving, and further from the clean image at every
severity, on real grayscale images and on colour images of another shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from noisy_student.data import dataset, storage
from noisy_student.evaluation import corruptions
from noisy_student.evaluation.corruptions import BENCHMARK, CORRUPTIONS, corrupt

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# the ones that draw from the generator; the others are fixed functions of the image
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic",
    "rotate",
    "shear",
    "translate",
}


@pytest.fixture(scope="module")
def gray(tiny_dataset) -> torch.Tensor:
    """48 real Fashion-MNIST test images (uint8, 1 x 28 x 28)."""
    _, images = dataset.load(storage.join(tiny_dataset, dataset.TEST))
    return images.images[:48]


@pytest.fixture(scope="module")
def colour(gray) -> torch.Tensor:
    """The same garments in three differently weighted channels, on a non-square 40 x 24
    grid with a mid-grey background, so that nothing relies on C = 1, square images or
    black backgrounds."""
    u = gray.float() / 255
    rgb = torch.cat([u, 0.6 * u + 0.2, 1 - 0.7 * u], 1)
    rgb = F.interpolate(rgb, size=(40, 24), mode="bilinear", align_corners=False)
    return (rgb * 255).round().to(torch.uint8)


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_the_suite_is_imagenet_c_plus_mnist_c_geometry():
    assert corruptions.IMAGENET_C == [
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
        "elastic",
        "pixelate",
        "jpeg",
    ]
    assert [*corruptions.IMAGENET_C, "rotate", "shear", "scale", "translate"] == BENCHMARK
    assert set(CORRUPTIONS) == {*BENCHMARK, "gaussian_blur"}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_deterministic_for_a_seed(name, gray, colour):
    for images in (gray, colour):
        a = corrupt(images, name, 3, seed=0)
        assert torch.equal(a, corrupt(images, name, 3, seed=0))
        if name in RANDOM:
            assert not torch.equal(a, corrupt(images, name, 3, seed=1))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_keeps_shape_and_uint8(name, gray, colour):
    for images in (gray, colour):
        for severity in (1, 5):
            out = corrupt(images, name, severity, seed=0)
            assert out.shape == images.shape
            assert out.dtype == torch.uint8


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_moves_further_from_the_clean_image_as_severity_rises(name, gray, colour):
    for images in (gray, colour):
        mad = [_mad(corrupt(images, name, s, seed=0), images) for s in range(1, 6)]
        assert mad[0] > 0, mad
        assert all(a < b for a, b in zip(mad, mad[1:], strict=False)), (name, mad)


def test_corruption_does_not_modify_its_input(gray):
    before = gray.clone()
    for name in CORRUPTIONS:
        corrupt(gray, name, 5, seed=0)
    assert torch.equal(gray, before)


def test_corruption_refuses_float_images(gray):
    with pytest.raises(ValueError, match="uint8"):
        corrupt(gray.float(), "fog", 1, seed=0)


def test_an_image_meets_the_same_draws_at_every_severity(gray):
    # noise at severity 5 is the severity-1 noise field, scaled: the levels differ in
    # strength alone, so they are comparable image by image
    clean = gray.float()
    low = corrupt(gray, "gaussian_noise", 1, seed=0).float() - clean
    high = corrupt(gray, "gaussian_noise", 5, seed=0).float() - clean
    inside = (clean > 40) & (clean < 215)  # away from clipping
    assert torch.corrcoef(torch.stack([low[inside], high[inside]]))[0, 1] > 0.9


def test_rotation_of_a_centred_blob_keeps_its_brightness():
    # a centred blob rotates without leaving the frame: same mass, different pixels
    blob = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    blob[..., 10:18, 8:20] = 200
    out = corrupt(blob, "rotate", 2, seed=0)
    assert not torch.equal(out, blob)
    assert abs(out.float().sum() - blob.float().sum()) / blob.float().sum() < 0.1


def test_scale_shrinks_the_object_about_the_centre():
    square = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    square[..., 4:24, 4:24] = 255
    out = corrupt(square, "scale", 5, seed=0)  # to half the size
    lit = (out > 127).float()
    assert 80 <= lit.sum() <= 120  # ~10 x 10 of the 20 x 20
    rows = lit[0, 0].sum(1).nonzero().flatten()
    assert rows.min() >= 8 and rows.max() <= 19


def test_brightness_keeps_hue_and_saturation(colour):
    out = corrupt(colour, "brightness", 2, seed=0).float()
    u = colour.float()
    # where nothing clips, every channel is scaled by the same factor V'/V
    ok = (u.amax(1) > 30) & (out.amax(1) < 250)
    ratio = out / u.clamp(min=1)
    spread = (ratio.amax(1) - ratio.amin(1))[ok & (u.amin(1) > 30)]
    assert spread.numel() > 100
    assert spread.median() < 0.05


def test_jpeg_keeps_a_flat_image_and_loses_detail_of_a_real_one(gray):
    flat = torch.full((2, 1, 16, 16), 100, dtype=torch.uint8)
    assert (corrupt(flat, "jpeg", 5, seed=0).int() - 100).abs().max() <= 2
    assert not torch.equal(corrupt(gray, "jpeg", 1, seed=0), gray)


def test_frost_texture_is_seeded_bright_and_textured():
    a = corruptions.frost_texture(4, 28, 28, torch.Generator().manual_seed(0))
    b = corruptions.frost_texture(4, 28, 28, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == (4, 1, 28, 28)
    assert a.min() >= 0 and a.max() <= 1
    assert 0.15 < a.mean() < 0.7
    assert (a.std(dim=(1, 2, 3)) > 0.05).all()  # every image gets its own texture
    assert not torch.equal(a[0], a[1])


def test_plasma_fractal_is_smoother_for_a_larger_decay():
    def roughness(decay: float) -> float:
        m = corruptions.plasma_fractal(8, 64, decay, torch.Generator().manual_seed(0))
        return (m[:, 1:] - m[:, :-1]).abs().mean().item()

    assert roughness(1.5) > roughness(3.0)
