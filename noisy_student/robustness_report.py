"""The robustness figures (PNG, matplotlib) and the Markdown report of evaluate_robustness.

Each model is a dict: `label` ("teacher 1", "student 2"), `model`, `mlflow_run_id` and
the figures of `robustness.score`. Figures use matplotlib's object API (no pyplot), so
they are safe to draw in Prefect's worker threads.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.figure import Figure

Model = dict[str, Any]


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
            ys = [100 * m["test_accuracy"]] + [100 * a for a in m["per_severity"][name]]
            ax.plot(xs, ys, marker="o", markersize=3, label=m["label"])
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
    ax.plot(xs, [100 * m["mce"] for m in models], marker="o", label="mCE")
    ax.plot(xs, [100 * m["relative_mce"] for m in models], marker="s", label="relative mCE")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(xs), [m["label"] for m in models])
    ax.set_ylabel("% of the baseline (lower is better)")
    ax.set_title("Corruption error per iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def fgsm_accuracy(models: list[Model]) -> bytes:
    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.subplots()
    for m in models:
        eps = ["0", *m["fgsm_accuracy"]]
        acc = [100 * m["test_accuracy"], *(100 * a for a in m["fgsm_accuracy"].values())]
        ax.plot(eps, acc, marker="o", label=m["label"])
    ax.set_xlabel("FGSM epsilon (per pixel, of 255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Adversarial accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def figures(
    current: list[Model], run: list[Model], names: list[str], severities: list[int]
) -> dict[str, bytes]:
    """File name -> PNG: this iteration's teacher and student, and the run so far."""
    out = {
        "accuracy_vs_severity.png": accuracy_vs_severity(current, names, severities),
        "mce_per_iteration.png": mce_per_iteration(run),
    }
    if current and current[0]["fgsm_accuracy"]:
        out["fgsm_accuracy.png"] = fgsm_accuracy(current)
    return out


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


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
) -> str:
    """The report: headline figures, CE per corruption, accuracy per corruption and
    severity, for every model of the run so far."""
    eps = list(run[0]["fgsm_accuracy"]) if run else []
    lines = [
        f"# Robustness after iteration {iteration}",
        "",
        f"Clean: the {suite['test_images']} test images. Corrupted: {suite['images']} of them "
        f"(seed {suite['seed']}) under {len(names)} corruptions at severities "
        f"{', '.join(map(str, severities))}, generated once into `{suite['url']}` and reused "
        "by every model. All figures are percentages. CE and mCE are the model's "
        "corruption errors (summed over severities) as a percentage of the baseline's, "
        f"**{baseline['label']}** "
        f"({baseline['model']}, MLflow run `{baseline['mlflow_run_id']}`"
        f"{', from ' + baseline['source'] if baseline.get('source') else ''}); relative mCE "
        "counts only the rise above clean error. Lower is better; the baseline scores 100. "
        f"ECE: expected calibration error, {suite['calibration_bins']} confidence bins. "
        f"FGSM: accuracy after one signed-gradient step on {suite['adversarial_images']} "
        "test images.",
        "",
        "## Headline",
        "",
    ]
    head = ["model", "clean error", "mCE", "relative mCE", "ECE clean", "ECE corrupted"]
    head += [f"FGSM {e}" for e in eps]
    rows = [
        [
            f"{m['label']} ({m['model']})",
            _pct(m["clean_error"]),
            _pct(m["mce"]),
            _pct(m["relative_mce"]),
            _pct(m["ece_clean"]),
            _pct(m["ece_corrupted"]),
            *(_pct(m["fgsm_accuracy"][e]) for e in eps),
        ]
        for m in run
    ]
    lines += _table(head, rows)
    lines += ["", "## Corruption error (CE, baseline = 100)", ""]
    rows = [[name, groups[name], *(_pct(m["ce"][name]) for m in run)] for name in names]
    rows.append(["**mCE**", "", *(f"**{_pct(m['mce'])}**" for m in run)])
    lines += _table(["corruption", "group", *(m["label"] for m in run)], rows)
    lines += ["", "## Accuracy (%) per corruption and severity", ""]
    for m in run:
        lines += [f"### {m['label']}: {m['model']} (MLflow run `{m['mlflow_run_id']}`)", ""]
        head = ["corruption", "clean", *map(str, severities), "mean"]
        rows = [
            [
                name,
                _pct(m["test_accuracy"]),
                *(_pct(a) for a in m["per_severity"][name]),
                _pct(m["per_corruption"][name]),
            ]
            for name in names
        ]
        lines += _table(head, rows) + [""]
    if figure_names:
        lines += [
            "## Figures",
            "",
            "In the MLflow run of this stage, under `figures/`, and beside the table: "
            + ", ".join(f"`{f}`" for f in figure_names)
            + ".",
            "",
        ]
    return "\n".join(lines)
