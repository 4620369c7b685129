"""Turn raw data into the dataset format: Fashion-MNIST IDX files or an ImageFolder tree.

Both write a dataset root with the splits `labelled/`, `unlabelled/` and `test/`, and,
when the true labels of the unlabelled images are known, `unlabelled_truth.parquet`
beside them. Those labels never reach training: they only score the pseudo labels.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import struct

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from noisy_student import storage
from noisy_student.dataset import LABELLED, TEST, UNLABELLED, UNLABELLED_TRUTH, write_rows
from noisy_student.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
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
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise UserError(f"class {c} has {len(pool)} images, fewer than {per_class} asked")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_truth(root: str, ids: list[str], labels: list[int]) -> None:
    table = pa.table({"id": ids, "label": pa.array(labels, pa.int32())})
    storage.write_parquet(storage.join(root, UNLABELLED_TRUTH), table, row_group_size=65536)


def fashion_mnist(
    out: str,
    source: str = FASHION_MNIST_DIR,
    labelled_per_class: int = 100,
    unlabelled_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    rows_per_shard: int = 8192,
) -> str:
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

    labelled = split_labelled(y_train, labelled_per_class, seed)
    rest = np.setdiff1d(np.arange(len(y_train)), labelled)
    if unlabelled_limit is not None:
        rest = np.sort(np.random.default_rng(seed + 1).permutation(rest)[:unlabelled_limit])
    test = np.arange(len(y_test))
    if test_limit is not None:
        test = np.sort(np.random.default_rng(seed + 2).permutation(test)[:test_limit])

    classes = FASHION_MNIST_CLASSES
    write_truth(out, [f"train-{i:05d}" for i in rest], [int(y_train[i]) for i in rest])
    for split, x, y, idx, prefix, keep_label in [
        (LABELLED, x_train, y_train, labelled, "train", True),
        (UNLABELLED, x_train, y_train, rest, "train", False),
        (TEST, x_test, y_test, test, "test", True),
    ]:
        rows = ((f"{prefix}-{i:05d}", x[i], int(y[i]) if keep_label else None) for i in idx)
        write_rows(storage.join(out, split), split, classes, rows, rows_per_shard)
    return out


def _list_images(fs, folder: str) -> list[str]:
    files = sorted(p for p in fs.find(folder) if not posixpath.basename(p).startswith("."))
    return files


def _load_image(fs, path: str, url: str, size: int, mode: str) -> np.ndarray:
    if posixpath.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{url}: not an image file (expected one of {sorted(IMAGE_SUFFIXES)})")
    try:
        with fs.open(path, "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
            img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{url}: corrupt image: {e}") from None
    img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def image_folder(
    out: str,
    labelled: str,
    unlabelled: str,
    test: str,
    image_size: int,
    mode: str = "RGB",
    rows_per_shard: int = 8192,
) -> str:
    """`labelled` and `test` hold one sub-folder per class; `unlabelled` holds images only.

    Every image is converted to `mode` ("L" or "RGB") and resized to image_size^2.
    """
    if mode not in ("L", "RGB"):
        raise UserError(f"mode must be 'L' or 'RGB', not {mode!r}")
    out = storage.resolve(out)
    fs, lab_root = storage.filesystem(storage.resolve(labelled))
    if not fs.isdir(lab_root):
        raise UserError(f"{labelled}: folder not found")
    classes = sorted(
        posixpath.basename(p.rstrip("/")) for p in fs.ls(lab_root, detail=False) if fs.isdir(p)
    )
    if not classes:
        raise UserError(f"{labelled}: no class sub-folders")

    def class_rows(url: str, split: str):
        fs, root = storage.filesystem(storage.resolve(url))
        if not fs.isdir(root):
            raise UserError(f"{url}: folder not found")
        for p in _list_images(fs, root):
            rel = posixpath.relpath(p, root)
            cls = rel.split("/")[0]
            if cls not in classes:
                raise UserError(f"{storage.join(url, rel)}: class {cls!r} not among {classes}")
            img = _load_image(fs, p, storage.join(url, rel), image_size, mode)
            yield f"{split}/{rel}", img, classes.index(cls)

    def plain_rows(url: str):
        fs, root = storage.filesystem(storage.resolve(url))
        if not fs.isdir(root):
            raise UserError(f"{url}: folder not found")
        for p in _list_images(fs, root):
            rel = posixpath.relpath(p, root)
            yield (
                f"unlabelled/{rel}",
                _load_image(fs, p, storage.join(url, rel), image_size, mode),
                None,
            )

    write_rows(
        storage.join(out, LABELLED),
        LABELLED,
        classes,
        class_rows(labelled, LABELLED),
        rows_per_shard,
    )
    write_rows(
        storage.join(out, UNLABELLED), UNLABELLED, classes, plain_rows(unlabelled), rows_per_shard
    )
    write_rows(storage.join(out, TEST), TEST, classes, class_rows(test, TEST), rows_per_shard)
    return out
