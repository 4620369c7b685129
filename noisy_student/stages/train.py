"""Stages 1 and 4: the teacher on labelled images; the noised student on labelled plus
pseudo-labelled images. Both run the same training loop (`engine.fit`).

Under torchrun (`noisy_student.torchrun_stage`) every rank runs these functions; only
rank 0 has an MLflow run and writes the checkpoint, the others just train their slices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import pandas as pd
import torch

from noisy_student.config import StudentConfig, TeacherConfig, TrainConfig
from noisy_student.data import dataset, dataset_writer, storage, training_data
from noisy_student.errors import UserError
from noisy_student.registry import serving, tracking
from noisy_student.stages.prepare_data import choice_split, labelled_rows, test_batches
from noisy_student.stages.records import SelectedPseudoLabels, TrainedModel
from noisy_student.training import distributed, engine, models
from noisy_student.training.training_state import TrainingState

logger = logging.getLogger(__name__)

STATE_FOLDER = "_training_state"  # beside the model files, inside the stage's folder
NOISE_PICTURE_IMAGES = 8


def _train_params(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    return {**cfg.model_dump(), **extra}


# The teacher learns from labelled rows alone: one loss, no pseudo-labelled rows to mix in
TEACHER_SCHEDULE = {"loss": "soft_target", "distillation_temperature": 1.0, "unlabelled_ratio": 1.0}
# TrainConfig's fields the engine does not read, and who does
NOT_THE_ENGINES = {
    "model": "models.create",
    "pretrained": "models.create",
    "checkpoint": "models.create",
    "stem": "models.create",
    "model_kwargs": "models.create",
    "drop_rate": "models.create",
    "drop_path_rate": "models.create",
    "init_from_teacher": "train_student",
    "label_smoothing": "labelled_rows",
    "decoded_cache_mb": "training_data.DecodedCache",
    "checkpoint_every_steps": "TrainingState",
    "checkpoint_min_seconds": "TrainingState",
}
# the batch size of the forward passes that judge an epoch (not a training setting: the
# figures do not depend on it)
EVAL_BATCH_SIZE = 1024


def schedule(cfg: TrainConfig) -> engine.Schedule:
    """The engine's schedule: each of its settings the config's field of that name."""
    given = cfg.model_dump()
    if not isinstance(cfg, StudentConfig):
        given |= TEACHER_SCHEDULE
    return engine.Schedule(**{f.name: given[f.name] for f in fields(engine.Schedule)})


def noise(cfg: TrainConfig, height: int, width: int) -> engine.Noise:
    """The input noise for images of this size (RandAugment's settings follow their size)."""
    ra = cfg.rand_augment
    return engine.Noise(
        hflip=cfg.hflip,
        crop_padding=cfg.crop_padding,
        rand_augment=ra.for_image(height, width) if ra else None,
        cutout=cfg.cutout,
    )


def _log_noise_picture(
    run_id: str, noise: engine.Noise, labelled: training_data.Rows, seed: int
) -> None:
    """noise.png in the student's run: labelled images clean, and under them noised."""
    examples = labelled.decode(0, labelled.blocks[0].rows[:NOISE_PICTURE_IMAGES])
    picture = engine.noise_picture(noise, examples, seed=seed)
    tracking.log_bytes(run_id, dataset_writer.encode_png(picture), "noise.png")


def _training_state(
    cfg: TrainConfig, out_url: str, label: str, seed: int, **identity: Any
) -> TrainingState:
    """The state of this training run: the same config, seed and data find it again."""
    # the order the data streams in is part of what a saved position means
    order = f"row-group windows of {training_data.WINDOW_BLOCKS}"
    return TrainingState(
        storage.join(out_url, STATE_FOLDER),
        {
            "config": cfg.model_dump(exclude={"decoded_cache_mb"}),
            "seed": seed,
            "data_order": order,
            **identity,
        },
        cfg.checkpoint_every_steps,
        label,
        cfg.checkpoint_min_seconds,
    )


def _report_resume(fit: engine.FitResult, label: str, run_id: str) -> None:
    if fit.resumed_from_step:
        logger.info(
            f"{label}: resumed from its saved state at step {fit.resumed_from_step} of {fit.steps}"
        )
        tracking.log_metrics(run_id, {"resumed_from_step": fit.resumed_from_step})


Progress = Callable[[float], None]  # the share of the epochs done, 0 to 1


def _epoch_logger(
    run_id: str, role: str, epochs: int, split: str, on_progress: Progress | None = None
) -> engine.EpochCallback:
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        # the engine's evaluation is of the split it was given: named for it
        metrics = {
            f"{split}_accuracy" if k == "test_accuracy" else k: v for k, v in metrics.items()
        }
        tracking.log_metrics(run_id, metrics, step=epoch)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        logger.info(f"{role} epoch {epoch}: {shown}")
        if on_progress is not None:
            on_progress(epoch / epochs)

    return on_epoch


def _start_stage_run(
    parent_run_id: str, stage: str, iteration: int, params: dict, tags: dict
) -> str | None:
    """The stage's MLflow run, on rank 0 only (None on the other torchrun ranks)."""
    if not distributed.is_main():
        return None
    return tracking.start_stage_run(parent_run_id, stage, iteration, params, tags)


def _finish_training(
    role: str,
    iteration: int,
    cfg: TrainConfig,
    fit: engine.FitResult,
    data: dataset.Manifest,
    out_url: str,
    run_id: str | None,
    start: float,
    split: str,
) -> TrainedModel:
    seconds = time.perf_counter() - start
    if run_id is None:  # a torchrun rank other than 0: rank 0 saves and logs
        return TrainedModel(role, iteration, cfg.model, out_url, "", None, seconds, split)
    models.save(fit.model, models.ModelMeta.for_data(cfg.model, data, fit.model), out_url)
    tracking.log_checkpoint(run_id, out_url)
    tracking.log_metrics(
        run_id,
        {
            f"final_{split}_accuracy": fit.final_accuracy,
            "train_seconds": fit.seconds,
            "decode_seconds": fit.decode_seconds,
            "steps": fit.steps,
        },
    )
    # what "auto" computed in here: it hangs on the machine, not on the config
    precision = engine.resolved_precision(engine.device(), cfg.precision)
    tracking.set_tags(
        run_id,
        {f"{tracking.TAG}checkpoint_url": out_url, f"{tracking.TAG}precision": precision},
    )
    serving.log_model(
        run_id,
        out_url,
        f"{role}-{iteration}",
        role,
        {f"{tracking.TAG}checkpoint_url": out_url, f"{tracking.TAG}iteration": str(iteration)},
    )
    tracking.end_run(run_id)
    return TrainedModel(
        role, iteration, cfg.model, out_url, run_id, fit.final_accuracy, seconds, split
    )


def _decoded_cache(cfg: TrainConfig) -> training_data.DecodedCache:
    return training_data.DecodedCache(cfg.decoded_cache_mb << 20)


def train_teacher(
    cfg: TeacherConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    seed: int,
    on_progress: Progress | None = None,
) -> TrainedModel:
    """A timm model trained on the labelled images only, with ordinary augmentation."""
    start = time.perf_counter()
    labelled = labelled_rows(data_root, cfg.label_smoothing, _decoded_cache(cfg))
    manifest = labelled.manifest
    split = choice_split(data_root)  # epochs are evaluated where choices are made
    evaluation = test_batches(data_root, EVAL_BATCH_SIZE, split)
    run_id = _start_stage_run(
        parent_run_id,
        "train_teacher",
        1,
        _train_params(cfg, labelled_images=labelled.items, seed=seed),
        {f"{tracking.TAG}role": "teacher", f"{tracking.TAG}data_root": data_root},
    )
    with tracking.failed_on_error(run_id):
        torch.manual_seed(seed)  # the initial weights, so that a seed repeats a run
        model = _network(cfg, manifest, stem=cfg.stem, model_kwargs=cfg.model_kwargs)
        fit = engine.fit(
            model,
            labelled,
            schedule(cfg),
            noise(cfg, manifest.height, manifest.width),
            seed,
            evaluation=evaluation,
            on_epoch=_epoch_logger(run_id, "teacher", cfg.epochs, split, on_progress),
            state=_training_state(
                cfg, out_url, "teacher", seed, labelled=labelled.items, data_root=data_root
            ),
        )
        _report_resume(fit, "teacher", run_id)
        return _finish_training(
            "teacher",
            1,
            cfg,
            fit,
            manifest,
            out_url,
            run_id,
            start,
            split,
        )


def _student_rows(
    cfg: StudentConfig, data_root: str, selected: SelectedPseudoLabels
) -> tuple[training_data.ShardRows, training_data.ShardRows]:
    """The labelled rows and the selected pseudo-labelled ones, sharing one decode cache."""
    cache = _decoded_cache(cfg)  # one budget for both kinds of rows
    labelled = labelled_rows(data_root, cfg.label_smoothing, cache)
    unlabelled = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    return labelled, training_data.pseudo_labelled_rows(selected.url, unlabelled, cache)


def _student_tags(teacher: TrainedModel, selected: SelectedPseudoLabels) -> dict[str, str]:
    return {
        f"{tracking.TAG}role": "student",
        f"{tracking.TAG}teacher_run_id": teacher.mlflow_run_id,
        f"{tracking.TAG}teacher_url": teacher.url,
        f"{tracking.TAG}pseudo_labels_run_id": selected.mlflow_run_id,
        f"{tracking.TAG}pseudo_labels_url": selected.url,
    }


def _log_lineage(
    run_id: str, teacher: TrainedModel, selected: SelectedPseudoLabels, iteration: int
) -> None:
    """Lineage the MLflow way: the teacher's logged model and the pseudo-labelled set."""
    tracking.log_model_input(run_id, tracking.logged_model_of_run(teacher.mlflow_run_id))
    tracking.log_dataset(
        run_id, pd.DataFrame(selected.per_class), selected.url, f"selected-{iteration}",
        "training",
    )  # fmt: skip


def _network(cfg: TrainConfig, manifest: dataset.Manifest, **options: Any) -> torch.nn.Module:
    """The configured timm network for the data's classes and channels; `options` are
    `models.create`'s stem, options and model_kwargs."""
    return models.create(
        cfg.model,
        manifest.num_classes,
        manifest.channels,
        cfg.drop_rate,
        cfg.drop_path_rate,
        cfg.pretrained,
        cfg.checkpoint,
        **options,
    )


def _create_student(
    cfg: StudentConfig, manifest: dataset.Manifest, teacher: TrainedModel, iteration: int
) -> torch.nn.Module:
    """The student's network, with its teacher's weights under `init_from_teacher`."""
    model = _network(
        cfg,
        manifest,
        **models.student_options(
            f"students.{iteration - 1}",
            cfg.stem,
            cfg.init_from_teacher,
            teacher.url,
            cfg.model_kwargs,
        ),
    )
    if cfg.init_from_teacher:
        _start_from_teacher(model, cfg, teacher, iteration)
    return model


def _start_from_teacher(
    model: torch.nn.Module, cfg: StudentConfig, teacher: TrainedModel, iteration: int
) -> None:
    teacher_meta = models.load_meta(teacher.url)
    if teacher_meta.model != cfg.model:
        raise UserError(
            f"students.{iteration - 1}.init_from_teacher: teacher is "
            f"{teacher_meta.model}, student is {cfg.model}"
        )
    model.load_state_dict(models.load_state(teacher.url))


def train_student(
    cfg: StudentConfig,
    data_root: str,
    selected: SelectedPseudoLabels,
    teacher: TrainedModel,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    seed: int,
    registered_model: str | None = None,
    on_progress: Progress | None = None,
) -> TrainedModel:
    """An equal-or-larger model trained on labelled plus pseudo-labelled images, with noise
    (RandAugment, dropout, stochastic depth); a version of `registered_model` if named."""
    start = time.perf_counter()
    labelled, pseudo = _student_rows(cfg, data_root, selected)
    manifest = labelled.manifest
    # what a saved training state must match to be resumed
    identity = dict(labelled=labelled.items, pseudo_labelled=pseudo.items,
                    selected_url=selected.url, teacher_url=teacher.url)  # fmt: skip
    split = choice_split(data_root)  # epochs are evaluated where choices are made
    evaluation = test_batches(data_root, EVAL_BATCH_SIZE, split)
    run_id = _start_stage_run(
        parent_run_id,
        "train_student",
        iteration,
        _train_params(
            cfg, labelled_images=labelled.items, pseudo_labelled_images=pseudo.items, seed=seed
        ),
        _student_tags(teacher, selected),
    )
    with tracking.failed_on_error(run_id):
        if run_id is not None:
            _log_lineage(run_id, teacher, selected, iteration)
        torch.manual_seed(seed + iteration)  # the initial weights, so that a seed repeats a run
        model = _create_student(cfg, manifest, teacher, iteration)
        input_noise = noise(cfg, manifest.height, manifest.width)
        if run_id is not None:
            _log_noise_picture(run_id, input_noise, labelled, seed + iteration)
        fit = engine.fit(
            model,
            labelled,
            schedule(cfg),
            input_noise,
            seed + iteration,
            pseudo=pseudo,
            evaluation=evaluation,
            on_epoch=_epoch_logger(run_id, f"student {iteration}", cfg.epochs, split, on_progress),
            state=_training_state(
                cfg, out_url, f"student-{iteration}", seed + iteration, **identity
            ),
        )
        _report_resume(fit, f"student {iteration}", run_id)
        student = _finish_training(
            "student", iteration, cfg, fit, manifest, out_url, run_id, start, split
        )
        if registered_model and run_id is not None:
            version = tracking.register(run_id, registered_model)
            logger.info(f"student {iteration} registered as models:/{registered_model}/{version}")
        return student
