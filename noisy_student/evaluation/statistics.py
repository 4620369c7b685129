"""The statistics behind every figure and every choice: a 95% interval on an accuracy, a
paired test of two models on the same images, and the spread of several seeds.

- `wilson_interval`: the Wilson score interval of a proportion (Wilson, 1927), which
  keeps its coverage near 0% and 100% where the textbook normal interval does not.
- `mcnemar`: the exact McNemar test of two models' right/wrong answers on the same
  images. Only the images where they disagree carry information; under "equally
  accurate" each of those goes either way with probability 1/2, so the two-sided p-value
  is an exact binomial sum, computed here with integers.
- `paired_bootstrap`: the same question for per-image scores that are not right/wrong
  (an image's accuracy over a set of corruptions), by resampling images.
- `seed_spread`: mean, sample standard deviation and range over seeds; `t_interval`: the
  95% interval of a mean over a few seeds (Student's t: with three seeds it is 4.3 standard
  errors wide on each side, not 1.96).

Plain Python and numpy: no scipy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 10_000  # bootstrap resamples: the p-value's own noise is about 0.002 at 0.05
ABOVE, TIED, BELOW = "significantly above", "no significant difference", "significantly below"


def z_value(confidence: float = CONFIDENCE) -> float:
    """The standard normal quantile of a two-sided interval: 1.96 at 95%."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(
    correct: int, total: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes in `total` trials; (0, 1) when
    there are no trials."""
    if not 0 <= correct <= total:
        raise ValueError(f"{correct} successes of {total} trials")
    if total == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p, z2 = correct / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(
    accuracy: float, images: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson interval of an accuracy measured on `images` independent images."""
    return wilson_interval(round(accuracy * images), images, confidence)


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided p-value of k or fewer (or as many the other way) of n fair coin flips:
    2 x P(X <= min(k, n - k)), at most 1; exact (an integer sum over 2^n)."""
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0)
    for i in range(min(k, n - k)):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        tail += term
    return min(1.0, 2 * tail / 2**n)  # int / int: a correctly rounded float


def verdict(difference: float, p_value: float, alpha: float = ALPHA) -> str:
    """How the first model stands against the second, in words."""
    if p_value >= alpha or difference == 0:
        return TIED
    return ABOVE if difference > 0 else BELOW


@dataclass(frozen=True)
class PairedTest:
    """Two models judged on the same images: the counts of the 2 x 2 table, the accuracy
    difference (first minus second) and the test's two-sided p-value."""

    test: str  # "exact McNemar" or "paired bootstrap"
    images: int
    first_accuracy: float
    second_accuracy: float
    difference: float
    p_value: float
    interval: tuple[float, float]  # of the difference, at `confidence`
    both_right: int | None = None  # the paired counts (right/wrong answers only)
    only_first_right: int | None = None
    only_second_right: int | None = None
    both_wrong: int | None = None
    confidence: float = CONFIDENCE

    def verdict(self, alpha: float = ALPHA) -> str:
        return verdict(self.difference, self.p_value, alpha)

    def record(self) -> dict[str, Any]:
        """As JSON: what a decision record keeps."""
        out = asdict(self)
        out["interval"] = list(self.interval)
        return {k: v for k, v in out.items() if v is not None}


def _pair(first: Any, second: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two vectors of one length: {a.shape}, {b.shape}")
    return a, b


def mcnemar(first_correct: Any, second_correct: Any, confidence: float = CONFIDENCE) -> PairedTest:
    """The exact McNemar test on two models' right (True) / wrong answers, image by image.
    The difference's interval is the Wald interval of a paired difference of proportions
    (the p-value, not the interval, decides)."""
    a, b = _pair(first_correct, second_correct)
    a, b = a.astype(bool), b.astype(bool)
    n = len(a)
    both = int((a & b).sum())
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    difference = (only_a - only_b) / n if n else 0.0
    if n:
        variance = ((only_a + only_b) / n - difference**2) / n
        half = z_value(confidence) * math.sqrt(max(variance, 0.0))
    else:
        half = 1.0
    return PairedTest(
        test="exact McNemar",
        images=n,
        first_accuracy=float(a.mean()) if n else 0.0,
        second_accuracy=float(b.mean()) if n else 0.0,
        difference=difference,
        p_value=binomial_two_sided(only_a, only_a + only_b),
        interval=(max(-1.0, difference - half), min(1.0, difference + half)),
        both_right=both,
        only_first_right=only_a,
        only_second_right=only_b,
        both_wrong=n - both - only_a - only_b,
        confidence=confidence,
    )


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The mean of `values` over `resamples` draws of as many indices with replacement,
    drawn in chunks so that memory stays small whatever the number of images."""
    rng = np.random.default_rng(seed)
    n, means, chunk = len(values), [], max(1, 2_000_000 // max(len(values), 1))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means.append(values[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    return np.concatenate(means)


def bootstrap_interval(
    values: Any, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of per-image values (an image's
    accuracy over several corrupted copies of it, which are not independent trials)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return 0.0, 1.0
    means = _resampled_means(v, resamples, seed)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_bootstrap(
    first: Any,
    second: Any,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> PairedTest:
    """Per-image scores of two models on the same images (right/wrong, or an image's
    accuracy over its corrupted copies), images resampled with replacement: the mean
    difference's percentile interval, and the two-sided p-value of "no difference": twice
    the share of resampled differences on the far side of 0, counted as (k + 1) / (R + 1)
    so that it is never 0 (Davison & Hinkley, 1997)."""
    a, b = _pair(first, second)
    d = a - b
    n = len(d)
    if n == 0 or not d.any():
        mean = 0.0 if n == 0 else float(d.mean())
        return PairedTest("paired bootstrap", n, float(a.mean()) if n else 0.0,
                          float(b.mean()) if n else 0.0, mean, 1.0, (mean, mean),
                          confidence=confidence)  # fmt: skip
    means = _resampled_means(d, resamples, seed)
    tail = (1 - confidence) / 2
    far = min(int((means <= 0).sum()), int((means >= 0).sum()))
    p = min(1.0, 2 * (far + 1) / (resamples + 1))
    return PairedTest(
        test="paired bootstrap",
        images=n,
        first_accuracy=float(a.mean()),
        second_accuracy=float(b.mean()),
        difference=float(d.mean()),
        p_value=p,
        interval=(float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))),
        confidence=confidence,
    )


def seed_spread(values: list[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one seed), minimum and maximum over seeds."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    sd = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return {"seeds": len(values), "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


# Student's t, two-sided 95%, by degrees of freedom (any statistics table; e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, 1.3.6.7.2); beyond 30 the Cornish-Fisher series below
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile_95(df: int) -> float:
    """The 97.5th percentile of Student's t with `df` degrees of freedom: the table up to 30,
    then the first terms of the Cornish-Fisher expansion around the normal (within 0.001)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T95):
        return T95[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean over seeds and its 95% interval (Student's t); None with fewer than two."""
    if len(values) < 2:
        return None
    spread = seed_spread(values)
    half = t_quantile_95(len(values) - 1) * spread["sd"] / math.sqrt(len(values))
    return spread["mean"], spread["mean"] - half, spread["mean"] + half


def percent(accuracy: float, interval: tuple[float, float] | list[float] | None) -> str:
    """An accuracy with its interval, in percent: 87.52% [86.87, 88.15]."""
    if interval is None:
        return f"{100 * accuracy:.2f}%"
    low, high = interval
    return f"{100 * accuracy:.2f}% [{100 * low:.2f}, {100 * high:.2f}]"
