"""benchmarks/ensemble_labels.py: the labellers give what they say, the second students of a
seed start from one student 1, the table compares each labeller with the base on the same
development images, and a run resumes."""

import json

import numpy as np
import pytest

from benchmarks import demo_recipe, ensemble_labels
from benchmarks.student_recipe import _packed


def test_the_labellers_are_the_last_model_and_the_mean_of_both():
    teacher = np.array([[0.9, 0.1], [0.2, 0.8]])
    student = np.array([[0.3, 0.7], [0.4, 0.6]])
    prior = np.array([0.5, 0.5])
    assert ensemble_labels.labeller_probs("student 1", teacher, student, prior) is student
    mean = ensemble_labels.labeller_probs("teacher + student 1", teacher, student, prior)
    assert mean == pytest.approx(np.array([[0.6, 0.4], [0.3, 0.7]]))
    # aligned: the student's mean prediction (0.35, 0.65) brought to the labelled shares
    aligned = ensemble_labels.labeller_probs("student 1, aligned", teacher, student, prior)
    assert aligned.mean(0) == pytest.approx(prior, abs=1e-3)
    assert aligned.argmax(1).tolist() == [1, 0]  # the less sure image changes class
    with pytest.raises(ValueError, match="unknown labeller 'nope'"):
        ensemble_labels.labeller_probs("nope", teacher, student, prior)


def _run(dev: list[bool], test: float) -> dict:
    right = np.array(dev)
    return {
        "teacher_test_accuracy": 0.85,
        "student1_test_accuracy": 0.87,
        "labeller_pool_accuracy": 0.88,
        "labeller_dev_accuracy": 0.89,
        "dev_accuracy": float(right.mean()),
        "dev_right": _packed(right),
        "dev_images": len(right),
        "test_accuracy": test,
    }


def test_the_table_compares_each_labeller_with_the_base_on_the_same_images():
    base, better = [True] * 80 + [False] * 20, [True] * 90 + [False] * 10
    result = {
        "date": "2026-12-07T00:00:00+00:00",
        "hardware": {"cpu": "Intel Xeon", "cpu_cores": 2, "gpu": None, "torch": "2"},
        "arms": {
            "student 1": {"0": _run(base, 0.875), "1": _run(base, 0.87)},
            "teacher + student 1": {"0": _run(better, 0.88), "1": _run(better, 0.885)},
        },
    }
    table = ensemble_labels.markdown(result)
    row = next(line for line in table.splitlines() if line.startswith("| teacher + student 1"))
    assert "| 0, 1 | 88.00, 88.00 | 89.00, 89.00 | 90.00, 90.00 |" in row
    assert "+10.00 (0.002), +10.00 (0.002)" in row  # 10 images right only by it, none less
    assert "85.00 -> 87.00 -> 88.50" in row
    del result["arms"]["teacher + student 1"]
    assert "| teacher + student 1 | not yet run |" in ensemble_labels.markdown(result)


def test_the_table_says_which_seeds_ran_on_which_machine():
    # seeds of one table may come from sittings on other CPU models; each seed's labellers
    # run in one sitting, so its comparisons are on one machine, but the reader must know
    def host(cpu: str) -> dict:
        return {"cpu": cpu, "cpu_cores": 2, "gpu": None, "torch": "2"}

    run = _run([True] * 8 + [False] * 2, 0.87)
    result = {
        "date": "2026-12-07T00:00:00+00:00",
        "hardware": host("AMD EPYC (AVX512)"),
        "arms": {
            "student 1": {"0": run, "1": run, "5": {**run, "hardware": host("AMD EPYC (AVX512)")}}
        },
    }
    # rows without a machine (written before rows kept one) count as the file's
    assert "more than one machine" not in ensemble_labels.markdown(result)
    for seed in ("0", "1"):  # two seeds from a sitting on another machine
        result["arms"]["student 1"][seed] = {**run, "hardware": host("Intel Xeon")}
    assert (
        "The seeds ran on more than one machine: seeds 0, 1 on Intel Xeon, 2 cores, no GPU; "
        "seeds 5 on AMD EPYC (AVX512), 2 cores, no GPU." in ensemble_labels.markdown(result)
    )


def test_a_quick_run_writes_its_table_and_resumes(
    fashion_mnist_source, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(ensemble_labels, "RESULTS", tmp_path)
    monkeypatch.setattr(demo_recipe, "CACHE", tmp_path / "cache")
    ensemble_labels.main(["--quick", "--seeds", "0"])
    result = json.loads((tmp_path / "ensemble-labels-quick.json").read_text())
    base, mean = result["arms"]["student 1"]["0"], result["arms"]["teacher + student 1"]["0"]
    assert base["dev_images"] == 1000 and 0 < mean["dev_accuracy"] <= 1
    # the second students learn after the same student 1, from different labels
    assert base["student1_test_accuracy"] == mean["student1_test_accuracy"]
    assert base["labeller_dev_accuracy"] == base["student1_dev_accuracy"]
    assert mean["labeller_pool_accuracy"] != base["labeller_pool_accuracy"]
    assert len(list((tmp_path / "cache").glob("student1-*.safetensors"))) == 1
    assert "| teacher + student 1 | 0 |" in (tmp_path / "ensemble-labels-quick.md").read_text()
    capsys.readouterr()
    ensemble_labels.main(["--quick", "--seeds", "0"])  # nothing left to train
    assert "seed 0: labels" not in capsys.readouterr().out
    (tmp_path / "ensemble-labels-quick.md").unlink()
    ensemble_labels.main(["--quick", "--report"])  # the table again, from the file
    assert "| student 1, aligned | 0 |" in capsys.readouterr().out
    assert (tmp_path / "ensemble-labels-quick.md").exists()
    with pytest.raises(SystemExit, match="unknown labeller 'nope'"):
        ensemble_labels.main(["--quick", "--labellers", "nope"])
    (tmp_path / "ensemble-labels-quick.json").unlink()
    with pytest.raises(SystemExit, match="ensemble-labels-quick.json: no results to report"):
        ensemble_labels.main(["--quick", "--report"])
