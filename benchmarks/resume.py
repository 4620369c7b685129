"""How much work does a killed and resumed run redo? Measured against an uninterrupted run.

Runs the real command three ways on one dataset, each in a fresh artifacts folder:
1. uninterrupted: `noisy-student run -c CONFIG`;
2. killed: the same command with NOISY_STUDENT_KILL_AT set, once per `--kill-at` point
   (the process kills itself with SIGKILL there, as `kill -9` would; see
   noisy_student/data/faults.py), each attempt resuming what the previous one left;
3. resumed: the same command once more, which must finish.

Then prints, and writes as JSON with `--out`: wall times; per task, how many runs
finished, were reused from cache, or were lost to a kill; training steps per model and
how many were redone after resuming; and whether the resumed run's figures and weights
are identical to the uninterrupted run's (they should be, on CPU with the same seed).

    uv run python -m benchmarks.resume -c pipeline_config/smoke.yaml \\
        --kill-at pseudo-labels:shard=1 --kill-at student-1:step=40
    uv run python -m benchmarks.resume -c pipeline_config/fashion_mnist.yaml \\
        --kill-at student-1:epoch=2 --out benchmarks/results/resume-demo.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from noisy_student import config as config_mod
from noisy_student import stages
from noisy_student.data import storage
from noisy_student.training import models

FINISHED = re.compile(r"Task run '(?P<task>[a-z_]+)-[^']*' - Finished in state (?P<state>\w+)\(")
RESUMED = re.compile(
    r"(?P<model>teacher|student \d+): resumed from its saved state at step (?P<step>\d+)"
)
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \|", re.M)
SUMMARY = re.compile(r"^summary: (\S+)$", re.M)
KILL_STEP = re.compile(r"(?P<model>teacher|student-\d+):(?P<unit>step|epoch)=(?P<n>\d+)")


def run(cfg_path: str, overrides: list[str], folder: Path, env: dict[str, str]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cli", "run", "-c", cfg_path]
    for o in [*overrides, f"artifacts={folder / 'artifacts'}"]:
        command += ["--set", o]
    kill = env.get("NOISY_STUDENT_KILL_AT")
    log = folder / f"log-{kill or 'finish'}.txt".replace(":", "_").replace("=", "-")
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            command,
            env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"},
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    output = log.read_text()
    stamps = [int(h) * 3600 + int(m) * 60 + float(sec) for h, m, sec in STAMP.findall(output)]
    return {
        "kill_at": kill,
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        # from the flow's first log line to its last: without the process's start-up
        "flow_seconds": round((stamps[-1] - stamps[0]) % 86400, 1) if stamps else None,
        "tasks": dict(Counter(f"{m['task']}:{m['state']}" for m in FINISHED.finditer(output))),
        "resumed_from": {m["model"]: int(m["step"]) for m in RESUMED.finditer(output)},
        "summary": SUMMARY.findall(output)[-1] if done.returncode == 0 else None,
        "tail": output[-1500:] if done.returncode not in (0, -9) else "",
    }


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """One Prefect server on 127.0.0.1 for every run: none of them pays for starting its
    own temporary one, and none leaves one behind when it is killed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=open(home / "server.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"prefect server failed; see {home / 'server.log'}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def training_steps(folder: Path) -> dict[str, int]:
    """Steps of every training run, from its MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    out = {}
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            tags = r.data.tags
            if tags.get("noisy_student.stage") in ("train_teacher", "train_student"):
                role = "teacher" if tags["noisy_student.stage"] == "train_teacher" else "student"
                name = role if role == "teacher" else f"student {tags['noisy_student.iteration']}"
                out[name] = int(r.data.metrics.get("steps", 0))
    return out


def weights_digest(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(url, models.WEIGHTS))).hexdigest()


def figures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for it in summary["iterations"]:
        out.append(
            {
                "iteration": it["iteration"],
                "teacher_accuracy": it["teacher"]["test_accuracy"],
                "student_accuracy": it["student"]["test_accuracy"],
                "student_corruption_accuracy": it["student"]["corruption_accuracy"],
                "pseudo_labels": {
                    k: it["pseudo_labels"][k] for k in ("total", "kept", "selected", "accuracy")
                },
                "teacher_weights": weights_digest(it["teacher"]["url"]),
                "student_weights": weights_digest(it["student"]["url"]),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--kill-at", action="append", required=True, help="a kill point; repeat for more kills"
    )
    parser.add_argument("--workdir", default=f"./artifacts/resume-bench-{int(time.time())}")
    parser.add_argument(
        "--shard-workers",
        type=int,
        help="inference shards run at once (PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS); "
        "default: Prefect's (all at once)",
    )
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    cfg = config_mod.load(args.config, args.set)
    # the dataset is ingested once, outside the measurement, and shared by both runs, which
    # run in folders of their own: paths made absolute
    data_root = stages.prepare_data(cfg.data.root, cfg.data.fashion_mnist)
    args.config = str(Path(args.config).resolve())
    args.set = [*args.set, f"data.root={data_root}"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if args.shard_workers:
        env["PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS"] = str(args.shard_workers)
    env.pop("NOISY_STUDENT_KILL_AT", None)

    with prefect_server(work / "prefect-home") as api_url:
        env["PREFECT_API_URL"] = api_url
        print(f"uninterrupted run in {work / 'uninterrupted'} ...", flush=True)
        whole = run(args.config, args.set, work / "uninterrupted", env)
        if whole["returncode"] != 0:
            sys.exit(f"the uninterrupted run failed:\n{whole['tail']}")
        attempts = []
        for point in args.kill_at:
            print(f"run killed at {point} ...", flush=True)
            killed_env = {**env, "NOISY_STUDENT_KILL_AT": point}
            attempts.append(run(args.config, args.set, work / "resumed", killed_env))
            if attempts[-1]["returncode"] != -9:
                print(f"  not killed (exit {attempts[-1]['returncode']}): point not reached")
        print("resumed run ...", flush=True)
        final = run(args.config, args.set, work / "resumed", env)
        if final["returncode"] != 0:
            sys.exit(f"the resumed run failed:\n{final['tail']}")

    steps = training_steps(work / "uninterrupted")
    redone: dict[str, int] = {}
    for attempt, point in zip(attempts, args.kill_at, strict=True):
        m = KILL_STEP.fullmatch(point)
        if m is None or attempt["returncode"] != -9:
            continue
        model = m["model"].replace("-", " ")
        later = next((a for a in [*attempts, final] if model in a["resumed_from"]), None)
        resumed_from = later["resumed_from"][model] if later else 0
        done_before_kill = int(m["n"]) if m["unit"] == "step" else resumed_from
        redone[model] = redone.get(model, 0) + done_before_kill - resumed_from

    a, b = (
        figures(storage.read_json(whole["summary"])),
        figures(storage.read_json(final["summary"])),
    )
    report = {
        "config": args.config,
        "overrides": args.set,
        "kill_at": args.kill_at,
        "uninterrupted": whole,
        "killed_attempts": attempts,
        "resumed": final,
        "seconds": {
            "uninterrupted": whole["seconds"],
            "killed_and_resumed": round(sum(x["seconds"] for x in [*attempts, final]), 1),
            "uninterrupted_flow": whole["flow_seconds"],
            "killed_and_resumed_flow": round(
                sum(x["flow_seconds"] or 0 for x in [*attempts, final]), 1
            ),
        },
        "training_steps": steps,
        "training_steps_redone": redone,
        "identical_figures_and_weights": a == b,
        "figures": {"uninterrupted": a, "resumed": b},
    }
    print()
    print(f"uninterrupted: {whole['seconds']} s ({whole['flow_seconds']} s in the flow)")
    for x in attempts:
        print(
            f"killed at {x['kill_at']}: {x['seconds']} s ({x['flow_seconds']} s in the flow), "
            f"exit {x['returncode']}"
        )
        print(f"  tasks: {x['tasks']}")
    print(f"resumed to the end: {final['seconds']} s ({final['flow_seconds']} s in the flow)")
    print(f"  tasks: {final['tasks']}")
    t = report["seconds"]
    print(
        f"wall time killed + resumed / uninterrupted: "
        f"{t['killed_and_resumed'] / t['uninterrupted']:.2f} for the processes, "
        f"{t['killed_and_resumed_flow'] / t['uninterrupted_flow']:.2f} for the flows"
    )
    print(f"training steps per model: {steps}; redone after resuming: {redone or 'none'}")
    print(f"resumed run's figures and weights identical to the uninterrupted run's: {a == b}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
