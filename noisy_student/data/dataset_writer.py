"""Writing datasets: shards as rows arrive, the manifest last (see `dataset` for the format).

New images are appended as new shards under a new manifest version; earlier shards are
never rewritten, and images leave a split under a new version too (a `removed-*` file of
their ids). Appends may run at once: the version's manifest under `_manifests/` is created
only if that version does not exist yet, so exactly one writer gets each version and the
others rebase onto it (see `DatasetWriter.commit`).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from noisy_student.data import faults, storage
from noisy_student.data.dataset import (
    ENCODINGS,
    HISTORY,
    JPEG_QUALITY,
    MANIFEST,
    REMOVED_PREFIX,
    REMOVED_SCHEMA,
    ROW_GROUP_SIZE,
    SCHEMA,
    SCHEMA_VERSION,
    Manifest,
    read_ids,
    read_manifest,
    read_removed,
)
from noisy_student.errors import UserError


class ConcurrentChange(UserError):
    """Another writer committed the same ids first; nothing of this write was kept."""


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: photos keep their colour edges, and at 90 the files stay ~5x smaller
    # than PNG at 224 px
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_image(array: np.ndarray, encoding: str = "png", quality: int = JPEG_QUALITY) -> bytes:
    """PNG (lossless: small images, corrupted test sets) or JPEG (photos)."""
    if encoding == "png":
        return encode_png(array)
    if encoding == "jpeg":
        return encode_jpeg(array, quality)
    raise UserError(f"image encoding must be one of {list(ENCODINGS)}, not {encoding!r}")


class DatasetWriter:
    """Writes shards as rows arrive, then the manifest; use as a context manager.

    If the block raises, no manifest is written and the shards written so far are
    removed. `commit=False` leaves the manifest to a later `commit()`, so that several
    splits become visible together, once all of them are complete.
    With `base` (the current manifest) it appends: new shards after the existing ones,
    then the next manifest version; if the block raises, only the new shards are removed
    and the current version stays in force. `remove` makes rows of the base leave the
    split in that version.
    """

    def __init__(
        self,
        url: str,
        split: str,
        class_names: list[str],
        height: int,
        width: int,
        mode: str,
        rows_per_shard: int = 8192,
        extra: dict[str, Any] | None = None,
        base: Manifest | None = None,
        existing_ids: set[str] | None = None,
        encoding: str = "png",
        quality: int = JPEG_QUALITY,
    ):
        if encoding not in ENCODINGS:
            raise UserError(f"image encoding must be one of {list(ENCODINGS)}, not {encoding!r}")
        if not 1 <= quality <= 100:
            raise UserError(f"JPEG quality must be in [1, 100], not {quality}")
        self.url = storage.resolve(url)
        self.encoding, self.quality = encoding, quality
        self.split = split
        self.class_names = class_names
        self.height, self.width, self.mode = height, width, mode
        self.rows_per_shard = rows_per_shard
        self.extra = dict(extra or {})  # more manifest fields, e.g. the images skipped
        self.base = base
        self.version = base.version + 1 if base else 1
        # appended shards get a name of their own: writers racing from the same base version
        # must not overwrite each other's files
        self._suffix = f"-{uuid.uuid4().hex[:8]}" if base else ""
        self._pending: list[tuple[str, bytes, int | None]] = []
        self._shards: list[dict[str, Any]] = list(base.shards) if base else []
        self._first_new = len(self._shards)  # shards before this are the base's: never removed
        self._removed: list[dict[str, Any]] = list(base.removed) if base else []
        self._first_removed = len(self._removed)
        self._removing: dict[str, int | None] = {}  # ids leaving the split -> their class
        self._published = False  # whether a manifest version names the new shards
        self._existing: set[str] = existing_ids or set()
        self._ids: set[str] = set()
        self.labels_seen: set[int] = set()

    @property
    def added_rows(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> set[str]:
        """The ids this writer added."""
        return self._ids

    def __enter__(self) -> DatasetWriter:
        if self.base is None:
            # A manifest from an earlier write would vouch for shards we are about to
            # replace, and its later versions would be followed forward by readers.
            storage.remove(storage.join(self.url, MANIFEST))
            storage.remove(storage.join(self.url, HISTORY))
        storage.makedirs(self.url)
        return self

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self._shards) + len(self._pending)

    def add_array(self, id: str, array: np.ndarray, label: int | None) -> None:
        """An H x W (or H x W x 3) uint8 image, encoded as the dataset's images are."""
        self.add(id, encode_image(array, self.encoding, self.quality), label)

    def add(self, id: str, image: bytes, label: int | None) -> None:
        if id in self._existing:
            raise UserError(f"{self.url}: id {id!r} is already in the dataset")
        if id in self._ids:
            raise UserError(f"{self.url}: duplicate id {id!r}")
        if label is not None and not 0 <= label < len(self.class_names):
            raise UserError(
                f"{self.url}: id {id!r}: label {label} outside [0, {len(self.class_names)})"
            )
        self._ids.add(id)
        if label is not None:
            self.labels_seen.add(label)
        self._pending.append((id, image, label))
        if len(self._pending) >= self.rows_per_shard:
            self._flush()

    def remove(self, id: str, label: int | None = None) -> None:
        """Row `id` of the base leaves the split with this version; `label` is the class it
        was given (ids leaving the unlabelled pool for the labelled split)."""
        if self.base is None:
            raise ValueError("rows leave a split only in a later version (a writer with a base)")
        if id in self.base.removed_ids or id in self._removing:
            raise UserError(f"{self.url}: id {id!r} has already left the split")
        self._removing[id] = label

    def _write_removed(self) -> None:
        if not self._removing:
            return
        table = pa.table(
            {"id": list(self._removing), "label": list(self._removing.values())},
            schema=REMOVED_SCHEMA,
        )
        name = f"{REMOVED_PREFIX}{len(self._removed):05d}-{uuid.uuid4().hex[:8]}.parquet"
        sha256 = storage.write_parquet(storage.join(self.url, name), table, ROW_GROUP_SIZE * 64)
        self._removed.append({"file": name, "rows": table.num_rows, "sha256": sha256})

    def _flush(self) -> None:
        if not self._pending:
            return
        ids, images, labels = zip(*self._pending, strict=True)
        table = pa.table(
            {"id": list(ids), "image": list(images), "label": list(labels)}, schema=SCHEMA
        )
        name = f"part-{len(self._shards):05d}{self._suffix}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, compression="none")
        data = buf.getvalue()
        storage.write_bytes(storage.join(self.url, name), data)
        self._shards.append(
            {"file": name, "rows": len(ids), "sha256": hashlib.sha256(data).hexdigest()}
        )
        self._pending = []

    def abort(self) -> None:
        """Remove the shards written so far: without a manifest nobody reads them anyway."""
        for s in self._shards[self._first_new :] + self._removed[self._first_removed :]:
            storage.remove(storage.join(self.url, s["file"]))
        self._shards, self._pending = self._shards[: self._first_new], []
        self._removed = self._removed[: self._first_removed]

    def _manifest(self) -> dict[str, Any]:
        files = self._shards + self._removed
        digest = hashlib.sha256("".join(s["sha256"] for s in files).encode())
        return {
            "format": "noisy-student-dataset",
            "schema_version": SCHEMA_VERSION,
            "version": self.version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "split": self.split,
            "num_rows": sum(s["rows"] for s in self._shards),
            "class_names": self.class_names,
            "image": {
                "height": self.height,
                "width": self.width,
                "mode": self.mode,
                "encoding": self.encoding,
                **({"quality": self.quality} if self.encoding == "jpeg" else {}),
            },
            "shards": self._shards,
            **({"removed": self._removed} if self._removed else {}),
            "digest": digest.hexdigest(),
            **self.extra,
        }

    def commit(self) -> None:
        """Publish the shards: the version's own manifest under `_manifests/`, then
        `_manifest.json`.

        A new dataset simply writes version 1. An append creates its version's file only
        if no other writer has: when another append got there first, this one checks that
        none of its ids arrived meanwhile, puts its shards after theirs and tries the next
        version. So concurrent appends all land, in some order, and none is lost.
        """
        self._flush()
        self._write_removed()
        faults.kill_point("append:commit" if self.base else "write:commit")
        if self.base is None:
            manifest = self._manifest()
            storage.write_json(
                storage.join(self.url, HISTORY, f"{self.version:05d}.json"), manifest
            )
        else:
            while True:
                manifest = self._manifest()
                url = storage.join(self.url, HISTORY, f"{self.version:05d}.json")
                if storage.create_bytes(url, storage.json_bytes(manifest)):
                    # readers follow `_manifests/` forward: the append is in from here
                    self._published = True
                    break
                self._rebase(storage.read_json(url))
        # a lagging or out-of-order `_manifest.json` loses nothing: readers follow
        # `_manifests/` forward from it
        storage.write_json(storage.join(self.url, MANIFEST), manifest)
        self._published = True

    def _rebase(self, theirs: dict[str, Any]) -> None:
        """Another append committed version `self.version` first: go after it."""
        known, known_removed = self._first_new, self._first_removed
        their_removed = theirs.get("removed", [])
        if (
            theirs["shards"][:known] != self._shards[:known]
            or their_removed[:known_removed] != self._removed[:known_removed]
        ):
            self.abort()
            raise UserError(f"{self.url}: version {theirs['version']} rewrote earlier shards")
        for shard in theirs["shards"][known:]:
            ids = storage.read_parquet(storage.join(self.url, shard["file"]), ["id"])
            self._refuse_clash(self._ids, ids.column("id").to_pylist(), theirs, "appended")
        taken = read_removed(self.url, their_removed[known_removed:])["id"]
        self._refuse_clash(self._removing.keys(), taken, theirs, "taken out of the split")
        self._shards = [*theirs["shards"], *self._shards[known:]]
        self._removed = [*their_removed, *self._removed[known_removed:]]
        self._first_new, self._first_removed = len(theirs["shards"]), len(their_removed)
        self.version = theirs["version"] + 1

    def _refuse_clash(
        self, ours: Iterable[str], theirs: Iterable[str], manifest: dict[str, Any], what: str
    ) -> None:
        clash = set(ours).intersection(theirs)
        if clash:
            self.abort()
            raise ConcurrentChange(
                f"{self.url}: id {min(clash)!r} was {what} by another writer meanwhile"
                f" (version {manifest['version']}); nothing written"
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            if not self._published:  # no manifest names the new shards: remove them
                self.abort()
            raise


def stage_rows(
    url: str,
    split: str,
    class_names: list[str],
    rows: Iterable[tuple[str, np.ndarray, int | None]],
    rows_per_shard: int = 8192,
    extra: Callable[[], dict[str, Any]] | None = None,
    encoding: str = "png",
    quality: int = JPEG_QUALITY,
    existing_ids: set[str] | None = None,
) -> DatasetWriter:
    """Encode arrays (H x W or H x W x 3, uint8) as PNG or JPEG and write the shards of a
    dataset; its manifest waits for the writer's `commit()`. On an error the shards written
    so far are removed. `extra` gives more manifest fields once the rows are consumed; an
    id among `existing_ids` (other splits') is refused."""
    writer: DatasetWriter | None = None
    try:
        for id, array, label in rows:
            if writer is None:
                mode = "L" if array.ndim == 2 else "RGB"
                writer = DatasetWriter(
                    url,
                    split,
                    class_names,
                    array.shape[0],
                    array.shape[1],
                    mode,
                    rows_per_shard,
                    existing_ids=existing_ids,
                    encoding=encoding,
                    quality=quality,
                ).__enter__()
            writer.add_array(id, array, label)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise UserError(f"{storage.resolve(url)}: no images to write for split {split!r}")
    if extra is not None:
        writer.extra.update(extra())
    return writer


def write_rows(
    url: str,
    split: str,
    class_names: list[str],
    rows: Iterable[tuple[str, np.ndarray, int | None]],
    rows_per_shard: int = 8192,
) -> Manifest:
    """Encode arrays as PNG and write a dataset, manifest included."""
    stage_rows(url, split, class_names, rows, rows_per_shard).commit()
    return read_manifest(url)


def append_rows(
    url: str,
    rows: Iterable[tuple[str, np.ndarray, int | None]],
    rows_per_shard: int = 8192,
    extra: Callable[[], dict[str, Any]] | None = None,
    taken_ids: set[str] | None = None,
) -> Manifest:
    """Add images to an existing dataset as new shards and a new manifest version.

    Earlier shards are not touched. Every image must match the dataset's size and mode,
    and every id must be new, to this dataset and to `taken_ids` (other splits' ids):
    appending the same batch twice is refused. `extra` gives more fields of the new
    manifest once the rows are consumed.
    """
    base = read_manifest(url)
    shape = (base.height, base.width) if base.channels == 1 else (base.height, base.width, 3)
    writer = DatasetWriter(
        url,
        base.split,
        base.class_names,
        base.height,
        base.width,
        base.mode,
        rows_per_shard,
        base=base,
        existing_ids=read_ids(base) | (taken_ids or set()),
        encoding=base.encoding,
        quality=base.quality,
    )
    with writer:
        for id, array, label in rows:
            if array.shape != shape:
                raise UserError(
                    f"{url}: id {id!r}: image of shape {array.shape}, the dataset holds {shape}"
                )
            writer.add_array(id, array, label)
        if writer.added_rows == 0:
            raise UserError(f"{url}: no images to append")
        if extra is not None:
            writer.extra.update(extra())
    return read_manifest(url)
