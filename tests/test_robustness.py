"""The robustness benchmark: the cached suite, the metrics on hand-computed examples, FGSM
on a trained model, and the evaluate_robustness stage with its outputs and baselines."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from noisy_student import config, stages
from noisy_student.data import dataset, dataset_writer, storage
from noisy_student.errors import UserError
from noisy_student.evaluation import corruptions, robustness
from noisy_student.registry import tracking
from noisy_student.training import augment, engine, models
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------- metrics by hand


def test_expected_calibration_error_on_a_hand_example():
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # conf 0.9, right
            [0.1, 0.8, 0.05, 0.05],  # conf 0.8, wrong
            [0.6, 0.2, 0.1, 0.1],  # conf 0.6, right
            [0.3, 0.25, 0.25, 0.2],  # conf 0.3, wrong
        ]
    )
    labels = torch.tensor([0, 0, 0, 1])
    # bins (0, .5] and (.5, 1]: 3/4 x |2/3 - 0.7667| + 1/4 x |0 - 0.3| = 0.075 + 0.075
    assert robustness.expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.15)
    # 15 bins: each sample alone in its bin, so the mean of |right - confidence|
    expected = (0.1 + 0.8 + 0.4 + 0.3) / 4
    assert robustness.expected_calibration_error(probs, labels, bins=15) == pytest.approx(expected)


def test_a_sure_and_always_right_model_is_perfectly_calibrated():
    probs = F.one_hot(torch.tensor([2, 0, 1]), 3).float()
    assert robustness.expected_calibration_error(probs, torch.tensor([2, 0, 1])) == 0.0


def _rows(clean: float, errors: dict[tuple[str, int], float], run_id: str) -> pd.DataFrame:
    rows = [
        {
            "mlflow_run_id": run_id,
            "corruption": "clean",
            "severity": 0,
            "error": clean,
            "accuracy": 1 - clean,
            "ece": 0.01,
            "images_digest": "test",
        }
    ]
    rows += [
        {
            "mlflow_run_id": run_id,
            "corruption": c,
            "severity": s,
            "error": e,
            "accuracy": 1 - e,
            "ece": 0.1,
            "images_digest": f"{c}-{s}",
        }
        for (c, s), e in errors.items()
    ]
    return pd.DataFrame(rows)


def test_mce_and_relative_mce_match_a_hand_computed_example():
    baseline = _rows(0.05, {("a", 1): 0.2, ("a", 2): 0.4, ("b", 1): 0.1, ("b", 2): 0.3}, "b")
    model = _rows(0.02, {("a", 1): 0.1, ("a", 2): 0.2, ("b", 1): 0.1, ("b", 2): 0.3}, "m")
    s = robustness.score(model, baseline, ["a", "b"], [1, 2])
    # CE_a = (0.1 + 0.2) / (0.2 + 0.4) = 0.5; CE_b = 0.4 / 0.4 = 1; mCE = 0.75
    assert s["ce"] == pytest.approx({"a": 0.5, "b": 1.0})
    assert s["mce"] == pytest.approx(0.75)
    # relative: a = (0.08 + 0.18) / (0.15 + 0.35) = 0.52; b = (0.08 + 0.28) / (0.05 + 0.25) = 1.2
    assert s["relative_ce"] == pytest.approx({"a": 0.52, "b": 1.2})
    assert s["relative_mce"] == pytest.approx(0.86)
    assert s["clean_error"] == pytest.approx(0.02)
    assert s["corruption_accuracy"] == pytest.approx(1 - (0.1 + 0.2 + 0.1 + 0.3) / 4)
    assert s["per_severity"]["a"] == pytest.approx([0.9, 0.8])
    # the baseline against itself scores 100
    assert robustness.score(baseline, baseline, ["a", "b"], [1, 2])["mce"] == pytest.approx(1.0)


def test_ce_is_undefined_where_the_baseline_made_no_error():
    ce = robustness.corruption_errors(
        {("a", 1): 0.1, ("b", 1): 0.2}, {("a", 1): 0.0, ("b", 1): 0.4}, ["a", "b"], [1]
    )
    assert math.isnan(ce["a"]) and ce["b"] == pytest.approx(0.5)
    assert robustness.mean(list(ce.values())) == pytest.approx(0.5)  # over the defined ones


def test_a_baseline_judged_on_other_images_is_refused():
    mine = _rows(0.1, {("a", 1): 0.2}, "m")
    other = _rows(0.1, {("a", 1): 0.2}, "b").assign(images_digest="elsewhere")
    with pytest.raises(UserError, match="other images for clean severity 0"):
        robustness.check_baseline(mine, other, "old.parquet")
    missing = _rows(0.1, {}, "b")
    with pytest.raises(UserError, match="no result for a severity 1"):
        robustness.check_baseline(mine, missing, "old.parquet")


# ------------------------------------------------------------------- FGSM


@pytest.fixture(scope="module")
def test_split(tiny_dataset) -> dataset.ImageSet:
    return dataset.load(storage.join(tiny_dataset, dataset.TEST))[1]


def test_fgsm_lowers_the_accuracy_of_a_trained_model_more_than_random_signs(test_split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    x, y = augment.to_float(test_split.images), test_split.labels
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9  # it has learnt these images

    # this model's margins are wide (it fits 200 images with 7,850 weights): small steps
    # flip few of its answers, larger ones most
    acc = robustness.fgsm_accuracy(model, test_split.images, y, [2, 8, 16, 32], batch_size=64)
    assert list(acc) == [2, 8, 16, 32]
    assert clean >= acc[2] >= acc[8] >= acc[16] >= acc[32]
    assert acc[16] < clean - 0.3 and acc[32] < clean - 0.6
    # the gradient's direction matters: random signs of the same size barely hurt
    signs = torch.randint(0, 2, test_split.images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (test_split.images.int() + 16 * (2 * signs - 1)).clamp(0, 255).to(torch.uint8)
    random_acc = (model(augment.to_float(noisy)).argmax(1) == y).float().mean().item()
    assert acc[16] < random_acc - 0.3
    assert all(p.requires_grad for p in model.parameters())  # left as it was found


# ------------------------------------------------------------------- the suite


def test_suite_is_generated_once_into_the_dataset_format_and_reused(tiny_dataset, tmp_path):
    root = str(tmp_path / "data")
    # a dataset of its own, so that no other test's suite is in its cache
    m, test = dataset.load(storage.join(tiny_dataset, dataset.TEST))
    rows = zip(test.ids, test.images[:, 0].numpy(), test.labels.tolist(), strict=True)
    dataset_writer.write_rows(storage.join(root, dataset.TEST), dataset.TEST, m.class_names, rows)
    first = robustness.load_suite(root, ["fog", "rotate"], [1, 5], 30, seed=0, log=lambda _: None)
    assert first.built == 4 and len(first.subset) == 30
    assert first.url.startswith(storage.join(root, robustness.SUITE_DIR))
    manifest = storage.read_json(storage.join(first.url, robustness.SUITE_MANIFEST))
    assert [(c["corruption"], c["severity"]) for c in manifest["cells"]] == [
        ("fog", 1),
        ("fog", 5),
        ("rotate", 1),
        ("rotate", 5),
    ]
    cell = dataset.read_manifest(storage.join(first.url, "fog-5"))
    assert cell.num_rows == 30 and cell.mode == "L"

    again = robustness.load_suite(root, ["fog", "rotate"], [1, 5], 30, seed=0, log=lambda _: None)
    assert again.built == 0 and again.url == first.url
    for a, b in zip(first.cells, again.cells, strict=True):
        assert a.url == b.url and a.digest == b.digest
    # the cells are the corrupted test images, labels and ids kept
    _, test = dataset.load(storage.join(root, dataset.TEST))
    assert torch.equal(again.labels, test.labels[again.subset])
    assert torch.equal(
        dataset.load(again.cells[1].url)[1].images,
        corruptions.corrupt(test.images[again.subset], "fog", 5, 0),
    )
    # another seed or size is another suite
    other = robustness.load_suite(root, ["fog"], [1], 30, seed=1, log=lambda _: None)
    assert other.url != first.url and other.built == 1
    # FGSM attacks a seeded part of the corrupted images
    attacked = again.adversarial(10)
    assert len(attacked) == 10 and set(attacked.tolist()) <= set(again.subset.tolist())


# ------------------------------------------------------------------- the stage


def _checkpoint(root: str, url: str, seed: int) -> str:
    m = dataset.read_manifest(storage.join(root, dataset.TEST))
    torch.manual_seed(seed)
    net = models.create("test_resnet", m.num_classes, m.channels)
    meta = models.ModelMeta("test_resnet", m.num_classes, m.channels, m.class_names, 28, 28, "L")
    return models.save(net, meta, url)


def _trained(role: str, iteration: int, url: str, run_id: str) -> stages.TrainedModel:
    return stages.TrainedModel(role, iteration, "test_resnet", url, run_id, None, 0.0)


@pytest.mark.slow  # judges two models on the corruption suite with MLflow: 8-17 s
def test_stage_writes_table_figures_and_report_and_scores_against_a_baseline(
    tiny_dataset, mlflow_uri, tmp_path, caplog
):
    cfg = config.load(
        REPO / "pipeline_config/smoke.yaml",
        [
            "evaluation.corruptions=[contrast, translate]",
            "evaluation.severities=[1, 5]",
            "evaluation.corruption_images=40",
            "evaluation.adversarial_images=20",
            "evaluation.fgsm_epsilons=[4]",
        ],
    ).evaluation
    parent = tracking.start_run("robustness-test", "run")
    teacher_id = tracking.start_run("robustness-test", "teacher")
    student_id = tracking.start_run("robustness-test", "student")
    teacher = _trained("teacher", 1, _checkpoint(tiny_dataset, str(tmp_path / "t"), 0), teacher_id)
    student = _trained("student", 1, _checkpoint(tiny_dataset, str(tmp_path / "s"), 1), student_id)
    out = str(tmp_path / "it1")
    first = stages.evaluate_robustness([teacher, student], cfg, tiny_dataset, out, parent, 1)

    table = pd.read_parquet(first.table_url)
    assert set(table.columns) >= {
        "model",
        "iteration",
        "role",
        "corruption",
        "severity",
        "accuracy",
        "ece",
        "images_digest",
    }
    reported = table[table["suite"] == "reported"]
    per_model = reported.groupby("role").size().to_dict()
    assert per_model == {"teacher": 1 + 4 + 1, "student": 1 + 4 + 1}  # clean, 2 x 2, FGSM
    # the dataset has no validation split: the gate's suite is the test split's, clean and
    # the 2 corruptions at the gate's severity 3, on all 200 test images
    chosen = table[table["suite"] == "choice"]
    assert chosen.groupby("role").size().to_dict() == {"teacher": 3, "student": 3}
    assert set(chosen["split"]) == {"test"} and set(chosen["severity"]) == {0, 3}
    assert (table["accuracy_low"] <= table["accuracy"]).all()
    assert (table["accuracy"] <= table["accuracy_high"]).all()
    predictions = pd.read_parquet(first.predictions_url)
    clean = predictions[
        (predictions["suite"] == "reported") & (predictions["corruption"] == "clean")
    ]
    clean_rows = reported[reported["corruption"] == "clean"].set_index("role")
    for role, rows in clean.groupby("role"):
        right = (rows["predicted"] == rows["label"]).mean()
        assert right == pytest.approx(clean_rows.loc[role, "accuracy"])
    fgsm = table[table["corruption"] == "fgsm"]
    assert (fgsm["images"] == 20).all() and (fgsm["epsilon"] == 4 / 255).all()

    by_role = {m.role: m for m in first.models}
    assert by_role["teacher"].mce == pytest.approx(1.0)  # the first teacher is the baseline
    assert first.baseline["mlflow_run_id"] == teacher_id
    assert set(by_role["student"].fgsm_accuracy) == {"4/255"}
    figures = ["accuracy_vs_severity.png", "mce_per_iteration.png", "fgsm_accuracy.png"]
    figures += ["confusion_teacher.png", "confusion_student.png"]
    for name in figures:
        assert storage.read_bytes(storage.join(out, "figures", name))[:4] == b"\x89PNG"
    text = storage.read_bytes(first.report_url).decode()
    assert text == first.report
    assert "| teacher 1 (test_resnet) |" in text and "### student 1" in text
    assert f"{100 * by_role['student'].mce:.1f}" in text
    low, high = by_role["student"].test_accuracy_interval
    assert (
        f"{100 * by_role['student'].test_accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in text
    )
    assert "**Chosen on the test split**" in text and first.chosen_on == "test"
    assert "## Precision and recall (%) per class, on the test split" in text
    classes = by_role["student"].per_class["classes"]
    right = sum(c["recall"] * c["images"] for c in classes)
    assert right == pytest.approx(200 * by_role["student"].test_accuracy)

    client = MlflowClient(tracking_uri=mlflow_uri)
    files = {f.path for f in client.list_artifacts(first.mlflow_run_id, "figures")}
    assert files == {f"figures/{name}" for name in figures}
    per_class = {f.path for f in client.list_artifacts(first.mlflow_run_id, "per_class")}
    assert per_class == {"per_class/teacher.json", "per_class/student.json"}
    run = client.get_run(first.mlflow_run_id)
    assert run.data.metrics["teacher_mce"] == pytest.approx(1.0)
    assert "student_fgsm_4_accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(parent, "student_mce")] == [1]

    # iteration 2: its teacher is iteration 1's student, whose measurements are reused
    third_id = tracking.start_run("robustness-test", "student 2")
    with caplog.at_level(logging.INFO, logger="noisy_student"):
        second = stages.evaluate_robustness(
            [
                _trained("teacher", 2, student.url, student_id),
                _trained(
                    "student", 2, _checkpoint(tiny_dataset, str(tmp_path / "s2"), 2), third_id
                ),
            ],
            cfg,
            tiny_dataset,
            str(tmp_path / "it2"),
            parent,
            2,
            earlier=[first.table_url],
        )
    assert "teacher test_resnet: measured in an earlier iteration, not again" in caplog.messages
    table2 = pd.read_parquet(second.table_url)
    reused = table2[table2["role"] == "teacher"].reset_index(drop=True)
    measured = table[table["role"] == "student"].reset_index(drop=True)
    assert len(reused) == len(measured) == 6 + 3
    assert reused["accuracy"].tolist() == measured["accuracy"].tolist()
    assert (reused["iteration"] == 2).all() and (reused["mlflow_run_id"] == student_id).all()
    assert second.baseline["mlflow_run_id"] == teacher_id  # still the run's first teacher
    for label in ("teacher 1", "student 1", "student 2"):
        assert f"### {label}" in second.report
    assert {m.mlflow_run_id: m.mce for m in second.models}[student_id] == pytest.approx(
        by_role["student"].mce
    )

    # a later run names this one's student as its baseline: that model now scores 100
    again = stages.evaluate_robustness(
        [teacher, student],
        cfg.model_copy(update={"baseline": out, "baseline_mlflow_run_id": student_id}),
        tiny_dataset,
        str(tmp_path / "again"),
        parent,
        1,
    )
    scores = {m.role: m for m in again.models}
    assert scores["student"].mce == pytest.approx(1.0)
    for name, ce in by_role["student"].ce.items():
        assert scores["teacher"].ce[name] == pytest.approx(1 / ce)
    assert again.baseline["source"] == first.table_url

    # ... but not if it was judged on other images
    with pytest.raises(UserError, match="other images"):
        stages.evaluate_robustness(
            [teacher],
            cfg.model_copy(update={"baseline": out, "seed": 5}),
            tiny_dataset,
            str(tmp_path / "other"),
            parent,
            1,
        )


def test_the_suite_and_the_evaluation_stream_and_match_the_split_judged_in_memory(
    tiny_dataset, tmp_path, monkeypatch
):
    root = str(tmp_path / "data")
    m, test = dataset.load(storage.join(tiny_dataset, dataset.TEST))
    rows = zip(test.ids, test.images[:, 0].numpy(), test.labels.tolist(), strict=True)
    # three shards, so that batches straddle shard boundaries
    dataset_writer.write_rows(
        storage.join(root, dataset.TEST), dataset.TEST, m.class_names, rows, rows_per_shard=70
    )
    model, _ = models.load(_checkpoint(root, str(tmp_path / "model"), 0))
    batch, bins = 16, 15
    monkeypatch.setattr(corruptions, "CHUNK", batch)  # cells generated 16 images at a time

    # what the whole split, decoded at once, gives
    subset = robustness.subset_indices(len(test), 90, 0)
    attacked = robustness.subset_indices(len(test), 40, 0)
    sets = {("clean", 0): (test.images, test.labels)}
    for name in ("gaussian_noise", "rotate"):
        for severity in (1, 3):
            x = corruptions.corrupt(test.images[subset], name, severity, 0)
            sets[(name, severity)] = (x, test.labels[subset])
    expected = {}
    for key, (x, y) in sets.items():
        probs = engine.predict_probs(model, x, batch, "fp32")
        expected[key] = (
            (probs.argmax(1) == y).double().mean().item(),
            robustness.expected_calibration_error(probs, y, bins),
            probs.max(1).values.double().mean().item(),
        )
    fgsm = robustness.fgsm_accuracy(
        model, test.images[attacked], test.labels[attacked], [4], batch, "fp32"
    )

    decoded: list[int] = []
    decode = dataset.decode_images

    def counting(*args, **kwargs):
        images = decode(*args, **kwargs)
        decoded.append(len(images))
        return images

    monkeypatch.setattr(dataset, "decode_images", counting)
    # first the cells are generated and judged as they are written, then read back
    for generated, cells_read in ((4, 0), (0, 4)):
        decoded.clear()
        suite = robustness.open_suite(root, ["gaussian_noise", "rotate"], [1, 3], 90, seed=0)
        (evaluated,) = robustness.evaluate_models([model], suite, batch, "fp32", [4], 40, bins)
        measured, predictions = evaluated.rows, evaluated.predictions
        assert suite.built == generated
        # no call decoded more than a batch: no set was ever held decoded
        assert decoded and max(decoded) <= batch
        # every test image decoded once, the attacked ones once, and the corrupted subset
        # once per corruption (all its severities made from one read) or cell read back
        corrupted = 90 * (2 if generated else cells_read)
        assert sum(decoded) == len(test) + corrupted + 40
        by_key = {(r["corruption"], r["severity"]): r for r in measured}
        for key, (accuracy, ece, confidence) in expected.items():
            r = by_key[key]
            assert (r["accuracy"], r["ece"], r["mean_confidence"]) == (accuracy, ece, confidence)
        assert by_key[("fgsm", 4)]["accuracy"] == fgsm[4]
        assert by_key[("fgsm", 4)]["images"] == 40
        # every image's answer is kept, numbered by its row in the split
        for (corruption, severity), rows in predictions.groupby(["corruption", "severity"]):
            right = (rows["predicted"] == rows["label"]).mean()
            assert right == pytest.approx(by_key[(corruption, severity)]["accuracy"])
            expected_rows = range(len(test)) if corruption == "clean" else subset.tolist()
            assert rows["row"].tolist() == list(expected_rows)
