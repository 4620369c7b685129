"""Every path is a URL: a local folder, s3://bucket/prefix or any fsspec protocol.

Nothing else in the project touches paths or file systems directly. Writes go to a
temporary name first and are moved into place (a rename locally, a single PUT on object
stores), so a reader never sees half a file, and writing the same bytes again is harmless.

Every request is retried with exponential backoff and jitter when it fails for a reason
that may pass (an S3 5xx or SlowDown, a timeout, a reset connection); never when the
answer will not change (no such key, access denied). What still fails becomes a one-line
`StorageError` naming the URL.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import posixpath
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from noisy_student.errors import StorageError, StorageUnavailable, UserError

T = TypeVar("T")


@dataclass
class RetryPolicy:
    attempts: int = 5  # tries in all, the first included
    base_delay: float = 0.5  # seconds before the second try; doubled for each further one
    max_delay: float = 10.0


RETRY = RetryPolicy()

# Error codes S3-compatible stores answer when the request may succeed if repeated.
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    # AWS's answer (409) when two conditional writes to one key overlap; repeated, the
    # request succeeds or meets the other writer's object (see `create_bytes`)
    "ConditionalRequestConflict",
}
# Network failures by class name, so that botocore and aiohttp need not be imported here.
_TRANSIENT_CLASSES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "FSTimeoutError",
}
# ... and by errno, as s3fs reports a 500 (EREMOTEIO) or a 503 SlowDown (EBUSY)
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EREMOTEIO,
    errno.EBUSY,
}
_AUTH_CLASSES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it: s3fs turns a botocore 5xx into a plain OSError."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the request may succeed."""
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        names = {c.__name__ for c in type(e).__mro__}
        if names & _AUTH_CLASSES:
            return False
        if isinstance(e, ConnectionError | TimeoutError) or names & _TRANSIENT_CLASSES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(e, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_CODES or int(status) >= 500 or code[:1] == "5"
    return False


def _is_auth(exc: BaseException) -> bool:
    return any(
        isinstance(e, PermissionError) or {c.__name__ for c in type(e).__mro__} & _AUTH_CLASSES
        for e in _chain(exc)
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# the jitter's own generator: retries never draw from (or reseed) the global `random`
# that the caller, or a test framework such as Hypothesis, may have seeded
_JITTER = random.Random()


def backoff(attempt: int, policy: RetryPolicy) -> float:
    """Seconds to wait after the `attempt`-th failure: exponential, with jitter so that
    many workers failing together do not retry together."""
    delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
    return delay / 2 + _JITTER.uniform(0, delay / 2)


def call(url: str, fn: Callable[[], T]) -> T:
    """Run one storage request on `url`, retrying transient failures with backoff.

    A refusal (credentials) or a failure outlasting the retries becomes a one-line
    StorageError naming the URL; other errors (FileNotFoundError, ...) pass unchanged.
    """
    policy = RETRY
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            if is_transient(e):
                if attempt < policy.attempts:
                    time.sleep(backoff(attempt, policy))
                    continue
                raise StorageUnavailable(
                    f"{url}: storage unreachable after {attempt} attempts: {_one_line(e)}"
                ) from e
            if _is_auth(e):
                raise StorageError(
                    f"{url}: access denied ({_one_line(e)}); check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
                ) from e
            raise
    raise AssertionError("unreachable")  # the loop returns or raises


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

    def check() -> bool:
        fs.invalidate_cache()  # s3fs caches listings per instance; another writer may have added it
        return fs.exists(path)

    return call(url, check)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    call(url, lambda: fs.makedirs(path, exist_ok=True))


def checksum(url: str) -> str:
    """The store's fingerprint of a file, without reading it: the ETag (the content's MD5
    for a single PUT) on S3-compatible stores, a hash of size and modification time locally.
    A file rewritten in place gets a new one."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return str(fs.checksum(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    return call(url, read)


TMP_SUFFIX = ".tmp-"
# Who wrote a temporary file: this host (a short hash of its name) and process. A write
# removes only the leftovers of writers that are gone, never one still writing beside it.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_name(path: str) -> str:
    return f"{path}{TMP_SUFFIX}{_HOST}.{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _left_by_a_dead_writer(tmp: str) -> bool:
    """True for a temporary file whose writer is known to be gone: a process of this host
    that no longer runs, or a name of no known layout (a killed write of an older version).
    Files of live processes (this one's other threads included) and of other hosts sharing
    the file system are left alone; `noisy-student gc` removes those by age."""
    owner = tmp.rsplit(TMP_SUFFIX, 1)[-1].split("-", 1)[0]
    host, _, pid = owner.partition(".")
    if not pid.isdigit():
        return True
    if host != _HOST:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # What a killed attempt left behind: never read (the name differs), removed here.
    for stale in glob.glob(glob.escape(path) + TMP_SUFFIX + "*"):
        if _left_by_a_dead_writer(stale):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Write the whole object at once; repeating the call with the same bytes is harmless."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        call(url, lambda: _write_local(path, data))
    else:
        # One PUT of the whole object (or one completed multipart upload for very large
        # ones): atomic on S3-compatible stores, so a retry simply replaces it.
        call(url, lambda: fs.pipe_file(path, data))


def _create_local(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and refused when the name exists: whole file or none
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _precondition_failed(exc: BaseException) -> bool:
    """S3's answer to a PUT with `If-None-Match: *` on an existing key. s3fs turns it into
    FileExistsError when the reply names the condition, else into a generic error."""
    return isinstance(exc, FileExistsError) or any(
        "PreconditionFailed" in repr(e) for e in _chain(exc)
    )


def create_bytes(url: str, data: bytes) -> bool:
    """Write `url` only if nothing is there yet, atomically: the commit point when several
    writers race for one name, where exactly one wins. True when these bytes are there now
    (written by this call, or by an attempt of it whose reply was lost before a retry),
    False when another writer's are.

    Exclusive locally (a hard link) and on S3-compatible stores that honour
    `If-None-Match: *` (AWS S3, MinIO, moto); elsewhere fsspec checks, then writes.
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        written = call(url, lambda: _create_local(path, data))
    else:

        def put() -> bool:
            try:
                fs.pipe_file(path, data, mode="create")
            except Exception as e:
                if _precondition_failed(e):
                    return False
                raise
            return True

        written = call(url, put)
    return written or read_bytes(url) == data


@contextmanager
def local_copy(url: str, chunk_size: int = 1 << 20) -> Iterator[tuple[str, str]]:
    """A local path holding the file at `url` and the file's SHA-256, read once in chunks
    (constant memory): the file itself when it is local, else a temporary copy (downloaded
    with retries, as every request here), removed on exit. Raises FileNotFoundError when
    the file is missing."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):

        def digest_local() -> str:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(chunk_size):
                    digest.update(block)
            return digest.hexdigest()

        yield path, call(url, digest_local)
        return
    with tempfile.NamedTemporaryFile(suffix=posixpath.splitext(path)[1]) as tmp:

        def download() -> str:
            digest = hashlib.sha256()
            tmp.seek(0)
            tmp.truncate()
            with fs.open(path, "rb") as f:
                while block := f.read(chunk_size):
                    digest.update(block)
                    tmp.write(block)
            tmp.flush()
            return digest.hexdigest()

        yield tmp.name, call(url, download)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False).encode()


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json_bytes(obj))


def read_verified(url: str, sha256: str, named_in: str) -> bytes:
    """The whole file at `url`, checked against the SHA-256 that `named_in` (the record
    that names the file) gives for it; a missing file or other bytes is a one-line error.
    For small files read whole; dataset shards go through `dataset.open_shard`."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"{url}: named in {named_in}, but missing") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{url}: checksum does not match {named_in}")
    return data


def write_parquet(url: str, table: pa.Table, row_group_size: int) -> str:
    """Write one Parquet file in a single atomic put; returns its SHA-256 for a manifest."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    data = buf.getvalue()
    write_bytes(url, data)
    return hashlib.sha256(data).hexdigest()


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """The file's table (or its `columns`); a damaged file, or one without those columns,
    is a one-line UserError naming the URL. A missing file raises FileNotFoundError."""
    fs, path = filesystem(url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            try:
                return pq.read_table(f, columns=columns)
            except (pa.ArrowException, UnicodeDecodeError) as e:
                if is_transient(e):
                    raise
                wanted = f" (columns {', '.join(columns)})" if columns else ""
                raise UserError(
                    f"{url}: not a readable Parquet file{wanted}: {_one_line(e)}"
                ) from None

    return call(url, read)


def remove(url: str) -> None:
    fs, path = filesystem(url)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=True)

    call(url, rm)


def find(url: str) -> list[str]:
    """URLs of every file under a folder, sorted."""
    fs, path = filesystem(url)
    found = call(url, lambda: fs.find(path))
    return [join(url, posixpath.relpath(p, path)) for p in sorted(found)]


@dataclass(frozen=True)
class FileInfo:
    url: str
    size: int
    modified: float | None  # seconds since the epoch; None where the store does not say


def _modified(info: dict[str, Any]) -> float | None:
    # each fsspec file system names it its own way: local mtime, S3 LastModified, …
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return None


def find_files(url: str) -> list[FileInfo]:
    """Every file under a folder with its size and modification time, sorted by URL."""
    fs, path = filesystem(url)

    def listing() -> dict[str, dict[str, Any]]:
        fs.invalidate_cache()
        return fs.find(path, detail=True)

    found = call(url, listing)
    return [
        FileInfo(join(url, posixpath.relpath(p, path)), int(info.get("size") or 0), _modified(info))
        for p, info in sorted(found.items())
    ]


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return call(url, lambda: fs.isdir(path))


def subfolders(url: str) -> list[str]:
    """Names of the folders directly under a folder, sorted."""
    fs, path = filesystem(url)
    entries = call(url, lambda: fs.ls(path, detail=True))
    return sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"
    )
