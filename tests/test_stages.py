"""The five stages called directly (no Prefect), with every URL on S3 (moto's server)."""

from __future__ import annotations

import s3fs

from noisy_student import config, dataset, ingest, stages, storage
from noisy_student.errors import UserError
from tests.conftest import REPO


def test_one_iteration_runs_with_every_artifact_on_s3(
    s3_endpoint, mlflow_uri, fashion_mnist_source
):
    s3fs.S3FileSystem.clear_instance_cache()
    root = "s3://ns-test/datasets/tiny"
    ingest.fashion_mnist(
        root,
        fashion_mnist_source,
        labelled_per_class=5,
        unlabelled_limit=200,
        test_limit=100,
        rows_per_shard=100,
    )
    cfg = config.load(REPO / "pipeline_config/smoke.yaml", ["teacher.epochs=2"])
    from noisy_student import tracking

    parent = tracking.start_run("s3-test", "run")
    run = "s3://ns-test/runs/r1"
    teacher = stages.train_teacher(cfg.teacher, root, f"{run}/teacher", parent, seed=0)
    shards = [
        stages.infer_pseudo_labels(root, i, teacher.url, f"{run}/pseudo_labels", 64)
        for i in stages.unlabelled_shards(root)
    ]
    assert [s.rows for s in shards] == [100, 100]
    selected = stages.filter_and_balance(
        shards,
        cfg.selection.model_copy(update={"min_confidence": 0.0, "balance": False}),
        root,
        f"{run}/pseudo_labels",
        f"{run}/selected",
        teacher,
        parent,
        1,
        seed=0,
    )
    student = stages.train_student(
        cfg.students[0], root, selected, teacher, f"{run}/student", parent, 1, seed=0
    )
    result = stages.evaluate_robustness(
        [teacher, student], cfg.evaluation, root, f"{run}/robustness", parent, 1
    )

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    written = set(fs.find("ns-test/runs/r1"))
    assert {
        "ns-test/runs/r1/teacher/model.safetensors",
        "ns-test/runs/r1/student/model.json",
        "ns-test/runs/r1/pseudo_labels/part-00000.parquet",
        "ns-test/runs/r1/pseudo_labels/_manifest.json",
        "ns-test/runs/r1/selected/_manifest.json",
        "ns-test/runs/r1/robustness/robustness.parquet",
    } <= written
    assert selected.total == 200 and selected.kept == 200  # no threshold, no balancing: all kept
    assert {m["role"] for m in result.models} == {"teacher", "student"}
    assert dataset.read_manifest(f"{root}/unlabelled").num_rows == 200


def test_filter_and_balance_refuses_when_nothing_passes_the_threshold(
    tiny_dataset, mlflow_uri, tmp_path
):
    from noisy_student import tracking

    cfg = config.load(REPO / "pipeline_config/smoke.yaml", ["teacher.epochs=1"])
    parent = tracking.start_run("empty-test", "run")
    teacher = stages.train_teacher(cfg.teacher, tiny_dataset, str(tmp_path / "t"), parent, 0)
    shards = [stages.infer_pseudo_labels(tiny_dataset, 0, teacher.url, str(tmp_path / "p"), 64)]
    out = tmp_path / "selected"
    try:
        stages.filter_and_balance(
            shards,
            cfg.selection.model_copy(update={"min_confidence": 1.0}),
            tiny_dataset,
            str(tmp_path / "p"),
            str(out),
            teacher,
            parent,
            1,
            0,
        )
    except UserError as e:
        assert "min_confidence" in str(e)
    else:
        raise AssertionError("expected a UserError")
    assert not storage.exists(str(out / dataset.MANIFEST))  # nothing half-written
    # and the stage's MLflow runs say it failed instead of showing as running forever
    runs = tracking.client().search_runs(
        [tracking.experiment_id("empty-test")], "tags.noisy_student.stage = 'filter_and_balance'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]
