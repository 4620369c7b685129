"""The statistics module against values computed by hand (and against each other)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noisy_student.evaluation import statistics as st


def test_z_of_a_95_percent_interval_is_1_96():
    assert st.z_value() == pytest.approx(1.959964, abs=1e-6)


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    [
        # p = 0.8, z = 1.96: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674, half width
        # z sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22658
        (8, 10, 0.49016, 0.94332),
        (0, 10, 0.0, 0.27753),  # z^2 / (10 + z^2)
        (10, 10, 0.72247, 1.0),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Table I, to the 4 places printed there
    ],
)
def test_wilson_interval_matches_hand_computed_bounds(correct, total, low, high):
    places = 5e-5 if total == 263 else 1e-5
    assert st.wilson_interval(correct, total) == pytest.approx((low, high), abs=places)


def test_wilson_interval_narrows_with_more_images_and_holds_the_estimate():
    small, large = st.accuracy_interval(0.87, 500), st.accuracy_interval(0.87, 10_000)
    assert small[0] < large[0] < 0.87 < large[1] < small[1]
    assert st.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        st.wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        (1, 10, 2 * (1 + 10) / 1024),  # P(X <= 1) = (C(10,0) + C(10,1)) / 2^10
        (9, 10, 2 * (1 + 10) / 1024),  # symmetric
        (0, 5, 2 / 32),
        (0, 6, 2 / 64),
        (2, 12, 2 * (1 + 12 + 66) / 4096),
        (5, 10, 1.0),  # 2 x P(X <= 5) > 1: capped
        (0, 0, 1.0),
    ],
)
def test_exact_binomial_sums_match_hand_computed_cases(k, n, p):
    assert st.binomial_two_sided(k, n) == pytest.approx(p, rel=1e-12)


def test_the_binomial_sum_stays_exact_for_thousands_of_flips():
    # P(X <= 4950 | n = 10,000): the normal approximation, z = (4950.5 - 5000) / 50 = -0.99
    p = st.binomial_two_sided(4950, 10_000)
    assert p == pytest.approx(2 * st.NormalDist().cdf(-0.99), abs=2e-4)


def test_mcnemar_counts_the_paired_table_and_tests_only_the_disagreements():
    first = np.array([1] * 80 + [1] * 9 + [0] * 1 + [0] * 10, dtype=bool)
    second = np.array([1] * 80 + [0] * 9 + [1] * 1 + [0] * 10, dtype=bool)
    t = st.mcnemar(first, second)
    assert (t.both_right, t.only_first_right, t.only_second_right, t.both_wrong) == (80, 9, 1, 10)
    assert (t.first_accuracy, t.second_accuracy) == (0.89, 0.81)
    assert t.difference == pytest.approx(0.08)
    assert t.p_value == pytest.approx(22 / 1024)
    assert t.verdict() == st.ABOVE and st.mcnemar(second, first).verdict() == st.BELOW
    assert t.verdict(alpha=0.01) == st.TIED
    assert t.interval[0] < 0.08 < t.interval[1]
    assert t.record()["only_first_right"] == 9 and t.record()["interval"] == list(t.interval)


def test_models_that_agree_everywhere_show_no_difference():
    same = np.array([True, False, True, True])
    t = st.mcnemar(same, same)
    assert (t.difference, t.p_value, t.verdict()) == (0.0, 1.0, st.TIED)
    b = st.paired_bootstrap(same, same)
    assert (b.difference, b.p_value, b.interval) == (0.0, 1.0, (0.0, 0.0))


def test_paired_bootstrap_agrees_with_mcnemar_on_right_and_wrong_answers():
    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.85
    better = truth | (rng.random(2000) < 0.2)  # right wherever `truth` is, and more often
    exact, boot = st.mcnemar(better, truth), st.paired_bootstrap(better, truth, seed=1)
    assert boot.difference == pytest.approx(exact.difference)
    assert exact.p_value < 1e-6 and boot.p_value < 1e-3
    assert boot.interval == pytest.approx(exact.interval, abs=0.005)
    # a model as good as the other, right on other images: neither test calls it better
    other = rng.random(2000) < 0.85
    exact, boot = st.mcnemar(other, truth), st.paired_bootstrap(other, truth, seed=1)
    assert exact.verdict() == boot.verdict() == st.TIED
    assert boot.p_value == pytest.approx(exact.p_value, abs=0.05)


def test_paired_bootstrap_is_seeded_and_scores_need_not_be_right_or_wrong():
    rng = np.random.default_rng(1)
    first = rng.random(300)  # e.g. an image's accuracy over its corrupted copies
    second = np.clip(first - 0.05 + 0.02 * rng.standard_normal(300), 0, 1)
    one, two = (st.paired_bootstrap(first, second, seed=3) for _ in range(2))
    assert one == two
    assert one.interval[0] > 0 and one.verdict() == st.ABOVE
    with pytest.raises(ValueError):
        st.paired_bootstrap(first, second[:10])


def test_bootstrap_interval_of_right_and_wrong_answers_is_close_to_wilsons():
    answers = np.array([1] * 870 + [0] * 130)
    low, high = st.bootstrap_interval(answers, seed=0)
    w_low, w_high = st.wilson_interval(870, 1000)
    assert low == pytest.approx(w_low, abs=0.004) and high == pytest.approx(w_high, abs=0.004)


def test_seed_spread_gives_mean_sample_deviation_and_range():
    spread = st.seed_spread([0.85, 0.87])
    assert spread["mean"] == pytest.approx(0.86)
    assert spread["sd"] == pytest.approx(math.sqrt(2 * 0.01**2))  # n - 1 in the denominator
    assert (spread["min"], spread["max"], spread["seeds"]) == (0.85, 0.87, 2)
    assert st.seed_spread([0.9])["sd"] == 0.0


def test_an_accuracy_reads_with_its_interval():
    assert st.percent(0.8752, (0.8687, 0.8815)) == "87.52% [86.87, 88.15]"
    assert st.percent(0.8752, None) == "87.52%"


def test_t_interval_uses_students_t_over_few_seeds():
    mean, low, high = st.t_interval([0.01, 0.02, 0.03])
    assert mean == pytest.approx(0.02)
    assert high - mean == pytest.approx(4.303 * 0.01 / 3**0.5)
    assert mean - low == pytest.approx(high - mean)
    assert st.t_interval([0.01]) is None


def test_t_quantile_joins_the_table_to_the_series_and_tends_to_the_normal():
    assert st.t_quantile_95(2) == 4.303
    assert st.t_quantile_95(31) == pytest.approx(2.040, abs=1e-3)  # tables: 2.0395
    assert st.t_quantile_95(60) == pytest.approx(2.000, abs=1e-3)
    assert st.t_quantile_95(10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        st.t_quantile_95(0)
