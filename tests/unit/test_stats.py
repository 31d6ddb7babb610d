"""Small statistics: Wilson interval and AUROC against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from medmem._stats import auroc, wilson_interval


def test_auroc_equals_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1, 1, 50), 1)  # rounding makes ties
    neg = np.round(rng.normal(0, 1, 70), 1)
    direct = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        50 * 70
    )
    assert auroc(pos, neg) == pytest.approx(direct)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([0.0])) == 0.5


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 100)
    assert lo == pytest.approx(0.02154, abs=1e-4) and hi == pytest.approx(0.11175, abs=1e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(50, 100, confidence=0.99)
    assert lo < 0.5 < hi
