"""The promotion gate: does the run's final student replace the champion?"""

from prefect import task
from prefect.artifacts import create_markdown_artifact

from noisy_student import stages
from noisy_student.config import EvaluationConfig


@task(name="promote")
def promote(
    student: stages.TrainedModel,
    robustness: list[stages.Robustness],
    registered_model: str,
    evaluation: EvaluationConfig,
    data_root: str,
    run_url: str,
    parent_run_id: str,
    iteration: int,
) -> dict:
    record = stages.promote(
        student,
        robustness,
        registered_model,
        evaluation,
        data_root,
        run_url,
        parent_run_id,
        iteration,
    )
    reasons = "\n".join(f"- {r}" for r in record["reasons"])
    create_markdown_artifact(
        key="promotion",
        markdown=f"**models:/{registered_model}/{record['version']}** is the "
        f"**{record['decision']}**\n\n{reasons}\n",
        description="The promotion gate's decision",
    )
    return record
