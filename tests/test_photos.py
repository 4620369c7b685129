"""Photos end to end: an ImageFolder of RGB photos of varied sizes, ingested as JPEG shards
and run through the real flow with the photos preset (tiny models), plus JPEG rows that
are not what the manifest says."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import scenes
from noisy_student import config
from noisy_student.data import dataset, dataset_writer, ingest, storage
from noisy_student.errors import UserError
from noisy_student.evaluation import corruptions
from noisy_student.training import models
from tests.conftest import REPO

PHOTOS = REPO / "pipeline_config" / "photos.yaml"
SIZE = 96  # photo-sized for the models (>= 96 px RGB), small enough for CPU tests
CLASSES = scenes.CLASSES[:3]  # dawn, forest, sea: one of each pair, plain


def _folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    counts = {"labelled": 6, "test": 8}
    for split, per_class in counts.items():
        for cls in CLASSES:
            for i in range(per_class):
                path = root / split / cls / f"{cls}-{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                scenes.photo(cls, rng).save(path, quality=int(rng.integers(75, 96)))
    for i in range(60):
        photo = scenes.photo(CLASSES[i % 3], rng)
        # the odd PNG and a grayscale print among the camera JPEGs
        path = root / "unlabelled" / f"u{i:02d}.{'png' if i % 7 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        (photo.convert("L") if i == 5 else photo).save(path)
    return root


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, prefect_harness):
    from flows.noisy_student import noisy_student

    tmp = tmp_path_factory.mktemp("photos")
    raw = _folder(tmp / "raw")
    data = ingest.image_folder(
        str(tmp / "data"),
        str(raw / "labelled"),
        str(raw / "unlabelled"),
        str(raw / "test"),
        image_size=SIZE,
        encoding="jpeg",
        quality=90,
        rows_per_shard=32,  # two unlabelled shards: two inference tasks
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(tmp)
    tiny = {"model": "test_resnet", "epochs": 1, "batch_size": 6}
    overrides = {
        "artifacts": f"{tmp}/artifacts",
        "data.root": data,
        **{f"teacher.{k}": v for k, v in tiny.items()},
        "teacher.epochs": 3,
        "teacher.eval_every": 3,
        **{f"students.{i}.{k}": v for i in (0, 1) for k, v in tiny.items()},
        "inference.batch_size": 32,
        "evaluation.severities": [3],
        "evaluation.corruption_images": 12,
        "evaluation.adversarial_images": 12,
        "evaluation.fgsm_epsilons": [4],
        "evaluation.batch_size": 16,
    }
    summary = noisy_student(config.load(PHOTOS, overrides))
    yield summary, data
    mp.undo()


@pytest.mark.slow  # the photos preset through the real flow (module fixture): 1.5 min
def test_photos_preset_runs_two_iterations_on_jpeg_shards_through_the_real_flow(photo_run):
    summary, data = photo_run
    on_disk = json.loads(Path(summary["summary_url"]).read_text())
    assert [it["iteration"] for it in on_disk["iterations"]] == [1, 2]
    for it in on_disk["iterations"]:
        for role in ("teacher", "student"):
            assert 0.0 <= it[role]["test_accuracy"] <= 1.0 and it[role]["mlflow_run_id"]
            assert list(it[role]["per_corruption_accuracy"]) == corruptions.BENCHMARK
            assert it[role]["mce"] > 0
            assert set(it[role]["fgsm_accuracy"]) == {"4/255"}
        assert it["pseudo_labels"]["total"] == 60
        assert 0 < it["pseudo_labels"]["kept"] <= 60
    # the models were built for and fed the photos as ingested: 96 px RGB
    meta = models.load_meta(on_disk["iterations"][-1]["student"]["url"])
    assert (meta.height, meta.width, meta.mode) == (SIZE, SIZE, "RGB")


@pytest.mark.slow  # the same run as the test above
def test_photos_of_every_size_are_jpeg_shards_at_one_size_and_so_is_the_corruption_suite(
    photo_run,
):
    summary, data = photo_run
    for split, rows in (("labelled", 18), ("unlabelled", 60), ("test", 24)):
        m = dataset.read_manifest(storage.join(data, split))
        assert (m.encoding, m.height, m.width, m.mode, m.num_rows) == (
            "jpeg",
            SIZE,
            SIZE,
            "RGB",
            rows,
        )
    suite = storage.read_json(storage.join(summary["robustness"]["suite_url"], "_suite.json"))
    assert len(suite["cells"]) == len(corruptions.BENCHMARK)
    cell = dataset.read_manifest(
        storage.join(summary["robustness"]["suite_url"], suite["cells"][0]["path"])
    )
    assert (cell.encoding, cell.height, cell.mode, cell.num_rows) == ("jpeg", SIZE, "RGB", 12)


def _jpeg(array: np.ndarray) -> bytes:
    return dataset_writer.encode_jpeg(array, 90)


def test_a_damaged_or_mismatched_jpeg_row_is_a_user_error_naming_shard_row_and_id(tmp_path):
    rgb = np.full((8, 8, 3), 120, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(buf, format="JPEG")
    cases = {
        "truncated": (_jpeg(rgb)[:40], r"row 1 \(id 'bad'\): corrupt image"),
        "grayscale": (buf.getvalue(), r"row 1 \(id 'bad'\): image is L 8x8, manifest says RGB"),
        "png": (dataset_writer.encode_png(rgb), r"row 1 \(id 'bad'\): corrupt image: .*not a JPEG"),
    }
    for name, (blob, message) in cases.items():
        url = str(tmp_path / name)
        with dataset_writer.DatasetWriter(url, "test", ["a"], 8, 8, "RGB", encoding="jpeg") as w:
            w.add("good", _jpeg(rgb), 0)
            w.add("bad", blob, 0)
        with pytest.raises(UserError, match=r"part-00000\.parquet: " + message):
            dataset.load(url)
    # a good JPEG shard decodes to the pixels written, within JPEG's loss
    url = str(tmp_path / "ok")
    with dataset_writer.DatasetWriter(url, "test", ["a"], 8, 8, "RGB", encoding="jpeg") as w:
        w.add("good", _jpeg(rgb), 0)
    m, images = dataset.load(url)
    assert m.encoding == "jpeg"
    assert (images.images.int() - 120).abs().max() <= 2


def test_an_unknown_encoding_in_a_manifest_is_a_user_error_naming_the_key(tmp_path):
    url = str(tmp_path / "d")
    with dataset_writer.DatasetWriter(url, "test", ["a"], 8, 8, "RGB", encoding="jpeg") as w:
        w.add("good", _jpeg(np.zeros((8, 8, 3), np.uint8)), 0)
    path = tmp_path / "d" / dataset.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["image"]["encoding"] = "avif"
    path.write_text(json.dumps(manifest))
    (tmp_path / "d" / dataset.HISTORY / "00001.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"_manifest\.json: image\.encoding 'avif' is not one of"):
        dataset.read_manifest(url)


def test_the_photo_benchmark_labels_jpeg_photos_with_an_untrained_teacher(tmp_path, mlflow_uri):
    from benchmarks import perf

    root = perf.photo_root(tmp_path, 24, 32, 12)
    m = dataset.read_manifest(storage.join(root, dataset.UNLABELLED))
    assert (m.num_rows, len(m.shards), m.height, m.mode, m.encoding) == (24, 2, 32, "RGB", "jpeg")
    teacher = perf.photo_teacher(root, "test_resnet", str(tmp_path / "teacher"))
    result, records = perf.inference_efficiency(root, teacher, str(tmp_path / "p"), 8, "auto", 1)
    assert result["image_size"] == "32x32 RGB JPEG" and result["images"] == 24
    assert result["ratio"] == pytest.approx(
        result["stage_images_per_s"] / result["forward_images_per_s"]
    )
    assert sum(r.rows for r in records) == 24
