"""What an evaluation says of one model: its scores on the reported (test) suite, on the
suite choices are made on, and per class. Accuracies are fractions, every interval a
95% one ([low, high]); CE and mCE are fractions of the baseline's errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True)
class ChoiceScores:
    """On the split choices are made on (validation, else test): what the gate reads."""

    split: str
    images: int
    accuracy: float
    accuracy_interval: list[float] | None
    corruption_accuracy: float  # under the gate's corruptions of the same images
    corruption_accuracy_interval: list[float] | None


@dataclass(kw_only=True)
class ModelScores:
    """One model as an evaluation of the run judged it (reported, never chosen on but for
    `choice`)."""

    label: str  # "student 2", "teacher 2 (= student 1)"
    role: str  # "teacher" or "student"
    iteration: int
    model: str
    mlflow_run_id: str
    test_accuracy: float
    test_accuracy_interval: list[float] | None
    test_images: int | None
    clean_error: float
    corruption_accuracy: float  # over every corruption and severity of the suite
    corruption_accuracy_interval: list[float] | None
    per_corruption: dict[str, float]  # accuracy by corruption, over its severities
    per_corruption_interval: dict[str, list[float]] | None
    per_severity: dict[str, list[float]]  # accuracy by corruption, one per severity
    per_severity_interval: dict[str, list[list[float] | None]]
    ce: dict[str, float]  # corruption error by corruption, relative to the baseline's
    relative_ce: dict[str, float]  # ... of the rise above clean error
    mce: float
    relative_mce: float
    ece_clean: float
    ece_corrupted: float
    fgsm_accuracy: dict[str, float]  # by epsilon, "2/255"
    fgsm_accuracy_interval: dict[str, list[float] | None]
    choice: ChoiceScores | None = None
    per_class: dict[str, Any] | None = None  # precision, recall, images; the confusion matrix
