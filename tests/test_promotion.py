"""The promotion gate against a real registry (MLflow on SQLite): paired tests on the same
validation images decide, a student below a significantly better model of its own run
never becomes champion over it, and the results table says how each student stands
against its teacher and what to try."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from noisy_student import config, results
from noisy_student.data import storage
from noisy_student.evaluation import statistics
from noisy_student.evaluation.scores import ChoiceScores
from noisy_student.registry import tracking
from noisy_student.stages import Robustness, TrainedModel, promote
from noisy_student.stages.promote import Comparison, below_teacher_note, compare, decide, describe
from noisy_student.training import models
from tests.conftest import model_scores

pytestmark = pytest.mark.usefixtures("torch_one_thread")
IMAGES = 1000  # validation images every model is judged on
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


def right_on(first: int, wrong: range = range(0), right: range = range(0)) -> np.ndarray:
    """Which of the validation images a model gets right: rows [0, first), except those in
    `wrong`, plus those in `right`."""
    correct = np.arange(IMAGES) < first
    correct[list(wrong)] = False
    correct[list(right)] = True
    return correct


def _predictions(
    m: TrainedModel, iteration: int, correct: np.ndarray, corrupted: np.ndarray | None = None
) -> pd.DataFrame:
    """A model's answers on the choice suite, as evaluate_robustness keeps them: the clean
    validation images, right where `correct` says, and their copies under the gate's
    corruption, right where `corrupted` says (by default: as clean)."""
    labels = np.arange(IMAGES) % 10
    frames = [
        pd.DataFrame(
            {
                "corruption": corruption,
                "severity": np.int16(severity),
                "row": np.arange(IMAGES, dtype=np.int32),
                "label": labels.astype(np.int16),
                "predicted": np.where(right, labels, (labels + 1) % 10).astype(np.int16),
            }
        )
        # the gate's severity 3
        for corruption, severity, right in (
            ("clean", 0, correct),
            ("contrast", 3, correct if corrupted is None else corrupted),
        )
    ]
    return pd.concat(frames).assign(
        model=m.model,
        mlflow_run_id=m.mlflow_run_id,
        iteration=iteration,
        role=m.role,
        suite="choice",
        split="validation",
    )


def evaluated(tmp_path, iteration: int, teacher: TrainedModel, t, student: TrainedModel, s):
    """An iteration's evaluation: its teacher and student side by side, each right on the
    validation images `t` and `s` say, with the predictions beside the table."""
    folder = tmp_path / f"robustness-{iteration}"
    folder.mkdir(exist_ok=True)
    frames, entries = [], []
    for m, role, correct in ((teacher, "teacher", t), (student, "student", s)):
        frames.append(_predictions(m, iteration, correct))
        accuracy = float(correct.mean())
        choice = ChoiceScores(
            split="validation", images=len(correct), accuracy=accuracy, accuracy_interval=None,
            corruption_accuracy=0.0, corruption_accuracy_interval=None,
        )  # fmt: skip
        entries.append(
            model_scores(
                mlflow_run_id=m.mlflow_run_id,
                role=role,
                iteration=iteration,
                model=m.model,
                test_accuracy=accuracy - 0.01,  # reported only: never read by the gate
                choice=choice,
            )
        )
    pd.concat(frames).to_parquet(folder / "predictions.parquet", index=False)
    table = str(folder / "robustness.parquet")
    return Robustness(
        url=str(folder),
        mlflow_run_id="unused",
        seconds=0.0,
        models=entries,
        table_url=table,
        chosen_on="validation",
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


def gate(student, robustness, experiment, tmp_path, evaluation=EVALUATION):
    parent = tracking.start_run(experiment, "pipeline")
    return promote(
        student,
        robustness,
        experiment,
        evaluation,
        "unused",
        str(tmp_path / "run"),
        parent,
        1,
        run_config({}, {}),
    )


def alias(uri: str, experiment: str, name: str):
    return MlflowClient(uri).get_model_version_by_alias(experiment, name)


@pytest.mark.slow  # registers models in MLflow: 10-20 s
@pytest.mark.parametrize(
    ("candidate", "decision", "counts"),
    [
        # 0.1 point better: 6 images right only by the candidate, 5 only by the champion
        (right_on(850, wrong=range(5), right=range(850, 856)), "challenger", (6, 5)),
        # 3 points better: 40 against 10
        (right_on(850, wrong=range(10), right=range(850, 890)), "champion", (40, 10)),
    ],
)
def test_under_the_default_gate_only_a_gain_beyond_chance_is_promoted(
    tmp_path, mlflow_uri, candidate, decision, counts
):
    experiment = f"ns-gain-{decision}"
    champion = trained(tmp_path, experiment, "champion", "student", register=True)
    tracking.set_alias(experiment, "champion", "1")
    student = trained(tmp_path, experiment, "student", "student", register=True)
    robustness = [evaluated(tmp_path, 1, champion, right_on(850), student, candidate)]
    record = gate(student, robustness, experiment, tmp_path)

    assert record.decision == decision and record.chosen_on == "validation"
    accuracy = record.comparison["accuracy"]
    assert (accuracy["only_first_right"], accuracy["only_second_right"]) == counts
    assert accuracy["images"] == IMAGES and accuracy["test"] == "exact McNemar"
    assert accuracy["p_value"] == statistics.binomial_two_sided(counts[1], sum(counts))
    assert accuracy["difference"] == pytest.approx((counts[0] - counts[1]) / IMAGES)
    verdict = statistics.ABOVE if decision == "champion" else statistics.TIED
    assert record.comparison["verdict"] == verdict
    assert f"{100 * accuracy['difference']:+.2f} points, {verdict}" in record.reasons[0]
    assert f"{counts[0]} images right only by the candidate" in record.reasons[0]
    b, c = counts  # the paired difference's Wald interval, by hand
    half = 1.959964 * math.sqrt((b + c) / IMAGES - ((b - c) / IMAGES) ** 2) / math.sqrt(IMAGES)
    low, high = 100 * ((b - c) / IMAGES - half), 100 * ((b - c) / IMAGES + half)
    assert f"the difference's 95% interval {low:+.2f} to {high:+.2f} points" in record.reasons[0]
    version = alias(mlflow_uri, experiment, decision)
    assert version.run_id == student.mlflow_run_id
    assert version.tags[f"{tracking.TAG}gate_verdict"] == verdict
    assert version.tags[f"{tracking.TAG}gate_paired_counts"].startswith(
        f"both right {850 - counts[1]}, candidate only {counts[0]}, champion only {counts[1]}"
    )
    on_disk = storage.read_json(str(tmp_path / "run" / "promotion.json"))
    assert on_disk["comparison"] == record.comparison


def test_a_gain_below_the_margin_or_a_loss_of_robustness_keeps_the_champion():
    champion = TrainedModel("student", 1, "test_resnet", "", "champion", None, 0.0)
    candidate = TrainedModel("student", 1, "test_resnet", "", "candidate", None, 0.0)
    better = right_on(850, wrong=range(10), right=range(850, 890))  # +3 points, p < 0.001

    def gate_on(corrupted: np.ndarray | None = None, **settings) -> tuple[bool, list[str]]:
        predictions = pd.concat(
            [
                _predictions(champion, 1, right_on(850)),
                _predictions(candidate, 1, better, corrupted),
            ]
        ).assign(suite="choice", split="validation")
        gate = config.GateConfig(**settings)
        return decide(compare(predictions, "candidate", "champion", gate, ["contrast"]), gate)

    assert gate_on()[0] and gate_on(test="bootstrap")[0]
    promoted, reasons = gate_on(min_margin=0.05)
    assert not promoted
    assert reasons[-1] == "the gain 3.00 points is below evaluation.gate.min_margin 5.00"
    # as accurate on clean images, but 8 points worse under corruption
    promoted, reasons = gate_on(right_on(770))
    assert not promoted and reasons[-1] == "the candidate is significantly less robust"
    assert (
        "under the gate's corruptions 77.00% vs 85.00%: -8.00 points, significantly below"
        in (reasons[1])
    )


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_non_inferiority_keeps_a_fresh_model_unless_it_is_worse_beyond_chance(tmp_path, mlflow_uri):
    experiment = "ns-fresh"
    champion = trained(tmp_path, experiment, "champion", "student", register=True)
    tracking.set_alias(experiment, "champion", "1")
    fresh = EVALUATION.model_copy(
        update={"gate": config.GateConfig(mode="non_inferiority", min_margin=0.01)}
    )
    close = trained(tmp_path, experiment, "close", "student", register=True)
    slightly_worse = right_on(850, wrong=range(6), right=range(850, 855))  # -0.1 point
    record = gate(close, [evaluated(tmp_path, 1, champion, right_on(850), close,
                                    slightly_worse)], experiment, tmp_path, fresh)  # fmt: skip
    assert record.decision == "champion"
    assert record.comparison["verdict"] == statistics.TIED

    worse = trained(tmp_path, experiment, "worse", "student", register=True)
    clearly_worse = right_on(850, wrong=range(40), right=range(850, 860))  # -3 points
    record = gate(worse, [evaluated(tmp_path, 1, close, slightly_worse, worse,
                                    clearly_worse)], experiment, tmp_path, fresh)  # fmt: skip
    assert record.decision == "challenger"
    assert record.comparison["verdict"] == statistics.BELOW


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_a_student_significantly_below_its_teacher_leaves_the_teacher_champion(
    tmp_path, mlflow_uri, caplog
):
    experiment = "ns-below"
    teacher = trained(tmp_path, experiment, "teacher", "teacher", register=False)
    student = trained(tmp_path, experiment, "student", "student", register=True)
    below = right_on(850, wrong=range(50), right=range(850, 860))  # 81% against 85%
    record = gate(
        student, [evaluated(tmp_path, 1, teacher, right_on(850), student, below)], experiment,
        tmp_path,
    )  # fmt: skip

    champion = alias(mlflow_uri, experiment, "champion")
    assert champion.run_id == teacher.mlflow_run_id and str(champion.version) == "2"
    assert champion.tags[f"{tracking.TAG}promotion"] == "champion"
    assert alias(mlflow_uri, experiment, "challenger").run_id == student.mlflow_run_id
    assert record.decision == "challenger"
    best = record.best_of_run
    assert (best["label"], best["version"], best["decision"]) == ("teacher 1", "2", "champion")
    assert best["accuracy"] == 0.85 and best["chosen_on"] == "validation"
    assert best["against_final_student"]["verdict"] == statistics.ABOVE
    [versus] = record.students_against_teachers
    assert versus["verdict"] == statistics.BELOW
    note = next(line for line in caplog.messages if line.startswith("student 1 ("))
    assert "ends 4.00 points below its teacher" in note and "try more students.0.epochs" in note
    assert (
        "on the validation split, significantly below (exact McNemar: 10 images right only by "
        "the student, 50 only by the teacher" in note
    )


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_a_student_below_its_teacher_by_chance_is_no_significant_difference(
    tmp_path, mlflow_uri, caplog
):
    experiment = "ns-by-chance"
    teacher = trained(tmp_path, experiment, "teacher", "teacher", register=False)
    student = trained(tmp_path, experiment, "student", "student", register=True)
    tenth_below = right_on(850, wrong=range(3), right=range(850, 852))
    record = gate(
        student, [evaluated(tmp_path, 1, teacher, right_on(850), student, tenth_below)],
        experiment, tmp_path,
    )  # fmt: skip
    # nothing is significantly better than the student: it is the first champion
    assert record.decision == "champion" and record.best_of_run is None
    assert record.students_against_teachers[0]["verdict"] == statistics.TIED
    assert not [line for line in caplog.messages if "below its teacher" in line]
    tags = MlflowClient(mlflow_uri).get_run(tracking.registered_run_id(experiment, "1")).data.tags
    assert tags[f"{tracking.TAG}promotion"] == "champion"


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_an_earlier_student_significantly_better_than_the_last_is_promoted_in_its_place(
    tmp_path, mlflow_uri, caplog
):
    experiment = "ns-earlier"
    teacher = trained(tmp_path, experiment, "teacher", "teacher", register=False)
    first = trained(tmp_path, experiment, "student-1", "student", register=True)
    last = trained(tmp_path, experiment, "student-2", "student", register=True)
    robustness = [
        evaluated(tmp_path, 1, teacher, right_on(800), first, right_on(840)),
        # the first student teaches the second, which falls back to the teacher's answers
        evaluated(tmp_path, 2, first, right_on(840), last, right_on(800)),
    ]
    record = gate(last, robustness, experiment, tmp_path)
    assert str(alias(mlflow_uri, experiment, "champion").version) == "1"
    assert str(alias(mlflow_uri, experiment, "challenger").version) == "2"
    assert record.best_of_run["label"] == "student 1"
    verdicts = [v["verdict"] for v in record.students_against_teachers]
    assert verdicts == [statistics.ABOVE, statistics.BELOW]
    notes = [line.split(" (")[0] for line in caplog.messages if "below its teacher" in line]
    assert notes == ["student 2"]
    assert len(MlflowClient(mlflow_uri).search_model_versions(f"name='{experiment}'")) == 2


@pytest.mark.slow  # registers models in MLflow: 5-10 s
def test_a_champion_that_taught_a_worse_student_stays_champion(tmp_path, mlflow_uri):
    experiment = "ns-stays"
    champion = trained(tmp_path, experiment, "champion", "student", register=True)
    tracking.set_alias(experiment, "champion", "1")
    student = trained(tmp_path, experiment, "student", "student", register=True)
    robustness = [evaluated(tmp_path, 1, champion, right_on(900), student, right_on(860))]
    record = gate(student, robustness, experiment, tmp_path)
    assert record.decision == "challenger"
    assert record.best_of_run["decision"] == "champion"
    assert record.best_of_run["version"] == "1"
    assert alias(mlflow_uri, experiment, "champion").run_id == champion.mlflow_run_id
    assert str(alias(mlflow_uri, experiment, "challenger").version) == "2"


# --- the results table


def _entry(model: str, accuracy: float) -> dict:
    return {
        "model": model,
        "mlflow_run_id": "r",
        "test_accuracy": accuracy,
        "test_accuracy_interval": list(statistics.accuracy_interval(accuracy, 10_000)),
        "corruption_accuracy": accuracy - 0.2,
        "mce": None,
        "relative_mce": None,
        "ece_clean": 0.01,
        "ece_corrupted": 0.02,
        "fgsm_accuracy": {"2": 0.3},
    }


def _summary(teacher: float, student: float, verdict: dict | None = None) -> dict:
    promotion = {"chosen_on": "validation", "students_against_teachers": [verdict or {}]}
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
        "promotion": promotion if verdict else {},
    }


def test_the_results_table_says_how_each_student_stands_and_what_to_try_when_below():
    note = below_teacher_note(1, "resnet18", 0.81, "resnet10t", 0.85, run_config({}),
                              " on the validation split, significantly below (…)")  # fmt: skip
    below = {"iteration": 1, "verdict": statistics.BELOW, "note": note, "sentence": "s1"}
    text = results.table(_summary(0.85, 0.81, below))
    row = next(line for line in text.splitlines() if line.startswith("   1"))
    assert " 85.0 [84.3, 85.7]" in row and " 81.0 [80.2, 81.8]" in row
    assert " -4.00  significantly below" in row
    assert (
        "! student 1 (resnet18, 81.00%) ends 4.00 points below its teacher (resnet10t, 85.00%) "
        "on the validation split, significantly below (…): try more students.0.epochs" in text
    )
    assert "on the validation split; the test figures above are reported only" in text
    # the same figures without a significant difference: no note
    tied = {"iteration": 1, "verdict": statistics.TIED, "sentence": "s1"}
    text = results.table(_summary(0.85, 0.849, tied))
    assert "no significant difference" in text and "below its teacher" not in text


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


def test_a_step_the_split_cannot_resolve_is_said_with_its_interval():
    """The accuracy table's first student: +1.40 points on 500 validation images (15 images
    right only by it, 8 only by its teacher) is "no significant difference"; the sentence
    gives the interval, -0.48 to +3.28 points, so that nobody reads it as "no gain"."""
    only_student, only_teacher, images = 15, 8, 500
    student = np.zeros(images, bool)
    teacher = np.zeros(images, bool)
    student[:only_student] = True
    teacher[only_student : only_student + only_teacher] = True
    student[23:440] = teacher[23:440] = True  # 417 right by both, 60 by neither
    accuracy = statistics.mcnemar(student, teacher)
    robust = statistics.paired_bootstrap(student * 1.0, teacher * 1.0, 200, 0)
    sentence = describe(
        Comparison("validation", accuracy, robust, 0.05), "student 1", "its teacher"
    )[0]
    assert "+1.40 points, no significant difference" in sentence
    assert "the difference's 95% interval -0.48 to +3.28 points" in sentence
