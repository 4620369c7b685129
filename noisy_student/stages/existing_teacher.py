"""Stage 1 of a retraining run: an existing model (by default the registered model's
champion) as the first teacher, instead of training one."""

from __future__ import annotations

import logging
import re

from noisy_student import models, storage, tracking
from noisy_student.errors import UserError
from noisy_student.stages.records import TrainedModel

logger = logging.getLogger(__name__)

CHAMPION = "champion"  # the alias of the registered model's version in service
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def from_run(run_id: str) -> TrainedModel:
    """A trained model recorded in MLflow: its checkpoint where the run says it is, else a
    copy of the run's `model/` artifacts."""
    data = tracking.run_data(run_id)
    url = data.tags.get(f"{tracking.TAG}checkpoint_url")
    if not url or not storage.exists(storage.join(url, models.META)):
        url = tracking.download_model(run_id)
        logger.info(f"checkpoint of run {run_id} copied from MLflow to {url}")
    meta = models.load_meta(url)
    return TrainedModel(
        role="teacher",
        iteration=0,
        model=meta.model,
        url=url,
        mlflow_run_id=run_id,
        test_accuracy=data.metrics.get("final_test_accuracy"),
        seconds=0.0,
    )


def existing_teacher(ref: str, registered_model: str) -> TrainedModel | None:
    """The first teacher of a run that does not train one: `champion` (the registered
    model's champion, or None when there is none yet), `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, an MLflow run id, or a checkpoint URL."""
    if ref == CHAMPION:
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
    if ref.startswith("models:/"):
        try:
            run_id = tracking.resolve_registered(ref)
        except Exception as e:
            raise UserError(f"teacher {ref}: {e}") from None
        return from_run(run_id)
    if RUN_ID.match(ref):
        return from_run(ref)
    url = storage.resolve(ref)
    meta = models.load_meta(url)  # one-line error when there is no checkpoint
    return TrainedModel("teacher", 0, meta.model, url, "", None, 0.0)
