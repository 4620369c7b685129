"""The promotion gate: does the run's final student replace the champion?"""

from prefect import task
from prefect.artifacts import create_markdown_artifact

from noisy_student import stages


def _decision_artifact(task, task_run, state) -> None:
    """The gate's decision as the task run's markdown artifact: the reasons (paired counts,
    p-values, margins), the split chosen on, and each student against its teacher."""
    record = state.result()
    reasons = "\n".join(f"- {r}" for r in record["reasons"])
    chosen_on = (
        f"Chosen on the **{record['chosen_on']}** split"
        + (
            " (chosen on the test split: the dataset has no validation split)"
            if record["chosen_on"] == "test"
            else ""
        )  # fmt: skip
        + f"; gate: {record['gate']['mode']}, {record['gate']['test']}, alpha "
        f"{record['gate']['alpha']}, min margin {record['gate']['min_margin']}."
    )
    students = "\n".join(
        f"- student {v['iteration']} against its teacher: **{v['verdict']}** (p = "
        f"{v['comparison']['accuracy']['p_value']:.3g}, "
        f"{100 * v['comparison']['accuracy']['difference']:+.2f} points)"
        for v in record.get("students_against_teachers", [])
    )
    create_markdown_artifact(
        key="promotion",
        markdown=f"**models:/{record['registered_model']}/{record['version']}** is the "
        f"**{record['decision']}**\n\n{chosen_on}\n\n{reasons}\n\n{students}\n",
        description="The promotion gate's decision",
    )


promote = task(stages.promote, name="promote", on_completion=[_decision_artifact])
