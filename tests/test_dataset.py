"""The dataset format: Parquet shards plus a manifest written last, checked on read."""

from __future__ import annotations

import hashlib
import io
import re
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from noisy_student.data import dataset, dataset_writer, storage, training_data
from noisy_student.data.dataset_writer import DatasetWriter
from noisy_student.data.prefetch import prefetch
from noisy_student.errors import UserError
from noisy_student.evaluation import robustness

CLASSES = ["a", "b", "c"]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 6), dtype=np.uint8)


def _write(url: str, arrays: np.ndarray, labels: list[int | None], rows_per_shard: int = 4):
    with DatasetWriter(url, "labelled", CLASSES, 8, 6, "L", rows_per_shard) as w:
        for i, (a, y) in enumerate(zip(arrays, labels, strict=True)):
            w.add(f"img-{i}", dataset_writer.encode_png(a), y)


def _round_trip(url: str) -> None:
    arrays = _images(10)
    labels = [0, 1, None, 2, 0, None, 1, 2, 2, 0]
    _write(url, arrays, labels)

    manifest, images = dataset.load(url)
    assert manifest.num_rows == 10
    assert len(manifest.shards) == 3  # 4 + 4 + 2 rows
    assert (manifest.height, manifest.width, manifest.mode) == (8, 6, "L")
    assert manifest.class_names == CLASSES
    assert images.ids == [f"img-{i}" for i in range(10)]
    # nulls come back as -1
    assert images.labels.tolist() == [-1 if y is None else y for y in labels]
    assert images.images.dtype == torch.uint8
    assert images.images.shape == (10, 1, 8, 6)
    assert torch.equal(images.images[:, 0], torch.from_numpy(arrays))


def test_written_dataset_reads_back_the_same_ids_labels_and_pixels(tmp_path):
    _round_trip(str(tmp_path / "ds"))


def test_dataset_round_trips_through_s3(s3_endpoint):
    url = "s3://ns-test/datasets/round-trip"
    _round_trip(url)
    # the shards and manifest really are objects in the bucket
    assert storage.exists(f"{url}/{dataset.MANIFEST}")
    assert storage.exists(f"{url}/part-00000.parquet")


def test_manifest_is_not_written_when_the_writing_block_raises(tmp_path):
    url = str(tmp_path / "half")
    with pytest.raises(RuntimeError), DatasetWriter(url, "labelled", CLASSES, 8, 6, "L", 2) as w:
        for i, a in enumerate(_images(5)):
            w.add(f"img-{i}", dataset_writer.encode_png(a), 0)
        raise RuntimeError("crash mid-write")
    # the shards flushed before the crash are removed, and without a manifest the folder
    # is not a dataset
    assert not storage.exists(storage.join(url, "part-00000.parquet"))
    with pytest.raises(UserError, match=re.escape(url) + ".*no dataset here"):
        dataset.read_manifest(url)


def test_rewriting_a_dataset_removes_the_old_manifest_before_writing_shards(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(3), [0, 1, 2])
    # a second write that crashes must not leave the first manifest vouching for new shards
    with pytest.raises(RuntimeError), DatasetWriter(url, "labelled", CLASSES, 8, 6, "L", 1) as w:
        w.add("other", dataset_writer.encode_png(_images(1, seed=1)[0]), 0)
        raise RuntimeError("crash")
    with pytest.raises(UserError, match="no dataset here"):
        dataset.read_manifest(url)


def test_duplicate_id_is_rejected_naming_the_id(tmp_path):
    png = dataset_writer.encode_png(_images(1)[0])
    with DatasetWriter(str(tmp_path / "ds"), "labelled", CLASSES, 8, 6, "L") as w:
        w.add("twice", png, 0)
        with pytest.raises(UserError, match="duplicate id 'twice'"):
            w.add("twice", png, 1)


@pytest.mark.parametrize("label", [3, -1])
def test_label_outside_the_classes_is_rejected_naming_the_id(tmp_path, label):
    png = dataset_writer.encode_png(_images(1)[0])
    with (
        DatasetWriter(str(tmp_path / "ds"), "labelled", CLASSES, 8, 6, "L") as w,
        pytest.raises(UserError, match=rf"id 'bad-label': label {label} outside \[0, 3\)"),
    ):
        w.add("bad-label", png, label)


def test_tampered_shard_fails_its_checksum(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(6), [0] * 6)
    manifest = dataset.read_manifest(url)
    shard = manifest.shard_urls()[1]
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(shard, bytes(data))
    with pytest.raises(UserError, match=re.escape(f"{shard}: checksum")):
        dataset.load(url)
    # the untouched shard still reads
    assert len(dataset.load_shard(manifest, 0)) == 4


def test_missing_shard_is_reported_as_missing(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(6), [0] * 6)
    manifest = dataset.read_manifest(url)
    storage.remove(manifest.shard_urls()[0])
    with pytest.raises(UserError, match="shard listed in the manifest is missing"):
        dataset.load(url)


def test_corrupt_image_bytes_name_the_shard_row_and_id(tmp_path):
    url = str(tmp_path / "ds")
    with DatasetWriter(url, "labelled", CLASSES, 8, 6, "L", rows_per_shard=100) as w:
        w.add("good", dataset_writer.encode_png(_images(1)[0]), 0)
        w.add("garbage", b"definitely not a png", 1)
    manifest = dataset.read_manifest(url)  # the checksum is of the shard, so it passes
    shard = manifest.shard_urls()[0]
    with pytest.raises(UserError, match=re.escape(f"{shard}: row 1 (id 'garbage'): corrupt image")):
        dataset.load(url)


def test_image_of_the_wrong_size_is_rejected_against_the_manifest(tmp_path):
    url = str(tmp_path / "ds")
    with DatasetWriter(url, "labelled", CLASSES, 8, 6, "L") as w:
        w.add("too-big", dataset_writer.encode_png(np.zeros((9, 6), np.uint8)), 0)
    with pytest.raises(UserError, match=r"id 'too-big'.*manifest says L 6x8"):
        dataset.load(url)


def test_png_rows_decode_to_pils_pixels_and_other_pngs_are_refused_in_one_line(tmp_path):
    """8-bit L and RGB rows decode (by libspng) to PIL's pixels; a palette image, a 16-bit
    one (both left to PIL), a truncated one and one whose header checksum is wrong are
    refused with the row, the id and what is wrong."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for mode, shape in (("L", (8, 6)), ("RGB", (8, 6, 3))):
        arrays = rng.integers(0, 256, size=(5, *shape), dtype=np.uint8)
        url = str(tmp_path / mode)
        with DatasetWriter(url, "test", CLASSES, 8, 6, mode) as w:
            for i, a in enumerate(arrays):
                w.add(f"{mode}-{i}", dataset_writer.encode_png(a), i % 3)
        _, images = dataset.load(url)
        blobs = [dataset_writer.encode_png(a) for a in arrays]
        assert all(dataset._Png.open(b) is not None for b in blobs)  # libspng decoded them
        pil = [np.asarray(Image.open(io.BytesIO(b))) for b in blobs]
        expected = torch.from_numpy(np.stack(pil).reshape(5, 8, 6, -1)).permute(0, 3, 1, 2)
        assert torch.equal(images.images, expected)
        # the training reader's threads ask for decoders that release the GIL: PIL's
        manifest = dataset.read_manifest(url)
        table = pq.read_table(manifest.shard_urls()[0])
        with mock.patch.object(dataset.pyspng, "load", side_effect=AssertionError("pyspng")):
            pils = dataset.decode_images(manifest, url, table, release_gil=True)
        assert torch.equal(pils, expected)

    def png(image) -> bytes:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    big = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)  # over MAX_PIXELS: PIL's
    assert dataset._Png.open(dataset_writer.encode_png(big)) is None
    url = str(tmp_path / "big")
    with DatasetWriter(url, "test", CLASSES, 64, 64, "L") as w:
        w.add("big", dataset_writer.encode_png(big), 0)
    assert torch.equal(dataset.load(url)[1].images[0, 0], torch.from_numpy(big))

    palette = png(Image.fromarray(_images(1)[0]).convert("P"))
    wide = png(Image.fromarray(_images(1)[0].astype(np.uint16) * 257))
    whole = dataset_writer.encode_png(_images(1)[0])
    bad_crc = whole[:29] + bytes([whole[29] ^ 1]) + whole[30:]  # the header's checksum
    assert dataset._Png.open(palette) is None and dataset._Png.open(wide) is None  # PIL's
    for name, blob, message in (
        ("palette", palette, "image is P 6x8, manifest says L 6x8"),
        ("16-bit", wide, "image is I;16 6x8, manifest says L 6x8"),
        ("truncated", whole[: len(whole) // 2], "corrupt image: RuntimeError"),
        ("bad-crc", bad_crc, "corrupt image: ValueError: the PNG header's checksum is wrong"),
    ):
        url = str(tmp_path / name)
        with DatasetWriter(url, "labelled", CLASSES, 8, 6, "L") as w:
            w.add(name, blob, 0)
        with pytest.raises(UserError, match=re.escape(f"(id {name!r}): {message}")):
            dataset.load(url)


def test_shards_use_row_groups_of_at_most_row_group_size(tmp_path):
    url = str(tmp_path / "ds")
    n = 2 * dataset.ROW_GROUP_SIZE + 10
    png = dataset_writer.encode_png(_images(1)[0])
    with DatasetWriter(url, "unlabelled", CLASSES, 8, 6, "L", rows_per_shard=n) as w:
        for i in range(n):
            w.add(f"img-{i}", png, None)
    manifest = dataset.read_manifest(url)
    assert len(manifest.shards) == 1
    meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(manifest.shard_urls()[0]))).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == n
    assert meta.num_row_groups == 3
    assert max(sizes) <= dataset.ROW_GROUP_SIZE


def test_write_rows_picks_rgb_mode_for_colour_arrays_and_refuses_an_empty_split(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    m = dataset_writer.write_rows(
        str(tmp_path / "rgb"), "test", CLASSES, [("x", rgb[0], 0), ("y", rgb[1], 2)]
    )
    assert (m.mode, m.channels, m.height, m.width) == ("RGB", 3, 5, 7)
    _, images = dataset.load(m.url)
    assert torch.equal(images.images, torch.from_numpy(rgb).permute(0, 3, 1, 2))
    with pytest.raises(UserError, match="no images to write for split 'test'"):
        dataset_writer.write_rows(str(tmp_path / "empty"), "test", CLASSES, [])


def test_require_labels_names_an_unlabelled_id_and_a_class_without_images(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(3), [0, None, 1])
    manifest, images = dataset.load(url)
    with pytest.raises(UserError, match="id 'img-1' has no label"):
        dataset.require_labels(manifest, images)
    url2 = str(tmp_path / "ds2")
    _write(url2, _images(2), [0, 1])
    manifest, images = dataset.load(url2)
    with pytest.raises(UserError, match="no labelled image for class 'c'"):
        dataset.require_labels(manifest, images)


# ---------------------------------------------------------------- streaming reads


def _one_shard(url: str, n: int) -> dataset.Manifest:
    with DatasetWriter(url, "unlabelled", CLASSES, 8, 6, "L", rows_per_shard=n) as w:
        for i, a in enumerate(_images(n)):
            w.add(f"img-{i}", dataset_writer.encode_png(a), None)
    return dataset.read_manifest(url)


@pytest.mark.parametrize("batch_size", [7, 1024, 2000])
def test_shard_batches_regroup_row_groups_and_match_the_whole_shard(tmp_path, batch_size):
    # 2,058 rows in row groups of 1,024: batches cross row-group boundaries
    n = 2 * dataset.ROW_GROUP_SIZE + 10
    manifest = _one_shard(str(tmp_path / "ds"), n)
    whole = dataset.load_shard(manifest, 0)
    batches = list(dataset.iter_shard_batches(manifest, 0, batch_size))
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert 0 < len(batches[-1]) <= batch_size
    assert [i for b in batches for i in b.ids] == whole.ids
    assert torch.equal(torch.cat([b.images for b in batches]), whole.images)
    assert torch.cat([b.labels for b in batches]).tolist() == [-1] * n


def test_channels_last_batches_are_the_same_pixels_in_the_models_layout_without_a_copy(
    tmp_path,
):
    url = str(tmp_path / "ds")
    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, (9, 8, 6, 3), dtype=np.uint8)
    with DatasetWriter(url, "unlabelled", CLASSES, 8, 6, "RGB", rows_per_shard=9) as w:
        for i, a in enumerate(arrays):
            w.add(f"img-{i}", dataset_writer.encode_png(a), None)
    manifest = dataset.read_manifest(url)
    [plain] = dataset.iter_shard_batches(manifest, 0, 9)
    [last] = dataset.iter_shard_batches(manifest, 0, 9, channels_last=True)
    assert plain.images.is_contiguous() and not last.images.is_contiguous()
    assert last.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last.images, plain.images)
    assert torch.equal(last.images.permute(0, 2, 3, 1), torch.from_numpy(arrays))


def test_decoding_on_threads_gives_the_same_pixels_and_names_the_first_bad_row(tmp_path):
    url = str(tmp_path / "ds")
    arrays = np.random.default_rng(4).integers(0, 256, (10, 8, 6, 3), dtype=np.uint8)
    with DatasetWriter(
        url, "unlabelled", CLASSES, 8, 6, "RGB", rows_per_shard=10, encoding="jpeg"
    ) as w:
        for i, a in enumerate(arrays):
            w.add(f"img-{i}", dataset_writer.encode_jpeg(a, 90), None)
    manifest = dataset.read_manifest(url)
    assert dataset.decodes_without_gil(manifest)
    table = pq.read_table(f"{url}/part-00000.parquet")
    one = dataset.decode_images(manifest, "s", table)
    for threads in (2, 3, 16):
        assert torch.equal(dataset.decode_images(manifest, "s", table, threads=threads), one)
    blobs = table.column("image").to_pylist()
    blobs[3] = blobs[8] = b"\xff\xd8 not the rest of a JPEG"
    bad = table.set_column(1, "image", pa.array(blobs, pa.binary()))
    for threads in (1, 2):  # row 8 is in the second thread's run, row 3 in the first's
        with pytest.raises(UserError, match=r"^s: row 13 \(id 'img-3'\): corrupt image"):
            dataset.decode_images(manifest, "s", bad, first_row=10, threads=threads)


def test_shard_batches_check_the_checksum_before_yielding_anything(tmp_path):
    url = str(tmp_path / "ds")
    manifest = _one_shard(url, 10)
    shard = manifest.shard_urls()[0]
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(shard, bytes(data))
    with pytest.raises(UserError, match=re.escape(f"{shard}: checksum")):
        next(dataset.iter_shard_batches(manifest, 0, 4))
    storage.remove(shard)
    with pytest.raises(UserError, match="shard listed in the manifest is missing"):
        next(dataset.iter_shard_batches(manifest, 0, 4))


def _change_bytes(shard: str) -> None:
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(shard, bytes(data))


def _rewrite_with_checksum(manifest: dataset.Manifest, index: int, table) -> None:
    """Shard `index` replaced by `table`, the manifest's checksum made to match."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(manifest.shard_urls()[index], buf.getvalue())
    info = storage.read_json(storage.join(manifest.url, dataset.MANIFEST))
    info["shards"][index]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    storage.write_json(storage.join(manifest.url, dataset.MANIFEST), info)


SPLIT_READERS = {
    "load": lambda m: dataset.load(m.url),
    "shard batches": lambda m: list(dataset.iter_shard_batches(m, 1, 4)),
    "judged in batches": lambda m: list(robustness.read_batches(m, 4)),
    "judged on a subset": lambda m: list(robustness.read_batches(m, 4, torch.tensor([5]))),
    "training rows": lambda m: training_data.labelled_rows(m),
}
SHARD_FAULTS = {
    "changed bytes": (_change_bytes, "checksum does not match the manifest"),
    "missing": (storage.remove, "shard listed in the manifest is missing"),
}


@pytest.mark.parametrize("reader", SPLIT_READERS.values(), ids=SPLIT_READERS.keys())
@pytest.mark.parametrize("fault", SHARD_FAULTS.values(), ids=SHARD_FAULTS.keys())
def test_every_reader_of_a_split_refuses_a_bad_shard_in_the_same_words(tmp_path, reader, fault):
    url = str(tmp_path / "ds")
    _write(url, _images(8), [0, 1, 2, 0, 1, 2, 0, 1])
    manifest = dataset.read_manifest(url)
    spoil, says = fault
    spoil(manifest.shard_urls()[1])
    with pytest.raises(UserError, match=re.escape(f"{manifest.shard_urls()[1]}: {says}")):
        reader(manifest)


@pytest.mark.parametrize("reader", SPLIT_READERS.values(), ids=SPLIT_READERS.keys())
def test_every_reader_of_a_split_checks_a_shards_columns_and_rows(tmp_path, reader):
    url = str(tmp_path / "ds")
    _write(url, _images(8), [0, 1, 2, 0, 1, 2, 0, 1])
    manifest = dataset.read_manifest(url)
    shard = manifest.shard_urls()[1]
    table = pq.read_table(shard)
    _rewrite_with_checksum(manifest, 1, table.drop_columns(["image"]))
    with pytest.raises(UserError, match=re.escape(f"{shard}: no column 'image'")):
        reader(dataset.read_manifest(url))
    _rewrite_with_checksum(manifest, 1, table.slice(0, 3))
    with pytest.raises(UserError, match=re.escape(f"{shard}: 3 rows, manifest says 4")):
        reader(dataset.read_manifest(url))


def test_shard_batches_name_the_row_of_a_corrupt_image_in_a_later_batch(tmp_path):
    url = str(tmp_path / "ds")
    with DatasetWriter(url, "labelled", CLASSES, 8, 6, "L", rows_per_shard=100) as w:
        for i, a in enumerate(_images(5)):
            w.add(f"ok-{i}", dataset_writer.encode_png(a), 0)
        w.add("garbage", b"not a png", 1)
    manifest = dataset.read_manifest(url)
    batches = dataset.iter_shard_batches(manifest, 0, 4)
    assert len(next(batches)) == 4
    with pytest.raises(UserError, match=re.escape("row 5 (id 'garbage'): corrupt image")):
        next(batches)


def test_shard_batches_stream_from_s3(s3_endpoint):
    url = "s3://ns-test/datasets/stream"
    manifest = _one_shard(url, 9)
    batches = list(dataset.iter_shard_batches(manifest, 0, 4))
    assert [len(b) for b in batches] == [4, 4, 1]
    assert torch.equal(
        torch.cat([b.images for b in batches]), dataset.load_shard(manifest, 0).images
    )


def test_prefetch_keeps_order_and_raises_the_producers_error_in_the_consumer():
    assert list(prefetch(range(10), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise ValueError("decoding failed")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="decoding failed"):
        next(stream)


def test_prefetch_stops_and_closes_the_producer_when_the_consumer_stops():
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    stream = prefetch(endless(), depth=1)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # joins the producer thread
    assert closed == [True]


def test_the_cores_counted_are_the_affinity_where_the_os_has_one_else_every_core(monkeypatch):
    import os

    from noisy_student.data import prefetch as module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert module.cores() == 1  # a container or taskset limit, which cpu_count() misses
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have none
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert module.cores() == 8


# --- appends racing each other -------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    """A fresh folder on the local disk, or on S3 (moto's server, which honours
    `If-None-Match: *` as AWS S3 and MinIO do)."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_endpoint")
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://ns-test/race-{uuid.uuid4().hex[:8]}"


def test_create_bytes_lets_exactly_one_of_many_racing_writers_win(store):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    url = storage.join(store, "_manifests", "00002.json")
    start = Barrier(8)

    def attempt(i: int) -> bool:
        start.wait()
        return storage.create_bytes(url, f"writer {i}".encode())

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(attempt, range(8)))
    assert won.count(True) == 1
    assert storage.read_bytes(url) == f"writer {won.index(True)}".encode()
    # the winner's retry after a lost reply still counts as its own write
    assert storage.create_bytes(url, f"writer {won.index(True)}".encode())


def _appender(url: str, ids: list[str], seed: int) -> DatasetWriter:
    """An append that has written its shards and not yet committed."""
    base = dataset.read_manifest(url)
    w = DatasetWriter(url, base.split, CLASSES, 8, 6, "L", 4, base=base).__enter__()
    for i, a in zip(ids, _images(len(ids), seed), strict=True):
        w.add(i, dataset_writer.encode_png(a), None)
    w._flush()
    return w


def test_appends_from_the_same_version_all_land_in_order_of_commit(store):
    url = storage.join(store, "ds")
    _write(url, _images(10), [0, 1, 2] * 3 + [0])
    a = _appender(url, [f"a-{i}" for i in range(6)], seed=1)
    b = _appender(url, [f"b-{i}" for i in range(5)], seed=2)
    c = _appender(url, [f"c-{i}" for i in range(3)], seed=3)
    for w in (b, a, c):  # all three read version 1; b commits first
        w.commit()

    manifest, images = dataset.load(url)  # every shard checked against its checksum
    assert manifest.version == 4 and manifest.num_rows == 24
    assert images.ids == (
        [f"img-{i}" for i in range(10)]
        + [f"b-{i}" for i in range(5)]
        + [f"a-{i}" for i in range(6)]
        + [f"c-{i}" for i in range(3)]
    )
    assert torch.equal(images.images[10:15, 0], torch.from_numpy(_images(5, 2)))
    history = [
        storage.read_json(storage.join(url, dataset.HISTORY, f"{v:05d}.json")) for v in (1, 2, 3, 4)
    ]
    assert [h["num_rows"] for h in history] == [10, 15, 21, 24]


def test_racing_appends_in_threads_lose_nothing(store):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    url = storage.join(store, "ds")
    _write(url, _images(4), [0, 1, 2, 0])
    start = Barrier(4)

    def append(k: int) -> None:
        rows = [(f"w{k}-{i}", a, None) for i, a in enumerate(_images(3, seed=10 + k))]
        start.wait()
        dataset_writer.append_rows(url, rows, rows_per_shard=2)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(append, range(4)))
    manifest, images = dataset.load(url)
    assert manifest.version == 5 and manifest.num_rows == 16
    assert sorted(images.ids[4:]) == sorted(f"w{k}-{i}" for k in range(4) for i in range(3))


def test_an_append_racing_another_with_the_same_id_is_refused_and_removes_its_shards(store):
    url = storage.join(store, "ds")
    _write(url, _images(4), [0, 1, 2, 0])
    a = _appender(url, ["new-0", "same"], seed=1)
    b = _appender(url, ["same", "new-1"], seed=2)
    a.commit()
    with pytest.raises(UserError, match=r"id 'same' was appended by another writer meanwhile"):
        b.commit()
    manifest = dataset.read_manifest(url)
    assert manifest.version == 2 and manifest.num_rows == 6
    files = {u.rsplit("/", 1)[-1] for u in storage.find(url) if u.endswith(".parquet")}
    assert files == {s["file"] for s in manifest.shards}  # b's shards are gone


def test_readers_follow_the_history_past_a_manifest_that_lags(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(4), [0, 1, 2, 0])
    v1 = storage.read_bytes(storage.join(url, dataset.MANIFEST))
    dataset_writer.append_rows(url, [("late", _images(1, 5)[0], None)])
    # as when the writer of version 2 died before updating `_manifest.json`, or when two
    # appends updated it out of order
    storage.write_bytes(storage.join(url, dataset.MANIFEST), v1)
    manifest, images = dataset.load(url)
    assert manifest.version == 2 and images.ids[-1] == "late"


def test_rewriting_a_dataset_drops_the_history_of_the_old_one(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(4), [0, 1, 2, 0])
    dataset_writer.append_rows(url, [("late", _images(1, 5)[0], None)])
    _write(url, _images(3, 7), [0, 1, 2])
    manifest, images = dataset.load(url)
    assert manifest.version == 1 and len(images) == 3


def test_an_append_whose_commit_fails_leaves_no_shards_behind(tmp_path, monkeypatch):
    from noisy_student.errors import StorageUnavailable

    url = str(tmp_path / "ds")
    _write(url, _images(4), [0, 1, 2, 0])
    before = dataset.read_manifest(url)

    def unreachable(url: str, data: bytes) -> bool:
        raise StorageUnavailable(f"{url}: storage unreachable after 5 attempts")

    monkeypatch.setattr(storage, "create_bytes", unreachable)
    with pytest.raises(StorageUnavailable):
        dataset_writer.append_rows(
            url, [(f"new-{i}", a, None) for i, a in enumerate(_images(5, 3))]
        )
    assert dataset.read_manifest(url) == before
    files = {u.rsplit("/", 1)[-1] for u in storage.find(url) if u.endswith(".parquet")}
    assert files == {s["file"] for s in before.shards}


# --- images leaving a split -------------------------------------------------------------


def _remover(url: str, ids: dict[str, int | None]) -> DatasetWriter:
    """A version of the split at `url` without `ids` (with the class each was given)."""
    base = dataset.read_manifest(url)
    w = DatasetWriter(url, base.split, CLASSES, 8, 6, "L", base=base).__enter__()
    for i, label in ids.items():
        w.remove(i, label)
    return w


def test_rows_that_left_a_split_are_skipped_by_every_reader_from_that_version_on(tmp_path):
    url = str(tmp_path / "ds")
    arrays = _images(10)
    _write(url, arrays, [None] * 10)
    before = dataset.read_manifest(url)
    _remover(url, {"img-2": 1, "img-7": None}).commit()

    manifest = dataset.read_manifest(url)
    assert manifest.version == 2 and manifest.removed_ids == {"img-2", "img-7"}
    assert manifest.shards == before.shards  # the shards stay as written
    assert (manifest.num_rows, manifest.visible_rows) == (10, 8)
    assert manifest.digest != before.digest and manifest.state()["removed"] == 2
    kept = [i for i in range(10) if i not in (2, 7)]
    _, images = dataset.load(url)
    assert images.ids == [f"img-{i}" for i in kept]
    assert torch.equal(images.images[:, 0], torch.from_numpy(arrays[kept]))
    assert dataset.load_shard(manifest, 0).ids == ["img-0", "img-1", "img-3"]
    for channels_last in (False, True):
        batches = list(dataset.iter_shard_batches(manifest, 1, 2, channels_last=channels_last))
        assert [b.ids for b in batches] == [["img-4", "img-5"], ["img-6"]]  # none empty
        assert torch.equal(batches[0].images[:, 0], torch.from_numpy(arrays[4:6]))
        as_before = next(dataset.iter_shard_batches(before, 1, 2, channels_last=channels_last))
        assert batches[0].images.stride() == as_before.images.stride()  # the same layout
    # the removed ids and their classes are on record; ids stored stay taken
    assert dataset.read_removed(url, manifest.removed) == {
        "id": ["img-2", "img-7"],
        "label": [1, None],
    }
    assert "img-2" in dataset.read_ids(manifest)
    with pytest.raises(UserError, match=r"id 'img-2' has already left the split"):
        _remover(url, {"img-2": 0})


def test_a_damaged_list_of_removed_ids_fails_its_checksum_in_one_line(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, _images(4), [None] * 4)
    _remover(url, {"img-1": 0}).commit()
    (name,) = [n for n in storage.find(url) if n.rsplit("/", 1)[-1].startswith("removed-")]
    storage.write_bytes(name, b"PAR1 not really")
    with pytest.raises(UserError, match=r"removed-.*\.parquet: checksum does not match") as e:
        dataset.read_manifest(url)
    assert "\n" not in str(e.value)


def test_removals_and_appends_racing_from_one_version_all_land(store):
    url = storage.join(store, "ds")
    _write(url, _images(8), [None] * 8)
    a = _remover(url, {"img-0": 0, "img-1": 1})
    b = _appender(url, ["new-0", "new-1"], seed=3)
    c = _remover(url, {"img-5": 2})
    for w in (b, a, c):
        w.commit()
    manifest, images = dataset.load(url)
    assert manifest.version == 4 and manifest.removed_ids == {"img-0", "img-1", "img-5"}
    assert images.ids == ["img-2", "img-3", "img-4", "img-6", "img-7", "new-0", "new-1"]


def test_a_removal_racing_another_of_the_same_id_is_refused_and_leaves_no_file(store):
    url = storage.join(store, "ds")
    _write(url, _images(4), [None] * 4)
    a = _remover(url, {"img-1": 0, "img-2": 0})
    b = _remover(url, {"img-3": 1, "img-2": 1})
    a.commit()
    with pytest.raises(dataset_writer.ConcurrentChange, match=r"id 'img-2' was taken out of"):
        b.commit()
    manifest = dataset.read_manifest(url)
    assert manifest.version == 2 and manifest.removed_ids == {"img-1", "img-2"}
    files = {u.rsplit("/", 1)[-1] for u in storage.find(url) if u.endswith(".parquet")}
    assert files == {s["file"] for s in manifest.shards + manifest.removed}


def test_class_shares_count_the_labelled_rows_still_in_the_split(tmp_path):
    url = str(tmp_path / "ds")
    labels = [0, 1, 1, 2, 2, 2, 0, 1, 2, 2]
    _write(url, _images(10), labels)
    np.testing.assert_allclose(dataset.class_shares(dataset.read_manifest(url)),
                               np.array([2, 3, 5]) / 10)  # fmt: skip
    _remover(url, {"img-3": 2, "img-4": 2}).commit()  # two of class 2 leave
    np.testing.assert_allclose(dataset.class_shares(dataset.read_manifest(url)),
                               np.array([2, 3, 3]) / 8)  # fmt: skip
    _remover(url, {"img-0": 0, "img-6": 0}).commit()  # and class 0 is gone
    with pytest.raises(UserError, match=r"ds: no labelled image for class 'a'$"):
        dataset.class_shares(dataset.read_manifest(url))
