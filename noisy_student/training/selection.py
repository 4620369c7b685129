"""Filter and balance pseudo labels: drop what the teacher is unsure of, even out classes.

As the paper's code does it (google-research/noisystudent, filter_unlabel.py), in two passes
over the shards so that no pass holds every prediction at once:

1. `class_histogram` per shard, summed: how many images of each predicted class reach each
   confidence, counting only those at or above `min_confidence`.
2. `plan` turns the summed histograms into a per-class rule, and `select_shard` applies it
   to one shard at a time. A class over its quota keeps its most confident images: every
   image above a threshold bin, and a random share of the threshold bin itself. A class
   under its quota keeps all its images, each repeated floor(q/n) times plus once more with
   probability frac(q/n) (stochastic rounding).

Confidence bins are fine where softmax confidence piles up, near 1: a bin is 1/256 of a
decade of (1 - confidence), so 0.9990 and 0.9995 fall in different bins.

With distribution alignment (ReMixMatch's rule), both passes see the teacher's
probabilities with each class scaled by a weight and each row renormalised, the weights
chosen so that the mean over the pool matches the labelled set's class shares: `align`
finds them in a few passes over the shards' probabilities before pass 1, holding one
k x k sum in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from noisy_student.errors import UserError

BINS_PER_DECADE = 256
DECADES = 8  # float32 confidences stop 6e-8 short of 1: 7.2 decades
NUM_BINS = BINS_PER_DECADE * DECADES


def confidence_bin(confidence: np.ndarray) -> np.ndarray:
    """Histogram bin of each confidence; higher confidence, higher bin."""
    decades = -np.log10(np.clip(1.0 - confidence.astype(np.float64), 1e-12, 1.0))
    return np.minimum((decades * BINS_PER_DECADE).astype(np.int64), NUM_BINS - 1)


def class_histogram(
    predicted: np.ndarray, confidence: np.ndarray, num_classes: int, min_confidence: float
) -> np.ndarray:
    """num_classes x NUM_BINS counts of the images that pass `min_confidence`."""
    keep = confidence >= min_confidence
    flat = predicted[keep].astype(np.int64) * NUM_BINS + confidence_bin(confidence[keep])
    return np.bincount(flat, minlength=num_classes * NUM_BINS).reshape(num_classes, NUM_BINS)


@dataclass(frozen=True)
class Plan:
    """Per class: images in bins above `threshold_bin` are kept, `boundary_keep` of those in
    it; every kept image gets `copies` copies in expectation."""

    min_confidence: float
    quota: int | None  # None: no balancing
    candidates: np.ndarray  # images per class at or above min_confidence
    threshold_bin: np.ndarray
    boundary_keep: np.ndarray
    copies: np.ndarray
    log_weights: np.ndarray | None = None  # distribution alignment's, where aligned


def plan(
    histogram: np.ndarray,
    min_confidence: float,
    balance: bool = True,
    per_class_quota: int | None = None,
    log_weights: np.ndarray | None = None,
) -> Plan:
    """The per-class rule from the summed histograms (of the aligned probabilities where
    `log_weights` is given: the rule then aligns every shard it selects from)."""
    num_classes = histogram.shape[0]
    candidates = histogram.sum(1)
    if candidates.sum() == 0:
        raise UserError(
            f"selection.min_confidence: nothing left after filtering (no image reaches "
            f"{min_confidence})"
        )
    threshold = np.full(num_classes, -1)  # every bin kept
    boundary = np.ones(num_classes)
    copies = np.ones(num_classes)
    quota = None
    if balance:
        quota = per_class_quota or max(1, int(round(candidates.sum() / num_classes)))
        for c in range(num_classes):
            n = candidates[c]
            if n == 0:
                continue
            if n > quota:
                # from the most confident bin down, until the quota is reached
                from_top = np.cumsum(histogram[c, ::-1])
                b = NUM_BINS - 1 - int(np.searchsorted(from_top, quota))
                above = int(histogram[c, b + 1 :].sum())
                threshold[c] = b
                boundary[c] = (quota - above) / histogram[c, b]
            else:
                copies[c] = quota / n
    return Plan(min_confidence, quota, candidates, threshold, boundary, copies, log_weights)


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


COUNTS = ("predicted", "dropped", "trimmed", "kept", "duplicated", "final")


def select_shard(
    ids: np.ndarray,
    probs: np.ndarray,
    rule: Plan,
    rng: np.random.Generator,
    labels: str = "soft",
    temperature: float = 1.0,
    hard_label_smoothing: float = 0.1,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The selected rows of one shard (id, target, confidence, predicted, copies) and its
    per-class counts (num_classes x len(COUNTS)): predicted = dropped (unsure) + trimmed
    (over quota) + kept; final = kept + duplicated."""
    num_classes = len(rule.candidates)
    if rule.log_weights is not None:
        probs = aligned(probs, rule.log_weights)
    confidence = probs.max(1)
    predicted = probs.argmax(1)
    # both draws are made for every row, so a row's fate does not depend on the others
    boundary_draw = rng.random(len(ids))
    copy_draw = rng.random(len(ids))
    candidate = confidence >= rule.min_confidence
    b, tb = confidence_bin(confidence), rule.threshold_bin[predicted]
    keep = candidate & ((b > tb) | ((b == tb) & (boundary_draw < rule.boundary_keep[predicted])))
    factor = rule.copies[predicted]
    copies = (np.floor(factor) + (copy_draw < factor - np.floor(factor))).astype(np.int32)
    copies = np.where(keep, copies, 0)

    def per_class(mask: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(predicted[mask], weights=weights, minlength=num_classes)

    kept = per_class(keep)
    final = per_class(keep, copies[keep]).astype(np.int64)
    counts = np.stack(
        [
            per_class(np.ones(len(ids), bool)),
            per_class(~candidate),
            per_class(candidate & ~keep),
            kept,
            final - kept,
            final,
        ],
        axis=1,
    ).astype(np.int64)
    targets = targets_from_probs(probs[keep], labels, temperature, hard_label_smoothing)
    rows = pd.DataFrame(
        {
            "id": ids[keep],
            "target": list(targets.astype(np.float32)),
            "confidence": confidence[keep].astype(np.float32),
            "predicted": predicted[keep].astype(np.int32),
            "copies": copies[keep],
        }
    )
    return rows, counts


def counts_frame(counts: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(counts, columns=list(COUNTS))
    frame.insert(0, "class", np.arange(len(counts)))
    return frame


@dataclass(frozen=True)
class Selection:
    rows: pd.DataFrame  # id, target (per-class probabilities), confidence, predicted, copies
    per_class: pd.DataFrame  # class, predicted, dropped, trimmed, kept, duplicated, final
    total: int
    kept_unique: int
    alignment: Alignment | None = None


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
    align_to: np.ndarray | None = None,
) -> Selection:
    """Both passes over a single shard; shard index 0 of `seed`'s draws. `align_to`: the
    class shares to align the probabilities to (None: not aligned)."""
    alignment = None if align_to is None else align(lambda: [probs], align_to)
    seen = probs if alignment is None else alignment.aligned(probs)
    hist = class_histogram(seen.argmax(1), seen.max(1), num_classes, min_confidence)
    rule = plan(hist, min_confidence, balance, per_class_quota,
                None if alignment is None else alignment.log_weights)  # fmt: skip
    rows, counts = select_shard(
        ids, probs, rule, shard_rng(seed, 0), labels, temperature, hard_label_smoothing
    )
    return Selection(rows, counts_frame(counts), len(ids), len(rows), alignment)


def shard_rng(seed: int, shard_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, shard_index])


# ---------------------------------------------------------------- distribution alignment

ALIGN_TOLERANCE = 1e-3  # every class's mean aligned probability within 0.1% of its share
ALIGN_MAX_PASSES = 30  # Newton's steps: 3 passes reached 1e-3 on the demo's six pools
_MAX_STEP = 2.0  # at most a factor e^2 on a class's weight per step
_ARMIJO = 1e-4


def aligned(probs: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """Each class's probabilities scaled by exp(log_weights), each row renormalised."""
    scaled = probs.astype(np.float64) * np.exp(log_weights - log_weights.max())
    return scaled / np.maximum(scaled.sum(1, keepdims=True), np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class Alignment:
    prior: np.ndarray  # the class shares aligned to
    log_weights: np.ndarray  # per class; aligned(p) = p * exp(log_weights), renormalised
    passes: int  # over the probabilities
    deviation: float  # largest |mean aligned probability / share - 1| over the classes

    def aligned(self, probs: np.ndarray) -> np.ndarray:
        return aligned(probs, self.log_weights)


@dataclass
class _Moments:
    """Sums over the pool at one set of weights: rows, log-normaliser, q and q q^T."""

    rows: int
    log_norm: float
    first: np.ndarray
    second: np.ndarray

    def objective(self, log_weights: np.ndarray, prior: np.ndarray) -> float:
        return self.log_norm / self.rows - float(prior @ log_weights)


def _moments(batches: Iterable[np.ndarray], log_weights: np.ndarray) -> _Moments:
    k = len(log_weights)
    top = log_weights.max()
    m = _Moments(0, 0.0, np.zeros(k), np.zeros((k, k)))
    for probs in batches:
        scaled = probs.astype(np.float64) * np.exp(log_weights - top)
        norm = np.maximum(scaled.sum(1, keepdims=True), np.finfo(np.float64).tiny)
        q = scaled / norm
        m.rows += len(q)
        m.log_norm += float(np.log(norm).sum()) + top * len(q)
        m.first += q.sum(0)
        m.second += q.T @ q
    return m


def align(
    batches: Callable[[], Iterable[np.ndarray]],
    prior: np.ndarray,
    tolerance: float = ALIGN_TOLERANCE,
    max_passes: int = ALIGN_MAX_PASSES,
) -> Alignment:
    """Class weights under which the pool's mean prediction is `prior` (distribution
    alignment, ReMixMatch's rule, solved for the whole pool rather than as a running
    average). `batches()` yields the pool's probabilities, a shard at a time, once per pass.

    The log-weights l minimise F(l) = mean_i log sum_c p_ic e^(l_c) - prior . l, a convex
    function whose gradient is the aligned mean minus `prior` and whose Hessian is
    mean_i (diag q_i - q_i q_i^T): damped Newton steps with backtracking, one pass each.
    Scaling and renormalising in turn (what `benchmarks.pseudo_labels.aligned` does) reaches
    the same weights, but needs some 50 passes on confident teachers' probabilities."""
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or (prior <= 0).any() or abs(prior.sum() - 1) > 1e-6:
        raise ValueError(f"align: the class shares must be positive and sum to 1, got {prior}")
    log_weights = np.zeros(len(prior))
    m, passes = _moments(batches(), log_weights), 1
    if m.rows == 0:
        raise ValueError("align: no probabilities to align")
    while True:
        mean = m.first / m.rows
        deviation = float(np.abs(mean / prior - 1).max())
        if deviation <= tolerance or passes >= max_passes:
            return Alignment(prior, log_weights - log_weights.max(), passes, deviation)
        gradient = mean - prior
        hessian = np.diag(mean) - m.second / m.rows
        step = np.linalg.lstsq(hessian, -gradient, rcond=None)[0]
        if not float(gradient @ step) < 0:  # not a descent direction: rounding, a flat F
            step = -gradient
        step *= min(1.0, _MAX_STEP / max(float(np.abs(step).max()), 1e-12))
        before, slope, t = m.objective(log_weights, prior), float(gradient @ step), 1.0
        while passes < max_passes:
            trial = log_weights + t * step
            tried = _moments(batches(), trial)
            passes += 1
            if tried.objective(trial, prior) <= before + _ARMIJO * t * slope:
                log_weights, m = trial, tried
                break
            t /= 2
