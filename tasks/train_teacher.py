"""Stage 1: the first teacher, trained on the labelled images."""

from prefect import get_run_logger, task

from noisy_student import stages
from noisy_student.config import TeacherConfig
from tasks.policies import CACHED


@task(name="train_teacher", **CACHED)  # no retries: see train_student
def train_teacher(
    cfg: TeacherConfig, data_root: str, out_url: str, parent_run_id: str, seed: int
) -> stages.TrainedModel:
    return stages.train_teacher(cfg, data_root, out_url, parent_run_id, seed, get_run_logger().info)
