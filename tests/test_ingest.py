"""Ingest: Fashion-MNIST IDX files and ImageFolder trees into the dataset format."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import cli
from noisy_student import stages
from noisy_student.data import dataset, dataset_writer, ingest, ingest_parquet, storage
from noisy_student.errors import UserError

# --- Fashion-MNIST (via the session's tiny_dataset: 5 labelled/class, 300 unlabelled, 200 test)


def _split(root: str, name: str) -> tuple[dataset.Manifest, dataset.ImageSet]:
    return dataset.load(storage.join(root, name))


def test_fashion_mnist_labelled_split_has_exactly_five_images_of_every_class(tiny_dataset):
    manifest, labelled = _split(tiny_dataset, dataset.LABELLED)
    assert manifest.class_names == ingest.FASHION_MNIST_CLASSES
    assert (manifest.mode, manifest.height, manifest.width) == ("L", 28, 28)
    assert np.bincount(labelled.labels.numpy(), minlength=10).tolist() == [5] * 10


def test_fashion_mnist_unlabelled_split_hides_labels_that_the_truth_file_keeps(tiny_dataset):
    manifest, unlabelled = _split(tiny_dataset, dataset.UNLABELLED)
    assert len(unlabelled) == 300
    assert len(manifest.shards) == 3  # rows_per_shard=100
    assert (unlabelled.labels == -1).all()
    truth = pq.read_table(storage.join(tiny_dataset, dataset.UNLABELLED_TRUTH)).to_pydict()
    assert truth["id"] == unlabelled.ids
    # the hidden labels are real classes, and more than one of them
    assert set(truth["label"]) <= set(range(10))
    assert len(set(truth["label"])) > 1


def test_fashion_mnist_labelled_and_unlabelled_images_do_not_overlap(tiny_dataset):
    _, labelled = _split(tiny_dataset, dataset.LABELLED)
    _, unlabelled = _split(tiny_dataset, dataset.UNLABELLED)
    _, test = _split(tiny_dataset, dataset.TEST)
    assert not set(labelled.ids) & set(unlabelled.ids)
    assert all(i.startswith("train-") for i in labelled.ids + unlabelled.ids)
    assert len(test) == 200 and all(i.startswith("test-") for i in test.ids)
    assert (test.labels >= 0).all()


def _fake_idx(folder, n_train: int = 60, n_test: int = 10) -> str:
    """Tiny IDX files (6 classes x 10 images) so that re-ingesting with other seeds is cheap."""
    import gzip
    import struct

    def write(name: str, arr: np.ndarray) -> None:
        header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (folder / name).write_bytes(gzip.compress(header + arr.tobytes()))

    rng = np.random.default_rng(0)
    write("train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8))
    write("train-labels-idx1-ubyte.gz", (np.arange(n_train) % 6).astype(np.uint8))
    write("t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8))
    write("t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 6).astype(np.uint8))
    return str(folder)


def _labelled_ids(out, source: str, seed: int) -> list[str]:
    root = ingest.fashion_mnist(str(out), source, labelled_per_class=2, seed=seed)
    return dataset.load(storage.join(root, dataset.LABELLED))[1].ids


def test_fashion_mnist_split_depends_only_on_the_seed(tmp_path):
    source = _fake_idx(tmp_path)
    first = _labelled_ids(tmp_path / "a", source, seed=0)
    assert len(first) == 12
    assert _labelled_ids(tmp_path / "b", source, seed=0) == first
    assert _labelled_ids(tmp_path / "c", source, seed=1) != first


def test_fashion_mnist_asking_more_labels_than_a_class_has_is_a_user_error(tmp_path):
    source = _fake_idx(tmp_path)
    with pytest.raises(UserError, match="fewer than 11 asked"):
        ingest.fashion_mnist(str(tmp_path / "out"), source, labelled_per_class=11)


def test_truncated_idx_file_is_a_user_error_naming_it(tmp_path):
    source = _fake_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    import gzip

    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(UserError, match=re.escape(str(path)) + ": truncated"):
        ingest.fashion_mnist(str(tmp_path / "out"), source, labelled_per_class=1)


def _ids(root: str, split: str) -> list[str]:
    return dataset.load(storage.join(root, split))[1].ids


def test_fashion_mnist_validation_is_drawn_after_the_labelled_split_and_leaves_the_pool(tmp_path):
    source = _fake_idx(tmp_path)  # 6 classes x 10 training images
    plain = ingest.fashion_mnist(str(tmp_path / "plain"), source, labelled_per_class=2, seed=3)
    held = ingest.fashion_mnist(
        str(tmp_path / "held"), source, labelled_per_class=2, seed=3, validation_per_class=3
    )
    # the labelled split is the one a dataset without validation has: results stay comparable
    assert _ids(held, dataset.LABELLED) == _ids(plain, dataset.LABELLED)
    _, validation = _split(held, dataset.VALIDATION)
    assert np.bincount(validation.labels.numpy(), minlength=6).tolist() == [3] * 6
    assert not set(validation.ids) & set(_ids(held, dataset.LABELLED))
    unlabelled = _ids(held, dataset.UNLABELLED)
    assert sorted(unlabelled + validation.ids) == sorted(_ids(plain, dataset.UNLABELLED))
    truth = pq.read_table(storage.join(held, dataset.UNLABELLED_TRUTH)).column("id").to_pylist()
    assert truth == unlabelled  # the validation images' labels are not hidden truth
    assert not (tmp_path / "plain" / dataset.VALIDATION).exists()


def test_fashion_mnist_asking_more_validation_than_is_left_is_a_user_error(tmp_path):
    source = _fake_idx(tmp_path)
    with pytest.raises(UserError, match="6 images left after the labelled draw, fewer than 7"):
        ingest.fashion_mnist(
            str(tmp_path / "out"), source, labelled_per_class=4, validation_per_class=7
        )
    assert not (tmp_path / "out").exists()


def test_ingesting_a_root_again_leaves_no_split_or_truth_of_the_earlier_dataset(
    image_tree, tmp_path
):
    out = tmp_path / "out"
    source = _fake_idx(tmp_path)
    ingest.fashion_mnist(str(out), source, labelled_per_class=2, validation_per_class=1)
    assert (out / dataset.VALIDATION / dataset.MANIFEST).exists()
    _ingest(image_tree, out)  # no validation split and no truth this time
    assert not (out / dataset.VALIDATION).exists()
    assert not (out / dataset.UNLABELLED_TRUTH).exists()
    assert _split(str(out), dataset.LABELLED)[0].class_names == ["cat", "dog"]


# --- ImageFolder


def _save(path, mode: str, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, colour).save(path)


@pytest.fixture()
def image_tree(tmp_path):
    """labelled/ and test/ with classes cat and dog; images RGB or L, of several sizes."""
    root = tmp_path / "raw"
    for split in ("labelled", "test"):
        _save(root / split / "cat" / "c1.png", "RGB", (20, 30), 10)
        _save(root / split / "cat" / "c2.jpg", "L", (16, 16), 60)
        _save(root / split / "dog" / "d1.png", "L", (40, 12), 200)
    _save(root / "unlabelled" / "u1.png", "RGB", (8, 8), 100)
    _save(root / "unlabelled" / "nested" / "u2.bmp", "L", (17, 19), 150)
    (root / "unlabelled" / ".DS_Store").write_bytes(b"hidden files are skipped")
    return root


def _ingest(root, out, **options):
    return ingest.image_folder(
        str(out),
        str(root / "labelled"),
        str(root / "unlabelled"),
        str(root / "test"),
        **{"image_size": 16, "mode": "RGB", **options},
    )


def test_image_folder_ingest_writes_three_splits_at_one_size_and_mode(image_tree, tmp_path):
    out = _ingest(image_tree, tmp_path / "out")
    m, labelled = _split(out, dataset.LABELLED)
    assert m.class_names == ["cat", "dog"]
    assert (m.mode, m.height, m.width) == ("RGB", 16, 16)
    assert labelled.images.shape == (3, 3, 16, 16)
    # rows are written in a seeded shuffle of the files (classes mixed within row groups)
    label_of = dict(zip(labelled.ids, labelled.labels.tolist(), strict=True))
    assert label_of == {
        "labelled/cat/c1.png": 0,
        "labelled/cat/c2.jpg": 0,
        "labelled/dog/d1.png": 1,
    }
    # a grayscale source becomes three equal channels
    gray = labelled.images[labelled.ids.index("labelled/dog/d1.png")].int()
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert abs(int(gray[0, 8, 8]) - 200) <= 1

    m, unlabelled = _split(out, dataset.UNLABELLED)
    assert sorted(unlabelled.ids) == ["unlabelled/nested/u2.bmp", "unlabelled/u1.png"]
    assert (unlabelled.labels == -1).all()
    assert unlabelled.images.shape == (2, 3, 16, 16)

    m, test = _split(out, dataset.TEST)
    assert m.num_rows == 3 and sorted(test.labels.tolist()) == [0, 0, 1]


def test_image_folder_non_image_file_is_a_user_error_naming_it(image_tree, tmp_path):
    (image_tree / "labelled" / "dog" / "notes.txt").write_text("not a picture")
    with pytest.raises(UserError, match=r"labelled/dog/notes\.txt: not an image file"):
        _ingest(image_tree, tmp_path / "out")


def test_image_folder_corrupt_png_is_a_user_error_naming_it(image_tree, tmp_path):
    (image_tree / "unlabelled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match=r"unlabelled/broken\.png: corrupt image"):
        _ingest(image_tree, tmp_path / "out")


def test_image_folder_missing_folder_is_a_user_error(image_tree, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=re.escape(f"{missing}: folder not found")):
        ingest.image_folder(
            str(tmp_path / "out"),
            str(missing),
            str(image_tree / "unlabelled"),
            str(image_tree / "test"),
            image_size=16,
        )
    with pytest.raises(UserError, match=re.escape(f"{missing}: folder not found")):
        ingest.image_folder(
            str(tmp_path / "out"),
            str(image_tree / "labelled"),
            str(missing),
            str(image_tree / "test"),
            image_size=16,
        )


def test_image_folder_test_class_unknown_to_the_labelled_split_is_rejected(image_tree, tmp_path):
    _save(image_tree / "test" / "bird" / "b1.png", "L", (16, 16), 0)
    with pytest.raises(UserError, match=r"test/bird/b1\.png: class 'bird' not among"):
        _ingest(image_tree, tmp_path / "out")


def test_image_folder_ingest_as_jpeg_writes_jpeg_shards_at_the_quality_asked(image_tree, tmp_path):
    png = _ingest(image_tree, tmp_path / "png")
    jpeg = ingest.image_folder(
        str(tmp_path / "jpeg"),
        str(image_tree / "labelled"),
        str(image_tree / "unlabelled"),
        str(image_tree / "test"),
        image_size=16,
        encoding="jpeg",
        quality=80,
    )
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        listed = storage.read_json(storage.join(jpeg, split, dataset.MANIFEST))
        assert listed["image"]["encoding"] == "jpeg" and listed["image"]["quality"] == 80
        m = dataset.read_manifest(storage.join(jpeg, split))
        blobs = pq.read_table(m.shard_urls()[0]).column("image").to_pylist()
        assert all(b[:2] == b"\xff\xd8" for b in blobs)  # JPEG's start-of-image marker
        # the same pixels as the PNG ingest, up to JPEG's loss on flat colours
        a, b = _split(png, split)[1], _split(jpeg, split)[1]
        assert a.ids == b.ids and a.images.shape == b.images.shape
        assert (a.images.int() - b.images.int()).abs().max() <= 8
    # appended photos are stored as the dataset's images are
    extra = tmp_path / "more"
    _save(extra / "x.png", "RGB", (30, 20), 90)
    _, after = ingest.append_unlabelled(jpeg, str(extra))
    blobs = pq.read_table(after.shard_urls()[-1]).column("image").to_pylist()
    assert (after.encoding, after.quality) == ("jpeg", 80) and blobs[0][:2] == b"\xff\xd8"
    # PNG stays the default, and says so
    listed = storage.read_json(storage.join(png, dataset.LABELLED, dataset.MANIFEST))
    assert listed["image"]["encoding"] == "png" and "quality" not in listed["image"]


def _bands(path, size: tuple[int, int], fmt: str) -> None:
    """Three equal bands, red | green | blue, across the longer side."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    if w >= h:
        a[:, : w // 3, 0], a[:, w // 3 : 2 * w // 3, 1], a[:, 2 * w // 3 :, 2] = 255, 255, 255
    else:
        a[: h // 3, :, 0], a[h // 3 : 2 * h // 3, :, 1], a[2 * h // 3 :, :, 2] = 255, 255, 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt, quality=95)


def test_photos_of_any_size_keep_their_proportions_shorter_side_resized_then_centre_cropped(
    tmp_path,
):
    root = tmp_path / "raw"
    # wide and tall, small and multi-megapixel (JPEG, decoded at reduced scale)
    _bands(root / "labelled" / "a" / "wide.png", (60, 20), "PNG")
    _bands(root / "labelled" / "a" / "tall.jpg", (900, 2700), "JPEG")
    _bands(root / "test" / "a" / "big.jpg", (3000, 1000), "JPEG")
    _bands(root / "unlabelled" / "u.png", (48, 16), "PNG")
    out = ingest.image_folder(
        str(tmp_path / "out"),
        str(root / "labelled"),
        str(root / "unlabelled"),
        str(root / "test"),
        image_size=12,
        encoding="jpeg",
        quality=95,
    )
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        images = _split(out, split)[1].images.int()
        assert images.shape[1:] == (3, 12, 12)
        # only the middle band, green, survives the centre crop: nothing is squashed in
        assert (images[:, 1] > 200).all() and (images[:, 0] < 60).all()
        assert (images[:, 2] < 60).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoding": "webp"}, "format must be one of"),
        ({"encoding": "jpeg", "quality": 101}, r"JPEG quality must be in \[1, 100\], not 101"),
        ({"image_size": 0}, "image size must be a positive number of pixels, not 0"),
    ],
)
def test_a_bad_format_quality_or_size_is_a_user_error(image_tree, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        ingest.image_folder(
            str(tmp_path / "out"),
            str(image_tree / "labelled"),
            str(image_tree / "unlabelled"),
            str(image_tree / "test"),
            **kwargs,
        )
    assert not (tmp_path / "out").exists()


def test_cli_ingests_an_image_folder_as_jpeg_at_the_size_asked(image_tree, tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(
        [
            "ingest",
            "image-folder",
            "--out",
            str(out),
            "--labelled",
            str(image_tree / "labelled"),
            "--unlabelled",
            str(image_tree / "unlabelled"),
            "--test",
            str(image_tree / "test"),
            "--format",
            "jpeg",
            "--quality",
            "85",
            "--size",
            "24",
        ]
    )
    m = dataset.read_manifest(str(out / dataset.TEST))
    assert (m.encoding, m.quality, m.height, m.width, m.mode) == ("jpeg", 85, 24, 24, "RGB")
    with pytest.raises(SystemExit) as exc:
        cli.main(["ingest", "image-folder", "--out", str(out), "--labelled", "x",
                  "--unlabelled", "y", "--test", "z", "--quality", "0"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JPEG quality must be in [1, 100], not 0" in err


# --- CLI


def test_cli_ingest_with_missing_source_exits_2_with_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["ingest", "fashion-mnist", "--out", str(tmp_path / "out"), "--source", str(missing)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1  # one line, no traceback
    assert str(missing) in err


# --- bad input: all or nothing, or skipped and reported


def _no_split_readable(out) -> None:
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        assert not (out / split / dataset.MANIFEST).exists()
        assert not list((out / split).glob("part-*.parquet"))


def test_a_bad_image_in_the_last_split_leaves_no_split_readable(image_tree, tmp_path):
    (image_tree / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"test/dog/broken\.png: corrupt image"):
        _ingest(image_tree, out)
    _no_split_readable(out)  # labelled and unlabelled were written first, then removed


def test_skip_policy_leaves_bad_images_out_and_lists_them(image_tree, tmp_path, capsys):
    (image_tree / "unlabelled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (image_tree / "unlabelled" / "notes.txt").write_text("not a picture")
    (image_tree / "labelled" / "cat" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    cli.main(
        [
            "ingest",
            "image-folder",
            "--out",
            str(out),
            "--labelled",
            str(image_tree / "labelled"),
            "--unlabelled",
            str(image_tree / "unlabelled"),
            "--test",
            str(image_tree / "test"),
            "--image-size",
            "16",
            "--on-bad-image",
            "skip",
        ]
    )
    printed = capsys.readouterr().out
    assert "skipped 3 bad image(s)" in printed
    assert re.search(r"unlabelled/broken\.png: corrupt image", printed)
    assert re.search(r"unlabelled/notes\.txt: not an image file", printed)
    _, unlabelled = _split(str(out), dataset.UNLABELLED)
    assert sorted(unlabelled.ids) == ["unlabelled/nested/u2.bmp", "unlabelled/u1.png"]
    _, labelled = _split(str(out), dataset.LABELLED)
    assert len(labelled) == 3
    listed = storage.read_json(storage.join(str(out), dataset.UNLABELLED, dataset.MANIFEST))
    assert sorted(s["file"].rsplit("/", 1)[1] for s in listed["skipped"]) == [
        "broken.png",
        "notes.txt",
    ]


def test_mismatched_sizes_and_modes_are_converted_or_refused_as_configured(image_tree, tmp_path):
    # image_tree mixes RGB and L images of five sizes: converted by default (see above) ...
    with pytest.raises(
        UserError,
        match=r"labelled/(cat/c1\.png: image is RGB 20x30|dog/d1\.png: image is L 40x12), "
        r"expected RGB 16x16$",
    ):
        ingest.image_folder(
            str(tmp_path / "out"),
            str(image_tree / "labelled"),
            str(image_tree / "unlabelled"),
            str(image_tree / "test"),
            image_size=16,
            on_mismatch="error",
        )
    _no_split_readable(tmp_path / "out")


def test_a_class_without_labelled_images_is_refused_naming_it(image_tree, tmp_path):
    (image_tree / "labelled" / "bird").mkdir()
    with pytest.raises(UserError, match="no labelled image for class 'bird'"):
        _ingest(image_tree, tmp_path / "out")
    _no_split_readable(tmp_path / "out")


def test_an_empty_unlabelled_folder_is_refused_naming_it(image_tree, tmp_path):
    for p in (image_tree / "unlabelled").rglob("*.*"):
        p.unlink()
    with pytest.raises(UserError, match="unlabelled: no images to write for split 'unlabelled'"):
        _ingest(image_tree, tmp_path / "out")
    _no_split_readable(tmp_path / "out")


# --- one set of image options for image-folder, parquet and append

IMAGE_OPTIONS = ("image_size", "mode", "encoding", "quality", "on_bad_image")


def _ingest_parsers() -> dict[str, object]:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    return next(a for a in commands["ingest"]._actions if a.dest == "source_kind").choices


def test_image_folder_parquet_and_append_take_one_set_of_image_options():
    parsers = _ingest_parsers()

    def described(command: str) -> list[tuple]:
        actions = {a.dest: a for a in parsers[command]._actions}
        return [
            (a.option_strings, a.choices, a.default, a.type, a.help)
            for a in (actions[dest] for dest in IMAGE_OPTIONS)
        ]

    assert described("image-folder") == described("parquet") == described("append")
    size, _, encoding, *_ = described("parquet")
    assert size[0] == ["--size", "--image-size"]  # the old spelling still parses
    assert list(encoding[1]) == list(dataset.ENCODINGS)
    assert f"default {dataset.JPEG_QUALITY}" in described("parquet")[3][4]


def test_append_skips_bad_images_when_asked_and_lists_them_in_the_new_version(
    image_tree, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    root = _ingest(image_tree, tmp_path / "out")
    batch = tmp_path / "batch"
    _save(batch / "good.png", "L", (40, 30), 90)
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cli.main(["ingest", "append", "--dataset", root, "--images", str(batch), "--on-bad-image",
              "skip", "--size", "16", "--mode", "RGB", "--format", "png"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "1 images added" in printed and "skipped 1 bad image(s)" in printed
    assert re.search(r"batch/broken\.png: corrupt image", printed)
    m, unlabelled = _split(root, dataset.UNLABELLED)
    assert m.version == 2 and "batch/good.png" in unlabelled.ids
    listed = storage.read_json(storage.join(root, dataset.UNLABELLED, dataset.MANIFEST))
    assert [s["file"] for s in listed["skipped"]] == [str(batch / "broken.png")]
    # without skip, the same batch stops at the broken image and changes nothing
    with pytest.raises(UserError, match=r"broken\.png: corrupt image"):
        ingest.append_unlabelled(root, str(batch), id_prefix="again")
    assert dataset.read_manifest(storage.join(root, dataset.UNLABELLED)).version == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 24}, "the split's image size is 16, not 24"),
        ({"mode": "L"}, "the split's mode is 'RGB', not 'L'"),
        ({"encoding": "png"}, "the split's format is 'jpeg', not 'png'"),
        ({"quality": 70}, "the split's JPEG quality is 90, not 70"),
    ],
)
def test_append_refuses_image_options_that_would_mix_two_kinds_of_image_in_a_split(
    image_tree, tmp_path, kwargs, message
):
    root = _ingest(image_tree, tmp_path / "out", encoding="jpeg")
    batch = tmp_path / "batch"
    _save(batch / "x.png", "RGB", (16, 16), 90)
    with pytest.raises(UserError, match=re.escape(message)):
        ingest.append_unlabelled(root, str(batch), **kwargs)
    assert dataset.read_manifest(storage.join(root, dataset.UNLABELLED)).version == 1
    # the split's own values are accepted, and are what an append uses anyway
    ingest.append_unlabelled(root, str(batch), image_size=16, mode="RGB", encoding="jpeg")


# --- the validation split of an ImageFolder


def test_image_folder_validation_is_a_labelled_split_of_the_labelled_classes(image_tree, tmp_path):
    _save(image_tree / "validation" / "dog" / "v1.png", "RGB", (16, 16), 30)
    _save(image_tree / "validation" / "cat" / "v2.png", "RGB", (16, 16), 90)
    out = _ingest(image_tree, tmp_path / "out", validation=str(image_tree / "validation"))
    m, validation = _split(out, dataset.VALIDATION)
    assert m.class_names == ["cat", "dog"]
    assert sorted(zip(validation.ids, validation.labels.tolist(), strict=True)) == [
        ("validation/cat/v2.png", 0),
        ("validation/dog/v1.png", 1),
    ]
    _save(image_tree / "validation" / "bird" / "v3.png", "RGB", (16, 16), 90)
    with pytest.raises(UserError, match=r"validation/bird/v3\.png: class 'bird' not among"):
        _ingest(image_tree, tmp_path / "again", validation=str(image_tree / "validation"))
    assert not (tmp_path / "again").exists()


# --- no image id in two splits, whatever ingests run (hypothesis)

ORDINARY = settings(
    max_examples=int(os.environ.get("NOISY_STUDENT_FUZZ_EXAMPLES", 25)),
    deadline=20000,  # ms per example: a busy 2-core machine
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)
FILE_NAMES = st.sampled_from(["a.png", "b.png", "x/a.png"])


def _every_id(root: str) -> list[str]:
    """Every row's id in every split present, repeats kept."""
    ids = []
    for split in dataset.SPLITS:
        url = storage.join(root, split)
        if storage.exists(storage.join(url, dataset.MANIFEST)):
            for shard in dataset.read_manifest(url).shard_urls():
                ids += storage.read_parquet(shard, columns=["id"]).column("id").to_pylist()
    return ids


def _write_tree(folder, files: list[str], classes: bool) -> str:
    for i, name in enumerate(files):
        path = folder / (f"{['cat', 'dog'][i % 2]}/{name}" if classes else name)
        if not path.exists():
            _save(path, "L", (4, 4), 10 * i)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


ingests = st.lists(
    st.one_of(
        st.tuples(
            st.just("fashion-mnist"),
            st.integers(1, 3),  # labelled per class
            st.integers(0, 3),  # validation per class
            st.sampled_from([None, 5, 40]),  # unlabelled limit
            st.integers(0, 2),  # seed
        ),
        st.tuples(
            st.just("image-folder"),
            st.lists(FILE_NAMES, min_size=2, max_size=4),  # labelled, then test, validation
            st.lists(FILE_NAMES, min_size=1, max_size=3),  # unlabelled
            st.booleans(),  # with a validation folder
        ),
        st.tuples(
            st.just("parquet"),
            st.sampled_from(dataset.SPLITS),
            st.lists(
                st.sampled_from(["labelled/cat/a.png", "train-00001", "p1", "p2"]),
                min_size=1,
                max_size=3,
                unique=True,
            ),  # fmt: skip
        ),
        st.tuples(
            st.just("append"),
            st.sampled_from([None, "labelled", "unlabelled", "validation", "test", "train-0"]),
            st.lists(FILE_NAMES, min_size=1, max_size=3),
        ),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.slow  # about 20 s: 25 sequences of up to four small ingests
@ORDINARY
@given(steps=ingests)
# an append named like a split of an ImageFolder ingest, onto its ids
@example(
    steps=[
        ("image-folder", ["a.png", "b.png"], ["a.png"], True),
        ("append", "validation", ["a.png"]),
    ]
)
# a Parquet validation split holding an id of the training pool
@example(steps=[("fashion-mnist", 1, 0, None, 0), ("parquet", "validation", ["train-00001"])])
# a root ingested again without the validation split an earlier ingest drew from its pool
@example(steps=[("fashion-mnist", 1, 3, None, 0), ("fashion-mnist", 1, 0, None, 1)])
def test_no_image_id_is_in_two_splits_after_any_sequence_of_ingests(steps):
    work = Path(tempfile.mkdtemp(prefix="splits-"))
    try:
        _ingest_and_check(work, steps)
    finally:
        shutil.rmtree(work)


def _ingest_and_check(work: Path, steps: list[tuple]) -> None:
    source = _fake_idx(work)
    root = str(work / "data")
    for n, step in enumerate(steps):
        kind, *args = step
        here = work / f"step-{n}"
        try:
            if kind == "fashion-mnist":
                labelled, validation, limit, seed = args
                ingest.fashion_mnist(
                    root, source, labelled, None if limit is None else limit, None, seed,
                    rows_per_shard=16, validation_per_class=validation,
                )  # fmt: skip
            elif kind == "image-folder":
                labelled, unlabelled, with_validation = args
                ingest.image_folder(
                    root,
                    _write_tree(here / "labelled", labelled, classes=True),
                    _write_tree(here / "unlabelled", unlabelled, classes=False),
                    _write_tree(here / "test", labelled, classes=True),
                    image_size=4,
                    mode="L",
                    validation=_write_tree(here / "validation", labelled, classes=True)
                    if with_validation
                    else None,
                )
            elif kind == "parquet":
                split, ids = args
                here.mkdir(parents=True)
                rows = range(len(ids))
                pq.write_table(
                    pa.table(
                        {
                            "image": [
                                dataset_writer.encode_png(np.full((4, 4), i, np.uint8))
                                for i in rows
                            ],  # fmt: skip
                            "label": [i % 2 for i in rows],
                            "id": ids,
                        }
                    ),
                    here / "rows.parquet",
                )
                ingest_parquet.parquet(str(here / "rows.parquet"), root, split, id_column="id")
            else:
                prefix, files = args
                if storage.exists(storage.join(root, dataset.UNLABELLED, dataset.MANIFEST)):
                    folder = _write_tree(here / (prefix or "batch"), files, classes=True)
                    ingest.append_unlabelled(root, folder, prefix)
        except UserError as e:
            assert "\n" not in str(e)
        ids = _every_id(root) if Path(root).exists() else []
        assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


# --- prepare_data: the dataset `data.fashion_mnist` describes, or a one-line refusal


def test_prepare_data_ingests_the_validation_split_and_chooses_on_it(tmp_path):
    from noisy_student.config import FashionMnistSource

    source = FashionMnistSource(
        source=_fake_idx(tmp_path), labelled_per_class=2, validation_per_class=3
    )
    root = stages.prepare_data(str(tmp_path / "data"), source)
    assert dataset.read_manifest(storage.join(root, dataset.VALIDATION)).num_rows == 18
    assert stages.choice_split(root) == dataset.VALIDATION
    assert stages.prepare_data(root, source) == root  # found, as it was described


def test_a_dataset_ingested_without_the_validation_asked_is_refused_not_reused(tmp_path):
    from noisy_student.config import FashionMnistSource

    source = _fake_idx(tmp_path)
    old = ingest.fashion_mnist(str(tmp_path / "old"), source, labelled_per_class=2)
    assert stages.choice_split(old) == dataset.TEST
    asked = FashionMnistSource(source=source, labelled_per_class=2, validation_per_class=3)
    for root, held in ((old, "no validation split"), (stages.prepare_data(
        str(tmp_path / "new"), asked), "3 images per class")):  # fmt: skip
        with pytest.raises(UserError) as e:
            stages.check_data(root, asked.model_copy(update={"validation_per_class": 1}))
        assert str(e.value) == (
            f"{root}: the dataset holds {held}, data.fashion_mnist.validation_per_class asks "
            "1 (it was ingested with other settings: point data.root at a new folder, or "
            "delete this one to ingest it again)"
        )
    with pytest.raises(UserError, match="holds no validation split"):
        stages.prepare_data(old, asked)
    assert not (tmp_path / "old" / dataset.VALIDATION).exists()


def test_cli_ingests_validation_splits_and_lists_them(image_tree, tmp_path, capsys):
    out = tmp_path / "fm"
    cli.main(["ingest", "fashion-mnist", "--out", str(out), "--source", _fake_idx(tmp_path),
              "--labelled-per-class", "2", "--validation-per-class", "3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert re.search(r"^validation\s+18 images in 1 shard\(s\), L 4x4", printed, re.M)
    assert re.search(r"^unlabelled\s+30 images", printed, re.M)  # 60 - 6 x (2 + 3)
    _save(image_tree / "validation" / "dog" / "v1.png", "RGB", (16, 16), 30)
    cli.main(["ingest", "image-folder", "--out", str(tmp_path / "if"), "--size", "16",
              "--labelled", str(image_tree / "labelled"), "--unlabelled",
              str(image_tree / "unlabelled"), "--test", str(image_tree / "test"),
              "--validation", str(image_tree / "validation")])  # fmt: skip
    assert re.search(r"^validation\s+1 images", capsys.readouterr().out, re.M)
    assert _ids(str(tmp_path / "if"), dataset.VALIDATION) == ["validation/dog/v1.png"]
