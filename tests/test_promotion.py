"""The promotion gate against a real registry (MLflow on SQLite): a student below a
better model of its own run never becomes champion over it, and the results table says
what to try."""

from __future__ import annotations

import logging

import pytest
import torch
from mlflow import MlflowClient

from noisy_student import config, models, report, stages, tracking
from noisy_student.stages import Robustness, TrainedModel
from noisy_student.stages.promote import below_teacher_note

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EVALUATION = config.EvaluationConfig(corruptions=["contrast"], severities=[1])


def trained(tmp_path, experiment: str, name: str, role: str, register: bool) -> TrainedModel:
    """A finished MLflow run with a checkpoint, as the train stages leave it: a student is
    a registered version, a first teacher is not."""
    torch.manual_seed(0)
    meta = models.ModelMeta("test_resnet", 10, 1, [str(i) for i in range(10)], 28, 28, "L")
    url = models.save(models.create("test_resnet", 10, 1), meta, str(tmp_path / name))
    run_id = tracking.start_run(experiment, name)
    tracking.log_checkpoint(run_id, url)
    tracking.end_run(run_id)
    if register:
        tracking.register(run_id, experiment)
    return TrainedModel(role, 1, "test_resnet", url, run_id, None, 1.0)


def evaluated(iteration: int, teacher: TrainedModel, t: float, student: TrainedModel, s: float):
    """An iteration's evaluation: its teacher and student side by side (clean accuracy,
    accuracy under corruption)."""
    return Robustness(
        "unused",
        "unused",
        0.0,
        [
            {
                "mlflow_run_id": m.mlflow_run_id,
                "role": role,
                "iteration": iteration,
                "model": m.model,
                "test_accuracy": acc,
                "corruption_accuracy": acc - 0.2,
            }
            for m, role, acc in ((teacher, "teacher", t), (student, "student", s))
        ],
    )


@pytest.fixture(autouse=True)
def _gate_log(caplog):
    caplog.set_level(logging.INFO, logger="noisy_student")  # the notes the gate logs


def run_config(*students: dict, stem: str = "imagenet") -> dict:
    """The parts of a run's configuration (`PipelineConfig.model_dump()`) that say what a
    student below its teacher already had: the teacher's stem and these students."""
    return {
        "teacher": config.TeacherConfig(model="resnet10t", stem=stem).model_dump(),
        "students": [
            config.StudentConfig(**{"model": "resnet10t", **s}).model_dump() for s in students
        ],
    }


def gate(student, robustness, experiment, tmp_path):
    parent = tracking.start_run(experiment, "pipeline")
    return stages.promote(
        student,
        robustness,
        experiment,
        EVALUATION,
        "unused",
        str(tmp_path / "run"),
        parent,
        1,
        run_config({}, {}),
    )


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_a_student_below_its_teacher_leaves_the_teacher_champion_of_an_empty_registry(
    tmp_path, mlflow_uri, caplog
):
    experiment = "ns-below"
    teacher = trained(tmp_path, experiment, "teacher", "teacher", register=False)
    student = trained(tmp_path, experiment, "student", "student", register=True)
    record = gate(student, [evaluated(1, teacher, 0.85, student, 0.81)], experiment, tmp_path)

    client = MlflowClient(mlflow_uri)
    champion = client.get_model_version_by_alias(experiment, "champion")
    assert champion.run_id == teacher.mlflow_run_id and str(champion.version) == "2"
    assert champion.tags[f"{tracking.TAG}promotion"] == "champion"
    challenger = client.get_model_version_by_alias(experiment, "challenger")
    assert challenger.run_id == student.mlflow_run_id
    assert record["decision"] == "challenger"
    assert "test accuracy 0.8100 < teacher 1's 0.8500 in this run" in record["reasons"]
    assert record["best_of_run"] == {
        "label": "teacher 1",
        "run_id": teacher.mlflow_run_id,
        "model": "test_resnet",
        "test_accuracy": 0.85,
        "version": "2",
        "decision": "champion",
    }
    note = next(line for line in caplog.messages if line.startswith("student 1 "))
    assert "ends 4.00 points below its teacher" in note and "try more students.0.epochs" in note


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_a_student_above_its_teacher_becomes_champion_as_before(tmp_path, mlflow_uri, caplog):
    experiment = "ns-above"
    teacher = trained(tmp_path, experiment, "teacher", "teacher", register=False)
    student = trained(tmp_path, experiment, "student", "student", register=True)
    record = gate(student, [evaluated(1, teacher, 0.80, student, 0.82)], experiment, tmp_path)
    assert record["decision"] == "champion" and record["best_of_run"] is None
    champion = MlflowClient(mlflow_uri).get_model_version_by_alias(experiment, "champion")
    assert champion.run_id == student.mlflow_run_id
    assert not [line for line in caplog.messages if "below its teacher" in line]


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_an_earlier_student_better_than_the_last_one_is_promoted_in_its_place(
    tmp_path, mlflow_uri, caplog
):
    experiment = "ns-earlier"
    teacher = trained(tmp_path, experiment, "teacher", "teacher", register=False)
    first = trained(tmp_path, experiment, "student-1", "student", register=True)
    last = trained(tmp_path, experiment, "student-2", "student", register=True)
    robustness = [
        evaluated(1, teacher, 0.80, first, 0.84),
        evaluated(2, first, 0.84, last, 0.82),  # the first student teaches the second
    ]
    record = gate(last, robustness, experiment, tmp_path)
    client = MlflowClient(mlflow_uri)
    assert str(client.get_model_version_by_alias(experiment, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(experiment, "challenger").version) == "2"
    assert record["best_of_run"]["label"] == "student 1"
    assert [line.split(" (")[0] for line in caplog.messages if "below its teacher" in line] == [
        "student 2"
    ]
    assert len(client.search_model_versions(f"name='{experiment}'")) == 2  # nothing added


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_a_champion_that_taught_a_worse_student_stays_champion(tmp_path, mlflow_uri, caplog):
    experiment = "ns-stays"
    champion = trained(tmp_path, experiment, "champion", "student", register=True)
    tracking.set_alias(experiment, "champion", "1")
    student = trained(tmp_path, experiment, "student", "student", register=True)
    record = gate(student, [evaluated(1, champion, 0.90, student, 0.88)], experiment, tmp_path)
    assert record["decision"] == "challenger"
    assert record["best_of_run"]["decision"] == "champion"
    assert record["best_of_run"]["version"] == "1"
    client = MlflowClient(mlflow_uri)
    assert (
        client.get_model_version_by_alias(experiment, "champion").run_id == champion.mlflow_run_id
    )
    assert str(client.get_model_version_by_alias(experiment, "challenger").version) == "2"


# --- the results table


def _entry(model: str, accuracy: float) -> dict:
    return {
        "model": model,
        "mlflow_run_id": "r",
        "test_accuracy": accuracy,
        "corruption_accuracy": accuracy - 0.2,
        "mce": None,
        "relative_mce": None,
        "ece_clean": 0.01,
        "ece_corrupted": 0.02,
        "fgsm_accuracy": {"2": 0.3},
    }


def _summary(teacher: float, student: float) -> dict:
    return {
        "iterations": [
            {
                "iteration": 1,
                "teacher": _entry("resnet10t", teacher),
                "student": _entry("resnet18", student),
                "pseudo_labels": {"kept": 900, "total": 1000, "accuracy": 0.85},
                "stage_seconds": dict.fromkeys(
                    ["train_teacher", "infer_pseudo_labels", "filter_and_balance"]
                    + ["train_student", "evaluate_robustness"],
                    1.0,
                ),
            }
        ],
        "seconds": 5.0,
        "mlflow": {"parent_run_id": "p", "tracking_uri": "sqlite:///mlflow.db"},
        "config": run_config({}),
    }


def test_the_results_table_flags_a_student_below_its_teacher_with_what_to_try():
    text = report.table(_summary(0.85, 0.81))
    row = next(line for line in text.splitlines() if line.startswith("   1"))
    assert " -4.00!" in row
    assert (
        "! student 1 (resnet18, 81.00%) ends 4.00 points below its teacher (resnet10t, 85.00%): "
        "try more students.0.epochs" in text
    )
    assert "below its teacher" not in report.table(_summary(0.81, 0.85))


def _tries(iteration: int, student: str, teacher: str, cfg: dict) -> str:
    note = below_teacher_note(iteration, student, 0.80, teacher, 0.85, cfg)
    return note.split(": try ", 1)[1]


def test_what_to_try_leaves_out_what_the_student_already_had():
    # the teacher's network from scratch: starting from the teacher is worth a try
    assert _tries(1, "resnet10t", "resnet10t", run_config({})) == (
        "more students.0.epochs, students.0.init_from_teacher: true, a larger student or a "
        "stem that keeps more of the image (teacher.stem: half)"
    )
    # already started from its teacher, on a stem that keeps half the image (inherited
    # from the first teacher through a student that names none)
    started = run_config({}, {"init_from_teacher": True}, stem="half")
    assert _tries(2, "resnet18d", "resnet18d", started) == (
        "more students.1.epochs or a larger student"
    )
    # another network cannot start from the teacher's weights; its own stem counts
    other = run_config({"model": "resnet18d", "stem": "stride1"})
    assert _tries(1, "resnet18d", "resnet10t", other) == (
        "more students.0.epochs or a larger student"
    )
    # a family with no `half` stem is not told to try one
    vit = run_config({"model": "test_vit"})
    assert _tries(1, "test_vit", "resnet10t", vit) == "more students.0.epochs or a larger student"
