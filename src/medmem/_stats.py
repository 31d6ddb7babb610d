"""Small statistics shared by the audit, the demo and the benchmarks."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k / n (well-behaved at 0 and n).

    Example:
        >>> lo, hi = wilson_interval(5, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.022, 0.112)
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve: P(positive score > negative score), ties counted 1/2.

    Computed from ranks (Mann-Whitney U), so memory is linear in the number of scores.

    Example:
        >>> auroc(np.array([0.9, 0.8]), np.array([0.1, 0.85]))
        0.75
    """
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def difference_interval(
    k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval for the difference of proportions k1/n1 - k2/n2
    (independent samples; built from the two Wilson intervals, well-behaved at 0 and 1).

    Example:
        >>> lo, hi = difference_interval(10, 50, 2, 50)
        >>> round(lo, 3), round(hi, 3)
        (0.031, 0.294)
    """
    if n1 <= 0 or n2 <= 0:
        return (float("nan"), float("nan"))
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def t_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean of ``values`` (e.g. one count per generator seed);
    (nan, nan) with fewer than two finite values.

    Example:
        >>> lo, hi = t_interval([3.0, 5.0, 4.0])
        >>> round(lo, 2), round(hi, 2)
        (1.52, 6.48)
    """
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (float("nan"), float("nan"))
    half = float(student_t.ppf(0.5 + confidence / 2, x.size - 1)) * float(
        x.std(ddof=1) / math.sqrt(x.size)
    )
    return (float(x.mean() - half), float(x.mean() + half))


__all__ = ["auroc", "difference_interval", "t_interval", "wilson_interval"]
