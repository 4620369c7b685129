"""MLflow lineage: one parent run per pipeline run, one child run per stage and iteration.

Everything goes through `MlflowClient` with explicit run ids, never the fluent
`mlflow.start_run` stack: that stack is thread-local, and Prefect runs tasks in worker
threads where a nested run would silently lose its parent.

The tracking URI is MLflow's own: `MLFLOW_TRACKING_URI` when set, else
`sqlite:///mlflow.db` in the working folder.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelInput,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.exceptions import MlflowException

from noisy_student.data import storage
from noisy_student.evaluation.scores import ModelScores

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "noisy_student."  # prefix of every lineage tag


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


_CREDENTIALS_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.I)


def redact(text: str) -> str:
    """Hide credentials written into a URL (https://user:secret@host -> https://***@host)."""
    return _CREDENTIALS_IN_URL.sub(r"\g<scheme>***@", text)


def display_uri() -> str:
    """The tracking URI as it may be printed or recorded."""
    return redact(tracking_uri())


def client() -> MlflowClient:
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI", uri))


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return c.get_experiment_by_name(name).experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{path}.{i}."))
        else:
            out[path] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def start_run(
    experiment: str,
    name: str,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    c = client()
    all_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(experiment), run_name=name, tags=all_tags)
    if params:
        items = [Param(k, redact(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def _continue(run_id: str, params: dict[str, Any] | None, tags: dict[str, str]) -> str:
    """Mark an interrupted run as running again; a param logged twice must keep its value,
    which holds here since a resumed stage has the same inputs."""
    c = client()
    c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    logged = c.get_run(run_id).data.params
    items = [
        Param(k, redact(v)[:6000]) for k, v in flatten(params or {}).items() if k not in logged
    ]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])
    set_tags(run_id, tags)
    return run_id


def start_pipeline_run(
    experiment: str, pipeline_run_id: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """The parent run of a pipeline run: the one started earlier under the same pipeline
    run id when there is one (a resumed run continues it), else a new one."""
    found = client().search_runs(
        [experiment_id(experiment)],
        f"tags.`{TAG}pipeline_run_id` = '{pipeline_run_id}'",
    )
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if parents:
        return _continue(parents[0].info.run_id, params, tags)
    return start_run(
        experiment, pipeline_run_id, params, {**tags, f"{TAG}pipeline_run_id": pipeline_run_id}
    )


def start_stage_run(
    parent_run_id: str,
    stage: str,
    iteration: int,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """A child run of the pipeline run for one stage of one iteration. If an earlier
    attempt of the same stage was interrupted, its run is continued instead: its metrics
    (the epochs trained before a crash) stay with the stage."""
    c = client()
    parent = c.get_run(parent_run_id)
    experiment = c.get_experiment(parent.info.experiment_id).name
    all_tags = {f"{TAG}stage": stage, f"{TAG}iteration": str(iteration), **(tags or {})}
    pipeline = parent.data.tags.get(f"{TAG}pipeline_run_id")
    if pipeline:
        all_tags[f"{TAG}pipeline_run_id"] = pipeline
    earlier = c.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TAG}stage` = '{stage}' "
        f"and tags.`{TAG}iteration` = '{iteration}'",
    )
    unfinished = [r for r in earlier if r.info.status != "FINISHED"]
    if unfinished:
        return _continue(unfinished[0].info.run_id, params, all_tags)
    return start_run(experiment, f"{stage}-{iteration}", params, all_tags, parent_run_id)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    client().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])


def log_dict(run_id: str, obj: Any, artifact_file: str) -> None:
    client().log_dict(run_id, obj, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_bytes(run_id: str, data: bytes, artifact_file: str) -> None:
    """A file's bytes (a PNG figure, say) as an artifact of the run."""
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
        client().log_artifact(run_id, os.path.join(tmp, name), folder or None)


def log_checkpoint(run_id: str, checkpoint_url: str, artifact_path: str = "model") -> None:
    """Copy a checkpoint folder (weights + timm config) into the run's artifacts."""
    from noisy_student.training.models import META, WEIGHTS

    with tempfile.TemporaryDirectory() as tmp:
        for name in (WEIGHTS, META):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(checkpoint_url, name)))
        client().log_artifacts(run_id, tmp, artifact_path)


def logged_model_of_run(run_id: str) -> str | None:
    """The id of the logged model a run output (a training stage's model), or None."""
    if not run_id:
        return None
    outputs = client().get_run(run_id).outputs
    found = [m.model_id for m in (outputs.model_outputs if outputs else [])]
    return found[-1] if found else None


def log_model_input(run_id: str, model_id: str | None) -> None:
    """Record a logged model as an input of the run (the teacher of a labelling or student
    run); nothing when there is none (a teacher given as a bare checkpoint)."""
    if model_id:
        client().log_inputs(run_id, models=[LoggedModelInput(model_id)])


# An evaluation's figures that become metrics of each judged model's logged model
MODEL_FIGURES = ("test_accuracy", "corruption_accuracy", "mce", "relative_mce", "ece_clean")


def log_model_figures(run_id: str, judged: list[ModelScores], step: int = 0) -> None:
    """Each judged model's MODEL_FIGURES as metrics of its logged model, measured by
    `run_id`."""
    for figures in judged:
        model_id = logged_model_of_run(figures.mlflow_run_id)
        if model_id:
            metrics = {k: getattr(figures, k) for k in MODEL_FIGURES}
            log_model_metrics(run_id, model_id, metrics, step)


def log_model_metrics(
    run_id: str, model_id: str, metrics: dict[str, float | None], step: int = 0
) -> None:
    """Metrics of a logged model measured by `run_id` (an evaluation after training)."""
    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step, model_id=model_id, run_id=run_id)
        for k, v in metrics.items()
        if v is not None and v == v  # NaN: a figure without meaning, left out
    ]
    client().log_batch(run_id, metrics=batch)


def log_dataset(run_id: str, frame: pd.DataFrame, source: str, name: str, context: str) -> None:
    """Record a dataset (a small summary frame standing for it) as an input of the run."""
    # from_pandas warns that a local path could be several source kinds and that integer
    # columns cannot hold nulls; neither matters for a summary frame.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        entity = mlflow.data.from_pandas(frame, source=source, name=name)._to_mlflow_entity()
    client().log_inputs(
        run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", context)])]
    )


def end_run(run_id: str, failed: bool = False) -> None:
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    client().set_terminated(run_id, status)


@contextmanager
def failed_on_error(*run_ids: str | None) -> Iterator[None]:
    """Mark the runs FAILED if the block raises, so that none is left showing as running
    (None stands for no run, as on torchrun ranks other than 0)."""
    try:
        yield
    except BaseException:
        for run_id in filter(None, run_ids):
            end_run(run_id, failed=True)
        raise


def register(run_id: str, model_name: str, model_id: str | None = None) -> str:
    """Add the run's logged model (by default the one the run output) as a new version of a
    registered model; returns the version. `mlflow.pyfunc.load_model("models:/NAME@ALIAS")`
    loads it. A run without a logged model (checkpoint files only, as runs logged before
    logged models were) gives a version of its `model/` folder, which only `predict` reads."""
    c = client()
    try:
        c.create_registered_model(model_name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    model_id = model_id or logged_model_of_run(run_id)
    source = f"models:/{model_id}" if model_id else f"runs:/{run_id}/model"
    mv = c.create_model_version(model_name, source, run_id=run_id, model_id=model_id)
    return mv.version


def download_model(run_id: str, artifact_path: str = "model") -> str:
    return client().download_artifacts(run_id, artifact_path, tempfile.mkdtemp(prefix="ns-model-"))


def registered_run_id(name: str, version: str | None = None, alias: str | None = None) -> str:
    """The run of a registered model's version: that version, the one under `alias`, or
    the latest."""
    c = client()
    if alias is not None:
        return c.get_model_version_by_alias(name, alias).run_id
    if version is not None:
        return c.get_model_version(name, version).run_id
    versions = c.search_model_versions(f"name='{name}'")
    if not versions:
        raise MlflowException(f"registered model {name!r} has no versions")
    return max(versions, key=lambda v: int(v.version)).run_id


def model_version_by_alias(model_name: str, alias: str):
    """The registered model's version under `alias`, or None (no such model or alias)."""
    try:
        return client().get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def model_version_of_run(model_name: str, run_id: str):
    versions = client().search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    if not versions:
        raise MlflowException(f"run {run_id} has no version of registered model {model_name!r}")
    return max(versions, key=lambda v: int(v.version))


def set_alias(model_name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(model_name, alias, version)


def set_version_tags(model_name: str, version: str, tags: dict[str, str]) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name, version, k, str(v))


def run_data(run_id: str):
    """Tags, metrics and params of a run."""
    return client().get_run(run_id).data
