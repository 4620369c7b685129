"""The robustness figures (PNG, matplotlib) and the Markdown report of evaluate_robustness.

Each model is a dict: `label` ("teacher 1", "student 2"), `model`, `mlflow_run_id`, the
figures of `robustness.score` (each accuracy with its 95% interval), and, where measured,
`choice` (`robustness.choice_score`) and `per_class` (`robustness.class_report`). Figures
use matplotlib's object API (no pyplot), so they are safe to draw in Prefect's worker
threads.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from noisy_student.evaluation.scores import ModelScores

Model = ModelScores


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def accuracy_vs_severity(models: list[Model], names: list[str], severities: list[int]) -> bytes:
    """One panel per corruption: accuracy against severity (0 = clean), a line per model."""
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    xs = [0, *severities]
    for ax, name in zip(axes.flat, names, strict=False):
        for m in models:
            ys = [100 * m.test_accuracy] + [100 * a for a in m.per_severity[name]]
            ax.plot(xs, ys, marker="o", markersize=3, label=m.label)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in axes[-1, :]:
        ax.set_xlabel("severity (0 = clean)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(models))
    return _png(fig)


def mce_per_iteration(models: list[Model]) -> bytes:
    """mCE and relative mCE of every model of the run, in the order the run made them."""
    fig = Figure(figsize=(1.2 * len(models) + 3, 3.6), layout="constrained")
    ax = fig.subplots()
    xs = range(len(models))
    ax.plot(xs, [100 * m.mce for m in models], marker="o", label="mCE")
    ax.plot(xs, [100 * m.relative_mce for m in models], marker="s", label="relative mCE")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(xs), [m.label for m in models])
    ax.set_ylabel("% of the baseline (lower is better)")
    ax.set_title("Corruption error per iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def fgsm_accuracy(models: list[Model]) -> bytes:
    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.subplots()
    for m in models:
        eps = ["0", *m.fgsm_accuracy]
        acc = [100 * m.test_accuracy, *(100 * a for a in m.fgsm_accuracy.values())]
        ax.plot(eps, acc, marker="o", label=m.label)
    ax.set_xlabel("FGSM epsilon (per pixel, of 255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Adversarial accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def confusion_matrix(m: Model, class_names: list[str]) -> bytes:
    """The model's confusion matrix on the test split, each row (true class) in % of its
    images, with the counts written in the cells."""
    counts = np.array(m.per_class["confusion_matrix"], dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig = Figure(figsize=(0.55 * k + 2.5, 0.55 * k + 1.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, f"{n:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{m.label} ({m.model}): test split", fontsize=9)
    return _png(fig)


def figures(
    current: list[Model],
    run: list[Model],
    names: list[str],
    severities: list[int],
    class_names: list[str] | None = None,
) -> dict[str, bytes]:
    """File name -> PNG: this iteration's teacher and student (and a confusion matrix of
    each), and the run so far."""
    out = {
        "accuracy_vs_severity.png": accuracy_vs_severity(current, names, severities),
        "mce_per_iteration.png": mce_per_iteration(run),
    }
    if current and current[0].fgsm_accuracy:
        out["fgsm_accuracy.png"] = fgsm_accuracy(current)
    for m in current:
        if class_names and m.per_class is not None:
            out[f"confusion_{m.role}.png"] = confusion_matrix(m, class_names)
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _with_interval(x: float | None, interval: list[float] | None) -> str:
    """A percentage and its 95% interval, e.g. 87.5 [86.8, 88.2]."""
    if interval is None:
        return _pct(x)
    return f"{_pct(x)} [{_pct(interval[0])}, {_pct(interval[1])}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def markdown(
    iteration: int,
    run: list[Model],
    names: list[str],
    severities: list[int],
    groups: dict[str, str],
    suite: dict[str, Any],
    baseline: dict[str, Any],
    figure_names: list[str],
    class_names: list[str] | None = None,
) -> str:
    """The report: headline figures with their 95% intervals, the figures choices were made
    on, CE per corruption, accuracy per corruption and severity, and precision and recall
    per class, for every model of the run so far."""
    chosen_on = suite.get("choice_split", "test")
    lines = [
        f"# Robustness after iteration {iteration}",
        "",
        _what_was_measured(names, severities, suite, baseline),
        "",
        _chosen_on_sentence(chosen_on, suite),
        "",
        "## Headline",
        "",
        *_headline(run),
        *_choice_split(run, chosen_on),
        "",
        "## Corruption error (CE, baseline = 100)",
        "",
        *_corruption_errors(run, names, groups),
        "",
        "## Accuracy (%) per corruption and severity",
        "",
        *_per_severity(run, names, severities),
        *_per_class(run, class_names),
        *_figures(figure_names),
    ]
    return "\n".join(lines)


def _what_was_measured(
    names: list[str], severities: list[int], suite: dict[str, Any], baseline: dict[str, Any]
) -> str:
    return (
        f"Clean: the {suite['test_images']} test images. Corrupted: {suite['images']} of them "
        f"(seed {suite['seed']}) under {len(names)} corruptions at severities "
        f"{', '.join(map(str, severities))}, generated once into `{suite['url']}` and reused "
        "by every model. All figures are percentages; every accuracy carries its 95% "
        "interval in brackets (Wilson over the set's images; for an accuracy averaged over "
        "corrupted copies of the same images, a bootstrap over images). CE and mCE are the "
        "model's corruption errors (summed over severities) as a percentage of the "
        f"baseline's, **{baseline['label']}** "
        f"({baseline['model']}, MLflow run `{baseline['mlflow_run_id']}`"
        f"{', from ' + baseline['source'] if baseline.get('source') else ''}); relative mCE "
        "counts only the rise above clean error (below 0 where a model errs less on "
        "corrupted images than on clean ones, as one near chance can). Lower is better; the "
        "baseline scores 100. "
        f"ECE: expected calibration error, {suite['calibration_bins']} confidence bins. "
        f"FGSM: accuracy after one signed-gradient step on {suite['adversarial_images']} "
        "test images."
    )


def _headline(run: list[Model]) -> list[str]:
    eps = list(run[0].fgsm_accuracy) if run else []
    head = ["model", "clean accuracy", "corrupted accuracy", "mCE", "relative mCE"]
    head += ["ECE clean", "ECE corrupted", *(f"FGSM {e}" for e in eps)]
    rows = [
        [
            f"{m.label} ({m.model})",
            _with_interval(m.test_accuracy, m.test_accuracy_interval),
            _with_interval(m.corruption_accuracy, m.corruption_accuracy_interval),
            _pct(m.mce),
            _pct(m.relative_mce),
            _pct(m.ece_clean),
            _pct(m.ece_corrupted),
            *(
                _with_interval(m.fgsm_accuracy[e], (m.fgsm_accuracy_interval or {}).get(e))
                for e in eps
            ),
        ]
        for m in run
    ]
    return _table(head, rows)


def _choice_split(run: list[Model], chosen_on: str) -> list[str]:
    chosen = [m for m in run if m.choice]
    if not chosen:
        return []
    rows = [
        [
            f"{m.label} ({m.model})",
            _with_interval(m.choice.accuracy, m.choice.accuracy_interval),
            _with_interval(
                m.choice.corruption_accuracy,
                m.choice.corruption_accuracy_interval,
            ),
        ]
        for m in chosen
    ]
    return [
        "",
        f"## The {chosen_on} split: what choices are made on",
        "",
        *_table(["model", "clean accuracy", "corrupted accuracy (gate)"], rows),
    ]


def _corruption_errors(run: list[Model], names: list[str], groups: dict[str, str]) -> list[str]:
    rows = [[name, groups[name], *(_pct(m.ce[name]) for m in run)] for name in names]
    rows.append(["**mCE**", "", *(f"**{_pct(m.mce)}**" for m in run)])
    return _table(["corruption", "group", *(m.label for m in run)], rows)


def _per_severity(run: list[Model], names: list[str], severities: list[int]) -> list[str]:
    lines = []
    for m in run:
        lines += [f"### {m.label}: {m.model} (MLflow run `{m.mlflow_run_id}`)", ""]
        head = ["corruption", "clean", *map(str, severities), "mean"]
        by_severity = m.per_severity_interval or {}
        by_corruption = m.per_corruption_interval or {}
        rows = [
            [
                name,
                _pct(m.test_accuracy),
                *(
                    _with_interval(a, by_severity[name][i] if name in by_severity else None)
                    for i, a in enumerate(m.per_severity[name])
                ),
                _with_interval(m.per_corruption[name], by_corruption.get(name)),
            ]
            for name in names
        ]
        lines += _table(head, rows) + [""]
    return lines


def _per_class(run: list[Model], class_names: list[str] | None) -> list[str]:
    with_classes = [m for m in run if m.per_class]
    if not (class_names and with_classes):
        return []
    head = ["class", "images", *(f"{m.label} P / R" for m in with_classes)]
    rows = [
        [
            name,
            str(with_classes[0].per_class["classes"][c]["images"]),
            *(
                f"{_pct(m.per_class['classes'][c]['precision'])} / "
                f"{_pct(m.per_class['classes'][c]['recall'])}"
                for m in with_classes
            ),
        ]
        for c, name in enumerate(class_names)
    ]
    return [
        "## Precision and recall (%) per class, on the test split",
        "",
        "Which classes each model gets right (recall) and how often its answer for a class "
        "is right (precision); the confusion matrices are among the figures.",
        "",
        *_table(head, rows),
        "",
    ]


def _figures(figure_names: list[str]) -> list[str]:
    if not figure_names:
        return []
    return [
        "## Figures",
        "",
        "In the MLflow run of this stage, under `figures/`, and beside the table: "
        + ", ".join(f"`{f}`" for f in figure_names)
        + ".",
        "",
    ]


def _chosen_on_sentence(split: str, suite: dict[str, Any]) -> str:
    if split == "test":
        return (
            "**Chosen on the test split**: the dataset has no validation split, so the run's "
            "choices (the promotion gate, the best model of the run) were made on these test "
            "images, and the test figures above are not an unbiased estimate."
        )
    levels = suite.get("choice_severities", [])
    severities = "severity" if len(levels) == 1 else "severities"
    return (
        f"Choices (the promotion gate, the best model of the run) are made on the {split} "
        f"split ({suite.get('choice_images', '?')} images; its robustness check on "
        f"{suite.get('choice_corrupted', '?')} of them at {severities} "
        f"{', '.join(map(str, levels))}), never on the test split, which is only reported."
    )
