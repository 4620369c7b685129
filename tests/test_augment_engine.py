"""Input noise (crop/flip, RandAugment) and the training/inference loops."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisy_student.data import prefetch, training_data
from noisy_student.errors import UserError
from noisy_student.training import augment, engine, models
from tests.conftest import noise, schedule

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

PHOTO = augment.RandAugment()  # the official photo settings
SMALL = augment.SMALL_IMAGES


def _colour_ramp(n: int, channels: int, size: int = 16) -> torch.Tensor:
    """n copies of a mid-range image whose channels differ: every operation changes it."""
    ramp = _gradient_images(1, 1)[0, 0].long()
    chans = [(ramp + 20 * c).clamp(0, 255) for c in range(channels)]
    return torch.stack(chans).to(torch.uint8).unsqueeze(0).repeat(n, 1, 1, 1)


def _one_op(
    name: str,
    x: torch.Tensor,
    level: float,
    sign: float = 1.0,
    settings: augment.RandAugment = PHOTO,
    centre: tuple[float, float] = (0.5, 0.5),
) -> torch.Tensor:
    n = len(x)
    lv, sg = torch.full((n,), level), torch.full((n,), sign)
    fill = augment.fill_values(x, settings.fill)
    return augment.apply_op(
        name, x.float(), lv, sg, fill, settings, torch.tensor([centre]).repeat(n, 1)
    )


def _ra(**changes) -> augment.RandAugment:
    return dataclasses.replace(PHOTO, **changes)


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_keeps_shape_and_dtype_and_changes_images(channels):
    x = _colour_ramp(64, channels)
    out = augment.rand_augment(x, _ra(cutout=0.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every image gets two operations; on grey images only "color" is a no-op (1 in 15)
    assert sum(not torch.equal(o, x[0]) for o in out) >= 56


def test_rand_augment_draws_operations_independently_for_every_image():
    d = augment.draw(3000, PHOTO, torch.Generator().manual_seed(0))
    k = len(PHOTO.ops())
    assert k == 16  # the official code's 15 operations and Cutout
    # every operation is drawn for about 1/16 of the images in each layer
    for layer in range(2):
        counts = torch.bincount(d.ops[:, layer], minlength=k).float()
        expected = 3000 / k
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 37.7  # the 0.1% point of chi-square with 15 degrees of freedom
    # layers are independent: as many images draw the same op twice as chance says (1/16)
    same = (d.ops[:, 0] == d.ops[:, 1]).float().mean().item()
    assert abs(same - 1 / k) < 0.02
    assert 0.45 < (d.signs > 0).float().mean().item() < 0.55
    assert torch.all(d.levels == 0.9)
    assert d.centres.shape == (3000, 2, 2) and d.centres.min() >= 0 and d.centres.max() < 1


def test_the_operations_drawn_follow_the_settings():
    assert "invert" in PHOTO.ops() and "cutout" in PHOTO.ops()
    assert "invert" in SMALL.ops() and "cutout" in SMALL.ops()
    assert "invert" not in _ra(invert=False).ops()
    assert "cutout" not in _ra(cutout=0.0).ops()
    # geometric operations come last: they share one grid_sample
    assert PHOTO.ops()[-len(augment.GEOMETRIC_OPS) :] == augment.GEOMETRIC_OPS


def test_small_images_get_the_small_image_settings_and_photos_the_papers():
    assert augment.RandAugment.for_image(28, 28) == SMALL
    assert augment.RandAugment.for_image(64, 200) == SMALL  # the shorter side decides
    photo = augment.RandAugment.for_image(224, 224, magnitude=27)
    assert photo == _ra(magnitude=27)
    # the official ImageNet constants: 100 px of translation and 80 px squares at 224 px
    assert round(photo.translate * 224) == 100 and round(photo.cutout * 224) == 80
    assert (photo.fill, photo.invert, photo.levels) == (128, True, "official")
    # small images: the official small-image constants, filled with their own border
    assert (SMALL.translate, SMALL.cutout, SMALL.fill) == (1 / 8, 1 / 4, "border")
    assert (SMALL.invert, SMALL.levels) == (True, "official")
    # a setting given is kept, whatever the size
    assert augment.RandAugment.for_image(28, 28, fill=0, invert=True).fill == 0


def test_rand_augment_gives_at_least_95_percent_of_a_batch_their_own_draw():
    x = _colour_ramp(256, 3)
    out = augment.rand_augment(x, PHOTO, torch.Generator().manual_seed(1))
    outputs = [bytes(o.numpy().tobytes()) for o in out]
    most_common = max(outputs.count(o) for o in set(outputs))
    # one draw per batch would make all 256 identical
    assert most_common <= 0.05 * len(out)


def test_rand_augment_is_deterministic_for_a_generator_seed():
    x = _colour_ramp(32, 3)
    jittered = _ra(magnitude_std=0.5)
    a = augment.rand_augment(x, jittered, torch.Generator().manual_seed(5))
    b = augment.rand_augment(x, jittered, torch.Generator().manual_seed(5))
    c = augment.rand_augment(x, jittered, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "settings",
    [dataclasses.replace(s, levels="increasing") for s in (PHOTO, SMALL)],
    ids=["photo", "small"],
)
def test_stronger_magnitude_moves_images_further_with_increasing_levels(settings):
    # (the official levels do not: posterize at M=1 keeps no bit, a black image)
    x = _colour_ramp(512, 3)

    def distance(m: float) -> float:
        ra = dataclasses.replace(settings, magnitude=m)
        out = augment.rand_augment(x, ra, torch.Generator().manual_seed(0))
        return (out.float() - x.float()).abs().mean().item()

    d = [distance(m) for m in (1, 5, 10, 15, 20)]
    assert d[0] < d[2] < d[-1] and d[0] < d[-1] / 2


@pytest.mark.parametrize("name", [*PHOTO.ops(), "invert"])
@pytest.mark.parametrize("levels", ["official", "increasing"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_operation_keeps_shape_and_stays_in_the_uint8_range(name, levels, channels):
    x = _colour_ramp(4, channels)
    out = _one_op(name, x, 2.7, settings=_ra(levels=levels))
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())


@pytest.mark.parametrize(
    "name", [*augment.GEOMETRIC_OPS, "posterize", "solarize", "sharpness", "cutout"]
)
def test_increasing_operations_do_nothing_at_magnitude_zero(name):
    x = _colour_ramp(4, 3)
    assert torch.equal(_one_op(name, x, 0.0, settings=_ra(levels="increasing")), x.float())


def test_rotate_by_90_degrees_turns_the_image_a_quarter():
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    out = _one_op("rotate", x.to(torch.uint8), 3.0)  # 30 degrees per level 1
    turned = [torch.rot90(x, k, dims=(2, 3)).float() for k in (1, 3)]
    assert any(torch.equal(out, t) for t in turned)


@pytest.mark.parametrize(("translate", "columns"), [(100 / 224, 9), (0.1, 2)])
def test_translation_moves_by_its_fraction_of_the_side(translate, columns):
    x = torch.zeros(1, 1, 20, 20, dtype=torch.uint8)
    x[..., :, 10:] = 200  # the right half bright
    out = _one_op("translate_x", x, 1.0, settings=_ra(translate=translate, fill=77))
    # uncovered columns get the fill; the bright half moved left by round(20 * translate)
    assert (out == 77).sum().item() == columns * 20
    assert (out == 200).sum().item() == 10 * 20


@pytest.mark.parametrize(("fill", "expected"), [("border", 10), ("mean", 45), (128, 128), (0, 0)])
def test_uncovered_pixels_get_the_fill(fill, expected):
    x = torch.full((1, 1, 20, 20), 10, dtype=torch.uint8)
    x[..., 5:15, 5:15] = (
        150  # a bright square on a dark background: mean (100 x 150 + 300 x 10) / 400
    )
    assert augment.fill_values(x, fill).item() == expected
    out = _one_op("translate_y", x, 1.0, settings=_ra(fill=fill))
    assert (out[0, 0, -9:] == expected).all()  # 45% of 20 rows uncovered at the bottom


def test_border_fill_is_per_image_and_channel():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    x[0, 1] = 90
    x[1, 2, 0, :] = 255  # one of 28 border pixels
    fill = augment.fill_values(x, "border")
    assert fill.shape == (2, 3, 1, 1)
    assert fill.flatten().tolist() == [0, 90, 0, 0, 0, round(255 * 8 / 28)]


def test_cutout_cuts_a_square_of_its_fraction_of_the_side_at_the_centre_drawn():
    x = torch.full((1, 1, 16, 16), 200, dtype=torch.uint8)
    out = _one_op("cutout", x, 1.0, settings=_ra(cutout=0.5, fill=0), centre=(0.5, 0.5))
    assert (out == 0).sum().item() == 8 * 8 and (out[0, 0, 4:12, 4:12] == 0).all()
    # a centre near the corner: the square is clipped to the image
    corner = _one_op("cutout", x, 1.0, settings=_ra(cutout=0.5, fill=0), centre=(0.0, 0.0))
    assert (corner == 0).sum().item() == 4 * 4 and (corner[0, 0, :4, :4] == 0).all()


def test_cutout_on_every_image_cuts_each_at_its_own_place():
    x = torch.full((64, 1, 16, 16), 200, dtype=torch.uint8)
    fill = torch.zeros(64, 1, 1, 1)
    out = augment.cutout_every_image(x, 0.5, fill, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and (out == 0).flatten(1).any(1).all()
    assert _distinct_outputs(out) > 32
    assert torch.equal(augment.cutout_every_image(x, 0.0, fill, torch.Generator()), x)


def test_invert_posterize_and_solarize_match_their_definitions():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(_one_op("invert", x, 0.0), 255.0 - x.float())
    increasing = _ra(levels="increasing")
    posterized = _one_op("posterize", x, 1.0, settings=increasing)
    assert torch.equal(posterized, (x // 16 * 16).float())  # 4 bits dropped at M=10
    half = _one_op("solarize", x, 0.5, settings=increasing)  # threshold 128
    assert torch.equal(half, torch.where(x >= 128, 255 - x.long(), x.long()).float())


def test_official_levels_follow_the_official_code():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    # posterize keeps int(M/10 * 4) bits: 3 at M=9
    assert torch.equal(_one_op("posterize", x, 0.9), (x // 32 * 32).float())
    # solarize inverts from int(M/10 * 256) up: 230 at M=9
    expected = torch.where(x >= 230, 255 - x.long(), x.long()).float()
    assert torch.equal(_one_op("solarize", x, 0.9), expected)
    # enhancement factor 0.1 + 1.8 M/10 whatever the sign: 1.0 (no change) at M=5
    ramp = _colour_ramp(2, 3)
    for op in ("color", "contrast", "brightness", "sharpness"):
        assert torch.equal(_one_op(op, ramp, 0.5, -1.0), ramp.float())
    assert torch.equal(
        _one_op("brightness", ramp, 0.9, -1.0), (ramp.float() * 1.72).clamp(0, 255).round()
    )


def test_equalize_matches_pillow():
    from PIL import Image, ImageOps

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 1, 16, 16, generator=g) ** 3 * 200 + 20).to(torch.uint8)
    out = _one_op("equalize", x, 0.0)
    for img, mine in zip(x, out, strict=True):
        expected = np.asarray(ImageOps.equalize(Image.fromarray(img[0].numpy())))
        assert np.array_equal(mine[0].numpy().astype(np.uint8), expected)


def test_increasing_enhancements_at_factor_zero_give_their_degenerate_image():
    x = _colour_ramp(2, 3)
    increasing = _ra(levels="increasing")
    # level 1/0.9 with a negative sign is factor 0: black, and the image's mean grey
    assert torch.all(_one_op("brightness", x, 1 / 0.9, -1.0, increasing) == 0)
    flat = _one_op("contrast", x, 1 / 0.9, -1.0, increasing)
    assert torch.all(flat == flat[:, :1, :1, :1])
    grey = _one_op("color", x, 1 / 0.9, -1.0, increasing)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_auto_contrast_stretches_every_channel_to_the_full_range():
    out = _one_op("auto_contrast", _colour_ramp(2, 3), 0.0)
    assert torch.all(out.amin(dim=(2, 3)) == 0) and torch.all(out.amax(dim=(2, 3)) == 255)


def test_the_algorithm_page_gives_the_strengths_the_code_and_the_preset_have():
    import importlib.util

    from noisy_student import config
    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "generate_noise_figure", REPO / "docs" / "generate_noise_figure.py"
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    student = config.load(generator.PRESET).students[0]
    expected = generator.strengths_markdown(student.rand_augment.magnitude, student.cutout)
    page = (REPO / "docs" / "algorithm.md").read_text()
    assert generator.START + expected + generator.END in page, (
        "docs/algorithm.md is stale: `uv run python docs/generate_noise_figure.py`"
    )
    # the table follows the code: here, small images fill with their border
    assert "| fill of uncovered pixels | 128 | 128 | 128 | the image's border |" in expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rand_augment_runs_on_the_gpu_and_stays_there():
    x = _colour_ramp(64, 3).cuda()
    out = augment.rand_augment(x, PHOTO, torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == x.shape


def test_config_names_the_key_of_a_bad_rand_augment_setting():
    from noisy_student import config

    with pytest.raises(UserError, match=r"students\.0\.rand_augment\.magnitude"):
        config.load(
            config.Path(__file__).parent.parent / "pipeline_config/smoke.yaml",
            ["students.0.rand_augment.magnitude=31"],
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
        training_data.TensorRows(x, engine.one_hot(y, 2)),
        schedule(
            epochs=4,
            batch_size=8,
            lr=0.02,
            warmup_epochs=0,
            ema_decay=0.5,
            eval_every=2,
            precision="fp32",
        ),
        noise(hflip=True, crop_padding=2),
        seed=0,
        evaluation=training_data.TensorBatches(ex, ey),
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
        training_data.TensorRows(x, engine.one_hot(y, 2)),
        schedule(epochs=2, batch_size=4, lr=0.05, unlabelled_ratio=2.0, precision="fp32"),
        noise(rand_augment=augment.RandAugment(num_ops=1, magnitude=5)),
        seed=0,
        pseudo=training_data.TensorRows(px, engine.one_hot(py, 2, 0.1)),
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


def test_flip_averaged_probabilities_are_the_mean_over_the_image_and_its_mirror_image():
    model = engine.for_inference(models.create("test_resnet", 5, 1))
    x = torch.randint(0, 256, (6, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    x = x.to(torch.uint8)
    averaged = engine.batch_probs(model, x, tta="flip")
    expected = (engine.batch_probs(model, x) + engine.batch_probs(model, x.flip(-1))) / 2
    torch.testing.assert_close(averaged, expected)
    assert not torch.allclose(averaged, engine.batch_probs(model, x))
    # an image that is its own mirror image gets what it gets alone
    symmetric = torch.cat([x[..., :8], x[..., :8].flip(-1)], -1)
    torch.testing.assert_close(
        engine.batch_probs(model, symmetric, tta="flip"), engine.batch_probs(model, symmetric)
    )


def test_batch_probs_is_the_same_for_either_layout_of_the_uint8_batch():
    model = engine.for_inference(models.create("test_resnet", 4, 3))
    x = torch.randint(
        0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(engine.batch_probs(model, last), engine.batch_probs(model, x))


def test_accuracy_compares_argmax_with_labels():
    model = models.create("test_resnet", 2, 1)
    x, _ = _bright_and_dark(6, seed=0)
    predicted = engine.predict_probs(model, x, 6).argmax(1)
    assert engine.accuracy(model, training_data.TensorBatches(x, predicted, 4)) == 1.0
    assert engine.accuracy(model, training_data.TensorBatches(x, 1 - predicted, 4)) == 0.0


def test_auto_precision_is_bf16_on_a_gpu_and_fp32_on_a_cpu_and_a_setting_is_what_it_says():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.resolved_precision(cpu, "auto") == "fp32"
    assert not engine.autocast(cpu, "auto")._enabled
    assert engine.resolved_precision(cuda, "auto") == "bf16"
    assert engine.resolved_precision(cpu, "bf16") == "bf16"
    assert engine.autocast(cpu, "bf16")._enabled
    assert engine.autocast(cpu, "bf16").fast_dtype == torch.bfloat16
    assert engine.resolved_precision(cuda, "fp32") == "fp32"


def test_a_model_in_bf16_autocast_gives_float_probabilities_that_sum_to_one():
    model = models.create("test_resnet", 2, 1)
    x, _ = _bright_and_dark(6, seed=0)
    probs = engine.predict_probs(model, x, 4, precision="bf16")
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    # bf16 keeps 8 bits of mantissa: close to fp32's answer, not equal
    fp32 = engine.predict_probs(model, x, 4, "fp32")
    torch.testing.assert_close(probs, fp32, atol=0.02, rtol=0)
    assert not torch.equal(probs, fp32)


def test_distillation_loss_is_half_cross_entropy_on_labels_and_half_kl_to_the_teacher():
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5], [1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.9, 0.1]])
    t = 2.0
    ce = -F.log_softmax(logits[:1], 1)[0, 0]
    teacher = F.softmax(targets[1:].log() / t, 1)
    student = F.log_softmax(logits[1:] / t, 1)
    kl = (teacher * (teacher.log() - student)).sum(1).mean() * t * t
    loss = engine.distillation_loss(logits, targets, labelled=1, temperature=t)
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * kl)
    # a student that matches the teacher pays only the cross-entropy half
    matched = torch.cat([logits[:1], targets[1:].log()])
    torch.testing.assert_close(
        engine.distillation_loss(matched, targets, 1, 1.0), 0.5 * ce, atol=1e-6, rtol=0
    )


def test_soft_target_loss_of_one_hot_targets_is_cross_entropy():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(
        engine.soft_target_loss(logits, engine.one_hot(labels, 3)),
        F.cross_entropy(logits, labels),
    )


@pytest.mark.parametrize("averaging", ["swa", "none"])
def test_fit_with_swa_or_no_weight_averaging_learns_and_returns_an_eval_model(averaging):
    x, y = _bright_and_dark(64, seed=0)
    ex, ey = _bright_and_dark(64, seed=1)
    torch.manual_seed(0)
    result = engine.fit(
        models.create("test_resnet", 2, 1),
        training_data.TensorRows(x, engine.one_hot(y, 2)),
        schedule(
            epochs=4,
            batch_size=8,
            lr=0.02,
            warmup_epochs=0,
            weight_averaging=averaging,
            swa_start=0.5,
            precision="fp32",
        ),
        noise(hflip=True, crop_padding=2),
        seed=0,
        evaluation=training_data.TensorBatches(ex, ey),
    )
    assert result.final_accuracy >= 0.9
    assert not result.model.training


def test_step_schedule_multiplies_the_lr_by_the_rate_every_interval():
    x, y = _bright_and_dark(16, seed=0)
    lrs = []
    engine.fit(
        models.create("test_resnet", 2, 1),
        training_data.TensorRows(x, engine.one_hot(y, 2)),
        schedule(
            epochs=4,
            batch_size=8,
            lr=0.1,
            warmup_epochs=0,
            lr_schedule="step",
            lr_decay_epochs=2,
            lr_decay_rate=0.5,
            precision="fp32",
        ),
        noise(hflip=False, crop_padding=0),
        seed=0,
        on_epoch=lambda epoch, m: lrs.append(m["lr"]),
    )
    # the lr shown after an epoch is the one set for the next step
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])


def test_training_and_inference_in_a_thread_started_after_a_reader_use_every_torch_thread():
    """torch.set_num_threads(1) in a reader thread also sets what threads started later
    begin with; a Prefect task runs in such a thread, and trained on one core. It needs a
    process with 2 torch threads: under `make test`'s workers (one thread each) it runs in
    a process of its own."""
    if prefetch.COMPUTE_THREADS >= 2:
        threads_after_a_reader()
        return
    import subprocess
    import sys

    from tests.conftest import REPO

    two = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    code = "from tests.test_augment_engine import threads_after_a_reader as t; t()"
    done = subprocess.run(
        [sys.executable, "-c", code], env=two, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def threads_after_a_reader() -> None:
    import threading

    assert prefetch.COMPUTE_THREADS >= 2, prefetch.COMPUTE_THREADS

    reader = threading.Thread(target=prefetch.one_torch_thread)
    reader.start()
    reader.join()
    seen = {}

    def stage() -> None:
        seen["at start"] = torch.get_num_threads()
        model = models.create("test_resnet", 2, 1)
        engine.batch_probs(engine.for_inference(model), torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
        seen["inference"] = torch.get_num_threads()
        torch.set_num_threads(1)
        rows = training_data.TensorRows(
            torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.eye(2)[[0, 1] * 4]
        )
        engine.fit(model, rows, schedule(epochs=1, batch_size=4, lr=0.1), noise(), 0)
        seen["training"] = torch.get_num_threads()

    def run() -> None:
        try:
            stage()
        except BaseException as e:  # shown by the assertion below
            seen["error"] = repr(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    want = prefetch.COMPUTE_THREADS
    assert seen == {"at start": 1, "inference": want, "training": want}
