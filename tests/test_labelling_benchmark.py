"""The labelling benchmark's arithmetic: the paired difference from random over seeds, the
McNemar test of a seed's final models, the labels a strategy needs to reach random's
final accuracy, and the choice of the default on validation (the rows themselves are
measured by `make bench-labelling`, not here)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import labelling
from benchmarks.accuracy import Table


def test_labels_to_reach_interpolates_between_rounds_and_says_when_never():
    curve = [(1000, 0.80), (1100, 0.82), (1200, 0.83), (1300, 0.84)]
    assert labelling.labels_to_reach(curve, 0.80) == 1000
    assert labelling.labels_to_reach(curve, 0.825) == pytest.approx(1150)
    assert labelling.labels_to_reach(curve, 0.84) == pytest.approx(1300)
    assert labelling.labels_to_reach(curve, 0.85) is None


def test_bits_round_trip_the_per_image_outcomes():
    correct = np.random.default_rng(0).random(1001) < 0.8
    assert np.array_equal(labelling.unbits(labelling.bits(correct), 1001), correct)


def _rows(table: Table, strategy: str, seed: int, accuracies: list[float], right: np.ndarray):
    for k, acc in enumerate(accuracies, start=1):
        correct = right if k == len(accuracies) else np.zeros_like(right)
        table.add(
            f"teacher seed {seed} {strategy} round {k}", 1.0, tier="teacher", seed=seed,
            strategy=strategy, round=k, labels=1000 + 100 * k, model="m",
            test_accuracy=acc, validation_accuracy=acc + (0.01 if strategy == "margin" else 0),
            test_images=len(right), test_correct=labelling.bits(correct),
        )  # fmt: skip


def test_the_summary_pairs_each_seed_with_random_and_picks_the_default_on_validation(tmp_path):
    setting = labelling.QUICK
    table = Table(tmp_path / "labelling.json", {})
    rng = np.random.default_rng(1)
    for seed in (0, 1, 2):
        base = rng.random(2000) < 0.8
        table.add(
            f"teacher seed {seed} round 0", 1.0, tier="teacher", seed=seed, strategy=None,
            round=0, labels=1000, model="m", test_accuracy=0.80, validation_accuracy=0.80,
            test_images=2000, test_correct=labelling.bits(base),
        )  # fmt: skip
        better = base.copy()
        better[np.flatnonzero(~base)[:60]] = True  # 60 more right on the same images
        _rows(table, "random", seed, [0.81, 0.82], base)
        _rows(table, "margin", seed, [0.82, 0.82 + 0.03 + 0.001 * seed], better)
    summary = labelling.summarise(table, setting, "teacher")
    margin = summary["strategies"]["margin"]
    assert margin["test_accuracy"][0] == pytest.approx(0.80)  # round 0 is shared
    diff = margin["difference_from_random"]
    assert diff["per_seed"] == pytest.approx([0.03, 0.031, 0.032])
    assert diff["mean_and_interval"][1] > 0 and labelling.beats_random(margin)
    assert all(t["p_value"] < 1e-10 for t in diff["mcnemar"])  # 60 discordant pairs, one way
    assert margin["labels_to_reach_random"] == pytest.approx(1100)
    assert summary["strategies"]["random"]["labels_to_reach_random"] == pytest.approx(1200)
    assert labelling.chosen_default(summary) == "margin"
    text = labelling.markdown(
        table,
        setting,
        {"hardware": table.rows[0]["hardware"], "date": "today", "summary": {"teacher": summary},
         "default": "margin"},
    )  # fmt: skip
    assert "`margin`, which beats `random` beyond seed noise" in text
    assert "| `margin` | 80.00% ± 0.00 | 82.00% ± 0.00 | 85.10% ± 0.10 | +3.10 (" in text


def test_report_writes_the_table_again_from_the_file_and_names_each_tiers_seeds(
    tmp_path, monkeypatch
):
    """`--report` rewrites labelling.md from the result file alone (nothing measured, the
    file untouched), and a tier measured on fewer seeds than the setting's says which."""
    monkeypatch.setattr(labelling, "REPO", tmp_path)
    monkeypatch.setattr(labelling, "RESULTS", tmp_path / "results")
    with pytest.raises(SystemExit, match="no result file .*labelling-quick.json"):
        labelling.main(["--quick", "--report"])
    setting = labelling.QUICK
    identity = {k: v for k, v in setting.__dict__.items() if k != "seeds"}
    table = Table(tmp_path / "results" / "labelling-quick.json", identity)
    right = np.random.default_rng(2).random(500) < 0.8
    for tier, seeds in (("teacher", setting.seeds), ("pipeline", setting.seeds[:1])):
        for seed in seeds:
            table.add(
                f"{tier} seed {seed} round 0", 1.0, tier=tier, seed=seed, strategy=None,
                round=0, labels=100, model="m", test_accuracy=0.8, validation_accuracy=0.8,
                test_images=500, test_correct=labelling.bits(right),
            )  # fmt: skip
            for strategy in ("margin", "random"):
                for k in range(1, setting.rounds + 1):
                    table.add(
                        f"{tier} seed {seed} {strategy} round {k}", 1.0, tier=tier, seed=seed,
                        strategy=strategy, round=k, labels=100 + 10 * k, model="m",
                        test_accuracy=0.8 + 0.01 * k, validation_accuracy=0.8,
                        test_images=500, test_correct=labelling.bits(right),
                    )  # fmt: skip
    before = table.path.read_bytes()
    labelling.main(["--quick", "--report"])
    assert table.path.read_bytes() == before
    text = (tmp_path / "results" / "labelling-quick.md").read_text()
    teacher, pipeline = text.split("## Pipeline tier")
    assert f"Seeds {', '.join(map(str, setting.seeds))}.\n" in teacher
    assert f"Seed {setting.seeds[0]} of {', '.join(map(str, setting.seeds))}.\n" in pipeline
    assert "Chosen on validation (teacher tier, last round): `margin`" in text


def test_a_tie_on_validation_keeps_the_configured_default():
    """Validation is 500 images a seed: three strategies can get the same number right.
    Then the configured default stays (a strategy replaces it only by beating it), and a
    tie without it goes to the first strategy in the documented order."""
    import statistics

    from noisy_student import config

    def summary(**validation: list[float]) -> dict:
        return {
            "strategies": {
                s: {"seeds_done": len(v), "validation_accuracy": statistics.fmean(v)}
                for s, v in validation.items()
            }
        }

    default = config.LabellingConfig().strategy
    assert default == "margin"  # the rest of this test is written for it
    tie = {"least_confident": [0.874, 0.882, 0.866], "margin": [0.884, 0.880, 0.858]}
    assert labelling.chosen_default(summary(**tie, random=[0.9, 0.9, 0.9])) == "margin"
    assert labelling.chosen_default(summary(**tie, balanced=[0.876, 0.882, 0.866])) == "balanced"
    assert (
        labelling.chosen_default(
            summary(disagreement=[0.874, 0.882, 0.866], least_confident=[0.866, 0.882, 0.874])
        )
        == "least_confident"
    )
