"""Stage 1 for a retraining run: an existing model (by default the champion) as the teacher."""

from prefect import get_run_logger, task

from noisy_student import stages


@task(name="existing_teacher")
def existing_teacher(ref: str, registered_model: str) -> stages.TrainedModel | None:
    return stages.existing_teacher(ref, registered_model, get_run_logger().info)
