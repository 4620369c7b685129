"""The training stages on a work pool of their own (`--training-pool NAME`): the pipeline's
flow stays where it is (labelling and evaluation with it, or on Dask/Ray as configured),
and each training stage becomes a run of the deployment `noisy-student-train/NAME`, which
a worker of the pool NAME picks up, e.g. on a GPU machine started only while it trains.

Everything the stage reads and writes is at the run's storage URLs (data, pseudo labels,
checkpoints, training state), so the two machines share nothing but the bucket, the
Prefect server and the MLflow server. The stage's record (`TrainedModel`) comes back the
same way: written beside the checkpoint, read by the flow once the run completed.

A global concurrency limit `gpu` (one slot unless changed: `serve --gpu-limit`, `prefect
gcl update gpu --limit N`) keeps trainings from sharing a device. A training run that
crashes (its machine reclaimed) is started again, up to `TRAINING_ATTEMPTS` times; it
continues from its saved training state. One that fails is not: its error fails the stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal, get_type_hints

from prefect import Task, flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python

import tasks
from noisy_student import stages
from noisy_student.data import storage
from noisy_student.training.engine import flush_denormals
from tasks.policies import CACHED

FLOW = "noisy-student-train"
GPU_LIMIT = "gpu"
RECORD = "trained_model.json"  # beside the checkpoint: the stage's result, for the flow
TRAINING_ATTEMPTS = 3
Stage = Literal["teacher", "student"]
STAGE_TASKS: dict[str, Task] = {"teacher": tasks.train_teacher, "student": tasks.train_student}


def deployment_name(pool: str) -> str:
    return f"{FLOW}/{pool}"


def ensure_gpu_limit(limit: int | None = None) -> None:
    """The global concurrency limit `gpu`: created with one slot where there is none; set
    to `limit` when given."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        if limit is not None:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, limit)
            return
        # the usual case: it exists, and is left as it is, whatever its limit
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1)
            )


def _typed(stage: Stage, inputs: dict[str, Any]) -> dict[str, Any]:
    """The stage's inputs as its task takes them (configs, records), from their JSON."""
    hints = get_type_hints(STAGE_TASKS[stage].fn)
    if unknown := sorted(set(inputs) - set(hints)):
        raise ValueError(f"train_{stage}: unknown inputs {unknown}")
    return {k: TypeAdapter(hints[k]).validate_python(v) for k, v in inputs.items()}


@flow(name=FLOW, log_prints=True)
def train_stage(stage: Stage, inputs: dict[str, Any]) -> dict[str, Any]:
    """One training stage, on the machine of the worker that runs it; returns its record,
    also written beside the checkpoint.

    Args:
        stage: Which one: teacher or student.
        inputs: The stage task's arguments, as JSON.
    """
    flush_denormals()  # a process the CLI did not set up
    ensure_gpu_limit()
    typed = _typed(stage, inputs)
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        trained = STAGE_TASKS[stage](**typed)
    record = asdict(trained)
    storage.write_json(storage.join(typed["out_url"], RECORD), record)
    return record


@task(name="train_on_pool", **CACHED)
def train_on_pool(stage: Stage, pool: str, inputs: dict[str, Any]) -> stages.TrainedModel:
    """Run the stage as a run of `noisy-student-train/<pool>` and wait for it. The
    idempotency key makes a resumed flow find the training run its crashed attempt started
    (running or finished) instead of starting a second one."""
    logger = get_run_logger()
    parameters = {"stage": stage, "inputs": to_jsonable_python(inputs)}
    key = hashlib.sha256(json.dumps([pool, parameters], sort_keys=True).encode()).hexdigest()
    for attempt in range(1, TRAINING_ATTEMPTS + 1):
        run = run_deployment(
            deployment_name(pool),
            parameters=parameters,
            idempotency_key=f"{key[:32]}-{attempt}",
            poll_interval=2,
        )
        state = run.state
        if state is not None and state.is_completed():
            record = storage.read_json(storage.join(inputs["out_url"], RECORD))
            return stages.TrainedModel(**record)
        if state is None or not state.is_crashed():
            raise RuntimeError(
                f"train_{stage} on work pool {pool}: flow run {run.name} ended "
                f"{state.name if state else 'without a state'}: "
                f"{state.message if state else ''}"
            )
        logger.warning(f"train_{stage}: flow run {run.name} crashed ({state.message}); again")
    raise RuntimeError(
        f"train_{stage} on work pool {pool}: crashed {TRAINING_ATTEMPTS} times; giving up"
    )


def on_pool(stage_task: Task, pool: str) -> Callable[..., stages.TrainedModel]:
    """`stage_task` (train_teacher or train_student), called as before, run on `pool`."""
    stage = stage_task.name.removeprefix("train_")
    remote = train_on_pool.with_options(
        name=stage_task.name, result_storage=stage_task.result_storage
    )

    def train(**inputs: Any) -> stages.TrainedModel:
        return remote(stage=stage, pool=pool, inputs=inputs)

    return train


def training_deployment(pool: str) -> RunnerDeployment:
    """`noisy-student-train/<pool>` on the work pool `pool`. Its worker imports the flow
    from the installed package and runs it in a folder of its own: the inputs are URLs."""
    return train_stage.to_deployment(
        name=pool,
        work_pool_name=pool,
        description="One training stage of noisy-student, on this work pool's machines.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
