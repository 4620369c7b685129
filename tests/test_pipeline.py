"""End to end: the smoke preset through the real flow, Prefect and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from noisy_student import config
from noisy_student.data import dataset, storage
from noisy_student.evaluation import corruptions, statistics
from noisy_student.registry import tracking
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the smoke preset through the real flow: 3 min on 2 busy cores

SMOKE = REPO / "pipeline_config" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, prefect_harness):
    """One real run of smoke.yaml (two iterations), shared by the checks below."""
    from flows.noisy_student import noisy_student

    tmp = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(tmp)
    cfg = config.load(SMOKE, [f"artifacts={tmp}/artifacts", f"data.root={tmp}/data"])
    summary = noisy_student(cfg)
    yield summary, tmp
    mp.undo()


def test_smoke_run_writes_summary_with_every_iteration(smoke_run):
    summary, tmp = smoke_run
    on_disk = json.loads(Path(summary["summary_url"]).read_text())
    assert on_disk["run_id"] == summary["run_id"]
    assert on_disk["config"]["teacher"]["model"] == "test_resnet"
    assert [it["iteration"] for it in on_disk["iterations"]] == [1, 2]
    for it in on_disk["iterations"]:
        for role in ("teacher", "student"):
            assert 0.0 <= it[role]["test_accuracy"] <= 1.0
            assert it[role]["mlflow_run_id"]
            assert list(it[role]["per_corruption_accuracy"]) == corruptions.BENCHMARK
            assert it[role]["mce"] > 0 and it[role]["relative_mce"] is not None
            assert set(it[role]["fgsm_accuracy"]) == {"2/255", "8/255"}
            assert 0.0 <= it[role]["ece_clean"] <= 1.0 and 0.0 <= it[role]["ece_corrupted"] <= 1.0
        p = it["pseudo_labels"]
        assert p["total"] == 2000 and 0 < p["kept"] <= p["total"]
        assert 0.0 <= p["accuracy"] <= 1.0
    # the student of iteration 1 is the teacher of iteration 2
    first, second = on_disk["iterations"]
    assert second["teacher"]["mlflow_run_id"] == first["student"]["mlflow_run_id"]
    assert second["teacher"]["url"] == first["student"]["url"]


def test_smoke_run_ingests_the_dataset_with_manifests(smoke_run):
    summary, tmp = smoke_run
    root = summary["data_root"]
    counts = {
        s: dataset.read_manifest(storage.join(root, s)).num_rows
        for s in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST)
    }
    assert counts == {"labelled": 100, "unlabelled": 2000, "test": 500}
    assert len(dataset.read_manifest(storage.join(root, dataset.UNLABELLED)).shards) == 2


def test_smoke_run_writes_pseudo_labels_and_selection_behind_manifests(smoke_run):
    summary, _ = smoke_run
    it = summary["iterations"][0]
    pseudo = storage.read_json(
        storage.join(it["pseudo_labels"]["probabilities_url"], dataset.MANIFEST)
    )
    assert sum(s["rows"] for s in pseudo["shards"]) == 2000
    assert pseudo["teacher_run_id"] == it["teacher"]["mlflow_run_id"]
    selected = storage.read_json(storage.join(it["pseudo_labels"]["url"], dataset.MANIFEST))
    # one selected file per pseudo-label shard; duplicated images carry a copy count
    tables = [
        pq.read_table(storage.join(it["pseudo_labels"]["url"], f["file"]))
        for f in selected["shards"]
    ]
    assert [t.num_rows for t in tables] == [f["rows"] for f in selected["shards"]]
    assert sum(t.num_rows for t in tables) == selected["rows"] == it["pseudo_labels"]["kept"]
    assert sum(sum(t.column("copies").to_pylist()) for t in tables) == selected["selected"]
    assert selected["selected"] == it["pseudo_labels"]["selected"]
    assert tables[0].column("target").type.list_size == 10
    robustness = pq.read_table(storage.join(it["robustness_url"], "robustness.parquet"))
    assert set(robustness.column("role").to_pylist()) == {"teacher", "student"}


def test_smoke_run_records_lineage_in_mlflow(smoke_run):
    summary, tmp = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["teacher.model"] == "test_resnet"
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    stages = sorted(
        (r.data.tags[f"{tracking.TAG}stage"], r.data.tags[f"{tracking.TAG}iteration"])
        for r in children
    )
    assert stages == sorted(
        [("train_teacher", "1")]
        + [
            (s, str(k))
            for k in (1, 2)
            for s in (
                "infer_pseudo_labels",
                "filter_and_balance",
                "train_student",
                "evaluate_robustness",
            )
        ]
        + [("label_queue", "2")]  # after the last iteration, by its student
    )
    by_id = {r.info.run_id: r for r in children}
    for it in summary["iterations"]:
        student = by_id[it["student"]["mlflow_run_id"]]
        # which teacher labelled which data and trained which student
        assert student.data.tags[f"{tracking.TAG}teacher_run_id"] == it["teacher"]["mlflow_run_id"]
        assert (
            student.data.tags[f"{tracking.TAG}pseudo_labels_run_id"]
            == it["pseudo_labels"]["mlflow_run_id"]
        )
        labelling = by_id[it["pseudo_labels"]["mlflow_run_id"]]
        assert (
            labelling.data.tags[f"{tracking.TAG}teacher_run_id"] == it["teacher"]["mlflow_run_id"]
        )
        # per-epoch metrics and the model (weights + timm config) are on the student run
        assert client.get_metric_history(student.info.run_id, "train_loss")
        files = {f.path for f in client.list_artifacts(student.info.run_id, "model")}
        assert files == {"model/model.safetensors", "model/model.json"}
        assert student.inputs.dataset_inputs
    # every student is a version of the registered model named after the experiment
    versions = client.search_model_versions("name='noisy-student-smoke'")
    assert {v.run_id for v in versions} >= {
        it["student"]["mlflow_run_id"] for it in summary["iterations"]
    }
    lineage_file = client.download_artifacts(parent.info.run_id, "lineage.json", str(tmp))
    lineage = json.loads(Path(lineage_file).read_text())
    assert [x["student_run_id"] for x in lineage] == [
        it["student"]["mlflow_run_id"] for it in summary["iterations"]
    ]


def test_the_accuracy_benchmark_reads_a_runs_finished_iterations_from_mlflow(
    smoke_run, tmp_path, monkeypatch
):
    """`benchmarks.accuracy` shows the iterations a long flow has finished before it returns
    (a sitting may end mid-chain): from MLflow, the same figures as the summary's."""
    import shutil

    from benchmarks import accuracy

    summary, tmp = smoke_run
    db = tmp_path / "mlflow.db"  # a copy: the run below is changed, the shared one is not
    shutil.copy(tmp / "mlflow.db", db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    found = accuracy.finished_iterations("noisy-student-smoke", summary["run_id"])
    assert [it["iteration"] for it in found] == [1, 2]
    for it, want in zip(found, summary["iterations"], strict=True):
        assert it["teacher"]["test_accuracy"] == want["teacher"]["test_accuracy"]
        assert it["student"]["test_accuracy"] == want["student"]["test_accuracy"]
        assert it["student"]["model"] == want["student"]["model"] == "test_resnet"
        assert it["pseudo_label_accuracy"] == want["pseudo_labels"]["accuracy"]
        assert it["student"]["train_seconds"] > 0
    # a run stopped inside iteration 2's evaluation: iteration 1 alone is finished
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    evaluation = client.search_runs(
        [client.get_experiment_by_name("noisy-student-smoke").experiment_id],
        f"tags.`{tracking.TAG}stage` = 'evaluate_robustness' and "
        f"tags.`{tracking.TAG}iteration` = '2'",
    )[0]
    client.update_run(evaluation.info.run_id, status="RUNNING")
    found = accuracy.finished_iterations("noisy-student-smoke", summary["run_id"])
    assert [it["iteration"] for it in found] == [1]
    assert accuracy.finished_iterations("noisy-student-smoke", "another-run") == []
    assert accuracy.finished_iterations("no-such-experiment", summary["run_id"]) == []


def test_the_pseudo_label_report_scores_every_labeller_the_run_saved(smoke_run):
    """`benchmarks.pseudo_labels` reads the run's saved probabilities (no training): each
    labeller's accuracy over the whole pool is the one the run logged for its labels."""
    from benchmarks import pseudo_labels

    summary, _ = smoke_run
    text, figures = pseudo_labels.report(summary["artifacts_url"], summary["data_root"])
    # the teacher and student 1 labelled iterations 1 and 2; the last student, the queue
    assert list(figures["labellers"]) == ["teacher", "student 1", "student 2"]
    for it, name in zip(summary["iterations"], ["teacher", "student 1"], strict=True):
        got = figures["labellers"][name]["accuracy"]
        assert got == pytest.approx(it["pseudo_labels"]["accuracy_all"], abs=1e-9)
    assert figures["images"] == 2000 and "| student 2 |" in text
    assert list(figures["averages"]) == ["student 1 + student 2", "teacher + student 1 + student 2"]


def test_smoke_run_judges_every_model_on_one_suite_with_report_table_and_figures(smoke_run):
    summary, tmp = smoke_run
    first, second = summary["iterations"]
    # the first teacher is the baseline of the run's mCE
    assert first["teacher"]["mce"] == pytest.approx(1.0)
    assert summary["robustness"]["baseline"]["mlflow_run_id"] == first["teacher"]["mlflow_run_id"]
    # one suite, generated once beside the test set, judged by every model
    suite = storage.read_json(storage.join(summary["robustness"]["suite_url"], "_suite.json"))
    assert len(suite["cells"]) == 19 * 3 and suite["images"] == 100
    assert summary["robustness"]["suite_url"].startswith(summary["data_root"])
    tables = [
        pq.read_table(storage.join(it["robustness_url"], "robustness.parquet")).to_pandas()
        for it in summary["iterations"]
    ]
    tables = [t[t["suite"] == "reported"] for t in tables]  # the gate's suite is apart
    digests = [
        t[t["corruption"] != "fgsm"].groupby(["corruption", "severity"])["images_digest"].agg(set)
        for t in tables
    ]
    assert all(len(d) == 1 for d in digests[0]) and digests[0].equals(digests[1])
    assert all(set(t["role"]) == {"teacher", "student"} for t in tables)
    # the report beside summary.json covers all three models of the run
    report = Path(summary["robustness"]["report_url"]).read_text()
    assert Path(summary["robustness"]["report_url"]).parent == Path(summary["summary_url"]).parent
    for label in ("teacher 1", "student 1", "student 2"):
        assert f"### {label}" in report
    assert all(name in report for name in corruptions.BENCHMARK)
    # the figures, beside the table and in each evaluation run in MLflow
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    for it in summary["iterations"]:
        for name in ("accuracy_vs_severity.png", "mce_per_iteration.png", "fgsm_accuracy.png"):
            assert Path(it["robustness_url"], "figures", name).stat().st_size > 1000
        logged = {f.path for f in client.list_artifacts(it["evaluation_mlflow_run_id"], "figures")}
        assert "figures/mce_per_iteration.png" in logged
        assert "robustness.md" in {
            f.path for f in client.list_artifacts(it["evaluation_mlflow_run_id"])
        }
    history = client.get_metric_history(summary["mlflow"]["parent_run_id"], "student_mce")
    assert sorted(m.step for m in history) == [1, 2]


def test_smoke_run_publishes_the_report_as_a_prefect_artifact(smoke_run):
    from prefect.artifacts import Artifact

    summary, _ = smoke_run
    artifact = Artifact.get("robustness-iteration-2")  # the latest of that key: this run's
    assert artifact is not None and artifact.type == "markdown"
    assert "# Robustness after iteration 2" in artifact.data
    assert summary["iterations"][1]["student"]["mlflow_run_id"] in artifact.data
    promotion = summary["promotion"]
    decision = Artifact.get("promotion")  # the gate's decision, with its reasons
    assert decision is not None and decision.type == "markdown"
    assert f"is the **{promotion['decision']}**" in decision.data
    assert all(reason in decision.data for reason in promotion["reasons"])
    assert "Chosen on the **validation** split" in decision.data
    for v in promotion["students_against_teachers"]:
        assert f"student {v['iteration']} against its teacher: **{v['verdict']}**" in decision.data
        low, high = v["comparison"]["accuracy"]["interval"]
        assert f"95% interval {100 * low:+.2f} to {100 * high:+.2f})" in decision.data


def test_smoke_run_gates_on_the_validation_split_with_paired_counts_and_p_values(smoke_run):
    summary, tmp = smoke_run
    root = summary["data_root"]
    assert dataset.read_manifest(storage.join(root, dataset.VALIDATION)).num_rows == 200
    promotion = json.loads(Path(summary["artifacts_url"], "promotion.json").read_text())
    assert promotion == summary["promotion"] and summary["chosen_on"] == "validation"
    assert promotion["chosen_on"] == "validation" and "note" not in promotion
    for v in promotion["students_against_teachers"]:
        accuracy = v["comparison"]["accuracy"]
        assert accuracy["images"] == 200 and accuracy["test"] == "exact McNemar"
        counts = [accuracy[k] for k in ("both_right", "only_first_right", "only_second_right",
                                        "both_wrong")]  # fmt: skip
        assert sum(counts) == 200 and 0 < accuracy["p_value"] <= 1
        assert v["verdict"] in (statistics.ABOVE, statistics.TIED, statistics.BELOW)
    for it in summary["iterations"]:
        for role in ("teacher", "student"):
            m = it[role]
            assert m["chosen_on"]["split"] == "validation" and m["chosen_on"]["images"] == 200
            low, high = m["validation_accuracy_interval"]
            assert low <= m["validation_accuracy"] <= high
            low, high = m["test_accuracy_interval"]
            assert low <= m["test_accuracy"] <= high
    # the runs's choices are tags of the pipeline run in MLflow
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    tags = client.get_run(summary["mlflow"]["parent_run_id"]).data.tags
    assert tags[f"{tracking.TAG}chosen_on"] == "validation"
    for v in promotion["students_against_teachers"]:
        assert tags[f"{tracking.TAG}student_{v['iteration']}_vs_teacher"] == v["verdict"]


def test_smoke_run_logs_a_model_per_trained_model_with_mlflow_lineage(smoke_run):
    summary, tmp = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("noisy-student-smoke").experiment_id
    logged = client.search_logged_models([experiment])
    assert sorted(m.name for m in logged) == ["student-1", "student-2", "teacher-1"]
    by_run = {m.source_run_id: m for m in logged}
    for it in summary["iterations"]:
        teacher = by_run[it["teacher"]["mlflow_run_id"]]
        student = by_run[it["student"]["mlflow_run_id"]]
        run = client.get_run(it["student"]["mlflow_run_id"])
        # the student run takes the teacher's model and the pseudo-labelled set, outputs its own
        assert [m.model_id for m in run.inputs.model_inputs] == [teacher.model_id]
        assert [m.model_id for m in run.outputs.model_outputs] == [student.model_id]
        sources = [d.dataset.source for d in run.inputs.dataset_inputs]
        assert any(it["pseudo_labels"]["url"] in s for s in sources), sources
        labelling = client.get_run(it["pseudo_labels"]["inference_mlflow_run_id"])
        assert [m.model_id for m in labelling.inputs.model_inputs] == [teacher.model_id]
        # the evaluation's figures are the student model's metrics
        metrics = {m.key: m.value for m in client.get_logged_model(student.model_id).metrics}
        assert metrics["test_accuracy"] == pytest.approx(it["student"]["test_accuracy"])
        assert metrics["mce"] == pytest.approx(it["student"]["mce"])
        assert metrics["ece_clean"] == pytest.approx(it["student"]["ece_clean"])
    # registered versions are made from the logged models
    for v in client.search_model_versions("name='noisy-student-smoke'"):
        assert v.source == f"models:/{by_run[v.run_id].model_id}"


def test_smoke_run_publishes_the_results_table_keyed_by_pipeline_name(smoke_run):
    from prefect.artifacts import Artifact

    summary, _ = smoke_run
    artifact = Artifact.get("noisy-student-smoke")
    assert artifact is not None and artifact.type == "table"
    rows = json.loads(artifact.data)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[1]["student MLflow run"] == summary["iterations"][1]["student"]["mlflow_run_id"]
    assert rows[0]["student test accuracy %"] == pytest.approx(
        100 * summary["iterations"][0]["student"]["test_accuracy"], abs=0.01
    )


def test_smoke_run_diagnoses_the_pseudo_labels_of_every_iteration(smoke_run):
    summary, tmp = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    first, second = (it["pseudo_labels"] for it in summary["iterations"])
    for p in (first, second):
        d = p["diagnostics"]
        assert sum(d["confidence_histogram"]["counts"]) == p["total"]
        assert 0.0 < d["coverage_at_min_confidence"] <= 1.0
        assert 0.0 <= d["precision_at_min_confidence"] <= 1.0
        assert Path(d["figure_url"]).stat().st_size > 1000
        logged = {f.path for f in client.list_artifacts(p["mlflow_run_id"], "figures")}
        assert logged == {"figures/pseudo_labels.png"}
    assert first["diagnostics"]["changed_since_previous"] is None
    # the second teacher labelled the same 2000 images again
    assert second["diagnostics"]["compared_with_previous"] == 2000
    changed = client.get_run(second["mlflow_run_id"]).data.metrics["changed_since_previous"]
    assert changed == second["diagnostics"]["changed_since_previous"] >= 0


def test_smoke_run_shows_each_training_stage_progress_as_an_artifact(smoke_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    summary, tmp = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    flow_run_id = client.get_run(summary["mlflow"]["parent_run_id"]).data.tags[
        "prefect.flow_run_id"
    ]
    with get_client(sync_client=True) as prefect:
        progress = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(any_=["progress"]),
            )
        )
    # the teacher and two students, each moved to 100% by its last epoch
    assert sorted(a.description for a in progress) == [
        "student 1: epochs trained",
        "student 2: epochs trained",
        "teacher: epochs trained",
    ]
    assert all(a.data == 100.0 for a in progress)


def test_smoke_run_queues_the_images_to_label_next_for_annotators(smoke_run):
    import base64

    from prefect.artifacts import Artifact

    summary, tmp = smoke_run
    queue = summary["label_queue"]
    assert (queue["strategy"], queue["size"]) == ("margin", 200)
    table = pq.read_table(queue["files"]["parquet"]).to_pandas()
    pool = dataset.read_manifest(storage.join(summary["data_root"], dataset.UNLABELLED))
    assert table["id"].is_unique and set(table["id"]) <= dataset.read_ids(pool)
    # ranked by the final student's margin, smallest first
    assert table["margin"].is_monotonic_increasing and table["rank"].tolist() == list(range(1, 201))
    scores = storage.read_json(storage.join(queue["url"], "scores", dataset.MANIFEST))
    assert scores["teacher_run_id"] == summary["iterations"][-1]["student"]["mlflow_run_id"]
    assert sum(s["rows"] for s in scores["shards"]) == 2000
    tasks = json.loads(Path(queue["files"]["label_studio"]).read_text())
    assert [t["data"]["image_id"] for t in tasks] == table["id"].tolist()
    assert Path(queue["files"]["csv"]).read_text().startswith("id,class,model_class,")
    sheet = Path(queue["files"]["contact_sheet"]).read_bytes()
    # the contact sheet in MLflow and in the Prefect UI, the first rows as a table
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    logged = client.list_artifacts(summary["mlflow"]["parent_run_id"], "label_queue")
    assert [f.path for f in logged] == ["label_queue/contact_sheet.png"]
    stage = client.get_run(queue["mlflow_run_id"])
    assert stage.data.tags["noisy_student.student_run_id"] == scores["teacher_run_id"]
    assert stage.data.metrics["queued"] == 200
    image = Artifact.get("noisy-student-smoke-label-queue-sheet")
    assert image is not None and image.type == "image"
    assert base64.b64decode(image.data.split(",", 1)[1]) == sheet
    rows = json.loads(Artifact.get("noisy-student-smoke-label-queue").data)
    assert [r["id"] for r in rows] == table["id"].tolist()[:50]
