"""The five stages called directly (no Prefect), with every URL on S3 (moto's server)."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import pytest
import s3fs
import torch

from noisy_student import config, stages
from noisy_student.data import dataset, dataset_writer, ingest, prefetch, storage
from noisy_student.errors import UserError
from tests.conftest import REPO


@pytest.mark.slow  # a whole iteration on moto's S3: 70 s
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
    from noisy_student.registry import tracking

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
    assert {m.role for m in result.models} == {"teacher", "student"}
    assert dataset.read_manifest(f"{root}/unlabelled").num_rows == 200


def _labelled_by_a_teacher(root: str, tmp_path: Path, experiment: str):
    """The smoke config, a parent run, a teacher of one epoch, and its pseudo labels of
    every unlabelled shard of `root` (in tmp_path/p)."""
    from noisy_student.registry import tracking

    cfg = config.load(REPO / "pipeline_config/smoke.yaml", ["teacher.epochs=1"])
    parent = tracking.start_run(experiment, "run")
    teacher = stages.train_teacher(cfg.teacher, root, str(tmp_path / "t"), parent, 0)
    pseudo = str(tmp_path / "p")
    shards = [
        stages.infer_pseudo_labels(root, i, teacher.url, pseudo, 64)
        for i in stages.unlabelled_shards(root)
    ]
    return cfg, parent, teacher, pseudo, shards


@pytest.mark.slow  # trains a teacher and labels with it: 15 s
def test_filter_and_balance_refuses_when_nothing_passes_the_threshold(
    tiny_dataset, mlflow_uri, tmp_path
):
    from noisy_student.registry import tracking

    cfg, parent, teacher, _, shards = _labelled_by_a_teacher(tiny_dataset, tmp_path, "empty-test")
    out = tmp_path / "selected"
    with pytest.raises(UserError, match="min_confidence"):
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
    assert not storage.exists(str(out / dataset.MANIFEST))  # nothing half-written
    # and the stage's MLflow runs say it failed instead of showing as running forever
    runs = tracking.client().search_runs(
        [tracking.experiment_id("empty-test")], "tags.noisy_student.stage = 'filter_and_balance'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow  # ingests and trains a teacher on moto's S3: 9 s
def test_no_credential_reaches_logs_or_mlflow(s3_endpoint, mlflow_uri, monkeypatch, capsys, caplog):
    """S3 credentials come from the environment and stay there: a stage reading and writing
    s3:// logs nothing of them, in its messages, MLflow params, tags or artifacts."""
    import logging

    from noisy_student.registry import tracking

    key_id, secret = "AKIAKEEPTHISPRIVATE7", "s3cr3t-that-must-not-leak-4242"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    caplog.set_level(logging.DEBUG, logger="noisy_student")
    caplog.set_level(logging.DEBUG, logger="s3fs")  # every S3 call, with its arguments
    root = "s3://ns-test/creds/data"
    from tests.conftest import FASHION_MNIST

    ingest.fashion_mnist(
        root, FASHION_MNIST, labelled_per_class=2, unlabelled_limit=20, test_limit=100
    )
    cfg = config.load(
        REPO / "pipeline_config/smoke.yaml",
        [f"data.root={root}", "artifacts=s3://ns-test/creds/artifacts", "teacher.epochs=1"],
    )
    parent = tracking.start_pipeline_run(
        "creds-test",
        "run-1",
        {**cfg.model_dump(), "note": f"https://user:{secret}@example.com/x"},
        {"source": f"s3://{key_id}:{secret}@bucket/key"},
    )
    stages.train_teacher(cfg.teacher, root, "s3://ns-test/creds/run/teacher", parent, 0)

    client = tracking.client()
    recorded = []
    for run in client.search_runs([tracking.experiment_id("creds-test")]):
        recorded += list(run.data.params.values()) + list(run.data.tags.values())
        for f in client.list_artifacts(run.info.run_id):
            if f.path.endswith(".json"):
                local = client.download_artifacts(run.info.run_id, f.path)
                recorded.append(Path(local).read_text())
    out = capsys.readouterr()
    assert "teacher epoch 1:" in caplog.text  # the stage's log is in what is searched
    everything = "\n".join(recorded + [out.out, out.err, caplog.text])
    assert any("ns-test" in r.getMessage() for r in caplog.records if r.name == "s3fs")
    assert root in everything  # the URLs are recorded ...
    assert secret not in everything and key_id not in everything  # ... the credentials not
    assert "https://***@example.com/x" in everything
    s3fs.S3FileSystem.clear_instance_cache()


def test_streamed_pseudo_labels_match_the_teacher_on_the_whole_shard(tiny_dataset, tmp_path):
    import numpy as np
    import torch

    from noisy_student.training import engine, models

    manifest = dataset.read_manifest(f"{tiny_dataset}/{dataset.UNLABELLED}")
    model = models.create("test_resnet", manifest.num_classes, manifest.channels)
    meta = models.ModelMeta(
        "test_resnet", manifest.num_classes, 1, manifest.class_names, 28, 28, "L"
    )
    teacher_url = models.save(model, meta, str(tmp_path / "teacher"))
    # batches of 32 over a 100-row shard: three full batches and a short one
    record = stages.infer_pseudo_labels(tiny_dataset, 1, teacher_url, str(tmp_path / "p"), 32)
    table = storage.read_parquet(record.url)
    shard = dataset.load_shard(manifest, 1)
    expected = engine.predict_probs(models.load(teacher_url)[0], shard.images, 100)
    assert record.rows == 100 and table.column("id").to_pylist() == shard.ids
    probs = np.stack(table.column("probs").to_numpy(zero_copy_only=False))
    torch.testing.assert_close(torch.from_numpy(probs), expected, rtol=1e-4, atol=1e-5)
    assert table.column("predicted").to_pylist() == expected.argmax(1).tolist()
    # inference.tta: flip-averaged pseudo labels
    flipped = stages.infer_pseudo_labels(
        tiny_dataset, 1, teacher_url, str(tmp_path / "f"), 32, tta="flip"
    )
    averaged = engine.predict_probs(models.load(teacher_url)[0], shard.images, 100, tta="flip")
    probs = np.stack(storage.read_parquet(flipped.url).column("probs").to_numpy(False))
    torch.testing.assert_close(torch.from_numpy(probs), averaged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("torch_threads", [1, 64])
def test_labelling_decodes_beside_the_forward_pass_only_where_a_core_is_spare(
    tiny_dataset, monkeypatch, torch_threads
):
    # where torch's threads fill every core a reader thread only takes turns with them
    module = importlib.import_module("noisy_student.stages.infer_pseudo_labels")
    monkeypatch.setattr(module, "COMPUTE_THREADS", torch_threads)
    monkeypatch.setattr(prefetch, "COMPUTE_THREADS", torch_threads)
    monkeypatch.setattr(prefetch, "cores", lambda: 2)
    decoded_in, decode = [], dataset.decode_images
    monkeypatch.setattr(
        dataset,
        "decode_images",
        lambda *a, **k: decoded_in.append(threading.current_thread()) or decode(*a, **k),
    )
    manifest = dataset.read_manifest(f"{tiny_dataset}/{dataset.UNLABELLED}")
    with module.read_ahead(manifest, 1, 32) as batches:
        images = torch.cat([b.images for b in batches])
    batches_decoded_in = list(decoded_in)
    assert torch.equal(images, dataset.load_shard(manifest, 1).images)
    assert len(batches_decoded_in) == 4  # 100 rows in batches of 32
    here = {t is threading.current_thread() for t in batches_decoded_in}
    assert here == ({False} if torch_threads == 1 else {True})


@pytest.mark.slow  # trains a teacher and labels with it: 12 s
def test_pseudo_label_accuracy_scores_only_images_with_a_known_label(
    tiny_dataset, mlflow_uri, tmp_path
):
    """Images appended after ingest have no true label: they are left out of the
    pseudo-label accuracy, not counted as wrong."""
    import shutil

    import numpy as np
    import pandas as pd

    root = str(tmp_path / "data")
    shutil.copytree(tiny_dataset, root)
    test = dataset.load(storage.join(root, dataset.TEST))[1]
    new = [(f"new/{i}", test.images[i, 0].numpy(), None) for i in range(40)]
    dataset_writer.append_rows(storage.join(root, dataset.UNLABELLED), new, rows_per_shard=100)

    cfg, parent, teacher, pseudo, shards = _labelled_by_a_teacher(root, tmp_path, "truth-test")
    selected = stages.filter_and_balance(
        shards,
        cfg.selection.model_copy(update={"min_confidence": 0.0, "balance": False}),
        root,
        pseudo,
        str(tmp_path / "selected"),
        teacher,
        parent,
        1,
        0,
    )
    predicted = pd.concat(
        storage.read_parquet(s.url, ["id", "predicted"]).to_pandas() for s in shards
    ).set_index("id")["predicted"]
    truth = storage.read_parquet(storage.join(root, dataset.UNLABELLED_TRUTH)).to_pandas()
    truth = truth.set_index("id")["label"]
    assert selected.total == 340 and selected.kept == 340 and len(truth) == 300
    expected = float(np.mean(predicted.loc[truth.index].to_numpy() == truth.to_numpy()))
    assert selected.accuracy_all == pytest.approx(expected)
    assert selected.accuracy == pytest.approx(expected)  # everything kept: the same images


@pytest.mark.slow  # trains a teacher and labels with it: 12 s
def test_aligned_selection_matches_the_labelled_class_shares_and_says_what_changed(
    tiny_dataset, mlflow_uri, tmp_path
):
    import numpy as np
    import pandas as pd

    from noisy_student.registry import tracking
    from noisy_student.training import selection

    cfg, parent, teacher, pseudo, shards = _labelled_by_a_teacher(
        tiny_dataset, tmp_path, "align-test"
    )
    out = str(tmp_path / "selected")
    everything = {"min_confidence": 0.0, "balance": False}
    selected = stages.filter_and_balance(
        shards, cfg.selection.model_copy(update=everything | {"align": True}),
        tiny_dataset, pseudo, out, teacher, parent, 1, 0,
    )  # fmt: skip
    files = storage.read_json(storage.join(out, dataset.MANIFEST))["shards"]
    rows = pd.concat(storage.read_parquet(storage.join(out, f["file"])).to_pandas() for f in files)
    raw = pd.concat(storage.read_parquet(s.url, ["id", "predicted"]).to_pandas() for s in shards)
    raw = raw.set_index("id")["predicted"].loc[rows["id"]].to_numpy()
    labelled = dataset.read_manifest(storage.join(tiny_dataset, dataset.LABELLED))
    shares = dataset.class_shares(labelled)

    # every image kept once: the targets' mean is the labelled set's class shares
    assert selected.total == selected.kept == len(rows)
    targets = np.stack(rows["target"].to_numpy())
    assert np.abs(targets.mean(0) / shares - 1).max() <= selection.ALIGN_TOLERANCE * 1.01
    np.testing.assert_array_equal(rows["predicted"], targets.argmax(1))

    record = storage.read_json(storage.join(out, dataset.MANIFEST))["alignment"]
    assert list(record["weights"]) == labelled.class_names and max(record["weights"].values()) == 1
    assert record["passes"] >= 2 and record["deviation"] <= selection.ALIGN_TOLERANCE
    assert record["changed"] == int((raw != rows["predicted"].to_numpy()).sum()) > 0
    truth = storage.read_parquet(storage.join(tiny_dataset, dataset.UNLABELLED_TRUTH))
    truth = truth.to_pandas().set_index("id")["label"].loc[rows["id"]].to_numpy()
    assert record["accuracy_before"] == pytest.approx(float(np.mean(raw == truth)))
    assert record["accuracy_after"] == pytest.approx(float(np.mean(rows["predicted"] == truth)))
    assert selected.accuracy_all == pytest.approx(record["accuracy_after"])

    run = tracking.client().get_run(selected.mlflow_run_id)
    assert run.data.metrics["alignment_changed"] == record["changed"]
    assert run.data.metrics["alignment_passes"] == record["passes"]
    # the labelling run keeps the teacher's own figures
    labelling = tracking.client().get_run(selected.inference_run_id).data.metrics
    assert labelling["pseudo_label_accuracy"] == pytest.approx(record["accuracy_before"])

    # without alignment the same pool gives the teacher's labels, and no record
    plain = stages.filter_and_balance(
        shards, cfg.selection.model_copy(update=everything), tiny_dataset, pseudo,
        str(tmp_path / "plain"), teacher, parent, 1, 0,
    )  # fmt: skip
    assert plain.accuracy_all == pytest.approx(record["accuracy_before"])
    assert storage.read_json(str(tmp_path / "plain" / dataset.MANIFEST))["alignment"] is None
