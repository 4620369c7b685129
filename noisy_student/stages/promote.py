"""Stage 6, after the last iteration: the promotion gate. Does the run's final student
replace the champion, the registered model's version in service?

Every student is a version of the registered model named after the experiment. The alias
`champion` marks the version in service; a student takes it only when it is at least as
accurate as the champion and no less robust, measured side by side on the same test
images and corruptions, and when no other model of its own run (its teacher, an earlier
student) is more accurate on the clean test images. Otherwise it gets the alias
`challenger`. When a model of the run beats the final student, that model goes through
the same gate in its place: a first teacher better than its students becomes the
champion of an empty registry (registered as a version for it), instead of the student
below it. The decision and its reasons are kept as tags on the version and the student's
run, and as `promotion.json` on the pipeline run and beside the run's artifacts.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException

from noisy_student import models, storage, tracking
from noisy_student.config import EvaluationConfig, student_stem
from noisy_student.stages.evaluate_robustness import evaluate_robustness
from noisy_student.stages.existing_teacher import CHAMPION, from_run
from noisy_student.stages.records import Robustness, TrainedModel

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"  # the alias of a student that did not pass the gate


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


def run_models(robustness: list[Robustness]) -> dict[str, dict[str, Any]]:
    """Every model this run evaluated, by MLflow run id, with its latest figures ("" is a
    first teacher given as a checkpoint URL, which has no run)."""
    return {m["mlflow_run_id"]: m for r in robustness for m in r.models}


def best_of_run(robustness: list[Robustness], student_run_id: str) -> dict[str, Any] | None:
    """The most accurate model of this run on the clean test images when it is more
    accurate than the student; None when the student is the best (a tie goes to it)."""
    entries = run_models(robustness)
    own = entries[student_run_id]["test_accuracy"]
    better = [
        m for run_id, m in entries.items() if run_id != student_run_id and m["test_accuracy"] > own
    ]
    return max(better, key=lambda m: m["test_accuracy"], default=None)


def _label(m: dict[str, Any]) -> str:
    role, iteration = m.get("role"), m.get("iteration")
    if role is None:
        return f"run {m['mlflow_run_id']}"
    # an iteration's teacher after the first is the previous iteration's student
    return (
        f"{role} {iteration}" if role == "student" or iteration == 1 else f"student {iteration - 1}"
    )


def below_teacher_note(
    iteration: int,
    student_model: str,
    student: float,
    teacher_model: str,
    teacher: float,
    config: dict[str, Any],
) -> str:
    """What the results table and the log say of a student that ends below its teacher.
    `config` is the run's configuration as a dict (`PipelineConfig.model_dump()`): the
    suggestions leave out what the student already had."""
    key = f"students.{iteration - 1}"
    tries = [f"more {key}.epochs"]
    started = config["students"][iteration - 1].get("init_from_teacher")
    if student_model == teacher_model and not started:
        tries.append(f"{key}.init_from_teacher: true")
    tries.append("a larger student")
    stem = student_stem(config, iteration)
    if stem == "imagenet" and models.has_stem(student_model, "half"):
        tries.append("a stem that keeps more of the image (teacher.stem: half)")
    return (
        f"student {iteration} ({student_model}, {100 * student:.2f}%) ends "
        f"{100 * (teacher - student):.2f} points below its teacher ({teacher_model}, "
        f"{100 * teacher:.2f}%): try " + ", ".join(tries[:-1]) + f" or {tries[-1]}"
    )


def students_below_teachers(robustness: list[Robustness], config: dict[str, Any]) -> list[str]:
    """One note per iteration whose student is less accurate than its own teacher."""
    notes = []
    for r in robustness:
        roles = {m.get("role"): m for m in r.models}
        t, s = roles.get("teacher"), roles.get("student")
        if t and s and s["test_accuracy"] < t["test_accuracy"]:
            notes.append(
                below_teacher_note(
                    s["iteration"],
                    s["model"],
                    s["test_accuracy"],
                    t["model"],
                    t["test_accuracy"],
                    config,
                )
            )
    return notes


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
    config: dict[str, Any],
) -> dict[str, Any]:
    """The promotion gate for the run's final student; returns the decision record.
    `config` is the run's configuration as a dict, for what the log suggests of a student
    below its teacher."""
    version = tracking.model_version_of_run(registered_model, student.mlflow_run_id)
    current = tracking.model_version_by_alias(registered_model, CHAMPION)
    candidate = figures(robustness, student.mlflow_run_id)
    champion = None
    if current is not None:
        champion = figures(robustness, current.run_id)
        if champion is None:
            # The champion was not evaluated in this run: measure it on the same test images
            # and the same seeded corruptions as the student.
            logger.info(f"evaluating the champion (version {current.version}) as the student was")
            measured = evaluate_robustness(
                [from_run(current.run_id)],
                evaluation,
                data_root,
                storage.join(run_url, "promotion", "robustness"),
                parent_run_id,
                iteration,
                earlier=[r.table_url for r in robustness if r.table_url],
            )
            champion = figures([measured], current.run_id)
    for note in students_below_teachers(robustness, config):
        logger.info(note)
    promoted, reasons = decide(candidate, champion)
    best = best_of_run(robustness, student.mlflow_run_id)
    stand_in = None
    if best is not None:
        promoted = False
        reasons.append(
            f"test accuracy {candidate['test_accuracy']:.4f} < {_label(best)}'s "
            f"{best['test_accuracy']:.4f} in this run"
        )
        stand_in = _stand_in(best, champion, current, registered_model, reasons)
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
        "best_of_run": stand_in,
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
    logger.info(
        f"models:/{registered_model}/{version.version} is the {alias}: {'; '.join(reasons)}"
    )
    return record


def _stand_in(
    best: dict[str, Any],
    champion: dict[str, Any] | None,
    current: Any,
    registered_model: str,
    reasons: list[str],
) -> dict[str, Any]:
    """The run's best model at the gate in the final student's place: it takes `champion`
    on the same rule (a first teacher is registered as a version for it). Appends what
    happened to `reasons`; returns the record of it."""
    label, run_id = _label(best), best["mlflow_run_id"]
    entry = {"label": label, "run_id": run_id, "model": best.get("model")}
    entry["test_accuracy"] = best["test_accuracy"]
    if current is not None and run_id == current.run_id:
        reasons.append(f"{label} is the champion (version {current.version}): it stays")
        return {**entry, "version": str(current.version), "decision": CHAMPION}
    if not run_id:
        reasons.append(f"{label} has no MLflow run to register: the champion stays as it is")
        return {**entry, "version": None, "decision": None}
    ok, why = decide(best, champion)
    if not ok:
        reasons.append(f"{label} does not pass the gate either: {'; '.join(why)}")
        return {**entry, "version": None, "decision": None}
    try:
        version = str(tracking.model_version_of_run(registered_model, run_id).version)
    except MlflowException:  # a first teacher: only students are registered as they train
        version = str(tracking.register(run_id, registered_model))
    tracking.set_alias(registered_model, CHAMPION, version)
    tags = {
        f"{tracking.TAG}promotion": CHAMPION,
        f"{tracking.TAG}promotion_reasons": "the run's best model, above its final student; "
        + "; ".join(why),
    }
    tracking.set_version_tags(registered_model, version, tags)
    reasons.append(f"{label} (models:/{registered_model}/{version}) is the champion in its place")
    logger.info(f"models:/{registered_model}/{version} ({label}) is the champion: {'; '.join(why)}")
    return {**entry, "version": version, "decision": CHAMPION}
