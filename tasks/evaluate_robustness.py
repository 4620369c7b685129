"""Stage 5: clean, corrupted and adversarial accuracy, teacher and student side by side;
the Markdown report becomes a Prefect artifact of the task run."""

from prefect import task
from prefect.artifacts import create_markdown_artifact

from noisy_student import stages
from noisy_student.config import EvaluationConfig
from noisy_student.registry import tracking
from tasks.policies import CACHED, IO_RETRIES


@task(name="evaluate_robustness", **CACHED, **IO_RETRIES)
def evaluate_robustness(
    trained: list[stages.TrainedModel],
    cfg: EvaluationConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    earlier: list[str] | None = None,
) -> stages.Robustness:
    result = stages.evaluate_robustness(
        trained, cfg, data_root, out_url, parent_run_id, iteration, earlier
    )
    # test accuracy, mCE, ECE on the teacher's and the student's MLflow logged models
    tracking.log_model_figures(result.mlflow_run_id, result.models, iteration)
    # the same key every run, so the Artifacts page shows each iteration's report history
    create_markdown_artifact(
        markdown=result.report,
        key=f"robustness-iteration-{iteration}",
        description=f"Robustness after iteration {iteration}: {result.report_url}",
    )
    return result
