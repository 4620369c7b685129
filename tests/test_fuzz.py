"""The readers against bytes nobody planned for (hypothesis): manifests, shards, configs and
images. Whatever the input, a reader either reads it or raises one `UserError` on one line
naming the file (and the key or row); never another exception, a traceback or a hang.

Example counts are bounded so that the whole module takes well under a minute.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from noisy_student import config
from noisy_student.data import dataset, ingest, storage
from noisy_student.errors import UserError
from tests.conftest import REPO

FUZZ = settings(
    max_examples=int(os.environ.get("NOISY_STUDENT_FUZZ_EXAMPLES", 60)),
    deadline=20000,  # ms per example: a busy 2-core machine, not a hang
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def one_line_naming(error: UserError, *names: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert " at 0x" not in message, message  # no object reprs
    for name in names:
        assert name in message, (name, message)


@pytest.fixture(scope="module")
def source(tmp_path_factory, fashion_mnist_source) -> dataset.Manifest:
    """A real unlabelled split: 12 images in two shards."""
    root = ingest.fashion_mnist(
        str(tmp_path_factory.mktemp("fuzz") / "data"),
        fashion_mnist_source,
        labelled_per_class=1,
        unlabelled_limit=12,
        test_limit=10,
        rows_per_shard=6,
    )
    return dataset.read_manifest(storage.join(root, dataset.UNLABELLED))


def copy_split(manifest: dataset.Manifest) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-split-"))
    for name in [dataset.MANIFEST, *(s["file"] for s in manifest.shards)]:
        (folder / name).write_bytes(Path(manifest.url, name).read_bytes())
    return folder


# --- manifest JSON -------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_subnormal=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def path_to_every_value(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from path_to_every_value(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from path_to_every_value(v, (*prefix, i))


def read_written_manifest(data: bytes) -> None:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-manifest-"))
    (folder / dataset.MANIFEST).write_bytes(data)
    try:
        dataset.read_manifest(str(folder))
    except UserError as e:
        one_line_naming(e, str(folder))


@FUZZ
@given(data=st.data())
def test_a_manifest_with_any_key_removed_or_replaced_is_read_or_refused_in_one_line(source, data):
    good = json.loads(Path(source.url, dataset.MANIFEST).read_text())
    paths = [p for p in path_to_every_value(good) if p]
    path = data.draw(st.sampled_from(paths))
    bad = copy.deepcopy(good)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    read_written_manifest(json.dumps(bad).encode())


@FUZZ
@given(raw=st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_a_manifest_of_garbage_bytes_or_any_json_is_refused_in_one_line(raw):
    read_written_manifest(raw)


@FUZZ
@given(cut=st.integers(min_value=0))
def test_a_truncated_manifest_is_refused_in_one_line(source, cut):
    data = Path(source.url, dataset.MANIFEST).read_bytes()
    read_written_manifest(data[: cut % len(data)])


def test_a_manifest_naming_a_file_outside_its_folder_is_refused(source):
    good = json.loads(Path(source.url, dataset.MANIFEST).read_text())
    good["shards"][0]["file"] = "../../elsewhere/part-00000.parquet"
    folder = Path(tempfile.mkdtemp(prefix="fuzz-manifest-"))
    (folder / dataset.MANIFEST).write_text(json.dumps(good))
    with pytest.raises(UserError, match=r"key shards\.0\.file") as e:
        dataset.read_manifest(str(folder))
    one_line_naming(e.value, str(folder / dataset.MANIFEST))


# --- shard bytes ---------------------------------------------------------------------------


def read_every_way(folder: Path, shard: str) -> None:
    """The shard through both readers (the checksum made to match, so the bytes reach the
    Parquet reader): read or refused in one line naming the shard."""
    manifest = dataset.read_manifest(str(folder))
    index = next(i for i, s in enumerate(manifest.shards) if s["file"] == shard)
    url = str(folder / shard)
    for read in (
        lambda: dataset.load_shard(manifest, index),
        lambda: list(dataset.iter_shard_batches(manifest, index, batch_size=4)),
    ):
        try:
            read()
        except UserError as e:
            one_line_naming(e, url)


def rewrite_shard(source: dataset.Manifest, data: bytes, fix_checksum: bool = True) -> Path:
    folder = copy_split(source)
    shard = source.shards[0]["file"]
    (folder / shard).write_bytes(data)
    if fix_checksum:
        m = json.loads((folder / dataset.MANIFEST).read_text())
        m["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
        (folder / dataset.MANIFEST).write_text(json.dumps(m))
    return folder


@FUZZ
@given(cut=st.integers(min_value=0))
def test_a_truncated_shard_is_refused_in_one_line(source, cut):
    data = Path(source.url, source.shards[0]["file"]).read_bytes()
    folder = rewrite_shard(source, data[: cut % len(data)])
    read_every_way(folder, source.shards[0]["file"])


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), min_size=1, max_size=8)
)
@example(flips=[(4338, 7)])  # a footer column name no longer UTF-8: UnicodeDecodeError
def test_a_shard_with_flipped_bits_is_read_or_refused_in_one_line(source, flips):
    data = bytearray(Path(source.url, source.shards[0]["file"]).read_bytes())
    for offset, bit in flips:
        data[offset % len(data)] ^= 1 << bit
    read_every_way(rewrite_shard(source, bytes(data)), source.shards[0]["file"])


def test_a_shard_whose_bytes_changed_under_the_manifest_is_refused(source):
    data = bytearray(Path(source.url, source.shards[0]["file"]).read_bytes())
    data[len(data) // 2] ^= 1
    folder = rewrite_shard(source, bytes(data), fix_checksum=False)
    with pytest.raises(UserError, match="checksum does not match") as e:
        list(dataset.iter_shard_batches(dataset.read_manifest(str(folder)), 0, 4))
    one_line_naming(e.value, str(folder / source.shards[0]["file"]))


column_types = st.sampled_from(
    [pa.string(), pa.binary(), pa.int32(), pa.int64(), pa.float32(), pa.large_binary()]
)


@FUZZ
@given(
    columns=st.dictionaries(
        st.sampled_from(["id", "image", "label", "extra"]), column_types, min_size=1, max_size=4
    )
)
def test_a_shard_of_another_schema_is_refused_naming_the_column(source, columns):
    arrays = {
        name: pa.array([None] * 6, type=kind) if kind != pa.string() else pa.array(["x"] * 6)
        for name, kind in columns.items()
    }
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf)
    folder = rewrite_shard(source, buf.getvalue())
    matches = all(
        name in columns
        and (columns[name] == kind or (name == "label" and pa.types.is_integer(columns[name])))
        for name, kind in zip(dataset.SCHEMA.names, dataset.SCHEMA.types, strict=True)
    )
    manifest = dataset.read_manifest(str(folder))
    if not matches:
        with pytest.raises(UserError, match="column") as e:
            list(dataset.iter_shard_batches(manifest, 0, 4))
        one_line_naming(e.value, str(folder / source.shards[0]["file"]))
    read_every_way(folder, source.shards[0]["file"])


# --- image bytes ---------------------------------------------------------------------------


def png(array_mode: str = "L", size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new(array_mode, (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


def decode_one(source: dataset.Manifest, blob: bytes | None) -> None:
    table = pa.table(
        {"id": ["fuzz/0001.png"], "image": [blob], "label": [None]}, schema=dataset.SCHEMA
    )
    try:
        dataset.decode_images(source, "memory://fuzz/part-00000.parquet", table, first_row=7)
    except UserError as e:
        one_line_naming(e, "memory://fuzz/part-00000.parquet", "row 7", "fuzz/0001.png")


@FUZZ
@given(blob=st.binary(max_size=300))
def test_any_bytes_as_an_image_are_decoded_or_refused_naming_the_row(source, blob):
    decode_one(source, blob)


@FUZZ
@given(cut=st.integers(min_value=0), flips=st.lists(st.integers(min_value=0), max_size=6))
def test_a_damaged_png_is_decoded_or_refused_naming_the_row(source, cut, flips):
    data = bytearray(png())
    for f in flips:
        data[f % len(data)] ^= 1 << (f % 8)
    decode_one(source, bytes(data[: max(1, cut % (len(data) + 1))]))


@pytest.mark.parametrize(
    ("blob", "says"),
    [
        (b"not a png", "not an image in a known format"),
        (png()[:45], "corrupt image"),
        (None, "corrupt image"),
        (png("RGB"), "image is RGB 28x28, manifest says L 28x28"),
        (png("L", 64), "image is L 64x64"),
    ],
)
def test_a_bad_image_message_names_the_row_and_shows_no_object(source, blob, says):
    table = pa.table({"id": ["a/1.png"], "image": [blob], "label": [None]}, schema=dataset.SCHEMA)
    with pytest.raises(UserError, match=says) as e:
        dataset.decode_images(source, "s3://b/part-00003.parquet", table, first_row=41)
    one_line_naming(e.value, "s3://b/part-00003.parquet: row 41 (id 'a/1.png')")


# --- config YAML ---------------------------------------------------------------------------

SMOKE = (REPO / "pipeline_config" / "smoke.yaml").read_text()
yaml_scalars = st.sampled_from(
    ["1", "-3", "0.5", "1e400", "yes", "null", "~", "[]", "{}", "'x'", "[1, [2]]", "!!binary aGk=",
     "&a 1", "*a", "{a: 1}", '"\\u0000"', "2026-01-01", "resnet18", "- a", ": :", "\t"]
)  # fmt: skip


def load_written_config(text: str | bytes) -> None:
    path = Path(tempfile.mkdtemp(prefix="fuzz-config-")) / "c.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        config.load(path)
    except UserError as e:
        one_line_naming(e, str(path))


@FUZZ
@given(data=st.data())
def test_a_config_with_any_line_changed_is_loaded_or_refused_in_one_line(data):
    lines = SMOKE.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    key, sep, _ = lines[i].partition(":")
    if sep and data.draw(st.booleans()):
        lines[i] = f"{key}: {data.draw(yaml_scalars)}"
    else:
        lines[i] = data.draw(st.text(max_size=30) | yaml_scalars)
    load_written_config("\n".join(lines))


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=200))
def test_a_config_of_garbage_is_refused_in_one_line(raw):
    load_written_config(raw)


@FUZZ
@given(
    tree=st.dictionaries(
        st.text(max_size=10) | st.integers(),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=10) | st.floats(allow_subnormal=False),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=6), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=5,
    )
)
def test_a_config_of_any_mapping_is_refused_naming_the_key(tree):
    import yaml

    load_written_config(yaml.safe_dump(tree, allow_unicode=True))


# --- clean messages from ingest ------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_file", "split"),
    [("unlabelled/broken.png", "unlabelled"), ("test/dog/broken.png", "test")],
)
def test_a_failed_ingest_says_why_in_one_line_and_leaves_no_folders_behind(
    tmp_path, bad_file, split
):
    raw = tmp_path / "raw"
    for path in ("labelled/cat/a.png", "labelled/dog/b.png", "test/cat/c.png",
                 "test/dog/d.png", "unlabelled/e.png"):  # fmt: skip
        (raw / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 30).save(raw / path)
    (raw / bad_file).write_bytes(b"not an image at all")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="corrupt image: not an image in a known format") as e:
        ingest.image_folder(
            str(out), str(raw / "labelled"), str(raw / "unlabelled"), str(raw / "test"), 8, "L"
        )
    one_line_naming(e.value, str(raw / bad_file))
    assert not out.exists()
    # into an existing folder: that folder stays, the splits' folders go
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        ingest.image_folder(
            str(out), str(raw / "labelled"), str(raw / "unlabelled"), str(raw / "test"), 8, "L"
        )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
