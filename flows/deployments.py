"""The pipeline as a service: the deployment `iterate` of the flow `noisy-student`, `watch`
of the flow `noisy-student-watch`, and `resume` of `noisy-student-resume`.

- `iterate` retrains from the current champion: on demand (`prefect deployment run
  noisy-student/iterate`), on an optional cron schedule, and when new unlabelled data
  lands. Never two runs at once (a concurrency limit of one; later runs wait).
- New data announces itself with the event `noisy-student.unlabelled-data.landed`:
  `noisy-student ingest append` emits it, and `watch` emits it for data that landed by
  other means (it compares the unlabelled manifest with the last version announced).
- Labels taken back from annotators (`noisy-student ingest labels`) announce themselves
  with `noisy-student.labels.landed`, and retrain alike.
- The trigger on those events fires on the first arrival and schedules the run one
  window later; arrivals within the window fold into that run, which labels everything
  in the manifest by then.
- A run that crashes is resumed by `noisy-student-resume/resume` (flows/resume.py), which
  an automation runs when a run of the flow ends Crashed or Failed.
- With a training pool, the training stages run as `noisy-student-train/<pool>` on that
  work pool's machines (flows/training.py).

Served by one long-lived process (`noisy-student serve`, which calls `serve` below) or
deployed to process work pools from `prefect.yaml`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from prefect import flow
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.variables import Variable

from flows.events import (
    EVENT,
    LABELS_EVENT,
    RESOURCE_PREFIX,
    announce,
    announced_variable,
    dataset_resource,
    remember,
    use_result_storage,
)
from flows.noisy_student import noisy_student
from flows.notifications import save_webhook
from flows.parameters import ConfigSource, Overrides
from flows.resume import DEFAULT_MAX_RESUMES, resume_crashed, resume_trigger
from flows.training import ensure_gpu_limit, training_deployment
from noisy_student import config as config_mod
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError


@flow(name="noisy-student-watch", log_prints=True)
def watch_data(config: ConfigSource, overrides: Overrides = None) -> dict[str, Any] | None:
    """Announce unlabelled data that landed without `noisy-student ingest append`: compare
    the dataset's unlabelled manifest with the version last announced and emit the
    new-data event when it changed. The first look only records the version.

    Args:
        config: The pipeline config (YAML path or URL) whose data.root is watched.
        overrides: Config values to change, by dotted key.
    """
    cfg = config_mod.resolve(config, overrides)
    root = storage.resolve(cfg.data.root)
    url = storage.join(root, dataset.UNLABELLED)
    if not storage.exists(storage.join(url, dataset.MANIFEST)):
        print(f"{url}: no dataset yet")
        return None
    manifest = dataset.read_manifest(url)
    seen = Variable.get(announced_variable(root), default=None)
    if seen is None:
        remember(root, manifest.state())
        print(f"{url}: version {manifest.version}, {manifest.num_rows} images; first look")
        return None
    if seen.get("digest") == manifest.digest:
        print(f"{url}: unchanged since version {seen.get('version')}")
        return None
    event = announce(root, manifest.state(), seen, source="watch")
    print(f"{url}: version {seen.get('version')} -> {manifest.version}; announced")
    return event.payload


def retrain_trigger(window: timedelta, root: str | None = None) -> DeploymentEventTrigger:
    """Fires on the first new-data or new-labels event and schedules the run `window`
    later; further events within the window are absorbed by it. With `root`, only that
    dataset counts."""
    resource = dataset_resource(root)["prefect.resource.id"] if root else f"{RESOURCE_PREFIX}*"
    return DeploymentEventTrigger(
        name="noisy-student retrain on new data or labels",
        expect={EVENT, LABELS_EVENT},
        match={"prefect.resource.id": resource},
        posture="Reactive",
        threshold=1,
        within=window,
        schedule_after=window,
    )


def iterate_deployment(
    config: str,
    overrides: dict[str, Any],
    teacher: str | None,
    cron: str | None,
    window: timedelta,
    root: str | None,
    training_pool: str | None = None,
) -> RunnerDeployment:
    return noisy_student.to_deployment(
        name="iterate",
        description="Retrain from the champion on all unlabelled data; promote if better.",
        parameters={
            "config": config,
            "overrides": overrides,
            "teacher": teacher,
            "training_pool": training_pool,
        },
        cron=cron,
        concurrency_limit=1,
        triggers=[retrain_trigger(window, root)],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def watch_deployment(config: str, overrides: dict[str, Any], every: float) -> RunnerDeployment:
    return watch_data.to_deployment(
        name="watch",
        description="Announce unlabelled data that landed by other means.",
        parameters={"config": config, "overrides": overrides},
        interval=every,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def resume_deployment(max_resumes: int = DEFAULT_MAX_RESUMES) -> RunnerDeployment:
    return resume_crashed.to_deployment(
        name="resume",
        description="Resume a crashed run of noisy-student; tell someone of a failed one.",
        parameters={"max_resumes": max_resumes},
        triggers=[resume_trigger()],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def check_work_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise UserError(
                f"work pool {pool!r} does not exist: create it first, e.g. "
                f"`prefect work-pool create {pool} --type process`"
            ) from None


def serve(
    config: str,
    overrides: dict[str, Any],
    teacher: str | None = "champion",
    cron: str | None = None,
    window: timedelta = timedelta(minutes=10),
    watch_every: float | None = 300,
    results: str | None = None,
    training_pool: str | None = None,
    gpu_limit: int | None = None,
    max_resumes: int = DEFAULT_MAX_RESUMES,
    notify: str | None = None,
) -> None:
    """Register `iterate`, `resume` (and `watch`) with the Prefect server and run their
    flow runs until stopped; with `training_pool`, register `noisy-student-train/<pool>`
    on that work pool, whose own workers run it."""
    from prefect import serve as prefect_serve

    cfg = config_mod.resolve(config, overrides)  # a bad config fails now, not at 3 am
    source = config if "://" in config else os.path.abspath(config)
    if training_pool:
        check_work_pool(training_pool)
    if results:
        use_result_storage(results)
    if notify:
        save_webhook(notify)
    if training_pool:
        ensure_gpu_limit(gpu_limit)
        training_deployment(training_pool).apply()
    root = storage.resolve(cfg.data.root)
    deployments = [
        iterate_deployment(source, overrides, teacher, cron, window, root, training_pool),
        resume_deployment(max_resumes),
    ]
    if watch_every:
        deployments.append(watch_deployment(source, overrides, watch_every))
    prefect_serve(*deployments)
