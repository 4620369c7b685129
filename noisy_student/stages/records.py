"""What the stages hand each other: small records of URLs, run ids and figures.

Prefect passes these between tasks; the data itself stays on storage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from noisy_student.data.dataset import TEST
from noisy_student.evaluation.scores import ModelScores

# what every record of a choice says when the dataset has no validation split
CHOSEN_ON_TEST = "chosen on the test split"


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


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class Robustness:
    url: str
    mlflow_run_id: str
    seconds: float
    models: list[ModelScores] = field(default_factory=list)  # this stage's
    table_url: str = ""  # robustness.parquet: one row per model and measurement
    report_url: str = ""  # robustness.md
    report: str = ""  # its Markdown, for a Prefect artifact
    suite_url: str = ""  # the corrupted test images every model is judged on
    baseline: dict[str, Any] = field(default_factory=dict)  # the model CE is relative to
    predictions_url: str = ""  # every model's predicted class per image, both suites
    chosen_on: str = "test"  # the split choices are made on: validation, else test
    choice_suite_url: str = ""  # its corrupted images, which the gate's robustness check reads


@dataclass(kw_only=True)
class PromotionDecision:
    """The promotion gate's decision on the run's final student (promotion.json)."""

    registered_model: str
    version: str  # the final student's version of the registered model
    run_id: str  # the final student's MLflow run
    decision: str  # the alias it got: "champion" or "challenger"
    chosen_on: str  # the split the gate compared on: validation, else test
    gate: dict[str, Any]  # the gate's settings (GateConfig)
    reasons: list[str]
    candidate: dict[str, Any] | None  # the final student's figures
    champion: dict[str, Any] | None  # the champion it met: version, run id, figures
    comparison: dict[str, Any] | None  # the paired tests against the champion
    students_against_teachers: list[dict[str, Any]] = field(default_factory=list)
    best_of_run: dict[str, Any] | None = None  # a model of the run at the gate instead
    decided_at: str = ""

    def record(self) -> dict[str, Any]:
        """promotion.json: the fields, and a note when the gate had no validation split."""
        items = list(asdict(self).items())
        if self.chosen_on == TEST:  # the note right after the split it is about
            at = [name for name, _ in items].index("chosen_on") + 1
            items.insert(at, ("note", CHOSEN_ON_TEST))
        return dict(items)


@dataclass
class LabelQueue:
    url: str  # the folder of the queue's files
    strategy: str
    size: int
    files: dict[str, str]  # URL by kind: parquet, label_studio, label_config, csv, contact_sheet
    mlflow_run_id: str
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # the first rows, for the UI
