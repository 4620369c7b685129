"""Stage 2, one task per shard: the teacher labels clean unlabelled images."""

from prefect import task

from noisy_student import stages


@task(name="infer_pseudo_labels", retries=2, retry_delay_seconds=[2, 10])
def infer_pseudo_labels(
    shard_index: int,
    data_root: str,
    teacher_url: str,
    out_url: str,
    batch_size: int,
    precision: str,
) -> stages.PseudoLabelShard:
    # Retried: the work is a pure function of its inputs and the write is one atomic put.
    return stages.infer_pseudo_labels(
        data_root, shard_index, teacher_url, out_url, batch_size, precision
    )
