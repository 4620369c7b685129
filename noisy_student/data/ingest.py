"""Turn raw data into the dataset format: Fashion-MNIST IDX files or an ImageFolder tree.

Both write a dataset root with the splits `labelled/`, `unlabelled/`, `test/` and, when
asked, `validation/` (labelled images the run makes its choices on), and, when the true
labels of the unlabelled images are known, `unlabelled_truth.parquet` beside them. Those
labels never reach training: they only score the pseudo labels. No image id is in two
splits: a repeated id stops the ingest naming it.

All or nothing: the shards of every split are written first, the manifests last and
only when every split is complete; on an error the shards written are removed.
`append_unlabelled` adds a new batch of unlabelled images to an existing dataset.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from noisy_student.data import storage
from noisy_student.data.dataset import (
    ENCODINGS,
    JPEG_QUALITY,
    LABELLED,
    MANIFEST,
    SPLITS,
    TEST,
    UNLABELLED,
    UNLABELLED_TRUTH,
    VALIDATION,
    Manifest,
    describe_error,
    read_ids,
    read_manifest,
)
from noisy_student.data.dataset_writer import DatasetWriter, append_rows, stage_rows
from noisy_student.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PHOTO_SIZE = 224  # ImageNet's input size, which timm's models and their defaults expect
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_idx(url: str) -> np.ndarray:
    """An IDX file (gzipped or not), as in LeCun's MNIST format."""
    if not storage.exists(url):
        raise UserError(f"{url}: file not found")
    raw = storage.read_bytes(url)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{url}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{url}: truncated: {data.size} bytes for shape {shape}")
    return data.reshape(shape)


def split_labelled(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` images of every class, drawn with a fixed seed."""
    return draw_per_class(labels, np.arange(len(labels)), per_class, np.random.default_rng(seed))


def draw_per_class(
    labels: np.ndarray,
    pool: np.ndarray,
    per_class: int,
    rng: np.random.Generator,
    purpose: str = "",
) -> np.ndarray:
    """Sorted indices of `per_class` images of every class of `labels`, drawn from `pool`
    (indices into `labels`) with `rng`: draws made one after another from one generator
    take disjoint images when each draw's pool leaves out the ones before."""
    chosen = []
    for c in np.unique(labels):
        candidates = pool[labels[pool] == c]
        if len(candidates) < per_class:
            raise UserError(
                f"class {c} has {len(candidates)} images{purpose}, fewer than {per_class} asked"
            )
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_truth(root: str, ids: list[str], labels: list[int]) -> None:
    table = pa.table({"id": ids, "label": pa.array(labels, pa.int32())})
    storage.write_parquet(storage.join(root, UNLABELLED_TRUTH), table, row_group_size=65536)


Rows = Iterable[tuple[str, np.ndarray, int | None]]


def _check_every_class_labelled(writers: list[DatasetWriter], class_names: list[str]) -> None:
    labelled = next((w for w in writers if w.split == LABELLED), None)
    if labelled is not None:
        absent = [n for c, n in enumerate(class_names) if c not in labelled.labels_seen]
        if absent:
            raise UserError(f"{labelled.url}: no labelled image for class {absent[0]!r}")


def _remove_empty_folders(out: str, splits: list[str], existed: bool) -> None:
    """A failed ingest leaves nothing behind, not even the empty folders it made."""
    for folder in [storage.join(out, split) for split in splits] + [out]:
        if (folder != out or not existed) and storage.isdir(folder) and not storage.find(folder):
            storage.remove(folder)


def _remove_the_rest(out: str, written: set[str], has_truth: bool) -> None:
    """What a whole-root ingest did not write: the other splits, and a stale truth file."""
    for split in SPLITS:
        if split not in written:
            storage.remove(storage.join(out, split))
    if not has_truth:
        storage.remove(storage.join(out, UNLABELLED_TRUTH))


def _write_splits(
    out: str,
    class_names: list[str],
    splits: list[tuple[str, Rows, Callable[[], dict] | None]],
    rows_per_shard: int,
    truth: tuple[list[str], list[int]] | None = None,
    every_class_labelled: bool = False,
    encoding: str = "png",
    quality: int = JPEG_QUALITY,
    taken_ids: set[str] | None = None,
    whole_root: bool = False,
) -> None:
    """Every split's shards, then the truth file, then the manifests: a failure anywhere
    leaves no manifest, so no split of a half-ingested root can be read. An id already
    written to another split (or among `taken_ids`, the ids of the root's other splits)
    stops the ingest: no image is in two splits. A `whole_root` ingest replaces the
    dataset: the splits it does not write, and a truth file it has none for, are removed
    (left from an earlier ingest, they would mix two datasets)."""
    writers: list[DatasetWriter] = []
    existed = storage.exists(out)
    taken = set(taken_ids or ())
    try:
        for split, rows, extra in splits:
            writer = stage_rows(
                storage.join(out, split),
                split,
                class_names,
                rows,
                rows_per_shard,
                extra,
                encoding,
                quality,
                existing_ids=taken,
            )
            writers.append(writer)
            taken = taken | writer.ids  # a new set: the writer keeps the one it was given
        if every_class_labelled:
            _check_every_class_labelled(writers, class_names)
        if truth is not None:
            write_truth(out, *truth)
    except BaseException:
        for w in writers:
            w.abort()
        _remove_empty_folders(out, [split for split, _, _ in splits], existed)
        raise
    if whole_root:
        _remove_the_rest(out, {split for split, _, _ in splits}, truth is not None)
    for w in writers:
        w.commit()


def _draw_training_splits(
    y_train: np.ndarray,
    labelled_per_class: int,
    validation_per_class: int,
    unlabelled_limit: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled, validation and unlabelled rows of the training images (see
    `fashion_mnist`)."""
    draws = np.random.default_rng(seed)
    everything = np.arange(len(y_train))
    labelled = draw_per_class(y_train, everything, labelled_per_class, draws)
    rest = np.setdiff1d(everything, labelled)
    validation = np.empty(0, dtype=np.int64)
    if validation_per_class:
        validation = draw_per_class(
            y_train, rest, validation_per_class, draws, " left after the labelled draw"
        )
        rest = np.setdiff1d(rest, validation)
    if unlabelled_limit is not None:
        rest = np.sort(np.random.default_rng(seed + 1).permutation(rest)[:unlabelled_limit])
    return labelled, validation, rest


def fashion_mnist(
    out: str,
    source: str = FASHION_MNIST_DIR,
    labelled_per_class: int = 100,
    unlabelled_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    rows_per_shard: int = 8192,
    validation_per_class: int = 0,
) -> str:
    """The labelled split (`labelled_per_class` images of every class) and, when
    `validation_per_class` > 0, the validation split are drawn from the 60,000 training
    images with `seed`, in that order, so a validation split leaves the labelled one as it
    was without it; the rest (or `unlabelled_limit` of it) is the unlabelled split, its
    labels kept apart in the truth file. The test split is the 10,000 test images (or
    `test_limit` of them)."""
    if validation_per_class < 0:
        raise UserError(f"validation per class must be 0 or more, not {validation_per_class}")
    out = storage.resolve(out)
    source = storage.resolve(source)
    if not storage.exists(source):
        raise UserError(
            f"{source}: Fashion-MNIST folder not found (apt-get install dataset-fashion-mnist)"
        )
    x_train = read_idx(storage.join(source, "train-images-idx3-ubyte.gz"))
    y_train = read_idx(storage.join(source, "train-labels-idx1-ubyte.gz"))
    x_test = read_idx(storage.join(source, "t10k-images-idx3-ubyte.gz"))
    y_test = read_idx(storage.join(source, "t10k-labels-idx1-ubyte.gz"))

    labelled, validation, rest = _draw_training_splits(
        y_train, labelled_per_class, validation_per_class, unlabelled_limit, seed
    )
    test = np.arange(len(y_test))
    if test_limit is not None:
        test = np.sort(np.random.default_rng(seed + 2).permutation(test)[:test_limit])

    def rows(x: np.ndarray, y: np.ndarray, idx: np.ndarray, prefix: str, keep_label: bool) -> Rows:
        return ((f"{prefix}-{i:05d}", x[i], int(y[i]) if keep_label else None) for i in idx)

    splits = [
        (LABELLED, rows(x_train, y_train, labelled, "train", True), None),
        (UNLABELLED, rows(x_train, y_train, rest, "train", False), None),
        (TEST, rows(x_test, y_test, test, "test", True), None),
    ]
    if len(validation):
        splits.append((VALIDATION, rows(x_train, y_train, validation, "train", True), None))
    _write_splits(
        out,
        FASHION_MNIST_CLASSES,
        splits,
        rows_per_shard,
        truth=([f"train-{i:05d}" for i in rest], [int(y_train[i]) for i in rest]),
        whole_root=True,
    )
    return out


@dataclass
class BadImages:
    """Images left out under `on_bad_image="skip"`, as manifest entries: the file, the row
    of a table, and why."""

    policy: Literal["error", "skip"] = "error"
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, url: str, reason: str, row: int | None = None) -> None:
        if self.policy == "error":
            raise UserError(f"{url}: {reason}" if row is None else f"{url}: row {row}: {reason}")
        at_row = {} if row is None else {"row": row}
        self.skipped.append({"file": url, **at_row, "reason": reason})

    def listed(self, folder: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """The manifest field listing the images skipped (those under `folder`), if any."""
        prefix = "" if folder is None else folder.rstrip("/") + "/"
        under = [s for s in self.skipped if s["file"].startswith(prefix)]
        return {"skipped": under} if under else {}


def refuse_another_kind(whose: str, options: dict[str, tuple[Any, Any]], why: str) -> None:
    """Images joining others take their kind: an option (name: (asked or None, held)) that
    asks for another one is refused, naming both."""
    for name, (asked, held) in options.items():
        if asked is not None and asked != held:
            raise UserError(f"{whose} {name} is {held!r}, not {asked!r} ({why})")


def check_image_options(
    image_size: int | None, mode: str | None, encoding: str | None, quality: int | None
) -> None:
    """The options every ingest that writes images takes (None: not given), each checked
    before anything is read or written."""
    if mode not in (None, "L", "RGB"):
        raise UserError(f"mode must be 'L' or 'RGB', not {mode!r}")
    if encoding not in (None, *ENCODINGS):
        raise UserError(f"format must be one of {list(ENCODINGS)}, not {encoding!r}")
    if quality is not None and not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be in [1, 100], not {quality}")
    if image_size is not None and image_size < 1:
        raise UserError(f"image size must be a positive number of pixels, not {image_size}")


def _relative(url: str, root: str) -> str:
    return url[len(root) :].lstrip("/")


def _list_images(folder: str) -> list[str]:
    """The files under `folder` in a seeded random order (the same on every run). Training
    reads a few row groups at a time and shuffles within them (training_data.py), so rows
    written class folder by class folder would give batches of one or two classes."""
    urls = sorted(u for u in storage.find(folder) if not posixpath.basename(u).startswith("."))
    order = np.random.default_rng(0).permutation(len(urls))
    return [urls[i] for i in order]


def _load_image(
    url: str, size: int, mode: str, on_mismatch: str, bad: BadImages
) -> np.ndarray | None:
    """The image at `url` as `mode` at size x size, or None when `bad` skips it."""
    if posixpath.splitext(url)[1].lower() not in IMAGE_SUFFIXES:
        bad.reject(url, f"not an image file (expected one of {sorted(IMAGE_SUFFIXES)})")
        return None
    try:
        img = Image.open(io.BytesIO(storage.read_bytes(url)))
        if on_mismatch == "convert" and img.format == "JPEG":
            # libjpeg decodes a multi-megapixel photo at 1/2 to 1/8 scale directly (never
            # below size x size): most of the decoding and resizing work is never done
            img.draft(mode, (size, size))
        img.load()
    except Exception as e:  # whatever the decoder trips on, the file is a bad image
        bad.reject(url, f"corrupt image: {describe_error(e)}")
        return None
    if on_mismatch == "error" and (img.mode != mode or img.size != (size, size)):
        bad.reject(
            url, f"image is {img.mode} {img.size[0]}x{img.size[1]}, expected {mode} {size}x{size}"
        )
        return None
    return np.asarray(fit(img.convert(mode), size))


def fit(img: Image.Image, size: int) -> Image.Image:
    """The image at size x size: its shorter side resized to `size` and the longer one
    centre-cropped, as torchvision's Resize + CenterCrop do for evaluation, so that a photo
    keeps its proportions (a stretched 4:3 photo would teach the model squashed objects)
    and loses only its margins. One resampling step, from the centred square straight to
    the target size; PIL's bilinear filter widens with the scale, so downsizing is
    antialiased."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


@dataclass
class _FolderRows:
    """The rows of folders of images, each image loaded and fitted as `image_folder` says."""

    classes: list[str]  # the labelled folder's class sub-folders
    image_size: int
    mode: str
    on_mismatch: Literal["convert", "error"]
    bad: BadImages

    def class_rows(self, root: str, split: str) -> Rows:
        for url in _list_images(root):
            rel = _relative(url, root)
            cls = rel.split("/")[0]
            if cls not in self.classes:
                raise UserError(f"{url}: class {cls!r} not among {self.classes}")
            img = _load_image(url, self.image_size, self.mode, self.on_mismatch, self.bad)
            if img is not None:
                yield f"{split}/{rel}", img, self.classes.index(cls)

    def plain_rows(self, root: str) -> Rows:
        for url in _list_images(root):
            img = _load_image(url, self.image_size, self.mode, self.on_mismatch, self.bad)
            if img is not None:
                yield f"unlabelled/{_relative(url, root)}", img, None

    def skipped(self, root: str) -> Callable[[], dict]:
        return lambda: self.bad.listed(root)


def image_folder(
    out: str,
    labelled: str,
    unlabelled: str,
    test: str,
    image_size: int = PHOTO_SIZE,
    mode: str = "RGB",
    rows_per_shard: int = 8192,
    on_bad_image: Literal["error", "skip"] = "error",
    on_mismatch: Literal["convert", "error"] = "convert",
    encoding: Literal["png", "jpeg"] = "png",
    quality: int = JPEG_QUALITY,
    validation: str | None = None,
) -> str:
    """`labelled`, `test` and the optional `validation` hold one sub-folder per class (of
    the labelled split's classes); `unlabelled` holds images only.

    Every image is converted to `mode` ("L" or "RGB") and brought to image_size^2 by
    `fit` (shorter side resized, centre crop), or, with `on_mismatch="error"`, one of
    another mode or size is a bad image. A bad image (not an image, corrupt, mismatched)
    stops the ingest naming it, or with `on_bad_image="skip"` is left out and listed in
    its split's manifest under `skipped`. Shards hold PNG (lossless; small images) or
    JPEG at `quality` (photos: about a fifth of PNG's bytes at 224 px, decoded faster).
    """
    check_image_options(image_size, mode, encoding, quality)
    out = storage.resolve(out)
    bad = BadImages(on_bad_image)
    labelled, unlabelled, test = (storage.resolve(u) for u in (labelled, unlabelled, test))
    validation = storage.resolve(validation) if validation else None
    for folder in (labelled, unlabelled, test, validation):
        if folder is not None and not storage.isdir(folder):
            raise UserError(f"{folder}: folder not found")
    classes = storage.subfolders(labelled)
    if not classes:
        raise UserError(f"{labelled}: no class sub-folders")

    read = _FolderRows(classes, image_size, mode, on_mismatch, bad)
    splits = [
        (LABELLED, read.class_rows(labelled, LABELLED), read.skipped(labelled)),
        (UNLABELLED, read.plain_rows(unlabelled), read.skipped(unlabelled)),
        (TEST, read.class_rows(test, TEST), read.skipped(test)),
    ]
    if validation is not None:
        rows = read.class_rows(validation, VALIDATION)
        splits.append((VALIDATION, rows, read.skipped(validation)))
    _write_splits(
        out,
        classes,
        splits,
        rows_per_shard,
        every_class_labelled=True,
        whole_root=True,
        encoding=encoding,
        quality=quality,
    )
    return out


def append_unlabelled(
    root: str,
    images: str,
    id_prefix: str | None = None,
    rows_per_shard: int = 8192,
    image_size: int | None = None,
    mode: str | None = None,
    encoding: str | None = None,
    quality: int | None = None,
    on_bad_image: Literal["error", "skip"] = "error",
) -> tuple[Manifest, Manifest]:
    """Add a folder of images (any fsspec URL, sub-folders included) to the unlabelled
    split of the dataset at `root`, converted and fitted to the split's mode and size and
    encoded as its images are; an image option asking for another one is refused, since
    one split holds one kind of image.

    Ids are `<id_prefix>/<path in the folder>`, the prefix defaulting to the folder's
    name, so appending the same batch twice is refused, as is an id of another split. A
    bad image stops the append and leaves the dataset as it was, or with
    `on_bad_image="skip"` is left out and listed in the new version's manifest. Returns the
    manifests before and after.
    """
    check_image_options(image_size, mode, encoding, quality)
    url = storage.join(storage.resolve(root), UNLABELLED)
    before = read_manifest(url)
    folder = storage.resolve(images)
    if not storage.isdir(folder):
        raise UserError(f"{images}: folder not found")
    if before.width != before.height:
        raise UserError(f"{url}: images are {before.width}x{before.height}, not square")
    jpeg = before.encoding == "jpeg"
    refuse_another_kind(
        f"{url}: the split's",
        {
            "image size": (image_size, before.height),
            "mode": (mode, before.mode),
            "format": (encoding, before.encoding),
            "JPEG quality": (quality if jpeg else None, before.quality),
        },
        "appended images are stored as the split's are",
    )
    prefix = id_prefix or posixpath.basename(folder.rstrip("/"))
    bad = BadImages(on_bad_image)

    def rows() -> Rows:
        for image_url in _list_images(folder):
            img = _load_image(image_url, before.height, before.mode, "convert", bad)
            if img is not None:
                yield f"{prefix}/{_relative(image_url, folder)}", img, None

    taken = split_ids(root, exclude=UNLABELLED)
    after = append_rows(url, rows(), rows_per_shard, extra=bad.listed, taken_ids=taken)
    return before, after


def split_ids(root: str, exclude: str | None = None) -> set[str]:
    """The ids of every split present at the dataset root (but `exclude`)."""
    root = storage.resolve(root)
    ids: set[str] = set()
    for split in SPLITS:
        url = storage.join(root, split)
        if split != exclude and storage.exists(storage.join(url, MANIFEST)):
            ids |= read_ids(read_manifest(url))
    return ids
