"""A bounded soak of the served pipeline: several writers append batches of unlabelled
images at once, from separate `noisy-student ingest append` processes, while the retrains
their events trigger run one at a time (the deployment's concurrency limit of one) on a
real Prefect server, with the data in moto's S3.

At the end: every appended image is in exactly one manifest version, every retrain
completed and the last one labelled everything (arrivals within a batching window fold
into one run), each retrain started from the champion the previous one left and the
registry's champion alias is where that chain ends, and gc finds nothing orphaned.

The load (appends, images, retrains, minutes) is printed; run with `-s` to see it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from noisy_student.data import dataset, gc, ingest, storage
from tests.conftest import REPO
from tests.test_deployment import (
    TERMINAL,
    Processes,
    batch_of_images,
    bin_,
    free_port,
    responds,
    wait_until,
)

pytestmark = pytest.mark.integration

WRITERS, BATCHES, IMAGES = 3, 2, 6  # 6 appends of 6 images, three at a time
GAP = 40  # seconds between a writer's batches: longer than the window, so several retrains
WINDOW = 30  # the trigger's batching window, seconds
NAME = "ns-soak"
ROOT = "s3://ns-test/soak/datasets/smoke"
SOAK = {
    "name": NAME,
    "artifacts": "s3://ns-test/soak/artifacts",
    "data.root": ROOT,
    "data.fashion_mnist.labelled_per_class": 3,
    "data.fashion_mnist.unlabelled_limit": 60,
    "data.fashion_mnist.test_limit": 50,
    "data.fashion_mnist.rows_per_shard": 30,
    "data.fashion_mnist.validation_per_class": 0,  # as ingested below: choices on test
    "teacher.epochs": 1,
    "teacher.eval_every": 1,
    "selection.min_confidence": 0.0,  # keep everything: this is about plumbing, not accuracy
    "students": [
        {
            "model": "test_resnet",
            "epochs": 1,
            "batch_size": 16,
            "unlabelled_ratio": 1,
            "ema_decay": 0.9,
        }
    ],  # fmt: skip
    "evaluation.corruptions": ["contrast"],
    "evaluation.severities": [1],
    "evaluation.corruption_images": 20,
    "evaluation.fgsm_epsilons": [],
}


def test_concurrent_appends_and_triggered_retrains_hold_together(
    s3_endpoint, tmp_path, fashion_mnist_source
):
    from mlflow import MlflowClient

    started = time.monotonic()
    procs = Processes(tmp_path)
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    # the experiment, made here, keeps its artifacts in the temporary folder (not ./mlruns)
    MlflowClient(mlflow_uri).create_experiment(NAME, artifact_location=str(tmp_path / "mlruns"))
    ingest.fashion_mnist(ROOT, fashion_mnist_source, 3, 60, 50, rows_per_shard=30)
    first = dataset.read_manifest(storage.join(ROOT, dataset.UNLABELLED))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    try:
        procs.start(
            "prefect-server",
            [bin_("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env | {"PREFECT_UI_ENABLED": "false",
                   "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
        )  # fmt: skip
        wait_until("the Prefect server", lambda: responds(f"{api}/health"), 180, procs)
        env |= {
            "PREFECT_API_URL": api,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        }
        procs.start(
            "serve",
            [bin_("noisy-student"), "serve", "-c", "pipeline_config/smoke.yaml",
             *[f"--set={k}={json.dumps(v)}" for k, v in SOAK.items()],
             "--batch-window", str(WINDOW), "--watch-every", "0"],
            env,
        )  # fmt: skip

        def post(path: str, body: dict | None = None):
            r = httpx.post(f"{api}{path}", json=body or {}, timeout=30)
            r.raise_for_status()
            return r.json()

        def deployment():
            r = httpx.get(f"{api}/deployments/name/noisy-student/iterate", timeout=30)
            if r.status_code != 200 or not post("/automations/filter"):
                return None
            return r.json()

        iterate = wait_until("noisy-student serve", deployment, 300, procs)

        def runs() -> list[dict]:
            return post(
                "/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [iterate["id"]]}},
                 "sort": "EXPECTED_START_TIME_ASC"},
            )  # fmt: skip

        # the writers: each appends its batches one after another, all three at once
        appended: dict[str, list[str]] = {}
        failures: list[str] = []
        lock = threading.Lock()
        source = iter(range(WRITERS * BATCHES))

        def writer(w: int) -> None:
            for b in range(BATCHES):
                with lock:
                    n = next(source)
                prefix = f"writer-{w}-batch-{b}"
                folder = batch_of_images(tmp_path / prefix, n * IMAGES, IMAGES)
                done = _run(
                    [bin_("noisy-student"), "ingest", "append", "--dataset", ROOT,
                     "--images", folder, "--rows-per-shard", "4"], env,
                )  # fmt: skip
                with lock:
                    if done.returncode != 0 or "emitted" not in done.stdout:
                        failures.append(f"{prefix}: {done.stdout}{done.stderr}"[-2000:])
                    appended[prefix] = [
                        f"{prefix}/{p.name}" for p in sorted(Path(folder).iterdir())
                    ]
                if b + 1 < BATCHES:
                    time.sleep(GAP)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        last_append = time.monotonic()

        final = dataset.read_manifest(storage.join(ROOT, dataset.UNLABELLED))

        def settled():
            if time.monotonic() - last_append < WINDOW + 5:
                return None  # a trigger may still be about to fire
            found = runs()
            if any(r["state_type"] in TERMINAL - {"COMPLETED"} for r in found):
                return found  # a failed retrain fails the test now, not at the timeout
            if not found or any(r["state_type"] not in TERMINAL for r in found):
                return None
            summaries = _summaries()
            labelled = summaries[-1]["iterations"][0]["pseudo_labels"]["total"] if summaries else 0
            return found if labelled == final.num_rows else None

        retrains = wait_until("the retrains to settle", settled, 600, procs, every=3)
    finally:
        procs.stop_all()
    minutes = (time.monotonic() - started) / 60

    # every appended image is in exactly one manifest version, and once in the data
    ids = [i for shard in range(len(final.shards)) for i in _shard_ids(final, shard)]
    assert Counter(ids).most_common(1)[0][1] == 1
    every_appended = [i for batch in appended.values() for i in batch]
    assert set(ids) == set(_shard_ids_all(first)) | set(every_appended)
    assert final.version == 1 + WRITERS * BATCHES
    versions = [
        storage.read_json(storage.join(final.url, dataset.HISTORY, f"{v:05d}.json"))
        for v in range(1, final.version + 1)
    ]
    for older, newer in zip(versions, versions[1:], strict=False):
        assert newer["shards"][: len(older["shards"])] == older["shards"], "append-only"
    first_seen = {}
    for v, manifest in enumerate(versions[1:], start=2):
        new = manifest["shards"][len(versions[v - 2]["shards"]) :]
        for entry in new:
            for i in (
                storage.read_parquet(storage.join(final.url, entry["file"]), ["id"])
                .column("id")
                .to_pylist()
            ):
                assert i not in first_seen
                first_seen[i] = v
    for batch in appended.values():
        assert len({first_seen[i] for i in batch}) == 1, "a batch lands in one version"

    # every retrain completed; a run that found no data newer than the last one's is the
    # same pipeline run (same data, same run id), folded into it; the last labelled everything
    assert [r["state_type"] for r in retrains] == ["COMPLETED"] * len(retrains), procs.log("serve")[
        -3000:
    ]
    summaries = _summaries()
    assert 1 <= len(summaries) <= len(retrains) <= WRITERS * BATCHES
    totals = [s["iterations"][0]["pseudo_labels"]["total"] for s in summaries]
    assert len(set(totals)) == len(totals) and totals[-1] == final.num_rows

    # the champion chain: each retrain was taught by the champion the previous one left,
    # and compared with it; the alias ends where the chain does
    client = MlflowClient(mlflow_uri)
    champion = None
    for s in summaries:
        iteration, promotion = s["iterations"][0], s["promotion"]
        if champion is not None:
            assert iteration["teacher"]["mlflow_run_id"] == champion
        assert (promotion["champion"] or {}).get("run_id") == champion
        stand_in = promotion.get("best_of_run") or {}
        if promotion["decision"] == "champion":
            champion = iteration["student"]["mlflow_run_id"]
        elif stand_in.get("decision") == "champion":  # the run's better model, in its place
            champion = stand_in["run_id"]
    assert champion is not None
    assert client.get_model_version_by_alias(NAME, "champion").run_id == champion
    # a version per retrain's student, plus any better model of a run the gate took instead
    registered = {v.run_id for v in client.search_model_versions(f"name='{NAME}'")}
    students = {s["iterations"][0]["student"]["mlflow_run_id"] for s in summaries}
    stand_ins = {
        s["promotion"]["best_of_run"]["run_id"]
        for s in summaries
        if (s["promotion"].get("best_of_run") or {}).get("decision") == "champion"
    }
    assert registered == students | stand_ins

    # nothing orphaned in the data or the runs
    for url in (ROOT, SOAK["artifacts"]):
        assert gc.find_orphans(url, 0) == [], url
    print(
        f"\nsoak: {len(appended)} appends of {IMAGES} images by {WRITERS} writers at once "
        f"({len(every_appended)} images, {final.version} manifest versions), "
        f"{len(retrains)} triggered retrains ({len(summaries)} on new data), all completed, "
        f"labelled {totals}, {minutes:.1f} min"
    )


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _shard_ids(manifest: dataset.Manifest, index: int) -> list[str]:
    url = manifest.shard_urls()[index]
    return storage.read_parquet(url, ["id"]).column("id").to_pylist()


def _shard_ids_all(manifest: dataset.Manifest) -> list[str]:
    return [i for s in range(len(manifest.shards)) for i in _shard_ids(manifest, s)]


def _summaries() -> list[dict]:
    """The summaries of the pipeline runs so far, in the order they ran: each labelled more
    data than the one before."""
    runs = storage.join(SOAK["artifacts"], "runs")
    if not storage.exists(runs):
        return []
    found = [
        storage.read_json(f.url)
        for f in storage.find_files(runs)
        if f.url.endswith("/summary.json")
    ]
    return sorted(found, key=lambda s: s["iterations"][0]["pseudo_labels"]["total"])
