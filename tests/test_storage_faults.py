"""Storage under faults: transient errors retried with backoff, permanent ones not, writes
atomic and idempotent, failures reported in one line naming the URL."""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
import s3fs
from botocore.exceptions import ClientError, EndpointConnectionError
from fsspec.implementations.local import LocalFileSystem
from prefect.states import Failed
from s3fs.errors import translate_boto_error

import cli
from noisy_student.data import dataset, ingest, storage
from noisy_student.errors import StorageError, StorageUnavailable, UserError
from noisy_student.training.training_state import TrainingState
from tasks.policies import transient_failure


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} here"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("read timed out"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        _client_error("InternalError", 500),
        _client_error("ServiceUnavailable", 503),
        _client_error("SlowDown", 503),
        translate_boto_error(_client_error("InternalError", 500)),  # as s3fs raises it
        translate_boto_error(_client_error("503", 503), set_cause=False),
        translate_boto_error(_client_error("ConditionalRequestConflict", 409)),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:20],
)
def test_transient_storage_errors_are_recognised(exc):
    assert storage.is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("no such key"),
        translate_boto_error(_client_error("NoSuchKey", 404)),
        translate_boto_error(_client_error("AccessDenied", 403)),
        translate_boto_error(_client_error("InvalidAccessKeyId", 403)),
        _client_error("NoSuchBucket", 404),
        ValueError("a bug, not the network"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:20],
)
def test_permanent_storage_errors_are_not_retried(exc):
    assert not storage.is_transient(exc)
    calls = []

    def request():
        calls.append(1)
        raise exc

    with pytest.raises(Exception):  # noqa: B017 - each case raises its own kind
        storage.call("s3://bucket/key", request)
    assert len(calls) == 1


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    policy = storage.RetryPolicy(attempts=10, base_delay=1.0, max_delay=8.0)
    random.seed(0)
    for attempt, nominal in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (7, 8.0)]:
        delays = {storage.backoff(attempt, policy) for _ in range(20)}
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert len(delays) > 1  # jittered
    # the jitter has a generator of its own: the caller's seeded `random` is left alone
    assert random.random() == random.Random(0).random()


class FlakyFileSystem(fsspec.AbstractFileSystem):
    """The local disk behind a store that fails a share of requests, as S3 does under load:
    with a reset connection or a 503 SlowDown, decided by a seeded generator."""

    protocol = "flaky"
    cachable = False

    def __init__(self, failure_rate: float = 0.3, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.local = LocalFileSystem()
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.failures = 0

    @classmethod
    def _strip_protocol(cls, path):
        return path.removeprefix("flaky://") if isinstance(path, str) else path

    def _maybe_fail(self):
        if self.rng.random() < self.failure_rate:
            self.failures += 1
            if self.rng.random() < 0.5:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            raise translate_boto_error(_client_error("SlowDown", 503))

    def _open(self, path, mode="rb", **kwargs):
        self._maybe_fail()
        return self.local._open(path, mode, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        self._maybe_fail()
        self.local.makedirs(os.path.dirname(path), exist_ok=True)
        self.local.pipe_file(path, value)

    def ls(self, path, detail=True, **kwargs):
        self._maybe_fail()
        return self.local.ls(path, detail=detail)

    def info(self, path, **kwargs):
        self._maybe_fail()
        return self.local.info(path)

    def makedirs(self, path, exist_ok=False):
        self._maybe_fail()
        self.local.makedirs(path, exist_ok=exist_ok)

    def exists(self, path, **kwargs):  # fsspec's default would read a failure as "absent"
        self._maybe_fail()
        return self.local.exists(path)

    def isdir(self, path):
        self._maybe_fail()
        return self.local.isdir(path)

    def rm(self, path, recursive=False, maxdepth=None):
        self._maybe_fail()
        self.local.rm(path, recursive=recursive)


@pytest.fixture()
def flaky(monkeypatch):
    """`flaky://` URLs failing 30% of requests, and retries without real waiting."""
    fs = FlakyFileSystem(failure_rate=0.3, seed=1)
    monkeypatch.setattr(storage, "filesystem", lambda url: (fs, fs._strip_protocol(url)))
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=12, base_delay=0.0))
    return fs


def _fake_idx(folder) -> str:
    from tests.test_ingest import _fake_idx as make

    return make(folder)


def test_ingest_and_reading_survive_a_store_failing_a_share_of_requests(flaky, tmp_path):
    source = _fake_idx(tmp_path)
    clean = ingest.fashion_mnist(str(tmp_path / "clean"), source, labelled_per_class=2)
    flaky_root = ingest.fashion_mnist(f"flaky://{tmp_path}/flaky", source, labelled_per_class=2)
    assert flaky.failures > 5  # the store really misbehaved
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        m1, a = dataset.load(storage.join(clean, split))
        m2, b = dataset.load(storage.join(flaky_root, split))
        assert m1.digest == m2.digest
        assert a.ids == b.ids and (a.images == b.images).all()


def test_training_state_survives_a_store_failing_a_share_of_requests(flaky, tmp_path):
    import torch

    state = TrainingState(f"flaky://{tmp_path}/state", {"run": 1})
    tree = {"step": 3, "w": torch.arange(6.0).reshape(2, 3), "opt": {0: {"m": torch.ones(2)}}}
    state.save(tree, 3)
    back = state.load()
    assert back["step"] == 3 and torch.equal(back["w"], tree["w"])
    assert torch.equal(back["opt"][0]["m"], torch.ones(2))


def test_a_store_that_keeps_failing_gives_one_line_naming_the_url(monkeypatch, tmp_path):
    fs = FlakyFileSystem(failure_rate=1.0)
    monkeypatch.setattr(storage, "filesystem", lambda url: (fs, fs._strip_protocol(url)))
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=3, base_delay=0.0))
    url = f"flaky://{tmp_path}/x.json"
    with pytest.raises(StorageUnavailable, match="storage unreachable after 3 attempts") as e:
        storage.write_json(url, {"a": 1})
    assert str(e.value).startswith(url) and "\n" not in str(e.value)
    assert fs.failures == 3
    # Prefect's I/O tasks retry on it later; a refusal or bad input is never retried
    assert transient_failure(None, None, Failed(data=e.value))
    assert not transient_failure(None, None, Failed(data=UserError("bad label")))
    denied = StorageError("denied")
    denied.__cause__ = PermissionError("AccessDenied")
    assert not transient_failure(None, None, Failed(data=denied))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "part-00000.parquet"
    leftover = tmp_path / f"part-00000.parquet{storage.TMP_SUFFIX}dead1234"
    leftover.write_bytes(b"half a file from a killed attempt")
    storage.write_bytes(str(target), b"complete")
    storage.write_bytes(str(target), b"complete")  # a retried write is harmless
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]


def test_a_write_leaves_the_temporary_files_of_writers_still_running_alone(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "_manifest.json"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = storage._HOST
    # another thread of this process, midway through its own write of the same name
    beside = tmp_path / f"_manifest.json{storage.TMP_SUFFIX}{host}.{os.getpid()}-0000beef"
    # a writer on another host sharing this file system
    remote = tmp_path / f"_manifest.json{storage.TMP_SUFFIX}ffffff.{os.getpid()}-0000cafe"
    # a process of this host that is gone
    dead = tmp_path / f"_manifest.json{storage.TMP_SUFFIX}{host}.{finished.pid}-0000dead"
    for f in (beside, remote, dead):
        f.write_bytes(b"in progress")
    storage.write_bytes(str(target), b"complete")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["_manifest.json", beside.name, remote.name]
    )


def test_a_write_failing_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "_manifest.json"
    target.write_bytes(b"old")

    def crash(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["_manifest.json"]


@pytest.fixture()
def dead_endpoint(monkeypatch):
    """S3 settings pointing at a port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_MAX_ATTEMPTS": "1",  # botocore's own retries, on top of ours
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=2, base_delay=0.01))
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_unreachable_storage_is_a_one_line_error_with_non_zero_exit(dead_endpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["ingest", "fashion-mnist", "--out", "s3://ns-test/x", "--source", "s3://ns-test/raw"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://ns-test/raw") and "unreachable after 2 attempts" in err
    assert err.count("\n") == 1


def test_wrong_credentials_are_a_one_line_error_naming_the_url(s3_endpoint, monkeypatch):
    from moto import settings as moto_settings

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # check keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    try:
        with pytest.raises(StorageError, match="access denied") as e:
            storage.read_bytes("s3://ns-test/datasets/anything/_manifest.json")
        assert str(e.value).startswith("s3://ns-test/datasets/anything/_manifest.json: ")
        assert not isinstance(e.value, StorageUnavailable)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_damaged_parquet_file_is_one_line_naming_it(tmp_path):
    good = str(tmp_path / "good.parquet")
    storage.write_parquet(good, pa.table({"id": ["a", "b"]}), row_group_size=2)
    assert storage.read_parquet(good, ["id"]).column("id").to_pylist() == ["a", "b"]
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(Path(good).read_bytes()[:-12] + b"\0" * 12)  # footer overwritten
    with pytest.raises(UserError, match=r"damaged\.parquet: not a readable Parquet file") as e:
        storage.read_parquet(str(damaged))
    assert "\n" not in str(e.value)
    with pytest.raises(
        UserError, match=r"good\.parquet: not a readable Parquet file \(columns label\)"
    ):
        storage.read_parquet(good, ["label"])
    with pytest.raises(FileNotFoundError):
        storage.read_parquet(str(tmp_path / "missing.parquet"))
