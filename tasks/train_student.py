"""Stage 4: a noised, equal-or-larger student on labelled plus pseudo-labelled images."""

from prefect import task

from noisy_student import stages, torchrun_stage
from noisy_student.config import PipelineConfig, StudentConfig
from tasks.artifacts import training_progress
from tasks.policies import CACHED


# No retries: a failure here is a bug or bad input, and a killed run resumes from the
# training state saved after every epoch instead of starting over.
@task(name="train_student", **CACHED)
def train_student(
    cfg: StudentConfig,
    data_root: str,
    selected: stages.SelectedPseudoLabels,
    teacher: stages.TrainedModel,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    seed: int,
    registered_model: str,
    torchrun: PipelineConfig | None = None,
) -> stages.TrainedModel:
    """With `torchrun` (the whole config), the stage runs data-parallel in
    `torchrun.distributed.nproc_per_node` processes instead of this one."""
    if torchrun is not None:
        return torchrun_stage.launch(
            torchrun,
            "student",
            data_root,
            out_url,
            parent_run_id,
            iteration,
            teacher,
            selected,
        )
    return stages.train_student(
        cfg,
        data_root,
        selected,
        teacher,
        out_url,
        parent_run_id,
        iteration,
        seed,
        registered_model,
        training_progress(f"student {iteration}"),
    )
