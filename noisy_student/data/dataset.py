"""The dataset format: Parquet shards of encoded images plus a manifest written last.

A dataset is a folder at any fsspec URL holding `part-*.parquet` shards (columns `id`,
`image` as PNG or JPEG bytes, as the manifest's `image.encoding` says, `label` as int or
null) and `_manifest.json`. Readers trust the manifest, never a listing, so a half-written
folder is never read: if the manifest is missing the dataset does not exist yet.

New images are appended as new shards under a new manifest version; earlier shards are
never rewritten, so shard i means the same images in every version, and every version's
manifest stays readable under `_manifests/`. Images leave a split the same way: a version
may name `removed-*.parquet` files listing ids (and the class each was given, when they
left the unlabelled pool for the labelled split), and readers skip those rows from that
version on, as a table format's delete files do; the shards holding them stay as written.

Appends may run at once: the version's manifest there is created only if that version does
not exist yet, so exactly one writer gets each version and the others rebase onto it (see
`dataset_writer.DatasetWriter.commit`). Readers start from `_manifest.json` and follow
`_manifests/` forward to the newest version.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re
import struct
import zlib
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyspng
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from noisy_student.data import prefetch, storage
from noisy_student.errors import UserError

if TYPE_CHECKING:  # pyarrow's to_pandas imports it where a truth is read, not every reader
    import pandas as pd

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
HISTORY = "_manifests"  # every version's manifest, as written: 00001.json, 00002.json, …
ROW_GROUP_SIZE = 1024  # rows, not bytes: small images, so ~1 MB groups
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int32())])
ENCODINGS = ("png", "jpeg")  # the manifest's image.encoding: lossless small images, or photos
JPEG_QUALITY = 90

# The standard splits of a dataset root, as `noisy-student ingest` writes them. Validation
# is optional and labelled: every choice a run makes is made on it; test is only reported.
LABELLED, UNLABELLED, TEST, VALIDATION = "labelled", "unlabelled", "test", "validation"
SPLITS = (LABELLED, UNLABELLED, TEST, VALIDATION)
UNLABELLED_TRUTH = "unlabelled_truth.parquet"
REMOVED_PREFIX = "removed-"  # files of ids that left a split: `Manifest.removed_ids`
REMOVED_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int32())])


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
    encoding: str = "png"
    quality: int = JPEG_QUALITY  # of JPEG shards; what appended images are encoded at
    # files listing the ids that left the split (up to this version), and those ids: their
    # rows stay in the shards, and every reader here skips them
    removed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    removed_ids: frozenset[str] = frozenset()

    @property
    def visible_rows(self) -> int:
        """The rows readers see: those of the shards, less the ids that left the split."""
        return self.num_rows - len(self.removed_ids)

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
            "removed": len(self.removed_ids),
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


class _Image(BaseModel):
    height: StrictInt = Field(gt=0)
    width: StrictInt = Field(gt=0)
    mode: Literal["L", "RGB"]
    encoding: StrictStr = "png"  # checked against ENCODINGS by read_manifest, naming the key
    quality: StrictInt = Field(default=JPEG_QUALITY, ge=1, le=100)


class _Shard(BaseModel):
    # a bare file name: a manifest never points outside its own folder
    file: str = Field(pattern=r"^[^/\\]+$")
    rows: StrictInt = Field(ge=0)
    sha256: StrictStr


class _Removed(_Shard):
    file: str = Field(pattern=rf"^{REMOVED_PREFIX}[^/\\]+$")


class _ManifestFile(BaseModel):
    """What `read_manifest` needs of a manifest file (writers add more keys: kept as is)."""

    model_config = ConfigDict(extra="allow")
    schema_version: StrictInt
    version: StrictInt = Field(default=1, ge=1)
    split: StrictStr
    num_rows: StrictInt = Field(ge=0)
    class_names: list[StrictStr]
    image: _Image
    shards: list[_Shard]
    removed: list[_Removed] = []
    digest: StrictStr


def _read_manifest_file(url: str) -> _ManifestFile:
    """One manifest file, checked: anything else is a one-line error naming the key."""
    try:
        raw = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise UserError(f"{url}: manifest missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{url}: not a JSON manifest ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{url}: not a manifest (a JSON {type(raw).__name__}, not an object)")
    if raw.get("schema_version") != SCHEMA_VERSION:
        shown = " ".join(str(raw.get("schema_version"))[:40].split())
        raise UserError(f"{url}: unsupported schema_version {shown}")
    try:
        m = _ManifestFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserError(f"{url}: key {' '.join(key.split())[:80]}: {err['msg']}") from None
    if sum(s.rows for s in m.shards) != m.num_rows:
        raise UserError(
            f"{url}: num_rows {m.num_rows}, but its shards hold {sum(s.rows for s in m.shards)}"
        )
    return m


def read_manifest(url: str) -> Manifest:
    url = storage.resolve(url)
    manifest_url = storage.join(url, MANIFEST)
    if not storage.exists(manifest_url):
        raise UserError(f"{url}: no dataset here ({MANIFEST} missing)")
    m = _read_manifest_file(manifest_url)
    # `_manifest.json` may lag behind a concurrent append's version: follow the history
    while storage.exists(later := storage.join(url, HISTORY, f"{m.version + 1:05d}.json")):
        newer = _read_manifest_file(later)
        if newer.version != m.version + 1:
            raise UserError(f"{later}: holds version {newer.version}, not {m.version + 1}")
        m = newer
    if m.image.encoding not in ENCODINGS:
        raise UserError(
            f"{manifest_url}: image.encoding {m.image.encoding!r} is not one of {list(ENCODINGS)}"
        )
    return Manifest(
        url=url,
        split=m.split,
        num_rows=m.num_rows,
        class_names=m.class_names,
        height=m.image.height,
        width=m.image.width,
        mode=m.image.mode,
        shards=[s.model_dump() for s in m.shards],
        digest=m.digest,
        version=m.version,
        encoding=m.image.encoding,
        quality=m.image.quality,
        removed=[r.model_dump() for r in m.removed],
        removed_ids=frozenset(read_removed(url, [r.model_dump() for r in m.removed])["id"]),
    )


def read_removed(url: str, files: list[dict[str, Any]]) -> dict[str, list]:
    """The ids that left the split at `url` (and the class each was given, or None), from
    its `removed-*` files, each checked against its checksum in the manifest."""
    out: dict[str, list] = {"id": [], "label": []}
    for entry in files:
        file_url = storage.join(url, entry["file"])
        data = storage.read_verified(file_url, entry["sha256"], f"{url}'s manifest")
        try:
            table = pq.read_table(io.BytesIO(data), columns=REMOVED_SCHEMA.names)
        except (*READ_ERRORS, KeyError) as e:
            raise UserError(f"{file_url}: not a list of removed ids: {describe_error(e)}") from None
        for name in REMOVED_SCHEMA.names:
            out[name] += table.column(name).to_pylist()
    return out


@contextmanager
def open_shard(manifest: Manifest, index: int) -> Iterator[tuple[str, pq.ParquetFile]]:
    """Shard `index`'s URL and its Parquet file, open once the file has been checked against
    the manifest: present, its checksum, its columns, its row count; each mismatch a one-line
    error naming the file. The file is checksummed in one chunked pass (a remote file is
    spooled to a local temporary file as it is hashed), so memory stays constant whatever
    its size; the rows are read from the very bytes that were checked."""
    entry = manifest.shards[index]
    url = storage.join(manifest.url, entry["file"])
    with ExitStack() as stack:
        try:
            path, sha256 = stack.enter_context(storage.local_copy(url))
        except FileNotFoundError:
            raise UserError(f"{url}: shard listed in the manifest is missing") from None
        if sha256 != entry["sha256"]:
            raise UserError(f"{url}: checksum does not match the manifest")
        # no pre-buffering: it would read far ahead, and readers here go a row group at a time
        try:
            parquet = stack.enter_context(pq.ParquetFile(path, pre_buffer=False))
            schema = parquet.schema_arrow
        except READ_ERRORS as e:
            raise UserError(f"{url}: not a readable Parquet file: {describe_error(e)}") from None
        _check_columns(url, schema)
        if parquet.metadata.num_rows != entry["rows"]:
            raise UserError(
                f"{url}: {parquet.metadata.num_rows} rows, manifest says {entry['rows']}"
            )
        yield url, parquet


def read_shard(manifest: Manifest, index: int) -> pa.Table:
    """One whole shard, checked as `open_shard` checks it."""
    with open_shard(manifest, index) as (url, parquet):
        try:
            table = parquet.read(columns=SCHEMA.names)
            table.validate(full=True)  # e.g. ids that are not UTF-8: Arrow does not check on read
        except READ_ERRORS as e:
            raise UserError(f"{url}: not a readable Parquet file: {describe_error(e)}") from None
    return table


def describe_error(e: BaseException) -> str:
    """An exception as one short line, without object reprs (`<_io.BytesIO object at 0x…>`)."""
    text = " ".join(_OBJECT_REPR.sub("the data", str(e)).split())[:200]
    if isinstance(e, UnidentifiedImageError):
        return "not an image in a known format (PNG, JPEG, …)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# what pyarrow raises on a damaged file: its own errors, I/O errors, and a footer whose
# column names are not UTF-8 (UnicodeDecodeError, found by tests/test_fuzz.py)
READ_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)


def _check_columns(url: str, schema: pa.Schema) -> None:
    for field in SCHEMA:
        if field.name not in schema.names:
            raise UserError(f"{url}: no column {field.name!r} (a shard holds {SCHEMA.names})")
        found = schema.field(field.name).type
        if found != field.type and not (field.name == "label" and pa.types.is_integer(found)):
            raise UserError(f"{url}: column {field.name!r} is {found}, expected {field.type}")


class _Png:
    """A small 8-bit L or RGB PNG row decoded by libspng (pyspng), with the `size`, `mode`
    and `load()` of the PIL image `decode_images` checks; `open` returns None for any other
    PNG (larger than `MAX_PIXELS`, palette, 16-bit, alpha) or anything not starting as a
    PNG, which PIL then opens, names or refuses as before.

    Why libspng: at 28 px it decodes 2.5-3.7x as many images/s as PIL here (benchmarks/
    decode.py, results/decode-cpu.md), which is most of what labelling spends beside the
    forward pass (labelling ran at 0.96 of the forward pass alone, against 0.88 with PIL),
    and libspng is fuzzed for hostile files (OSS-Fuzz), where torchvision's decode_png
    crashed the interpreter on a PNG with flipped bits. Why not everywhere: pyspng holds
    the GIL while it decodes and Pillow does not. So it serves images up to 48x48 (at 64x64
    PIL on two threads is as fast), and not the training reader, whose two decode threads
    run beside a step loop that runs Python between its ops: there a student epoch took
    3-6% longer with pyspng than with PIL (two interleaved pairs on the demo's data), though
    its decoding took half the time. libspng skips chunk CRCs; the header's is checked
    here, and the pixels are covered by zlib's Adler-32 and the shard's checksum."""

    MAX_PIXELS = 48 * 48

    _MODES = {(0, 8): "L", (2, 8): "RGB"}  # (colour type, bit depth) -> PIL's mode name
    _HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # signature, then a 13-byte IHDR

    @classmethod
    def serves(cls, width: int, height: int) -> bool:
        """Whether rows of this size go through pyspng (if they are 8-bit L or RGB)."""
        return width * height <= cls.MAX_PIXELS

    @classmethod
    def open(cls, blob: bytes) -> _Png | None:
        if blob[:16] != cls._HEAD or len(blob) < 33:
            return None
        if zlib.crc32(blob[12:29]) != int.from_bytes(blob[29:33], "big"):
            raise ValueError("the PNG header's checksum is wrong")  # PIL: "not an image"
        width, height, depth, colour = struct.unpack(">IIBB", blob[16:26])
        mode = cls._MODES.get((colour, depth))
        if mode is None or not cls.serves(width, height):
            return None
        return cls(blob, width, height, mode)

    def __init__(self, blob: bytes, width: int, height: int, mode: str):
        self.size, self.mode = (width, height), mode
        self._blob = blob
        self._array: np.ndarray | None = None

    def load(self) -> None:
        self._array = pyspng.load(self._blob, self.mode)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._array


class _Jpeg:
    """A JPEG shard row decoded by simplejpeg, with the `size`, `mode` and `load()` of the
    PIL image `decode_images` checks. Why simplejpeg: benchmarks/decode.py measures the
    decoders side by side on the same rows (results/decode-cpu.md); on this CPU it decodes
    1.5-1.7x as many 224 px images/s as PIL (the same libjpeg-turbo, without PIL's
    per-image object and mode handling), more than torchvision's batched decode_jpeg on
    CPU (0.5-1.25x PIL over two runs), and PIL's draft() does no DCT scaling at the stored
    size. On CUDA, torchvision's nvjpeg decode would leave the batch on the GPU, where the
    reader's pinned-memory handoff does not expect it, so the CPU decoder serves every
    device."""

    def __init__(self, blob: bytes):
        if blob[:2] != b"\xff\xd8":  # libjpeg-turbo's own message is cryptic
            raise ValueError("not a JPEG file (the manifest's image.encoding is jpeg)")
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(blob)
        self.size = (width, height)
        self.mode = {"Gray": "L", "YCbCr": "RGB", "RGB": "RGB"}.get(colorspace, colorspace)
        self._blob = blob
        self._array: np.ndarray | None = None

    def load(self) -> None:
        # strict: a truncated or damaged file is an error, not a grey stripe
        self._array = simplejpeg.decode_jpeg(
            self._blob, colorspace="GRAY" if self.mode == "L" else "RGB", strict=True
        )

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._array


_pool: futures.ThreadPoolExecutor | None = None


def _decoders() -> futures.ThreadPoolExecutor:
    """The process's decode threads (one per core), started on first use."""
    global _pool
    if _pool is None:
        _pool = futures.ThreadPoolExecutor(prefetch.cores(), thread_name_prefix="decode")
    return _pool


def decodes_without_gil(manifest: Manifest) -> bool:
    """Whether the split's decoder releases the GIL, so that `decode_images(threads=k)`
    decodes k rows at once: simplejpeg for JPEG and PIL for PNG do; pyspng, which
    `decode_images` uses for small PNG rows, does not."""
    return manifest.encoding == "jpeg" or not _Png.serves(manifest.width, manifest.height)


def _decoded(
    blob: bytes, manifest: Manifest, release_gil: bool, shard_url: str, row: int, id: str
) -> np.ndarray:
    """One image's pixels, H x W x C, checked against the manifest; an error names the row
    (its name is made only then: this runs for every image read)."""
    try:  # whatever a decoder trips on, the bytes are a bad image
        if manifest.encoding == "jpeg":
            img = _Jpeg(blob)
        else:
            img = (None if release_gil else _Png.open(blob)) or Image.open(io.BytesIO(blob))
        wrong_kind = img.size != (manifest.width, manifest.height) or img.mode != manifest.mode
        if not wrong_kind:
            img.load()
    except Exception as e:
        where = f"{shard_url}: row {row} (id {id!r})"
        raise UserError(f"{where}: corrupt image: {describe_error(e)}") from None
    if wrong_kind:
        raise UserError(
            f"{shard_url}: row {row} (id {id!r}): image is {img.mode} {img.size[0]}x"
            f"{img.size[1]}, manifest says {manifest.mode} {manifest.width}x{manifest.height}"
        )
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def decode_images(
    manifest: Manifest,
    shard_url: str,
    table: pa.Table | pa.RecordBatch,
    first_row: int = 0,
    release_gil: bool = False,
    channels_last: bool = False,
    threads: int = 1,
) -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 N x C x H x W, checking every image against the manifest.
    `first_row` is the table's offset in the shard, for error messages. An image's header is
    checked before its pixels are decoded, so a damaged size cannot make a huge buffer.
    `release_gil`: only decoders that release the GIL while they decode (PIL for every PNG,
    see `_Png`), for readers that decode beside a thread running Python. `channels_last`:
    the decoders' own pixel order (N x H x W x C in memory) seen as N x C x H x W without a
    copy, the layout a model's forward pass takes (`engine.batch_probs`); otherwise the
    tensor is contiguous, as the augmentations expect. `threads`: the rows split into that
    many runs decoded at once, for decoders that release the GIL (`decodes_without_gil`);
    a bad row is reported as in one thread, the first in row order."""
    ids = table.column("id").to_pylist()
    out = np.empty(
        (table.num_rows, manifest.height, manifest.width, manifest.channels), dtype=np.uint8
    )
    blobs = table.column("image").to_pylist()

    def decode(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = _decoded(blobs[i], manifest, release_gil, shard_url, first_row + i, ids[i])

    runs = min(threads, len(blobs))
    if runs > 1:
        bounds = [len(blobs) * k // runs for k in range(runs + 1)]
        parts = [_decoders().submit(decode, a, b) for a, b in itertools.pairwise(bounds)]
        futures.wait(parts)
        for part in parts:  # in row order: the first bad row is the one reported
            part.result()
    else:
        decode(0, len(blobs))
    images = torch.from_numpy(out).permute(0, 3, 1, 2)
    return images if channels_last else images.contiguous()


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
    manifest: Manifest,
    index: int,
    batch_size: int,
    pin_memory: bool = False,
    channels_last: bool = False,
    decode_threads: int = 1,
) -> Iterator[ImageSet]:
    """One shard as decoded batches of `batch_size` rows (the last may be smaller), in
    constant memory whatever the shard's size: the file is checked by `open_shard`, then
    read row group by row group. `pin_memory` pins each batch for asynchronous copies to a
    GPU; `channels_last` and `decode_threads` (its `threads`) are `decode_images`'s."""
    with open_shard(manifest, index) as (url, parquet):
        pending: list[pa.RecordBatch] = []
        buffered, row = 0, 0

        def emit(table: pa.Table) -> ImageSet:
            images = decode_images(
                manifest, url, table, row, channels_last=channels_last, threads=decode_threads
            )
            part = without_removed(
                manifest,
                ImageSet(
                    table.column("id").to_pylist(), images, labels_of(manifest, url, table, row)
                ),
            )
            if pin_memory:
                part.images = part.images.pin_memory()
            return part

        # row groups need not line up with batches: regroup them into batch_size rows. No
        # reader threads: row groups are small, and decoding already runs beside the consumer
        columns = SCHEMA.names
        batches = parquet.iter_batches(batch_size, columns=columns, use_threads=False)
        while True:
            try:
                batch = next(batches, None)
                if batch is not None:
                    batch.validate(full=True)
            except READ_ERRORS as e:
                raise UserError(f"{url}: rows from {row + buffered}: {describe_error(e)}") from None
            if batch is None:
                break
            pending.append(batch)
            buffered += batch.num_rows
            while buffered >= batch_size:
                table = pa.Table.from_batches(pending)
                yield from _unless_empty(emit(table.slice(0, batch_size)))
                rest = table.slice(batch_size)
                pending, buffered, row = rest.to_batches(), rest.num_rows, row + batch_size
        if buffered:
            yield from _unless_empty(emit(pa.Table.from_batches(pending)))


def _unless_empty(part: ImageSet) -> list[ImageSet]:
    # a batch whose rows all left the split is no batch
    return [part] if len(part) else []


def iter_shards(manifest: Manifest) -> Iterator[ImageSet]:
    for index, url in enumerate(manifest.shard_urls()):
        yield load_shard(manifest, index, url)


def load_shard(manifest: Manifest, index: int, url: str | None = None) -> ImageSet:
    url = url or manifest.shard_urls()[index]
    table = read_shard(manifest, index)
    return without_removed(
        manifest,
        ImageSet(
            ids=table.column("id").to_pylist(),
            images=decode_images(manifest, url, table),
            labels=labels_of(manifest, url, table),
        ),
    )


def without_removed(manifest: Manifest, part: ImageSet) -> ImageSet:
    """`part` less the rows whose ids left the split (`Manifest.removed_ids`), in the same
    memory layout. Removed rows are decoded with the rest and dropped here, so that a bad
    image is still reported at its row in the shard; they are few."""
    if not manifest.removed_ids:
        return part
    keep = [k for k, i in enumerate(part.ids) if i not in manifest.removed_ids]
    if len(keep) == len(part.ids):
        return part
    index = torch.tensor(keep, dtype=torch.long)
    # indexed in the decoders' own N x H x W x C order, so a channels_last batch stays one
    images = part.images.permute(0, 2, 3, 1)[index].permute(0, 3, 1, 2)
    if part.images.is_contiguous():
        images = images.contiguous()
    return ImageSet([part.ids[k] for k in keep], images, part.labels[index])


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


def class_shares(manifest: Manifest) -> np.ndarray:
    """Each class's share of the split's labelled images (those that left it skipped),
    reading only the id and label columns; a class without an image is a one-line error."""
    counts = np.zeros(manifest.num_classes, dtype=np.int64)
    for url in manifest.shard_urls():
        table = storage.read_parquet(url, columns=["id", "label"])
        if manifest.removed_ids:
            kept = [i not in manifest.removed_ids for i in table.column("id").to_pylist()]
            table = table.filter(pa.array(kept, type=pa.bool_()))
        labels = labels_of(manifest, url, table).numpy()
        counts += np.bincount(labels[labels >= 0], minlength=manifest.num_classes)
    absent = [n for c, n in enumerate(manifest.class_names) if counts[c] == 0]
    if absent:
        raise UserError(f"{manifest.url}: no labelled image for class {absent[0]!r}")
    return counts / counts.sum()


def read_ids(manifest: Manifest) -> set[str]:
    """Every id stored in the split's shards, those that left it included: an id is
    never reused."""
    return {
        i
        for url in manifest.shard_urls()
        for i in storage.read_parquet(url, columns=["id"]).column("id").to_pylist()
    }


def unlabelled_truth(data_root: str, pool: Manifest) -> pd.Series | None:
    """The unlabelled images' true labels by id, where the dataset was ingested with them
    (`unlabelled_truth.parquet`, never read for training: only to score pseudo labels);
    None without that file. Images that left the pool (`pool.removed_ids`, labelled since)
    are dropped."""
    url = storage.join(data_root, UNLABELLED_TRUTH)
    if not storage.exists(url):
        return None
    truth = storage.read_parquet(url, ["id", "label"]).to_pandas().set_index("id")["label"]
    return truth.drop(index=list(pool.removed_ids), errors="ignore")
