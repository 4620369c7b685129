"""Stage 2, one task per shard: the teacher labels clean unlabelled images."""

from prefect import task

from noisy_student import stages
from tasks.policies import CACHED, IO_RETRIES


@task(name="infer_pseudo_labels", **CACHED, **IO_RETRIES)
def infer_pseudo_labels(
    shard_index: int,
    data_root: str,
    teacher_url: str,
    out_url: str,
    batch_size: int,
    precision: str,
) -> stages.PseudoLabelShard:
    # Retried on transient storage errors: the work is a pure function of its inputs and
    # the write is one atomic put. Cached per shard: a resumed run redoes only missing ones.
    return stages.infer_pseudo_labels(
        data_root, shard_index, teacher_url, out_url, batch_size, precision
    )
