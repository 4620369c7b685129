"""Filter and balance pseudo labels: drop what the teacher is unsure of, even out classes.

As in the paper's code: images below `min_confidence` are dropped; each class is then
brought to a quota, over-quota classes keeping their most confident images and
under-quota classes duplicated with stochastic rounding (every image of the class is
repeated floor(q/n) times, plus once more with probability frac(q/n)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from noisy_student.errors import UserError


@dataclass(frozen=True)
class Selection:
    rows: pd.DataFrame  # id, target (per-class probabilities), confidence, predicted
    per_class: pd.DataFrame  # class, predicted, dropped, trimmed, kept, duplicated, final
    total: int
    kept_unique: int


def targets_from_probs(
    probs: np.ndarray, labels: str, temperature: float, hard_label_smoothing: float
) -> np.ndarray:
    """Soft: p^(1/T) renormalised (T=1 keeps the teacher's distribution). Hard: smoothed
    one-hot of the argmax."""
    k = probs.shape[1]
    if labels == "hard":
        targets = np.full_like(probs, hard_label_smoothing / k)
        targets[np.arange(len(probs)), probs.argmax(1)] += 1.0 - hard_label_smoothing
        return targets
    tempered = np.power(probs.astype(np.float64), 1.0 / temperature)
    return (tempered / tempered.sum(1, keepdims=True)).astype(np.float32)


def select(
    ids: np.ndarray,
    probs: np.ndarray,
    num_classes: int,
    min_confidence: float,
    balance: bool = True,
    per_class_quota: int | None = None,
    labels: str = "soft",
    temperature: float = 1.0,
    hard_label_smoothing: float = 0.1,
    seed: int = 0,
) -> Selection:
    confidence = probs.max(1)
    predicted = probs.argmax(1)
    keep = confidence >= min_confidence
    if not keep.any():
        raise UserError(
            f"selection.min_confidence: nothing left after filtering ({len(ids)} images, "
            f"highest confidence {confidence.max() if len(ids) else 0:.3f} < {min_confidence})"
        )
    counts = np.bincount(predicted[keep], minlength=num_classes)
    quota = per_class_quota or int(round(counts.sum() / num_classes))
    rng = np.random.default_rng(seed)

    chosen: list[np.ndarray] = []
    stats = []
    for c in range(num_classes):
        members = np.flatnonzero(keep & (predicted == c))
        # most confident first, so trimming keeps the best and ties break by position
        members = members[np.argsort(-confidence[members], kind="stable")]
        n = len(members)
        dropped = int((predicted == c).sum()) - n
        if not balance or n == 0:
            take, duplicated = members, 0
        elif n >= quota:
            take, duplicated = members[:quota], 0
        else:
            factor = quota / n
            repeats = np.floor(factor).astype(int) + (rng.random(n) < factor - np.floor(factor))
            take = np.repeat(members, repeats)
            duplicated = len(take) - n
        chosen.append(take)
        kept = int(min(n, len(take)))
        stats.append(
            {
                # predicted = dropped (unsure) + trimmed (over quota) + kept
                "class": c,
                "predicted": int((predicted == c).sum()),
                "dropped": dropped,
                "trimmed": n - kept,
                "kept": kept,
                "duplicated": int(duplicated),
                "final": len(take),
            }
        )
    index = np.concatenate(chosen)
    targets = targets_from_probs(probs[index], labels, temperature, hard_label_smoothing)
    rows = pd.DataFrame(
        {
            "id": ids[index],
            "target": list(targets.astype(np.float32)),
            "confidence": confidence[index].astype(np.float32),
            "predicted": predicted[index].astype(np.int32),
        }
    )
    return Selection(
        rows, pd.DataFrame(stats), total=len(ids), kept_unique=int(len(np.unique(index)))
    )
