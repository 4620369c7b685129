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
