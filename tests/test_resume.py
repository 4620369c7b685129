"""kill -9 of a running pipeline, then the same command again: it finishes, reusing the
finished stages and shards, and training continues from its saved state."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from noisy_student.data import storage
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _config(tmp) -> str:
    """The smoke preset, smaller: one student, three shards, every pseudo label kept."""
    cfg = yaml.safe_load((REPO / "pipeline_config" / "smoke.yaml").read_text())
    cfg["artifacts"] = str(tmp / "artifacts")
    cfg["data"]["root"] = str(tmp / "data")
    cfg["data"]["fashion_mnist"].update(
        labelled_per_class=5, unlabelled_limit=300, test_limit=100, rows_per_shard=100
    )
    cfg["teacher"].update(epochs=3, eval_every=3)
    cfg["selection"] = {"min_confidence": 0.0, "balance": False}
    # 300 pseudo-labelled images, 24 per step: 13 steps per epoch, 26 in all
    cfg["students"] = [dict(cfg["students"][0], epochs=2, batch_size=8, checkpoint_every_steps=5)]
    cfg["evaluation"] = {"corruptions": ["contrast"], "severities": [1], "corruption_images": 50}
    path = tmp / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run(config: str, tmp, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", "run", "-c", config],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _finished(output: str, task: str, state: str) -> int:
    """How many runs of a task Prefect reports finishing in a state (Cached, Completed)."""
    return len(re.findall(rf"Task run '{task}-[^']*' - Finished in state {state}\(", output))


def test_killed_during_inference_and_training_the_run_resumes_and_redoes_only_the_rest(
    tmp_path, prefect_harness
):
    from prefect.settings import PREFECT_API_URL

    config = _config(tmp_path)
    env = {
        **os.environ,
        # the test session's Prefect server: no temporary server to start per run
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        # one task at a time, so that "killed as shard 1 starts" means shard 0 is done
        "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS": "1",
        "OMP_NUM_THREADS": "1",
    }

    killed = _run(config, tmp_path, {**env, "NOISY_STUDENT_KILL_AT": "pseudo-labels:shard=1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = killed.stdout + killed.stderr
    assert _finished(first, "train_teacher", "Completed") == 1
    assert _finished(first, "infer_pseudo_labels", "Completed") == 1

    # again, killed mid-way through the student's second epoch (after step 18; the
    # state was saved after step 15)
    killed = _run(config, tmp_path, {**env, "NOISY_STUDENT_KILL_AT": "student-1:step=18"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    second = killed.stdout + killed.stderr
    assert _finished(second, "train_teacher", "Cached") == 1
    assert _finished(second, "train_teacher", "Completed") == 0
    assert _finished(second, "infer_pseudo_labels", "Cached") == 1  # shard 0
    assert _finished(second, "infer_pseudo_labels", "Completed") == 2  # shards 1 and 2
    assert _finished(second, "filter_and_balance", "Completed") == 1

    done = _run(config, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    third = done.stdout + done.stderr
    for task, n in [("train_teacher", 1), ("infer_pseudo_labels", 3), ("filter_and_balance", 1)]:
        assert _finished(third, task, "Cached") == n, task
    assert _finished(third, "train_teacher", "Completed") == 0
    assert _finished(third, "filter_and_balance", "Completed") == 0
    # the teacher's three shards come from the cache; the three that run are the final
    # student's scores of the unlabelled pool for the label queue, which runs after it
    assert _finished(third, "infer_pseudo_labels", "Completed") == 3
    assert _finished(third, "label_queue", "Completed") == 1
    assert "student 1: resumed from its saved state at step 15 of 26" in third
    assert _finished(third, "train_student", "Completed") == 1
    assert _finished(third, "evaluate_robustness", "Completed") == 1

    # one run folder and one MLflow parent run across the three attempts
    runs = os.listdir(tmp_path / "artifacts" / "runs")
    assert len(runs) == 1
    summary = storage.read_json(str(tmp_path / "artifacts" / "runs" / runs[0] / "summary.json"))
    assert summary["run_id"] == runs[0]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("noisy-student-smoke")
    every = client.search_runs([experiment.experiment_id])
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [summary["mlflow"]["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    # each stage once: the interrupted student run was continued, not duplicated
    stages = sorted(r.data.tags["noisy_student.stage"] for r in every if r not in parents)
    assert stages == sorted(
        [
            "train_teacher",
            "infer_pseudo_labels",
            "filter_and_balance",
            "train_student",
            "evaluate_robustness",
            "label_queue",
        ]
    )
    student = next(r for r in every if r.data.tags.get("noisy_student.stage") == "train_student")
    assert student.info.status == "FINISHED"
    assert student.data.metrics["resumed_from_step"] == 15


def _processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_killed_run_leaves_no_temporary_prefect_server_behind(tmp_path):
    """Without PREFECT_API_URL the run starts a temporary Prefect server; a kill -9 of the
    run gives it no chance to stop it, so a watchdog does."""
    import time

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "OMP_NUM_THREADS": "1",
        "NOISY_STUDENT_KILL_AT": "pseudo-labels:shard=0",
    }
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # not a pipe: a server left behind would keep it open
        killed = subprocess.run(
            [sys.executable, "-m", "cli", "run", "-c", _config(tmp_path)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (home / "prefect.db").exists()  # the temporary server ran, with its data here
    marker = f"PREFECT_HOME={home}"
    deadline = time.monotonic() + 30
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"still running after the kill: {left}"
