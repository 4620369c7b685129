"""Input noise (crop/flip, RandAugment) and the training/inference loops."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisy_student import augment, engine, models
from noisy_student.errors import UserError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _same_images(n: int, channels: int = 1, size: int = 16) -> torch.Tensor:
    """n copies of one random uint8 image: any difference between outputs is the noise."""
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, channels, size, size), generator=g, dtype=torch.uint8)
    return one.repeat(n, 1, 1, 1)


def _gradient_images(n: int, channels: int) -> torch.Tensor:
    """n copies of a mid-range gradient: unlike full-range noise, contrast and histogram
    operations visibly change it."""
    ramp = torch.linspace(60, 180, 16).round().to(torch.uint8)
    img = (ramp.view(1, 16) + torch.arange(16).view(16, 1) * 2).to(torch.uint8)
    return img.view(1, 1, 16, 16).repeat(n, channels, 1, 1)


def _distinct_outputs(x: torch.Tensor) -> int:
    return len({bytes(img.numpy().tobytes()) for img in x})


# --- crop and flip


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_and_flip_keeps_shape_and_dtype(dtype):
    x = _same_images(8, channels=3).to(dtype)
    out = augment.crop_and_flip(x, 2, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype


def test_crop_and_flip_draws_independently_for_every_image():
    x = _same_images(32)
    out = augment.crop_and_flip(x, 2, True, torch.Generator().manual_seed(0))
    # 25 offsets x 2 flips: 32 identical inputs must not all get the same draw
    assert _distinct_outputs(out) > 8


def test_crop_only_translates_within_the_padding():
    x = _same_images(16)
    out = augment.crop_and_flip(x, 2, False, torch.Generator().manual_seed(1))
    padded = F.pad(x[0], (2, 2, 2, 2))
    windows = {
        bytes(padded[:, dy : dy + 16, dx : dx + 16].numpy().tobytes())
        for dy in range(5)
        for dx in range(5)
    }
    assert all(bytes(img.numpy().tobytes()) in windows for img in out)


def test_flip_without_padding_mirrors_some_images_and_keeps_others():
    x = _same_images(16)
    out = augment.crop_and_flip(x, 0, True, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, x[0].flip(-1)) for o in out]
    kept = [torch.equal(o, x[0]) for o in out]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_crop_and_flip_without_padding_or_flip_is_the_identity():
    x = _same_images(4, channels=3)
    assert torch.equal(augment.crop_and_flip(x, 0, False, torch.Generator()), x)


def test_to_float_maps_uint8_to_minus_one_to_one():
    out = augment.to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert out.tolist() == [-1.0, 1.0]


# --- RandAugment


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_keeps_shape_and_dtype_and_changes_images(channels):
    random.seed(0)
    np.random.seed(0)
    x = _gradient_images(32, channels)
    out = augment.rand_augment("rand-n2-m9-mstd0.5", 16, channels)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # timm applies each of the 2 ops with p=0.5 and some ops are no-ops on grey images,
    # so about 2/3 of the images change; 12 of 32 is far below that, 0 would be a bug
    assert sum(not torch.equal(o, x[0]) for o in out) >= 12


def test_rand_augment_draws_different_operations_for_every_image():
    random.seed(0)
    np.random.seed(0)
    out = augment.rand_augment("rand-n2-m9-mstd0.5", 16, 1)(_gradient_images(32, 1))
    assert _distinct_outputs(out) >= 12


@pytest.mark.parametrize("spec", ["rand-x9", "rand-zz", "rand-m9-", "augmix-m9"])
def test_rand_augment_rejects_a_spec_timm_would_silently_misread(spec):
    with pytest.raises(UserError, match="rand_augment: cannot parse"):
        augment.rand_augment(spec, 16, 1)


def test_config_names_the_key_of_a_bad_rand_augment_string():
    from noisy_student import config

    with pytest.raises(UserError, match=r"students\.0\.rand_augment"):
        config.load(
            config.Path(__file__).parent.parent / "pipeline_config/smoke.yaml",
            ["students.0.rand_augment=rand-n2-mm9"],
        )


# --- engine


def test_one_hot_with_smoothing_spreads_mass_and_sums_to_one():
    t = engine.one_hot(torch.tensor([0, 2]), 3, smoothing=0.3)
    torch.testing.assert_close(t, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]))
    assert torch.equal(engine.one_hot(torch.tensor([1]), 3), torch.tensor([[0.0, 1.0, 0.0]]))


def _bright_and_dark(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 bright, class 0 dark, with pixel noise; balanced, so chance is 50%."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels == 1, 190, 60).view(n, 1, 1, 1)
    noise = torch.randint(-40, 41, (n, 1, 16, 16), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8), labels


def test_fit_learns_a_separable_problem_and_reports_every_epoch():
    x, y = _bright_and_dark(64, seed=0)
    ex, ey = _bright_and_dark(64, seed=1)
    seen = []
    torch.manual_seed(0)  # the initial weights; lr and epochs chosen to learn from any tried
    result = engine.fit(
        models.create("test_resnet", 2, 1),
        x,
        engine.one_hot(y, 2),
        engine.Schedule(
            epochs=4,
            batch_size=8,
            lr=0.02,
            warmup_epochs=0,
            ema_decay=0.5,
            eval_every=2,
            precision="fp32",
        ),
        engine.Noise(hflip=True, crop_padding=2),
        seed=0,
        eval_images=ex,
        eval_labels=ey,
        on_epoch=lambda epoch, m: seen.append((epoch, m)),
    )
    assert result.final_accuracy >= 0.9
    assert result.steps == 4 * 8  # 64 images / 8 per batch, 4 epochs
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert seen[-1][1]["test_accuracy"] == result.final_accuracy
    # evaluated every 2nd epoch (the last is one of them)
    assert ["test_accuracy" in h for h in result.history] == [False, True, False, True]
    for h in result.history:
        assert {"train_loss", "lr", "images_per_second"} <= set(h)
        assert h["train_loss"] > 0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # the returned model is the weight average, ready for inference
    assert not result.model.training
    assert next(result.model.parameters()).device.type == "cpu"


def test_fit_with_pseudo_labels_counts_epochs_over_the_pseudo_labelled_images():
    x, y = _bright_and_dark(8, seed=0)
    px, py = _bright_and_dark(20, seed=2)
    result = engine.fit(
        models.create("test_resnet", 2, 1),
        x,
        engine.one_hot(y, 2),
        engine.Schedule(epochs=2, batch_size=4, lr=0.05, unlabelled_ratio=2.0, precision="fp32"),
        engine.Noise(rand_augment="rand-n1-m5"),
        seed=0,
        pseudo_images=px,
        pseudo_targets=engine.one_hot(py, 2, 0.1),
    )
    # 8 pseudo-labelled images per step (4 x 2): ceil(20 / 8) = 3 steps per epoch
    assert result.steps == 6
    assert result.final_accuracy is None  # no eval set given
    assert len(result.history) == 2


def test_predict_probs_puts_the_model_in_eval_mode_and_rows_sum_to_one():
    model = models.create("test_resnet", 5, 1, drop_rate=0.5)
    model.train()
    x, _ = _bright_and_dark(10, seed=0)
    probs = engine.predict_probs(model, x, batch_size=3)
    assert not model.training
    assert probs.shape == (10, 5)
    torch.testing.assert_close(probs.sum(1), torch.ones(10))
    # eval mode: no dropout, and batch statistics do not leak across batches
    torch.testing.assert_close(engine.predict_probs(model, x, batch_size=10), probs)


def test_accuracy_compares_argmax_with_labels():
    model = models.create("test_resnet", 2, 1)
    x, _ = _bright_and_dark(6, seed=0)
    predicted = engine.predict_probs(model, x, 6).argmax(1)
    assert engine.accuracy(model, x, predicted, 6) == 1.0
    assert engine.accuracy(model, x, 1 - predicted, 6) == 0.0
