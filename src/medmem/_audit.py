"""The audit: calibrate thresholds on held-out patients, then count memorized and copied images.

Definitions (DESIGN.md, from the paper's section 4.2.2 and Algorithm 1, made size-robust):

- ``nearest_val_corr[i]``: max over validation images of corr(train i, val).
- ``nearest_synthetic_corr[i]``: max over synthetic images of corr(train i, synthetic).
- ``nearest_train_corr[s]``: max over training images of corr(synthetic s, train).
- synthetic image s is a *copy* when ``nearest_train_corr[s] >= tau``; ``n_copies``.
- training image i is *memorized* when ``nearest_synthetic_corr[i] >= tau_mem``; ``n_mem``.
- ``pct_mem = 100 * n_mem / n_train``; ``pct_copies = 100 * n_copies / n_synthetic``.

Calibration (``calibration``; alpha = (100 - percentile) / 100, 0.05 by default):

- ``"conformal"`` (default): tau is the split-conformal quantile of the validation images'
  nearest-training correlations, scores of the same form as those thresholded: the
  order statistic of fractional rank (n_val + 1)(1 - alpha), interpolated linearly (numpy
  quantile method ``"weibull"``). A novel image exchangeable with the validation images is
  called a copy with probability alpha on average over validation sets (within
  alpha +- 1/(n_val + 1)), whatever the set sizes. tau_mem is the smallest threshold at
  which the expected share of training images falsely called memorized, estimated from
  the training-validation correlations for a synthetic set of the audited size, is at
  most alpha (unbiased when n_synthetic <= n_val, conservative otherwise).
- ``"conservative"``: tau at the order statistic of rank ceil((n_val + 1)(1 - alpha)): the
  false copy rate is at most alpha (and above alpha - 1/(n_val + 1)); tau_mem as above.
- ``"paper"``: the paper's ``tau = tau_mem = percentile(nearest_val_corr, q)`` (linear
  interpolation, as ``numpy.percentile``). It compares maxima over n_val images with maxima
  over n_train (copies) or n_synthetic (memorized) images, so its false rate on novel
  images grows as the validation set shrinks. Always computed and reported under
  ``summary["paper"]`` and the ``*_paper`` columns.

``audit_embeddings`` is the pure algorithm on arrays; ``audit`` is the pipeline that embeds
datasets with a detector first. docs/calibration.md derives the guarantees.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medmem import __version__
from medmem._audit_inputs import check_inputs, patient_overlap_status
from medmem._errors import InputError, MedmemWarning
from medmem._io import atomic_dir, atomic_save, atomic_write_json, claim_output
from medmem._plots import GalleryPair, plot_gallery, plot_histogram
from medmem._resume import checkpoint_for
from medmem._validation import (
    check_choice,
    check_dataset,
    check_detector,
    check_embeddings,
    check_in_range,
    check_percentile,
    check_positive_int,
    check_seed_int,
)
from medmem.search import DEFAULT_BLOCK_SIZE, nearest, standardize
from medmem.verify import SCORES, AlignConfig, AlignedScorer, AlignedSearch, stack_images

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 3: intervals.expected_copies (was expected_chance_copies)
TRAINING_COLUMNS = [
    "train_id",
    "patient_id",
    "nearest_val_id",
    "nearest_val_corr",
    "nearest_synthetic_id",
    "nearest_synthetic_corr",
    "memorized",
    "memorized_paper",
]
SYNTHETIC_COLUMNS = [
    "synthetic_id",
    "nearest_train_id",
    "nearest_train_corr",
    "copy",
    "copy_paper",
]

# How tau (copies) and tau_mem (memorized) are calibrated; the first is the default.
CALIBRATIONS = ("conformal", "conservative", "paper")
CALIBRATION_ASSUMPTION = "novel images exchangeable with the validation images, continuous scores"
# slack when a fractional rank (n + 1) q / 100 is compared with an integer
_RANK_TOL = 1e-9
# first top-K of validation neighbours per training row when calibrating tau_mem
_MEM_TOP_K = 64
#: nearest over named sets: (a, b, k) -> (scores (n_a, k) descending, rows of b)
Near = Callable[[str, str, int], tuple[np.ndarray, np.ndarray]]
# the bootstrap evaluates tau_mem on at most this many candidate thresholds
_MEM_GRID = 512


# tau at or above this means the detector cannot tell images apart
COLLAPSED_TAU = 0.999


def check_calibration(calibration: Any) -> str:
    """Return ``calibration`` if it is one of ``CALIBRATIONS``; else raise naming them."""
    return check_choice(calibration, "calibration", CALIBRATIONS)


def check_audit_args(
    *,
    percentile: Any = 95.0,
    calibration: Any = "conformal",
    n_bootstrap: Any = 1000,
    confidence: Any = 0.95,
    seed: Any = 0,
    n_controls: Any = 0,
    control_kinds: Sequence[str] | None = None,
    detector: Any = None,
    score: Any = "aligned",
) -> dict[str, Any]:
    """Check the audit's settings before any image is read; return them normalised.

    The one boundary check shared by :func:`audit`, :func:`audit_embeddings` and the CLI
    (which calls it before loading the datasets). Each failure is one line naming the
    parameter and the fix.
    """
    if control_kinds is not None:
        from medmem.detector import VARIATION_KINDS

        if isinstance(control_kinds, str):
            control_kinds = [control_kinds]
        for k in control_kinds:
            check_choice(k, "control_kinds", VARIATION_KINDS)
    return {
        "percentile": check_percentile(percentile, "percentile"),
        "calibration": check_calibration(calibration),
        "n_bootstrap": check_positive_int(n_bootstrap, "n_bootstrap", minimum=0),
        "confidence": check_in_range(
            confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True
        ),
        "seed": check_seed_int(seed, "seed"),
        "n_controls": check_positive_int(n_controls, "n_controls", minimum=0),
        "control_kinds": None if control_kinds is None else list(control_kinds),
        "detector": check_detector(detector, "detector"),
        "score": check_choice(score, "score", SCORES),
    }


def _alpha(percentile: float) -> float:
    """The nominal false rate alpha = (100 - percentile) / 100."""
    return (100.0 - percentile) / 100.0


def _ranks(n: int, percentile: float) -> tuple[float, int, int]:
    """(r, floor r, ceil r) for the conformal rank r = (n + 1) * percentile / 100."""
    r = (n + 1) * percentile / 100.0
    return r, math.floor(r + _RANK_TOL), math.ceil(r - _RANK_TOL)


def min_calibration_size(percentile: float, calibration: str = "conformal") -> int:
    """Fewest validation images that calibrate tau at ``percentile``.

    ``"conformal"`` and ``"conservative"``: the rank (n + 1) q / 100 must not exceed n, so
    n >= q / (100 - q): 19 for q = 95. ``"paper"``: with n values, percentiles above
    100 (n - 1) / n interpolate towards the largest value alone; q = 95 needs n >= 20.

    Example:
        >>> min_calibration_size(95), min_calibration_size(95, "paper")
        (19, 20)
    """
    calibration = check_calibration(calibration)
    percentile = check_percentile(percentile, "percentile")
    if calibration == "paper":
        return max(2, math.ceil(100.0 / (100.0 - percentile)))
    return max(1, math.ceil(percentile / (100.0 - percentile) - _RANK_TOL))


def _max_percentile(n: int) -> float:
    """The largest percentile (one decimal, rounded down) that n validation images allow."""
    return math.floor(1000.0 * n / (n + 1)) / 10.0


def _conformal_threshold(sorted_scores: np.ndarray, percentile: float, calibration: str) -> Any:
    """tau from scores sorted ascending along the last axis (rank checked by the caller)."""
    n = sorted_scores.shape[-1]
    r, j_lo, j_hi = _ranks(n, percentile)
    hi = sorted_scores[..., j_hi - 1]
    if calibration == "conservative" or j_lo == j_hi:
        return hi
    lo = sorted_scores[..., max(j_lo, 1) - 1]
    return lo + (r - j_lo) * (hi - lo)


def calibrate(
    scores: np.ndarray, percentile: float = 95.0, calibration: str = "conformal"
) -> float:
    """The copy threshold tau from calibration scores.

    Args:
        scores: for ``"conformal"`` and ``"conservative"``, the validation images'
            nearest-training correlations (the same form as the synthetic images' scores
            they are compared with); for ``"paper"``, the training images'
            nearest-validation correlations.
        percentile: q; alpha = (100 - q) / 100 is the nominal false copy rate.
        calibration: ``"conformal"``: the order statistic of fractional rank
            r = (n + 1)(1 - alpha), interpolated linearly between s_(floor r) and
            s_(ceil r) (numpy quantile method ``"weibull"``): a new exchangeable score
            reaches it with probability alpha on average (within alpha +- 1/(n + 1)).
            ``"conservative"``: s_(ceil r): probability at most alpha.
            ``"paper"``: ``numpy.percentile(scores, q)`` (linear), the paper's tau.

    Raises ``InputError`` when r > n (conformal and conservative need at least
    ``min_calibration_size(q)`` scores: 19 for q = 95).

    Example:
        >>> calibrate(np.arange(21) / 20, 95, "paper")
        0.95
        >>> round(calibrate(np.arange(1, 20) / 20, 95), 6)  # r = 19 = n: the largest score
        0.95
    """
    calibration = check_calibration(calibration)
    percentile = check_percentile(percentile, "percentile", allow_zero=calibration == "paper")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise InputError("calibration scores must be a non-empty 1-d array.")
    if not np.isfinite(values).all():
        raise InputError("calibration scores contain NaN or infinity.")
    if calibration == "paper":
        return float(np.percentile(values, percentile))
    n = values.size
    need = min_calibration_size(percentile, calibration)
    if n < need:
        r = _ranks(n, percentile)[0]
        raise InputError(
            f"{n} validation images are too few for tau at the {percentile:g}th percentile "
            f"with {calibration} calibration: the rank (n + 1) x {percentile:g} / 100 = "
            f"{r:.2f} exceeds n. Give at least {need} validation images (patients not in "
            f"training), or lower --percentile to at most {_max_percentile(n):g}."
        )
    return float(_conformal_threshold(np.sort(values), percentile, calibration))


def _subset_false_rate(n: int, m: int) -> np.ndarray:
    """f[k] = 1 - C(n - k, m) / C(n, m), k = 0..n (log-space).

    The share of the m-subsets of n validation images that hold at least one of k given
    images: the chance that a training image with k validation correlations >= t is
    called memorized at t when the synthetic set is m validation-like images.
    """
    lg = np.array([math.lgamma(x + 1.0) for x in range(n + 1)])  # lg[x] = log x!
    free = n - np.arange(n + 1)
    out = np.ones(n + 1)
    ok = free >= m
    log_ratio = lg[free[ok]] - lg[free[ok] - m] - lg[n] + lg[n - m]
    out[ok] = -np.expm1(np.minimum(log_ratio, 0.0))
    out[0] = 0.0  # exactly: no validation image at or above t
    return out


def _pooled_rate(pbar: np.ndarray, m: int) -> np.ndarray:
    """1 - (1 - pbar)^m, accurately for small pbar."""
    with np.errstate(divide="ignore"):
        return -np.expm1(m * np.log1p(-np.clip(pbar, 0.0, 1.0)))


def _mem_increments(n: int, m: int, n_rows: int, k: int) -> np.ndarray:
    """Per-row increments of the rate statistic as the j-th largest value (j < k) is passed.

    m <= n: the statistic is the mean over rows of f[k_i]; m > n: the pooled pair
    exceedance pbar (mapped to 1 - (1 - pbar)^m afterwards).
    """
    if m <= n:
        return np.diff(_subset_false_rate(n, m)[: k + 1]) / n_rows
    return np.full(k, 1.0 / (n_rows * n))


def _mem_rates(top: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds (ascending, unique) and the estimated false memorized rate at each.

    ``top``: (n_train, K) top-K train-validation correlations per row, descending. The
    rates are exact for thresholds above every row's K-th value (or when K = n).
    """
    n_rows, k = top.shape
    flat = top.astype(np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    values = flat[order]
    inc = np.tile(_mem_increments(n, m, n_rows, k), n_rows)[order]
    above = np.cumsum(inc[::-1])[::-1]  # sum of increments of values >= values[j]
    first = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    stat = above[first]
    rate = stat if m <= n else _pooled_rate(stat, m)
    return values[first], rate


def _smallest_at_most(thresholds: np.ndarray, rate: np.ndarray, level: float) -> int | None:
    """Index of the smallest threshold whose rate is <= level (rates non-increasing)."""
    ok = rate <= level + 1e-12
    return int(np.argmax(ok)) if ok.any() else None


def _mem_infeasible(
    n_train: int, n: int, m: int, alpha: float, rate: float, ties: str = ""
) -> InputError:
    return InputError(
        f"tau_mem cannot be calibrated: even at the largest training-validation correlation "
        f"the expected share of training images falsely called memorized is {rate:.3g}, above "
        f"alpha = {alpha:g} ({n_train} training, {n} validation, {m} synthetic images: too "
        f"few validation images, or training-validation pairs, for this rate){ties}. Add "
        "validation images (patients not in training), audit the synthetic images in "
        "smaller sets, lower --percentile, or use --calibration paper."
    )


def _min_mem_rate(n_train: int, n: int, m: int) -> float:
    """The estimated false memorized rate at the largest of n_train x n distinct pairs."""
    if m <= n:
        return (m / n) / n_train
    return float(_pooled_rate(np.array(1.0 / (n_train * n)), m))


@dataclass
class _MemCalibration:
    tau_mem: float
    rate: float  # estimated false memorized rate at tau_mem
    top_k: int
    top: np.ndarray  # (n_train, top_k) train->validation correlations, descending
    thresholds: np.ndarray  # candidate thresholds, ascending
    rates: np.ndarray  # estimated rate at each candidate
    low: float  # lowest threshold with exact rates (the bootstrap grid's floor)


def _calibrate_memorized(
    near: Near,
    n_train: int,
    n: int,
    m: int,
    percentile: float,
    floor_rate: float | None = None,
) -> _MemCalibration:
    """tau_mem: the smallest observed train-validation correlation t with rate(t) <= alpha.

    rate(t) estimates the share of training images called memorized at t when the m
    synthetic images are novel (exchangeable with the validation images). With
    C[i, v] = corr(train i, val v) and k_i(t) = #{v: C[i, v] >= t}:
    m <= n: mean_i [1 - C(n - k_i(t), m) / C(n, m)], the average over all m-subsets of the
    validation set (unbiased for each t); m > n: 1 - (1 - pbar(t))^m with pbar(t) the
    pooled pair exceedance (conservative when training images differ, by Jensen).

    Only the top-K validation correlations of each training row are kept (K from 64,
    doubled while the chosen threshold, or ``floor_rate``'s, reaches into some row's K-th
    value): exact, without the n_train x n_val matrix.
    """
    alpha = _alpha(percentile)
    k = min(n, _MEM_TOP_K)
    while True:
        top, _ = near("train", "val", k)
        thresholds, rates = _mem_rates(top, n, m)
        i = _smallest_at_most(thresholds, rates, alpha)
        if i is None:
            n_top = int((top == top.max()).sum())
            ties = (
                f"; the largest correlation, {float(top.max()):.6f}, is shared by {n_top} "
                "pairs (tied scores: duplicated images, or collapsed embeddings)"
                if n_top > 1
                else ""
            )
            raise _mem_infeasible(n_train, n, m, alpha, float(rates[-1]), ties)
        low = float(thresholds[i])
        if floor_rate is not None:
            j = _smallest_at_most(thresholds, rates, max(floor_rate, alpha))
            low = min(low, float(thresholds[j if j is not None else i]))
        if k >= n or low > float(top[:, -1].max()):
            break
        k = min(2 * k, n)
    return _MemCalibration(float(thresholds[i]), float(rates[i]), k, top, thresholds, rates, low)


def _check_sizes(
    n_train: int,
    n_val: int,
    percentile: float,
    calibration: str = "conformal",
    n_synthetic: int | None = None,
) -> None:
    calibration = check_calibration(calibration)
    need = min_calibration_size(percentile, calibration)
    if calibration == "paper" and n_train < need:
        raise InputError(
            f"{n_train} training images are too few to calibrate the {percentile:g}th "
            f"percentile: tau would be set by the largest value alone. Give at least {need} "
            f"training images, or lower --percentile (e.g. {100 - 100 / max(n_train, 2):.0f})."
        )
    if n_val < need:
        if calibration == "paper":
            raise InputError(
                f"{n_val} validation images are too few to calibrate tau at the "
                f"{percentile:g}th percentile (need at least {need}). Add held-out "
                "patients' images to the validation set."
            )
        raise InputError(
            f"{n_val} validation images are too few to calibrate tau at the {percentile:g}th "
            f"percentile with {calibration} calibration: need at least {need} (the rank "
            f"(n_val + 1) x {percentile:g} / 100 must not exceed n_val). Add held-out "
            f"patients' images to the validation set, or lower --percentile to at most "
            f"{_max_percentile(n_val):g}."
        )
    alpha = _alpha(percentile)
    if calibration != "paper" and n_synthetic is not None and n_synthetic > 0:
        floor = _min_mem_rate(n_train, n_val, n_synthetic)
        if floor > alpha + 1e-12:
            raise _mem_infeasible(n_train, n_val, n_synthetic, alpha, floor)
    if n_val < n_train / 10:
        if calibration == "paper":
            warnings.warn(
                f"The validation set ({n_val}) is much smaller than the training set "
                f"({n_train}): with --calibration paper, tau comes from maxima over {n_val} "
                f"validation images but is compared with maxima over {n_train} training "
                f"images, so novel images are called copies far more often than "
                f"{100 * alpha:g}%. Use the default conformal calibration, or a validation "
                "set of comparable size.",
                category=MedmemWarning,
                stacklevel=3,
            )
        else:
            sd = math.sqrt(alpha * (1 - alpha) / (n_val + 2))
            warnings.warn(
                f"The validation set ({n_val}) is much smaller than the training set "
                f"({n_train}). With {calibration} calibration this does not raise the rate "
                f"at which novel images are called copies (about {100 * alpha:g}% on "
                f"average), but tau rests on {n_val} values: the rate for this validation "
                f"set varies by about +-{100 * sd:.1f} points. More validation images give "
                "a steadier tau.",
                category=MedmemWarning,
                stacklevel=3,
            )


def _standardize_named(x: Any, name: str, ids: Sequence[str]) -> np.ndarray:
    arr = check_embeddings(x, name)
    try:
        return standardize(arr, name)
    except InputError as exc:
        msg = str(exc)
        if "row " in msg:
            row = int(msg.split("row ")[1].split()[0])
            raise InputError(
                f"{name}: the embedding of {ids[row]!r} is constant, so its correlation is "
                "undefined. Check that image (blank or constant?)."
            ) from None
        raise


def _ids(ids: Sequence[str] | None, n: int, prefix: str) -> list[str]:
    if ids is None:
        return [f"{prefix}{i:05d}" for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"{prefix} ids: expected {n}, got {len(ids)}.")
    return ids


def _row_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) how often each of n rows is drawn in b resamples of size n (with replacement)."""
    draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _mem_grid_contributions(
    mem: _MemCalibration, n: int, m: int, tau_mem: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap grid (ascending thresholds, at most ~_MEM_GRID) and the (rows, grid) matrix
    of per-row contributions to the rate statistic (f[k_i] for m <= n, k_i / n for m > n)."""
    cand = mem.thresholds[mem.thresholds >= mem.low]
    n_rows = mem.top.shape[0]
    size = int(min(_MEM_GRID, max(32, 20_000_000 // max(n_rows, 1))))
    if cand.size > size:
        pick = np.unique(np.round(np.linspace(0, cand.size - 1, size)).astype(np.int64))
        cand = np.union1d(cand[pick], [tau_mem])
    top = mem.top.astype(np.float64)
    counts = np.empty((n_rows, cand.size), dtype=np.int64)
    step = max(1, 16_000_000 // max(top.shape[1] * cand.size, 1))
    for s in range(0, n_rows, step):
        counts[s : s + step] = (top[s : s + step, :, None] >= cand[None, None, :]).sum(1)
    if m <= n:
        contrib = _subset_false_rate(n, m)[counts]
    else:
        contrib = counts / n
    return cand, contrib


def _bootstrap(
    rho_val: np.ndarray,
    rho_syn: np.ndarray,
    rho_copy: np.ndarray,
    rho_chance: np.ndarray,
    percentile: float,
    n_bootstrap: int,
    confidence: float,
    seed: int,
    calibration: str = "paper",
    mem: _MemCalibration | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap over training, validation and synthetic images.

    The thresholds are recomputed in every replicate, so the intervals carry both the
    thresholds' and the counts' sampling uncertainty.

    ``"conformal"`` / ``"conservative"``: tau from resampled validation scores
    (``rho_chance``), n_copies from resampled synthetic images at that tau; tau_mem from
    resampled training rows (their rate contributions, precomputed on a grid of at most
    ~512 candidate thresholds, ``mem``), n_mem from the same rows; the chance rate from an
    independent resample of validation images at the replicate's tau.
    ``"paper"``: each replicate resamples training images and recomputes tau = tau_mem from
    their nearest-validation correlations (``rho_val``), as before.
    """
    rng = np.random.default_rng(seed)
    n_train, n_syn, n_val = rho_val.size, rho_copy.size, rho_chance.size
    taus = np.empty(n_bootstrap)
    taus_mem = np.empty(n_bootstrap)
    n_mem = np.empty(n_bootstrap)
    n_copies = np.empty(n_bootstrap)
    chance_rate = np.empty(n_bootstrap)
    chunk = max(1, min(n_bootstrap, 20_000_000 // max(n_train, n_syn, n_val)))
    if calibration != "paper":
        if mem is None:
            raise ValueError("the conformal bootstrap needs the tau_mem calibration")
        alpha = _alpha(percentile)
        grid, contrib = _mem_grid_contributions(mem, n_val, n_syn, mem.tau_mem)
        _, j_lo, j_hi = _ranks(n_val, percentile)
        kth = sorted({max(j_lo, 1) - 1, j_hi - 1})
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        sl = slice(start, start + b)
        if calibration == "paper":
            it = rng.integers(0, n_train, size=(b, n_train))
            t = np.percentile(rho_val[it], percentile, axis=1)
            taus[sl] = taus_mem[sl] = t
            n_mem[sl] = (rho_syn[it] >= t[:, None]).sum(1)
            js = rng.integers(0, n_syn, size=(b, n_syn))
            n_copies[sl] = (rho_copy[js] >= t[:, None]).sum(1)
            vs = rng.integers(0, n_val, size=(b, n_val))
            chance_rate[sl] = (rho_chance[vs] >= t[:, None]).mean(1)
            continue
        # memorized: resampled training rows, tau_mem on the grid, n_mem from the same rows
        w = _row_counts(rng, b, n_train)
        stat = w @ contrib / n_train  # (b, grid)
        rate = stat if n_syn <= n_val else _pooled_rate(stat, n_syn)
        ok = rate <= alpha + 1e-12
        gi = np.where(ok.any(1), ok.argmax(1), grid.size - 1)
        tm = grid[gi]
        taus_mem[sl] = tm
        n_mem[sl] = (w * (rho_syn[None, :] >= tm[:, None])).sum(1)
        # copies: tau from resampled validation scores, n_copies from resampled synthetic
        vs = rng.integers(0, n_val, size=(b, n_val))
        part = np.partition(rho_chance[vs], kth, axis=1)
        t = _conformal_threshold(part, percentile, calibration)
        taus[sl] = t
        js = rng.integers(0, n_syn, size=(b, n_syn))
        n_copies[sl] = (rho_copy[js] >= t[:, None]).sum(1)
        vs2 = rng.integers(0, n_val, size=(b, n_val))
        chance_rate[sl] = (rho_chance[vs2] >= t[:, None]).mean(1)
    tail = (1.0 - confidence) / 2.0
    qs = [100 * tail, 100 * (1 - tail)]

    def interval(x: np.ndarray) -> list[float]:
        lo, hi = np.percentile(x, qs)
        return [float(lo), float(hi)]

    ci_mem, ci_copies = interval(n_mem), interval(n_copies)
    expected = chance_rate * n_syn
    if calibration == "paper":
        method = (
            "percentile bootstrap over training images (tau = tau_mem, n_mem), synthetic "
            "images (n_copies) and validation images (chance rate), tau recomputed in every "
            "replicate"
        )
    else:
        method = (
            f"percentile bootstrap, thresholds recomputed in every replicate: validation "
            f"images (tau, {calibration}), synthetic images (n_copies), training images "
            f"(tau_mem on a grid of {grid.size} candidate thresholds, n_mem) and an "
            "independent resample of validation images (chance rate)"
        )
    return {
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "method": method,
        "tau": interval(taus),
        "tau_mem": interval(taus_mem),
        "n_mem": ci_mem,
        "n_copies": ci_copies,
        "pct_mem": [100 * v / n_train for v in ci_mem],
        "pct_copies": [100 * v / n_syn for v in ci_copies],
        "expected_copies": interval(expected),
        "excess_copies": interval(n_copies - expected),
    }


def _patient_summary(training: pd.DataFrame) -> dict[str, Any] | None:
    """Re-identification risk is about patients: how many have a memorized image."""
    ids = training["patient_id"]
    if ids.isna().any():
        return None
    per_patient = training.groupby("patient_id", sort=False)["memorized"].any()
    n_pat, n_mem_pat = int(per_patient.size), int(per_patient.sum())
    return {
        "n_train_patients": n_pat,
        "n_patients_mem": n_mem_pat,
        "pct_patients_mem": 100.0 * n_mem_pat / n_pat,
        "pct_patients_mem_denominator": "n_train_patients",
    }


def _controls_summary(
    rho: np.ndarray,
    nearest: np.ndarray,
    sources: np.ndarray,
    tau: float,
    train_patient_ids: Sequence[Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """Positive controls: known varied copies of training images, scored like synthetic ones.

    ``extra["control_kinds"]`` (one kind per control) and ``extra["held_out_kinds"]`` give a
    catch rate per kind and the headline ``sensitivity`` over the held-out kinds only (changes
    the detector never trained on, which predict its sensitivity on real copies); the rate
    over every control is ``sensitivity_all``.
    """
    from medmem._stats import wilson_interval

    extra = dict(extra or {})
    kinds = np.asarray(extra.pop("control_kinds", ["unknown"] * len(rho)))
    held_out = set(extra.get("held_out_kinds", []))
    caught = rho >= tau
    n, k = int(rho.size), int(caught.sum())
    same_patient = [
        train_patient_ids[a] is not None and train_patient_ids[a] == train_patient_ids[b]
        for a, b in zip(nearest, sources, strict=True)
    ]
    per_kind = {}
    for kind in dict.fromkeys(kinds.tolist()):
        sel = kinds == kind
        nk, kk = int(sel.sum()), int(caught[sel].sum())
        per_kind[kind] = {
            "n": nk,
            "caught": kk,
            "sensitivity": kk / nk,
            "sensitivity_ci": list(wilson_interval(kk, nk)),
            "held_out": kind in held_out,
        }
    head = np.isin(kinds, list(held_out)) if held_out else np.ones(n, dtype=bool)
    nh, kh = int(head.sum()), int(caught[head].sum())
    out = {
        "n": nh,
        "caught": kh,
        "sensitivity": kh / nh,
        "sensitivity_ci": list(wilson_interval(kh, nh)),
        "sensitivity_of": "held-out kinds (not in the detector's training variations)"
        if held_out
        else "every control (all control kinds were in the detector's training variations)",
        "n_all": n,
        "caught_all": k,
        "sensitivity_all": k / n,
        "sensitivity_all_ci": list(wilson_interval(k, n)),
        "per_kind": per_kind,
        "nearest_is_source": int((nearest == sources).sum()),
        "nearest_is_source_patient": int(np.sum(np.asarray(same_patient) | (nearest == sources))),
        "median_corr": float(np.median(rho)),
    }
    out.update(extra)
    return out


def make_controls(
    train: Any,
    detector: Any,
    *,
    n_controls: int = 100,
    kinds: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Positive controls: ``n_controls`` seeded copies of training images, one change each.

    By default the changes are the kinds the detector did NOT train on
    (``medmem.detector.CONTROL_VARIATION_KINDS`` minus its training variations), in turn, so
    the catch rate measures generalisation to unseen changes rather than restating the
    training objective. Blends and patches take another training image (of another patient
    when ids are known) as the partner. Returns (embeddings, source rows, info).
    """
    from medmem.data import ArrayDataset

    images, sources, info = control_images(
        train, detector, n_controls=n_controls, kinds=kinds, seed=seed
    )
    emb = detector.embed(ArrayDataset(images), batch_size=batch_size, quiet=quiet)
    return emb, sources, info


def control_images(
    train: Any,
    detector: Any,
    *,
    n_controls: int = 100,
    kinds: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The images of :func:`make_controls` (not embedded): (images, source rows, info)."""
    from medmem.detector import (
        CONTROL_VARIATION_KINDS,
        VARIATION_KINDS,
        apply_variation,
        needs_partner,
        sample_variation,
    )

    config = getattr(detector, "config", None)
    trained = set(config.variations.kinds) if config is not None else set()
    if kinds is None:
        kinds = [k for k in CONTROL_VARIATION_KINDS if k not in trained]
        if not kinds:  # the detector trained on every control kind: say so, use them anyway
            kinds = list(CONTROL_VARIATION_KINDS)
    kinds = list(kinds)
    for k in kinds:
        if k not in VARIATION_KINDS:
            raise InputError(
                f"control kind {k!r} is not a variation kind; choose from "
                f"{', '.join(VARIATION_KINDS)}."
            )
    rng = np.random.default_rng([seed, 0xC0])
    n = min(n_controls, len(train))
    sources = rng.choice(len(train), size=n, replace=False)
    pids = list(train.patient_ids)
    images, used = [], []
    for c, i in enumerate(sources):
        kind = kinds[c % len(kinds)]
        img = train[int(i)]
        params = sample_variation(train.spatial_dims, rng, kinds=(kind,))
        partner = None
        if needs_partner(params):
            others = [
                j
                for j in range(len(train))
                if j != i and (pids[j] is None or pids[j] != pids[int(i)])
            ] or [j for j in range(len(train)) if j != i]
            partner = train[int(rng.choice(others))]
        images.append(apply_variation(img, params, partner=partner).numpy())
        used.append(kind)
    info = {
        "kinds": kinds,
        "held_out_kinds": [k for k in kinds if k not in trained],
        "trained_kinds": sorted(trained, key=VARIATION_KINDS.index),
        "seed": seed,
        "control_kinds": used,
    }
    return np.stack(images), np.asarray(sources), info


@dataclass
class AuditResult:
    """What an audit found: ``summary`` (dict), ``training`` and ``synthetic`` tables."""

    summary: dict[str, Any]
    training: pd.DataFrame
    synthetic: pd.DataFrame
    _images: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the detector the audit trained (None when one was given); saved to ``detector/``
    detector: Any = field(default=None, repr=False)

    def gallery_pairs(self, n: int = 8) -> list[GalleryPair]:
        """The ``n`` synthetic images nearest to a training image, with that image."""
        train_ds, syn_ds = self._images.get("train"), self._images.get("synthetic")
        if train_ds is None or syn_ds is None or len(self.synthetic) == 0:
            return []
        top = self.synthetic.sort_values(
            ["nearest_train_corr", "synthetic_id"], ascending=[False, True], kind="stable"
        ).head(n)
        train_pos = {tid: i for i, tid in enumerate(train_ds.ids)}
        syn_pos = {sid: i for i, sid in enumerate(syn_ds.ids)}
        pairs = []
        for row in top.itertuples(index=False):
            s_img = syn_ds[syn_pos[row.synthetic_id]][0].numpy()
            t_img = train_ds[train_pos[row.nearest_train_id]][0].numpy()
            pairs.append(
                GalleryPair(
                    s_img,
                    t_img,
                    float(row.nearest_train_corr),
                    row.synthetic_id,
                    row.nearest_train_id,
                )
            )
        return pairs

    def save(
        self,
        out: str | Path,
        *,
        overwrite: bool = False,
        figures: bool = True,
        report: bool = True,
        quality: dict[str, Any] | None = None,
    ) -> Path:
        """Write summary.json, training.csv, synthetic.csv, figures, report.html and (when
        the audit trained it) the detector, ``detector/``, to ``out``.

        The folder is built aside and moved into place at the end: a crash never leaves a
        half-written result. An existing folder is refused unless ``overwrite``.
        """
        out = Path(out)
        from medmem.data._sources import input_roots

        sources = [v for v in (self.summary.get("sources") or {}).values() if isinstance(v, str)]
        with (
            claim_output(out, inputs=input_roots(sources), overwrite=overwrite),
            atomic_dir(out, overwrite=overwrite) as tmp,
        ):
            atomic_write_json(tmp / "summary.json", self.summary)
            atomic_save(tmp / "training.csv", lambda p: self.training.to_csv(p, index=False))
            atomic_save(tmp / "synthetic.csv", lambda p: self.synthetic.to_csv(p, index=False))
            if self.detector is not None:
                # the verdict can be reproduced, and the detector reused (--detector DIR/detector)
                self.detector.save(tmp / "detector")
            if figures:
                plot_histogram(
                    self.training["nearest_val_corr"].to_numpy(),
                    self.training["nearest_synthetic_corr"].to_numpy(),
                    self.summary["tau"],
                    tmp / "histogram.png",
                    title=(
                        f"N_mem = {self.summary['n_mem']} of {self.summary['n_train']} "
                        f"training images; N_copies = {self.summary['n_copies']} of "
                        f"{self.summary['n_synthetic']} synthetic"
                    ),
                )
                pairs = self.gallery_pairs()
                if pairs:
                    plot_gallery(pairs, tmp / "gallery.png", tau=self.summary["tau"])
            if report:
                # the one import to the right of the audit: the report renders a result
                from medmem.report import write_report

                write_report(self, tmp, quality=quality)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> AuditResult:
        """Read an audit folder written by :meth:`save` (summary.json, training.csv,
        synthetic.csv), schema checked.

        Schema versions 1 and 2 are read; what version 1 lacks is derived (``tau_mem =
        tau``, ``calibration = "paper"``, ``summary["paper"]`` and the ``*_paper`` columns
        equal to the verdicts: version 1 used the paper's threshold). Identifier columns are
        str, verdicts bool, correlations float. A missing or corrupt file raises one
        :class:`InputError` naming the file.
        """
        folder = Path(directory)
        fix = (
            f"{folder} is not an audit folder; give the --out folder of `medmem audit` (it "
            "holds summary.json, training.csv and synthetic.csv), or run medmem audit again."
        )
        paths = {n: folder / n for n in ("summary.json", "training.csv", "synthetic.csv")}
        for p in paths.values():
            if not p.is_file():
                raise InputError(f"{p}: not found; {fix}")
        summary_path = paths["summary.json"]
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{summary_path}: not valid JSON ({exc}); {fix}") from None
        if not isinstance(summary, dict):
            raise InputError(f"{summary_path}: not a JSON object; {fix}")
        version = summary.get("schema_version")
        if version not in _READABLE_SCHEMAS:
            raise InputError(
                f"{summary_path}: schema_version {version!r} is not one this medmem reads "
                f"({', '.join(map(str, _READABLE_SCHEMAS))}); {fix}"
            )
        tau = summary.get("tau")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise InputError(f"{summary_path}: has no numeric 'tau'; {fix}")
        summary = dict(summary)
        training = _read_table(paths["training.csv"], TRAINING_COLUMNS, version, fix)
        synthetic = _read_table(paths["synthetic.csv"], SYNTHETIC_COLUMNS, version, fix)
        intervals = summary.get("intervals")
        if isinstance(intervals, dict) and "expected_chance_copies" in intervals:
            intervals = dict(intervals)  # one name per quantity: chance.expected_copies
            intervals["expected_copies"] = intervals.pop("expected_chance_copies")
            summary["intervals"] = intervals
        if version == 1:
            summary.setdefault("tau_mem", tau)
            summary.setdefault("calibration", "paper")
            if "paper" not in summary:
                summary["paper"] = {
                    k: summary[k]
                    for k in ("tau", "tau_mem", "percentile", "n_mem", "n_copies", "pct_mem",
                              "pct_copies", "chance")
                    if k in summary
                }  # fmt: skip
        return cls(summary, training, synthetic)


# schema versions of summary.json that AuditResult.load reads (1: before tau_mem/paper;
# 2: intervals.expected_chance_copies, read as intervals.expected_copies)
_READABLE_SCHEMAS = (1, 2, 3)
_FLOAT_COLUMNS = {
    "nearest_val_corr",
    "nearest_synthetic_corr",
    "nearest_train_corr",
    "identity_corr",
}
_BOOL_COLUMNS = {
    "memorized",
    "memorized_paper",
    "copy",
    "copy_paper",
    "patient_memorized",
    "identity",
    "patient_reidentified",
}
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _read_table(path: Path, columns: list[str], version: int, fix: str) -> pd.DataFrame:
    """training.csv or synthetic.csv, columns checked and typed: identifiers (and any other
    column) str, correlations float, verdicts bool (see AuditResult.load)."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not readable as CSV ({exc}); {fix}") from None
    # version 1 had no *_paper columns: its verdicts were the paper's
    derived = {c: c[: -len("_paper")] for c in columns if c.endswith("_paper")}
    if version == 1:
        for c, base in derived.items():
            if c not in df.columns and base in df.columns:
                df[c] = df[base]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; {fix}")
    for col in df.columns:
        values = df[col]
        if col in _FLOAT_COLUMNS:
            num = pd.to_numeric(values, errors="coerce").astype(float)
            bad = np.flatnonzero(num.isna().to_numpy() & (values.str.strip().str.lower() != "nan"))
            if bad.size:
                raise InputError(
                    f"{path} row {bad[0] + 1}: {col} is not a number ({values.iloc[bad[0]]!r}); "
                    f"{fix}"
                )
            df[col] = num
        elif col in _BOOL_COLUMNS:
            low = values.str.strip().str.lower()
            bad = np.flatnonzero(~low.isin(_TRUE | _FALSE).to_numpy())
            if bad.size:
                raise InputError(
                    f"{path} row {bad[0] + 1}: {col} is not True or False "
                    f"({values.iloc[bad[0]]!r}); {fix}"
                )
            df[col] = low.isin(_TRUE).astype(bool)
    return df.reset_index(drop=True)


def _chance(rho_chance: np.ndarray, tau: float, n_copies: int, n_syn: int, alpha: float) -> dict:
    rate = float(np.mean(rho_chance >= tau))
    return {
        "false_copy_rate": rate,
        "expected_copies": rate * n_syn,
        "excess_copies": n_copies - rate * n_syn,
        "method": "validation images (patients not in training) scored against the training "
        "set as if they were synthetic: the share at or above tau is the rate at which novel "
        "images are called copies; expected_copies = that rate x n_synthetic",
        "design_false_copy_rate": alpha,
    }


def _calibration_info(
    calibration: str,
    percentile: float,
    n_val: int,
    n_train: int,
    mem: _MemCalibration | None,
    m: int,
) -> dict[str, Any]:
    """What ``summary["calibration_info"]`` says: method, guarantee, assumption, n, bounds."""
    alpha = _alpha(percentile)
    if calibration == "paper":
        return {
            "name": "paper",
            "method": f"tau = tau_mem = the {percentile:g}th percentile (numpy linear) of the "
            "training images' nearest-validation correlations (Dar et al.)",
            "guarantee": "none that holds across set sizes: tau comes from maxima over n_val "
            "validation images but is compared with maxima over n_train training images "
            "(copies) and n_synthetic synthetic images (memorized), so novel images cross it "
            f"more often than {100 * alpha:g}% when the validation set is the smaller",
            "assumption": CALIBRATION_ASSUMPTION,
            "n": n_train,
        }
    r, j_lo, j_hi = _ranks(n_val, percentile)
    lo = max(0.0, alpha - 1 / (n_val + 1))
    if calibration == "conformal":
        method = (
            "tau: split-conformal quantile of the n validation images' nearest-training "
            "correlations (scores of the same form as the synthetic images' nearest-training "
            "correlations they are compared with): the order statistic of fractional rank "
            f"r = (n + 1)(1 - alpha) = {r:.6g}, interpolated linearly between s_(floor r) and "
            "s_(ceil r) (numpy quantile method 'weibull')"
        )
        guarantee = (
            "a novel image is called a copy with probability within [alpha - 1/(n + 1), "
            "alpha + 1/(n + 1)] (averaged over validation sets): alpha where the score "
            "distribution is locally linear around tau, at most alpha where its density "
            "decreases there (the upper tail)"
        )
        bounds = [lo, alpha + 1 / (n_val + 1)]
    else:
        method = (
            "tau: conservative split-conformal quantile of the n validation images' "
            "nearest-training correlations: the order statistic of rank ceil((n + 1)(1 - alpha))"
            f" = {j_hi}"
        )
        guarantee = (
            f"a novel image is called a copy with probability exactly (n + 1 - {j_hi}) / "
            f"(n + 1) = {(n_val + 1 - j_hi) / (n_val + 1):.4g} <= alpha (averaged over "
            "validation sets), above alpha - 1/(n + 1)"
        )
        bounds = [lo, alpha]
    info: dict[str, Any] = {
        "name": calibration,
        "method": method,
        "guarantee": guarantee,
        "assumption": CALIBRATION_ASSUMPTION,
        "n": n_val,
        "rank": r,
        "false_copy_rate_bounds": bounds,
    }
    if mem is not None:
        unbiased = m <= n_val
        info["tau_mem_method"] = (
            "smallest observed training-validation correlation t at which the estimated share "
            "of training images falsely called memorized is <= alpha, for m synthetic images "
            "none of which is a copy: with C[i, v] = corr(train i, val v) and k_i(t) = "
            "#{v: C[i, v] >= t}, "
            + (
                "mean_i [1 - C(n - k_i(t), m) / C(n, m)], the average over all m-subsets of "
                "the validation set (m <= n)"
                if unbiased
                else "1 - (1 - pbar(t))^m with pbar(t) the share of all training-validation "
                "pairs with C >= t (m > n)"
            )
        )
        info["tau_mem_guarantee"] = (
            "unbiased estimate of the false memorized rate at every t (m <= n), so the "
            "expected share of training images falsely called memorized is about alpha"
            if unbiased
            else "conservative: 1 - (1 - p)^m is concave, so pooling over training images "
            "overestimates the false memorized rate when they differ (Jensen); at most "
            "about alpha"
        )
        info["tau_mem_estimated_false_rate"] = mem.rate
        info["m"] = m
        info["top_k"] = mem.top_k
    return info


def _null_summary(
    rho_null: np.ndarray,
    rho_train_null: np.ndarray,
    tau: float,
    tau_mem: float,
    n_copies: int,
    n_mem: int,
    n_syn: int,
    confidence: float,
    chance: dict[str, Any],
) -> dict[str, Any]:
    """``summary["null_synthetic"]``: images of a generator that never saw the training set,
    scored like the synthetic images, as the chance level of generator outputs.

    ``rho_null``: each null image's nearest-training score; ``rho_train_null``: each
    training image's nearest-null score. Intervals: Wilson for the share above tau (scaled
    by n_synthetic), Newcombe's hybrid score interval for the excess (the audit's copies and
    the null images as two independent samples of generator outputs).
    """
    from medmem._stats import difference_interval, wilson_interval

    n, n_train = int(rho_null.size), int(rho_train_null.size)
    k = int((rho_null >= tau).sum())
    share = k / n
    lo, hi = wilson_interval(k, n, confidence)
    d_lo, d_hi = difference_interval(n_copies, n_syn, k, n, confidence)
    k_mem = int((rho_train_null >= tau_mem).sum())
    m_lo, m_hi = wilson_interval(k_mem, n_train, confidence)
    dm_lo, dm_hi = difference_interval(n_mem, n_train, k_mem, n_train, confidence)
    out: dict[str, Any] = {
        "n": n,
        "n_above_tau": k,
        "share_above_tau": share,
        "share_above_tau_ci": [lo, hi],
        "expected_copies": share * n_syn,
        "expected_copies_ci": [lo * n_syn, hi * n_syn],
        "excess_copies": n_copies - share * n_syn,
        "excess_copies_ci": [d_lo * n_syn, d_hi * n_syn],
        "n_mem": k_mem,
        "pct_mem": 100.0 * k_mem / n_train,
        "n_mem_ci": [m_lo * n_train, m_hi * n_train],
        "excess_mem": n_mem - k_mem,
        "excess_mem_ci": [dm_lo * n_train, dm_hi * n_train],
        "n_mem_comparable": n == n_syn,
        "validation_expected_copies": chance.get("expected_copies"),
        "validation_expected_copies_ci": chance.get("expected_copies_ci"),
        "confidence": confidence,
        "method": "images of a generator that never saw the training set (null_synthetic), "
        "scored against the training set exactly as the synthetic images (same score, tau); "
        "expected_copies = their share at or above tau x n_synthetic (Wilson interval); "
        "excess_copies = n_copies - expected_copies (Newcombe hybrid score interval for the "
        "difference of the two shares, x n_synthetic); n_mem = training images whose nearest "
        "null image reaches tau_mem, the chance level of n_mem when the null set has "
        "n_synthetic images (n_mem_comparable)",
    }
    return out


def audit_embeddings(
    train: np.ndarray,
    val: np.ndarray,
    synthetic: np.ndarray,
    *,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
    synthetic_ids: Sequence[str] | None = None,
    train_patient_ids: Sequence[str | None] | None = None,
    percentile: float = 95.0,
    calibration: str = "conformal",
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    controls: np.ndarray | None = None,
    control_sources: Sequence[int] | None = None,
    controls_info: dict[str, Any] | None = None,
    search: Near | None = None,
    null_synthetic: np.ndarray | None = None,
    null_ids: Sequence[str] | None = None,
) -> AuditResult:
    """Algorithm 1 on embeddings: calibrate tau and tau_mem, verdicts for both directions.

    Args:
        train, val, synthetic: (n, d) embeddings from one detector.
        train_ids, val_ids, synthetic_ids: names for the rows (default ``train00000``...).
        train_patient_ids: patient id per training image, copied to training.csv.
        percentile: q on the 0-100 scale (95, not 0.95); alpha = (100 - q) / 100 is the
            nominal false rate (0.05).
        calibration: ``"conformal"`` (default; novel images are called copies with
            probability about alpha whatever the set sizes), ``"conservative"`` (at most
            alpha) or ``"paper"`` (the paper's tau = percentile(nearest_val_corr, q), also
            used for memorized). The paper's threshold and counts are always reported in
            ``summary["paper"]`` and the ``*_paper`` columns.
        n_bootstrap: bootstrap replicates for the intervals (0 to skip).
        confidence: coverage of the intervals.
        seed: seed of the bootstrap (an integer >= 0).
        block_size: block size of the search (memory, not results).
        controls: embeddings of positive controls (known varied copies of training
            images), scored against the training set like synthetic images but kept out of
            N_copies and every output table; their catch rate at tau is reported.
        control_sources: training row each control was made from.
        controls_info: extra fields for ``summary["controls"]`` (how they were made).
        search: the pair scores: a function ``(a, b, k) -> (scores, rows)`` giving, for
            each row of set ``a``, its k best rows of set ``b`` (sets ``train``, ``val``,
            ``synthetic``, ``controls``), scores descending; :func:`audit` passes the
            aligned scores of :mod:`medmem.verify`. None: correlations of the embeddings
            (the paper's score).
        null_synthetic: embeddings of images from a generator that never saw the training
            set (set ``null`` of ``search``), scored like the synthetic images: their share
            at or above tau is the chance level of generator outputs,
            ``summary["null_synthetic"]`` (see :func:`_null_summary`).
        null_ids: names of the null rows (default ``null00000``...).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> tr, va = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
        >>> r = audit_embeddings(tr, va, tr[:3], n_bootstrap=0)
        >>> r.summary["n_copies"], r.summary["n_mem"]
        (3, 3)
    """
    t0 = time.perf_counter()
    args = check_audit_args(
        percentile=percentile,
        calibration=calibration,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
    )
    percentile, calibration = args["percentile"], args["calibration"]
    n_bootstrap, confidence, seed = args["n_bootstrap"], args["confidence"], args["seed"]
    tr_ids = _ids(train_ids, len(train), "train")
    va_ids = _ids(val_ids, len(val), "val")
    sy_ids = _ids(synthetic_ids, len(synthetic), "synthetic")
    e_tr = _standardize_named(train, "training embeddings", tr_ids)
    e_va = _standardize_named(val, "validation embeddings", va_ids)
    e_sy = _standardize_named(synthetic, "synthetic embeddings", sy_ids)
    if not (e_tr.shape[1] == e_va.shape[1] == e_sy.shape[1]):
        raise InputError(
            f"embedding sizes differ (train {e_tr.shape[1]}, val {e_va.shape[1]}, synthetic "
            f"{e_sy.shape[1]}): embed all three sets with the same detector."
        )
    _check_sizes(len(e_tr), len(e_va), percentile, calibration, n_synthetic=len(e_sy))
    if train_patient_ids is None:
        train_patient_ids = [None] * len(e_tr)

    sets = {"train": e_tr, "val": e_va, "synthetic": e_sy}

    def near_embedding(a: str, b: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        return nearest(sets[a], sets[b], k=k, block_size=block_size, standardized=True)

    near: Near = search if search is not None else near_embedding
    rho_val, idx_val = near("train", "val", 1)
    rho_syn, idx_syn = near("train", "synthetic", 1)
    rho_copy, idx_copy = near("synthetic", "train", 1)
    # the chance rate: validation images are novel, scored against training as if synthetic;
    # the same scores calibrate tau (conformal)
    rho_chance, _ = near("val", "train", 1)
    # float64 throughout, so that flags agree with the values written to the CSV files
    rho_val, rho_syn = rho_val[:, 0].astype(np.float64), rho_syn[:, 0].astype(np.float64)
    rho_copy, rho_chance = rho_copy[:, 0].astype(np.float64), rho_chance[:, 0].astype(np.float64)
    alpha = _alpha(percentile)
    n_train, n_val, n_syn = len(e_tr), len(e_va), len(e_sy)
    tau_paper = calibrate(rho_val, percentile, "paper")
    mem: _MemCalibration | None = None
    tau = tau_paper if calibration == "paper" else calibrate(rho_chance, percentile, calibration)
    if tau >= COLLAPSED_TAU:
        warnings.warn(
            f"tau = {tau:.4f}: novel (validation) images correlate almost perfectly with "
            "training images, so the detector's embeddings have collapsed (all images look "
            "alike to it) and no synthetic image can be called a copy. Retrain the detector "
            "(more epochs, another lr or arch; its final loss should be well below "
            "ln(2K - 1)).",
            category=MedmemWarning,
            stacklevel=2,
        )
    if calibration == "paper":
        tau_mem = tau_paper
    else:
        mem = _calibrate_memorized(
            near,
            n_train,
            n_val,
            n_syn,
            percentile,
            floor_rate=min(1.0, 4 * alpha) if n_bootstrap > 0 else None,
        )
        tau_mem = mem.tau_mem
    memorized = rho_syn >= tau_mem
    copy = rho_copy >= tau
    memorized_paper = rho_syn >= tau_paper
    copy_paper = rho_copy >= tau_paper

    training = pd.DataFrame(
        {
            "train_id": tr_ids,
            "patient_id": list(train_patient_ids),
            "nearest_val_id": [va_ids[j] for j in idx_val[:, 0]],
            "nearest_val_corr": rho_val,
            "nearest_synthetic_id": [sy_ids[j] for j in idx_syn[:, 0]],
            "nearest_synthetic_corr": rho_syn,
            "memorized": memorized,
            "memorized_paper": memorized_paper,
        },
        columns=TRAINING_COLUMNS,
    )
    synthetic_df = pd.DataFrame(
        {
            "synthetic_id": sy_ids,
            "nearest_train_id": [tr_ids[j] for j in idx_copy[:, 0]],
            "nearest_train_corr": rho_copy,
            "copy": copy,
            "copy_paper": copy_paper,
        },
        columns=SYNTHETIC_COLUMNS,
    )
    n_mem, n_copies = int(memorized.sum()), int(copy.sum())
    n_mem_p, n_copies_p = int(memorized_paper.sum()), int(copy_paper.sum())
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "medmem_version": __version__,
        "calibration": calibration,
        "alpha": alpha,
        "tau": tau,
        "tau_mem": tau_mem,
        "percentile": percentile,
        "n_train": n_train,
        "n_val": n_val,
        "n_synthetic": n_syn,
        "n_mem": n_mem,
        "n_copies": n_copies,
        "pct_mem": 100.0 * n_mem / n_train,
        "pct_mem_denominator": "n_train",
        "pct_copies": 100.0 * n_copies / n_syn,
        "pct_copies_denominator": "n_synthetic",
        "embedding_dim": int(e_tr.shape[1]),
        "calibration_info": _calibration_info(calibration, percentile, n_val, n_train, mem, n_syn),
    }
    summary["chance"] = _chance(rho_chance, tau, n_copies, n_syn, alpha)
    summary["paper"] = {
        "tau": tau_paper,
        "tau_mem": tau_paper,
        "percentile": percentile,
        "method": f"the paper's threshold: the {percentile:g}th percentile (numpy linear) of "
        "the training images' nearest-validation correlations, for copies and memorized",
        "n_mem": n_mem_p,
        "n_copies": n_copies_p,
        "pct_mem": 100.0 * n_mem_p / n_train,
        "pct_copies": 100.0 * n_copies_p / n_syn,
        "chance": _chance(rho_chance, tau_paper, n_copies_p, n_syn, alpha),
    }
    patients = _patient_summary(training)
    if patients is not None:
        summary["patients"] = patients
        mem_patients = set(training.loc[training["memorized"], "patient_id"])
        training["patient_memorized"] = training["patient_id"].isin(mem_patients)
    if controls is not None and len(controls) > 0:
        if control_sources is None or len(control_sources) != len(controls):
            raise InputError("control_sources must give one training row per control.")
        e_ctrl = _standardize_named(
            controls, "control embeddings", [f"control{i}" for i in range(len(controls))]
        )
        sets["controls"] = e_ctrl
        rho_ctrl, idx_ctrl = near("controls", "train", 1)
        summary["controls"] = _controls_summary(
            rho_ctrl[:, 0].astype(np.float64),
            idx_ctrl[:, 0],
            np.asarray(control_sources),
            tau,
            list(train_patient_ids),
            controls_info,
        )
    if n_bootstrap > 0:
        summary["intervals"] = _bootstrap(
            rho_val,
            rho_syn,
            rho_copy,
            rho_chance,
            percentile,
            n_bootstrap,
            confidence,
            seed,
            calibration,
            mem,
        )
        summary["chance"]["expected_copies_ci"] = summary["intervals"]["expected_copies"]
        summary["chance"]["excess_copies_ci"] = summary["intervals"]["excess_copies"]
    if null_synthetic is not None:
        e_null = _standardize_named(
            null_synthetic,
            "null synthetic embeddings",
            _ids(null_ids, len(null_synthetic), "null"),
        )
        if len(e_null) == 0 or e_null.shape[1] != e_tr.shape[1]:
            raise InputError(
                "null_synthetic: give at least one image, embedded with the same detector as "
                "the other sets."
            )
        sets["null"] = e_null
        rho_null, _ = near("null", "train", 1)
        rho_train_null, _ = near("train", "null", 1)
        summary["null_synthetic"] = _null_summary(
            rho_null[:, 0].astype(np.float64),
            rho_train_null[:, 0].astype(np.float64),
            tau,
            tau_mem,
            n_copies,
            n_mem,
            n_syn,
            confidence,
            summary["chance"],
        )
    summary["timings_s"] = {"search_and_calibration": round(time.perf_counter() - t0, 3)}
    return AuditResult(summary=summary, training=training, synthetic=synthetic_df)


def _check_datasets(train: Any, val: Any, synthetic: Any) -> None:
    sets = {"training": train, "validation": val, "synthetic": synthetic}
    for name, ds in sets.items():
        check_dataset(ds, f"{name} set", needs=("spatial_dims", "content_hash", "__len__"))
    dims = {name: ds.spatial_dims for name, ds in sets.items()}
    if len(set(dims.values())) > 1:
        detail = ", ".join(f"{k} {v}D" for k, v in dims.items())
        raise InputError(
            f"2D and 3D images are mixed across the sets ({detail}): audit sets of one kind."
        )
    sizes = {name: tuple(ds.image_size) for name, ds in sets.items()}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise InputError(
            f"the sets are preprocessed to different sizes ({detail}): load them with the same "
            "image_size."
        )


def _check_null_dataset(train: Any, null: Any) -> None:
    """The null synthetic set: a dataset of the training set's kind and size."""
    check_dataset(null, "null synthetic set", needs=("spatial_dims", "content_hash", "__len__"))
    if len(null) == 0:
        raise InputError("the null synthetic set is empty: give at least one image.")
    if null.spatial_dims != train.spatial_dims or tuple(null.image_size) != tuple(train.image_size):
        raise InputError(
            f"the null synthetic set ({null.spatial_dims}D, {tuple(null.image_size)}) differs "
            f"from the training set ({train.spatial_dims}D, {tuple(train.image_size)}): load "
            "it with the same image_size."
        )


def check_patient_overlap(train: Any, val: Any, *, allow: bool = False) -> int:
    """Raise when training and validation share patients or images (unless ``allow``).

    tau must be calibrated on patients the generator never saw: a shared patient (or the
    same image in both sets, found by content hash) makes nearest-validation correlations
    high and tau too strict. Returns the number of shared patients.
    """
    fix = "Split by patient, or pass allow_patient_overlap=True (--allow-patient-overlap)"
    t_ids = {p for p in getattr(train, "patient_ids", []) if p is not None}
    v_ids = {p for p in getattr(val, "patient_ids", []) if p is not None}
    shared = sorted(t_ids & v_ids)
    if shared and not allow:
        raise InputError(
            f"{len(shared)} patients are in both the training and validation sets (e.g. "
            f"{shared[0]!r}). {fix} if you know why."
        )
    if not allow:
        t_hash = {train.content_hash(i): i for i in range(len(train))}
        same = [(t_hash[h], j) for j in range(len(val)) if (h := val.content_hash(j)) in t_hash]
        if same:
            i, j = same[0]
            raise InputError(
                f"{len(same)} images are in both the training and validation sets (e.g. "
                f"training {train.ids[i]!r} = validation {val.ids[j]!r}, same content). "
                f"{fix} if you know why."
            )
    return len(shared)


def audit(
    train: Any,
    val: Any,
    synthetic: Any,
    *,
    detector: Any = None,
    percentile: float = 95.0,
    calibration: str = "conformal",
    allow_patient_overlap: bool = False,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    detector_overrides: dict[str, Any] | None = None,
    n_controls: int = 100,
    control_kinds: Sequence[str] | None = None,
    quiet: bool = False,
    checkpoint_dir: str | Path | None = None,
    score: str = "aligned",
    align: AlignConfig | None = None,
    identity_detector: Any = None,
    null_synthetic: Any = None,
) -> AuditResult:
    """Audit a synthetic set against the training set it may have copied.

    Embeds the three sets with ``detector`` (trained on ``train`` first when None), calibrates
    tau on ``val`` (patients not in training) and applies Algorithm 1.

    Args:
        train, val, synthetic: medmem datasets (``medmem.load_dataset``) of one kind.
        detector: a trained ``medmem.Detector`` (a saved one: ``medmem.Detector.load(dir)``);
            None trains one on ``train``.
        percentile: q on the 0-100 scale (95, not 0.95); alpha = (100 - q) / 100 is the
            nominal false rate.
        calibration: ``"conformal"`` (default), ``"conservative"`` or ``"paper"``; see
            :func:`audit_embeddings` and docs/calibration.md.
        allow_patient_overlap: do not refuse training/validation sets sharing patients.
        n_bootstrap, confidence, seed: bootstrap intervals.
        cache_dir: where embeddings are cached (by detector and file content).
        batch_size, num_workers: embedding DataLoader settings.
        detector_overrides: DetectorConfig fields for a detector trained here.
        n_controls: positive controls: this many seeded changed copies of training images
            (by default changes the detector never trained on, see :func:`make_controls`)
            are embedded and scored like synthetic images, never counted in N_copies or
            listed; their catch rate at tau is the audit's measured sensitivity (0 to skip).
        control_kinds: variation kinds of the controls (``medmem.detector.VARIATION_KINDS``);
            default: the held-out kinds.
        quiet: no progress bars.
        checkpoint_dir: when the detector is trained here, its checkpoints are kept under
            this folder (one subfolder per training set and settings), so a rerun after a
            kill resumes training; ``medmem audit`` keeps them beside ``--out``.
        score: ``"aligned"`` (default): the detector's embeddings pick each image's
            candidate training images and every candidate pair is scored by its aligned
            normalized cross-correlation (:mod:`medmem.verify`; catches shifted, zoomed and
            partly replaced copies the embedding scores low); ``"embedding"``: the
            correlation of the embeddings, as the paper.
        align: settings of the aligned score (:class:`medmem.verify.AlignConfig`).
        identity_detector: a detector trained with ``objective="identity"``: adds the
            identity section (nearest training patient and identity score per synthetic
            image, a calibrated identity threshold, re-identified patients; summary key
            ``identity``, see :func:`medmem._identity.identity_section`). Needs the training
            images' patient ids.
        null_synthetic: a dataset of images sampled from a generator that never saw the
            training set (e.g. the same configuration trained on other patients). Scored
            exactly like ``synthetic`` (same score and tau), never counted in N_copies: its
            share at or above tau x n_synthetic is the chance level of generator outputs,
            reported with the excess of N_copies over it in ``summary["null_synthetic"]``
            beside the validation-based ``summary["chance"]``.

    Example:
        >>> import medmem
        >>> result = medmem.audit(train, val, synthetic, detector=det)  # doctest: +SKIP
        >>> result.summary["n_copies"]  # doctest: +SKIP
    """
    from medmem.detector import Detector

    t0 = time.perf_counter()
    args = check_audit_args(
        percentile=percentile,
        calibration=calibration,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        n_controls=n_controls,
        control_kinds=control_kinds,
        detector=detector,
        score=score,
    )
    percentile, calibration = args["percentile"], args["calibration"]
    n_bootstrap, confidence, seed = args["n_bootstrap"], args["confidence"], args["seed"]
    n_controls, control_kinds = args["n_controls"], args["control_kinds"]
    _check_datasets(train, val, synthetic)
    if null_synthetic is not None:
        _check_null_dataset(train, null_synthetic)
    if score == "aligned":
        align = (align or AlignConfig()).resolved(int(train.spatial_dims))
    n_overlap = check_patient_overlap(train, val, allow=allow_patient_overlap)
    _check_sizes(len(train), len(val), percentile, calibration, n_synthetic=len(synthetic))
    check_inputs(
        train, val, synthetic, detector=detector, allow_overlap=allow_patient_overlap, quiet=quiet
    )
    if getattr(getattr(detector, "config", None), "objective", "copy") == "identity":
        warnings.warn(
            "the copy detector was trained with objective='identity': its copy scores then "
            "also rise for other images of a training patient. Pass it as identity_detector "
            "(--identity-detector) and a copy detector as detector.",
            MedmemWarning,
            stacklevel=2,
        )
    if identity_detector is not None:
        from medmem._identity import check_identity_detector

        check_identity_detector(identity_detector)
        if not train.has_patient_ids:
            raise InputError(
                "identity_detector needs the patient id of every training image; load the "
                "training images with patient ids (--patient-id-pattern, or a manifest with "
                "a patient_id column)."
            )
    timings: dict[str, float] = {}
    if detector is None:
        t = time.perf_counter()
        overrides = dict(detector_overrides or {})
        overrides.setdefault("spatial_dims", train.spatial_dims)
        overrides.setdefault("image_size", tuple(train.image_size))
        ckpt = checkpoint_for(checkpoint_dir, train, overrides)
        detector = Detector.train(train, quiet=quiet, checkpoint_dir=ckpt, **overrides)
        timings["detector_training"] = round(time.perf_counter() - t, 3)
        trained_here = True
    else:
        trained_here = False
    t = time.perf_counter()
    kw = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "cache_dir": cache_dir,
        "quiet": quiet,
    }
    e_tr = detector.embed(train, **kw)
    e_va = detector.embed(val, **kw)
    e_sy = detector.embed(synthetic, **kw)
    e_null = None if null_synthetic is None else detector.embed(null_synthetic, **kw)
    timings["embedding"] = round(time.perf_counter() - t, 3)
    e_ctrl, ctrl_src, ctrl_info, ctrl_img = None, None, None, None
    if n_controls > 0:
        from medmem.data import ArrayDataset

        t = time.perf_counter()
        ctrl_img, ctrl_src, ctrl_info = control_images(
            train, detector, n_controls=n_controls, kinds=control_kinds, seed=seed
        )
        e_ctrl = detector.embed(ArrayDataset(ctrl_img), batch_size=batch_size, quiet=quiet)
        timings["controls"] = round(time.perf_counter() - t, 3)
    search = None
    if score == "aligned":
        t = time.perf_counter()
        assert align is not None
        size = int(align.size or 32)
        train_2x = stack_images(train, 2 * size)  # read once: views and candidates
        scorer = AlignedScorer(train_2x, align)
        small = {
            "train": scorer.small(train_2x),
            "val": stack_images(val, size),
            "synthetic": stack_images(synthetic, size),
        }
        emb = {"train": e_tr, "val": e_va, "synthetic": e_sy}
        if ctrl_img is not None and e_ctrl is not None:
            small["controls"] = scorer.small(torch.from_numpy(ctrl_img))
            emb["controls"] = e_ctrl
        if e_null is not None:
            small["null"] = stack_images(null_synthetic, size)
            emb["null"] = e_null
        search = AlignedSearch(scorer, small, emb, groups=train.patient_ids)
        if align.coarse_candidates and not search.coarse_used:
            logger.info(
                "coarse aligned search skipped: %d pairs > align.coarse_max_pairs=%d "
                "(shifted or cropped copies rely on the detector's candidates)",
                search.coarse_pairs,
                align.coarse_max_pairs,
            )
        timings["verification_setup"] = round(time.perf_counter() - t, 3)
    result = audit_embeddings(
        e_tr,
        e_va,
        e_sy,
        train_ids=train.ids,
        val_ids=val.ids,
        synthetic_ids=synthetic.ids,
        train_patient_ids=train.patient_ids,
        percentile=percentile,
        calibration=calibration,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        controls=e_ctrl,
        control_sources=ctrl_src,
        controls_info=ctrl_info,
        search=search,
        null_synthetic=e_null,
        null_ids=None if null_synthetic is None else null_synthetic.ids,
    )
    s = result.summary
    s["score"] = _score_summary(score, align, search)
    timings.update(s.pop("timings_s"))
    timings["total"] = round(time.perf_counter() - t0, 3)
    s["spatial_dims"] = int(train.spatial_dims)
    s["image_size"] = list(train.image_size)
    s["patient_overlap"] = patient_overlap_status(train, val, n_overlap)
    s["n_patients_shared_train_val"] = None if s["patient_overlap"] == "unknown" else n_overlap
    s["fingerprints"] = {
        "detector": detector.fingerprint,
        "detector_training_set": getattr(detector, "train_fingerprint_", None),
        "training_set": train.fingerprint(),
        "validation_set": val.fingerprint(),
        "synthetic_set": synthetic.fingerprint(),
    }
    s["sources"] = {
        name: getattr(ds, "source", None)
        for name, ds in (("training", train), ("validation", val), ("synthetic", synthetic))
    }
    if null_synthetic is not None:
        s["fingerprints"]["null_synthetic_set"] = null_synthetic.fingerprint()
        s["sources"]["null_synthetic"] = getattr(null_synthetic, "source", None)
    s["skipped_files"] = [
        {"set": name, **item}
        for name, ds in (("training", train), ("validation", val), ("synthetic", synthetic))
        for item in getattr(ds, "skipped", [])
    ]
    s["detector"] = _detector_summary(detector, trained_here)
    s["preprocessing"] = _preprocessing_summary(train, val, synthetic)
    s["settings"] = {
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "allow_patient_overlap": allow_patient_overlap,
        "n_controls": n_controls,
    }
    if identity_detector is not None:
        from medmem._identity import add_identity, identity_section

        t = time.perf_counter()
        emb_id = [identity_detector.embed(ds, **kw) for ds in (train, val, synthetic)]
        block, columns, flag = identity_section(
            *emb_id,
            train.patient_ids,
            train_ids=train.ids,
            percentile=percentile,
            calibration=calibration,
        )
        block["detector"] = {
            "fingerprint": identity_detector.fingerprint,
            "source": getattr(identity_detector, "source_", None),
            "training": getattr(identity_detector, "identity_training_", None),
        }
        add_identity(result, block, columns, flag)
        timings["identity"] = round(time.perf_counter() - t, 3)
    s["timings_s"] = timings
    result._images = {"train": train, "synthetic": synthetic}
    if trained_here:
        result.detector = detector
    return result


def _score_summary(
    score: str, align: AlignConfig | None, search: AlignedSearch | None
) -> dict[str, Any]:
    """What the correlations in the tables are (summary.json["score"])."""
    if score == "embedding" or align is None:
        return {
            "method": "embedding",
            "description": "Pearson correlation of the detector's embeddings (the paper's)",
        }
    return {
        "method": "aligned",
        "description": "normalized cross-correlation (of the images and of their high-passed "
        "copies) after the best alignment (flips, rotations, zooms, shifts) of the training "
        "image, per tile, the worst tile left out, minus background x the image's mean over "
        "its 2nd to (1 + background_ranks)-th best candidates; candidate pairs from the "
        "detector's embeddings, the pixels (also of the mirrored image) and a coarse aligned "
        "search over every pair (when coarse_used); with plain_used, the larger of that and "
        "the plain aligned NCC (of the images alone, without their high-passed copies) minus "
        "background x its own background, mapped onto the aligned score's scale by matching "
        "the two channels' nulls (likewise the unaligned Pearson correlation of the images "
        "with unaligned_used; null: median and 95th percentile minus median of each "
        "channel's best score of every training image against the training images of other "
        "patients)",
        **align.to_dict(),  # every setting of the score, by its AlignConfig name
        # the coarse search's size, and whether it ran (off above coarse_max_pairs)
        "coarse_pairs": search.coarse_pairs if search is not None else None,
        "coarse_used": search.coarse_used if search is not None else None,
        "n_views": search.scorer.n_views if search is not None else None,
        "n_pairs_scored": search.n_pairs if search is not None else None,
        # the plain and unaligned channels: whether each ran (off below verify.MIN_NULL
        # training images)
        "plain_used": search.plain_used if search is not None else None,
        "unaligned_used": search.unaligned_used if search is not None else None,
        "null": _channel_null_summary(search),
    }


def _channel_null_summary(search: AlignedSearch | None) -> dict[str, dict[str, float]] | None:
    """The training set's null of each channel (median, scale), when the plain or the
    unaligned channel ran."""
    null = None if search is None else search.null()
    if null is None:
        return None
    return {k: {"median": round(m, 6), "scale": round(sc, 6)} for k, (m, sc) in null.items()}


def _detector_summary(detector: Any, trained_here: bool) -> dict[str, Any]:
    """What the verdict rests on: the detector's settings and how long it trained."""
    c = getattr(detector, "config", None)
    if c is None:  # a duck-typed embedder (e.g. pixels): nothing more to say
        return {"trained_here": trained_here, "kind": type(detector).__name__}
    probe = detector.probe_history_[-1] if detector.probe_history_ else None
    return {
        "trained_here": trained_here,
        "saved_to": "detector/" if trained_here else None,
        "arch": c.arch,
        "image_size": list(c.image_size),
        "input_size": list(c.encoder_input_size),
        "embed_dim": c.embed_dim,
        "variations": list(c.variations.kinds),
        "max_epochs": c.epochs,
        "epochs_trained": detector.epochs_trained,
        "stopped_early": detector.stopped_early_,
        "final_loss": detector.loss_history_[-1] if detector.loss_history_ else None,
        "final_probe": probe,
    }


def _preprocessing_summary(*datasets: Any) -> dict[str, Any]:
    """How raw images became tensors, and the raw shapes seen (so a lost field of view shows)."""
    pre = getattr(datasets[0], "preprocess", None)
    shapes = [tuple(sh) for ds in datasets for sh in getattr(ds, "shapes", [])]
    out: dict[str, Any] = {
        "image_size": list(datasets[0].image_size),
        "spatial_mode": getattr(pre, "spatial_mode", None),
        "description": pre.describe() if pre is not None else "arrays given as they are",
    }
    if shapes and len({len(sh) for sh in shapes}) == 1:
        arr = np.asarray(shapes)
        out["raw_shape_min"] = arr.min(axis=0).tolist()
        out["raw_shape_max"] = arr.max(axis=0).tolist()
    return out


def calibration_sentence(s: dict[str, Any]) -> str:
    """One sentence on what the calibration guarantees, e.g. for conformal: "a novel image is
    called a copy with probability about 0.05 (conformal, 150 validation images; assumes
    novel images exchangeable with validation images)"."""
    name = s.get("calibration", "paper")
    alpha = s.get("alpha", (100.0 - float(s.get("percentile", 95.0))) / 100.0)
    n_val = s.get("n_val", "?")
    where = "assumes novel images exchangeable with validation images"
    if name == "conformal":
        return (
            f"a novel image is called a copy with probability about {alpha:g} (conformal, "
            f"{n_val} validation images; {where})"
        )
    if name == "conservative":
        return (
            f"a novel image is called a copy with probability at most {alpha:g} "
            f"(conservative, {n_val} validation images; {where})"
        )
    return (
        f"the paper's calibration: the rate at which novel images are called copies depends "
        f"on the set sizes and exceeds the nominal {alpha:g} when the validation set "
        f"({n_val} images) is smaller than the training set; no guarantee"
    )


SENSITIVITY_FLOOR = 0.8  # below it the detector misses too many known copies to be trusted


def low_sensitivity_warning(summary: dict[str, Any]) -> str | None:
    """The warning for an audit whose measured control sensitivity is below
    :data:`SENSITIVITY_FLOOR` (a near-blind detector: few copies found means little), or
    None (no controls, or sensitivity at or above the floor)."""
    c = summary.get("controls")
    if not isinstance(c, dict) or not isinstance(c.get("sensitivity"), (int, float)):
        return None
    sens = float(c["sensitivity"])
    if sens >= SENSITIVITY_FLOOR:
        return None
    return (
        f"WARNING: the detector caught only {sens:.0%} of the positive controls (measured "
        f"sensitivity {sens:.2f} < {SENSITIVITY_FLOOR}): it misses many copies, so a low "
        "N_copies does not show the synthetic set is safe. Train the detector longer or on "
        "more images (more --epochs, a larger --image-size), then audit again."
    )


def format_verdict(s: dict[str, Any]) -> str:
    """The audit's verdict as a few plain lines."""
    ci = s.get("intervals", {})

    def rng(key: str, fmt: str = "{:.0f}") -> str:
        if key not in ci:
            return ""
        lo, hi = ci[key]
        return f" (95% CI {fmt.format(lo)}-{fmt.format(hi)})"

    name = s.get("calibration", "paper")
    paper_def = f"{s['percentile']:g}th percentile of train->nearest-val correlations, the paper's"
    lines = [f"calibration: {name}: {calibration_sentence(s)}"]
    score = s.get("score")
    if isinstance(score, dict) and score.get("method") == "aligned":
        lines.append(
            "score: aligned (correlation after the best flip/rotation/zoom/shift of each "
            "candidate training image, tile by tile, minus half the image's background; "
            "--score embedding for the paper's)"
        )
    elif isinstance(score, dict):
        lines.append("score: embedding correlation (the paper's)")
    if name == "paper":
        lines.append(
            f"tau = tau_mem = {s['tau']:.4f} ({paper_def}){rng('tau', '{:.4f}')}: copies "
            "and memorized images both at or above it"
        )
    else:
        lines += [
            f"tau     = {s['tau']:.4f} (copies: synthetic images whose nearest training "
            f"image correlates >= tau){rng('tau', '{:.4f}')}",
            f"tau_mem = {s.get('tau_mem', s['tau']):.4f} (memorized: training images whose "
            f"nearest synthetic image correlates >= tau_mem){rng('tau_mem', '{:.4f}')}",
        ]
    lines += [
        f"N_mem    = {s['n_mem']} of {s['n_train']} training images "
        f"({s['pct_mem']:.1f}% of n_train){rng('n_mem')}",
        f"N_copies = {s['n_copies']} of {s['n_synthetic']} synthetic images "
        f"({s['pct_copies']:.1f}% of n_synthetic){rng('n_copies')}",
    ]
    if "chance" in s:
        c = s["chance"]
        lines.append(
            f"  expected by chance if none were copies: {c['expected_copies']:.1f}"
            f"{rng('expected_copies', '{:.1f}')}; excess {c['excess_copies']:+.1f}"
            f"{rng('excess_copies', '{:+.1f}')}"
        )
    null = s.get("null_synthetic")
    if isinstance(null, dict) and "expected_copies" in null:
        conf = 100 * float(null.get("confidence", 0.95))

        def pair(v: Any, fmt: str) -> str:
            return f" ({conf:g}% CI {fmt.format(v[0])}-{fmt.format(v[1])})" if v else ""

        lines.append(
            f"  expected from a generator that never saw the training set (null synthetic, "
            f"{null['n_above_tau']} of {null['n']} above tau): "
            f"{null['expected_copies']:.1f}{pair(null.get('expected_copies_ci'), '{:.1f}')}; "
            f"excess {null['excess_copies']:+.1f}"
            f"{pair(null.get('excess_copies_ci'), '{:+.1f}')}; N_mem at chance "
            f"{null['n_mem']}"
        )
    paper = s.get("paper")
    if name != "paper" and isinstance(paper, dict):
        chance = paper.get("chance") or {}
        expected = (
            f"; expected by chance {chance['expected_copies']:.1f}"
            if "expected_copies" in chance
            else ""
        )
        lines.append(
            f"paper's tau = {paper['tau']:.4f} ({paper_def}), for comparison: "
            f"N_mem = {paper['n_mem']} ({paper['pct_mem']:.1f}% of n_train), N_copies = "
            f"{paper['n_copies']} ({paper['pct_copies']:.1f}% of n_synthetic){expected}"
        )
    if "patients" in s:
        p = s["patients"]
        lines.append(
            f"patients with a memorized image: {p['n_patients_mem']} of "
            f"{p['n_train_patients']} ({p['pct_patients_mem']:.1f}% of training patients)"
        )
    if isinstance(s.get("identity"), dict):
        d = s["identity"]
        lines.append(
            f"identity (same patient, not a copy): {d['n_synthetic_identity']} of "
            f"{s['n_synthetic']} synthetic images re-identify a training patient "
            f"(tau_identity = {d['tau_identity']:.4f}; expected by chance "
            f"{d['expected_by_chance']:.1f}); {d['n_patients_reidentified']} of "
            f"{d['n_train_patients']} training patients re-identified"
        )
    if "controls" in s:
        c = s["controls"]
        lo, hi = c["sensitivity_ci"]
        lines.append(
            f"positive controls caught: {c['caught']} of {c['n']} (measured sensitivity "
            f"{c['sensitivity']:.2f}, 95% CI {lo:.2f}-{hi:.2f})"
        )
        if c.get("per_kind"):
            held = "held out of training" if c.get("held_out_kinds") else "trained on"
            kinds = ", ".join(f"{k} {v['caught']}/{v['n']}" for k, v in c["per_kind"].items())
            lines.append(f"  per change kind ({held}): {kinds}")
    warning = low_sensitivity_warning(s)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


__all__ = [
    "SCHEMA_VERSION",
    "SYNTHETIC_COLUMNS",
    "TRAINING_COLUMNS",
    "CALIBRATIONS",
    "AuditResult",
    "audit",
    "audit_embeddings",
    "calibration_sentence",
    "check_audit_args",
    "check_calibration",
    "check_patient_overlap",
    "format_verdict",
    "low_sensitivity_warning",
    "SENSITIVITY_FLOOR",
    "make_controls",
    "control_images",
    "calibrate",
    "min_calibration_size",
]
