"""Crashed runs resume by themselves: the deployment `resume` of the flow
`noisy-student-resume`, which an automation runs whenever a run of `noisy-student` ends
Crashed or Failed.

- **Crashed** (the process or its machine died: killed, out of memory, a spot instance
  reclaimed): a new run of the same deployment with the same parameters, job variables and
  pipeline run id, so that it lands in the same run folder and resumes from the persisted
  results and training state. At most `max_resumes` times per original run; then it gives
  up and says so. The deployment's concurrency limit of one keeps the resumed run waiting
  while another run of it is active.
- **Failed** (an error in our code or in the data: running it again would fail again): not
  retried; a notification says so.

Each resumed run is tagged `noisy-student.resume-of:<the first crashed run>`: that is how
the resumes of one run are counted. A run tags itself `noisy-student.run:<pipeline run id>`
as soon as it knows it (`tag_pipeline_run`); a run that crashed before that is resumed with
its parameters as they were.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events import DeploymentEventTrigger

from flows.notifications import flow_run_url, notify

FLOW = "noisy-student-resume"
DEPLOYMENT = "resume"
PIPELINE_FLOW = "noisy-student"  # the flow whose crashed runs are resumed
RUN_TAG = "noisy-student.run:"
RESUME_OF_TAG = "noisy-student.resume-of:"
ENDED = ("prefect.flow-run.Crashed", "prefect.flow-run.Failed")
DEFAULT_MAX_RESUMES = 3


def tag_pipeline_run(pipeline_run_id: str) -> None:
    """Tag the current flow run with its pipeline run id: what a resumed run is given."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    tag = f"{RUN_TAG}{pipeline_run_id}"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run.id))
        if tag not in run.tags:
            client.update_flow_run(run.id, tags=[*run.tags, tag])


def _tag_value(run: FlowRun, prefix: str) -> str | None:
    return next((t.removeprefix(prefix) for t in run.tags if t.startswith(prefix)), None)


def resume_trigger() -> DeploymentEventTrigger:
    """A run of `noisy-student` ended Crashed or Failed: run `resume` for it."""
    return DeploymentEventTrigger(
        name="noisy-student resume crashed runs",
        expect=set(ENDED),
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": PIPELINE_FLOW},
        parameters={"flow_run_id": "{{ event.resource.id }}"},
    )


def _crashed_in_a_deployment(ended: FlowRun, where: str) -> bool:
    """Whether the run is one to resume; a failed run (not retried: the same inputs would
    fail again) and a crashed one outside a deployment are announced instead."""
    state = ended.state
    if state is not None and state.is_failed():
        notify(
            f"noisy-student: run {ended.name} failed (not retried)",
            f"{state.message or 'no message'}\n{where}",
        )
        return False
    if state is None or not state.is_crashed():
        get_run_logger().info(
            f"{ended.name} is {state.name if state else 'new'} now: nothing to do"
        )
        return False
    if ended.deployment_id is None:
        notify(
            f"noisy-student: run {ended.name} crashed (not a deployment's run: not resumed)",
            where,
        )
        return False
    return True


def _start_again(ended: FlowRun, origin: str, key: str) -> FlowRun:
    """A new run of the crashed run's deployment with its parameters, job variables and
    pipeline run id; started, not waited for."""
    parameters: dict[str, Any] = dict(ended.parameters)
    if pipeline_run := _tag_value(ended, RUN_TAG):
        parameters["run_id"] = pipeline_run
    tags = [t for t in ended.tags if not t.startswith(RESUME_OF_TAG)]
    return run_deployment(
        ended.deployment_id,
        parameters=parameters,
        job_variables=ended.job_variables or None,
        tags=[*tags, f"{RESUME_OF_TAG}{origin}"],
        idempotency_key=key,
        timeout=0,  # started, not waited for
        as_subflow=False,
    )


@flow(name=FLOW, log_prints=True)
def resume_crashed(flow_run_id: str, max_resumes: int = DEFAULT_MAX_RESUMES) -> str | None:
    """Resume a crashed run of the pipeline, or say that it failed or was given up on.
    Returns the id of the resumed run, if one was started.

    Args:
        flow_run_id: The run that ended: its id, or its event resource id
            (prefect.flow-run.<id>), as the automation passes it.
        max_resumes: Resume one original run at most this many times.
    """
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        ended = client.read_flow_run(UUID(flow_run_id.removeprefix("prefect.flow-run.")))
        where, state = flow_run_url(str(ended.id)), ended.state
        if not _crashed_in_a_deployment(ended, where):
            return None
        origin = _tag_value(ended, RESUME_OF_TAG) or str(ended.id)
        earlier = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"{RESUME_OF_TAG}{origin}"])
            ),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[ended.deployment_id])),
        )
        key = f"noisy-student-resume-of-{ended.id}"
        if done := [r for r in earlier if r.idempotency_key == key]:
            logger.info(f"{ended.name} was resumed already, as {done[0].name}")
            return str(done[0].id)
        if len(earlier) >= max_resumes:
            notify(
                f"noisy-student: run {ended.name} crashed again; given up after "
                f"{len(earlier)} resumes",
                f"{state.message or 'no message'}\n{where}",
            )
            return None
        resumed = _start_again(ended, origin, key)
    logger.info(
        f"{ended.name} crashed ({state.message}); resumed as {resumed.name} "
        f"(resume {len(earlier) + 1} of at most {max_resumes})"
    )
    return str(resumed.id)
