"""benchmarks/demo_recipe.py: its arms are valid demo configs, its data splits are disjoint,
its teacher is the one the pipeline's train_teacher trains, its table compares each arm
with the demo on the same images, and a run resumes."""

import json
import os

import numpy as np
import pytest

from benchmarks import demo_recipe
from benchmarks.student_recipe import _packed
from noisy_student.data import ingest


def test_every_arm_is_the_demo_config_with_its_overrides(fashion_mnist_source):
    demo = demo_recipe.arm_config(demo_recipe.BASE)
    for name, (_, overrides) in demo_recipe.ARMS.items():
        cfg = demo_recipe.arm_config(name)
        tree, base = cfg.model_dump(), demo.model_dump()
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = tree
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            assert node[leaf] == value, (name, key)
        if not overrides:
            assert tree == base


def test_the_splits_are_disjoint_and_the_labelled_draw_is_the_seeds(fashion_mnist_source):
    labels = ingest.read_idx(f"{fashion_mnist_source}/train-labels-idx1-ubyte.gz")
    labelled, dev, pool = demo_recipe.split_indices(labels, 100, 0)
    assert np.bincount(labels[labelled]).tolist() == [100] * 10
    assert np.bincount(labels[dev]).tolist() == [500] * 10
    together = np.concatenate([labelled, dev, pool])
    assert len(together) == len(set(together.tolist())) == len(labels)
    assert (labelled == ingest.split_labelled(labels, 100, 0)).all()  # the demo's draw
    assert not np.array_equal(labelled, demo_recipe.split_indices(labels, 100, 1)[0])


def _run(dev: list[bool], test_acc: float, teacher: float, teacher_dev: float = 0.8) -> dict:
    right = np.array(dev)
    return {
        "dev_accuracy": float(right.mean()),
        "dev_right": _packed(right),
        "dev_images": len(right),
        "test_accuracy": test_acc,
        "teacher_dev_accuracy": teacher_dev,
        "teacher_test_accuracy": teacher,
        "gain_on_test": test_acc - teacher,
        "student_seconds": 60.0,
    }


def test_the_table_compares_each_arm_with_the_demo_on_the_same_images():
    base = [True] * 80 + [False] * 20
    better = [True] * 90 + [False] * 10
    result = {
        "date": "2026-12-05T00:00:00+00:00",
        "hardware": {"cpu": "AMD EPYC", "cpu_cores": 2, "gpu": None, "torch": "2"},
        "arms": {
            "demo": {"0": _run(base, 0.87, 0.85), "1": _run(base, 0.86, 0.84)},
            "labels: hard": {"0": _run(better, 0.88, 0.85), "1": _run(better, 0.875, 0.84)},
        },
    }
    rows = demo_recipe.summary(result)
    assert rows["labels: hard"]["diff_vs_demo"] == pytest.approx([0.10, 0.10])
    assert all(p < 0.01 for p in rows["labels: hard"]["p_vs_demo"])
    assert rows["demo"]["diff_vs_demo"] == []
    assert rows["noise: M=5"]["seeds"] == []
    table = demo_recipe.markdown(result)
    assert '| labels: hard | `selection.labels="hard"` | 0, 1 | 90.00, 90.00 |' in table
    assert "85.00 -> 88.00 (+3.00)" in table
    assert "| noise: M=5 |" in table and "not yet run" in table


def test_the_table_says_which_seeds_ran_on_which_machine_naming_a_seed_under_each():
    def host(cpu: str) -> dict:
        return {"cpu": cpu, "cpu_cores": 2, "gpu": None, "torch": "2"}

    run = _run([True] * 8 + [False] * 2, 0.87, 0.85)
    result = {
        "date": "2026-12-07T00:00:00+00:00",
        "hardware": host("AMD EPYC (AVX512)"),
        "arms": {"demo": {"0": run, "1": run}, "labels: hard": {"0": run}},
    }
    assert "more than one machine" not in demo_recipe.markdown(result)
    result["arms"]["labels: hard"]["0"] = {**run, "hardware": host("Intel Xeon")}
    assert (
        "The seeds ran on more than one machine: seeds 0, 1 on AMD EPYC (AVX512), 2 cores, "
        "no GPU; seeds 0 on Intel Xeon, 2 cores, no GPU." in demo_recipe.markdown(result)
    )


def test_an_arm_that_keeps_the_teacher_is_compared_with_the_demo_from_that_very_teacher():
    base, better = [True] * 80 + [False] * 20, [True] * 90 + [False] * 10
    later = [True] * 85 + [False] * 15  # the demo from another draw of the teacher
    result = {
        "arms": {
            "demo": {"0": _run(base, 0.87, 0.85), "1": _run(base, 0.86, 0.84)},
            demo_recipe.SECOND_BASE: {"0": _run(later, 0.87, 0.86, teacher_dev=0.81)},
            # seed 0 from the later teacher, seed 1 from a teacher no demo row has
            "labels: hard": {
                "0": _run(better, 0.88, 0.86, teacher_dev=0.81),
                "1": _run(better, 0.88, 0.83, teacher_dev=0.79),
            },
            # an arm that changes the teacher: against the demo from the teacher of the
            # same seeding (seed 0), or where there is none the first demo row (seed 1)
            "teacher: 200 epochs": {
                "0": _run(better, 0.88, 0.87, teacher_dev=0.82),
                "1": _run(better, 0.88, 0.87, teacher_dev=0.82),
            },
        },
    }
    rows = demo_recipe.summary(result)
    assert rows["labels: hard"]["diff_vs_demo"] == pytest.approx([0.05])
    assert rows["teacher: 200 epochs"]["diff_vs_demo"] == pytest.approx([0.05, 0.10])
    assert rows[demo_recipe.SECOND_BASE]["diff_vs_demo"] == []


def test_an_arm_no_demo_row_can_pair_is_warned_of_before_its_student_trains():
    teacher = {"teacher_dev_accuracy": 0.85, "teacher_test_accuracy": 0.85}
    other = _run([True] * 80 + [False] * 20, 0.87, 0.84, teacher_dev=0.85)
    arms = {"demo": {"0": other}}
    said = demo_recipe.unpaired("labels: hard", 0, teacher, arms)
    assert said is not None and "'labels: hard' seed 0: no demo row from this teacher" in said
    assert "test 85.00%" in said
    # a demo row from the very same teacher (either base) pairs it: nothing to say
    arms[demo_recipe.THIRD_BASE] = {"0": _run([True] * 8 + [False] * 2, 0.87, 0.85, 0.85)}
    assert demo_recipe.unpaired("labels: hard", 0, teacher, arms) is None
    # the bases, and arms that train another teacher, are never paired this way
    for name in (demo_recipe.BASE, "teacher: 200 epochs"):
        assert demo_recipe.unpaired(name, 1, teacher, arms) is None


def test_a_quick_run_writes_its_table_and_resumes(
    fashion_mnist_source, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(demo_recipe, "RESULTS", tmp_path)
    monkeypatch.setattr(demo_recipe, "CACHE", tmp_path / "cache")
    # the base asked for after the arm is measured first, so the arm is paired with it
    demo_recipe.main(["--quick", "--seeds", "0", "--arms", "labels: hard", "demo"])
    out = capsys.readouterr().out
    assert out.index("demo, seed 0: dev") < out.index("labels: hard, seed 0: dev")
    assert "no demo row from this teacher" not in out
    result = json.loads((tmp_path / "demo-recipe-quick.json").read_text())
    assert set(result["arms"]) == {"demo", "labels: hard"}
    first = result["arms"]["demo"]["0"]
    assert 0 < first["dev_accuracy"] <= 1 and first["dev_images"] == 1000
    # the same teacher labelled for both arms (cached), so their teachers agree
    assert (
        first["teacher_test_accuracy"]
        == result["arms"]["labels: hard"]["0"]["teacher_test_accuracy"]
    )
    capsys.readouterr()
    demo_recipe.main(["--quick", "--seeds", "0", "--arms", "demo"])  # nothing left to train
    assert "seed 0: dev" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown arm 'nope'"):
        demo_recipe.main(["--arms", "nope"])
    # a table measured on another config (the demo's changed) is not mixed with new rows
    result["arms"]["labels: hard"]["0"]["config"] = "0" * 16
    (tmp_path / "demo-recipe-quick.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="arm 'labels: hard' seed 0 was measured on another"):
        demo_recipe.main(["--quick", "--seeds", "1", "--arms", "demo"])
    assert "1" not in json.loads((tmp_path / "demo-recipe-quick.json").read_text())["arms"]["demo"]


def test_the_arms_keep_the_config_they_were_measured_on(monkeypatch, tmp_path):
    demo = demo_recipe.arm_config(demo_recipe.BASE)
    assert demo.students[0].epochs == 4  # the demo as the table measured it, and today
    # the demo as shipped, its precision named as "auto" computes it on a CPU
    shipped = demo_recipe.config.load(demo_recipe.DEMO, demo_recipe.FP32)
    assert demo_recipe.fingerprint(demo) == demo_recipe.fingerprint(shipped)
    assert {demo.teacher.precision, demo.inference.precision, demo.students[0].precision} == {
        "fp32"
    }
    assert demo_recipe.config.load(demo_recipe.DEMO).teacher.precision == "auto"
    eight = demo_recipe.arm_config("student: 8 passes")
    assert demo_recipe.fingerprint(eight) != demo_recipe.fingerprint(shipped)
    # were the demo to ship 8 passes, its base arm would still be the 4 measured
    text = demo_recipe.DEMO.read_text()
    assert text.count("    epochs: 4 ") == 1
    (tmp_path / "demo.yaml").write_text(text.replace("    epochs: 4 ", "    epochs: 8 "))
    monkeypatch.setattr(demo_recipe, "DEMO", tmp_path / "demo.yaml")
    assert demo_recipe.arm_config(demo_recipe.BASE).students[0].epochs == 4
    assert demo_recipe.fingerprint(demo_recipe.arm_config("student: 8 passes")) == (
        demo_recipe.fingerprint(demo_recipe.config.load(tmp_path / "demo.yaml", demo_recipe.FP32))
    )


def test_processes_share_the_table_without_measuring_one_arm_twice(tmp_path):
    path = tmp_path / "demo-recipe.json"
    other, dead = os.getppid(), 2**22 + 12345  # a live process and (surely) no process
    path.write_text(
        json.dumps(
            {
                "arms": {"demo": {"0": _run([True, False], 0.87, 0.85)}},
                "running": {"labels: hard|0": other, "noise: M=5|0": dead},
            }
        )
    )
    mine = {"arms": {"labels: hard": {"1": _run([True, True], 0.88, 0.85)}}}
    assert not demo_recipe._save(path, mine, claim="demo|0")  # measured already
    assert not demo_recipe._save(path, mine, claim="labels: hard|0")  # another's, alive
    assert demo_recipe._save(path, mine, claim="noise: M=5|0")  # its claimer is gone
    file = json.loads(path.read_text())
    assert file["running"] == {"labels: hard|0": other, "noise: M=5|0": os.getpid()}
    assert set(file["arms"]["demo"]) == {"0"} and set(file["arms"]["labels: hard"]) == {"1"}
    mine["arms"]["noise: M=5"] = {"0": _run([False, True], 0.86, 0.85)}
    demo_recipe._save(path, mine)  # done: its claim goes, the other's stays
    assert json.loads(path.read_text())["running"] == {"labels: hard|0": other}


def test_the_harness_teacher_is_the_one_train_teacher_trains(
    tiny_dataset, mlflow_uri, tmp_path, monkeypatch
):
    # every arm is compared with the demo through this harness's teacher: it must be the
    # pipeline's own, weight for weight, given the same labelled images and seed
    import torch

    from noisy_student import stages
    from noisy_student.data import dataset, storage
    from noisy_student.registry import tracking
    from noisy_student.training import models

    cfg = demo_recipe.demo_config({"teacher.epochs": 2, "teacher.eval_every": 1})
    parent = tracking.start_run("harness-teacher", "run")
    trained = stages.train_teacher(cfg.teacher, tiny_dataset, str(tmp_path / "t"), parent, 3)
    pipeline = models.load(trained.url)[0].state_dict()

    def split(name: str) -> demo_recipe.Split:
        images = dataset.load(storage.join(tiny_dataset, name))[1]
        return demo_recipe.Split(images.images, images.labels)

    labelled, test = split(dataset.LABELLED), split(dataset.TEST)
    data = demo_recipe.Data(labelled, labelled, test, test)
    monkeypatch.setattr(demo_recipe, "CACHE", tmp_path / "cache")
    harness = demo_recipe.teacher_for(cfg, data, 3, 10, quick=True)[0].state_dict()
    assert pipeline.keys() == harness.keys()
    for key, value in pipeline.items():
        assert torch.equal(value, harness[key]), key
    # and the cached copy is the same network again
    cached = demo_recipe.teacher_for(cfg, data, 3, 10, quick=True)[0].state_dict()
    assert all(torch.equal(cached[k], v) for k, v in harness.items())
