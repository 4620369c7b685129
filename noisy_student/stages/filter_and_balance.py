"""Stage 3: drop unsure pseudo labels, balance the classes, write the student's set."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisy_student import dataset, storage, tracking
from noisy_student.config import SelectionConfig
from noisy_student.errors import UserError
from noisy_student.selection import select
from noisy_student.stages.records import (
    Log,
    PseudoLabelShard,
    SelectedPseudoLabels,
    TrainedModel,
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
