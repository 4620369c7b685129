"""Every path is a URL: a local folder, s3://bucket/prefix or any fsspec protocol.

Nothing else in the project touches paths or file systems directly. Writes go to a
temporary name first and are moved into place (a rename locally, a single PUT on object
stores), so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def resolve(url: str) -> str:
    """Make local paths absolute so that a URL means the same thing in every process."""
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    if "://" in url:
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache()  # s3fs caches listings per instance; another writer may have added it
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def checksum(url: str) -> str:
    """The store's fingerprint of a file, without reading it: the ETag (the content's MD5
    for a single PUT) on S3-compatible stores, a hash of size and modification time locally.
    A file rewritten in place gets a new one."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return str(fs.checksum(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        # One PUT of the whole object: atomic on S3-compatible stores.
        fs.pipe_file(path, data)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=False).encode())


def write_parquet(url: str, table: pa.Table, row_group_size: int) -> str:
    """Write one Parquet file in a single atomic put; returns its SHA-256 for a manifest."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    data = buf.getvalue()
    write_bytes(url, data)
    return hashlib.sha256(data).hexdigest()


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
