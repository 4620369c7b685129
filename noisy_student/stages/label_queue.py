"""After the last iteration: the unlabelled images worth a human label next, written for
annotators (noisy_student/labelling/label_queue.py says how they are chosen)."""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisy_student.config import LabellingConfig
from noisy_student.data import dataset, storage
from noisy_student.labelling.label_queue import Candidates, write_files
from noisy_student.registry import tracking
from noisy_student.stages.records import LabelQueue, PseudoLabelShard, TrainedModel

logger = logging.getLogger(__name__)
SHOWN = ["rank", "id", "model_class", "confidence", "teacher_class", "reason"]
SHOWN_ROWS = 50


def _probabilities(shard: PseudoLabelShard) -> tuple[list[str], np.ndarray]:
    """Ids and class probabilities of one shard of a model's labels of the pool."""
    data = storage.read_verified(shard.url, shard.sha256, "the labelling stage's record")
    table = pq.read_table(io.BytesIO(data), columns=["id", "probs"])
    column = table.column("probs").combine_chunks()
    k = column.type.list_size
    return table.column("id").to_pylist(), column.values.to_numpy().reshape(len(column), k)


def _aligned(ids: list[str], other: tuple[list[str], np.ndarray] | None, k: int) -> np.ndarray:
    """The other model's probabilities in the order of `ids`; NaN rows where it has none
    (an image that left or joined the pool between the two labellings)."""
    if other is None:
        return np.full((len(ids), k), np.nan)
    frame = pd.DataFrame(other[1], index=other[0])
    return frame.reindex(ids).to_numpy(dtype=np.float64)


def _stored_images(manifest: dataset.Manifest, queue: pd.DataFrame) -> list[bytes]:
    """The queued images' bytes as the unlabelled shards store them, in queue order."""
    found: dict[str, bytes] = {}
    for index, group in queue.groupby("shard"):
        table = dataset.read_shard(manifest, int(index))
        row = {i: k for k, i in enumerate(table.column("id").to_pylist())}
        images = table.column("image").take(pa.array([row[i] for i in group["id"]])).to_pylist()
        found.update(zip(group["id"], images, strict=True))
    return [found[i] for i in queue["id"]]


def rank(
    cfg: LabellingConfig,
    pool: dataset.Manifest,
    scores: list[PseudoLabelShard],
    teacher_labels: list[PseudoLabelShard],
    seed: int,
) -> pd.DataFrame:
    """The first `cfg.queue_size` images of the pool by `cfg.strategy`, from the student's
    probabilities and its teacher's, shard by shard."""
    candidates = Candidates(cfg.strategy, cfg.queue_size, pool.class_names, seed)
    teacher_shards = {s.index: s for s in teacher_labels}
    for s in sorted(scores, key=lambda s: s.index):
        ids, probs = _probabilities(s)
        teacher = teacher_shards.get(s.index)
        teacher_probs = _aligned(ids, _probabilities(teacher) if teacher else None, probs.shape[1])
        candidates.add(ids, probs, teacher_probs, s.index)
    return candidates.queue()


def _write_scores_manifest(scores: list[PseudoLabelShard], student: TrainedModel) -> None:
    """A manifest names the scores' shards, as it does pseudo labels (gc keeps them)."""
    if not scores:
        return
    storage.write_json(
        storage.join(scores[0].url.rsplit("/", 1)[0], dataset.MANIFEST),
        {
            "format": "noisy-student-pseudo-labels",
            "teacher_url": student.url,  # the model that labelled: here the final student
            "teacher_run_id": student.mlflow_run_id,
            "shards": [
                {"file": s.url.rsplit("/", 1)[-1], "rows": s.rows, "sha256": s.sha256}
                for s in sorted(scores, key=lambda s: s.index)
            ],
        },
    )


def _record(
    cfg: LabellingConfig,
    queue: pd.DataFrame,
    urls: dict[str, str],
    student: TrainedModel,
    out_url: str,
    parent_run_id: str,
) -> str:
    """The queue's MLflow run (its figures, contact sheet and CSV) and one log line;
    returns the run's id."""
    disagreeing = int(
        (queue["teacher_class"].notna() & (queue["teacher_class"] != queue["model_class"])).sum()
    )
    mlflow_run = tracking.start_stage_run(
        parent_run_id,
        "label_queue",
        student.iteration,
        {"strategy": cfg.strategy, "queue_size": cfg.queue_size},
        {
            f"{tracking.TAG}student_run_id": student.mlflow_run_id,
            f"{tracking.TAG}label_queue_url": out_url,
        },
    )
    with tracking.failed_on_error(mlflow_run):
        tracking.log_metrics(
            mlflow_run,
            {
                "queued": len(queue),
                "mean_confidence": float(queue["confidence"].mean()) if len(queue) else 0.0,
                "teacher_disagrees": disagreeing,
            },
        )
        sheet = storage.read_bytes(urls["contact_sheet"])
        tracking.log_bytes(mlflow_run, sheet, "label_queue/contact_sheet.png")
        tracking.log_bytes(parent_run_id, sheet, "label_queue/contact_sheet.png")
        tracking.log_bytes(mlflow_run, storage.read_bytes(urls["csv"]), "label_queue/queue.csv")
        tracking.set_tags(parent_run_id, {f"{tracking.TAG}label_queue_url": out_url})
        tracking.end_run(mlflow_run)
    logger.info(
        f"label queue: {len(queue)} images by {cfg.strategy} (the student's mean confidence "
        f"on them {queue['confidence'].mean() if len(queue) else 0:.0%}; its teacher's class "
        f"differs on {disagreeing}) in {out_url}"
    )
    return mlflow_run


def label_queue(
    cfg: LabellingConfig,
    data_root: str,
    scores: list[PseudoLabelShard],
    teacher_labels: list[PseudoLabelShard],
    student: TrainedModel,
    out_url: str,
    parent_run_id: str,
    seed: int,
    run_id: str,
) -> LabelQueue:
    """Rank the pool by `cfg.strategy` from the final student's probabilities (`scores`)
    and its teacher's (`teacher_labels`, the last iteration's pseudo labels), and write the
    first `cfg.queue_size` images as Parquet, a Label Studio import, a CSV and a contact
    sheet under `out_url`."""
    start = time.perf_counter()
    pool = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    queue = rank(cfg, pool, scores, teacher_labels, seed)
    _write_scores_manifest(scores, student)
    title = (
        f"label queue of run {run_id}: {len(queue)} images by {cfg.strategy}, "
        f"the guess of student {student.iteration} ({student.model})"
    )
    urls = write_files(
        queue,
        _stored_images(pool, queue),
        pool.encoding,
        pool.class_names,
        out_url,
        title,
        model_version=f"{run_id} student {student.iteration}",
    )
    mlflow_run = _record(cfg, queue, urls, student, out_url, parent_run_id)
    return LabelQueue(
        url=out_url,
        strategy=cfg.strategy,
        size=len(queue),
        files=urls,
        mlflow_run_id=mlflow_run,
        seconds=time.perf_counter() - start,
        # the first rows, for the Prefect UI (plain JSON types: a task result is JSON)
        rows=json.loads(queue[SHOWN].head(SHOWN_ROWS).to_json(orient="records")),
    )
