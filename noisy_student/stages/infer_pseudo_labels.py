"""Stage 2, one call per shard: the teacher labels clean unlabelled images."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
from torch import nn

from noisy_student import dataset, engine, faults, models, storage
from noisy_student.prefetch import prefetch
from noisy_student.stages.records import PseudoLabelShard


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
    faults.kill_point(f"pseudo-labels:shard={shard_index}")
    manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    # reading and decoding start now, in a background thread, while the teacher loads
    with read_ahead(manifest, shard_index, batch_size) as batches:
        teacher = cached_teacher(teacher_url)
        ids, probs = label_batches(teacher, batches, manifest.num_classes, precision)
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


def read_ahead(manifest: dataset.Manifest, shard_index: int, batch_size: int) -> prefetch:
    """The shard's decoded batches, read two ahead in a background thread, in memory that
    holds a few batches whatever the shard's size; pinned for asynchronous copies on a GPU."""
    pin = engine.device().type == "cuda"
    return prefetch(dataset.iter_shard_batches(manifest, shard_index, batch_size, pin))


def label_batches(
    model: nn.Module,
    batches: Iterable[dataset.ImageSet],
    num_classes: int,
    precision: str = "auto",
) -> tuple[list[str], np.ndarray]:
    """Ids and class probabilities (rows x classes) of every batch, from a model made ready
    by `engine.for_inference` (as `cached_teacher` is), one batch on the device at a time;
    only the ids and probabilities accumulate."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for batch in batches:
        ids.extend(batch.ids)
        parts.append(engine.batch_probs(model, batch.images, precision).numpy())
    if not parts:
        return ids, np.empty((0, num_classes), np.float32)
    return ids, np.concatenate(parts)
