"""Stage 2, one call per shard: the teacher labels clean unlabelled images."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from torch import nn

from noisy_student.data import dataset, faults, storage
from noisy_student.data.prefetch import COMPUTE_THREADS, prefetch, reader_has_a_core
from noisy_student.registry import tracking
from noisy_student.stages.records import PseudoLabelShard, TrainedModel
from noisy_student.training import engine, models


def infer_pseudo_labels(
    data_root: str,
    shard_index: int,
    teacher_url: str,
    out_url: str,
    batch_size: int,
    precision: str = "auto",
    tta: str = "off",
) -> PseudoLabelShard:
    """Class probabilities for one shard of unlabelled images: the teacher in eval mode on
    clean images (no augmentation, no dropout, no stochastic depth); with `tta="flip"` the
    mean over each image and its mirror image."""
    start = time.perf_counter()
    faults.kill_point(f"pseudo-labels:shard={shard_index}")
    manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    with read_ahead(manifest, shard_index, batch_size) as batches:
        teacher = cached_teacher(teacher_url)
        ids, probs = label_batches(teacher, batches, manifest.num_classes, precision, tta)
    k = probs.shape[1]
    table = pa.table(
        {
            "id": ids,
            # the selection's first pass reads only these two columns
            "predicted": pa.array(probs.argmax(1), pa.int32()),
            "confidence": pa.array(probs.max(1), pa.float32()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), k),
        }
    )
    url = storage.join(out_url, f"part-{shard_index:05d}.parquet")
    sha256 = storage.write_parquet(url, table, row_group_size=dataset.ROW_GROUP_SIZE * 8)
    return PseudoLabelShard(shard_index, url, len(ids), sha256, time.perf_counter() - start)


_teacher_lock = threading.Lock()
_teacher_cache: dict[tuple[str, str], nn.Module] = {}


def cached_teacher(url: str) -> nn.Module:
    """The teacher on this process's device, loaded once per process and checkpoint: every
    shard a worker labels reuses it. Keyed by the URL and the store's checksum of the
    weights, so a checkpoint rewritten in place is loaded afresh. Holds one teacher: the
    previous iteration's is done when the next one's first shard arrives."""
    key = (url, storage.checksum(storage.join(url, models.WEIGHTS)))
    with _teacher_lock:  # shards labelled by threads of one worker wait for a single load
        if key not in _teacher_cache:
            _teacher_cache.clear()
            teacher, _ = models.load(url)
            # eval mode and channels_last now, so threads sharing it never convert it
            _teacher_cache[key] = engine.for_inference(teacher.to(engine.device()))
        return _teacher_cache[key]


def read_ahead(
    manifest: dataset.Manifest, shard_index: int, batch_size: int
) -> contextlib.AbstractContextManager[Iterator[dataset.ImageSet]]:
    """The shard's decoded batches, in memory that holds a few batches whatever the shard's
    size, laid out for the model.

    On a GPU, or where torch computes on fewer threads than the process has cores, they are
    read two ahead in a background thread that starts at once (while the teacher loads),
    pinned for asynchronous copies on a GPU: the reader has a core of its own. Where torch's
    threads already fill every core, a reader thread beside them only takes turns with
    them, so each batch is decoded between forward passes instead, its rows over one thread
    per torch thread where the decoder releases the GIL (JPEG; small PNG rows go through
    pyspng, which holds it). Six interleaved rounds here (2 cores): 0.96 of the forward pass
    alone at 28 px PNG against 0.92 with the reader thread, 0.95-0.96 against 0.94 at 96 px
    RGB JPEG, where two decode threads take a batch of 256 from 32 to 16 ms
    (benchmarks/results/history.md)."""
    cuda = engine.device().type == "cuda"
    if cuda or reader_has_a_core():
        batches = dataset.iter_shard_batches(
            manifest, shard_index, batch_size, pin_memory=cuda, channels_last=True
        )
        return prefetch(batches)
    threads = COMPUTE_THREADS if dataset.decodes_without_gil(manifest) else 1
    return contextlib.closing(
        dataset.iter_shard_batches(
            manifest, shard_index, batch_size, channels_last=True, decode_threads=threads
        )
    )


def label_batches(
    model: nn.Module,
    batches: Iterable[dataset.ImageSet],
    num_classes: int,
    precision: str = "auto",
    tta: str = "off",
) -> tuple[list[str], np.ndarray]:
    """Ids and class probabilities (rows x classes) of every batch, from a model made ready
    by `engine.for_inference` (as `cached_teacher` is), one batch on the device at a time;
    only the ids and probabilities accumulate."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for batch in batches:
        ids.extend(batch.ids)
        parts.append(engine.batch_probs(model, batch.images, precision, tta).numpy())
    if not parts:
        return ids, np.empty((0, num_classes), np.float32)
    return ids, np.concatenate(parts)


def record_labelling(
    shards: list[PseudoLabelShard],
    teacher: TrainedModel,
    pseudo_url: str,
    parent_run_id: str,
    iteration: int,
    lineage: dict[str, str],
) -> str:
    """The labelling stage's MLflow run and its pseudo labels' manifest, once the shards
    are gathered: they ran in parallel workers, and a single writer talks to the tracking
    store. Returns the run's id; `finish_labelling_run` ends it."""
    inference_run = tracking.start_stage_run(
        parent_run_id,
        "infer_pseudo_labels",
        iteration,
        {"shards": len(shards), "teacher_model": teacher.model},
        lineage,
    )
    # the teacher's logged model labelled these images (none for a bare checkpoint)
    tracking.log_model_input(inference_run, tracking.logged_model_of_run(teacher.mlflow_run_id))
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
                for s in shards
            ],
        },
    )
    return inference_run


def finish_labelling_run(
    inference_run: str,
    images: int,
    seconds: float,
    confidence_sum: float,
    accuracy: float | None,
    scored: int,
) -> None:
    """The labelling stage's figures over every image (the selection's first pass reads
    them), and the end of its run."""
    metrics = {"images": images, "seconds": seconds, "mean_confidence": confidence_sum / images}
    if accuracy is not None:
        metrics |= {"pseudo_label_accuracy": accuracy, "scored": scored}
    tracking.log_metrics(inference_run, metrics)
    tracking.end_run(inference_run)
