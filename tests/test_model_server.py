"""The served model follows the champion: `noisy-student serve-model` answers with MLflow's
REST contract from the version `champion` points at, and moves to a new version while
clients keep posting, none of their requests failing. The logged model carries its code:
an environment holding only the model's own requirements (what `mlflow models
build-docker` installs) loads it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from noisy_student.data import ingest
from noisy_student.registry import serving, tracking
from noisy_student.training import models
from tests.conftest import FASHION_MNIST, REPO
from tests.test_deployment import free_port

pytestmark = pytest.mark.slow

NAME = "ns-follow"
POLL = 1.0  # seconds between the server's looks at the alias


def _pngs(n: int) -> list[bytes]:
    images = ingest.read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _log_version(tmp: Path, seed: int) -> str:
    """A tiny model with its own seeded weights, logged and registered; its version."""
    import torch

    torch.manual_seed(seed)
    meta = models.ModelMeta("test_resnet", 10, 1, [f"class-{i}" for i in range(10)], 28, 28, "L")
    url = models.save(models.create("test_resnet", 10, 1), meta, str(tmp / f"model-{seed}"))
    run_id = tracking.start_run(NAME, f"seed-{seed}")
    model_id = serving.log_model(run_id, url, f"seed-{seed}", "test_resnet", {})
    tracking.end_run(run_id)
    return str(tracking.register(run_id, NAME, model_id))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions of one registered model (different weights), `champion` on the first,
    in an MLflow store of this module's own."""
    tmp = tmp_path_factory.mktemp("follow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(tmp)  # the runs' artifacts go to ./mlruns
    first, second = _log_version(tmp, 0), _log_version(tmp, 1)
    tracking.set_alias(NAME, "champion", first)
    yield {"tmp": tmp, "first": first, "second": second}
    mp.undo()


def _expected(version: str, pngs: list[bytes]) -> list[list[float]]:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    return [list(p) for p in model.predict(pd.DataFrame({"image": pngs}))["top_probabilities"]]


def _body(pngs: list[bytes]) -> bytes:
    rows = [[base64.b64encode(p).decode()] for p in pngs]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


class Client(threading.Thread):
    """Posts the same images again and again, keeping every answer."""

    def __init__(self, url: str, body: bytes):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.answers: list[tuple[float, int, str | None, list]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(
                        self.url, content=self.body, headers={"Content-Type": "application/json"}
                    )
                    probs = (
                        [p["top_probabilities"] for p in r.json()["predictions"]]
                        if r.status_code == 200
                        else r.text
                    )
                    self.answers.append(
                        (time.monotonic(), r.status_code, r.headers.get("x-model-version"), probs)
                    )
                except httpx.HTTPError as e:  # a dropped connection is an answer too: a failed one
                    self.answers.append((time.monotonic(), 0, None, repr(e)))


def test_serve_model_moves_to_the_new_champion_without_dropping_a_request(registry):
    pngs = _pngs(3)
    expected = {v: _expected(registry[v], pngs) for v in ("first", "second")}
    assert expected["first"] != expected["second"]
    port = free_port()
    log = registry["tmp"] / "serve-model.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve-model", NAME, "--port", str(port),
             "--poll", str(POLL)],
            cwd=registry["tmp"], env=env | {"PYTHONPATH": str(REPO)}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"{base}/ping"):
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        # the rest of mlflow models serve's API
        assert httpx.get(f"{base}/health").status_code == 200
        import mlflow

        assert httpx.get(f"{base}/version").text == mlflow.__version__

        clients = [Client(f"{base}/invocations", _body(pngs)) for _ in range(2)]
        for c in clients:
            c.start()
        _wait(lambda: all(len(c.answers) >= 3 for c in clients), 120, server, log)
        moved = time.monotonic()
        tracking.set_alias(NAME, "champion", registry["second"])

        def from_second() -> bool:
            return all(any(a[2] == registry["second"] for a in c.answers[-1:]) for c in clients)

        _wait(from_second, 60, server, log)
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(timeout=60)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    for c in clients:
        statuses = [a[1] for a in c.answers]
        assert statuses == [200] * len(statuses), [a for a in c.answers if a[1] != 200][:3]
        versions = [a[2] for a in c.answers]
        switch = versions.index(registry["second"])
        # every answer before the switch is the first version's, every one after the second's
        assert set(versions[:switch]) == {registry["first"]}, versions
        assert set(versions[switch:]) == {registry["second"]}, versions
        by_version = {registry["first"]: expected["first"], registry["second"]: expected["second"]}
        for _, _, version, probs in c.answers:
            assert np.allclose(probs, by_version[version], atol=1e-6)
    first_new = min(a[0] for c in clients for a in c.answers if a[2] == registry["second"])
    requests = sum(len(c.answers) for c in clients)
    print(f"\nalias moved -> first answer from the new version: {first_new - moved:.2f} s "
          f"(polling every {POLL:g} s; {requests} requests)")  # fmt: skip
    assert "version 1 -> 2" in log.read_text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check, timeout: float, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_serve_model_of_an_alias_that_does_not_exist_says_so_in_one_line(registry, capsys):
    import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["serve-model", NAME, "--alias", "nobody"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1, err
    assert err == (
        f"error: models:/{NAME}@nobody: no such alias (or registered model) at "
        f"sqlite:///{registry['tmp']}/mlflow.db\n"
    )
    with pytest.raises(SystemExit):
        cli.main(["serve-model", NAME, "--poll", "0"])
    assert capsys.readouterr().err == "error: --poll 0.0: must be more than 0 seconds\n"


def _uv() -> list[str] | None:
    if shutil.which("uv"):
        return ["uv"]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    return [sys.executable, "-m", "uv"] if probe.returncode == 0 else None


@pytest.mark.skipif(_uv() is None, reason="uv is not installed (make setup installs it)")
def test_the_logged_model_loads_where_only_its_own_requirements_are_installed(registry, tmp_path):
    """What `mlflow models build-docker` does, without the container: a fresh environment
    with the model's requirements.txt and nothing of this project, then load and predict."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{registry['first']}"))
    assert (local / "code" / "noisy_student" / "registry" / "serving.py").exists()
    venv = tmp_path / "venv"
    subprocess.run([*_uv(), "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    installed = subprocess.run(
        [*_uv(), "pip", "install", "-q", "-p", str(venv), "-r", str(local / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    pngs = _pngs(2)
    (tmp_path / "images.json").write_text(json.dumps([base64.b64encode(p).decode() for p in pngs]))
    script = (
        "import json, sys, pandas as pd, mlflow\n"
        f"model = mlflow.pyfunc.load_model({str(local)!r})\n"
        "import noisy_student\n"
        "print(noisy_student.__file__)\n"
        "images = json.load(open('images.json'))\n"
        "print(json.dumps(model.predict(pd.DataFrame({'image': images}))"
        "['top_probabilities'].tolist()))\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script], cwd=tmp_path,
        env=clean_env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, probabilities = done.stdout.strip().splitlines()[-2:]
    assert package_file.startswith(str(local / "code" / "noisy_student"))
    assert np.allclose(json.loads(probabilities), _expected(registry["first"], pngs), atol=1e-6)


def test_a_model_logged_before_the_core_had_subpackages_still_loads(registry, tmp_path):
    """Such a model's own pyfunc_model.py imports `noisy_student.serving`: the shim there
    gives it the classifier, which answers as the same model logged today."""
    import mlflow
    import pandas as pd

    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{NAME}/{registry['first']}", dst_path=str(tmp_path)
        )
    )
    code = local / "pyfunc_model.py"
    code.write_text(
        code.read_text().replace("noisy_student.registry.serving", "noisy_student.serving")
    )
    assert "from noisy_student.serving import ImageClassifier" in code.read_text()
    pngs = _pngs(2)
    answers = mlflow.pyfunc.load_model(str(local)).predict(pd.DataFrame({"image": pngs}))
    probabilities = [list(p) for p in answers["top_probabilities"]]
    assert np.allclose(probabilities, _expected(registry["first"], pngs), atol=1e-6)
