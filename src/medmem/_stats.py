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


__all__ = ["auroc", "wilson_interval"]
