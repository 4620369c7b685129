"""Choices are made on validation, the test split only reported, through the real flow:
the same run on a copy of the data whose test labels are shuffled makes every decision
the same; a dataset without validation runs and says that it chose on the test split."""

from __future__ import annotations

import shutil

import pytest
import torch

from noisy_student import config, results
from noisy_student.data import dataset, dataset_writer, ingest, storage
from noisy_student.stages.records import CHOSEN_ON_TEST
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # three small runs of the real flow: about 3 min on 2 busy cores

LEAN = [
    "teacher.epochs=15",  # a teacher far above chance: shuffled test labels must show
    "teacher.eval_every=5",
    "students=[{model: test_resnet, epochs: 1, batch_size: 16, ema_decay: 0.99}]",
    "selection.min_confidence=0.1",
    "evaluation.corruptions=[contrast, rotate]",
    "evaluation.severities=[2]",
    "evaluation.corruption_images=60",
    "evaluation.adversarial_images=60",
    "evaluation.fgsm_epsilons=[4]",
    "evaluation.gate.severities=[2]",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist_source, prefect_harness):
    """Three runs of one lean config: on a dataset with a validation split, on a copy of it
    whose test labels are shuffled, and on a dataset without validation. Each has a
    registered model of its own, so that no run's champion meets another's."""
    from flows.noisy_student import noisy_student

    tmp = tmp_path_factory.mktemp("choices")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(tmp)
    sizes = {"labelled_per_class": 10, "unlabelled_limit": 300, "test_limit": 200,
             "rows_per_shard": 150}  # fmt: skip
    with_validation = ingest.fashion_mnist(
        str(tmp / "data"), fashion_mnist_source, **sizes, validation_per_class=10
    )
    shuffled = str(tmp / "shuffled")
    shutil.copytree(with_validation, shuffled)
    manifest, test = dataset.load(storage.join(shuffled, dataset.TEST))
    labels = test.labels[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))]
    dataset_writer.write_rows(
        storage.join(shuffled, dataset.TEST),
        dataset.TEST,
        manifest.class_names,
        zip(test.ids, test.images[:, 0].numpy(), labels.tolist(), strict=True),
    )
    without = ingest.fashion_mnist(str(tmp / "plain"), fashion_mnist_source, **sizes)
    summaries = {}
    for name, root in (("data", with_validation), ("shuffled", shuffled), ("plain", without)):
        cfg = config.load(
            REPO / "pipeline_config" / "smoke.yaml",
            [f"name=ns-choices-{name}", f"artifacts={tmp}/artifacts", f"data.root={root}",
             "data.fashion_mnist=null", *LEAN],
        )  # fmt: skip
        summaries[name] = noisy_student(cfg)
    yield summaries
    mp.undo()


def _decisions(summary: dict) -> dict:
    """Everything the run decided, and the figures it decided on: nothing of the test split."""
    p = summary["promotion"]
    return {
        "decision": p["decision"],
        "chosen_on": p["chosen_on"],
        "comparison": p["comparison"],
        "candidate": {k: v for k, v in p["candidate"].items() if k != "reported"},
        "students_against_teachers": p["students_against_teachers"],
        "best_of_run": p["best_of_run"]
        and {
            k: v
            for k, v in p["best_of_run"].items()
            if k not in ("test_accuracy", "version", "run_id")  # reported; each run its own
        },
    }


def test_shuffling_the_test_labels_changes_no_decision(runs):
    real, shuffled = runs["data"], runs["shuffled"]
    assert real["promotion"]["chosen_on"] == "validation"
    assert _decisions(shuffled) == _decisions(real)
    # ... though the test figures, which are only reported, are those of shuffled labels
    teacher = [r["iterations"][0]["teacher"]["test_accuracy"] for r in (real, shuffled)]
    assert teacher[0] > 0.5 and teacher[1] < 0.25
    assert real["iterations"][0]["student"]["validation_accuracy"] == pytest.approx(
        shuffled["iterations"][0]["student"]["validation_accuracy"]
    )


def test_every_accuracy_of_the_summary_carries_its_interval(runs):
    it = runs["data"]["iterations"][0]
    for role in ("teacher", "student"):
        m = it[role]
        for key in ("test_accuracy", "corruption_accuracy", "validation_accuracy"):
            low, high = m[f"{key}_interval"]
            assert low <= m[key] <= high, key
        for name, interval in m["per_corruption_accuracy_interval"].items():
            assert interval[0] <= m["per_corruption_accuracy"][name] <= interval[1]
        assert set(m["fgsm_accuracy_interval"]) == {"4/255"}
        per_class = m["per_class"]["classes"]
        assert [c["images"] for c in per_class] == [
            sum(row) for row in m["per_class"]["confusion_matrix"]
        ]
        assert sum(c["images"] for c in per_class) == m["test_images"] == 200
    low, high = it["pseudo_labels"]["accuracy_interval"]
    assert low <= it["pseudo_labels"]["accuracy"] <= high


def test_a_dataset_without_validation_runs_and_says_it_chose_on_the_test_split(runs):
    summary = runs["plain"]
    promotion = summary["promotion"]
    assert promotion["chosen_on"] == "test" and promotion["note"] == CHOSEN_ON_TEST
    for v in promotion["students_against_teachers"]:
        assert v["comparison"]["note"] == CHOSEN_ON_TEST
    assert promotion["reasons"][0] == "there is no champion yet"  # its own registry
    for reason in promotion["reasons"]:
        assert "validation images" not in reason
        if " test images" in reason:
            assert f"test images ({CHOSEN_ON_TEST}: the dataset has no validation split)" in reason
    if promotion["best_of_run"]:
        assert promotion["best_of_run"]["against_final_student"]["note"] == CHOSEN_ON_TEST
    table = results.table(summary)
    assert (
        f"choices (the promotion gate, the best model, student vs teacher): {CHOSEN_ON_TEST}"
        in table
    )
    assert f"validation images ({CHOSEN_ON_TEST}" not in table
    assert f"test images ({CHOSEN_ON_TEST}: the dataset has no validation split)" in table
    assert (
        "**Chosen on the test split**"
        in storage.read_bytes(summary["robustness"]["report_url"]).decode()
    )
    assert "validation_accuracy" not in summary["iterations"][0]["student"]
