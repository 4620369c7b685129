"""What a run shows in the Prefect UI besides its logs: the results table (keyed by the
pipeline's name, so the Artifacts page keeps one history per pipeline), a link to the
MLflow parent run, and the training stages' progress."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from noisy_student import results
from noisy_student.registry import tracking


def artifact_key(name: str, suffix: str = "") -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) made from a name."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"{name}{suffix}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", key) or "noisy-student"


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def _interval(interval: list[float] | None) -> str | None:
    return None if interval is None else f"{100 * interval[0]:.2f}-{100 * interval[1]:.2f}"


def results_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per iteration: the figures of the results table `noisy-student run` prints."""
    rows = []
    verdicts = {k: v["verdict"] for k, v in results.verdicts(summary).items()}
    for it in summary["iterations"]:
        t, s, p = it["teacher"], it["student"], it["pseudo_labels"]
        rows.append(
            {
                "iteration": it["iteration"],
                "teacher": t["model"],
                "teacher test accuracy %": _pct(t["test_accuracy"]),
                "teacher 95% interval": _interval(t.get("test_accuracy_interval")),
                "student": s["model"],
                "student test accuracy %": _pct(s["test_accuracy"]),
                "student 95% interval": _interval(s.get("test_accuracy_interval")),
                "gain (points)": round(100 * (s["test_accuracy"] - t["test_accuracy"]), 2),
                f"student vs teacher ({summary.get('chosen_on') or 'test'})": verdicts.get(
                    it["iteration"], "-"
                ),
                "pseudo labels kept": f"{p['kept']}/{p['total']}",
                "pseudo-label accuracy %": _pct(p["accuracy"]),
                "teacher mCE": _pct(t.get("mce")),
                "student mCE": _pct(s.get("mce")),
                "teacher ECE %": _pct(t.get("ece_clean")),
                "student ECE %": _pct(s.get("ece_clean")),
                "student MLflow run": s["mlflow_run_id"],
            }
        )
    return rows


def publish_results(summary: dict[str, Any], pipeline: str) -> str:
    """The results table as a table artifact; returns its key."""
    key = artifact_key(pipeline)
    create_table_artifact(
        table=results_rows(summary),
        key=key,
        description=f"Run {summary['run_id']}: teacher and student per iteration "
        f"(summary: {summary['summary_url']})",
    )
    return key


def mlflow_run_url(experiment: str, run_id: str) -> str | None:
    """The parent run's page in the MLflow UI, where the tracking URI is a server."""
    uri = tracking.display_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    experiment_id = tracking.experiment_id(experiment)
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def link_mlflow_run(experiment: str, run_id: str) -> str | None:
    url = mlflow_run_url(experiment, run_id)
    if url is not None:
        create_link_artifact(
            link=url,
            link_text=f"MLflow run {run_id}",
            key=artifact_key(experiment, "-mlflow-run"),
            description="The pipeline run's parent run in MLflow: every stage is a child run",
        )
    return url


def training_progress(label: str) -> Callable[[float], None]:
    """A progress artifact of the current task run, moved to a share (0 to 1) of the epochs."""
    artifact_id = create_progress_artifact(progress=0.0, description=f"{label}: epochs trained")

    def update(share: float) -> None:
        update_progress_artifact(artifact_id, progress=round(100 * share, 1))

    return update
