"""The performance benchmark's measurements, run on a few images (no timing assertions:
speed is reported by `make bench`, never asserted in tests)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import perf
from noisy_student import config, stages
from noisy_student.data import dataset, storage
from noisy_student.registry import tracking
from noisy_student.training import models
from tests.conftest import REPO


def _rate(x: float) -> bool:
    return math.isfinite(x) and x > 0


@pytest.fixture()
def smoke_cfg():
    return config.load(REPO / "pipeline_config/smoke.yaml")


@pytest.mark.slow  # every benchmark measurement, each on a tiny dataset: 1.5 min
def test_every_measurement_runs_on_a_tiny_dataset(
    tiny_dataset, mlflow_uri, tmp_path, fashion_mnist_source, smoke_cfg, torch_one_thread
):
    manifest = dataset.read_manifest(storage.join(tiny_dataset, dataset.UNLABELLED))
    parent = tracking.start_run("perf-test", "run")
    teacher = stages.train_teacher(
        smoke_cfg.teacher.model_copy(update={"epochs": 1}), tiny_dataset,
        str(tmp_path / "teacher"), parent, 0,
    )  # fmt: skip
    pseudo = str(tmp_path / "pseudo")

    inference, shards = perf.inference_efficiency(tiny_dataset, teacher.url, pseudo, 64, "auto", 1)
    assert [s.rows for s in shards] == [100, 100, 100]
    assert inference["images"] == manifest.num_rows == 300 and inference["shards"] == 3
    assert _rate(inference["stage_images_per_s"]) and _rate(inference["forward_images_per_s"])
    assert inference["ratio"] == pytest.approx(
        inference["stage_images_per_s"] / inference["forward_images_per_s"]
    )
    # 100-row shards in batches of 64: 64 + 36 each
    assert perf.batch_plan(manifest, 64) == [64, 36] * 3

    memory = perf.memory_ratio(tmp_path, fashion_mnist_source, 20, teacher.url, 64, "auto")
    assert memory["rows_10x"] == 200
    assert memory["peak_rss_10x_mb"] > 0 and memory["peak_rss_1x_mb"] > 0
    assert len(dataset.read_manifest(f"{tmp_path}/one-shard-200/unlabelled").shards) == 1

    selected = stages.filter_and_balance(
        shards, smoke_cfg.selection.model_copy(update={"min_confidence": 0.0, "balance": False}),
        tiny_dataset, pseudo, str(tmp_path / "selected"), teacher, parent, 1, 0,
    )  # fmt: skip
    student_cfg = smoke_cfg.students[0].model_copy(
        update={"rand_augment": config.RandAugmentConfig(num_ops=2, magnitude=9)}
    )
    training = perf.training_efficiency(
        student_cfg, tiny_dataset, selected, teacher, str(tmp_path / "student"), parent, 0, 2
    )
    batch = perf.student_batch(student_cfg)  # 16 labelled + 48 pseudo-labelled
    assert batch == 64
    assert training["steps"] == math.ceil(300 / 48) and training["images"] == 7 * 64
    assert _rate(training["stage_images_per_s"]) and _rate(training["loop_images_per_s"])

    folder = tmp_path / "folder"
    assert perf.export_image_folder(tiny_dataset, pseudo, folder) == 50 + 300
    assert len(list((folder / "train").glob("*/*.png"))) == 350
    assert training["image_size"] == "28x28 L"
    assert 0 < training["decode_seconds"] < training["stage_seconds"]
    assert training["decode_share"] == pytest.approx(
        training["decode_seconds"] / training["stage_seconds"]
    )
    assert _rate(perf.loop_rate(student_cfg, tiny_dataset, selected.url))
    sizes = perf.Sizes(300, 100, 200, 20, 1, 1, 1, 2, 2, (0,))
    timm = perf.against_timm(folder, student_cfg, tiny_dataset, (10, 1, 28, 28), sizes)
    assert _rate(timm["timm_images_per_s"]) and timm["timm_best_workers"] == 0
    ours, theirs = timm["ours_loop_images_per_s"], timm["timm_images_per_s"]
    assert timm["ratio"] == pytest.approx(ours / theirs)


def test_end_to_end_sums_each_stage_over_iterations_and_the_table_renders(tmp_path):
    iteration = {
        "train_teacher": 10.0,
        "infer_pseudo_labels": 2.0,
        "filter_and_balance": 1.0,
        "train_student": 30.0,
        "evaluate_robustness": 4.0,
    }
    summary = {
        "run_id": "r1",
        "config": {"name": "demo"},
        "seconds": 100.0,
        "iterations": [
            {"stage_seconds": iteration},
            {"stage_seconds": {**iteration, "train_teacher": 0.0}},
        ],
    }
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    e2e = perf.end_to_end(path)
    assert e2e["stage_seconds"]["train_student"] == 60.0
    assert e2e["stage_seconds"]["train_teacher"] == 10.0
    assert perf.end_to_end(tmp_path / "missing.json") is None

    result = {
        "date": "2026-12-01T00:00:00+00:00",
        "hardware": perf.hardware(),
        "teacher_model": "resnet10t",
        "student_model": "resnet10t",
        "precision": "auto",
        "wall_seconds": 60.0,
        "results": {
            "inference_efficiency": {
                "image_size": "28x28 L PNG",
                "images": 10, "shards": 1, "batch_size": 4, "stage_images_per_s": 90.0,
                "forward_images_per_s": 100.0, "read_decode_images_per_s": 1000.0,
                "ratio": 0.9, "ratios": [0.9],
            },
            "inference_efficiency_photo": {
                "image_size": "96x96 RGB JPEG",
                "images": 10, "shards": 1, "batch_size": 4, "stage_images_per_s": 9.0,
                "forward_images_per_s": 10.0, "read_decode_images_per_s": 100.0,
                "ratio": 0.9, "ratios": [0.9],
            },
            "training_efficiency": {
                "images": 64, "steps": 1, "batch_size": 64, "epochs": 1, "stage_seconds": 1.0,
                "stage_images_per_s": 64.0, "loop_images_per_s": 80.0,
                "synthetic_images_per_s": 100.0, "synthetic_before_after": [100.0, 100.0],
                "ratio": 0.64, "loop_ratio": 0.8, "image_size": "28x28 L",
                "decode_seconds": 0.1, "decode_share": 0.1,
            },
            "training_efficiency_photo": {
                "images": 64, "steps": 1, "batch_size": 64, "epochs": 1, "stage_seconds": 2.0,
                "stage_images_per_s": 32.0, "loop_images_per_s": 40.0,
                "synthetic_images_per_s": 50.0, "synthetic_before_after": [50.0, 50.0],
                "ratio": 0.64, "loop_ratio": 0.8, "image_size": "96x96 RGB",
                "decode_seconds": 0.5, "decode_share": 0.25,
            },
            "training_memory_ratio": {
                "image_size": "96x96 RGB JPEG", "decoded_cache_mb": 512,
                "rows_1x": 20000, "rows_10x": 200000,
                "decoded_gb_1x": 0.55, "decoded_gb_10x": 5.5, "steps": 30,
                "peak_rss_1x_mb": 1000.0, "peak_rss_10x_mb": 1100.0,
                "stage_growth_1x_mb": 500.0, "stage_growth_10x_mb": 600.0, "ratio": 1.1,
            },
            "against_timm": {
                "ours_loop_images_per_s": 80.0, "timm_images_per_s_by_workers": {"2": 40.0},
                "synthetic_images_per_s": 100.0, "loop_ratio": 0.8, "ratios": [2.0],
                "timm_best_workers": "2", "timm_images_per_s": 40.0, "ratio": 2.0,
                "rand_augment": {"num_ops": 2, "magnitude": 9.0, "magnitude_std": 0.0},
            },
            "memory_10x": {
                "rows_1x": 1, "rows_10x": 10, "peak_rss_1x_mb": 100.0, "peak_rss_10x_mb": 130.0,
                "stage_growth_1x_mb": 1.0, "stage_growth_10x_mb": 2.0, "ratio": 1.3,
            },
            "end_to_end": e2e,
        },
    }  # fmt: skip
    table = perf.markdown(result, "make bench")
    assert "| 0.90 | >= 0.9 | met |" in table
    assert "the same at photo size, 96x96 RGB JPEG | 9 img/s | 10 img/s | 0.90 |" in table
    assert "| 1.30 | <= 1.25 | not met |" in table
    assert "| 1.10 | <= 1.25 | met |" in table  # training memory
    assert "0.5 s of 2 s at 96x96 RGB (25%" in table  # the decode share at photo size
    assert "| train_student | 60.0 |" in table


@pytest.mark.slow  # two fresh processes import torch and timm: minutes on a busy machine
def test_photo_sized_training_measurements_run_on_a_few_generated_photos(
    mlflow_uri, tmp_path, fashion_mnist_source, torch_one_thread
):
    root = perf.training_photos(tmp_path, fashion_mnist_source, 30, 20)
    manifest = dataset.read_manifest(storage.join(root, dataset.UNLABELLED))
    assert (manifest.height, manifest.width, manifest.mode) == (96, 96, "RGB")
    assert manifest.num_rows == 30
    assert perf.training_photos(tmp_path, fashion_mnist_source, 30, 20) == root  # generated once
    selected = perf.select_everything(root, str(tmp_path / "selected"), 12)
    assert selected.selected == 12

    tiny = {"model": "test_resnet", "init_from_teacher": False, "batch_size": 2, "epochs": 1}
    # the student takes its stem from the teacher's model.json, even when not started from it
    teacher = models.create("test_resnet", manifest.num_classes, manifest.channels)
    teacher_url = str(tmp_path / "teacher")
    models.save(teacher, models.ModelMeta.for_data("test_resnet", manifest, teacher), teacher_url)
    memory = perf.training_memory_ratio(tmp_path, fashion_mnist_source, 3, 2, teacher_url, tiny)
    assert (memory["rows_1x"], memory["rows_10x"]) == (3, 30)
    assert memory["image_size"] == "96x96 RGB JPEG" and memory["decoded_cache_mb"] == 512
    assert memory["peak_rss_1x_mb"] > 0 and memory["peak_rss_10x_mb"] > 0
    assert memory["ratio"] == pytest.approx(memory["peak_rss_10x_mb"] / memory["peak_rss_1x_mb"])
