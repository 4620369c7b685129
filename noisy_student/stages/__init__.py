"""The five stages of one Noisy Student iteration, as plain functions over URLs.

Each reads its inputs from storage, calls the core, writes its outputs (data first,
manifest last) and records itself in MLflow as a child of the pipeline run. They know
nothing of Prefect: `tasks/` wraps each one in a task, `flows/` puts them in order.
One module per stage, named as the stage is.
"""

from noisy_student.stages.evaluate_robustness import evaluate_robustness
from noisy_student.stages.existing_teacher import CHAMPION, existing_teacher
from noisy_student.stages.filter_and_balance import filter_and_balance
from noisy_student.stages.infer_pseudo_labels import infer_pseudo_labels
from noisy_student.stages.label_queue import label_queue
from noisy_student.stages.prepare_data import (
    check_data,
    choice_split,
    prepare_data,
    unlabelled_shards,
)
from noisy_student.stages.promote import CHALLENGER, promote
from noisy_student.stages.records import (
    LabelQueue,
    PromotionDecision,
    PseudoLabelShard,
    Robustness,
    SelectedPseudoLabels,
    TrainedModel,
)
from noisy_student.stages.train import train_student, train_teacher

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "LabelQueue",
    "PromotionDecision",
    "PseudoLabelShard",
    "Robustness",
    "SelectedPseudoLabels",
    "TrainedModel",
    "check_data",
    "choice_split",
    "evaluate_robustness",
    "existing_teacher",
    "filter_and_balance",
    "infer_pseudo_labels",
    "label_queue",
    "prepare_data",
    "promote",
    "train_student",
    "train_teacher",
    "unlabelled_shards",
]
