"""After the last iteration: the final student scores the unlabelled pool, and the images
whose human labels would help most are written for annotators (docs/labelling.md)."""

from __future__ import annotations

from flows.labelling import label_unlabelled
from noisy_student import runs, stages
from noisy_student.data import storage
from tasks import label_queue

QUEUE = "label_queue"  # the queue's folder in the run folder


def queue_for_annotators(
    run: runs.PipelineRun,
    data_root: str,
    shard_indices: list[int],
    student: stages.TrainedModel,
    teacher_labels: list[stages.PseudoLabelShard],
) -> stages.LabelQueue | None:
    """`labelling.queue_size` images chosen by `labelling.strategy` from the final
    student's probabilities (the sharded labelling sub-flow, as for pseudo labels) and its
    teacher's (`teacher_labels`); None when the queue is switched off (size 0)."""
    config = run.config
    if not config.labelling.queue_size:
        return None
    out_url = storage.join(run.url, QUEUE)
    scores = label_unlabelled(
        cfg=config.inference, shard_indices=shard_indices, data_root=data_root,
        teacher_url=student.url, out_url=storage.join(out_url, "scores"),
        result_storage=run.task_results,
    )  # fmt: skip
    return label_queue.with_options(result_storage=run.task_results)(
        cfg=config.labelling, data_root=data_root, scores=scores, teacher_labels=teacher_labels,
        student=student, out_url=out_url, parent_run_id=run.parent_run_id, seed=config.seed,
        run_id=run.run_id, pipeline=config.name,
    )  # fmt: skip
