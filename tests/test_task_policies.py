"""The tasks' cache and retry policies."""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import pytest
from prefect.serializers import JSONSerializer

import noisy_student
from noisy_student.evaluation.scores import ChoiceScores
from noisy_student.stages.records import (
    PromotionDecision,
    PseudoLabelShard,
    Robustness,
    SelectedPseudoLabels,
    TrainedModel,
)
from tasks import policies
from tests.conftest import model_scores


def test_every_record_a_task_returns_reads_back_equal_from_its_json_result():
    """A cached result that fails to read back is silently a cache miss: the work redone."""
    records = [
        TrainedModel("teacher", 1, "resnet18", "/r/teacher", "abc", 0.81, 12.5),
        PseudoLabelShard(3, "/r/pseudo/part-00003.parquet", 8192, "f" * 64, 4.25),
        SelectedPseudoLabels(
            url="/r/selected",
            probabilities_url="/r/pseudo",
            mlflow_run_id="run1",
            inference_run_id="run2",
            total=100,
            kept=80,
            selected=90,
            accuracy=0.9,
            accuracy_all=None,
            inference_seconds=1.5,
            seconds=2.5,
            per_class=[{"class": 0, "kept": 8, "final": 9, "name": "T-shirt/top"}],
        ),
        Robustness(
            url="/r/rob",
            mlflow_run_id="run3",
            seconds=3.0,
            models=[
                model_scores(
                    role="student",
                    per_corruption={"fog": 0.5},
                    test_accuracy_interval=[0.7, 0.8],
                    per_severity_interval={"fog": [[0.4, 0.6], None]},
                    choice=ChoiceScores(
                        split="validation",
                        images=50,
                        accuracy=0.8,
                        accuracy_interval=[0.7, 0.9],
                        corruption_accuracy=0.6,
                        corruption_accuracy_interval=[0.5, 0.7],
                    ),  # fmt: skip
                    per_class={"classes": [{"class": "a", "precision": None}]},
                )
            ],
        ),
        PromotionDecision(
            registered_model="ns",
            version="2",
            run_id="run4",
            decision="challenger",
            chosen_on="validation",
            gate={"mode": "superiority", "alpha": 0.05},
            reasons=["the candidate must be significantly more accurate"],
            candidate={"accuracy": 0.8, "reported": {"test_accuracy": 0.79}},
            champion=None,
            comparison=None,
            students_against_teachers=[{"iteration": 1, "verdict": "no significant difference"}],
        ),
    ]
    serializer = JSONSerializer()
    for record in records:
        assert serializer.loads(serializer.dumps(record)) == record


def test_an_edit_to_the_core_source_changes_the_tasks_cache_key(tmp_path, monkeypatch):
    """The work happens in `noisy_student/`: a re-run after an edit there redoes it."""
    core = tmp_path / "noisy_student"
    shutil.copytree(
        Path(noisy_student.__file__).parent, core, ignore=shutil.ignore_patterns("__pycache__")
    )
    monkeypatch.setattr(noisy_student, "__file__", str(core / "__init__.py"))
    monkeypatch.setattr(policies, "_core_digest", cache(policies._core_digest.__wrapped__))
    before = policies.RESUMABLE.compute_key(None, {"shard_index": 3}, {})
    assert policies.RESUMABLE.compute_key(None, {"shard_index": 3}, {}) == before  # stable
    with open(core / "__init__.py", "a") as f:
        f.write("\n# an edit\n")
    policies._core_digest.cache_clear()
    assert policies.RESUMABLE.compute_key(None, {"shard_index": 3}, {}) != before


@pytest.mark.slow  # starts the session's Prefect harness: about 30 s
def test_a_stage_log_line_shows_in_its_task_runs_prefect_log(prefect_harness, tiny_dataset):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogWorker

    from tasks import prepare_data

    @flow
    def find_data() -> str:
        found = prepare_data.submit(tiny_dataset, None)
        found.wait()
        return str(found.task_run_id)

    task_run_id = find_data()
    APILogWorker.drain_all(timeout=30)  # the handler sends in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
    lines = {(log.name, log.message) for log in logs}
    assert ("noisy_student.stages.prepare_data", f"dataset found at {tiny_dataset}") in lines
