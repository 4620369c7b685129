"""`ingest parquet`: Parquet files written by Hugging Face `datasets` itself (images as
bytes or by path, ClassLabel metadata), and hand-made tables for the edge cases, into the
dataset format, all or nothing."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import cli
from noisy_student.data import dataset, dataset_writer, ingest, ingest_parquet, storage
from noisy_student.errors import UserError

CLASSES = ingest.FASHION_MNIST_CLASSES
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def fashion(fashion_mnist_source) -> tuple[np.ndarray, np.ndarray]:
    """60 real Fashion-MNIST images and their labels."""
    images = ingest.read_idx(f"{fashion_mnist_source}/t10k-images-idx3-ubyte.gz")[:60]
    labels = ingest.read_idx(f"{fashion_mnist_source}/t10k-labels-idx1-ubyte.gz")[:60]
    return images, labels.astype(np.int64)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_pngs(folder: Path, images, labels) -> list[Path]:
    """The images as PNG files, one sub-folder per class (an ImageFolder tree)."""
    files = []
    for i, (array, label) in enumerate(zip(images, labels, strict=True)):
        files.append(folder / str(label) / f"{i}.png")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(files[-1])
    return files


def datasets_export(path: Path, labels, images=None, files=None, names=CLASSES) -> Path:
    """A Parquet file written by `datasets` itself, with an Image and a ClassLabel feature.
    Built from `files` (paths), it stores a path and no bytes per row; built from decoded
    `images`, it embeds their bytes."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
    )
    column = [str(f) for f in files] if files is not None else [Image.fromarray(a) for a in images]
    table = {"image": column, "label": [int(c) for c in labels]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


def hf_export(path: Path, images, labels, names=CLASSES, image_bytes=None) -> Path:
    """A Parquet file shaped by hand as `datasets` writes it (an Image struct, a ClassLabel
    int column, the features in the schema's metadata), for rows `datasets` would not
    write: broken bytes, labels out of range."""
    features = {
        "image": {"_type": "Image"},
        "label": {"names": list(names), "_type": "ClassLabel"},
    }
    schema = pa.schema([("image", IMAGE), ("label", pa.int64())]).with_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    encoded = image_bytes or [_png(a) for a in images]
    table = pa.table(
        {
            "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(encoded)],
            "label": list(labels),
        },
        schema=schema,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_a_datasets_export_becomes_a_dataset_with_its_class_names(fashion, tmp_path):
    images, labels = fashion
    src = datasets_export(tmp_path / "train.parquet", labels[:40], images=images[:40])
    folder = tmp_path / "unlabelled"  # a folder of two files
    datasets_export(folder / "a.parquet", labels[40:50], images=images[40:50])
    datasets_export(folder / "b.parquet", labels[50:], images=images[50:])
    root = str(tmp_path / "ds")
    # the test split as plain bytes with class-name labels
    pq.write_table(
        pa.table(
            {
                "img": [_png(a) for a in images[:20]],
                "cls": [CLASSES[c] for c in labels[:20]],
                "key": [f"t{i}" for i in range(20)],
            }
        ),
        tmp_path / "test.parquet",
    )
    # every class must have a labelled image: 40 test images hold all ten
    assert set(labels[:40]) == set(range(10))
    ingest_parquet.parquet(str(src), root, "labelled")
    ingest_parquet.parquet(str(folder), root, "unlabelled", rows_per_shard=4)
    ingest_parquet.parquet(
        str(tmp_path / "test.parquet"),
        root,
        "test",
        image_column="img",
        label_column="cls",
        id_column="key",
    )
    manifest, labelled = dataset.load(storage.join(root, dataset.LABELLED))
    assert manifest.class_names == CLASSES and (manifest.height, manifest.mode) == (28, "L")
    assert labelled.labels.tolist() == labels[:40].tolist()
    assert np.array_equal(labelled.images[:, 0].numpy(), images[:40])
    unlabelled = dataset.read_manifest(storage.join(root, dataset.UNLABELLED))
    assert unlabelled.num_rows == 20 and len(unlabelled.shards) == 5
    # the unlabelled split's labels are kept apart, as its true labels
    truth = pq.read_table(storage.join(root, dataset.UNLABELLED_TRUTH)).to_pydict()
    assert truth["id"][:2] == ["a.parquet/0", "a.parquet/1"]
    assert truth["label"] == labels[40:].tolist()
    test_manifest, test = dataset.load(storage.join(root, dataset.TEST))
    assert test.ids[:2] == ["t0", "t1"] and test.labels.tolist() == labels[:20].tolist()


def test_class_name_labels_without_metadata_take_the_sorted_distinct_names(tmp_path):
    table = pa.table(
        {
            "image": [_png(np.full((8, 8, 3), v, np.uint8)) for v in (0, 90, 200)],
            "label": ["dog", "cat", "dog"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    root = ingest_parquet.parquet(str(tmp_path / "t.parquet"), str(tmp_path / "ds"), "labelled")
    manifest, images = dataset.load(storage.join(root, dataset.LABELLED))
    assert manifest.class_names == ["cat", "dog"] and manifest.mode == "RGB"
    assert images.labels.tolist() == [1, 0, 1]


def _nothing_written(root: Path) -> bool:
    return not any(root.rglob("*.parquet")) and not any(root.rglob(dataset.MANIFEST))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing image column", "no column 'picture'"),
        ("missing label column", "no column 'label'"),
        ("undecodable image", "row 3: undecodable image"),
        ("path to no file", "row 2: image file not found: "),
        ("neither bytes nor a path", "row 2: no image (neither bytes nor a path)"),
        ("numbers for images", "row 0: the image column holds int, not bytes or a path"),
        ("index outside the classes", "row 5: label 12 outside the 10 classes"),
        ("name outside the classes", "row 5: label 'Robot' is not among the classes"),
        ("duplicate id", "row 4: duplicate id 'x1' (first at"),
    ],
)
def test_a_bad_table_fails_in_one_line_naming_the_row_and_writes_nothing(
    fashion, tmp_path, case, message
):
    images, labels = fashion
    images, labels = images[:10], labels[:10].copy()
    encoded = [_png(a) for a in images]
    kwargs = {}
    if case == "undecodable image":
        encoded[3] = b"\x89PNG broken"
    if case == "index outside the classes":
        labels[5] = 12
    if case == "path to no file":  # datasets' {bytes: null, path: "2.png"}
        encoded[2] = None
    src = hf_export(tmp_path / "src.parquet", images, labels, image_bytes=encoded)
    if case == "missing image column":
        kwargs["image_column"] = "picture"
    if case == "missing label column":
        pq.write_table(pa.table({"image": encoded}), src)
    if case == "name outside the classes":
        names = [CLASSES[c] for c in labels]
        names[5] = "Robot"
        pq.write_table(pa.table({"image": encoded, "label": names}), src)
        kwargs["classes"] = CLASSES
    if case in ("neither bytes nor a path", "numbers for images"):
        encoded[2] = None
        column = encoded if case == "neither bytes nor a path" else list(range(10))
        pq.write_table(pa.table({"image": column, "label": labels}), src)
        kwargs["classes"] = CLASSES
    if case == "duplicate id":
        ids = [f"x{i}" for i in range(10)]
        ids[4] = "x1"
        pq.write_table(pa.table({"image": encoded, "label": labels, "id": ids}), src)
        kwargs.update(classes=CLASSES, id_column="id")
    root = tmp_path / "ds"
    with pytest.raises(UserError) as e:
        ingest_parquet.parquet(str(src), str(root), "test", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(src) in str(e.value)
    assert _nothing_written(root)


def test_the_cli_ingests_a_split_and_refuses_it_twice(fashion, tmp_path, capsys):
    images, labels = fashion
    src = hf_export(tmp_path / "train.parquet", images[:30], labels[:30])
    root = tmp_path / "ds"
    cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "test"])
    assert "test split written to" in capsys.readouterr().out
    assert dataset.read_manifest(str(root / "test")).num_rows == 30
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "test"])
    assert exit_info.value.code == 2
    assert "the split exists already" in capsys.readouterr().err


def test_the_cli_passes_class_names_and_an_empty_label_column_through(fashion, tmp_path):
    images, labels = fashion
    names = [CLASSES[c] for c in labels[:20]]
    src = tmp_path / "named.parquet"
    encoded = [dataset_writer.encode_png(im) for im in images[:20]]
    pq.write_table(pa.table({"image": encoded, "label": names}), src)
    root = tmp_path / "ds"
    cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "test",
              "--classes", ",".join(CLASSES)])  # fmt: skip
    test = dataset.read_manifest(str(root / "test"))
    assert test.class_names == list(CLASSES) and test.num_rows == 20
    pool = tmp_path / "pool.parquet"  # other ids (from the file name): no image in two splits
    pool.write_bytes(src.read_bytes())
    cli.main(["ingest", "parquet", str(pool), "--dataset", str(root), "--split", "unlabelled",
              "--label-column", ""])  # fmt: skip
    unlabelled = dataset.read_manifest(str(root / "unlabelled"))
    assert unlabelled.num_rows == 20 and unlabelled.class_names == list(CLASSES)


def test_parquet_writes_jpeg_shards_fitted_to_the_size_and_mode_asked(fashion, tmp_path):
    images, labels = fashion
    files = save_pngs(tmp_path / "images", images[:12], labels[:12])
    src = datasets_export(tmp_path / "train.parquet", labels[:12], files=files)
    root = tmp_path / "ds"
    cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "test",
              "--format", "jpeg", "--quality", "95", "--size", "20", "--mode", "RGB"])  # fmt: skip
    listed = storage.read_json(str(root / "test" / dataset.MANIFEST))
    assert listed["image"] == {
        "height": 20, "width": 20, "mode": "RGB", "encoding": "jpeg", "quality": 95
    }  # fmt: skip
    m, test = dataset.load(str(root / "test"))
    blobs = pq.read_table(m.shard_urls()[0]).column("image").to_pylist()
    assert all(b[:2] == b"\xff\xd8" for b in blobs)  # JPEG's start-of-image marker
    # the pixels of each image fitted as image-folder fits them, up to JPEG's loss
    fitted = [np.asarray(ingest.fit(Image.fromarray(a).convert("RGB"), 20)) for a in images[:12]]
    error = np.abs(test.images.permute(0, 2, 3, 1).numpy().astype(int) - np.stack(fitted))
    assert error.mean() < 3 and test.labels.tolist() == labels[:12].tolist()


def test_skip_leaves_undecodable_rows_out_and_lists_them_by_file_and_row(fashion, tmp_path, capsys):
    images, labels = fashion
    encoded = [_png(a) for a in images[:10]]
    encoded[2], encoded[7] = b"\x89PNG broken", b""
    src = hf_export(tmp_path / "t.parquet", images[:10], labels[:10], image_bytes=encoded)
    root = tmp_path / "ds"
    cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "unlabelled",
              "--on-bad-image", "skip"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "skipped 2 bad image(s)" in printed
    assert f"{src}: row 2: undecodable image" in printed
    listed = storage.read_json(str(root / "unlabelled" / dataset.MANIFEST))["skipped"]
    assert [(s["file"], s["row"]) for s in listed] == [(str(src), 2), (str(src), 7)]
    _, unlabelled = dataset.load(str(root / "unlabelled"))
    kept = [i for i in range(10) if i not in (2, 7)]
    assert unlabelled.ids == [f"t.parquet/{i}" for i in kept]
    assert np.array_equal(unlabelled.images[:, 0].numpy(), images[kept])
    # the truth file holds the labels of the rows kept, and only those
    truth = pq.read_table(root / dataset.UNLABELLED_TRUTH).to_pydict()
    assert truth["label"] == labels[kept].tolist()


def test_a_new_split_takes_the_datasets_size_and_mode_and_refuses_others(fashion, tmp_path):
    images, labels = fashion
    root = tmp_path / "ds"
    first = hf_export(tmp_path / "a.parquet", images[:20], labels[:20])
    ingest_parquet.parquet(str(first), str(root), "test", image_size=16)
    # larger colour images: fitted to the dataset's 16x16 and converted to its L
    big = np.stack([np.repeat(np.kron(a, np.ones((2, 2), np.uint8))[..., None], 3, 2)
                    for a in images[20:30]])  # fmt: skip
    second = hf_export(tmp_path / "b.parquet", big, labels[20:30])
    ingest_parquet.parquet(str(second), str(root), "unlabelled")
    m, unlabelled = dataset.load(str(root / "unlabelled"))
    assert (m.height, m.width, m.mode) == (16, 16, "L")
    expected = [np.asarray(ingest.fit(Image.fromarray(a).convert("L"), 16)) for a in big]
    assert np.abs(unlabelled.images[:, 0].numpy().astype(int) - np.stack(expected)).max() <= 1
    with pytest.raises(UserError, match="the dataset's image size is '16x16', not '28x28'"):
        ingest_parquet.parquet(str(first), str(root), "labelled", image_size=28)
    with pytest.raises(UserError, match="the dataset's mode is 'L', not 'RGB'"):
        ingest_parquet.parquet(str(first), str(root), "labelled", mode="RGB")
    assert not (root / "labelled").exists()


# --- images by path, as `datasets` writes an image built from a file


def _load(root, split: str = dataset.LABELLED) -> dataset.ImageSet:
    return dataset.load(storage.join(str(root), split))[1]


def test_datasets_exports_by_path_and_by_bytes_ingest_to_the_same_content(
    fashion, tmp_path, monkeypatch
):
    images, labels = fashion
    images, labels = images[:40], labels[:40]  # all ten classes: a labelled split
    files = save_pngs(tmp_path / "images", images, labels)
    by_path = datasets_export(tmp_path / "by-path" / "train.parquet", labels, files=files)
    by_bytes = datasets_export(tmp_path / "by-bytes" / "train.parquet", labels, images=images)
    # paths relative to the Parquet file's folder (`datasets` reads them from the working
    # directory: the export is written from there), ingested from another directory
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path / "rel")
    relative = [Path("..", "images", f.parent.name, f.name) for f in files]
    by_relative_path = datasets_export(tmp_path / "rel" / "train.parquet", labels, files=relative)
    monkeypatch.chdir(files[0].parent)  # where "../images/..." names no file
    # what `datasets` wrote: paths and no bytes, or bytes
    rows = pq.read_table(by_path).column("image").to_pylist()
    assert all(r["bytes"] is None for r in rows) and rows[3]["path"] == str(files[3])
    assert all(r["bytes"] for r in pq.read_table(by_bytes).column("image").to_pylist())
    loaded = []
    for src in (by_path, by_bytes, by_relative_path):
        root = ingest_parquet.parquet(str(src), str(src.parent / "ds"), dataset.LABELLED)
        manifest = dataset.read_manifest(storage.join(root, dataset.LABELLED))
        assert manifest.class_names == CLASSES  # datasets' ClassLabel names
        loaded.append(_load(root))
    for split in loaded:
        # row for row: the same ids, labels and decoded pixels, those of the source images
        assert split.ids == [f"train.parquet/{i}" for i in range(40)]
        assert split.labels.tolist() == labels.tolist()
        assert np.array_equal(split.images[:, 0].numpy(), images)


def test_a_missing_or_corrupt_image_file_names_the_row_and_the_path_or_is_skipped(
    fashion, tmp_path, capsys
):
    images, labels = fashion
    files = save_pngs(tmp_path / "images", images[:10], labels[:10])
    src = datasets_export(tmp_path / "train.parquet", labels[:10], files=files)
    files[4].unlink()
    files[6].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    root = tmp_path / "ds"
    with pytest.raises(UserError) as e:
        ingest_parquet.parquet(str(src), str(root), "test")
    assert str(e.value) == f"{src}: row 4: image file not found: {files[4]}"
    with pytest.raises(UserError) as e:
        ingest_parquet.parquet(str(src), str(root), "test", on_missing_image="skip")
    assert str(e.value).startswith(f"{src}: row 6: undecodable image {files[6]}: ")
    assert "\n" not in str(e.value) and _nothing_written(root)
    cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "test",
              "--on-missing-image", "skip", "--on-bad-image", "skip"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "skipped 2 bad image(s)" in printed
    assert f"{src}: row 4: image file not found: {files[4]}" in printed
    listed = storage.read_json(str(root / "test" / dataset.MANIFEST))["skipped"]
    assert [(s["file"], s["row"], s["reason"].split(":")[0]) for s in listed] == [
        (str(src), 4, "image file not found"),
        (str(src), 6, f"undecodable image {files[6]}"),
    ]
    test = _load(root, dataset.TEST)
    kept = [i for i in range(10) if i not in (4, 6)]
    assert test.ids == [f"train.parquet/{i}" for i in kept]
    assert np.array_equal(test.images[:, 0].numpy(), images[kept])


def test_images_on_s3_by_url_or_by_a_path_relative_to_a_table_on_s3(
    fashion, tmp_path, s3_endpoint, monkeypatch
):
    images, labels = fashion
    images, labels = images[:12], labels[:12]
    # an export written beside its images, then the folder uploaded as it is
    local, prefix = tmp_path / "export", "s3://ns-test/hf-export"
    files = save_pngs(local / "images", images, labels)
    monkeypatch.chdir(local)
    relative = [f.relative_to(local) for f in files]
    datasets_export(local / "train.parquet", labels, files=relative)
    for f in (*files, local / "train.parquet"):
        storage.write_bytes(f"{prefix}/{f.relative_to(local)}", f.read_bytes())
    # and a local table naming the images by their URLs
    urls = [f"{prefix}/{path}" for path in relative]
    by_url = datasets_export(tmp_path / "by-url.parquet", labels, files=urls)
    on_s3 = f"{prefix}/train.parquet"
    for src, root in ((on_s3, tmp_path / "a"), (str(by_url), tmp_path / "b")):
        ingest_parquet.parquet(src, str(root), "test", rows_per_shard=5)
        test = _load(root, dataset.TEST)
        assert test.labels.tolist() == labels.tolist()
        assert np.array_equal(test.images[:, 0].numpy(), images)
    storage.remove(urls[7])
    missing = f"{on_s3}: row 7: image file not found: {urls[7]}"
    with pytest.raises(UserError, match=re.escape(missing)):
        ingest_parquet.parquet(on_s3, str(tmp_path / "c"), "test")


def test_a_validation_split_is_labelled_and_takes_no_id_of_another_split(fashion, tmp_path, capsys):
    images, labels = fashion

    def table(name: str, first: int, count: int, with_labels: bool = True) -> str:
        rows = range(first, first + count)
        columns = {"image": [_png(images[i]) for i in rows], "key": [f"k{i}" for i in rows]}
        if with_labels:
            columns["label"] = [int(labels[i]) for i in rows]
        pq.write_table(pa.table(columns), tmp_path / name)
        return str(tmp_path / name)

    root = tmp_path / "ds"
    ingest_parquet.parquet(table("labelled.parquet", 0, 40), str(root), "labelled",
                           id_column="key", classes=CLASSES)  # fmt: skip
    overlapping = table("overlap.parquet", 35, 10)
    with pytest.raises(UserError) as e:
        ingest_parquet.parquet(overlapping, str(root), "validation", id_column="key")
    assert str(e.value) == f"{overlapping}: row 0: id 'k35' is in the labelled split already"
    with pytest.raises(UserError, match="no column 'label'"):
        ingest_parquet.parquet(table("bare.parquet", 40, 10, with_labels=False), str(root),
                               "validation", id_column="key")  # fmt: skip
    assert not (root / dataset.VALIDATION / dataset.MANIFEST).exists()
    cli.main(["ingest", "parquet", table("validation.parquet", 40, 20), "--dataset", str(root),
              "--split", "validation", "--id-column", "key"])  # fmt: skip
    assert "validation split written to" in capsys.readouterr().out
    validation = _load(root, dataset.VALIDATION)
    assert validation.ids == [f"k{i}" for i in range(40, 60)]
    assert validation.labels.tolist() == labels[40:60].tolist()
