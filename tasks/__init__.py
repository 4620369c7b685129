"""Prefect tasks: one thin wrapper per stage over `noisy_student.stages`.

The stages log with `logging` under `noisy_student`; Prefect's `logging.extra_loggers`
setting (pyproject.toml's [tool.prefect.logging]; the CLI sets it too) shows those records
in the log of the task run they happen in. Prefect leaves such a logger's level alone, so
it is set here, where every process that runs a task comes through.
"""

import logging

from tasks.evaluate_robustness import evaluate_robustness
from tasks.existing_teacher import existing_teacher
from tasks.filter_and_balance import filter_and_balance
from tasks.infer_pseudo_labels import infer_pseudo_labels
from tasks.label_queue import label_queue
from tasks.prepare_data import prepare_data
from tasks.promote import promote
from tasks.train_student import train_student
from tasks.train_teacher import train_teacher

logging.getLogger("noisy_student").setLevel(logging.INFO)

__all__ = [
    "prepare_data",
    "train_teacher",
    "infer_pseudo_labels",
    "filter_and_balance",
    "train_student",
    "evaluate_robustness",
    "existing_teacher",
    "promote",
    "label_queue",
]
