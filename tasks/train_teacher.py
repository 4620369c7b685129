"""Stage 1: the first teacher, trained on the labelled images."""

from prefect import task

from noisy_student import stages, torchrun_stage
from noisy_student.config import PipelineConfig, TeacherConfig
from tasks.artifacts import training_progress
from tasks.policies import CACHED


@task(name="train_teacher", **CACHED)  # no retries: see train_student
def train_teacher(
    cfg: TeacherConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    seed: int,
    torchrun: PipelineConfig | None = None,
) -> stages.TrainedModel:
    """With `torchrun` (the whole config), the stage runs data-parallel in
    `torchrun.distributed.nproc_per_node` processes instead of this one."""
    if torchrun is not None:
        return torchrun_stage.launch(torchrun, "teacher", data_root, out_url, parent_run_id)
    return stages.train_teacher(
        cfg, data_root, out_url, parent_run_id, seed, training_progress("teacher")
    )
