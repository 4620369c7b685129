"""The model registry around an iteration: the champion as the first teacher of a
retraining run, and the promotion gate that decides whether a new student replaces it.

Every student is a version of the registered model named after the experiment. The alias
`champion` marks the version in service; a student takes it only when it is at least as
accurate as the champion and no less robust, measured side by side on the same test
images and corruptions. Otherwise it gets the alias `challenger`. The decision and its
reasons are kept as tags on the version and the student's run, and as `promotion.json`
on the pipeline run and beside the run's artifacts.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from noisy_student import models, storage, tracking
from noisy_student.config import EvaluationConfig
from noisy_student.errors import UserError
from noisy_student.stages.evaluate_robustness import evaluate_robustness
from noisy_student.stages.records import Log, Robustness, TrainedModel

CHAMPION, CHALLENGER = "champion", "challenger"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _from_run(run_id: str, log: Log) -> TrainedModel:
    """A trained model recorded in MLflow: its checkpoint where the run says it is, else a
    copy of the run's `model/` artifacts."""
    data = tracking.run_data(run_id)
    url = data.tags.get(f"{tracking.TAG}checkpoint_url")
    if not url or not storage.exists(storage.join(url, models.META)):
        url = tracking.download_model(run_id)
        log(f"checkpoint of run {run_id} copied from MLflow to {url}")
    meta = models.load_meta(url)
    return TrainedModel(
        role="teacher",
        iteration=0,
        model=meta.model,
        url=url,
        mlflow_run_id=run_id,
        test_accuracy=data.metrics.get("final_test_accuracy"),
        seconds=0.0,
    )


def existing_teacher(ref: str, registered_model: str, log: Log = print) -> TrainedModel | None:
    """The first teacher of a run that does not train one: `champion` (the registered
    model's champion, or None when there is none yet), `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, an MLflow run id, or a checkpoint URL."""
    if ref == CHAMPION:
        version = tracking.model_version_by_alias(registered_model, CHAMPION)
        if version is None:
            log(f"models:/{registered_model}@{CHAMPION} does not exist yet: training a teacher")
            return None
        log(
            f"teacher: the champion, models:/{registered_model}/{version.version} "
            f"(run {version.run_id})"
        )
        return _from_run(version.run_id, log)
    if ref.startswith("models:/"):
        try:
            run_id = tracking.resolve_registered(ref)
        except Exception as e:
            raise UserError(f"teacher {ref}: {e}") from None
        return _from_run(run_id, log)
    if RUN_ID.match(ref):
        return _from_run(ref, log)
    url = storage.resolve(ref)
    meta = models.load_meta(url)  # one-line error when there is no checkpoint
    return TrainedModel("teacher", 0, meta.model, url, "", None, 0.0)


def figures(robustness: list[Robustness], run_id: str) -> dict[str, Any] | None:
    """A model's clean accuracy and robustness as an evaluation of this run measured them."""
    for r in robustness:
        for m in r.models:
            if m["mlflow_run_id"] == run_id:
                return {
                    "test_accuracy": m["test_accuracy"],
                    "corruption_accuracy": m.get("corruption_accuracy"),
                    "mce": m.get("mce"),
                }
    return None


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None) -> tuple[bool, list[str]]:
    """Promote when at least as accurate and no less robust: mCE (lower is better) when
    both have one, else mean accuracy under corruption."""
    if champion is None:
        return True, ["there is no champion yet"]
    reasons = []
    c, h = candidate["test_accuracy"], champion["test_accuracy"]
    accurate = c >= h
    reasons.append(f"test accuracy {c:.4f} {'>=' if accurate else '<'} champion's {h:.4f}")
    if candidate.get("mce") is not None and champion.get("mce") is not None:
        c, h = candidate["mce"], champion["mce"]
        robust = c <= h
        reasons.append(f"mCE {c:.4f} {'<=' if robust else '>'} champion's {h:.4f}")
    else:
        c, h = candidate["corruption_accuracy"], champion["corruption_accuracy"]
        robust = c >= h
        reasons.append(
            f"accuracy under corruption {c:.4f} {'>=' if robust else '<'} champion's {h:.4f}"
        )
    return accurate and robust, reasons


def promote(
    student: TrainedModel,
    robustness: list[Robustness],
    registered_model: str,
    evaluation: EvaluationConfig,
    data_root: str,
    run_url: str,
    parent_run_id: str,
    iteration: int,
    log: Log = print,
) -> dict[str, Any]:
    """The promotion gate for the run's final student; returns the decision record."""
    version = tracking.model_version_of_run(registered_model, student.mlflow_run_id)
    current = tracking.model_version_by_alias(registered_model, CHAMPION)
    candidate = figures(robustness, student.mlflow_run_id)
    champion = None
    if current is not None:
        champion = figures(robustness, current.run_id)
        if champion is None:
            # The champion was not evaluated in this run: measure it on the same test images
            # and the same seeded corruptions as the student.
            log(f"evaluating the champion (version {current.version}) as the student was")
            measured = evaluate_robustness(
                [_from_run(current.run_id, log)],
                evaluation,
                data_root,
                storage.join(run_url, "promotion", "robustness"),
                parent_run_id,
                iteration,
                earlier=[r.table_url for r in robustness if r.table_url],
                log=log,
            )
            champion = figures([measured], current.run_id)
    promoted, reasons = decide(candidate, champion)
    alias = CHAMPION if promoted else CHALLENGER
    record = {
        "registered_model": registered_model,
        "version": version.version,
        "run_id": student.mlflow_run_id,
        "decision": alias,
        "reasons": reasons,
        "candidate": candidate,
        "champion": None
        if current is None
        else {"version": current.version, "run_id": current.run_id, **champion},
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tracking.set_alias(registered_model, alias, version.version)
    tags = {
        f"{tracking.TAG}promotion": alias,
        f"{tracking.TAG}promotion_reasons": "; ".join(reasons),
        f"{tracking.TAG}compared_with_version": current.version if current else "",
    }
    tracking.set_version_tags(registered_model, version.version, tags)
    tracking.set_tags(student.mlflow_run_id, tags)
    tracking.set_tags(parent_run_id, {f"{tracking.TAG}promotion": alias})
    tracking.log_dict(parent_run_id, record, "promotion.json")
    storage.write_json(storage.join(run_url, "promotion.json"), record)
    log(f"models:/{registered_model}/{version.version} is the {alias}: {'; '.join(reasons)}")
    return record
