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
import pandas as pd

from medmem._errors import InputError
from medmem.search import nearest

#: Columns the identity section adds to synthetic.csv and training.csv.
SYNTHETIC_IDENTITY_COLUMNS = [
    "nearest_patient_id",
    "nearest_patient_train_id",
    "identity_corr",
    "identity",
]
TRAINING_IDENTITY_COLUMNS = ["patient_reidentified"]


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


def check_identity_detector(detector: Any) -> None:
    """Refuse a detector that was not trained with ``objective="identity"``."""
    objective = getattr(getattr(detector, "config", None), "objective", None)
    if objective != "identity":
        raise InputError(
            f"identity_detector was trained with objective={objective!r}; train one with "
            "objective='identity' on the training images and their patient ids "
            "(medmem train-detector --objective identity)."
        )


def identity_section(
    train: np.ndarray,
    val: np.ndarray,
    synthetic: np.ndarray,
    train_patient_ids: Sequence[Any],
    *,
    train_ids: Sequence[str],
    percentile: float = 95.0,
    calibration: str = "conformal",
) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray]:
    """Identity verdicts from an identity detector's embeddings of the three sets.

    Each synthetic image's nearest training patient and identity score (max correlation
    over that patient's images); the identity threshold is calibrated like tau, by
    ``calibrate`` on the validation images' (patients not in training) nearest-patient
    scores, so a novel patient's image crosses it at about the nominal rate
    alpha = (100 - q) / 100 ("paper" calibration uses the conformal rule here).

    Returns ``(summary block, synthetic columns, patient_reidentified per training row)``.
    """
    from medmem._audit import calibrate

    pids = [None if p is None else str(p) for p in train_patient_ids]
    if len(pids) != len(train) or any(p is None or p == "" for p in pids):
        raise InputError(
            "the identity section needs the patient id of every training image; load the "
            "training images with patient ids (patient_id_pattern, or a manifest with a "
            "patient_id column)."
        )
    rule = "conformal" if calibration == "paper" else calibration
    _, val_scores, _ = nearest_patient(val, train, pids)
    threshold = calibrate(val_scores, percentile, rule)
    syn_pids, syn_scores, syn_idx = nearest_patient(synthetic, train, pids)
    hit = syn_scores >= threshold
    columns = pd.DataFrame(
        {
            "nearest_patient_id": syn_pids,
            "nearest_patient_train_id": [train_ids[i] for i in syn_idx],
            "identity_corr": syn_scores,
            "identity": hit,
        },
        columns=SYNTHETIC_IDENTITY_COLUMNS,
    )
    reidentified = {p for p, h in zip(syn_pids, hit, strict=True) if h}
    patient_flag = np.array([p in reidentified for p in pids], dtype=bool)
    n_patients = len(set(pids))
    alpha = (100.0 - percentile) / 100.0
    n_syn, n_hit = len(synthetic), int(hit.sum())
    block = {
        "tau_identity": float(threshold),
        "percentile": percentile,
        "alpha": alpha,
        "calibration": rule,
        "method": "validation images (patients not in training) scored against the training "
        "patients (max correlation over each patient's images, identity detector); "
        "calibrate() on these scores, as tau",
        "n_synthetic_identity": n_hit,
        "pct_synthetic_identity": 100.0 * n_hit / n_syn if n_syn else 0.0,
        "n_train_patients": n_patients,
        "n_patients_reidentified": len(reidentified),
        "pct_patients_reidentified": 100.0 * len(reidentified) / n_patients,
        "expected_by_chance": alpha * n_syn,
        "val_rate_at_threshold": float(np.mean(val_scores >= threshold)),
    }
    return block, columns, patient_flag


def add_identity(result: Any, block: dict[str, Any], columns: pd.DataFrame, flag: Any) -> None:
    """Attach an identity section to an ``AuditResult`` (columns, flag, summary block)."""
    for c in SYNTHETIC_IDENTITY_COLUMNS:
        result.synthetic[c] = columns[c].to_numpy()
    result.training["patient_reidentified"] = np.asarray(flag, dtype=bool)
    result.summary["identity"] = block


__all__ = [
    "SYNTHETIC_IDENTITY_COLUMNS",
    "TRAINING_IDENTITY_COLUMNS",
    "add_identity",
    "check_identity_detector",
    "identity_section",
    "nearest_patient",
]
