"""The five stages of one Noisy Student iteration, as plain functions over URLs.

Each reads its inputs from storage, calls the core, writes its outputs (data first,
manifest last) and records itself in MLflow as a child of the pipeline run. They know
nothing of Prefect: `tasks/` wraps each one in a task, `flows/` puts them in order.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from noisy_student import corruptions, dataset, engine, models, storage, tracking
from noisy_student.config import (
    EvaluationConfig,
    FashionMnistSource,
    SelectionConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from noisy_student.errors import UserError
from noisy_student.selection import select

Log = Callable[[str], None]


@dataclass
class TrainedModel:
    role: str  # "teacher" or "student"
    iteration: int
    model: str
    url: str
    mlflow_run_id: str
    test_accuracy: float | None
    seconds: float


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
    per_class: list[dict[str, int]] = field(default_factory=list)


@dataclass
class Robustness:
    url: str
    mlflow_run_id: str
    seconds: float
    models: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------- data


def _missing_split(root: str) -> str | None:
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        url = storage.join(root, split, dataset.MANIFEST)
        if not storage.exists(url):
            return url
    return None


def check_data(root: str, fashion_mnist: FashionMnistSource | None) -> None:
    """Fail before any work starts if there is no dataset and nothing to ingest it from."""
    missing = _missing_split(storage.resolve(root))
    if missing is None:
        return
    if fashion_mnist is None:
        raise UserError(
            f"{missing}: dataset split missing (data.root; run `noisy-student "
            "ingest` first or set data.fashion_mnist)"
        )
    if not storage.exists(
        storage.join(storage.resolve(fashion_mnist.source), "train-images-idx3-ubyte.gz")
    ):
        raise UserError(
            f"{fashion_mnist.source}: no Fashion-MNIST IDX files "
            "(data.fashion_mnist.source; apt-get install dataset-fashion-mnist)"
        )


def prepare_data(root: str, fashion_mnist: FashionMnistSource | None, log: Log = print) -> str:
    """The dataset root, ingesting Fashion-MNIST into it first when it holds no dataset."""
    from noisy_student import ingest

    root = storage.resolve(root)
    if _missing_split(root) is None:
        log(f"dataset found at {root}")
        return root
    check_data(root, fashion_mnist)
    log(f"ingesting Fashion-MNIST from {fashion_mnist.source} into {root}")
    ingest.fashion_mnist(
        root,
        fashion_mnist.source,
        fashion_mnist.labelled_per_class,
        fashion_mnist.unlabelled_limit,
        fashion_mnist.test_limit,
        fashion_mnist.seed,
        fashion_mnist.rows_per_shard,
    )
    return root


def unlabelled_shards(root: str) -> list[int]:
    return list(range(len(dataset.read_manifest(storage.join(root, dataset.UNLABELLED)).shards)))


def _labelled(root: str) -> tuple[dataset.Manifest, dataset.ImageSet]:
    manifest, images = dataset.load(storage.join(root, dataset.LABELLED))
    dataset.require_labels(manifest, images)
    return manifest, images


def _test(root: str) -> tuple[dataset.Manifest, dataset.ImageSet]:
    manifest, images = dataset.load(storage.join(root, dataset.TEST))
    dataset.require_labels(manifest, images)
    return manifest, images


def _meta(cfg: TrainConfig, manifest: dataset.Manifest) -> models.ModelMeta:
    return models.ModelMeta(
        cfg.model,
        manifest.num_classes,
        manifest.channels,
        manifest.class_names,
        manifest.height,
        manifest.width,
        manifest.mode,
    )


def _train_params(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    return {**cfg.model_dump(), **extra}


def _schedule(cfg: TrainConfig, unlabelled_ratio: float = 1.0) -> engine.Schedule:
    return engine.Schedule(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs,
        ema_decay=cfg.ema_decay,
        unlabelled_ratio=unlabelled_ratio,
        eval_every=cfg.eval_every,
        precision=cfg.precision,
    )


def _noise(cfg: TrainConfig) -> engine.Noise:
    return engine.Noise(
        hflip=cfg.hflip, crop_padding=cfg.crop_padding, rand_augment=cfg.rand_augment
    )


def _epoch_logger(run_id: str, role: str, log: Log) -> engine.EpochCallback:
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(run_id, metrics, step=epoch)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log(f"{role} epoch {epoch}: {shown}")

    return on_epoch


def _finish_training(
    role: str,
    iteration: int,
    cfg: TrainConfig,
    fit: engine.FitResult,
    meta: models.ModelMeta,
    out_url: str,
    run_id: str,
    start: float,
) -> TrainedModel:
    models.save(fit.model, meta, out_url)
    tracking.log_checkpoint(run_id, out_url)
    tracking.log_metrics(
        run_id,
        {
            "final_test_accuracy": fit.final_accuracy,
            "train_seconds": fit.seconds,
            "steps": fit.steps,
        },
    )
    tracking.set_tags(run_id, {f"{tracking.TAG}checkpoint_url": out_url})
    tracking.end_run(run_id)
    return TrainedModel(
        role, iteration, cfg.model, out_url, run_id, fit.final_accuracy, time.perf_counter() - start
    )


# ------------------------------------------------------------------------- stages


def train_teacher(
    cfg: TeacherConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    seed: int,
    log: Log = print,
) -> TrainedModel:
    """A timm model trained on the labelled images only, with ordinary augmentation."""
    start = time.perf_counter()
    manifest, labelled = _labelled(data_root)
    _, test = _test(data_root)
    run_id = tracking.start_stage_run(
        parent_run_id,
        "train_teacher",
        1,
        _train_params(cfg, labelled_images=len(labelled), seed=seed),
        {f"{tracking.TAG}role": "teacher", f"{tracking.TAG}data_root": data_root},
    )
    with tracking.failed_on_error(run_id):
        model = models.create(
            cfg.model,
            manifest.num_classes,
            manifest.channels,
            cfg.drop_rate,
            cfg.drop_path_rate,
            cfg.pretrained,
            cfg.checkpoint,
        )
        targets = engine.one_hot(labelled.labels, manifest.num_classes, cfg.label_smoothing)
        fit = engine.fit(
            model,
            labelled.images,
            targets,
            _schedule(cfg),
            _noise(cfg),
            seed,
            eval_images=test.images,
            eval_labels=test.labels,
            on_epoch=_epoch_logger(run_id, "teacher", log),
        )
        return _finish_training(
            "teacher", 1, cfg, fit, _meta(cfg, manifest), out_url, run_id, start
        )


def infer_pseudo_labels(
    data_root: str,
    shard_index: int,
    teacher_url: str,
    out_url: str,
    batch_size: int,
    precision: str = "auto",
) -> PseudoLabelShard:
    """Class probabilities for one shard of unlabelled images: the teacher in eval mode on
    clean images (no augmentation, no dropout, no stochastic depth)."""
    start = time.perf_counter()
    manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    shard = dataset.load_shard(manifest, shard_index)
    teacher, _ = models.load(teacher_url)
    teacher.to(engine.device())
    probs = engine.predict_probs(teacher, shard.images, batch_size, precision).numpy()
    k = probs.shape[1] if probs.ndim == 2 else manifest.num_classes
    table = pa.table(
        {
            "id": shard.ids,
            "probs": pa.FixedSizeListArray.from_arrays(
                pa.array(probs.reshape(-1), pa.float32()), k
            ),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=dataset.ROW_GROUP_SIZE * 8)
    url = storage.join(out_url, f"part-{shard_index:05d}.parquet")
    storage.write_bytes(url, buf.getvalue())
    return PseudoLabelShard(
        shard_index,
        url,
        len(shard.ids),
        hashlib.sha256(buf.getvalue()).hexdigest(),
        time.perf_counter() - start,
    )


def _read_pseudo_labels(shards: list[PseudoLabelShard]) -> tuple[np.ndarray, np.ndarray]:
    ids, probs = [], []
    for s in sorted(shards, key=lambda s: s.index):
        data = storage.read_bytes(s.url)
        if hashlib.sha256(data).hexdigest() != s.sha256:
            raise UserError(f"{s.url}: pseudo-label shard changed since it was written")
        table = pq.read_table(io.BytesIO(data))
        ids.append(np.asarray(table.column("id").to_pylist(), dtype=object))
        column = table.column("probs").combine_chunks()
        probs.append(column.values.to_numpy().reshape(len(column), -1))
    return np.concatenate(ids), np.concatenate(probs)


def _truth(data_root: str, ids: np.ndarray) -> np.ndarray | None:
    url = storage.join(data_root, dataset.UNLABELLED_TRUTH)
    if not storage.exists(url):
        return None
    truth = storage.read_parquet(url).to_pandas().set_index("id")["label"]
    return truth.reindex(ids).to_numpy()


def filter_and_balance(
    shards: list[PseudoLabelShard],
    cfg: SelectionConfig,
    data_root: str,
    pseudo_url: str,
    out_url: str,
    teacher: TrainedModel,
    parent_run_id: str,
    iteration: int,
    seed: int,
    log: Log = print,
) -> SelectedPseudoLabels:
    """Drop unsure images, balance classes, and write the student's pseudo-labelled set."""
    start = time.perf_counter()
    lineage = {
        f"{tracking.TAG}teacher_run_id": teacher.mlflow_run_id,
        f"{tracking.TAG}teacher_url": teacher.url,
        f"{tracking.TAG}pseudo_labels_url": pseudo_url,
    }
    # The shards ran in parallel workers; the inference stage is recorded here, once they
    # are gathered, so that a single writer talks to the tracking store.
    inference_seconds = max(s.seconds for s in shards) if shards else 0.0
    inference_run = tracking.start_stage_run(
        parent_run_id,
        "infer_pseudo_labels",
        iteration,
        {"shards": len(shards), "teacher_model": teacher.model},
        lineage,
    )
    for s in shards:
        tracking.log_metrics(
            inference_run, {"shard_rows": s.rows, "shard_seconds": s.seconds}, step=s.index
        )
    storage.write_json(
        storage.join(pseudo_url, dataset.MANIFEST),
        {
            "format": "noisy-student-pseudo-labels",
            "teacher_url": teacher.url,
            "teacher_run_id": teacher.mlflow_run_id,
            "shards": [
                {"file": s.url.rsplit("/", 1)[-1], "rows": s.rows, "sha256": s.sha256}
                for s in sorted(shards, key=lambda s: s.index)
            ],
        },
    )

    run_id = tracking.start_stage_run(
        parent_run_id, "filter_and_balance", iteration, cfg.model_dump(), lineage
    )
    with tracking.failed_on_error(run_id, inference_run):
        manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
        ids, probs = _read_pseudo_labels(shards)
        if len(ids) == 0:
            raise UserError(f"{manifest.url}: the unlabelled set is empty")
        truth = _truth(data_root, ids)
        accuracy_all = float((probs.argmax(1) == truth).mean()) if truth is not None else None
        tracking.log_metrics(
            inference_run,
            {
                "images": len(ids),
                "seconds": inference_seconds,
                "mean_confidence": float(probs.max(1).mean()),
                **({"pseudo_label_accuracy": accuracy_all} if accuracy_all is not None else {}),
            },
        )
        tracking.end_run(inference_run)

        sel = select(
            ids,
            probs,
            manifest.num_classes,
            cfg.min_confidence,
            cfg.balance,
            cfg.per_class_quota,
            cfg.labels,
            cfg.temperature,
            cfg.hard_label_smoothing,
            seed,
        )
        accuracy = None
        if truth is not None:
            # hash-based: np.isin on object (string) arrays compares all pairs, 80 s here
            kept = pd.Index(ids).isin(sel.rows["id"])
            accuracy = float((probs.argmax(1)[kept] == truth[kept]).mean())

        k = manifest.num_classes
        targets = np.stack(sel.rows["target"].to_numpy()).astype(np.float32)
        table = pa.table(
            {
                "id": sel.rows["id"].astype(str).tolist(),
                "target": pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1)), k),
                "confidence": sel.rows["confidence"].to_numpy(),
                "predicted": sel.rows["predicted"].to_numpy(),
            }
        )
        storage.write_parquet(
            storage.join(out_url, "part-00000.parquet"), table, row_group_size=65536
        )
        per_class = sel.per_class.assign(
            name=[manifest.class_names[c] for c in sel.per_class["class"]]
        )
        storage.write_json(
            storage.join(out_url, dataset.MANIFEST),
            {
                "format": "noisy-student-selection",
                "rows": len(sel.rows),
                "files": ["part-00000.parquet"],
                "pseudo_labels_url": pseudo_url,
                "per_class": per_class.to_dict(orient="records"),
            },
        )
        metrics = {
            "total": sel.total,
            "kept": sel.kept_unique,
            "selected": len(sel.rows),
            "dropped": sel.total - sel.kept_unique,
        }
        if accuracy is not None:
            metrics |= {
                "pseudo_label_accuracy": accuracy,
                "pseudo_label_accuracy_all": accuracy_all,
            }
        tracking.log_metrics(run_id, metrics)
        tracking.log_dict(run_id, per_class.to_dict(orient="records"), "per_class.json")
        tracking.log_dataset(run_id, per_class, out_url, f"selected-{iteration}", "pseudo_labels")
        tracking.set_tags(
            run_id,
            {
                f"{tracking.TAG}inference_run_id": inference_run,
                f"{tracking.TAG}selected_url": out_url,
            },
        )
        tracking.end_run(run_id)
        log(
            f"pseudo labels: {sel.total} images, {sel.kept_unique} kept, {len(sel.rows)} after "
            f"balancing" + (f", {accuracy:.2%} right" if accuracy is not None else "")
        )
        return SelectedPseudoLabels(
            out_url,
            pseudo_url,
            run_id,
            inference_run,
            sel.total,
            sel.kept_unique,
            len(sel.rows),
            accuracy,
            accuracy_all,
            inference_seconds,
            time.perf_counter() - start,
            per_class.to_dict(orient="records"),
        )


def _load_selected(
    selected_url: str, unlabelled: dataset.ImageSet
) -> tuple[torch.Tensor, torch.Tensor]:
    info = storage.read_json(storage.join(selected_url, dataset.MANIFEST))
    table = storage.read_parquet(storage.join(selected_url, info["files"][0]))
    if table.num_rows != info["rows"]:
        raise UserError(f"{selected_url}: {table.num_rows} rows, manifest says {info['rows']}")
    position = pd.Series(np.arange(len(unlabelled)), index=unlabelled.ids)
    ids = table.column("id").to_pylist()
    index = position.reindex(ids)
    if index.isna().any():
        raise UserError(
            f"{selected_url}: id {ids[int(index.isna().argmax())]!r} is not in the unlabelled set"
        )
    target = table.column("target").combine_chunks()
    targets = torch.from_numpy(target.values.to_numpy().reshape(len(target), -1).copy())
    return unlabelled.images[torch.from_numpy(index.to_numpy(dtype=np.int64, copy=True))], targets


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
    log: Log = print,
) -> TrainedModel:
    """An equal-or-larger model trained on labelled plus pseudo-labelled images, with
    noise: RandAugment on the input, dropout and stochastic depth in the model. The
    student is added as a version of `registered_model` when one is named."""
    start = time.perf_counter()
    manifest, labelled = _labelled(data_root)
    _, unlabelled = dataset.load(storage.join(data_root, dataset.UNLABELLED))
    _, test = _test(data_root)
    pseudo_images, pseudo_targets = _load_selected(selected.url, unlabelled)
    run_id = tracking.start_stage_run(
        parent_run_id,
        "train_student",
        iteration,
        _train_params(
            cfg, labelled_images=len(labelled), pseudo_labelled_images=len(pseudo_images), seed=seed
        ),
        {
            f"{tracking.TAG}role": "student",
            f"{tracking.TAG}teacher_run_id": teacher.mlflow_run_id,
            f"{tracking.TAG}teacher_url": teacher.url,
            f"{tracking.TAG}pseudo_labels_run_id": selected.mlflow_run_id,
            f"{tracking.TAG}pseudo_labels_url": selected.url,
        },
    )
    with tracking.failed_on_error(run_id):
        tracking.log_dataset(
            run_id,
            pd.DataFrame(selected.per_class),
            selected.url,
            f"selected-{iteration}",
            "training",
        )
        model = models.create(
            cfg.model,
            manifest.num_classes,
            manifest.channels,
            cfg.drop_rate,
            cfg.drop_path_rate,
            cfg.pretrained,
            cfg.checkpoint,
        )
        if cfg.init_from_teacher:
            teacher_meta = models.load_meta(teacher.url)
            if teacher_meta.model != cfg.model:
                raise UserError(
                    f"students.{iteration - 1}.init_from_teacher: teacher is "
                    f"{teacher_meta.model}, student is {cfg.model}"
                )
            model.load_state_dict(models.load_state(teacher.url))
        targets = engine.one_hot(labelled.labels, manifest.num_classes, cfg.label_smoothing)
        fit = engine.fit(
            model,
            labelled.images,
            targets,
            _schedule(cfg, cfg.unlabelled_ratio),
            _noise(cfg),
            seed + iteration,
            pseudo_images=pseudo_images,
            pseudo_targets=pseudo_targets,
            eval_images=test.images,
            eval_labels=test.labels,
            on_epoch=_epoch_logger(run_id, f"student {iteration}", log),
        )
        student = _finish_training(
            "student", iteration, cfg, fit, _meta(cfg, manifest), out_url, run_id, start
        )
        if registered_model:
            version = tracking.register(run_id, registered_model)
            log(f"student {iteration} registered as models:/{registered_model}/{version}")
        return student


def evaluate_robustness(
    trained: list[TrainedModel],
    cfg: EvaluationConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    log: Log = print,
) -> Robustness:
    """Clean test accuracy and accuracy under common corruptions, models side by side."""
    start = time.perf_counter()
    _, test = _test(data_root)
    subset = torch.arange(len(test))
    if cfg.corruption_images and cfg.corruption_images < len(test):
        subset = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        subset = subset[: cfg.corruption_images].sort().values
    images, labels = test.images[subset], test.labels[subset]
    corrupted = {
        (name, s): corruptions.corrupt(images, name, s, cfg.seed)
        for name in cfg.corruptions
        for s in cfg.severities
    }
    run_id = tracking.start_stage_run(
        parent_run_id,
        "evaluate_robustness",
        iteration,
        {**cfg.model_dump(), "models": [t.mlflow_run_id for t in trained]},
        {f"{tracking.TAG}{t.role}_run_id": t.mlflow_run_id for t in trained},
    )
    with tracking.failed_on_error(run_id):
        rows, results = [], []
        for t in trained:
            model, _ = models.load(t.url)
            model.to(engine.device())
            clean = engine.accuracy(model, test.images, test.labels, cfg.batch_size, cfg.precision)
            rows.append(
                {
                    "model": t.model,
                    "mlflow_run_id": t.mlflow_run_id,
                    "iteration": iteration,
                    "role": t.role,
                    "corruption": "none",
                    "severity": 0,
                    "accuracy": clean,
                }
            )
            per_corruption: dict[str, list[float]] = {}
            for (name, s), x in corrupted.items():
                acc = engine.accuracy(model, x, labels, cfg.batch_size, cfg.precision)
                per_corruption.setdefault(name, []).append(acc)
                rows.append(
                    {
                        "model": t.model,
                        "mlflow_run_id": t.mlflow_run_id,
                        "iteration": iteration,
                        "role": t.role,
                        "corruption": name,
                        "severity": s,
                        "accuracy": acc,
                    }
                )
            mean_corrupt = float(np.mean([a for accs in per_corruption.values() for a in accs]))
            results.append(
                {
                    "role": t.role,
                    "model": t.model,
                    "mlflow_run_id": t.mlflow_run_id,
                    "test_accuracy": clean,
                    "corruption_accuracy": mean_corrupt,
                    "per_corruption": {k: float(np.mean(v)) for k, v in per_corruption.items()},
                }
            )
            metrics = {
                f"{t.role}_test_accuracy": clean,
                f"{t.role}_corruption_accuracy": mean_corrupt,
            }
            metrics |= {
                f"{t.role}_{k}_accuracy": float(np.mean(v)) for k, v in per_corruption.items()
            }
            tracking.log_metrics(run_id, metrics)
            log(f"{t.role} {t.model}: clean {clean:.2%}, corrupted {mean_corrupt:.2%}")
        table = pa.Table.from_pylist(rows)
        storage.write_parquet(storage.join(out_url, "robustness.parquet"), table, 65536)
        tracking.end_run(run_id)
        return Robustness(out_url, run_id, time.perf_counter() - start, results)
