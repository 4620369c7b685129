"""`ingest parquet`: tables shaped like a Hugging Face `datasets` export, into the dataset
format, all or nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import cli
from noisy_student import dataset, dataset_writer, ingest, ingest_parquet, storage
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


def hf_export(path: Path, images, labels, names=CLASSES, image_bytes=None) -> Path:
    """A Parquet file as `datasets` writes it: an Image struct, a ClassLabel int column and
    the features in the schema's metadata."""
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
    src = hf_export(tmp_path / "train.parquet", images[:40], labels[:40])
    folder = tmp_path / "unlabelled"  # a folder of two files
    hf_export(folder / "a.parquet", images[40:50], labels[40:50])
    hf_export(folder / "b.parquet", images[50:], labels[50:])
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
    cli.main(["ingest", "parquet", str(src), "--dataset", str(root), "--split", "unlabelled",
              "--label-column", ""])  # fmt: skip
    unlabelled = dataset.read_manifest(str(root / "unlabelled"))
    assert unlabelled.num_rows == 20 and unlabelled.class_names == list(CLASSES)


def test_parquet_writes_jpeg_shards_fitted_to_the_size_and_mode_asked(fashion, tmp_path):
    images, labels = fashion
    src = hf_export(tmp_path / "train.parquet", images[:12], labels[:12])
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
