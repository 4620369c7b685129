"""Pseudo-label selection: confidence filter, per-class balancing, target construction."""

from __future__ import annotations

import numpy as np
import pytest

from noisy_student.errors import UserError
from noisy_student.training import selection
from noisy_student.training.selection import select, targets_from_probs


def _probs(predicted: list[int], confidence: list[float], k: int = 3) -> np.ndarray:
    """One row per image: `confidence` on the predicted class, the rest spread evenly."""
    p = np.empty((len(predicted), k), dtype=np.float32)
    for i, (c, conf) in enumerate(zip(predicted, confidence, strict=True)):
        p[i] = (1.0 - conf) / (k - 1)
        p[i, c] = conf
    return p


def _ids(n: int) -> np.ndarray:
    return np.array([f"u{i}" for i in range(n)])


def test_selection_drops_images_below_min_confidence():
    probs = _probs([0, 1, 2, 0, 1], [0.9, 0.4, 0.6, 0.49, 0.5])
    sel = select(_ids(5), probs, 3, min_confidence=0.5, balance=False)
    assert sorted(sel.rows["id"]) == ["u0", "u2", "u4"]
    assert (sel.rows["confidence"] >= 0.5).all()
    assert sel.kept_unique == 3 and sel.total == 5


def test_selection_keeps_most_confident_images_of_over_quota_classes():
    confidence = [0.6, 0.9, 0.7, 0.95, 0.8]
    probs = _probs([0] * 5 + [1], confidence + [0.9])
    sel = select(_ids(6), probs, 3, min_confidence=0.3, per_class_quota=2)
    class0 = sel.rows[sel.rows["predicted"] == 0]
    assert sorted(class0["id"]) == ["u1", "u3"]  # 0.9 and 0.95, the most confident
    stats = sel.per_class.set_index("class")
    assert stats.loc[0, "final"] == 2 and stats.loc[0, "duplicated"] == 0


def test_selection_duplicates_under_quota_class_to_about_the_quota():
    # class 1 has 3 images for a quota of 10: each appears 3 or 4 times (10/3 = 3.33)
    probs = _probs([0] * 10 + [1] * 3, [0.9] * 13)
    sel = select(_ids(13), probs, 3, min_confidence=0.3, per_class_quota=10)
    counts = sel.rows[sel.rows["predicted"] == 1].set_index("id")["copies"]
    assert set(counts.index) == {"u10", "u11", "u12"}
    assert set(counts) <= {3, 4}
    assert 9 <= counts.sum() <= 12
    assert sel.rows[sel.rows["predicted"] == 0]["copies"].sum() == 10


def test_stochastic_rounding_hits_the_quota_in_expectation():
    # 1000 images for a quota of 2500: 2 copies each plus a third with p=0.5, so the total
    # is 2500 + Binomial noise with sd ~16; 5 sd covers any seed, a wrong rule would not
    n, quota = 1000, 2500
    probs = _probs([1] * n + [0] * quota, [0.9] * (n + quota))
    totals = []
    for seed in range(3):
        sel = select(_ids(n + quota), probs, 3, 0.3, per_class_quota=quota, seed=seed)
        copies = sel.rows[sel.rows["predicted"] == 1].set_index("id")["copies"]
        assert len(copies) == n and set(copies) == {2, 3}
        totals.append(int(copies.sum()))
    assert all(abs(t - quota) < 80 for t in totals)
    assert len(set(totals)) > 1  # the draws really depend on the seed


def test_selection_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=400).astype(np.float32)
    a = select(_ids(400), probs, 4, 0.3, seed=7)
    b = select(_ids(400), probs, 4, 0.3, seed=7)
    c = select(_ids(400), probs, 4, 0.3, seed=8)

    def chosen(sel):
        return list(zip(sel.rows["id"], sel.rows["copies"], strict=True))

    assert chosen(a) == chosen(b)
    assert chosen(a) != chosen(c)


def test_default_quota_is_the_mean_kept_per_class():
    # 6 + 2 + 1 kept over 3 classes: quota 3
    probs = _probs([0] * 6 + [1] * 2 + [2], [0.9] * 9)
    sel = select(_ids(9), probs, 3, 0.3, seed=0)
    stats = sel.per_class.set_index("class")
    assert stats.loc[0, "final"] == 3  # trimmed
    assert stats.loc[2, "final"] == 3  # one image, exactly three copies (factor is whole)


def test_soft_targets_at_temperature_one_are_the_teacher_probabilities():
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=20).astype(np.float32)
    targets = targets_from_probs(probs, "soft", temperature=1.0, hard_label_smoothing=0.1)
    np.testing.assert_allclose(targets, probs, rtol=1e-5, atol=1e-6)


def test_soft_targets_below_temperature_one_are_sharper():
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=20).astype(np.float32)
    sharp = targets_from_probs(probs, "soft", temperature=0.5, hard_label_smoothing=0.1)
    np.testing.assert_allclose(sharp.sum(1), 1.0, rtol=1e-5)
    assert (sharp.argmax(1) == probs.argmax(1)).all()
    assert (sharp.max(1) > probs.max(1)).all()
    # T=0.5 squares and renormalises
    squared = probs.astype(np.float64) ** 2
    np.testing.assert_allclose(sharp, squared / squared.sum(1, keepdims=True), rtol=1e-5)


def test_hard_targets_are_smoothed_one_hot_of_the_argmax():
    probs = np.random.default_rng(1).dirichlet(np.ones(4), size=10).astype(np.float32)
    targets = targets_from_probs(probs, "hard", temperature=1.0, hard_label_smoothing=0.2)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    assert (targets.argmax(1) == probs.argmax(1)).all()
    np.testing.assert_allclose(targets.max(1), 1.0 - 0.2 + 0.2 / 4, rtol=1e-6)
    np.testing.assert_allclose(np.sort(targets, 1)[:, :-1], 0.2 / 4, rtol=1e-6)


def test_selection_carries_hard_targets_into_rows():
    probs = _probs([2, 0], [0.8, 0.7])
    sel = select(_ids(2), probs, 3, 0.3, balance=False, labels="hard", hard_label_smoothing=0.0)
    by_id = dict(zip(sel.rows["id"], sel.rows["target"], strict=True))
    np.testing.assert_array_equal(by_id["u0"], [0, 0, 1])
    np.testing.assert_array_equal(by_id["u1"], [1, 0, 0])


def test_nothing_left_after_filtering_names_the_min_confidence_key():
    probs = _probs([0, 1], [0.4, 0.5])
    with pytest.raises(UserError, match=r"selection\.min_confidence: nothing left"):
        select(_ids(2), probs, 3, min_confidence=0.9)


def test_per_class_stats_agree_with_the_selected_rows():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.array([2.0, 0.5, 0.5, 0.2]) * 0.5, size=600).astype(np.float32)
    sel = select(_ids(600), probs, 4, min_confidence=0.5, seed=1)
    stats = sel.per_class.set_index("class")
    predicted = probs.argmax(1)
    confident = probs.max(1) >= 0.5
    for c in range(4):
        row = stats.loc[c]
        rows_c = sel.rows[sel.rows["predicted"] == c]
        assert row["predicted"] == (predicted == c).sum()
        assert row["dropped"] == ((predicted == c) & ~confident).sum()
        assert row["final"] == rows_c["copies"].sum()
        assert row["kept"] == len(rows_c) == rows_c["id"].nunique()
        assert row["duplicated"] == rows_c["copies"].sum() - len(rows_c)
        assert row["predicted"] == row["dropped"] + row["trimmed"] + row["kept"]
    assert stats["kept"].sum() == sel.kept_unique
    # the classes were unequal before balancing, and the test must see both kinds
    assert (stats["duplicated"] > 0).any()
    assert (stats["final"] < stats["predicted"] - stats["dropped"]).any()
    assert (stats["trimmed"] > 0).any()


def test_confidence_bins_rise_with_confidence_and_separate_values_near_one():
    conf = np.array([0.0, 0.3, 0.9, 0.99, 0.999, 0.9995, 0.99999, 1.0], dtype=np.float32)
    bins = selection.confidence_bin(conf)
    assert list(bins) == sorted(bins) and len(set(bins)) == len(bins)
    assert bins[-1] == selection.NUM_BINS - 1


def test_class_histogram_counts_only_images_at_or_above_min_confidence():
    predicted = np.array([0, 0, 1, 2, 2])
    confidence = np.array([0.9, 0.2, 0.5, 0.3, 0.29], dtype=np.float32)
    hist = selection.class_histogram(predicted, confidence, 3, min_confidence=0.3)
    assert hist.shape == (3, selection.NUM_BINS)
    assert list(hist.sum(1)) == [1, 1, 1]


def test_over_quota_class_keeps_the_quota_from_its_most_confident_bins():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, size=5000).astype(np.float32)  # class 0 is the argmax
    hist = selection.class_histogram(np.zeros(5000, int), conf, 2, 0.3)
    rule = selection.plan(hist, 0.3, per_class_quota=1000)
    rows, counts = selection.select_shard(
        np.array([f"u{i}" for i in range(5000)]),
        np.stack([conf, 1 - conf], 1),
        rule,
        selection.shard_rng(0, 0),
    )
    kept = rows["confidence"].to_numpy()
    # about the quota (the boundary bin is shared at random), and nothing kept is less
    # confident than anything trimmed, up to one bin
    assert abs(len(kept) - 1000) < 15
    trimmed = np.setdiff1d(conf, kept)
    assert selection.confidence_bin(kept).min() >= selection.confidence_bin(trimmed).max()
    assert counts[0, list(selection.COUNTS).index("trimmed")] == 5000 - len(kept)


def test_selecting_shard_by_shard_follows_one_plan_from_the_summed_histograms():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.array([2.0, 0.5, 0.5, 0.2]) * 0.5, size=900).astype(np.float32)
    ids = np.array([f"u{i}" for i in range(900)])
    shards = [slice(0, 300), slice(300, 600), slice(600, 900)]
    hist = sum(
        selection.class_histogram(probs[s].argmax(1), probs[s].max(1), 4, 0.4) for s in shards
    )
    whole = selection.class_histogram(probs.argmax(1), probs.max(1), 4, 0.4)
    assert np.array_equal(hist, whole)
    rule = selection.plan(hist, 0.4)
    counts = sum(
        selection.select_shard(ids[s], probs[s], rule, selection.shard_rng(0, i))[1]
        for i, s in enumerate(shards)
    )
    final = counts[:, list(selection.COUNTS).index("final")]
    # every class ends near the quota, the mean candidate count per class
    assert rule.quota == round(whole.sum() / 4)
    assert np.all(np.abs(final - rule.quota) < 0.15 * rule.quota)


# ---------------------------------------------------------------- distribution alignment


def _skewed(n: int = 3000, k: int = 4, seed: int = 0) -> np.ndarray:
    """Probabilities of a labeller that favours class 0: sharp rows, most of them on it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.5, (n, k))
    logits[:, 0] += 1.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def _rescaled_in_turn(p: np.ndarray, prior: np.ndarray, steps: int) -> np.ndarray:
    """Distribution alignment by scaling and renormalising in turn (the slow, plain way)."""
    q = p.astype(np.float64)
    for _ in range(steps):
        q = q * (prior / q.mean(0))
        q = q / q.sum(1, keepdims=True)
    return q


def test_alignment_brings_the_mean_prediction_to_the_class_shares_in_a_few_passes():
    p, prior = _skewed(), np.array([0.1, 0.2, 0.3, 0.4])
    assert np.abs(p.mean(0) / prior - 1).max() > 1  # class 0 is over-predicted 4x or more
    a = selection.align(lambda: [p], prior)
    q = selection.aligned(p, a.log_weights)
    assert np.abs(q.mean(0) / prior - 1).max() == pytest.approx(a.deviation)
    assert a.deviation <= selection.ALIGN_TOLERANCE and a.passes <= 8
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    # the same weights as the plain way, run to convergence
    np.testing.assert_allclose(q, _rescaled_in_turn(p, prior, 2000), atol=2e-3)


def test_alignment_does_not_depend_on_how_the_pool_is_split_into_shards():
    p, prior = _skewed(), np.full(4, 0.25)
    whole = selection.align(lambda: [p], prior)
    shards = selection.align(lambda: np.array_split(p, 7), prior)
    assert shards.passes == whole.passes
    np.testing.assert_allclose(shards.log_weights, whole.log_weights, atol=1e-9)


def test_alignment_stops_at_its_pass_limit_and_says_how_far_off_it_is():
    p, prior = _skewed(), np.array([0.1, 0.2, 0.3, 0.4])
    a = selection.align(lambda: [p], prior, max_passes=1)
    assert a.passes == 1 and a.deviation > 1 and not a.log_weights.any()


def test_alignment_refuses_shares_that_are_not_a_distribution():
    for prior in ([0.5, 0.5, 0.0], [0.5, 0.6, 0.1], [[0.5, 0.5]]):
        with pytest.raises(ValueError, match="class shares"):
            selection.align(lambda: [np.full((3, 3), 1 / 3)], np.array(prior))


def test_aligned_selection_labels_and_targets_from_the_aligned_probabilities():
    p, prior = _skewed(), np.full(4, 0.25)
    plain = select(_ids(len(p)), p, 4, min_confidence=0.0, balance=False)
    chosen = select(_ids(len(p)), p, 4, min_confidence=0.0, balance=False, align_to=prior)
    q = selection.aligned(p, selection.align(lambda: [p], prior).log_weights)
    np.testing.assert_array_equal(chosen.rows["predicted"], q.argmax(1))
    np.testing.assert_allclose(np.stack(chosen.rows["target"]), q, atol=1e-6)
    np.testing.assert_allclose(np.stack(chosen.rows["target"]).mean(0), prior, rtol=2e-3)
    # fewer images labelled as the over-predicted class, each class near its share
    assert chosen.per_class["predicted"][0] < plain.per_class["predicted"][0]
    assert np.abs(chosen.per_class["predicted"] / len(p) - prior).max() < 0.05
