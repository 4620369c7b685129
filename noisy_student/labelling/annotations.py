"""Labels taken back from annotators: `noisy-student ingest labels FILE --dataset URL`.

The file is a Label Studio JSON export (the tasks of a label queue, see `label_queue`, with
their annotations) or a CSV with the columns `id` and `class` (others are ignored, so the
queue's own CSV, filled in, goes back as it is). Every row is checked before anything is
written; each problem is a one-line error naming the row.

How the images move, in two commits, each atomic and safe beside concurrent writers:

1. **The claim**: a new version of `unlabelled/` names the ids that leave the pool and the
   class each was given (a `removed-*` file; see `dataset`). From that version on, every
   reader of the unlabelled split skips them. Two ingests claiming the same id: one wins,
   the other writes nothing and says so.
2. **The landing**: the claimed images, their bytes copied from the unlabelled shards, are
   appended to `labelled/` as a new version.

Between the two, an image is in neither split, never in both. Whatever claim has not
landed (a killed ingest) is landed by the next `ingest labels` on the dataset, from the
claim itself, so a rerun of the same command finishes the job.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from noisy_student.data import dataset, faults, storage
from noisy_student.data.dataset import Manifest, read_manifest, read_removed
from noisy_student.data.dataset_writer import ConcurrentChange, DatasetWriter, encode_image
from noisy_student.errors import UserError
from noisy_student.labelling.label_queue import TASK_ID_KEY

LANDING_ATTEMPTS = 10


@dataclass(frozen=True)
class Answer:
    """One row of an annotators' file: where it is (for errors), the image, its class."""

    where: str  # "line 3", "task 2 (Label Studio task 41)"
    id: str
    label: int | None  # None: the annotator gave no class (skipped, cancelled)


@dataclass(frozen=True)
class LabelsTaken:
    labelled: tuple[Manifest, Manifest]  # before, after
    unlabelled: tuple[Manifest, Manifest]
    added: int  # images of this file now labelled
    already: int  # rows whose image was already labelled with the same class
    unanswered: int  # rows without a class
    finished: int  # images of an earlier, interrupted ingest landed by this one


def read_answers(url: str, class_names: list[str]) -> list[Answer]:
    """The rows of a Label Studio JSON export or an `id,class` CSV, by the file's content."""
    try:
        text = storage.read_bytes(url).decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{url}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{url}: not a text file (UTF-8)") from None
    if text.lstrip().startswith("["):
        return list(_label_studio_answers(url, text, class_names))
    return list(_csv_answers(url, text, class_names))


def _class_index(url: str, where: str, name: Any, class_names: list[str]) -> int:
    if isinstance(name, str) and name in class_names:
        return class_names.index(name)
    shown = ", ".join(class_names[:12]) + (", …" if len(class_names) > 12 else "")
    raise UserError(f"{url}: {where}: unknown class {_short(name)} (classes: {shown})")


def _short(value: Any) -> str:
    return repr(" ".join(str(value).split())[:60])


def _csv_answers(url: str, text: str, class_names: list[str]) -> Iterator[Answer]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("id", "class") if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(
            f"{url}: line 1: no column {missing[0]!r} (a CSV of labels has the columns id,class;"
            " a Label Studio export is a JSON list)"
        )
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            id, name = (row["id"] or "").strip(), (row["class"] or "").strip()
            if not id:
                raise UserError(f"{url}: {where}: no id")
            label = _class_index(url, where, name, class_names) if name else None
            yield Answer(where, id, label)
    except csv.Error as e:
        raise UserError(f"{url}: line {reader.line_num}: not CSV: {e}") from None


def _label_studio_answers(url: str, text: str, class_names: list[str]) -> Iterator[Answer]:
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{url}: not JSON: {e.msg} at line {e.lineno}") from None
    for n, task in enumerate(tasks, start=1):
        where = f"task {n}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise UserError(f"{url}: {where}: not a Label Studio task (no 'data' object)")
        if "id" in task:
            where += f" (Label Studio task {task['id']})"
        id = task["data"].get(TASK_ID_KEY)
        if not isinstance(id, str) or not id:
            raise UserError(
                f"{url}: {where}: no data.{TASK_ID_KEY} (the tasks come from a label queue's "
                "label_studio_tasks.json)"
            )
        if "annotations" not in task:
            raise UserError(
                f"{url}: {where}: no 'annotations' (export the project as JSON, not JSON_MIN "
                "or CSV)"
            )
        chosen = set()
        for a in task["annotations"] or []:
            if not isinstance(a, dict) or a.get("was_cancelled"):
                continue  # the annotator skipped the task
            choices = [
                c
                for r in a.get("result") or []
                if isinstance(r, dict) and r.get("type") == "choices"
                for c in (r.get("value") or {}).get("choices") or []
            ]
            if len(choices) > 1:
                raise UserError(
                    f"{url}: {where}: annotation {a.get('id')} chooses {len(choices)} classes "
                    f"({', '.join(map(str, choices))}); one image takes one class"
                )
            chosen.update(choices)
        if len(chosen) > 1:
            raise UserError(
                f"{url}: {where}: id {id!r}: annotators disagree ({', '.join(sorted(chosen))}); "
                "resolve it in Label Studio first"
            )
        label = _class_index(url, where, chosen.pop(), class_names) if chosen else None
        yield Answer(where, id, label)


def _labels(manifest: Manifest) -> dict[str, int]:
    """Id -> class of every row of a labelled split."""
    out: dict[str, int] = {}
    for url in manifest.shard_urls():
        table = storage.read_parquet(url, columns=["id", "label"])
        ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
        out.update(zip(ids, labels, strict=True))
    return out


def _claims(unlabelled: Manifest) -> dict[str, int]:
    """Id -> class of every image that left the unlabelled pool with a class."""
    removed = read_removed(unlabelled.url, unlabelled.removed)
    return {i: c for i, c in zip(removed["id"], removed["label"], strict=True) if c is not None}


def _other_splits(root: str) -> dict[str, set[str]]:
    """The ids of the splits that never take labels back: test, and validation if any."""
    out = {}
    for split in (dataset.TEST, dataset.VALIDATION):
        url = storage.join(root, split)
        if storage.exists(storage.join(url, dataset.MANIFEST)):
            out[split] = dataset.read_ids(read_manifest(url))
    return out


def _check_images_can_move(root: str, labelled: Manifest, unlabelled: Manifest) -> None:
    if (labelled.height, labelled.width, labelled.mode) != (
        unlabelled.height,
        unlabelled.width,
        unlabelled.mode,
    ):
        raise UserError(
            f"{root}: labelled images are {labelled.mode} {labelled.width}x{labelled.height}, "
            f"unlabelled {unlabelled.mode} {unlabelled.width}x{unlabelled.height}: they cannot "
            "move between the splits"
        )
    if labelled.class_names != unlabelled.class_names:
        raise UserError(f"{root}: the labelled and unlabelled splits name other classes")


@dataclass
class _SortedAnswers:
    new: dict[str, int] = field(default_factory=dict)  # class by id: to claim and land
    already: int = 0  # labelled before (or on the way there), with the same class
    unanswered: int = 0


def _sort_answers(
    answers: list[Answer], answers_url: str, root: str, labelled: Manifest, unlabelled: Manifest
) -> _SortedAnswers:
    """The new labels among the answers; an answer that contradicts another, a label
    already given, or the split its image is in is a one-line error naming its row."""
    known = _labels(labelled) | _claims(unlabelled)  # labelled, or on the way there
    pool = dataset.read_ids(unlabelled) - unlabelled.removed_ids
    elsewhere = _other_splits(root)
    first: dict[str, Answer] = {}
    out = _SortedAnswers()
    for a in answers:
        if a.label is None:
            out.unanswered += 1
            continue
        name = labelled.class_names[a.label]
        if a.id in first:
            if first[a.id].label != a.label:
                earlier = labelled.class_names[first[a.id].label]
                raise UserError(
                    f"{answers_url}: {a.where}: id {a.id!r} labelled {name!r} here and "
                    f"{earlier!r} at {first[a.id].where}"
                )
            continue
        first[a.id] = a
        for split, ids in elsewhere.items():
            if a.id in ids:
                raise UserError(
                    f"{answers_url}: {a.where}: id {a.id!r} is in the {split} split; only "
                    "unlabelled images take labels"
                )
        if a.id in known:
            if known[a.id] != a.label:
                raise UserError(
                    f"{answers_url}: {a.where}: id {a.id!r} is already labelled "
                    f"{labelled.class_names[known[a.id]]!r}, not {name!r} (labelled/ is "
                    "never relabelled)"
                )
            out.already += 1
            continue
        if a.id not in pool:
            raise UserError(f"{answers_url}: {a.where}: unknown id {a.id!r} (not in unlabelled/)")
        out.new[a.id] = a.label
    return out


def take_labels(root: str, answers_url: str) -> LabelsTaken:
    """Check every row of the annotators' file at `answers_url`, claim the newly labelled
    images from the unlabelled pool of the dataset at `root`, and land them (with any
    claim an interrupted ingest left) in its labelled split."""
    root, answers_url = storage.resolve(root), storage.resolve(answers_url)
    labelled = read_manifest(storage.join(root, dataset.LABELLED))
    unlabelled = read_manifest(storage.join(root, dataset.UNLABELLED))
    _check_images_can_move(root, labelled, unlabelled)
    answers = read_answers(answers_url, labelled.class_names)
    sorted_answers = _sort_answers(answers, answers_url, root, labelled, unlabelled)
    new = sorted_answers.new
    after_claim = _claim(unlabelled, new) if new else unlabelled
    faults.kill_point("labels:land")
    landed, labelled_after = _land(root)
    return LabelsTaken(
        labelled=(labelled, labelled_after),
        unlabelled=(unlabelled, after_claim),
        added=len(new),
        already=sorted_answers.already,
        unanswered=sorted_answers.unanswered,
        finished=len(landed - new.keys()),
    )


def _claim(unlabelled: Manifest, labels: dict[str, int]) -> Manifest:
    """The new unlabelled version without these images (commit 1)."""
    with _writer(unlabelled, unlabelled.url) as writer:
        for id, label in labels.items():
            writer.remove(id, label)
    return read_manifest(unlabelled.url)


def _writer(like: Manifest, url: str, existing_ids: set[str] | None = None) -> DatasetWriter:
    """A writer of the next version of the split at `url` (whose manifest is `like`)."""
    return DatasetWriter(
        url,
        like.split,
        like.class_names,
        like.height,
        like.width,
        like.mode,
        base=like,
        existing_ids=existing_ids,
        encoding=like.encoding,
        quality=like.quality,
    )


def _land(root: str) -> tuple[set[str], Manifest]:
    """Append every claimed image not yet in labelled/ to it (commit 2); returns the ids
    this call landed and the labelled manifest after. Another ingest landing the same claims at once
    makes one of the two appends fail before its commit: it then looks again."""
    for _ in range(LANDING_ATTEMPTS):
        unlabelled = read_manifest(storage.join(root, dataset.UNLABELLED))
        labelled = read_manifest(storage.join(root, dataset.LABELLED))
        landed = dataset.read_ids(labelled)
        pending = {i: c for i, c in _claims(unlabelled).items() if i not in landed}
        if not pending:
            return set(), labelled
        try:
            with _writer(labelled, labelled.url, landed) as writer:
                for id, image in _images(unlabelled, labelled, pending):
                    writer.add(id, image, pending[id])
        except ConcurrentChange:
            continue
        return set(pending), read_manifest(labelled.url)
    raise UserError(f"{root}: labelled/ still contended after {LANDING_ATTEMPTS} attempts")


def _images(
    unlabelled: Manifest, labelled: Manifest, wanted: dict[str, int]
) -> Iterator[tuple[str, bytes]]:
    """The stored bytes of the `wanted` images, shard by shard; encoded again only where
    the labelled split stores another encoding."""
    found = 0
    for index, url in enumerate(unlabelled.shard_urls()):
        ids = storage.read_parquet(url, columns=["id"]).column("id").to_pylist()
        rows = [k for k, i in enumerate(ids) if i in wanted]
        if not rows:
            continue
        table = dataset.read_shard(unlabelled, index).take(pa.array(rows))
        if labelled.encoding == unlabelled.encoding:
            images = table.column("image").to_pylist()
        else:
            arrays = dataset.decode_images(unlabelled, url, table).permute(0, 2, 3, 1).numpy()
            images = [
                encode_image(
                    a[..., 0] if a.shape[-1] == 1 else a, labelled.encoding, labelled.quality
                )
                for a in arrays
            ]
        yield from zip(table.column("id").to_pylist(), images, strict=True)
        found += len(rows)
    if found != len(wanted):
        raise UserError(f"{unlabelled.url}: {len(wanted) - found} claimed image(s) missing")
