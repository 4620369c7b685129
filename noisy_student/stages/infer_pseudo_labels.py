"""Stage 2, one call per shard: the teacher labels clean unlabelled images."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import torch
from torch import nn

from noisy_student import dataset, engine, faults, models, storage
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
    shard = dataset.load_shard(manifest, shard_index)
    teacher = cached_teacher(teacher_url)
    probs = engine.predict_probs(teacher, shard.images, batch_size, precision).numpy()
    k = probs.shape[1] if probs.ndim == 2 else manifest.num_classes
    probs = probs.reshape(-1, k)
    table = pa.table(
        {
            "id": shard.ids,
            # the selection's first pass reads only these two columns
            "predicted": pa.array(probs.argmax(1), pa.int32()),
            "confidence": pa.array(probs.max(1), pa.float32()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), k),
        }
    )
    url = storage.join(out_url, f"part-{shard_index:05d}.parquet")
    sha256 = storage.write_parquet(url, table, row_group_size=dataset.ROW_GROUP_SIZE * 8)
    return PseudoLabelShard(shard_index, url, len(shard.ids), sha256, time.perf_counter() - start)


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
            # in the layout predict_probs wants, so threads sharing it never convert it
            teacher.to(engine.device(), memory_format=torch.channels_last)
            _teacher_cache[key] = teacher.eval()
        return _teacher_cache[key]
