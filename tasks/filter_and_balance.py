"""Stage 3: drop unsure pseudo labels and balance the classes."""

from prefect import get_run_logger, task

from noisy_student import stages
from noisy_student.config import SelectionConfig
from tasks.policies import CACHED, IO_RETRIES


@task(name="filter_and_balance", **CACHED, **IO_RETRIES)
def filter_and_balance(
    shards: list[stages.PseudoLabelShard],
    cfg: SelectionConfig,
    data_root: str,
    pseudo_url: str,
    out_url: str,
    teacher: stages.TrainedModel,
    parent_run_id: str,
    iteration: int,
    seed: int,
    previous_pseudo_url: str | None = None,
) -> stages.SelectedPseudoLabels:
    return stages.filter_and_balance(
        shards,
        cfg,
        data_root,
        pseudo_url,
        out_url,
        teacher,
        parent_run_id,
        iteration,
        seed,
        get_run_logger().info,
        previous_pseudo_url,
    )
