"""Parquet tables into the dataset format: a Hugging Face `datasets` export, a feature
store's images, any table with a column of encoded images.

One call writes one split (`labelled`, `unlabelled`, `test` or `validation`) of a dataset
root, from a Parquet file or a folder of them at any fsspec URL, read a record batch at a
time. The image column holds encoded bytes, the `{bytes, path}` struct `datasets` writes
(bytes for decoded images; only a path for images built from files, read from there), or
paths; the optional label column holds class indices or class names. Class names come from
`classes`, else the `datasets` features in the schema's metadata, else a split already in
the dataset, else the label column's distinct strings (sorted). Labels of an unlabelled
split are kept apart, as its true labels, only to score pseudo labels.

All or nothing, as the other ingests: shards first, manifest last; the first bad row (no
image, a path to no file, an undecodable image, a label outside the classes, a repeated
id, an id of another split) stops the ingest with a one-line error naming the file and
row, and removes what was written, unless the skip policies leave missing or undecodable
images out.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from noisy_student.data import storage
from noisy_student.data.dataset import (
    JPEG_QUALITY,
    LABELLED,
    MANIFEST,
    SPLITS,
    TEST,
    UNLABELLED,
    VALIDATION,
    describe_error,
    read_ids,
    read_manifest,
)
from noisy_student.data.ingest import (
    BadImages,
    Rows,
    _write_splits,
    check_image_options,
    fit,
    refuse_another_kind,
)
from noisy_student.errors import UserError

BATCH_ROWS = 1024


def parquet_files(src: str) -> list[str]:
    """The Parquet files at `src`: the file itself, or every `*.parquet` under the folder."""
    url = storage.resolve(src)
    if storage.isdir(url):
        files = sorted(u for u in storage.find(url) if u.endswith(".parquet"))
        if not files:
            raise UserError(f"{url}: no .parquet files in this folder")
        return files
    if not storage.exists(url):
        raise UserError(f"{url}: file not found")
    return [url]


def _schema(url: str) -> pa.Schema:
    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{url}: not a Parquet file ({' '.join(str(e).split())})") from None


def hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """The class names a `datasets` ClassLabel feature stores in the schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return None
    feature = info.get("info", {}).get("features", {}).get(label_column) or {}
    names = feature.get("names")
    return [str(n) for n in names] if feature.get("_type") == "ClassLabel" and names else None


def _batches(url: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)


def image_url(table_url: str, path: str) -> str:
    """Where a row's image path points: a URL (chained ones too) or an absolute path as it
    is, a relative path in the Parquet file's folder, so that it means the same on every
    machine and for a table at any URL."""
    if "://" in path or "::" in path or os.path.isabs(path):
        return path
    if "://" in table_url:
        scheme, rest = table_url.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), path))}"
    return os.path.normpath(os.path.join(os.path.dirname(table_url), path))


def _image(
    value: Any, table_url: str, row: int, bad: BadImages, missing: BadImages
) -> Image.Image | None:
    """The row's image, decoded from its bytes, else from the file its path names (how
    `datasets` stores an image built from a file); None when `missing` skips a row without
    one, or `bad` an undecodable one."""
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path") or None
    elif isinstance(value, str):
        data, path = None, value
    elif value is None or isinstance(value, bytes):
        data, path = value, None
    else:
        raise UserError(
            f"{table_url}: row {row}: the image column holds {type(value).__name__}, not "
            "bytes or a path"
        )
    source = ""  # the file the bytes come from, for the messages
    if data is None:
        if path is None:
            missing.reject(table_url, "no image (neither bytes nor a path)", row)
            return None
        source = image_url(table_url, path)
        try:
            data = storage.read_bytes(source)
        except FileNotFoundError:
            missing.reject(table_url, f"image file not found: {source}", row)
            return None
        except IsADirectoryError:
            bad.reject(table_url, f"not an image file: {source} is a folder", row)
            return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # whatever the decoder trips on, the image is a bad one
        of = f" {source}" if source else ""
        bad.reject(table_url, f"undecodable image{of}: {describe_error(e)}", row)
        return None
    return img


def _existing_splits(root: str) -> list[Any]:
    return [
        read_manifest(storage.join(root, s))
        for s in SPLITS
        if storage.exists(storage.join(root, s, MANIFEST))
    ]


def _class_names(
    files: list[str],
    label_column: str | None,
    classes: list[str] | None,
    existing: list[Any],
) -> list[str] | None:
    """Class names by precedence (see the module's docstring); None: read from the labels."""
    if classes:
        return list(classes)
    if label_column:
        for url in files:
            names = hf_class_names(_schema(url), label_column)
            if names:
                return names
    if existing:
        return existing[0].class_names
    return None


def _distinct_strings(files: list[str], label_column: str) -> list[str]:
    seen: set[str] = set()
    for url in files:
        for batch in _batches(url, [label_column]):
            column = batch.column(0)
            if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
                raise UserError(
                    f"{url}: column {label_column!r} holds class indices and no class names "
                    "are known: give them with --classes"
                )
            seen.update(v for v in column.to_pylist() if v is not None)
    return sorted(seen)


def parquet(
    src: str,
    dataset: str,
    split: str,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    classes: list[str] | None = None,
    image_size: int | None = None,
    mode: str | None = None,
    rows_per_shard: int = 8192,
    encoding: Literal["png", "jpeg"] = "png",
    quality: int = JPEG_QUALITY,
    on_bad_image: Literal["error", "skip"] = "error",
    on_missing_image: Literal["error", "skip"] = "error",
) -> str:
    """Write split `split` of the dataset at `dataset` from the Parquet table(s) at `src`.

    Images are converted to `mode` ("L" or "RGB") and fitted to image_size^2 (shorter side
    resized, centre crop) when given; otherwise they take the mode and size of the
    dataset's other splits, or, in a new dataset, those of the first image, and one of
    another size is an error. A row holds its image's bytes, or its path (a URL, an
    absolute path, or one relative to the Parquet file's folder) as `datasets` writes an
    image built from a file. A row whose image is missing (no bytes and no path, or no file
    at the path) or undecodable stops the ingest, or with `on_missing_image="skip"`,
    `on_bad_image="skip"` is left out and listed in the manifest under `skipped`. Shards
    hold PNG, or JPEG at `quality`. Ids are `id_column`'s values, or `<file name>/<row>`;
    one already in another split is refused. Labels are required but in the unlabelled
    split. Returns the dataset root's URL."""
    check_image_options(image_size, mode, encoding, quality)
    root = _root_without(dataset, split)
    files = parquet_files(src)
    labelled_rows = _has_labels(src, files, image_column, id_column, label_column, split)
    existing = _existing_splits(root)
    class_names = _classes(src, files, label_column, labelled_rows, classes, existing)
    bad = BadImages(on_bad_image)
    reader = _Reader(
        files=files,
        split=split,
        image_column=image_column,
        label_column=label_column if labelled_rows else None,
        id_column=id_column,
        class_names=class_names,
        # no image in two splits: the split each id of the dataset's other splits is in
        taken={id: m.split for m in existing for id in read_ids(m)},
        bad=bad,
        missing=BadImages(on_missing_image, bad.skipped),  # one list, in row order
        **_image_shape(existing, image_size, mode),
    )
    _write_splits(
        root,
        class_names,
        [(split, reader.rows(), bad.listed)],
        rows_per_shard,
        truth=reader.truth(),
        every_class_labelled=split == LABELLED,
        encoding=encoding,
        quality=quality,
    )
    return root


def _labels_needed(split: str) -> bool:
    return split in (LABELLED, TEST, VALIDATION)


def _root_without(dataset: str, split: str) -> str:
    """The dataset's root URL; the split must be a new one."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {list(SPLITS)}, not {split!r}")
    root = storage.resolve(dataset)
    if storage.exists(storage.join(root, split, MANIFEST)):
        raise UserError(
            f"{storage.join(root, split)}: the split exists already (add images to the "
            "unlabelled split with `ingest append`)"
        )
    return root


def _has_labels(
    src: str,
    files: list[str],
    image_column: str,
    id_column: str | None,
    label_column: str | None,
    split: str,
) -> bool:
    """Whether the files hold labels; every file must have the columns asked for."""
    labels_needed, present = _labels_needed(split), set()
    for url in files:
        names = set(_schema(url).names)
        for column in filter(None, (image_column, id_column)):
            if column not in names:
                raise UserError(f"{url}: no column {column!r} (columns: {sorted(names)})")
        if label_column and label_column not in names and labels_needed:
            raise UserError(f"{url}: no column {label_column!r} (columns: {sorted(names)})")
        present.add(bool(label_column) and label_column in names)
    if len(present) > 1:
        raise UserError(f"{src}: some files have the column {label_column!r}, others not")
    return present == {True}


def _classes(
    src: str,
    files: list[str],
    label_column: str | None,
    labelled_rows: bool,
    classes: list[str] | None,
    existing: list[Any],
) -> list[str]:
    """The class names, which must be the dataset's other splits' (when it has some)."""
    class_names = _class_names(files, label_column if labelled_rows else None, classes, existing)
    if class_names is None:
        if not labelled_rows:
            raise UserError(f"{src}: no labels and no class names: give them with --classes")
        class_names = _distinct_strings(files, label_column)
    if existing and existing[0].class_names != class_names:
        raise UserError(
            f"{existing[0].url}: the dataset's classes {existing[0].class_names} differ "
            f"from this table's {class_names}"
        )
    return class_names


def _image_shape(existing: list[Any], image_size: int | None, mode: str | None) -> dict[str, Any]:
    """The mode, the side every image is fitted to (`fit_to`; None: each must have the first
    image's `size`), and that size when the dataset's other splits fix it."""
    if not existing:
        return {"mode": mode, "fit_to": image_size, "size": None}
    other = existing[0]
    held = f"{other.width}x{other.height}"
    refuse_another_kind(
        f"{other.url}: the dataset's",
        {
            "image size": (image_size and f"{image_size}x{image_size}", held),
            "mode": (mode, other.mode),
        },
        "its splits hold one kind of image",
    )
    square = other.width == other.height
    return {
        "mode": other.mode,
        "fit_to": other.height if square else None,
        "size": (other.width, other.height),
    }


@dataclass(kw_only=True)
class _Reader:
    """The rows of the Parquet files as the dataset writer takes them: (id, image array,
    label), each id checked, each image converted and fitted; the unlabelled split's true
    labels kept aside (`truth_ids`, `truth_labels`)."""

    files: list[str]
    split: str
    image_column: str
    label_column: str | None  # None: the files hold no labels
    id_column: str | None
    class_names: list[str]
    taken: dict[str, str]
    bad: BadImages
    missing: BadImages
    mode: str | None
    fit_to: int | None
    size: tuple[int, int] | None
    truth_ids: list[str] = field(default_factory=list)
    truth_labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.class_names)}

    @property
    def labels_needed(self) -> bool:
        return _labels_needed(self.split)

    def truth(self) -> tuple[list[str], list[int]] | None:
        """The unlabelled rows' labels, for the truth file: lists filled as `rows` reads."""
        if self.split == UNLABELLED and self.label_column is not None:
            return self.truth_ids, self.truth_labels
        return None

    def rows(self) -> Rows:
        seen: dict[str, str] = {}
        columns = [
            self.image_column,
            *([self.label_column] if self.label_column else []),
            *([self.id_column] if self.id_column else []),
        ]
        for url in self.files:
            stem = posixpath.basename(url)
            row = 0
            for batch in _batches(url, columns):
                values = {name: batch.column(name).to_pylist() for name in batch.schema.names}
                for i in range(batch.num_rows):
                    where = f"{url}: row {row}"
                    id = str(values[self.id_column][i]) if self.id_column else f"{stem}/{row}"
                    self._check_id(id, where, seen)
                    label = (
                        self.label_of(values[self.label_column][i], where)
                        if self.label_column
                        else None
                    )
                    img = _image(values[self.image_column][i], url, row, self.bad, self.missing)
                    row += 1
                    if img is None:
                        continue
                    if self.split == UNLABELLED:
                        if label is not None:
                            self.truth_ids.append(id)
                            self.truth_labels.append(label)
                        label = None
                    yield id, np.asarray(self._fitted(img, where)), label

    def _check_id(self, id: str, where: str, seen: dict[str, str]) -> None:
        if id in seen:
            raise UserError(f"{where}: duplicate id {id!r} (first at {seen[id]})")
        if id in self.taken:
            raise UserError(f"{where}: id {id!r} is in the {self.taken[id]} split already")
        seen[id] = where

    def _fitted(self, img: Image.Image, where: str) -> Image.Image:
        if self.mode is None:
            self.mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16") else "RGB"
        img = img.convert(self.mode)
        if self.fit_to is not None:
            return fit(img, self.fit_to)
        if self.size is None:
            self.size = img.size
        elif img.size != self.size:
            raise UserError(
                f"{where}: image is {img.size[0]}x{img.size[1]}, the others "
                f"{self.size[0]}x{self.size[1]} (give --size to fit them all to one)"
            )
        return img

    def label_of(self, value: Any, where: str) -> int | None:
        if value is None:
            if self.labels_needed:
                raise UserError(f"{where}: no label")
            return None
        names = self.class_names
        if isinstance(value, str):
            if value not in self._index:
                raise UserError(f"{where}: label {value!r} is not among the classes {names}")
            return self._index[value]
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise UserError(f"{where}: label {value!r} is neither a class index nor a name")
        if not 0 <= int(value) < len(names):
            raise UserError(
                f"{where}: label {value} outside the {len(names)} classes [0, {len(names)})"
            )
        return int(value)
