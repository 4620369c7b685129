"""benchmarks/teacher_noise.py: its recipes are demo configs with their teacher overrides,
each is compared with the plain teacher of its own network on the same images, a run resumes
and shares demo_recipe's teacher cache, and the harness's teacher gets its dropout."""

import json

import numpy as np
import pytest
import torch

from benchmarks import demo_recipe, teacher_noise
from benchmarks.student_recipe import _packed, fit_teacher
from noisy_student.config import TeacherConfig


def test_every_recipe_changes_only_the_teacher(fashion_mnist_source):
    demo = teacher_noise.recipe_config("plain").model_dump()
    assert teacher_noise.recipe_config("plain") == demo_recipe.arm_config(demo_recipe.BASE)
    for name, (_, overrides, base) in teacher_noise.RECIPES.items():
        assert base in teacher_noise.RECIPES and all(k.startswith("teacher.") for k in overrides)
        tree = teacher_noise.recipe_config(name).model_dump()
        assert {k: v for k, v in tree.items() if k != "teacher"} == {
            k: v for k, v in demo.items() if k != "teacher"
        }
        for key, value in overrides.items():
            *parents, leaf = key.split(".")[1:]
            node = tree["teacher"]
            for p in parents:
                node = node[p]
            assert node[leaf] == value, (name, key)


def _run(dev: list[bool], test: float) -> dict:
    right = np.array(dev)
    return {
        "dev_accuracy": float(right.mean()),
        "test_accuracy": test,
        "dev_right": _packed(right),
        "dev_images": len(right),
    }


def test_each_recipe_is_compared_with_the_plain_teacher_of_its_network():
    low, high = [True] * 80 + [False] * 20, [True] * 90 + [False] * 10
    result = {
        "date": "2026-12-06T00:00:00+00:00",
        "hardware": {"cpu": "AMD EPYC", "cpu_cores": 2, "gpu": None, "torch": "2"},
        "arms": {
            "plain": {"0": _run(low, 0.85), "1": _run(low, 0.84)},
            "RandAugment": {"0": _run(high, 0.86), "1": _run(high, 0.85)},
            "wide maps: plain": {"0": _run(high, 0.86)},
            "wide maps: all noise": {"0": _run(low, 0.84)},
        },
    }
    rows = teacher_noise.summary(result)
    assert rows["RandAugment"]["diffs"] == pytest.approx([0.10, 0.10])
    assert all(p < 0.01 for p in rows["RandAugment"]["ps"])
    assert rows["wide maps: all noise"]["diffs"] == pytest.approx([-0.10])  # not against plain
    assert rows["plain"]["diffs"] == [] and rows["RandAugment, 200 epochs"]["seeds"] == []
    table = teacher_noise.markdown(result)
    assert "| RandAugment | 0, 1 | 90.00, 90.00 | 90.00 | +10.00 (0.002), +10.00 (0.002) |" in (
        table
    )
    assert "| RandAugment, 200 epochs | not yet run |" in table


def test_a_quick_run_writes_its_table_resumes_and_shares_the_teacher_cache(
    fashion_mnist_source, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(teacher_noise, "RESULTS", tmp_path)
    monkeypatch.setattr(demo_recipe, "CACHE", tmp_path / "cache")
    teacher_noise.main(["--quick", "--seeds", "0", "--recipes", "plain", "RandAugment"])
    result = json.loads((tmp_path / "teacher-noise-quick.json").read_text())
    assert set(result["arms"]) == {"plain", "RandAugment"}
    assert result["arms"]["plain"]["0"]["dev_images"] == 1000
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert "| RandAugment | 0 |" in (tmp_path / "teacher-noise-quick.md").read_text()
    capsys.readouterr()
    teacher_noise.main(["--quick", "--seeds", "0", "--recipes", "plain"])  # nothing to train
    assert "seed 0: dev" not in capsys.readouterr().out
    # demo_recipe's demo arm finds the plain teacher in the cache: the same teacher
    monkeypatch.setattr(demo_recipe, "RESULTS", tmp_path)
    demo_recipe.main(["--quick", "--seeds", "0", "--arms", "demo"])
    demo = json.loads((tmp_path / "demo-recipe-quick.json").read_text())["arms"]["demo"]["0"]
    assert demo["teacher_test_accuracy"] == result["arms"]["plain"]["0"]["test_accuracy"]
    assert len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(SystemExit, match="unknown recipe 'nope'"):
        teacher_noise.main(["--recipes", "nope"])
    result["arms"]["plain"]["0"]["config"] = "0" * 16
    (tmp_path / "teacher-noise-quick.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="recipe 'plain' seed 0 was measured with another"):
        teacher_noise.main(["--quick", "--seeds", "1", "--recipes", "plain"])


def test_the_harness_teacher_has_the_configured_dropout_and_stochastic_depth(monkeypatch):
    seen = {}

    def fit(model, *args, **kwargs):
        seen["model"] = model
        raise StopIteration

    monkeypatch.setattr("benchmarks.student_recipe.engine.fit", fit)
    t = TeacherConfig(model="resnet10t", epochs=1, drop_rate=0.5, drop_path_rate=0.2)
    images, labels = torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4)
    with pytest.raises(StopIteration):
        fit_teacher(t, images, labels, 10, None, 0)
    model = seen["model"]
    assert model.drop_rate == 0.5
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
