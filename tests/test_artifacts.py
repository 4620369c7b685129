"""What the Prefect UI shows of a run: artifact keys, the results table's rows, the link."""

from __future__ import annotations

import pytest

from tasks import artifacts


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("noisy-student-smoke", "noisy-student-smoke"),
        ("Noisy_Student FMNIST 250", "noisy-student-fmnist-250"),
        ("--odd..name--", "odd-name"),
        ("!!!", "noisy-student"),
    ],
)
def test_artifact_keys_are_lowercase_letters_digits_and_dashes(name, key):
    assert artifacts.artifact_key(name) == key


def test_results_rows_hold_one_row_per_iteration_in_percent():
    model = {"model": "test_resnet", "mce": 0.95, "ece_clean": 0.031, "mlflow_run_id": "s1"}
    summary = {
        "iterations": [
            {
                "iteration": 1,
                "teacher": {**model, "test_accuracy": 0.8, "mce": 1.0, "mlflow_run_id": "t1"},
                "student": {
                    **model,
                    "test_accuracy": 0.8234,
                    "test_accuracy_interval": [0.8159, 0.8307],
                },
                "pseudo_labels": {"kept": 1500, "total": 2000, "accuracy": 0.9},
            }
        ],
        "chosen_on": "validation",
        "promotion": {
            "students_against_teachers": [{"iteration": 1, "verdict": "significantly above"}]
        },
    }
    (row,) = artifacts.results_rows(summary)
    assert row["teacher test accuracy %"] == 80.0 and row["student test accuracy %"] == 82.34
    assert row["student 95% interval"] == "81.59-83.07" and row["teacher 95% interval"] is None
    assert row["student vs teacher (validation)"] == "significantly above"
    assert row["gain (points)"] == 2.34 and row["pseudo labels kept"] == "1500/2000"
    assert row["teacher mCE"] == 100.0 and row["student ECE %"] == 3.1
    assert row["student MLflow run"] == "s1"


def test_the_mlflow_link_exists_only_for_a_tracking_server(mlflow_uri):
    assert artifacts.mlflow_run_url("ns-test", "0" * 32) is None
