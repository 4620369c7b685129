"""Shared fixtures: a tiny real dataset, MLflow on a temporary SQLite file, one Prefect
test harness for the whole session (it costs ~8 s to start), a moto S3 server."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest

# `make test` runs one pytest-xdist worker per core: one torch thread each (the servers and
# runs they start inherit it), as two OpenMP teams on two cores wait on each other. Set
# before torch is imported below.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")

from noisy_student.config import StudentConfig, TeacherConfig
from noisy_student.evaluation.scores import ModelScores
from noisy_student.stages import train
from noisy_student.training import engine

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def pytest_configure(config):
    from noisy_student.training.engine import flush_denormals

    flush_denormals()  # as the CLI does, before torch starts its threads


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fashion_mnist_source() -> str:
    if not Path(FASHION_MNIST, "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FASHION_MNIST} missing: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, fashion_mnist_source) -> str:
    """A real slice of Fashion-MNIST: 5 labelled images per class, 300 unlabelled in
    three shards, 200 test images."""
    from noisy_student.data import ingest

    root = tmp_path_factory.mktemp("data") / "fmnist-tiny"
    return ingest.fashion_mnist(
        str(root),
        fashion_mnist_source,
        labelled_per_class=5,
        unlabelled_limit=300,
        test_limit=200,
        seed=0,
        rows_per_shard=100,
    )


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # run artifacts default to ./mlruns
    return uri


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, with a bucket `ns-test`."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ns-test")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def torch_one_thread():
    """Added for the unit tests of tiny models: one intra-op thread. On 2 cores shared with
    another job, OpenMP's second thread waits for a busy core and a 16x16 forward pass takes
    ~1 s instead of ~3 ms. Restores the previous count, so other tests are unaffected."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_iteration(cfg, data_root: str, folder: Path, experiment: str) -> tuple:
    """The teacher and student stages of `cfg` (teacher and first student) called one by one
    on `data_root`, every image kept for the student (no threshold, no balancing), outputs
    under `folder`, MLflow runs under a parent run of `experiment`: (teacher, student)."""
    from noisy_student import stages
    from noisy_student.registry import tracking

    parent = tracking.start_run(experiment, "run")
    teacher = stages.train_teacher(cfg.teacher, data_root, str(folder / "t"), parent, 0)
    shards = [
        stages.infer_pseudo_labels(data_root, i, teacher.url, str(folder / "p"), 64)
        for i in stages.unlabelled_shards(data_root)
    ]
    selected = stages.filter_and_balance(
        shards,
        cfg.selection.model_copy(update={"min_confidence": 0.0, "balance": False}),
        data_root,
        str(folder / "p"),
        str(folder / "s"),
        teacher,
        parent,
        1,
        0,
    )
    student = stages.train_student(
        cfg.students[0], data_root, selected, teacher, str(folder / "st"), parent, 1, 0
    )
    return teacher, student


def schedule(**given: Any) -> engine.Schedule:
    """The engine's schedule of a student configured with `given`: the config schema's
    defaults for the rest (the engine keeps none of its own)."""
    return train.schedule(StudentConfig(model="test_resnet", **given))


def noise(**given: Any) -> engine.Noise:
    """The input noise of a teacher's default config (for 28-px images), `given` replaced."""
    return dataclasses.replace(train.noise(TeacherConfig(model="test_resnet"), 28, 28), **given)


def model_scores(**given: Any) -> ModelScores:
    """A model's scores with what a test gives; every other figure empty (zero)."""
    empty: dict[str, Any] = dict(
        label="", role="", iteration=0, model="", mlflow_run_id="", test_accuracy=0.0,
        test_accuracy_interval=None, test_images=None, clean_error=0.0, corruption_accuracy=0.0,
        corruption_accuracy_interval=None, per_corruption={}, per_corruption_interval=None,
        per_severity={}, per_severity_interval={}, ce={}, relative_ce={}, mce=0.0,
        relative_mce=0.0, ece_clean=0.0, ece_corrupted=0.0, fgsm_accuracy={},
        fgsm_accuracy_interval={},
    )  # fmt: skip
    return ModelScores(**(empty | given))


def pytest_collection_modifyitems(config, items):
    """The longest tiers first (integration, then slow), each in file order: `make test`'s
    workers take whole files in this order (`--dist loadfile --no-loadscope-reorder`), so
    the files that take minutes start at once and the short ones fill in around them."""

    def tier(item) -> int:
        marks = {mark.name for mark in item.iter_markers()}
        return 0 if "integration" in marks else 1 if "slow" in marks else 2

    items.sort(key=tier)
