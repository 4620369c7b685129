"""summary.json and the results table printed at the end of a run."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from noisy_student.config import PipelineConfig
from noisy_student.data import storage
from noisy_student.evaluation import statistics
from noisy_student.registry import tracking
from noisy_student.stages import Robustness, SelectedPseudoLabels, TrainedModel
from noisy_student.stages.records import CHOSEN_ON_TEST


def _model_entry(t: TrainedModel, robustness: Robustness) -> dict[str, Any]:
    figures = next(m for m in robustness.models if m.mlflow_run_id == t.mlflow_run_id)
    entry = {
        "model": t.model,
        "url": t.url,
        "mlflow_run_id": t.mlflow_run_id,
        # reported, never chosen on: each accuracy with its 95% interval
        "test_accuracy": figures.test_accuracy,
        "test_accuracy_interval": figures.test_accuracy_interval,
        "test_images": figures.test_images,
        "corruption_accuracy": figures.corruption_accuracy,
        "corruption_accuracy_interval": figures.corruption_accuracy_interval,
        "per_corruption_accuracy": figures.per_corruption,
        "per_corruption_accuracy_interval": figures.per_corruption_interval,
        "per_severity_accuracy": figures.per_severity,
        "per_severity_accuracy_interval": figures.per_severity_interval,
        "mce": figures.mce,
        "relative_mce": figures.relative_mce,
        "corruption_error": figures.ce,
        "relative_corruption_error": figures.relative_ce,
        "ece_clean": figures.ece_clean,
        "ece_corrupted": figures.ece_corrupted,
        "fgsm_accuracy": figures.fgsm_accuracy,
        "fgsm_accuracy_interval": figures.fgsm_accuracy_interval,
        "per_class": figures.per_class,
    }
    choice = figures.choice
    if choice:
        # what choices were made on: validation, or (without one) the test split
        entry["chosen_on"] = dataclasses.asdict(choice)
        if choice.split != "test":
            entry[f"{choice.split}_accuracy"] = choice.accuracy
            entry[f"{choice.split}_accuracy_interval"] = choice.accuracy_interval
    return _no_nan(entry)


def _no_nan(value: Any) -> Any:
    """NaN (a CE whose baseline made no error) as null, so summary.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def robustness_summary(run_url: str, last: Robustness) -> dict[str, Any]:
    """Where the benchmark's images and the run's report are, and what CE is relative to."""
    return {
        "report_url": storage.join(run_url, "robustness.md"),
        "suite_url": last.suite_url,
        "baseline": last.baseline,
    }


def iteration_summary(
    k: int,
    teacher: TrainedModel,
    selected: SelectedPseudoLabels,
    student: TrainedModel,
    robustness: Robustness,
) -> dict[str, Any]:
    return {
        "iteration": k,
        "teacher": _model_entry(teacher, robustness),
        "student": _model_entry(student, robustness),
        "pseudo_labels": {
            "total": selected.total,
            "kept": selected.kept,
            "selected": selected.selected,
            "accuracy": selected.accuracy,
            "accuracy_interval": _interval(selected.accuracy, selected.scored_kept),
            "accuracy_all": selected.accuracy_all,
            "accuracy_all_interval": _interval(selected.accuracy_all, selected.scored_all),
            "url": selected.url,
            "probabilities_url": selected.probabilities_url,
            "mlflow_run_id": selected.mlflow_run_id,
            "inference_mlflow_run_id": selected.inference_run_id,
            "per_class": selected.per_class,
            "diagnostics": diagnostics(selected.url),
        },
        "robustness_url": robustness.url,
        "robustness_report_url": robustness.report_url,
        "evaluation_mlflow_run_id": robustness.mlflow_run_id,
        "stage_seconds": {
            # the first teacher is trained once, before iteration 1
            "train_teacher": teacher.seconds if k == 1 else 0.0,
            "infer_pseudo_labels": selected.inference_seconds,
            "filter_and_balance": selected.seconds,
            "train_student": student.seconds,
            "evaluate_robustness": robustness.seconds,
        },
    }


def _interval(accuracy: float | None, images: int) -> list[float] | None:
    """The Wilson interval of an accuracy over `images` independent images."""
    if accuracy is None or not images:
        return None
    return list(statistics.accuracy_interval(accuracy, images))


def diagnostics(selected_url: str) -> dict[str, Any] | None:
    """The selection's pseudo-label diagnostics (confidence histogram, precision and coverage
    against the threshold, changes since the last iteration), as its manifest holds them."""
    url = storage.join(selected_url, "_manifest.json")
    return storage.read_json(url).get("diagnostics") if storage.exists(url) else None


def diagnostics_table(summary: dict[str, Any]) -> list[str]:
    """Per iteration: how trustworthy the pseudo labels were, and the figure showing it."""
    lines = [
        "pseudo labels: precision and coverage at min_confidence (where true labels are "
        "known), labels that changed class since the last iteration",
    ]
    for it in summary["iterations"]:
        d = it["pseudo_labels"].get("diagnostics")
        if not d:
            continue
        changed = d.get("changed_since_previous")
        lines.append(
            f"{it['iteration']:>4}  precision {_pct(d.get('precision_at_min_confidence')):>7}  "
            f"coverage {_pct(d.get('coverage_at_min_confidence')):>7}  changed "
            + ("-" if changed is None else f"{changed}/{d['compared_with_previous']}")
            + f"  figure {d['figure_url']}"
        )
    return lines if len(lines) > 1 else []


def summary(
    run_id: str,
    run_url: str,
    config: PipelineConfig,
    data_root: str,
    parent_run_id: str,
    iterations: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "summary_url": storage.join(run_url, "summary.json"),
        "artifacts_url": run_url,
        "data_root": data_root,
        "mlflow": {
            "tracking_uri": tracking.display_uri(),
            "experiment": config.name,
            "parent_run_id": parent_run_id,
        },
        "config": config.model_dump(),
        "iterations": iterations,
        "seconds": seconds,
    }


def lineage(iterations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which teacher labelled which data and trained which student, as MLflow run ids."""
    return [
        {
            "iteration": it["iteration"],
            "teacher_run_id": it["teacher"]["mlflow_run_id"],
            "labelled": it["pseudo_labels"]["url"],
            "pseudo_labels_run_id": it["pseudo_labels"]["mlflow_run_id"],
            "student_run_id": it["student"]["mlflow_run_id"],
        }
        for it in iterations
    ]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _score(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(x: float | None, interval: list[float] | None) -> str:
    """A percentage with its 95% interval, one decimal: 87.6 [86.9, 88.2]."""
    if x is None:
        return "-"
    if interval is None:
        return f"{100 * x:.1f}"
    return f"{100 * x:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def robustness_table(summary: dict[str, Any]) -> list[str]:
    """Every model of the run once (the first teacher, then each student): the headline
    robustness figures on the test split, each accuracy with its 95% interval."""
    its = summary["iterations"]
    models = [("teacher 1", its[0]["teacher"])] + [
        (f"student {it['iteration']}", it["student"]) for it in its
    ]
    eps = list(models[0][1]["fgsm_accuracy"])
    baseline = summary.get("robustness", {}).get("baseline", {})
    head = (
        f"{'model':<11}{'':<14}{'clean [95%]':>19}  {'corrupted [95%]':>19}  {'mCE':>6}  "
        f"{'rel mCE':>7}  {'ECE clean':>9}  {'ECE corr':>8}"
        + "".join(f"  {'FGSM ' + e:>19}" for e in eps)
    )
    lines = [
        "robustness on the test split: accuracies in % [95% interval], mCE and relative mCE "
        f"in % of the baseline ({baseline.get('label', '?')} {baseline.get('model', '')}); "
        "FGSM accuracy at epsilon/255",
        head,
        "-" * len(head),
    ]
    for label, m in models:
        fgsm_intervals = m.get("fgsm_accuracy_interval") or {}
        lines.append(
            f"{label:<11}{m['model']:<14}"
            f"{_ci(m['test_accuracy'], m.get('test_accuracy_interval')):>19}  "
            f"{_ci(m['corruption_accuracy'], m.get('corruption_accuracy_interval')):>19}  "
            f"{_score(m['mce']):>6}  {_score(m['relative_mce']):>7}  "
            f"{_pct(m['ece_clean']):>9}  {_pct(m['ece_corrupted']):>8}"
            + "".join(f"  {_ci(m['fgsm_accuracy'][e], fgsm_intervals.get(e)):>19}" for e in eps)
        )
    return lines


def verdicts(summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The gate's student-against-teacher comparisons, by iteration."""
    promotion = summary.get("promotion") or {}
    return {v["iteration"]: v for v in promotion.get("students_against_teachers", [])}


def chosen_on_line(summary: dict[str, Any]) -> str:
    """Which split the run's choices were made on, in words."""
    promotion = summary.get("promotion") or {}
    split = promotion.get("chosen_on")
    if split is None:
        return "choices: no promotion gate ran"
    if split == "test":
        return (
            f"choices (the promotion gate, the best model, student vs teacher): "
            f"{CHOSEN_ON_TEST}, as the dataset has no validation split; the test figures "
            "above are therefore not an unbiased estimate"
        )
    return (
        f"choices (the promotion gate, the best model, student vs teacher) on the {split} "
        "split; the test figures above are reported only, never chosen on"
    )


def table(summary: dict[str, Any]) -> str:
    head = (
        f"{'iter':>4}  {'teacher':<14}{'test acc [95%]':>19}  {'student':<14}"
        f"{'test acc [95%]':>19}  {'gain':>6}  {'student vs teacher':<26}  "
        f"{'pseudo kept':>13}  {'pl acc [95%]':>19}  {'mCE T -> S':>14}  stage times (s): "
        "teacher/infer/filter/student/eval"
    )
    lines, notes = [head, "-" * len(head)], []
    verdicts_by_iteration = verdicts(summary)
    for it in summary["iterations"]:
        t, s, p, sec = it["teacher"], it["student"], it["pseudo_labels"], it["stage_seconds"]
        gain = 100 * (s["test_accuracy"] - t["test_accuracy"])
        v = verdicts_by_iteration.get(it["iteration"], {})
        if "note" in v:
            notes.append("! " + v["note"])
        times = "/".join(
            f"{sec[k]:.0f}"
            for k in (
                "train_teacher",
                "infer_pseudo_labels",
                "filter_and_balance",
                "train_student",
                "evaluate_robustness",
            )
        )
        lines.append(
            f"{it['iteration']:>4}  {t['model']:<14}"
            f"{_ci(t['test_accuracy'], t.get('test_accuracy_interval')):>19}  "
            f"{s['model']:<14}{_ci(s['test_accuracy'], s.get('test_accuracy_interval')):>19}  "
            f"{gain:>+6.2f}  {v.get('verdict', '-'):<26}  "
            f"{p['kept']:>6}/{p['total']:<6}  "
            f"{_ci(p['accuracy'], p.get('accuracy_interval')):>19}  "
            f"{_score(t['mce']):>5} -> {_score(s['mce']):<5}  {times}"
        )
    lines.append(chosen_on_line(summary))
    lines += [v["sentence"] for _, v in sorted(verdicts_by_iteration.items()) if "sentence" in v]
    lines += notes
    promotion = summary.get("promotion") or {}
    if promotion.get("decision"):
        lines.append(
            f"gate: models:/{promotion['registered_model']}/{promotion['version']} is the "
            f"{promotion['decision']}: {'; '.join(promotion['reasons'])}"
        )
    if (best := promotion.get("best_of_run")) and best.get("decision") == "champion":
        lines.append(
            f"champion: {best['label']} ({best['model']}, {_pct(best['accuracy'])} on the "
            f"{best['chosen_on']} split), models:/{promotion['registered_model']}/"
            f"{best['version']}, not the final student"
        )
    lines += ["", *robustness_table(summary), ""]
    if diagnosed := diagnostics_table(summary):
        lines += [*diagnosed, ""]
    lines.append(
        f"total {summary['seconds']:.0f} s; MLflow parent run "
        f"{summary['mlflow']['parent_run_id']} ({summary['mlflow']['tracking_uri']})"
    )
    if "robustness" in summary:
        lines.append(f"robustness report: {summary['robustness']['report_url']}")
    return "\n".join(lines)
