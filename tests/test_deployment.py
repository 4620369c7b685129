"""The pipeline as a service, end to end, with real servers started here on 127.0.0.1: a
Prefect server (its own PREFECT_HOME and SQLite) with its basic auth on, an MLflow server
with its basic-auth app (SQLite, artifacts in S3) and moto's S3 server. Deployed from
prefect.yaml and run by a process worker, then served by `noisy-student serve` and
retrained by the trigger when data is appended. Requests without the credentials are
refused.

Everything started here is stopped at the end. The runs use the smoke preset on a tiny
slice, so the time goes to starting processes, not to training.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import FASHION_MNIST, REPO

pytestmark = pytest.mark.integration

BUCKET = "ns-integration"
EXPERIMENT = "ns-integration"
SECRET = f"ns-secret-{uuid.uuid4().hex}"  # must never show up in logs, MLflow or Prefect
# the servers' credentials carry the secret too, so the same search covers them
PREFECT_AUTH = f"ns-admin:{SECRET}"
MLFLOW_USER, MLFLOW_PASSWORD = "ns-admin", f"pw-{SECRET}"
WINDOW = 60  # seconds of the trigger's batching window: it must cover the second ingest command
TINY = {
    "name": EXPERIMENT,
    "artifacts": f"s3://{BUCKET}/artifacts",
    "data.root": f"s3://{BUCKET}/datasets/smoke",
    "data.fashion_mnist.labelled_per_class": 5,
    "data.fashion_mnist.unlabelled_limit": 200,
    "data.fashion_mnist.test_limit": 100,
    "data.fashion_mnist.rows_per_shard": 100,
    "teacher.epochs": 3,
    "teacher.eval_every": 3,
    "selection.min_confidence": 0.05,  # a teacher this weak is rarely sure of anything
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
    "evaluation.corruption_images": 50,
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Processes:
    """Long-running subprocesses with their output in files; all stopped at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as out:  # the child keeps its own copy
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop(self, name: str) -> None:
        proc = self.running.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the process group: flow-run children too
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def wait_until(what: str, check, timeout: float, procs: Processes, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for name, proc in procs.running.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                            f"{procs.log(name)[-3000:]}")  # fmt: skip
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def responds(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Stack:
    def __init__(self, procs: Processes, env: dict[str, str], api: str, mlflow: str, s3):
        self.procs, self.env, self.api, self.mlflow, self.s3 = procs, env, api, mlflow, s3

    def cli(self, *argv: str, timeout: float = 300, check: bool = True):
        done = subprocess.run(
            list(argv), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    auth = {"Authorization": "Basic " + base64.b64encode(PREFECT_AUTH.encode()).decode()}

    def request(
        self, method: str, path: str, body: dict | None = None, ok: tuple[int, ...] = ()
    ) -> httpx.Response:
        """The answer; an error status raises, unless it is one of `ok`."""
        # The server answers 503 while its SQLite database is locked by its own services (a
        # busy machine); Prefect's clients retry that, and so does this one.
        for attempt in range(6):
            r = httpx.request(method, f"{self.api}{path}", json=body, headers=self.auth, timeout=30)
            if r.status_code != 503:
                break
            time.sleep(2**attempt)
        if r.status_code not in ok:
            r.raise_for_status()
        return r

    def post(self, path: str, body: dict | None = None):
        return self.request("POST", path, body or {}).json()

    def get(self, path: str):
        return self.request("GET", path).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{name}")

    def runs_of(self, deployment_id: str) -> list[dict]:
        return self.post(
            "/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC"},
        )

    def wait_for_run(self, run_id: str, timeout: float) -> dict:
        def finished():
            run = self.get(f"/flow_runs/{run_id}")
            return run if run["state_type"] in TERMINAL else None

        return wait_until(f"flow run {run_id}", finished, timeout, self.procs, every=1)

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read_json(self, key: str):
        return json.loads(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


class Webhook:
    """An HTTP receiver on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def subjects(self) -> list[str]:
        return [m["subject"] for m in self.received]


@contextmanager
def running_stack(tmp: Path) -> Iterator[Stack]:
    """A Prefect server, an MLflow server (both with their auth on) and moto's S3, with a
    bucket BUCKET, on 127.0.0.1; their output in `tmp`."""
    import boto3
    from moto.server import ThreadedMotoServer

    procs = Processes(tmp)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        s3_url = f"http://{host}:{port}"
        s3_env = {
            "AWS_ACCESS_KEY_ID": "ns-integration-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in s3_env.items()
                                                         if k != "AWS_DEFAULT_REGION"},
                          region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))
        }
        base |= {
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **s3_env,
        }
        prefect_port, mlflow_port = free_port(), free_port()
        procs.start(
            "prefect-server",
            [bin_("prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(prefect_port)],
            base | {
                "PREFECT_HOME": str(tmp / "prefect-server"),
                "PREFECT_UI_ENABLED": "false",
                # only the runs the tests create: no scheduled watch runs competing for CPU
                "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,
            },
        )  # fmt: skip
        auth_ini = tmp / "mlflow-auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{tmp}/mlflow-auth.db\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        procs.start(
            "mlflow-server",
            [bin_("mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
             "--artifacts-destination", f"s3://{BUCKET}/mlflow",
             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--app-name", "basic-auth"],
            base | {"MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                    "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex},
        )  # fmt: skip
        api = f"http://127.0.0.1:{prefect_port}/api"
        mlflow = f"http://127.0.0.1:{mlflow_port}"
        wait_until("the Prefect server", lambda: responds(f"{api}/health"), 300, procs)
        wait_until("the MLflow server", lambda: responds(f"{mlflow}/health"), 300, procs)
        env = base | {
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(tmp / "prefect-client"),
            "MLFLOW_TRACKING_URI": mlflow,
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
            "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
            "AWS_ENDPOINT_URL_S3": s3_url,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/noisy-student-results",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        }
        # this process's MLflow client reads the server's credentials from the environment
        os.environ.update(
            MLFLOW_TRACKING_USERNAME=MLFLOW_USER, MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD
        )
        yield Stack(procs, env, api, mlflow, s3)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        procs.stop_all()
        moto.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("deployment")) as running:
        yield running


def test_the_servers_refuse_requests_without_their_credentials(stack, tmp_path):
    flow_runs = f"{stack.api}/flow_runs/filter"
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ns-admin:wrong").decode()}
    assert httpx.post(flow_runs, json={}, timeout=30).status_code == 401
    assert httpx.post(flow_runs, json={}, headers=wrong, timeout=30).status_code == 401
    assert httpx.post(flow_runs, json={}, headers=stack.auth, timeout=30).status_code == 200
    search = f"{stack.mlflow}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    assert httpx.post(search, json=body, timeout=30).status_code == 401
    assert httpx.post(search, json=body, auth=(MLFLOW_USER, "wrong"), timeout=30).status_code == 401
    ok = httpx.post(search, json=body, auth=(MLFLOW_USER, MLFLOW_PASSWORD), timeout=30)
    assert ok.status_code == 200

    # the commands say so in one line, before anything changes
    dataset = f"s3://{BUCKET}/datasets/never-written"
    no_auth = {k: v for k, v in stack.env.items() if k != "PREFECT_API_AUTH_STRING"}
    images = batch_of_images(tmp_path / "refused", 0, 2)
    done = subprocess.run(
        [bin_("noisy-student"), "ingest", "append", "--dataset", dataset, "--images", images],
        env=no_auth, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "refused the request (401)" in done.stderr and "PREFECT_API_AUTH_STRING" in done.stderr
    assert not stack.keys("datasets/never-written/")
    wrong_mlflow = stack.env | {"MLFLOW_TRACKING_PASSWORD": "wrong"}
    done = subprocess.run(
        [bin_("noisy-student"), "serve", "-c", "pipeline_config/smoke.yaml"],
        env=wrong_mlflow, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "MLflow server refused the request (401)" in done.stderr


@pytest.fixture(scope="module")
def first_run(stack) -> dict:
    """Deploy `iterate` from prefect.yaml to a process work pool, start a worker, and run
    `prefect deployment run noisy-student/iterate` with the smoke preset until it ends."""
    stack.cli(bin_("prefect"), "work-pool", "create", "noisy-student", "--type", "process")
    stack.cli(bin_("noisy-student"), "results-storage", f"s3://{BUCKET}/prefect-results")
    stack.cli(bin_("prefect"), "--no-prompt", "deploy", "-n", "iterate")
    stack.procs.start(
        "worker", [bin_("prefect"), "worker", "start", "--pool", "noisy-student"], stack.env
    )
    refused = stack.cli(
        bin_("prefect"), "deployment", "run", "noisy-student/iterate",
        "-p", "overrides={\"teacher.epochz\": 1}", check=False,
    )  # fmt: skip
    parameters = {"config": "pipeline_config/smoke.yaml", "overrides": TINY}
    done = stack.cli(
        bin_("prefect"), "deployment", "run", "noisy-student/iterate",
        "--params", json.dumps(parameters), "--watch", "--watch-timeout", "600", check=False,
    )  # fmt: skip
    deployment = stack.deployment("noisy-student/iterate")
    (run,) = stack.runs_of(deployment["id"])
    stack.procs.stop("worker")
    return {"run": run, "deployment": deployment, "output": done, "refused": refused}


def test_deployment_run_refuses_a_bad_parameter_naming_it(first_run):
    refused = first_run["refused"]
    assert refused.returncode != 0
    assert "teacher.epochz" in refused.stdout + refused.stderr


def test_deployment_run_completes_with_artifacts_in_s3_and_the_champion_in_mlflow(stack, first_run):
    from mlflow import MlflowClient

    run = first_run["run"]
    assert run["state_type"] == "COMPLETED", first_run["output"].stdout[-3000:]
    assert first_run["output"].returncode == 0
    assert concurrency_limit(first_run["deployment"]) == 1
    assert first_run["deployment"]["work_pool_name"] == "noisy-student"

    (summary_key,) = [k for k in stack.keys("artifacts/runs/") if k.endswith("/summary.json")]
    summary = stack.read_json(summary_key)
    run_root = summary_key.removesuffix("summary.json")
    for part in ("iteration-1/teacher/model.safetensors", "iteration-1/student/model.safetensors",
                 "iteration-1/pseudo_labels/_manifest.json", "iteration-1/selected/_manifest.json",
                 "iteration-1/robustness/robustness.parquet", "promotion.json"):  # fmt: skip
        assert f"{run_root}{part}" in stack.keys(run_root), part
    assert stack.keys("datasets/smoke/unlabelled/_manifest.json")
    assert stack.keys("mlflow/"), "MLflow's artifacts are in the bucket"
    assert stack.keys("prefect-results/"), "Prefect's results are in the bucket"

    client = MlflowClient(stack.mlflow)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == run["id"]
    student_run = summary["iterations"][0]["student"]["mlflow_run_id"]
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert champion.run_id == student_run
    assert champion.tags["noisy_student.promotion"] == "champion"
    assert summary["promotion"]["decision"] == "champion"
    assert client.list_artifacts(student_run, "model")


def concurrency_limit(deployment: dict) -> int | None:
    return (deployment.get("global_concurrency_limit") or {}).get("limit")


def secrets_in_prefect_and_mlflow(stack: Stack) -> list[str]:
    from mlflow import MlflowClient

    places = []
    for offset in range(0, 10000, 200):
        page = stack.post("/logs/filter", {"limit": 200, "offset": offset})
        places += [f"log {x['id']}" for x in page if SECRET in x["message"]]
        if len(page) < 200:
            break
    places += [f"artifact {a['key']}" for a in stack.post("/artifacts/filter")
               if SECRET in json.dumps(a)]  # fmt: skip
    places += [f"flow run {r['id']}" for r in stack.post("/flow_runs/filter")
               if SECRET in json.dumps(r)]  # fmt: skip
    places += [f"block {b['id']}" for b in stack.post("/block_documents/filter")
               if SECRET in json.dumps(b)]  # fmt: skip
    client = MlflowClient(stack.mlflow)
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            if SECRET in json.dumps([r.data.params, r.data.tags]):
                places.append(f"MLflow run {r.info.run_id}")
    for v in client.search_model_versions(f"name='{EXPERIMENT}'"):
        if SECRET in json.dumps(v.tags):
            places.append(f"model version {v.version}")
    return places


def batch_of_images(folder: Path, first: int, count: int) -> str:
    from PIL import Image

    from noisy_student.data import ingest

    images = ingest.read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")
    folder.mkdir(parents=True)
    for i in range(first, first + count):
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    return str(folder)


def test_appended_data_starts_one_retrain_from_the_champion(
    stack, first_run, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    champion_run = (
        MlflowClient(stack.mlflow).get_model_version_by_alias(EXPERIMENT, "champion").run_id
    )
    rows_before = stack.read_json("datasets/smoke/unlabelled/_manifest.json")["num_rows"]
    # the same deployment, now served by one process instead of a work pool's worker
    stack.delete(f"/deployments/{first_run['deployment']['id']}")
    webhook = Webhook()
    stack.procs.start(
        "serve",
        [bin_("noisy-student"), "serve", "-c", "pipeline_config/smoke.yaml",
         *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items()],
         "--batch-window", str(WINDOW), "--watch-every", "3600", "--notify", webhook.url],
        stack.env,
    )  # fmt: skip

    def served():
        try:
            d = stack.deployment("noisy-student/iterate")
            stack.deployment("noisy-student-watch/watch")
        except httpx.HTTPStatusError:
            return None
        mine = [
            a
            for a in stack.post("/automations/filter")
            if any(x.get("deployment_id") == d["id"] for x in a["actions"])
        ]
        return d if mine else None

    iterate = wait_until("noisy-student serve", served, 300, stack.procs)
    assert concurrency_limit(iterate) == 1
    assert iterate["parameters"]["teacher"] == "champion" and iterate["work_pool_name"] is None
    assert iterate["parameters"]["training_pool"] is None
    # crashed runs resume by themselves: the automation that runs `resume`
    resume = stack.deployment("noisy-student-resume/resume")
    assert resume["parameters"] == {"max_resumes": 3}
    (automation,) = [
        a
        for a in stack.post("/automations/filter")
        if any(x.get("deployment_id") == resume["id"] for x in a["actions"])
    ]
    assert set(automation["trigger"]["expect"]) == {
        "prefect.flow-run.Crashed",
        "prefect.flow-run.Failed",
    }
    # the webhook block keeps its URL as a secret
    (block,) = [
        b for b in stack.post("/block_documents/filter") if b["name"] == "noisy-student-notify"
    ]
    assert webhook.url not in json.dumps(block)

    # two batches at once (two commands starting one after the other take longer than the
    # window on a busy machine): one retrain for both
    from concurrent.futures import ThreadPoolExecutor

    def append(name: str, first: int) -> str:
        return stack.cli(
            bin_("noisy-student"), "ingest", "append", "--dataset", f"s3://{BUCKET}/datasets/smoke",
            "--images", batch_of_images(tmp_path / name, first, 30),
        ).stdout  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(append, ("batch-a", "batch-b"), (0, 30)))
    for out in outs:
        assert "event noisy-student.unlabelled-data.landed emitted" in out

    def triggered():
        return [r for r in stack.runs_of(iterate["id"]) if r["id"] != first_run["run"]["id"]]

    (retrain,) = wait_until("the triggered retrain", triggered, 120, stack.procs)
    retrain = stack.wait_for_run(retrain["id"], 600)
    assert retrain["state_type"] == "COMPLETED", stack.procs.log("serve")[-3000:]
    assert len(triggered()) == 1, "arrivals within the window make one run"

    (parent,) = MlflowClient(stack.mlflow).search_runs(
        [MlflowClient(stack.mlflow).get_experiment_by_name(EXPERIMENT).experiment_id],
        f"tags.`prefect.flow_run_id` = '{retrain['id']}'",
    )
    summary_key = parent.data.tags["noisy_student.summary_url"].removeprefix(f"s3://{BUCKET}/")
    summary = stack.read_json(summary_key)
    iteration = summary["iterations"][0]
    assert iteration["teacher"]["mlflow_run_id"] == champion_run, "the champion taught"
    assert iteration["pseudo_labels"]["total"] == rows_before + 60, "old and new data labelled"
    promotion = summary["promotion"]
    assert promotion["decision"] in ("champion", "challenger")
    assert promotion["champion"]["run_id"] == champion_run
    version = MlflowClient(stack.mlflow).get_model_version(EXPERIMENT, promotion["version"])
    assert version.tags["noisy_student.promotion"] == promotion["decision"]
    model = f"models:/{EXPERIMENT}/{promotion['version']}"
    (told,) = [m for m in webhook.received if model in m["subject"]]
    assert told["subject"] == f"noisy-student: {model} is the {promotion['decision']}"
    assert retrain["id"] in told["body"]
    webhook.server.shutdown()

    # data landing by other means: the watch deployment notices and announces it
    import s3fs

    from noisy_student.data import ingest

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        monkeypatch.setenv(k, stack.env[k])
    s3fs.S3FileSystem.clear_instance_cache()
    ingest.append_unlabelled(
        f"s3://{BUCKET}/datasets/smoke", batch_of_images(tmp_path / "batch-c", 60, 10)
    )
    done = stack.cli(
        bin_("prefect"), "deployment", "run", "noisy-student-watch/watch", "--watch",
        "--watch-timeout", "300",
    )  # fmt: skip
    assert "Completed" in done.stdout
    wait_until("a retrain triggered by the watch", lambda: len(triggered()) == 2, 120, stack.procs)

    assert secrets_in_prefect_and_mlflow(stack) == []
    for name in ("serve", "prefect-server", "mlflow-server"):
        assert SECRET not in stack.procs.log(name), name
    assert SECRET not in stack.procs.log("worker")
    s3fs.S3FileSystem.clear_instance_cache()
