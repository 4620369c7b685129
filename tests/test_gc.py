"""`noisy-student gc`: what killed writes leave behind goes; what a manifest or an
unfinished run names stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import cli
from noisy_student.data import dataset, gc, ingest, storage
from noisy_student.errors import UserError
from tests.conftest import FASHION_MNIST, REPO

DAY = 86400


@pytest.fixture()
def small_dataset(tmp_path, fashion_mnist_source) -> str:
    return ingest.fashion_mnist(
        str(tmp_path / "data"),
        fashion_mnist_source,
        labelled_per_class=1,
        unlabelled_limit=40,
        test_limit=10,
        rows_per_shard=20,
    )


def image_folder(folder: Path, count: int) -> str:
    images = ingest.read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(images[i]).save(folder / f"img-{i:03d}.png")
    return str(folder)


def age(path: str | Path, seconds: float) -> None:
    """Make a file look `seconds` old."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def killed_append(root: str, images: str) -> subprocess.CompletedProcess:
    """`noisy-student ingest append`, killed with SIGKILL once its shards are written and
    before its manifest is."""
    env = {**os.environ, "NOISY_STUDENT_KILL_AT": "append:commit"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "cli", "ingest", "append", "--dataset", root,
         "--images", images, "--rows-per-shard", "4"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # kills a real `ingest append` process and reruns it: 14 s
def test_gc_after_a_killed_append_removes_its_shards_and_the_dataset_reads_as_before(
    small_dataset, tmp_path, capsys
):
    url = storage.join(small_dataset, dataset.UNLABELLED)
    before, images_before = dataset.load(url)
    named_before = {p.name: p.read_bytes() for p in Path(url).iterdir() if p.is_file()}

    done = killed_append(small_dataset, image_folder(tmp_path / "batch", 10))
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    orphans = sorted({p.name for p in Path(url).iterdir() if p.is_file()} - set(named_before))
    assert len(orphans) == 3 and all(o.startswith("part-") for o in orphans)  # 10 rows by 4
    assert dataset.read_manifest(url) == before  # nobody reads them

    # fresh files are kept: the default one day protects writes in progress
    cli.main(["gc", small_dataset, "--dry-run"])
    assert "0 file(s)" in capsys.readouterr().out
    for name in orphans:
        age(Path(url, name), 2 * DAY)
    cli.main(["gc", small_dataset, "--dry-run"])
    out = capsys.readouterr().out
    assert all(f"{Path(url, o)}  " in out for o in orphans) and "nothing removed" in out
    assert all(Path(url, o).exists() for o in orphans)

    cli.main(["gc", small_dataset])
    assert "3 file(s)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in Path(url).iterdir() if p.is_file()} == named_before
    after, images_after = dataset.load(url)
    assert after == before and images_after.ids == images_before.ids
    assert (images_after.images == images_before.images).all()
    # nothing is left for a second pass, and the append can simply be redone
    assert gc.find_orphans(small_dataset, 0) == []
    _, v2 = ingest.append_unlabelled(small_dataset, str(tmp_path / "batch"))
    assert v2.version == 2 and v2.num_rows == before.num_rows + 10


def test_gc_never_removes_a_shard_that_any_manifest_version_names(small_dataset, tmp_path):
    _, v2 = ingest.append_unlabelled(small_dataset, image_folder(tmp_path / "batch", 6))
    url = storage.join(small_dataset, dataset.UNLABELLED)
    # `_manifest.json` lagging at version 1 (a concurrent append's window): version 2's
    # shards are named by `_manifests/00002.json` only
    storage.write_json(
        storage.join(url, dataset.MANIFEST),
        storage.read_json(storage.join(url, dataset.HISTORY, "00001.json")),
    )
    for path in Path(small_dataset).rglob("*"):
        if path.is_file():
            age(path, 30 * DAY)
    assert gc.find_orphans(small_dataset, 0) == []
    assert dataset.read_manifest(url) == v2


def make_run(artifacts: Path, run_id: str, finished: bool) -> Path:
    """A run folder as the flow lays it out: pseudo labels with their manifest, naming
    part-00000 only; part-00001 is what a killed attempt left."""
    run = artifacts / "runs" / run_id
    labels = run / "iteration-1" / "pseudo_labels"
    labels.mkdir(parents=True)
    for name in ("part-00000.parquet", "part-00001.parquet"):
        (labels / name).write_bytes(b"shard")
    storage.write_json(
        str(labels / "_manifest.json"),
        {"shards": [{"file": "part-00000.parquet", "rows": 1, "sha256": "x"}]},
    )
    (run / "iteration-1" / "teacher").mkdir()
    (run / "iteration-1" / "teacher" / "model.safetensors").write_bytes(b"weights")
    (run / "iteration-1" / "teacher" / "model.json.tmp-0badf00d").write_bytes(b"half")
    selected = run / "iteration-1" / "selected"  # its manifest never written
    selected.mkdir()
    (selected / "part-00000.parquet").write_bytes(b"shard")
    if finished:
        (run / "summary.json").write_text("{}")
    for path in run.rglob("*"):
        if path.is_file():
            age(path, 2 * DAY)
    return run


def test_gc_of_an_artifacts_root_cleans_finished_runs_and_keeps_unfinished_ones(tmp_path):
    artifacts = tmp_path / "artifacts"
    done = make_run(artifacts, "smoke-aaaa", finished=True)
    running = make_run(artifacts, "smoke-bbbb", finished=False)
    found = {o.url: o.reason for o in gc.find_orphans(str(artifacts), DAY)}
    it = done / "iteration-1"
    assert found == {
        str(it / "pseudo_labels" / "part-00001.parquet"): "named by no manifest version",
        str(it / "selected" / "part-00000.parquet"): "in a folder with no manifest",
        str(it / "teacher" / "model.json.tmp-0badf00d"): "left by a killed write",
    }
    gc.remove(gc.find_orphans(str(artifacts), DAY))
    assert (it / "pseudo_labels" / "part-00000.parquet").exists()
    assert (it / "teacher" / "model.safetensors").exists()
    assert not (it / "pseudo_labels" / "part-00001.parquet").exists()
    # the unfinished run is what a resume picks up: all of it stays
    assert len([p for p in running.rglob("*") if p.is_file()]) == 6


def test_gc_works_on_s3(s3_endpoint, tmp_path, fashion_mnist_source):
    root = "s3://ns-test/gc/data"
    ingest.fashion_mnist(root, fashion_mnist_source, 1, 20, 10, rows_per_shard=10)
    orphan = storage.join(root, dataset.UNLABELLED, "part-00009-deadbeef.parquet")
    storage.write_bytes(orphan, b"left behind")
    assert [o.url for o in gc.find_orphans(root, 0)] == [orphan]
    assert gc.find_orphans(root, DAY) == []  # S3's LastModified: just now
    gc.remove(gc.find_orphans(root, 0))
    assert not storage.exists(orphan)
    assert dataset.load(storage.join(root, dataset.UNLABELLED))[0].num_rows == 20


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["gc", "{tmp}/nowhere"], "nowhere: no such folder"),
        (["gc", "{tmp}", "--older-than", "yesterday"], "--older-than 'yesterday'"),
    ],
)
def test_gc_refuses_bad_input_in_one_line(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert done.value.code == 2 and named in err and err.count("\n") == 1


def test_gc_stops_at_a_manifest_it_cannot_read(small_dataset):
    url = storage.join(small_dataset, dataset.UNLABELLED)
    Path(url, "part-00099-cafe.parquet").write_bytes(b"orphan")
    storage.write_json(storage.join(url, dataset.HISTORY, "00001.json"), {"version": 1})
    with pytest.raises(UserError, match="00001.json: unreadable manifest"):
        gc.find_orphans(small_dataset, 0)


def test_parse_age_reads_units():
    assert gc.parse_age("1d") == DAY and gc.parse_age("12h") == DAY / 2
    assert gc.parse_age("90") == 90 and gc.parse_age("0") == 0 and gc.parse_age("30m") == 1800
