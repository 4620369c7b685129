"""How trustworthy an iteration's pseudo labels are: the teacher's confidence histogram,
and where the true labels of unlabelled images are known, the precision and coverage
of the pseudo labels kept at each confidence threshold; and how many pseudo labels changed
class since the previous iteration's teacher labelled the same images.

Gathered shard by shard as counts in fixed confidence bins, so no pass holds every
prediction at once. The figure uses matplotlib's object API (no pyplot): it is safe in
worker threads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

BINS = 20  # of the confidence histogram, over [0, 1]
THRESHOLD_BINS = 100  # thresholds of the precision and coverage curves: 0, 0.01, ... 0.99


def _bins(confidence: np.ndarray, n: int) -> np.ndarray:
    return np.minimum((np.asarray(confidence, np.float64) * n).astype(np.int64), n - 1)


@dataclass
class PseudoLabelStats:
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    scored: np.ndarray = field(default_factory=lambda: np.zeros(THRESHOLD_BINS, np.int64))
    right: np.ndarray = field(default_factory=lambda: np.zeros(THRESHOLD_BINS, np.int64))
    compared: int = 0  # images labelled by this and the previous iteration's teacher
    changed: int = 0  # of those, how many now have another class

    def add(
        self,
        confidence: np.ndarray,
        correct: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> None:
        """One shard's confidences; `correct` and `known` (masks) where true labels exist."""
        self.histogram += np.bincount(_bins(confidence, BINS), minlength=BINS)
        if correct is not None and known is not None and known.any():
            b = _bins(confidence[known], THRESHOLD_BINS)
            self.scored += np.bincount(b, minlength=THRESHOLD_BINS)
            self.right += np.bincount(b[correct[known]], minlength=THRESHOLD_BINS)

    def add_changes(self, previous: np.ndarray, current: np.ndarray) -> None:
        """The predicted classes of the same images, by the previous and this teacher."""
        self.compared += len(current)
        self.changed += int((np.asarray(previous) != np.asarray(current)).sum())

    def curves(self) -> dict[str, list[float | None]] | None:
        """Precision and coverage of the pseudo labels at or above each threshold."""
        total = int(self.scored.sum())
        if total == 0:
            return None
        at_least = self.scored[::-1].cumsum()[::-1]  # images at or above each threshold
        right = self.right[::-1].cumsum()[::-1]
        precision = [float(r / n) if n else None for r, n in zip(right, at_least, strict=True)]
        return {
            "threshold": [i / THRESHOLD_BINS for i in range(THRESHOLD_BINS)],
            "precision": precision,
            "coverage": [float(n / total) for n in at_least],
        }

    def summary(self, min_confidence: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "confidence_histogram": {
                "edges": [i / BINS for i in range(BINS + 1)],
                "counts": self.histogram.tolist(),
            },
            "changed_since_previous": self.changed if self.compared else None,
            "compared_with_previous": self.compared,
        }
        curves = self.curves()
        if curves is not None:
            at = min(int(min_confidence * THRESHOLD_BINS), THRESHOLD_BINS - 1)
            out |= {
                "precision_coverage": curves,
                "precision_at_min_confidence": curves["precision"][at],
                "coverage_at_min_confidence": curves["coverage"][at],
            }
        return out


def figure(stats: PseudoLabelStats, min_confidence: float, title: str) -> bytes:
    """The confidence histogram beside the precision and coverage curves (when true labels
    are known), the threshold marked; as PNG bytes."""
    curves = stats.curves()
    fig = Figure(figsize=(10 if curves else 5, 3.6), dpi=100)
    axes = fig.subplots(1, 2 if curves else 1, squeeze=False)[0]
    edges = np.linspace(0, 1, BINS + 1)
    ax = axes[0]
    ax.bar(edges[:-1], stats.histogram, width=1 / BINS, align="edge", color="#4c72b0")
    ax.axvline(min_confidence, color="#c44e52", linestyle="--", label="min_confidence")
    ax.set(xlabel="teacher confidence", ylabel="images", title="confidence histogram")
    ax.legend(loc="upper left")
    if curves:
        ax = axes[1]
        t = curves["threshold"]
        precision = [np.nan if p is None else p for p in curves["precision"]]
        ax.plot(t, precision, label="precision", color="#55a868")
        ax.plot(t, curves["coverage"], label="coverage", color="#8172b2")
        ax.axvline(min_confidence, color="#c44e52", linestyle="--")
        ax.set(xlabel="confidence threshold", ylim=(0, 1.02), title="kept pseudo labels")
        ax.legend(loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
