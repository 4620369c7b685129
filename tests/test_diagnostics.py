"""Pseudo-label diagnostics: confidence histogram, precision and coverage against the
threshold, labels that changed class."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from noisy_student.evaluation import diagnostics


def test_precision_and_coverage_count_the_images_at_or_above_each_threshold():
    stats = diagnostics.PseudoLabelStats()
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.15, 0.99])
    correct = np.array([True, True, True, False, False, False])
    known = np.array([True, True, True, True, True, False])  # the last has no true label
    stats.add(confidence, correct, known)
    assert stats.histogram.sum() == 6 and stats.histogram[19] == 3  # 0.95, 0.95, 0.99
    curves = stats.curves()
    at = {t: i for i, t in enumerate(curves["threshold"])}
    assert curves["coverage"][at[0.0]] == 1.0 and curves["precision"][at[0.0]] == 3 / 5
    assert curves["coverage"][at[0.5]] == 4 / 5 and curves["precision"][at[0.5]] == 3 / 4
    assert curves["coverage"][at[0.9]] == 2 / 5 and curves["precision"][at[0.9]] == 1.0
    assert curves["precision"][-1] is None  # nothing scored at 0.99 or above
    summary = stats.summary(min_confidence=0.5)
    assert summary["precision_at_min_confidence"] == 3 / 4
    assert summary["coverage_at_min_confidence"] == 4 / 5
    assert summary["changed_since_previous"] is None  # the first iteration has no previous


def test_without_true_labels_only_the_histogram_is_kept():
    stats = diagnostics.PseudoLabelStats()
    stats.add(np.array([0.2, 0.4]))
    assert stats.curves() is None
    assert "precision_at_min_confidence" not in stats.summary(0.3)
    png = diagnostics.figure(stats, 0.3, "no truth")
    assert Image.open(io.BytesIO(png)).size == (500, 360)


def test_changed_labels_are_counted_over_the_images_both_teachers_labelled():
    stats = diagnostics.PseudoLabelStats()
    stats.add_changes(np.array([1, 2, 3]), np.array([1, 0, 3]))
    stats.add_changes(np.array([4]), np.array([5]))
    summary = stats.summary(0.3)
    assert (summary["changed_since_previous"], summary["compared_with_previous"]) == (2, 4)


def test_the_figure_shows_both_panels_when_true_labels_are_known():
    stats = diagnostics.PseudoLabelStats()
    rng = np.random.default_rng(0)
    confidence = rng.uniform(size=200)
    stats.add(confidence, confidence > rng.uniform(size=200), np.ones(200, bool))
    image = Image.open(io.BytesIO(diagnostics.figure(stats, 0.3, "iteration 1")))
    assert image.size == (1000, 360)
    right_half = np.asarray(image.convert("L"))[:, 550:]
    assert (right_half < 128).mean() > 0.002  # the curves and axes are drawn there
