"""The promotion gate: does the run's final student replace the champion?"""

from prefect import task
from prefect.artifacts import create_markdown_artifact

from noisy_student import stages
from noisy_student.stages.promote import decision_markdown


def _decision_artifact(task, task_run, state) -> None:
    """The gate's decision as the task run's markdown artifact."""
    create_markdown_artifact(
        key="promotion",
        markdown=decision_markdown(state.result()),
        description="The promotion gate's decision",
    )


promote = task(stages.promote, name="promote", on_completion=[_decision_artifact])
