"""Labels taken back (`ingest labels`): every row checked before anything is written, the
images claimed from the unlabelled pool and landed in a new labelled version, safely beside
other writers and after a kill."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import pandas as pd
import pytest
import torch

from noisy_student.data import dataset, storage
from noisy_student.data.ingest import FASHION_MNIST_CLASSES as CLASSES
from noisy_student.errors import UserError
from noisy_student.labelling import annotations
from tests.conftest import REPO


@pytest.fixture(scope="module")
def source(tmp_path_factory, fashion_mnist_source) -> str:
    """A real slice of Fashion-MNIST: 50 labelled, 20 validation, 300 unlabelled in three
    shards, 200 test images."""
    from noisy_student.data import ingest

    return ingest.fashion_mnist(
        str(tmp_path_factory.mktemp("labels") / "ds"), fashion_mnist_source,
        labelled_per_class=5, validation_per_class=2, unlabelled_limit=300, test_limit=200,
        rows_per_shard=100,
    )  # fmt: skip


@pytest.fixture()
def root(source, tmp_path) -> str:
    """A copy of the source dataset, for one test to change."""
    shutil.copytree(source, tmp_path / "ds")
    return str(tmp_path / "ds")


def _truth(root: str) -> pd.Series:
    return (
        storage.read_parquet(storage.join(root, dataset.UNLABELLED_TRUTH))
        .to_pandas()
        .set_index("id")["label"]
    )


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "id,class") -> str:
    buf = io.StringIO()
    buf.write(header + "\n")
    csv.writer(buf).writerows(rows)
    path.write_text(buf.getvalue())
    return str(path)


def _answers(root: str, ids: list[str]) -> list[tuple[str, str]]:
    """The true class of each id, as a careful annotator answers."""
    truth = _truth(root)
    return [(i, CLASSES[truth[i]]) for i in ids]


def _split(root: str, split: str) -> dataset.Manifest:
    return dataset.read_manifest(storage.join(root, split))


def _files(root: str) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}


def test_labels_from_a_csv_move_the_images_from_the_pool_to_a_new_labelled_version(root, tmp_path):
    pool_before = _split(root, dataset.UNLABELLED)
    ids = list(_truth(root).index[[3, 150, 299]])  # one from each shard
    answers = _answers(root, ids)
    taken = annotations.take_labels(root, _csv(tmp_path / "labels.csv", answers))

    assert (taken.added, taken.already, taken.unanswered, taken.finished) == (3, 0, 0, 0)
    labelled = _split(root, dataset.LABELLED)
    assert labelled.version == 2 and labelled.num_rows == 53
    _, images = dataset.load(labelled.url)
    assert set(images.ids[-3:]) == set(ids)
    pool = _split(root, dataset.UNLABELLED)
    assert pool.version == 2 and pool.removed_ids == set(ids) and pool.visible_rows == 297
    assert pool.shards == pool_before.shards  # the pool's shards stay as written
    # the same pixels, now with the annotators' classes
    before = list(dataset.iter_shards(pool_before))  # the version before: every image
    for i in ids:
        (part,) = [p for p in before if i in p.ids]
        j = images.ids.index(i)
        assert torch.equal(images.images[j], part.images[part.ids.index(i)])
        assert CLASSES[images.labels[j]] == dict(answers)[i]
    # every reader of the pool skips them: the shards the teacher labels, the whole split
    seen = [i for s in range(3) for b in dataset.iter_shard_batches(pool, s, 64) for i in b.ids]
    assert len(seen) == 297 and not set(ids) & set(seen)


def test_the_truth_that_scores_pseudo_labels_leaves_out_the_images_that_left_the_pool(
    root, tmp_path
):
    ids = list(_truth(root).index[:4])
    annotations.take_labels(root, _csv(tmp_path / "l.csv", _answers(root, ids)))
    truth = dataset.unlabelled_truth(root, _split(root, dataset.UNLABELLED))
    assert len(truth) == 296 and not set(ids) & set(truth.index)


def _label_studio_task(task_id: int, image_id: str, *choices: str, cancelled=()) -> dict:
    """A task as Label Studio 1.23 exports it (JSON), trimmed to what matters."""
    return {
        "id": task_id,
        "data": {"image": "data:image/png;base64,AAAA", "image_id": image_id},
        "annotations": [
            {
                "id": 100 + task_id * 10 + n,
                "was_cancelled": n in cancelled,
                "result": [
                    {
                        "from_name": "label",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": [c]},
                    }
                ],
            }
            for n, c in enumerate(choices)
        ],
        "predictions": [],
    }


def test_a_label_studio_export_lands_its_answered_tasks(root, tmp_path):
    ids = list(_truth(root).index[:4])
    (a, ca), (b, cb), (c, cc), (d, _) = _answers(root, ids)
    export = [
        _label_studio_task(1, a, ca),
        _label_studio_task(2, b, cb, cb),  # two annotators who agree
        _label_studio_task(3, c, "Bag", cc, cancelled=(0,)),  # a skipped annotation
        {**_label_studio_task(4, d), "annotations": []},  # not annotated yet
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    taken = annotations.take_labels(root, str(path))
    assert (taken.added, taken.unanswered) == (3, 1)
    _, images = dataset.load(_split(root, dataset.LABELLED).url)
    got = {i: CLASSES[y] for i, y in zip(images.ids, images.labels.tolist(), strict=True)}
    assert {a: got[a], b: got[b], c: got[c]} == {a: ca, b: cb, c: cc} and d not in got


BAD_FILES = {
    "unknown class": (
        "csv",
        lambda ids: [(ids[0], "Shirt"), (ids[1], "Shrit")],
        r"labels\.csv: line 3: unknown class 'Shrit' \(classes: T-shirt/top, Trouser",
    ),
    "unknown id": (
        "csv",
        lambda ids: [(ids[0], "Shirt"), ("train-99999", "Bag")],
        r"labels\.csv: line 3: unknown id 'train-99999' \(not in unlabelled/\)",
    ),
    "an id labelled twice, two classes": (
        "csv",
        lambda ids: [(ids[0], "Shirt"), (ids[1], "Bag"), (ids[0], "Coat")],
        r"labels\.csv: line 4: id '{0}' labelled 'Coat' here and 'Shirt' at line 2",
    ),
    "a test image": (
        "csv",
        lambda ids: [(ids[0], "Shirt"), ("{test}", "Bag")],
        r"labels\.csv: line 3: id 'test-\d+' is in the test split; only unlabelled images take",
    ),
    "a validation image": (
        "csv",
        lambda ids: [(ids[0], "Shirt"), ("{validation}", "Bag")],
        r"labels\.csv: line 3: id 'train-\d+' is in the validation split; only unlabelled",
    ),
    "an image labelled already, with another class": (
        "csv",
        lambda ids: [(ids[0], "Shirt"), ("{labelled}", "{other}")],
        r"labels\.csv: line 3: id 'train-\d+' is already labelled '[^']+', not '[^']+' "
        r"\(labelled/ is never relabelled\)",
    ),
    "no class column": (
        "csv-header",
        lambda ids: [(ids[0], "Shirt")],
        r"labels\.csv: line 1: no column 'class' \(a CSV of labels has the columns id,class",
    ),
    "no id": ("csv", lambda ids: [("", "Shirt")], r"labels\.csv: line 2: no id"),
    "annotators disagree": (
        "json",
        lambda ids: [_label_studio_task(7, ids[0], "Shirt", "Coat")],
        r"labels\.json: task 1 \(Label Studio task 7\): id '{0}': annotators disagree "
        r"\(Coat, Shirt\); resolve it in Label Studio first",
    ),
    "a JSON_MIN export": (
        "json",
        lambda ids: [{"id": 7, "image_id": ids[0], "label": "Shirt"}],
        r"labels\.json: task 1: not a Label Studio task \(no 'data' object\)",
    ),
    "tasks not from a queue": (
        "json",
        lambda ids: [{"id": 7, "data": {"image": "x.png"}, "annotations": []}],
        r"labels\.json: task 1 \(Label Studio task 7\): no data\.image_id \(the tasks come from",
    ),
    "no annotations key": (
        "json",
        lambda ids: [{"id": 7, "data": {"image_id": ids[0]}}],
        r"labels\.json: task 1 \(Label Studio task 7\): no 'annotations' \(export the project "
        r"as JSON, not JSON_MIN or CSV\)",
    ),
    "not JSON": ("raw", lambda ids: "[{'id': 1}]", r"labels\.raw: not JSON: Expecting"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_row_is_a_one_line_error_naming_it_and_nothing_is_written(root, tmp_path, case):
    kind, rows, message = BAD_FILES[case]
    ids = list(_truth(root).index[:3])
    labelled = dataset.load(_split(root, dataset.LABELLED).url)[1]
    test_id = dataset.load(_split(root, dataset.TEST).url)[1].ids[0]
    validation_id = dataset.load(_split(root, dataset.VALIDATION).url)[1].ids[0]
    content = rows(ids)
    if kind.startswith("csv"):
        content = [
            tuple(
                v.format(
                    test=test_id,
                    validation=validation_id,
                    labelled=labelled.ids[0],
                    other=CLASSES[(labelled.labels[0] + 1) % 10],
                )
                for v in row
            )
            for row in content
        ]
        path = _csv(
            tmp_path / "labels.csv", content, "id,klass" if kind == "csv-header" else "id,class"
        )
    else:
        path = tmp_path / f"labels.{kind}"
        path.write_text(content if kind == "raw" else json.dumps(content))
    before = _files(root)
    with pytest.raises(UserError) as e:
        annotations.take_labels(root, str(path))
    assert "\n" not in str(e.value)
    assert re.search(message.format(re.escape(ids[0])), str(e.value)), str(e.value)
    assert _files(root) == before  # nothing written, not even a shard that no manifest names


def test_labels_already_taken_back_with_the_same_class_are_counted_not_added_again(root, tmp_path):
    ids = list(_truth(root).index[:3])
    first = _csv(tmp_path / "round-1.csv", _answers(root, ids))
    annotations.take_labels(root, first)
    # a Label Studio project's export holds every round's answers: round 2 repeats round 1's
    more = list(_truth(root).index[3:5])
    taken = annotations.take_labels(
        root, _csv(tmp_path / "round-2.csv", _answers(root, ids + more) + [(more[0], "")])
    )
    assert (taken.added, taken.already, taken.unanswered) == (2, 3, 1)
    assert _split(root, dataset.LABELLED).version == 3
    again = annotations.take_labels(root, first)
    assert (again.added, again.already) == (0, 3)
    assert _split(root, dataset.LABELLED).version == 3  # nothing new: no new version


def test_a_kill_between_the_claim_and_the_landing_is_finished_by_the_next_ingest(root, tmp_path):
    ids = list(_truth(root).index[:3])
    path = _csv(tmp_path / "labels.csv", _answers(root, ids))
    code = (
        "from noisy_student.labelling.annotations import take_labels; "
        f"take_labels({root!r}, {path!r})"
    )
    env = os.environ | {"NOISY_STUDENT_KILL_AT": "labels:land"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=300)
    assert done.returncode == -9  # SIGKILL, as `kill -9`
    pool, labelled = _split(root, dataset.UNLABELLED), _split(root, dataset.LABELLED)
    assert pool.removed_ids == set(ids) and labelled.version == 1  # in neither split for now
    # the same command again: nothing new to claim, the claim lands
    taken = annotations.take_labels(root, path)
    assert (taken.added, taken.already, taken.finished) == (0, 3, 3)
    _, images = dataset.load(_split(root, dataset.LABELLED).url)
    assert set(ids) <= set(images.ids) and len(images) == 53


def test_a_claim_killed_before_its_commit_leaves_a_file_that_only_gc_sees(root, tmp_path):
    from noisy_student.data import gc

    first = list(_truth(root).index[:2])
    annotations.take_labels(root, _csv(tmp_path / "a.csv", _answers(root, first)))
    ids = list(_truth(root).index[2:5])
    path = _csv(tmp_path / "labels.csv", _answers(root, ids))
    code = (
        "from noisy_student.labelling.annotations import take_labels; "
        f"take_labels({root!r}, {path!r})"
    )
    env = os.environ | {"NOISY_STUDENT_KILL_AT": "append:commit"}  # the claim's commit
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=300)
    assert done.returncode == -9
    pool = _split(root, dataset.UNLABELLED)
    assert pool.version == 2 and pool.removed_ids == set(first)  # the claim never happened
    folder = Path(root, dataset.UNLABELLED)
    (orphan,) = {p.name for p in folder.glob("removed-*")} - {r["file"] for r in pool.removed}
    found = gc.find_orphans(root, older_than=0)
    assert [o.url.rsplit("/", 1)[-1] for o in found] == [orphan]
    gc.remove(found)
    assert {p.name for p in folder.glob("removed-*")} == {r["file"] for r in pool.removed}
    assert _split(root, dataset.UNLABELLED) == pool


@pytest.mark.parametrize("overlap", [False, True])
def test_ingests_at_once_land_disjoint_labels_and_refuse_a_conflicting_one(root, tmp_path, overlap):
    pool = list(_truth(root).index)
    files = [
        _csv(tmp_path / "a.csv", _answers(root, pool[0:5])),
        _csv(
            tmp_path / "b.csv",
            ([(pool[0], "Bag" if _truth(root)[pool[0]] != 8 else "Coat")] if overlap else [])
            + _answers(root, pool[5:9]),
        ),
    ]
    start = Barrier(2)

    def ingest(path: str):
        start.wait()
        try:
            return annotations.take_labels(root, path)
        except UserError as e:
            return e

    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(ingest, files))
    _, images = dataset.load(_split(root, dataset.LABELLED).url)
    assert len(images.ids) == len(set(images.ids))
    if not overlap:
        assert [r.added for r in results] == [5, 4]
        assert set(pool[0:9]) <= set(images.ids)
    else:
        failed = [r for r in results if isinstance(r, UserError)]
        assert len(failed) == 1, results  # one of them wins pool[0], the other writes nothing
        assert pool[0] in images.ids
    assert _split(root, dataset.UNLABELLED).removed_ids == set(images.ids[50:])


# --- the command ------------------------------------------------------------------------


def test_ingest_labels_command_says_what_moved_and_that_no_server_heard_of_it(
    root, tmp_path, capsys, monkeypatch
):
    import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    ids = list(_truth(root).index[:4])
    path = _csv(tmp_path / "queue.csv", _answers(root, ids[:3]) + [(ids[3], "")])
    cli.main(["ingest", "labels", path, "--dataset", root])
    out = capsys.readouterr().out
    assert "labelled: version 1 -> 2: 3 images labelled, 53 in all" in out
    assert "unlabelled: version 1 -> 2: 3 images left the pool, 297 remain" in out
    assert "skipped 1 row(s) without a class" in out
    assert "PREFECT_API_URL is not set: no event emitted" in out
    cli.main(["ingest", "labels", path, "--dataset", root])  # the same file again
    out = capsys.readouterr().out
    assert "already labelled with the same class" in out and "nothing new: no event" in out


def test_ingest_labels_command_fails_in_one_line_and_exits_2(root, tmp_path, capsys):
    import cli

    path = _csv(tmp_path / "queue.csv", [(_truth(root).index[0], "Shrit")])
    with pytest.raises(SystemExit) as done:
        cli.main(["ingest", "labels", path, "--dataset", root, "--no-event"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert "queue.csv: line 2: unknown class 'Shrit'" in err


@pytest.mark.slow  # the session's Prefect test harness: 30 s to start
def test_labels_announced_leave_watch_nothing_to_announce(root, tmp_path, prefect_harness):
    from flows.deployments import watch_data
    from flows.events import LABELS_EVENT, announce_labels

    overrides = {"data.root": root}
    smoke = str(REPO / "pipeline_config" / "smoke.yaml")
    assert watch_data(smoke, overrides) is None  # the first look records version 1
    answers = _answers(root, list(_truth(root).index[:2]))
    taken = annotations.take_labels(root, _csv(tmp_path / "l.csv", answers))
    labelled, pool = taken.labelled[1], taken.unlabelled[1]
    event = announce_labels(root, labelled.state(), pool.state(), taken.added)
    assert event.event == LABELS_EVENT and event.payload["new_labels"] == 2
    assert event.payload["unlabelled"]["removed"] == 2
    # the pool's new version was announced with the labels: no second retrain from watch
    assert watch_data(smoke, overrides) is None
