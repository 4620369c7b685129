"""A pipeline run: its identity, its MLflow parent run, and what it leaves at the end.

The same config on the same data is the same run. Re-running a command after a crash
therefore lands in the same run folder, continues the same MLflow parent run and hands
Prefect the same task inputs, so finished work is found and skipped. New data (another
manifest digest) or another config is another run.

The flow enters `PipelineRun.start` and leaves it; meanwhile it records each iteration,
and `finish` writes summary.json, the lineage, the robustness report and the final figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisy_student import results
from noisy_student.config import PipelineConfig
from noisy_student.data import dataset, storage
from noisy_student.registry import tracking
from noisy_student.stages import (
    LabelQueue,
    PromotionDecision,
    Robustness,
    SelectedPseudoLabels,
    TrainedModel,
)

logger = logging.getLogger(__name__)


def run_identity(config: PipelineConfig, data_root: str) -> str:
    digests = [
        dataset.read_manifest(storage.join(data_root, split)).digest
        for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST)
    ]
    validation = storage.join(data_root, dataset.VALIDATION)
    if storage.exists(storage.join(validation, dataset.MANIFEST)):
        # only where there is one: a dataset without keeps the identity it had
        digests.append(dataset.read_manifest(validation).digest)
    # the label queue's settings change no model: another queue is the same run
    trained = config.model_dump(mode="json", exclude={"labelling"})
    text = json.dumps({"config": trained, "data": digests}, sort_keys=True)
    return f"{config.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def task_results_folder(run_url: str) -> Path | None:
    """Where Prefect keeps the run's finished task results: inside a local run folder, so
    that deleting the folder also forgets them. For a remote run folder, Prefect's own
    setting decides (PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, e.g. a bucket block)."""
    if "://" in run_url and not run_url.startswith("file://"):
        return None
    return Path(run_url.removeprefix("file://"), "_prefect_results")


@dataclass
class PipelineRun:
    config: PipelineConfig
    data_root: str
    run_id: str
    url: str  # the run folder: every stage's outputs, summary.json
    parent_run_id: str  # the MLflow run every stage's run is a child of
    started: float = field(default_factory=time.perf_counter)
    iterations: list[dict[str, Any]] = field(default_factory=list)  # summary.json's
    evaluations: list[Robustness] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        config: PipelineConfig,
        data_root: str,
        first_teacher: TrainedModel | None = None,
        teacher_source: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        started: float | None = None,
    ) -> Iterator[PipelineRun]:
        """The run, from its start (`started`, a `time.perf_counter()`, when the flow began
        earlier) to its end; its MLflow parent run is marked failed when the body raises."""
        # a run from an existing teacher is another run than one that trains its own
        run_id = run_id or run_identity(config, data_root) + (
            f"-from-{(first_teacher.mlflow_run_id or first_teacher.url)[-8:]}"
            if first_teacher
            else ""
        )
        url = storage.join(storage.resolve(config.artifacts), "runs", run_id)
        parent = tracking.start_pipeline_run(
            config.name,
            run_id,
            config.model_dump(),
            {
                f"{tracking.TAG}artifacts_url": url,
                f"{tracking.TAG}teacher_source": teacher_source or "trained",
                **(tags or {}),
            },
        )
        logger.info(
            f"run {run_id}: artifacts in {url}, MLflow run {parent} at {tracking.display_uri()}"
        )
        try:
            yield cls(config, data_root, run_id, url, parent, started or time.perf_counter())
        except BaseException:
            tracking.end_run(parent, failed=True)
            raise
        tracking.end_run(parent)

    @property
    def task_results(self) -> Path | None:
        """Where the finished tasks' results live: found again by a resumed run."""
        return task_results_folder(self.url)

    def at(self, iteration: int, stage: str) -> str:
        """The URL of one stage's outputs in one iteration."""
        return storage.join(self.url, f"iteration-{iteration}", stage)

    def previous_pseudo_labels(self, iteration: int) -> str | None:
        """The last iteration's labels of the same images: how many changed class."""
        return self.at(iteration - 1, "pseudo_labels") if iteration > 1 else None

    def robustness_tables(self) -> list[str]:
        """The earlier iterations' tables: the baseline, and the mCE per iteration."""
        return [r.table_url for r in self.evaluations]

    def record(
        self,
        iteration: int,
        teacher: TrainedModel,
        selected: SelectedPseudoLabels,
        student: TrainedModel,
        robustness: Robustness,
    ) -> None:
        self.iterations.append(
            results.iteration_summary(iteration, teacher, selected, student, robustness)
        )
        self.evaluations.append(robustness)

    def finish(
        self, promotion: PromotionDecision, label_queue: LabelQueue | None = None
    ) -> dict[str, Any]:
        """summary.json beside the run's outputs and on the MLflow parent run, with the
        lineage, the last robustness report, the final figures and where the label queue
        is; returns the summary."""
        parent, last = self.parent_run_id, self.evaluations[-1]
        summary = results.summary(
            self.run_id,
            self.url,
            self.config,
            self.data_root,
            parent,
            self.iterations,
            time.perf_counter() - self.started,
        )
        summary["robustness"] = results.robustness_summary(self.url, last)
        # the last report covers every model of the run; it goes beside summary.json
        storage.write_bytes(summary["robustness"]["report_url"], last.report.encode())
        summary["promotion"] = promotion.record()
        # the split every choice of the run was made on; the test split is only reported
        summary["chosen_on"] = promotion.chosen_on
        if label_queue is not None:
            summary["label_queue"] = {
                "url": label_queue.url,
                "strategy": label_queue.strategy,
                "size": label_queue.size,
                "files": label_queue.files,
                "mlflow_run_id": label_queue.mlflow_run_id,
            }
        storage.write_json(summary["summary_url"], summary)
        tracking.log_dict(parent, summary, "summary.json")
        tracking.log_dict(parent, results.lineage(self.iterations), "lineage.json")
        tracking.log_text(parent, last.report, "robustness.md")
        tracking.log_metrics(
            parent,
            {
                "final_student_test_accuracy": self.iterations[-1]["student"]["test_accuracy"],
                "first_teacher_test_accuracy": self.iterations[0]["teacher"]["test_accuracy"],
            },
        )
        tracking.set_tags(parent, {f"{tracking.TAG}summary_url": summary["summary_url"]})
        return summary
