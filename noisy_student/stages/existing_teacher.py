"""Stage 1 of a retraining run: an existing model (by default the registered model's
champion) as the first teacher, instead of training one."""

from __future__ import annotations

import logging

from noisy_student.data import storage
from noisy_student.data.dataset import TEST, VALIDATION
from noisy_student.errors import UserError
from noisy_student.registry import model_ref, tracking
from noisy_student.stages.records import TrainedModel
from noisy_student.training import models

logger = logging.getLogger(__name__)

CHAMPION = model_ref.CHAMPION  # the alias of the registered model's version in service


def from_run(run_id: str) -> TrainedModel:
    """A trained model recorded in MLflow: its checkpoint where the run says it is, else a
    copy of the run's `model/` artifacts."""
    data = tracking.run_data(run_id)
    url = data.tags.get(f"{tracking.TAG}checkpoint_url")
    if not url or not storage.exists(storage.join(url, models.META)):
        url = tracking.download_model(run_id)
        logger.info(f"checkpoint of run {run_id} copied from MLflow to {url}")
    meta = models.load_meta(url)
    # the training's last evaluation, on the split it named (validation, or test)
    split = next((s for s in (VALIDATION, TEST) if f"final_{s}_accuracy" in data.metrics), None)
    return TrainedModel(
        role="teacher",
        iteration=0,
        model=meta.model,
        url=url,
        mlflow_run_id=run_id,
        final_accuracy=data.metrics.get(f"final_{split}_accuracy"),
        seconds=0.0,
        evaluated_on=split,
    )


def existing_teacher(ref: str, registered_model: str) -> TrainedModel | None:
    """The first teacher of a run that does not train one, named as `model_ref` says:
    `champion` is the registered model's champion, or None when there is none yet."""
    parsed = model_ref.parse(ref)
    if parsed.kind == CHAMPION:
        version = tracking.model_version_by_alias(registered_model, CHAMPION)
        if version is None:
            logger.info(
                f"models:/{registered_model}@{CHAMPION} does not exist yet: training a teacher"
            )
            return None
        logger.info(
            f"teacher: the champion, models:/{registered_model}/{version.version} "
            f"(run {version.run_id})"
        )
        return from_run(version.run_id)
    if parsed.kind in ("registered", "run"):
        return from_run(model_ref.run_id(ref, parsed, "teacher"))
    if parsed.kind == "timm":
        raise UserError(f"teacher {ref}: a teacher is a model trained on this data, not timm's")
    meta = models.load_meta(parsed.url)  # one-line error when there is no checkpoint
    return TrainedModel("teacher", 0, meta.model, parsed.url, "", None, 0.0)
