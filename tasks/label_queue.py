"""After the last iteration: the label queue, shown in the Prefect UI as a table of its
first rows and the contact sheet."""

import base64

from prefect import task
from prefect.artifacts import create_image_artifact, create_table_artifact

from noisy_student import stages
from noisy_student.config import LabellingConfig
from noisy_student.data import storage
from tasks.artifacts import artifact_key
from tasks.policies import CACHED, IO_RETRIES


@task(name="label_queue", **CACHED, **IO_RETRIES)
def label_queue(
    cfg: LabellingConfig,
    data_root: str,
    scores: list[stages.PseudoLabelShard],
    teacher_labels: list[stages.PseudoLabelShard],
    student: stages.TrainedModel,
    out_url: str,
    parent_run_id: str,
    seed: int,
    run_id: str,
    pipeline: str,
) -> stages.LabelQueue:
    queue = stages.label_queue(
        cfg, data_root, scores, teacher_labels, student, out_url, parent_run_id, seed, run_id
    )
    # keyed by the pipeline's name: the Artifacts page keeps every run's queue in one history
    description = f"Run {run_id}: the images to label next, by {queue.strategy} ({queue.url})"
    create_table_artifact(
        table=queue.rows, key=artifact_key(pipeline, "-label-queue"), description=description
    )
    # the sheet travels inside the artifact: a run folder is rarely served to a browser
    sheet = storage.read_bytes(queue.files["contact_sheet"])
    create_image_artifact(
        image_url=f"data:image/png;base64,{base64.b64encode(sheet).decode()}",
        key=artifact_key(pipeline, "-label-queue-sheet"),
        description=description,
    )
    return queue
