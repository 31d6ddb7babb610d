"""Identity-level risk: the nearest training *patient* of each image, and its score.

An identity detector (``DetectorConfig(objective="identity")``) embeds images so that
images of the same patient correlate. A patient's identity score for a query is the
maximum Pearson correlation over that patient's training images; the nearest patient is
the one with the highest score, i.e. the patient of the nearest training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medmem._errors import InputError
from medmem.search import nearest


def nearest_patient(
    queries: np.ndarray, base: np.ndarray, base_patient_ids: Sequence[Any]
) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Nearest training patient of each query row: (patient ids, identity scores, image index).

    The score is max over the patient's images of the embedding correlation; the index is
    that image's row in ``base``.

    Example:
        >>> b = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
        >>> ids, s, i = nearest_patient(b[:1] + 0.1, b, ["p1", "p2", "p2"])
        >>> ids, i.tolist()
        (['p1'], [0])
    """
    pids = list(base_patient_ids)
    if len(pids) != len(base):
        raise InputError(f"base_patient_ids must have {len(base)} items, got {len(pids)}.")
    if any(p is None for p in pids):
        raise InputError(
            "identity scores need the patient id of every training image; some are unknown."
        )
    scores, idx = nearest(np.asarray(queries), np.asarray(base), k=1)
    index = idx[:, 0].astype(np.int64)
    return [pids[i] for i in index], scores[:, 0].astype(np.float64), index


__all__ = ["nearest_patient"]
