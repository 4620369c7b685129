"""benchmarks/paired.py: two saved models judged on the same images, image by image."""

import json

import pytest
import torch

from benchmarks import paired
from noisy_student.data import dataset, storage
from noisy_student.training import engine, models

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _saved(tiny_dataset: str, folder, seed: int) -> str:
    manifest = dataset.read_manifest(storage.join(tiny_dataset, dataset.LABELLED))
    torch.manual_seed(seed)
    model = models.create("test_resnet", manifest.num_classes, manifest.channels)
    meta = models.ModelMeta(
        "test_resnet", manifest.num_classes, 1, manifest.class_names, 28, 28, manifest.mode
    )
    return models.save(model, meta, str(folder / f"model-{seed}"))


def test_two_models_are_paired_on_every_test_image(tiny_dataset, tmp_path, capsys):
    a, b = _saved(tiny_dataset, tmp_path, 0), _saved(tiny_dataset, tmp_path, 1)
    right_a = paired.right_answers(a, tiny_dataset)
    assert right_a.shape == (200,) and right_a.dtype == torch.bool
    model, _ = models.load(a)
    # the exact ratio, as results store it (not a float32 mean)
    assert engine.accuracy(model, paired.test_batches(tiny_dataset, 64)) == (
        int(right_a.sum()) / 200
    )
    (record,) = paired.compare([a, b], tiny_dataset)
    right_b = paired.right_answers(b, tiny_dataset)
    assert record["images"] == 200
    assert record["only_first_right"] == int((right_a & ~right_b).sum())
    assert record["only_second_right"] == int((right_b & ~right_a).sum())
    assert record["difference"] == pytest.approx((right_a.sum() - right_b.sum()).item() / 200)
    # a model against itself: no disagreement, p = 1
    paired.main([a, a, "--data", tiny_dataset])
    (line,) = capsys.readouterr().out.splitlines()
    same = json.loads(line)
    assert same["only_first_right"] == same["only_second_right"] == 0 and same["p_value"] == 1
    with pytest.raises(SystemExit, match="at least two models"):
        paired.main([a, "--data", tiny_dataset])
    with pytest.raises(SystemExit, match=r"nowhere/test: no dataset here"):
        paired.main([a, b, "--data", str(tmp_path / "nowhere")])
