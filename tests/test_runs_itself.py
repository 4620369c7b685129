"""Operations that run themselves, on real servers on 127.0.0.1 (the stack of
test_deployment: Prefect and MLflow with their auth on, moto's S3) and real process
workers, everything deployed from prefect.yaml:

- a run whose flow process is killed with SIGKILL during `train_student` ends Crashed, the
  automation runs `noisy-student-resume/resume`, which starts the run again with the same
  parameters and pipeline run id; it resumes and ends with the same student as a run never
  interrupted;
- with `training_pool`, the training stages are flow runs on a second process pool, under
  the global concurrency limit `gpu`, and the result is the same as in one process;
- a run that fails is not retried, and the webhook hears of it; so it does of promotion
  decisions, and of a crashed run given up on.

The runs are the smoke preset on a tiny slice with `test_resnet`; the time goes to
starting processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.test_deployment import BUCKET, TINY, Stack, Webhook, bin_, running_stack, wait_until

pytestmark = pytest.mark.integration

RESUME_OF = "noisy-student.resume-of:"
KILL_STEP = 3  # the student's state is saved every 3 steps: killed right after a save
RUN = {
    **TINY,
    "students": [
        {
            "model": "test_resnet",
            "epochs": 2,
            "batch_size": 8,
            "unlabelled_ratio": 1,
            "ema_decay": 0.9,
            "checkpoint_every_steps": KILL_STEP,
        }
    ],  # fmt: skip
}


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[tuple[Stack, Webhook]]:
    """prefect.yaml's iterate, resume and training (`gpu`) deployments, a worker for each
    of the pools noisy-student and gpu, the results block and the webhook block."""
    webhook = Webhook()
    with running_stack(tmp_path_factory.mktemp("runs-itself")) as stack:
        pools = ("noisy-student", "gpu")
        for pool in pools:  # each worker creates its pool, a process pool
            stack.procs.start(
                f"worker-{pool}",
                [bin_("prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                stack.env,
            )
        stack.cli(bin_("noisy-student"), "results-storage", f"s3://{BUCKET}/prefect-results")
        stack.cli(bin_("noisy-student"), "notifications", webhook.url)

        def pools_exist() -> bool:
            return all(stack.request("GET", f"/work_pools/{p}", ok=(404,)).is_success
                       for p in pools)  # fmt: skip

        wait_until("the work pools", pools_exist, 300, stack.procs)
        stack.cli(bin_("prefect"), "--no-prompt", "deploy", "-n", "iterate", "-n", "resume",
                  "-n", "gpu")  # fmt: skip
        yield stack, webhook
    webhook.server.shutdown()


def start_run(stack: Stack, name: str, job_variables: dict | None = None, **parameters) -> str:
    """A run of noisy-student/iterate with its artifacts under s3://BUCKET/<name>."""
    deployment = stack.deployment("noisy-student/iterate")
    overrides = {**RUN, "artifacts": f"s3://{BUCKET}/{name}", **parameters.pop("overrides", {})}
    body = {
        "parameters": {"config": "pipeline_config/smoke.yaml", "overrides": overrides,
                       "teacher": None, **parameters},
        "job_variables": job_variables or {},
    }  # fmt: skip
    return stack.post(f"/deployments/{deployment['id']}/create_flow_run", body)["id"]


def student_weights(stack: Stack, name: str) -> dict:
    from safetensors.torch import load

    (key,) = [k for k in stack.keys(f"{name}/runs/") if k.endswith("1/student/model.safetensors")]
    return load(stack.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def runs_of(stack: Stack, deployment: str, **flow_run_filter) -> list[dict]:
    d = stack.deployment(deployment)
    return stack.post(
        "/flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [d["id"]]}, **flow_run_filter},
         "sort": "START_TIME_ASC"},
    )  # fmt: skip


def resumes_of(stack: Stack, run_id: str) -> list[dict]:
    return runs_of(stack, "noisy-student/iterate", tags={"all_": [f"{RESUME_OF}{run_id}"]})


def resume_runs_for(stack: Stack, run_id: str) -> list[dict]:
    return [
        r
        for r in runs_of(stack, "noisy-student-resume/resume")
        if r["parameters"]["flow_run_id"].endswith(run_id)
    ]


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


@pytest.fixture(scope="module")
def baseline(service) -> dict:
    """One run in one process, never interrupted: what the others must end with."""
    stack, _ = service
    run = stack.wait_for_run(start_run(stack, "baseline"), 1200)
    assert run["state_type"] == "COMPLETED", stack.procs.log("worker-noisy-student")[-3000:]
    return student_weights(stack, "baseline")


def test_a_run_killed_during_train_student_resumes_by_itself_to_the_same_student(service, baseline):
    stack, _ = service
    crashed_id = start_run(
        stack, "crashed", {"env": {"NOISY_STUDENT_KILL_AT": f"student-1:step={KILL_STEP}"}}
    )
    crashed = stack.wait_for_run(crashed_id, 1200)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    (pipeline_tag,) = [t for t in crashed["tags"] if t.startswith("noisy-student.run:")]

    (resumed,) = wait_until("the resumed run", lambda: resumes_of(stack, crashed_id), 300,
                            stack.procs)  # fmt: skip
    resumed = stack.wait_for_run(resumed["id"], 1200)
    assert resumed["state_type"] == "COMPLETED", stack.procs.log("worker-noisy-student")[-3000:]
    # the same run again: the same parameters and pipeline run id, so the same run folder
    pipeline_run = pipeline_tag.removeprefix("noisy-student.run:")
    assert resumed["parameters"] == {**crashed["parameters"], "run_id": pipeline_run}
    assert pipeline_tag in resumed["tags"]
    assert resumed["job_variables"] == crashed["job_variables"]
    (summary,) = [k for k in stack.keys("crashed/runs/") if k.endswith("summary.json")]
    assert summary == f"crashed/runs/{pipeline_run}/summary.json"
    logs = stack.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [resumed["id"]]}}})
    assert any(f"resumed from its saved state at step {KILL_STEP} of" in x["message"]
               for x in logs)  # fmt: skip
    assert same_weights(student_weights(stack, "crashed"), baseline)
    (resume,) = resume_runs_for(stack, crashed_id)
    assert resume["state_type"] == "COMPLETED"
    waited = seconds(resumed["start_time"]) - seconds(crashed["end_time"])
    print(f"\ncrash -> resumed run started: {waited:.1f} s "
          f"(the resume flow's run itself: {resume['total_run_time']:.1f} s)")  # fmt: skip


def test_training_runs_on_its_own_pool_and_gives_the_same_student(service, baseline):
    stack, _ = service
    run = stack.wait_for_run(start_run(stack, "on-pool", training_pool="gpu"), 1800)
    assert run["state_type"] == "COMPLETED", stack.procs.log("worker-gpu")[-3000:]
    trainings = runs_of(stack, "noisy-student-train/gpu")
    assert sorted(r["parameters"]["stage"] for r in trainings) == ["student", "teacher"]
    for training in trainings:
        assert training["state_type"] == "COMPLETED"
        assert training["work_pool_name"] == "gpu"
        assert training["parent_task_run_id"] is not None  # shown under the stage's task
    assert same_weights(student_weights(stack, "on-pool"), baseline)
    gpu = stack.get("/v2/concurrency_limits/gpu")
    assert (gpu["limit"], gpu["active_slots"]) == (1, 0)


def test_failed_runs_are_not_retried_crashed_ones_are_given_up_on_and_the_webhook_hears(
    service, baseline
):
    """A run that failed, and the third resume of a run that crashed again: the automation
    runs `resume` for each, which starts nothing and tells the webhook. The runs are
    scheduled far ahead (no worker takes them) and put in those states through the API,
    which emits the same events as a worker does."""
    stack, webhook = service
    deployment = stack.deployment("noisy-student/iterate")

    def new_run(tags: list[str]) -> str:
        later = {"type": "SCHEDULED", "state_details": {"scheduled_time": "2100-01-01T00:00:00Z"}}
        body = {"state": later, "tags": tags, "parameters": {}}
        return stack.post(f"/deployments/{deployment['id']}/create_flow_run", body)["id"]

    failed = new_run([])
    chain = [new_run([f"{RESUME_OF}an-original-run"]) for _ in range(3)]  # 3 resumes so far
    for run_id, state in ((failed, "FAILED"), (chain[-1], "CRASHED")):
        message = f"{state.title()} on purpose: UserError: bad data in row 7"
        stack.post(f"/flow_runs/{run_id}/set_state",
                   {"state": {"type": state, "message": message}, "force": True})  # fmt: skip
    for run_id in (failed, chain[-1]):
        resumes = functools.partial(resume_runs_for, stack, run_id)
        (resume,) = wait_until("the resume flow's run", resumes, 300, stack.procs)
        assert stack.wait_for_run(resume["id"], 300)["state_type"] == "COMPLETED"
    assert resumes_of(stack, failed) == []
    assert len(resumes_of(stack, "an-original-run")) == 3  # none added

    def told(run_id: str) -> dict:
        name = stack.get(f"/flow_runs/{run_id}")["name"]
        (message,) = [m for m in webhook.received if f" {name} " in m["subject"]]
        assert run_id in message["body"] and "bad data in row 7" in message["body"]
        assert message["text"] == f"{message['subject']}\n{message['body']}"
        return message["subject"].removeprefix(f"noisy-student: run {name} ")

    assert told(failed) == "failed (not retried)"
    assert told(chain[-1]) == "crashed again; given up after 3 resumes"
    # and the baseline's promotion, the first champion of the registry
    assert f"noisy-student: models:/{RUN['name']}/1 is the champion" in webhook.subjects()
    for run_id in (failed, *chain):
        stack.delete(f"/flow_runs/{run_id}")
