"""The promotion gate: does the run's final student replace the champion?"""

from prefect import task
from prefect.artifacts import create_markdown_artifact

from noisy_student import stages


def _decision_artifact(task, task_run, state) -> None:
    """The gate's decision as the task run's markdown artifact."""
    record = state.result()
    reasons = "\n".join(f"- {r}" for r in record["reasons"])
    create_markdown_artifact(
        key="promotion",
        markdown=f"**models:/{record['registered_model']}/{record['version']}** is the "
        f"**{record['decision']}**\n\n{reasons}\n",
        description="The promotion gate's decision",
    )


promote = task(stages.promote, name="promote", on_completion=[_decision_artifact])
