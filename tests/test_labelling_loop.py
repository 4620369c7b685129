"""The human in the loop, end to end, against the real tools: a run writes its label queue;
the queue goes into a real Label Studio through its API, annotations are made there and
its export taken back with `noisy-student ingest labels`; the labelled split grows by a
version and the event it emits retrains the model through a real Prefect server and
`noisy-student serve`.

Label Studio (PyPI `label-studio`) pins `python-json-logger==2.0.4` where Prefect needs
>= 2.0.7, so it cannot live in our locked environment: it runs in a tool environment of
its own (`uv tool run --from label-studio==…`), started once for the module. That tool
environment is resolved from PyPI, not from our lock, so it is frozen in time: uv takes
only releases uploaded before LABEL_STUDIO_AS_OF, and a release of any of its ~150
dependencies after that date cannot change what the test runs (sentry-sdk 3.0, resolved
here on 2026-12-07, stopped Label Studio 1.23.2 at start: `Unknown option
'send_default_pii'`; the bound below names that one for whoever moves the date).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from noisy_student.data import dataset, storage
from tests import test_deployment as deployment
from tests.conftest import FASHION_MNIST, REPO
from tests.test_deployment import Processes, bin_, free_port, responds, wait_until

pytestmark = pytest.mark.integration

LABEL_STUDIO_AS_OF = "2026-12-07T00:00:00Z"  # the environment the test last passed with
LABEL_STUDIO = [
    "--exclude-newer",
    LABEL_STUDIO_AS_OF,
    "--from",
    "label-studio==1.23.2",
    "--with",
    "sentry-sdk<3",
]
LS_TOKEN = uuid.uuid4().hex  # Label Studio's legacy API token: 40 characters or fewer
ANNOTATED = 24  # queued images the annotator answers
# the deployment test's tiny pipeline, in local folders, with a pool of 300 to queue from
TINY = {k: v for k, v in deployment.TINY.items() if k not in ("artifacts", "data.root")} | {
    "name": "ns-labelling-loop",
    "data.fashion_mnist.source": FASHION_MNIST,
    "data.fashion_mnist.unlabelled_limit": 300,
    "evaluation.fgsm_epsilons": [],
    "labelling.queue_size": 40,
}


class Loop:
    def __init__(self, procs: Processes, env: dict[str, str], tmp: Path, api: str, ls: str):
        self.procs, self.env, self.tmp, self.api, self.ls = procs, env, tmp, api, ls
        self.sets = [f"--set={k}={json.dumps(v)}" for k, v in self.overrides.items()]

    @property
    def overrides(self) -> dict:
        return TINY | {"artifacts": str(self.tmp / "artifacts"), "data.root": self.root}

    @property
    def root(self) -> str:
        return str(self.tmp / "datasets" / "smoke")

    def cli(self, *argv: str, timeout: float = 600) -> str:
        import subprocess

        done = subprocess.run(
            [bin_("noisy-student"), *argv], env=self.env, cwd=self.tmp, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def prefect(self, method: str, path: str, body: dict | None = None):
        r = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def label_studio(self, method: str, path: str, **kwargs):
        headers = {"Authorization": f"Token {LS_TOKEN}"}
        r = httpx.request(method, f"{self.ls}{path}", headers=headers, timeout=120, **kwargs)
        assert r.is_success, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json()


def _uv() -> str:
    found = shutil.which("uv")
    if found is None:
        pytest.fail("uv not on PATH: Label Studio runs in a uv tool environment (make setup)")
    return found


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> Iterator[Loop]:
    """A Prefect server and a Label Studio on 127.0.0.1, started at once (Label Studio
    takes ~26 s on a quiet machine, minutes on a busy one); stopped at the end."""
    import os

    tmp = tmp_path_factory.mktemp("labelling-loop")
    procs = Processes(tmp)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    prefect_port, ls_port = free_port(), free_port()
    try:
        procs.start(
            "prefect-server",
            [bin_("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(prefect_port)],
            base | {"PREFECT_HOME": str(tmp / "prefect-server"), "PREFECT_UI_ENABLED": "false",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
        )  # fmt: skip
        procs.start(
            "label-studio",
            [_uv(), "tool", "run", "--python", "3.11", *LABEL_STUDIO, "label-studio",
             "start", "--internal-host", "127.0.0.1", "--port", str(ls_port), "--no-browser"],
            base | {"LABEL_STUDIO_BASE_DATA_DIR": str(tmp / "label-studio"),
                    "LABEL_STUDIO_USERNAME": "annotator@example.com",
                    "LABEL_STUDIO_PASSWORD": f"pw-{uuid.uuid4().hex}",
                    "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
                    # without it the token above is refused (401)
                    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"},
        )  # fmt: skip
        api = f"http://127.0.0.1:{prefect_port}/api"
        wait_until("the Prefect server", lambda: responds(f"{api}/health"), 300, procs)
        env = base | {
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(tmp / "prefect-client"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        }
        yield Loop(procs, env, tmp, api, f"http://127.0.0.1:{ls_port}")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def first_run(loop) -> dict:
    """The smoke preset, tiny, on the Prefect server; Label Studio boots meanwhile."""
    out = loop.cli("run", "-c", str(REPO / "pipeline_config" / "smoke.yaml"), *loop.sets)
    summary_url = out.strip().splitlines()[-1].removeprefix("summary: ")
    assert "label queue: 40 images by margin" in out
    return storage.read_json(summary_url)


def test_a_run_writes_its_label_queue_for_annotators(first_run):
    files = first_run["label_queue"]["files"]
    queue = pq.read_table(files["parquet"]).to_pandas()
    assert len(queue) == 40 and queue["id"].is_unique
    assert len(json.loads(Path(files["label_studio"]).read_text())) == 40
    assert pd.read_csv(files["csv"])["id"].tolist() == queue["id"].tolist()
    assert Image.open(files["contact_sheet"]).format == "PNG"


@pytest.fixture(scope="module")
def export(loop, first_run) -> dict:
    """The queue imported into Label Studio, ANNOTATED tasks answered with their true class
    through its API, one skipped; then its JSON export."""
    wait_until("Label Studio", lambda: responds(f"{loop.ls}/health"), 900, loop.procs, every=2)
    files = first_run["label_queue"]["files"]
    project = loop.label_studio(
        "POST", "/api/projects",
        json={"title": "label queue", "label_config": Path(files["label_config"]).read_text()},
    )  # fmt: skip
    tasks = json.loads(Path(files["label_studio"]).read_text())
    imported = loop.label_studio("POST", f"/api/projects/{project['id']}/import", json=tasks)
    assert (imported["task_count"], imported["prediction_count"]) == (40, 40)
    listed = loop.label_studio(
        "GET", "/api/tasks", params={"project": project["id"], "page_size": 100}
    )["tasks"]
    truth = storage.read_parquet(storage.join(first_run["data_root"], dataset.UNLABELLED_TRUTH))
    truth = truth.to_pandas().set_index("id")["label"]
    classes = dataset.read_manifest(storage.join(first_run["data_root"], dataset.LABELLED))
    answered = {}
    for task in sorted(listed, key=lambda t: t["data"]["rank"])[: ANNOTATED + 1]:
        image_id = task["data"]["image_id"]
        answer = classes.class_names[truth[image_id]]
        result = [{"from_name": "label", "to_name": "image", "type": "choices",
                   "value": {"choices": [answer]}}]  # fmt: skip
        skipped = len(answered) == ANNOTATED  # the last one: the annotator skips it
        loop.label_studio(
            "POST", f"/api/tasks/{task['id']}/annotations",
            json={"result": [] if skipped else result, "was_cancelled": skipped},
        )  # fmt: skip
        if not skipped:
            answered[image_id] = answer
    exported = loop.label_studio(
        "GET", f"/api/projects/{project['id']}/export", params={"exportType": "JSON"}
    )
    path = loop.tmp / "label-studio-export.json"
    path.write_text(json.dumps(exported))
    predictions = loop.label_studio("GET", "/api/predictions/", params={"project": project["id"]})
    image_of_task = {t["id"]: t["data"]["image_id"] for t in listed}
    guesses = {image_of_task[p["task"]]: p["result"][0]["value"]["choices"] for p in predictions}
    return {"path": str(path), "answered": answered, "tasks": exported, "guesses": guesses}


def test_label_studio_shows_the_models_guess_and_exports_our_ids(first_run, export):
    queue = pq.read_table(first_run["label_queue"]["files"]["parquet"]).to_pandas()
    assert export["guesses"] == {
        i: [c] for i, c in zip(queue["id"], queue["model_class"], strict=True)
    }
    # the answered tasks and the skipped one, each with our id
    assert len(export["tasks"]) == ANNOTATED + 1
    assert {t["data"]["image_id"] for t in export["tasks"]} > set(export["answered"])


def test_labels_taken_back_grow_the_labelled_split_and_retrain_through_prefect(
    loop, first_run, export
):
    root = first_run["data_root"]
    smoke = str(REPO / "pipeline_config" / "smoke.yaml")
    # `serve` registers `iterate` with the retrain trigger and runs what the trigger starts
    loop.procs.start(
        "serve",
        [bin_("noisy-student"), "serve", "-c", smoke, *loop.sets, "--batch-window", "5",
         "--watch-every", "0"],
        loop.env,
    )  # fmt: skip

    def served():
        try:
            d = loop.prefect("GET", "/deployments/name/noisy-student/iterate")
        except httpx.HTTPStatusError:
            return None
        automations = loop.prefect("POST", "/automations/filter", {})
        mine = [
            a for a in automations if any(x.get("deployment_id") == d["id"] for x in a["actions"])
        ]
        return d if mine else None

    iterate = wait_until("noisy-student serve", served, 300, loop.procs)

    out = loop.cli("ingest", "labels", export["path"], "--dataset", root)
    assert f"{ANNOTATED} images labelled" in out and "skipped 1 row(s) without a class" in out
    assert "event noisy-student.labels.landed emitted" in out, out
    labelled = dataset.read_manifest(storage.join(root, dataset.LABELLED))
    pool = dataset.read_manifest(storage.join(root, dataset.UNLABELLED))
    assert (labelled.version, labelled.num_rows) == (2, 50 + ANNOTATED)
    assert pool.version == 2 and pool.removed_ids == set(export["answered"])
    _, images = dataset.load(labelled.url)
    got = dict(
        zip(images.ids, [labelled.class_names[y] for y in images.labels.tolist()], strict=True)
    )
    assert {i: got[i] for i in export["answered"]} == export["answered"]

    def retrain():
        runs = loop.prefect(
            "POST", "/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [iterate["id"]]}}},
        )  # fmt: skip
        return runs[0] if runs else None

    run = wait_until("the retrain the labels triggered", retrain, 180, loop.procs)
    deadline_run = wait_until(
        "the retrain to end",
        lambda: (r := loop.prefect("GET", f"/flow_runs/{run['id']}"))["state_type"]
        in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and r,
        900, loop.procs, every=2,
    )  # fmt: skip
    assert deadline_run["state_type"] == "COMPLETED", loop.procs.log("serve")[-3000:]

    from mlflow import MlflowClient

    client = MlflowClient(loop.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(TINY["name"]).experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{run['id']}'")
    summary = storage.read_json(parent.data.tags["noisy_student.summary_url"])
    (iteration,) = summary["iterations"]
    # the grown labelled split trained the student; the pool it labelled lost those images
    student = client.get_run(iteration["student"]["mlflow_run_id"])
    assert student.data.params["labelled_images"] == str(50 + ANNOTATED)
    assert iteration["pseudo_labels"]["total"] == 300 - ANNOTATED
    queue = pq.read_table(summary["label_queue"]["files"]["parquet"]).to_pandas()
    assert not set(queue["id"]) & set(export["answered"])
