"""`benchmarks.pseudo_labels`: distribution alignment, and its errors on bad inputs (its
figures on a real run: tests/test_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import pseudo_labels


def test_alignment_moves_the_mean_prediction_to_the_prior_and_keeps_rows_distributions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) + np.array([1.0, 0.0, 0.0, -1.0])  # skewed to class 0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prior = np.full(4, 0.25)
    q = pseudo_labels.aligned(probs, prior)
    assert np.allclose(q.sum(1), 1.0) and (q >= 0).all()
    assert np.allclose(q.mean(0), prior, atol=1e-3)
    assert abs(probs.mean(0)[0] - 0.25) > 0.1  # it did have to move
    # a labeller already matching the prior is left as it is
    flat = np.full((10, 4), 0.25)
    assert np.allclose(pseudo_labels.aligned(flat, prior), flat)


def test_a_folder_without_pseudo_labels_or_a_dataset_without_truth_is_a_one_line_error(
    tmp_path, tiny_dataset, capsys
):
    with pytest.raises(SystemExit) as e:
        pseudo_labels.main([str(tmp_path), "--data", tiny_dataset])
    assert (
        str(e.value)
        == f"error: {tmp_path}: no pseudo labels (iteration-1/pseudo_labels) in this folder"
    )
    with pytest.raises(SystemExit) as e:
        pseudo_labels.main([str(tmp_path), "--data", str(tmp_path)])
    assert str(e.value).startswith(f"error: {tmp_path}/unlabelled_truth.parquet: missing;")
    assert "\n" not in str(e.value)
