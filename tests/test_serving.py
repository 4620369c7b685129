"""A trained model as an MLflow logged model: loaded with `mlflow.pyfunc` from the registry
and served by `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from noisy_student import config, stages
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.registry import predict, tracking
from noisy_student.training import models
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # logs and registers trained models in MLflow: 7 s a test

NAME = "ns-serving"


@pytest.fixture(scope="module")
def champion(tiny_dataset, tmp_path_factory):
    """A teacher trained for one epoch by the real stage, registered, aliased champion; in
    an MLflow store of this module's own, shared by its tests."""
    import torch

    tmp = tmp_path_factory.mktemp("serving")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the torch_one_thread fixture
    cfg = config.load(REPO / "pipeline_config/smoke.yaml", ["teacher.epochs=1"])
    parent = tracking.start_run(NAME, "run")
    teacher = stages.train_teacher(cfg.teacher, tiny_dataset, str(tmp / "t"), parent, 0)
    version = tracking.register(teacher.mlflow_run_id, NAME)
    tracking.set_alias(NAME, "champion", version)
    torch.set_num_threads(threads)
    yield teacher
    mp.undo()


def _test_pngs(root: str, n: int) -> tuple[list[bytes], list[str]]:
    """The first `n` test images as PNG bytes, as a user would send them."""
    _, test = dataset.load(storage.join(root, dataset.TEST))
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(test.images[i, 0].numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, dataset.read_manifest(storage.join(root, dataset.TEST)).class_names


def test_a_trained_model_is_a_logged_model_output_by_its_run(champion):
    c = tracking.client()
    model_id = tracking.logged_model_of_run(champion.mlflow_run_id)
    model = c.get_logged_model(model_id)
    assert model.name == "teacher-1" and model.source_run_id == champion.mlflow_run_id
    assert str(model.status) == "READY"
    assert model.params["model"] == "test_resnet"
    assert {m.key for m in model.metrics} >= {"final_test_accuracy"}
    version = c.get_model_version_by_alias(NAME, "champion")
    assert version.source == f"models:/{model_id}"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    # the weights as safetensors, the model made from code: nothing pickled
    assert {"MLmodel", "artifacts/checkpoint/model.safetensors", "pyfunc_model.py"} <= files
    assert not any(p.endswith((".pkl", ".pt", ".pth", ".bin")) for p in files), files
    mlmodel = (local / "MLmodel").read_text()
    assert "top_classes" in mlmodel and "binary" in mlmodel  # the signature


def test_the_champion_loads_with_pyfunc_and_names_the_dataset_classes(champion, tiny_dataset):
    pngs, classes = _test_pngs(tiny_dataset, 3)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(pd.DataFrame({"image": pngs}))
    assert list(out.columns) == ["top_classes", "top_probabilities"] and len(out) == 3
    for top, probs in zip(out["top_classes"], out["top_probabilities"], strict=True):
        assert len(top) == 5 and set(top) <= set(classes)
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    # the same answer as `noisy-student predict` on the checkpoint itself
    net, meta = models.load(champion.url)
    png = Path(champion.url).parent / "x.png"
    png.write_bytes(pngs[0])
    expected = predict.top_k(net.eval(), meta, str(png))
    assert out["top_classes"][0] == [name for name, _ in expected]
    # base64 strings, as JSON carries bytes, give the same answer
    as_text = model.predict(pd.DataFrame({"image": [base64.b64encode(pngs[0]).decode()]}))
    assert as_text["top_classes"][0] == out["top_classes"][0]


def test_pyfunc_names_a_corrupt_image_by_its_row(champion, tiny_dataset):
    pngs, _ = _test_pngs(tiny_dataset, 1)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(UserError, match="image row 1: corrupt image"):
        model.predict(pd.DataFrame({"image": [pngs[0], b"not an image"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_mlflow_models_serve_answers_a_posted_png_with_class_names(champion, tiny_dataset):
    pngs, classes = _test_pngs(tiny_dataset, 2)
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)
    mlflow_cli = shutil.which("mlflow", path=bin_dir)
    # MLFLOW_TRACKING_URI: this module's store; PATH: mlflow execs `uvicorn` by name
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/{NAME}@champion"]
        + ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its uvicorn workers stop with it, as one process group
    )
    try:
        body = json.dumps(
            {
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [[base64.b64encode(p).decode()] for p in pngs],
                }
            }
        ).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    body,
                    {"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as r:
                    answer = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None:
                    pytest.fail(f"server exited: {server.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    predictions = answer["predictions"]
    assert len(predictions) == 2
    for p in predictions:
        assert len(p["top_classes"]) == 5 and set(p["top_classes"]) <= set(classes)
        assert len(p["top_probabilities"]) == 5


def test_a_run_without_a_logged_model_still_registers_its_checkpoint(tmp_path, mlflow_uri):
    meta = models.ModelMeta("test_resnet", 10, 1, [str(i) for i in range(10)], 28, 28, "L")
    url = models.save(models.create("test_resnet", 10, 1), meta, str(tmp_path / "m"))
    run_id = tracking.start_run(NAME, "old")
    tracking.log_checkpoint(run_id, url)
    tracking.end_run(run_id)
    version = tracking.register(run_id, NAME)
    assert tracking.client().get_model_version(NAME, version).source == f"runs:/{run_id}/model"
