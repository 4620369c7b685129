"""Prefect tasks: one thin wrapper per stage over `noisy_student.stages`."""

from tasks.evaluate_robustness import evaluate_robustness
from tasks.existing_teacher import existing_teacher
from tasks.filter_and_balance import filter_and_balance
from tasks.infer_pseudo_labels import infer_pseudo_labels
from tasks.prepare_data import prepare_data
from tasks.promote import promote
from tasks.train_student import train_student
from tasks.train_teacher import train_teacher

__all__ = [
    "prepare_data",
    "train_teacher",
    "infer_pseudo_labels",
    "filter_and_balance",
    "train_student",
    "evaluate_robustness",
    "existing_teacher",
    "promote",
]
