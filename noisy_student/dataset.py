"""The dataset format: Parquet shards of encoded images plus a manifest written last.

A dataset is a folder at any fsspec URL holding `part-*.parquet` shards (columns `id`,
`image` as PNG bytes, `label` as int or null) and `_manifest.json`. Readers trust the
manifest, never a listing, so a half-written folder is never read: if the manifest is
missing the dataset does not exist yet.

New images are appended as new shards under a new manifest version; earlier shards are
never rewritten, so shard i means the same images in every version, and every version's
manifest stays readable under `_manifests/`. Appends may run at once: the version's
manifest there is created only if that version does not exist yet, so exactly one writer
gets each version and the others rebase onto it (see `DatasetWriter.commit`). Readers
start from `_manifest.json` and follow `_manifests/` forward to the newest version.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from noisy_student import storage
from noisy_student.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
HISTORY = "_manifests"  # every version's manifest, as written: 00001.json, 00002.json, …
ROW_GROUP_SIZE = 1024  # rows, not bytes: small images, so ~1 MB groups
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int32())])

# The standard splits of a dataset root, as `noisy-student ingest` writes them.
LABELLED, UNLABELLED, TEST = "labelled", "unlabelled", "test"
UNLABELLED_TRUTH = "unlabelled_truth.parquet"


@dataclass(frozen=True)
class Manifest:
    url: str
    split: str
    num_rows: int
    class_names: list[str]
    height: int
    width: int
    mode: str
    shards: list[dict[str, Any]]
    digest: str
    version: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def shard_urls(self) -> list[str]:
        return [storage.join(self.url, s["file"]) for s in self.shards]

    def state(self) -> dict[str, Any]:
        """What tells one version from another, small enough for an event payload."""
        return {
            "version": self.version,
            "rows": self.num_rows,
            "shards": len(self.shards),
            "digest": self.digest,
        }


@dataclass
class ImageSet:
    """Decoded images held in memory: uint8 N x C x H x W, labels -1 where unknown."""

    ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class DatasetWriter:
    """Writes shards as rows arrive, then the manifest; use as a context manager.

    If the block raises, no manifest is written and the shards written so far are
    removed. `commit=False` leaves the manifest to a later `commit()`, so that several
    splits become visible together, once all of them are complete.
    With `base` (the current manifest) it appends: new shards after the existing ones,
    then the next manifest version; if the block raises, only the new shards are removed
    and the current version stays in force.
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
    ):
        self.url = storage.resolve(url)
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
        self._published = False  # whether a manifest version names the new shards
        self._existing: set[str] = existing_ids or set()
        self._ids: set[str] = set()
        self.labels_seen: set[int] = set()

    @property
    def added_rows(self) -> int:
        return len(self._ids)

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
        for s in self._shards[self._first_new :]:
            storage.remove(storage.join(self.url, s["file"]))
        self._shards, self._pending = self._shards[: self._first_new], []

    def _manifest(self) -> dict[str, Any]:
        digest = hashlib.sha256("".join(s["sha256"] for s in self._shards).encode())
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
                "encoding": "png",
            },
            "shards": self._shards,
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
        known = self._first_new
        if theirs["shards"][:known] != self._shards[:known]:
            self.abort()
            raise UserError(f"{self.url}: version {theirs['version']} rewrote earlier shards")
        for shard in theirs["shards"][known:]:
            ids = storage.read_parquet(storage.join(self.url, shard["file"]), ["id"])
            clash = self._ids.intersection(ids.column("id").to_pylist())
            if clash:
                self.abort()
                raise UserError(
                    f"{self.url}: id {min(clash)!r} was appended by another writer meanwhile"
                    f" (version {theirs['version']}); nothing appended"
                )
        ours = self._shards[known:]
        self._shards = [*theirs["shards"], *ours]
        self._first_new = len(theirs["shards"])
        self.version = theirs["version"] + 1

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


def read_manifest(url: str) -> Manifest:
    url = storage.resolve(url)
    manifest_url = storage.join(url, MANIFEST)
    if not storage.exists(manifest_url):
        raise UserError(f"{url}: no dataset here ({MANIFEST} missing)")
    m = storage.read_json(manifest_url)
    # `_manifest.json` may lag behind a concurrent append's version: follow the history
    while storage.exists(
        later := storage.join(url, HISTORY, f"{m.get('version', 1) + 1:05d}.json")
    ):
        m = storage.read_json(later)
    if m.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{manifest_url}: unsupported schema_version {m.get('schema_version')}")
    img = m["image"]
    return Manifest(
        url=url,
        split=m["split"],
        num_rows=m["num_rows"],
        class_names=m["class_names"],
        height=img["height"],
        width=img["width"],
        mode=img["mode"],
        shards=m["shards"],
        digest=m["digest"],
        version=m.get("version", 1),
    )


def read_shard(manifest: Manifest, index: int) -> pa.Table:
    """One shard, checked against the manifest's row count and checksum."""
    entry = manifest.shards[index]
    url = storage.join(manifest.url, entry["file"])
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"{url}: shard listed in the manifest is missing") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{url}: checksum does not match the manifest")
    table = pq.read_table(io.BytesIO(data))
    if table.num_rows != entry["rows"]:
        raise UserError(f"{url}: {table.num_rows} rows, manifest says {entry['rows']}")
    return table


def decode_images(
    manifest: Manifest, shard_url: str, table: pa.Table | pa.RecordBatch, first_row: int = 0
) -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 N x C x H x W, checking every image against the manifest.
    `first_row` is the table's offset in the shard, for error messages."""
    ids = table.column("id").to_pylist()
    out = np.empty(
        (table.num_rows, manifest.height, manifest.width, manifest.channels), dtype=np.uint8
    )
    for i, blob in enumerate(table.column("image").to_pylist()):
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except (UnidentifiedImageError, OSError, TypeError) as e:
            raise UserError(
                f"{shard_url}: row {first_row + i} (id {ids[i]!r}): corrupt image: {e}"
            ) from None
        if img.size != (manifest.width, manifest.height) or img.mode != manifest.mode:
            raise UserError(
                f"{shard_url}: row {first_row + i} (id {ids[i]!r}): image is {img.mode} "
                f"{img.size[0]}x{img.size[1]}, manifest says {manifest.mode} "
                f"{manifest.width}x{manifest.height}"
            )
        arr = np.asarray(img)
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def labels_of(
    manifest: Manifest, shard_url: str, table: pa.Table | pa.RecordBatch, first_row: int = 0
) -> torch.Tensor:
    labels = table.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero((labels < -1) | (labels >= manifest.num_classes))
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"{shard_url}: row {first_row + i} (id {table.column('id')[i].as_py()!r}): label "
            f"{labels[i]} outside [0, {manifest.num_classes})"
        )
    return torch.from_numpy(labels)


def iter_shard_batches(
    manifest: Manifest, index: int, batch_size: int, pin_memory: bool = False
) -> Iterator[ImageSet]:
    """One shard as decoded batches of `batch_size` rows (the last may be smaller), in
    constant memory whatever the shard's size: the file is checksummed in one chunked pass
    (remote files are spooled to a local temporary file as they are hashed), then read
    row group by row group. `pin_memory` pins each batch for asynchronous copies to a GPU."""
    entry = manifest.shards[index]
    url = storage.join(manifest.url, entry["file"])
    with ExitStack() as stack:
        try:
            path, sha256 = stack.enter_context(storage.local_copy(url))
        except FileNotFoundError:
            raise UserError(f"{url}: shard listed in the manifest is missing") from None
        if sha256 != entry["sha256"]:
            raise UserError(f"{url}: checksum does not match the manifest")
        # no pre-buffering (it would read far ahead) and no reader threads (row groups are
        # small, and decoding already runs beside the consumer): memory stays a few row groups
        parquet = stack.enter_context(pq.ParquetFile(path, pre_buffer=False))
        if parquet.metadata.num_rows != entry["rows"]:
            raise UserError(
                f"{url}: {parquet.metadata.num_rows} rows, manifest says {entry['rows']}"
            )
        pending: list[pa.RecordBatch] = []
        buffered, row = 0, 0

        def emit(table: pa.Table) -> ImageSet:
            images = decode_images(manifest, url, table, row)
            return ImageSet(
                ids=table.column("id").to_pylist(),
                images=images.pin_memory() if pin_memory else images,
                labels=labels_of(manifest, url, table, row),
            )

        # row groups need not line up with batches: regroup them into batch_size rows
        columns = SCHEMA.names
        for batch in parquet.iter_batches(batch_size, columns=columns, use_threads=False):
            pending.append(batch)
            buffered += batch.num_rows
            while buffered >= batch_size:
                table = pa.Table.from_batches(pending)
                yield emit(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending, buffered, row = rest.to_batches(), rest.num_rows, row + batch_size
        if buffered:
            yield emit(pa.Table.from_batches(pending))


T = TypeVar("T")
_END = object()


class prefetch(Iterator[T]):  # noqa: N801 - used like a function: `for x in prefetch(items)`
    """Iterate over `items` produced up to `depth` ahead in a background thread, which starts
    at once: producing them (reading and decoding, mostly in C) overlaps whatever the caller
    does meanwhile (loading a model, a forward pass; both release the GIL). Errors surface in
    the consumer; `close()` (or leaving a `with` block) stops and closes the producer."""

    def __init__(self, items: Iterable[T], depth: int = 2):
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._worker = threading.Thread(
            target=self._produce, args=(items,), name="prefetch", daemon=True
        )
        self._worker.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        source = iter(items)
        try:
            for item in source:
                if not self._put((item, None)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((_END, e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        item, error = self._ready.get()
        if item is _END:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def iter_shards(manifest: Manifest) -> Iterator[ImageSet]:
    for index, url in enumerate(manifest.shard_urls()):
        yield load_shard(manifest, index, url)


def load_shard(manifest: Manifest, index: int, url: str | None = None) -> ImageSet:
    url = url or manifest.shard_urls()[index]
    table = read_shard(manifest, index)
    return ImageSet(
        ids=table.column("id").to_pylist(),
        images=decode_images(manifest, url, table),
        labels=labels_of(manifest, url, table),
    )


def load(url: str) -> tuple[Manifest, ImageSet]:
    """The whole split in memory; small-image datasets fit easily (60k x 28x28 = 47 MB)."""
    manifest = read_manifest(url)
    parts = list(iter_shards(manifest))
    if not parts:
        return manifest, ImageSet(
            [],
            torch.empty(0, manifest.channels, manifest.height, manifest.width, dtype=torch.uint8),
            torch.empty(0, dtype=torch.int64),
        )
    return manifest, ImageSet(
        ids=[i for p in parts for i in p.ids],
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
    )


def require_labels(manifest: Manifest, images: ImageSet) -> None:
    missing = (images.labels < 0).nonzero()
    if len(missing):
        i = int(missing[0])
        raise UserError(f"{manifest.url}: id {images.ids[i]!r} has no label")
    present = set(images.labels.unique().tolist())
    absent = [n for c, n in enumerate(manifest.class_names) if c not in present]
    if absent:
        raise UserError(f"{manifest.url}: no labelled image for class {absent[0]!r}")


def stage_rows(
    url: str,
    split: str,
    class_names: list[str],
    rows: Iterable[tuple[str, np.ndarray, int | None]],
    rows_per_shard: int = 8192,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> DatasetWriter:
    """Encode arrays (H x W or H x W x 3, uint8) as PNG and write the shards of a dataset;
    its manifest waits for the writer's `commit()`. On an error the shards written so far
    are removed. `extra` gives more manifest fields once the rows are consumed."""
    writer: DatasetWriter | None = None
    try:
        for id, array, label in rows:
            if writer is None:
                mode = "L" if array.ndim == 2 else "RGB"
                writer = DatasetWriter(
                    url, split, class_names, array.shape[0], array.shape[1], mode, rows_per_shard
                ).__enter__()
            writer.add(id, encode_png(array), label)
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


def read_ids(manifest: Manifest) -> set[str]:
    return {
        i
        for url in manifest.shard_urls()
        for i in storage.read_parquet(url, columns=["id"]).column("id").to_pylist()
    }


def append_rows(
    url: str, rows: Iterable[tuple[str, np.ndarray, int | None]], rows_per_shard: int = 8192
) -> Manifest:
    """Add images to an existing dataset as new shards and a new manifest version.

    Earlier shards are not touched. Every image must match the dataset's size and mode,
    and every id must be new: appending the same batch twice is refused.
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
        existing_ids=read_ids(base),
    )
    with writer:
        for id, array, label in rows:
            if array.shape != shape:
                raise UserError(
                    f"{url}: id {id!r}: image of shape {array.shape}, the dataset holds {shape}"
                )
            writer.add(id, encode_png(array), label)
        if writer.added_rows == 0:
            raise UserError(f"{url}: no images to append")
    return read_manifest(url)
