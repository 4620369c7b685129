"""Stage 2, one task per shard: the teacher labels clean unlabelled images."""

from prefect import task

from noisy_student import stages
from tasks.policies import CACHED, IO_RETRIES

# Retried on transient storage errors: the work is a pure function of its inputs and the
# write is one atomic put. Cached per shard: a resumed run redoes only missing ones.
infer_pseudo_labels = task(
    stages.infer_pseudo_labels, name="infer_pseudo_labels", **CACHED, **IO_RETRIES
)
