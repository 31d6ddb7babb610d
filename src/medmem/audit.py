"""The audit: calibrate tau on held-out patients, then count memorized and copied images.

Definitions (DESIGN.md, from the paper's section 4.2.2 and Algorithm 1):

- ``nearest_val_corr[i]``: max over validation images of corr(train i, val).
- ``nearest_synthetic_corr[i]``: max over synthetic images of corr(train i, synthetic).
- ``tau = percentile(nearest_val_corr, q)``, q = 95 by default (linear interpolation, as
  ``numpy.percentile``).
- training image i is *memorized* when ``nearest_synthetic_corr[i] >= tau``; ``n_mem``.
- synthetic image s is a *copy* when ``nearest_train_corr[s] >= tau``; ``n_copies``.
- ``pct_mem = 100 * n_mem / n_train``; ``pct_copies = 100 * n_copies / n_synthetic``.

``audit_embeddings`` is the pure algorithm on arrays; ``audit`` is the pipeline that embeds
datasets with a detector first.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medmem import __version__
from medmem._errors import InputError
from medmem._io import atomic_dir, atomic_save, atomic_write_json
from medmem._plots import GalleryPair, plot_gallery, plot_histogram
from medmem._validation import check_embeddings, check_in_range, check_positive_int
from medmem.search import DEFAULT_BLOCK_SIZE, nearest, standardize

SCHEMA_VERSION = 1
TRAINING_COLUMNS = [
    "train_id",
    "patient_id",
    "nearest_val_id",
    "nearest_val_corr",
    "nearest_synthetic_id",
    "nearest_synthetic_corr",
    "memorized",
]
SYNTHETIC_COLUMNS = ["synthetic_id", "nearest_train_id", "nearest_train_corr", "copy"]


# tau at or above this means the detector cannot tell images apart
COLLAPSED_TAU = 0.999


def min_calibration_size(percentile: float) -> int:
    """Fewest values for which the q-th percentile is set by data, not by the sample maximum.

    With n values, percentiles above 100 * (n - 1) / n interpolate towards the largest value
    alone; q = 95 needs n >= 20.
    """
    return max(2, math.ceil(100.0 / (100.0 - percentile)))


def calibrate(nearest_val_corr: np.ndarray, percentile: float = 95.0) -> float:
    """tau = the ``percentile``-th percentile of training-to-nearest-validation correlations.

    Example:
        >>> calibrate(np.arange(21) / 20, 95)
        0.95
    """
    percentile = check_in_range(percentile, "percentile", 0.0, 100.0, high_open=True)
    values = np.asarray(nearest_val_corr, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise InputError("nearest_val_corr must be a non-empty 1-d array.")
    if not np.isfinite(values).all():
        raise InputError("nearest_val_corr contains NaN or infinity.")
    return float(np.percentile(values, percentile))


def _check_sizes(n_train: int, n_val: int, percentile: float) -> None:
    need = min_calibration_size(percentile)
    if n_train < need:
        raise InputError(
            f"{n_train} training images are too few to calibrate the {percentile:g}th "
            f"percentile: tau would be set by the largest value alone. Give at least {need} "
            f"training images, or lower --percentile (e.g. {100 - 100 / max(n_train, 2):.0f})."
        )
    if n_val < need:
        raise InputError(
            f"{n_val} validation images are too few to calibrate tau at the {percentile:g}th "
            f"percentile (need at least {need}). Add held-out patients' images to the "
            "validation set."
        )
    if n_val < n_train / 10:
        warnings.warn(
            f"The validation set ({n_val}) is much smaller than the training set ({n_train}): "
            "nearest-validation correlations run low, so tau is low and more synthetic "
            "images are called copies. Use a validation set of comparable size if you can.",
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


def _bootstrap(
    rho_val: np.ndarray,
    rho_syn: np.ndarray,
    rho_copy: np.ndarray,
    rho_chance: np.ndarray,
    percentile: float,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Percentile bootstrap over training, validation and synthetic images.

    Each replicate resamples training images with replacement and recomputes tau from their
    nearest-validation correlations; at that tau it counts memorized training images,
    copied synthetic images (resampled too), and the chance rate: the share of (resampled)
    validation images whose nearest training image correlates >= tau. The intervals so
    carry both the threshold's and the counts' sampling uncertainty.
    """
    rng = np.random.default_rng(seed)
    n_train, n_syn, n_val = rho_val.size, rho_copy.size, rho_chance.size
    taus = np.empty(n_bootstrap)
    n_mem = np.empty(n_bootstrap)
    n_copies = np.empty(n_bootstrap)
    chance_rate = np.empty(n_bootstrap)
    chunk = max(1, min(n_bootstrap, 20_000_000 // max(n_train, n_syn, n_val)))
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        sl = slice(start, start + b)
        it = rng.integers(0, n_train, size=(b, n_train))
        t = np.percentile(rho_val[it], percentile, axis=1)
        taus[sl] = t
        n_mem[sl] = (rho_syn[it] >= t[:, None]).sum(1)
        js = rng.integers(0, n_syn, size=(b, n_syn))
        n_copies[sl] = (rho_copy[js] >= t[:, None]).sum(1)
        vs = rng.integers(0, n_val, size=(b, n_val))
        chance_rate[sl] = (rho_chance[vs] >= t[:, None]).mean(1)
    alpha = (1.0 - confidence) / 2.0
    qs = [100 * alpha, 100 * (1 - alpha)]

    def interval(x: np.ndarray) -> list[float]:
        lo, hi = np.percentile(x, qs)
        return [float(lo), float(hi)]

    ci_mem, ci_copies = interval(n_mem), interval(n_copies)
    expected = chance_rate * n_syn
    return {
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "method": "percentile bootstrap over training images (tau, n_mem), synthetic images "
        "(n_copies) and validation images (chance rate), tau recomputed in every replicate",
        "tau": interval(taus),
        "n_mem": ci_mem,
        "n_copies": ci_copies,
        "pct_mem": [100 * v / n_train for v in ci_mem],
        "pct_copies": [100 * v / n_syn for v in ci_copies],
        "expected_chance_copies": interval(expected),
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
    """Positive controls: known varied copies of training images, scored like synthetic ones."""
    from medmem._stats import wilson_interval

    caught = rho >= tau
    n, k = int(rho.size), int(caught.sum())
    same_patient = [
        train_patient_ids[a] is not None and train_patient_ids[a] == train_patient_ids[b]
        for a, b in zip(nearest, sources, strict=True)
    ]
    out = {
        "n": n,
        "caught": k,
        "sensitivity": k / n,
        "sensitivity_ci": list(wilson_interval(k, n)),
        "nearest_is_source": int((nearest == sources).sum()),
        "nearest_is_source_patient": int(np.sum(np.asarray(same_patient) | (nearest == sources))),
        "median_corr": float(np.median(rho)),
    }
    out.update(extra or {})
    return out


@dataclass
class AuditResult:
    """What an audit found: ``summary`` (dict), ``training`` and ``synthetic`` tables."""

    summary: dict[str, Any]
    training: pd.DataFrame
    synthetic: pd.DataFrame
    _images: dict[str, Any] = field(default_factory=dict, repr=False)

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
        """Write summary.json, training.csv, synthetic.csv, figures and report.html to ``out``.

        The folder is built aside and moved into place at the end: a crash never leaves a
        half-written result. An existing folder is refused unless ``overwrite``.
        """
        out = Path(out)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            atomic_write_json(tmp / "summary.json", self.summary)
            atomic_save(tmp / "training.csv", lambda p: self.training.to_csv(p, index=False))
            atomic_save(tmp / "synthetic.csv", lambda p: self.synthetic.to_csv(p, index=False))
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
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    controls: np.ndarray | None = None,
    control_sources: Sequence[int] | None = None,
    controls_info: dict[str, Any] | None = None,
) -> AuditResult:
    """Algorithm 1 on embeddings: tau from train->validation, verdicts for both directions.

    Args:
        train, val, synthetic: (n, d) embeddings from one detector.
        train_ids, val_ids, synthetic_ids: names for the rows (default ``train00000``...).
        train_patient_ids: patient id per training image, copied to training.csv.
        percentile: q of tau = percentile(nearest_val_corr, q).
        n_bootstrap: bootstrap replicates for the intervals (0 to skip).
        confidence: coverage of the intervals.
        seed: seed of the bootstrap.
        block_size: block size of the search (memory, not results).
        controls: embeddings of positive controls (known varied copies of training
            images), scored against the training set like synthetic images but kept out of
            N_copies and every output table; their catch rate at tau is reported.
        control_sources: training row each control was made from.
        controls_info: extra fields for ``summary["controls"]`` (how they were made).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> tr, va = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
        >>> r = audit_embeddings(tr, va, tr[:3], n_bootstrap=0)
        >>> r.summary["n_copies"], r.summary["n_mem"]
        (3, 3)
    """
    t0 = time.perf_counter()
    percentile = check_in_range(percentile, "percentile", 0.0, 100.0, low_open=True, high_open=True)
    confidence = check_in_range(confidence, "confidence", 0.0, 1.0, low_open=True, high_open=True)
    n_bootstrap = check_positive_int(n_bootstrap, "n_bootstrap", minimum=0)
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
    _check_sizes(len(e_tr), len(e_va), percentile)
    if train_patient_ids is None:
        train_patient_ids = [None] * len(e_tr)

    rho_val, idx_val = nearest(e_tr, e_va, k=1, block_size=block_size, standardized=True)
    rho_syn, idx_syn = nearest(e_tr, e_sy, k=1, block_size=block_size, standardized=True)
    rho_copy, idx_copy = nearest(e_sy, e_tr, k=1, block_size=block_size, standardized=True)
    # the chance rate: validation images are novel, scored against training as if synthetic
    rho_chance, _ = nearest(e_va, e_tr, k=1, block_size=block_size, standardized=True)
    rho_val, rho_syn, rho_copy = rho_val[:, 0], rho_syn[:, 0], rho_copy[:, 0]
    rho_chance = rho_chance[:, 0]
    tau = calibrate(rho_val, percentile)
    if tau >= COLLAPSED_TAU:
        warnings.warn(
            f"tau = {tau:.4f}: the training images correlate almost perfectly with their "
            "nearest validation images, so the detector's embeddings have collapsed (all "
            "images look alike to it) and no synthetic image can be called a copy. Retrain "
            "the detector (more epochs, another lr or arch; its final loss should be well "
            "below ln(2K - 1)).",
            stacklevel=2,
        )
    memorized = rho_syn >= tau
    copy = rho_copy >= tau

    training = pd.DataFrame(
        {
            "train_id": tr_ids,
            "patient_id": list(train_patient_ids),
            "nearest_val_id": [va_ids[j] for j in idx_val[:, 0]],
            "nearest_val_corr": rho_val.astype(np.float64),
            "nearest_synthetic_id": [sy_ids[j] for j in idx_syn[:, 0]],
            "nearest_synthetic_corr": rho_syn.astype(np.float64),
            "memorized": memorized,
        },
        columns=TRAINING_COLUMNS,
    )
    synthetic_df = pd.DataFrame(
        {
            "synthetic_id": sy_ids,
            "nearest_train_id": [tr_ids[j] for j in idx_copy[:, 0]],
            "nearest_train_corr": rho_copy.astype(np.float64),
            "copy": copy,
        },
        columns=SYNTHETIC_COLUMNS,
    )
    n_train, n_syn = len(e_tr), len(e_sy)
    n_mem, n_copies = int(memorized.sum()), int(copy.sum())
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "medmem_version": __version__,
        "tau": tau,
        "percentile": percentile,
        "n_train": n_train,
        "n_val": len(e_va),
        "n_synthetic": n_syn,
        "n_mem": n_mem,
        "n_copies": n_copies,
        "pct_mem": 100.0 * n_mem / n_train,
        "pct_mem_denominator": "n_train",
        "pct_copies": 100.0 * n_copies / n_syn,
        "pct_copies_denominator": "n_synthetic",
        "embedding_dim": int(e_tr.shape[1]),
    }
    chance_rate = float(np.mean(rho_chance >= tau))
    summary["chance"] = {
        "false_copy_rate": chance_rate,
        "expected_copies": chance_rate * n_syn,
        "excess_copies": n_copies - chance_rate * n_syn,
        "method": "validation images (patients not in training) scored against the training "
        "set as if they were synthetic: the share at or above tau is the rate at which novel "
        "images are called copies; expected_copies = that rate x n_synthetic",
        "design_false_copy_rate": (100.0 - percentile) / 100.0,
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
        rho_ctrl, idx_ctrl = nearest(e_ctrl, e_tr, k=1, block_size=block_size, standardized=True)
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
            rho_val.astype(np.float64),
            rho_syn.astype(np.float64),
            rho_copy.astype(np.float64),
            rho_chance.astype(np.float64),
            percentile,
            n_bootstrap,
            confidence,
            seed,
        )
        summary["chance"]["expected_copies_ci"] = summary["intervals"]["expected_chance_copies"]
        summary["chance"]["excess_copies_ci"] = summary["intervals"]["excess_copies"]
    summary["timings_s"] = {"search_and_calibration": round(time.perf_counter() - t0, 3)}
    return AuditResult(summary=summary, training=training, synthetic=synthetic_df)


def _check_datasets(train: Any, val: Any, synthetic: Any) -> None:
    sets = {"training": train, "validation": val, "synthetic": synthetic}
    for name, ds in sets.items():
        if not hasattr(ds, "spatial_dims") or not hasattr(ds, "content_hash"):
            raise InputError(
                f"{name} set: expected a medmem dataset (medmem.load_dataset(...) or "
                f"medmem.data.ArrayDataset), got {type(ds).__name__}."
            )
        if len(ds) == 0:
            raise InputError(f"{name} set is empty: give at least one image.")
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
) -> AuditResult:
    """Audit a synthetic set against the training set it may have copied.

    Embeds the three sets with ``detector`` (trained on ``train`` first when None), calibrates
    tau on ``val`` (patients not in training) and applies Algorithm 1.

    Args:
        train, val, synthetic: medmem datasets (``medmem.load_dataset``) of one kind.
        detector: a trained ``medmem.Detector``; None trains one on ``train``.
        percentile: q of tau = percentile(nearest_val_corr, q).
        allow_patient_overlap: do not refuse training/validation sets sharing patients.
        n_bootstrap, confidence, seed: bootstrap intervals.
        cache_dir: where embeddings are cached (by detector and file content).
        batch_size, num_workers: embedding DataLoader settings.
        detector_overrides: DetectorConfig fields for a detector trained here.
        n_controls: positive controls: this many seeded varied copies of training images
            (flip, rotation within +-5 degrees, gamma contrast by default) are embedded and
            scored like synthetic images, never counted in N_copies or listed; their catch
            rate at tau is the audit's measured sensitivity (0 to skip).
        control_kinds: variation kinds of the controls (``medmem.detector.VARIATION_KINDS``).
        quiet: no progress bars.

    Example:
        >>> import medmem
        >>> result = medmem.audit(train, val, synthetic, detector=det)  # doctest: +SKIP
        >>> result.summary["n_copies"]  # doctest: +SKIP
    """
    from medmem.data import ArrayDataset
    from medmem.detector import DEFAULT_VARIATION_KINDS, Detector, vary

    t0 = time.perf_counter()
    n_controls = check_positive_int(n_controls, "n_controls", minimum=0)
    _check_datasets(train, val, synthetic)
    n_overlap = check_patient_overlap(train, val, allow=allow_patient_overlap)
    percentile = check_in_range(percentile, "percentile", 0.0, 100.0, low_open=True, high_open=True)
    _check_sizes(len(train), len(val), percentile)
    timings: dict[str, float] = {}
    if detector is None:
        t = time.perf_counter()
        overrides = dict(detector_overrides or {})
        overrides.setdefault("spatial_dims", train.spatial_dims)
        overrides.setdefault("image_size", tuple(train.image_size))
        detector = Detector.train(train, quiet=quiet, **overrides)
        timings["detector_training"] = round(time.perf_counter() - t, 3)
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
    timings["embedding"] = round(time.perf_counter() - t, 3)
    e_ctrl, ctrl_src, ctrl_info = None, None, None
    if n_controls > 0:
        t = time.perf_counter()
        kinds = tuple(control_kinds or DEFAULT_VARIATION_KINDS)
        rng = np.random.default_rng([seed, 0xC0])
        ctrl_src = rng.choice(len(train), size=min(n_controls, len(train)), replace=False)
        ctrl = np.stack([vary(train[int(i)], rng, kinds=kinds)[0].numpy() for i in ctrl_src])
        e_ctrl = detector.embed(ArrayDataset(ctrl), batch_size=batch_size, quiet=quiet)
        ctrl_info = {"kinds": list(kinds), "seed": seed}
        timings["controls"] = round(time.perf_counter() - t, 3)
    result = audit_embeddings(
        e_tr,
        e_va,
        e_sy,
        train_ids=train.ids,
        val_ids=val.ids,
        synthetic_ids=synthetic.ids,
        train_patient_ids=train.patient_ids,
        percentile=percentile,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        controls=e_ctrl,
        control_sources=ctrl_src,
        controls_info=ctrl_info,
    )
    s = result.summary
    timings.update(s.pop("timings_s"))
    timings["total"] = round(time.perf_counter() - t0, 3)
    s["spatial_dims"] = int(train.spatial_dims)
    s["image_size"] = list(train.image_size)
    s["n_patients_shared_train_val"] = n_overlap
    s["fingerprints"] = {
        "detector": detector.fingerprint,
        "detector_training_set": getattr(detector, "train_fingerprint", None),
        "training_set": train.fingerprint(),
        "validation_set": val.fingerprint(),
        "synthetic_set": synthetic.fingerprint(),
    }
    s["sources"] = {
        name: getattr(ds, "source", None)
        for name, ds in (("training", train), ("validation", val), ("synthetic", synthetic))
    }
    s["skipped_files"] = [
        {"set": name, **item}
        for name, ds in (("training", train), ("validation", val), ("synthetic", synthetic))
        for item in getattr(ds, "skipped", [])
    ]
    s["settings"] = {
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "allow_patient_overlap": allow_patient_overlap,
        "n_controls": n_controls,
    }
    s["timings_s"] = timings
    result._images = {"train": train, "synthetic": synthetic}
    return result


def format_verdict(s: dict[str, Any]) -> str:
    """The audit's verdict as a few plain lines."""
    ci = s.get("intervals", {})

    def rng(key: str, fmt: str = "{:.0f}") -> str:
        if key not in ci:
            return ""
        lo, hi = ci[key]
        return f" (95% CI {fmt.format(lo)}-{fmt.format(hi)})"

    lines = [
        f"tau = {s['tau']:.4f} ({s['percentile']:g}th percentile of train->nearest-val "
        f"correlations){rng('tau', '{:.4f}')}",
        f"N_mem    = {s['n_mem']} of {s['n_train']} training images "
        f"({s['pct_mem']:.1f}% of n_train){rng('n_mem')}",
        f"N_copies = {s['n_copies']} of {s['n_synthetic']} synthetic images "
        f"({s['pct_copies']:.1f}% of n_synthetic){rng('n_copies')}",
    ]
    if "chance" in s:
        c = s["chance"]
        lines.append(
            f"  expected by chance if none were copies: {c['expected_copies']:.1f}"
            f"{rng('expected_chance_copies', '{:.1f}')}; excess {c['excess_copies']:+.1f}"
            f"{rng('excess_copies', '{:+.1f}')}"
        )
    if "patients" in s:
        p = s["patients"]
        lines.append(
            f"patients with a memorized image: {p['n_patients_mem']} of "
            f"{p['n_train_patients']} ({p['pct_patients_mem']:.1f}% of training patients)"
        )
    if "controls" in s:
        c = s["controls"]
        lo, hi = c["sensitivity_ci"]
        lines.append(
            f"positive controls caught: {c['caught']} of {c['n']} (measured sensitivity "
            f"{c['sensitivity']:.2f}, 95% CI {lo:.2f}-{hi:.2f})"
        )
    return "\n".join(lines)


__all__ = [
    "SCHEMA_VERSION",
    "SYNTHETIC_COLUMNS",
    "TRAINING_COLUMNS",
    "AuditResult",
    "audit",
    "audit_embeddings",
    "check_patient_overlap",
    "format_verdict",
    "calibrate",
    "min_calibration_size",
]
