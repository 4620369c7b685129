"""Stage 5: clean and corrupted test accuracy, teacher and student side by side."""

from prefect import get_run_logger, task

from noisy_student import stages
from noisy_student.config import EvaluationConfig
from tasks.policies import CACHED, IO_RETRIES


@task(name="evaluate_robustness", **CACHED, **IO_RETRIES)
def evaluate_robustness(
    trained: list[stages.TrainedModel],
    cfg: EvaluationConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int,
) -> stages.Robustness:
    return stages.evaluate_robustness(
        trained, cfg, data_root, out_url, parent_run_id, iteration, get_run_logger().info
    )
