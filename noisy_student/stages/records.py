"""What the stages hand each other: small records of URLs, run ids and figures.

Prefect passes these between tasks; the data itself stays on storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainedModel:
    role: str  # "teacher" or "student"
    iteration: int
    model: str
    url: str
    mlflow_run_id: str
    # the training's last evaluation, on `evaluated_on` (validation where the dataset has
    # one: it may guide choices); test accuracy is measured once, by evaluate_robustness
    final_accuracy: float | None
    seconds: float
    evaluated_on: str | None = None


@dataclass
class PseudoLabelShard:
    index: int
    url: str
    rows: int
    sha256: str
    seconds: float


@dataclass
class SelectedPseudoLabels:
    url: str  # the selected, balanced set the student learns from
    probabilities_url: str  # every unlabelled image's teacher probabilities, per shard
    mlflow_run_id: str
    inference_run_id: str
    total: int
    kept: int
    selected: int
    accuracy: float | None  # of the kept images' argmax labels, when true labels exist
    accuracy_all: float | None
    inference_seconds: float
    seconds: float
    per_class: list[dict[str, Any]] = field(default_factory=list)  # counts and the name
    scored_kept: int = 0  # kept images whose true label is known: what `accuracy` is over
    scored_all: int = 0  # all images whose true label is known: what `accuracy_all` is over


@dataclass
class Robustness:
    url: str
    mlflow_run_id: str
    seconds: float
    models: list[dict[str, Any]] = field(default_factory=list)  # this stage's, with scores
    table_url: str = ""  # robustness.parquet: one row per model and measurement
    report_url: str = ""  # robustness.md
    report: str = ""  # its Markdown, for a Prefect artifact
    suite_url: str = ""  # the corrupted test images every model is judged on
    baseline: dict[str, Any] = field(default_factory=dict)  # the model CE is relative to
    predictions_url: str = ""  # every model's predicted class per image, both suites
    chosen_on: str = "test"  # the split choices are made on: validation, else test
    choice_suite_url: str = ""  # its corrupted images, which the gate's robustness check reads


@dataclass
class LabelQueue:
    url: str  # the folder of the queue's files
    strategy: str
    size: int
    files: dict[str, str]  # URL by kind: parquet, label_studio, label_config, csv, contact_sheet
    mlflow_run_id: str
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # the first rows, for the UI
