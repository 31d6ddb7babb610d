"""Manual validation of the copy threshold (the paper's section 2.3), blind and offline.

The paper checked tau by labelling 100 random training / nearest-synthetic pairs as *copy*
or *novel* by eye and comparing with the audit's verdicts (sensitivity and specificity).
Here ``make_labeling_page`` draws such pairs from an audit folder and writes a
self-contained HTML page to label them in a browser (no server, no network), and
``validate`` compares the downloaded ``labels.csv`` with the audit.

Sampling (``sample_pairs``), stratified around tau so that both verdicts are well
represented and the pairs near the threshold, where it is decided, are oversampled:

1. Every training image gives one pair: (train_id, nearest_synthetic_id), scored by its
   ``nearest_synthetic_corr``. The audit calls the pair a copy when that is >= tau.
2. Half of the ``n`` pairs come from each side of tau (``above_tau``: corr >= tau,
   ``below_tau``: corr < tau). A side with too few images gives all it has and the other
   side fills the rest.
3. Within each side, images are ranked by distance to tau and split into four equal-count
   bins (quartiles of ``nearest_synthetic_corr`` on that side); bin 1 is nearest tau.
   The side's pairs go to bins 1-4 in proportion 4:3:2:1 (largest remainder; a bin with
   too few images gives all it has, the rest goes to the other bins in the same
   proportions), drawn without replacement within each bin.
4. The drawn pairs are shuffled and numbered 1..n: the order reveals nothing.

Strata are named ``above_tau_1`` ... ``below_tau_4``. Each pair's ``weight`` (images in its
stratum / pairs drawn from it) undoes the oversampling: ``validate`` reports
sensitivity and specificity both as labelled (what the paper reports) and weighted to the
whole training set.

The page shows the pair number only: no correlation, stratum, verdict or image id. The
stratum, correlation and weight go to ``pairs.csv`` beside the page, which the page does
not embed and ``validate`` reads.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medmem import __version__
from medmem._errors import InputError, MedmemWarning, OutputExistsError
from medmem._io import atomic_save, atomic_write_json, atomic_write_text
from medmem._stats import auroc, wilson_interval
from medmem._templates import asset, render, trusted
from medmem._validation import check_positive_int, check_seed

SCHEMA_VERSION = 1
PAIRS_COLUMNS = [
    "pair_id",
    "train_id",
    "synthetic_id",
    "nearest_synthetic_corr",
    "stratum",
    "weight",
]
LABELS_COLUMNS = ["pair_id", "train_id", "synthetic_id", "label"]
LABEL_VALUES = ("copy", "novel", "unsure")
N_BINS = 4
BIN_WEIGHTS = (4, 3, 2, 1)  # nearest tau first
_VIEW_NAMES = {2: ["image"], 3: ["central slice, axis 0", "axis 1", "axis 2"]}


# --------------------------------------------------------------------------- audit folder


def _read_audit(audit_dir: str | os.PathLike) -> tuple[Path, dict[str, Any], pd.DataFrame]:
    """summary.json and training.csv of an audit folder, checked (``AuditResult.load``)."""
    from medmem._audit import AuditResult

    folder = Path(audit_dir)
    result = AuditResult.load(folder)
    training_path = folder / "training.csv"
    training = result.training
    if len(training) == 0:
        raise InputError(f"{training_path}: has no rows; nothing to label.")
    corr = training["nearest_synthetic_corr"].to_numpy(float)
    if not np.isfinite(corr).all():
        row = int(np.flatnonzero(~np.isfinite(corr))[0])
        raise InputError(
            f"{training_path} row {row + 1}: nearest_synthetic_corr is not a number "
            f"({training['nearest_synthetic_corr'].iloc[row]!r})."
        )
    return folder, result.summary, training


# --------------------------------------------------------------------------- sampling


def _allocate(total: int, capacities: list[int], weights: tuple[int, ...]) -> list[int]:
    """Split ``total`` over bins in proportion to ``weights``, capped by ``capacities``."""
    alloc = [0] * len(capacities)
    remaining = min(total, sum(capacities))
    while remaining > 0:
        open_bins = [i for i, c in enumerate(capacities) if alloc[i] < c]
        w = np.array([weights[i] for i in open_bins], dtype=np.float64)
        share = remaining * w / w.sum()
        base = np.floor(share).astype(int)
        extra = remaining - int(base.sum())
        for j in np.argsort(-(share - base), kind="stable")[:extra]:
            base[j] += 1
        for j, i in enumerate(open_bins):
            alloc[i] += min(int(base[j]), capacities[i] - alloc[i])
        remaining = min(total, sum(capacities)) - sum(alloc)
    return alloc


def sample_pairs(
    training: pd.DataFrame, tau: float, *, n: int = 100, seed: int = 0
) -> pd.DataFrame:
    """Draw ``n`` training / nearest-synthetic pairs, stratified around ``tau``.

    See the module docstring for the scheme. Same inputs and seed, same pairs.

    Args:
        training: the audit's training table (``train_id``, ``nearest_synthetic_id``,
            ``nearest_synthetic_corr``).
        tau: the audit's threshold.
        n: number of pairs (all training images when there are fewer).
        seed: random seed.

    Returns:
        A DataFrame with columns ``PAIRS_COLUMNS``, in page order (``pair_id`` 1..n).

    Example:
        >>> t = pd.DataFrame({"train_id": list("abcd"), "nearest_synthetic_id": list("wxyz"),
        ...                   "nearest_synthetic_corr": [0.1, 0.5, 0.9, 0.95]})
        >>> sorted(sample_pairs(t, 0.8, n=2)["stratum"].str[:9])
        ['above_tau', 'below_tau']
    """
    n = check_positive_int(n, "n")
    rng = check_seed(seed)
    tau = float(tau)
    if n > len(training):
        warnings.warn(
            f"n={n} pairs asked for but the audit has {len(training)} training images: "
            f"labelling all {len(training)}.",
            category=MedmemWarning,
            stacklevel=2,
        )
        n = len(training)
    corr = training["nearest_synthetic_corr"].to_numpy(np.float64)
    ids = training["train_id"].astype(str).to_numpy()
    above = np.flatnonzero(corr >= tau)
    below = np.flatnonzero(corr < tau)
    n_above = min(len(above), max(n // 2, n - len(below)))
    for side, have, want in (("at or above", n_above, n // 2), ("below", n - n_above, n - n // 2)):
        if have < want and n < len(training):
            warnings.warn(
                f"only {have} training image(s) have nearest_synthetic_corr {side} tau: "
                f"{have} of the {n} pairs come from that side, not half, so the audit's "
                f"{'copy' if side != 'below' else 'novel'} verdicts are checked on few pairs.",
                category=MedmemWarning,
                stacklevel=2,
            )
    chosen: list[int] = []
    strata: list[str] = []
    weights: list[float] = []
    for side, rows, k_side in (("above_tau", above, n_above), ("below_tau", below, n - n_above)):
        if k_side == 0:
            continue
        # rank by distance to tau (ties by id, so the row order of training.csv is irrelevant)
        order = np.lexsort((ids[rows], np.abs(corr[rows] - tau)))
        bins = np.array_split(rows[order], N_BINS)
        alloc = _allocate(k_side, [len(b) for b in bins], BIN_WEIGHTS)
        for b, (members, k) in enumerate(zip(bins, alloc, strict=True), start=1):
            if k == 0:
                continue
            picked = rng.choice(members, size=k, replace=False)
            chosen.extend(int(i) for i in picked)
            strata.extend([f"{side}_{b}"] * k)
            weights.extend([len(members) / k] * k)
    perm = rng.permutation(len(chosen))
    rows = np.asarray(chosen, dtype=np.int64)[perm]
    return pd.DataFrame(
        {
            "pair_id": np.arange(1, len(rows) + 1),
            "train_id": ids[rows],
            "synthetic_id": training["nearest_synthetic_id"].astype(str).to_numpy()[rows],
            "nearest_synthetic_corr": corr[rows],
            "stratum": np.asarray(strata)[perm],
            "weight": np.asarray(weights, dtype=np.float64)[perm],
        },
        columns=PAIRS_COLUMNS,
    )


# --------------------------------------------------------------------------- the page


def _script_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>', '&' or line separators."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


def _load_images(
    src: Any, summary: dict[str, Any], which: str, option: str, wanted: list[str], quiet: bool
) -> dict[str, list[str]]:
    """The views (base64 PNG) of the images ``wanted`` from source ``src``."""
    from medmem._plots import central_slices, png_base64
    from medmem.data import load_dataset

    if src is None:
        src = (summary.get("sources") or {}).get(which)
    if src is None:
        raise InputError(
            f"summary.json does not say where the {which} images are (sources.{which} is "
            f"empty, e.g. an audit made from embeddings): pass {option} with the {which} set "
            "the audit used."
        )
    dims = summary.get("spatial_dims")
    size = summary.get("image_size")
    ds = load_dataset(
        src,
        spatial_dims=int(dims) if dims else None,
        image_size=tuple(size) if size else None,
        quiet=quiet,
    )
    index = {str(i): k for k, i in enumerate(ds.ids)}
    missing = [i for i in dict.fromkeys(wanted) if i not in index]
    if missing:
        raise InputError(
            f"{len(missing)} {which} image(s) named in the audit are not in {src!s} (e.g. "
            f"{missing[0]!r}): pass {option} with the {which} set the audit used."
        )
    out: dict[str, list[str]] = {}
    for image_id in dict.fromkeys(wanted):
        image = ds[index[image_id]]
        image = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
        out[image_id] = [png_base64(v) for v in central_slices(image)]
    return out


def make_labeling_page(
    audit_dir: str | os.PathLike,
    out_html: str | os.PathLike,
    *,
    n: int = 100,
    seed: int = 0,
    train: Any = None,
    synthetic: Any = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write a blind labelling page for ``n`` training / nearest-synthetic pairs.

    The page (one HTML file: images as base64 PNG, inline CSS and JS, no network) shows
    each pair side by side (three central slices for 3D) with the pair number only; keys
    c / n / u label copy / novel / unsure, arrows or j / k move; labels are kept in the
    browser's localStorage and saved as ``labels.csv`` (``pair_id, train_id,
    synthetic_id, label``) by a button. ``pairs.csv`` (with the correlations and strata,
    not in the page) is written beside it for :func:`validate`.

    Args:
        audit_dir: output folder of ``medmem audit``.
        out_html: the page to write.
        n: number of pairs (stratified around tau; see the module docstring).
        seed: random seed of the draw.
        train, synthetic: image sources (folder, glob, manifest or dataset); default the
            ``sources`` recorded in summary.json. Only the drawn images are read.
        overwrite: replace an existing page / pairs.csv.
        quiet: no progress bars while indexing images.

    Returns:
        The path of the page.

    Example:
        >>> make_labeling_page("audit/", "audit/labels.html", n=100)  # doctest: +SKIP
        PosixPath('audit/labels.html')
    """
    folder, summary, training = _read_audit(audit_dir)
    out_html = Path(out_html)
    pairs_path = out_html.parent / "pairs.csv"
    for p in (out_html, pairs_path):
        if p.exists() and not overwrite:
            raise OutputExistsError(
                f"{p}: exists (labels may be in progress for it). Choose another --out, or "
                "pass --overwrite (overwrite=True) to replace it."
            )
    pairs = sample_pairs(training, float(summary["tau"]), n=n, seed=seed)
    train_views = _load_images(
        train, summary, "training", "--train", list(pairs["train_id"]), quiet
    )
    syn_views = _load_images(
        synthetic, summary, "synthetic", "--synthetic", list(pairs["synthetic_id"]), quiet
    )
    n_views = len(next(iter(train_views.values())))
    token_src = json.dumps(
        [summary.get("fingerprints"), seed, pairs[["train_id", "synthetic_id"]].values.tolist()]
    )
    data = {
        "token": hashlib.sha256(token_src.encode()).hexdigest()[:24],
        "views": _VIEW_NAMES.get(int(summary.get("spatial_dims") or 2), [""] * n_views)[:n_views],
        "pairs": [
            {
                "pair_id": int(row.pair_id),
                "train_id": row.train_id,
                "synthetic_id": row.synthetic_id,
                "train": train_views[row.train_id],
                "synthetic": syn_views[row.synthetic_id],
            }
            for row in pairs.itertuples(index=False)
        ],
    }
    sizes = _view_sizes(_view_shapes(next(iter(train_views.values()))), n_views)
    page = render(
        "label.html",
        n=len(pairs),
        version=__version__,
        audit=folder.resolve().name,
        sizes=trusted(sizes),  # CSS from integers (_view_sizes)
        css=asset("label.css"),
        data=trusted(_script_json(data)),  # JSON made safe for a <script> element
        js=asset("label.js"),
    )
    atomic_save(pairs_path, lambda p: pairs.to_csv(p, index=False))
    atomic_write_text(out_html, page)
    return out_html


def _view_shapes(views: list[str]) -> list[tuple[int, int]]:
    """(height, width) of each view of an image, read back from its PNGs."""
    from PIL import Image

    shapes = []
    for b64 in views:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            shapes.append((im.height, im.width))
    return shapes


def _view_sizes(shapes: list[tuple[int, int]], n_views: int) -> str:
    """CSS giving each view a display size (largest side 384 px in 2D, 256 px in 3D)."""
    target = 384 if n_views == 1 else 256
    rules = []
    for v, (h, w) in enumerate(shapes):
        scale = target / max(h, w)
        pixelated = "pixelated" if scale >= 2 else "auto"
        rules.append(
            f".view-{v} img {{ width: {round(w * scale)}px; height: {round(h * scale)}px; "
            f"image-rendering: {pixelated}; }}"
        )
    return "\n".join(rules)


# --------------------------------------------------------------------------- validate


def _read_csv(path: Path, what: str, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: not readable as a CSV {what} ({exc}).") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (found: "
            f"{', '.join(map(str, df.columns)) or 'none'}); a {what} has columns "
            f"{', '.join(columns)}."
        )
    return df


def _pair_ids(df: pd.DataFrame, path: Path) -> np.ndarray:
    ids = pd.to_numeric(df["pair_id"].str.strip(), errors="coerce")
    bad = ids.isna() | (ids != ids.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{path} row {row + 2}: pair_id {df['pair_id'].iloc[row]!r} is not a whole number."
        )
    ids = ids.astype(np.int64).to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(
            f"{path}: pair {int(uniq[counts > 1][0])} appears more than once; keep one label "
            "per pair."
        )
    return ids


def _find_pairs_csv(folder: Path, labels_csv: Path) -> Path:
    for p in (folder / "pairs.csv", labels_csv.parent / "pairs.csv"):
        if p.is_file():
            return p
    raise InputError(
        f"no pairs.csv in {folder} or beside {labels_csv}: pass the pairs.csv written beside "
        "the labelling page (--pairs, pairs_csv=)."
    )


def _rate(k: int, n: int, confidence: float) -> tuple[float | None, list[float] | None]:
    if n == 0:
        return None, None
    lo, hi = wilson_interval(k, n, confidence)
    return k / n, [lo, hi]


def _best_tau(corr: np.ndarray, human_copy: np.ndarray, tau: float) -> dict[str, Any] | None:
    """The threshold maximising Youden's J on the definite labels (ties: nearest tau)."""
    n_pos, n_neg = int(human_copy.sum()), int((~human_copy).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    u = np.unique(corr)
    candidates = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [np.nextafter(u[-1], np.inf)]])
    best: tuple[float, float, float] | None = None
    result: dict[str, Any] | None = None
    for t in candidates:
        said = corr >= t
        sens = float((said & human_copy).sum() / n_pos)
        spec = float((~said & ~human_copy).sum() / n_neg)
        key = (sens + spec - 1.0, -abs(float(t) - tau), 0.0)
        if best is None or key > best:
            best = key
            result = {
                "tau": float(t),
                "sensitivity": sens,
                "specificity": spec,
                "youden_j": sens + spec - 1.0,
            }
    assert result is not None
    if result["youden_j"] <= 0:
        return None  # no threshold agrees with the labels better than chance
    result["criterion"] = (
        "maximises Youden's J = sensitivity + specificity - 1 over the definite labels "
        "(thresholds midway between observed correlations); ties go to the threshold "
        "nearest the audit's tau"
    )
    return result


def validate(
    audit_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    *,
    pairs_csv: str | os.PathLike | None = None,
    confidence: float = 0.95,
    write: bool = True,
) -> dict[str, Any]:
    """Compare human labels with the audit's verdicts; write ``validation.json``.

    Human *copy* is positive and *novel* negative; *unsure* (and unlabelled) pairs are
    excluded and counted. The audit calls a pair a copy when its
    ``nearest_synthetic_corr >= tau``. Sensitivity = TP / (TP + FN), specificity =
    TN / (TN + FP), with Wilson intervals; also weighted to the whole training set (undoing
    the stratified sampling), the AUROC of the correlation for the human labels, and the
    tau that best matches the humans.

    Args:
        audit_dir: the audit folder the page was made from.
        labels_csv: the ``labels.csv`` saved from the page.
        pairs_csv: the ``pairs.csv`` written beside the page; default: the audit folder's,
            else the one beside ``labels_csv``.
        confidence: coverage of the intervals.
        write: write ``validation.json`` into the audit folder.

    Returns:
        The contents of ``validation.json``.

    Example:
        >>> v = validate("audit/", "Downloads/labels.csv")  # doctest: +SKIP
        >>> v["sensitivity"], v["specificity"]  # doctest: +SKIP
        (0.89, 0.81)
    """
    folder, summary, training = _read_audit(audit_dir)
    tau = float(summary["tau"])
    labels_csv = Path(labels_csv)
    pairs_path = Path(pairs_csv) if pairs_csv is not None else _find_pairs_csv(folder, labels_csv)
    pairs = _read_csv(pairs_path, "pairs file", ["pair_id", "train_id", "synthetic_id"])
    labels = _read_csv(labels_csv, "labels file", LABELS_COLUMNS)
    pair_ids = _pair_ids(pairs, pairs_path)
    label_ids = _pair_ids(labels, labels_csv)
    if len(labels) == 0:
        raise InputError(f"{labels_csv}: has no rows; label some pairs and save again.")

    # pairs.csv must describe this audit
    by_train = training.set_index("train_id")
    unknown_train = [t for t in pairs["train_id"] if t not in by_train.index]
    if unknown_train:
        raise InputError(
            f"{pairs_path}: training image {unknown_train[0]!r} is not in {folder}/training.csv: "
            "this pairs.csv was made from another audit. Use the one written beside this "
            "audit's labelling page."
        )
    audit_rows = by_train.loc[pairs["train_id"]]
    differ = audit_rows["nearest_synthetic_id"].to_numpy() != pairs["synthetic_id"].to_numpy()
    if differ.any():
        k = int(np.flatnonzero(differ)[0])
        raise InputError(
            f"{pairs_path}: pair {pair_ids[k]} pairs {pairs['train_id'].iloc[k]!r} with "
            f"{pairs['synthetic_id'].iloc[k]!r}, but in {folder} its nearest synthetic image is "
            f"{audit_rows['nearest_synthetic_id'].iloc[k]!r}: this pairs.csv was made from "
            "another audit."
        )
    corr_by_pair = dict(
        zip(pair_ids, audit_rows["nearest_synthetic_corr"].to_numpy(np.float64), strict=True)
    )

    # labels.csv must come from this page
    pairs_by_id = {int(p): k for k, p in enumerate(pair_ids)}
    unknown = [int(p) for p in label_ids if int(p) not in pairs_by_id]
    if unknown:
        raise InputError(
            f"{labels_csv}: {len(unknown)} label(s) for pairs not in {pairs_path} (e.g. pair "
            f"{unknown[0]}; known pairs: 1-{len(pairs)}). Were they saved from another "
            "labelling page?"
        )
    for r, pid in enumerate(label_ids):
        k = pairs_by_id[int(pid)]
        got = (labels["train_id"].iloc[r], labels["synthetic_id"].iloc[r])
        want = (pairs["train_id"].iloc[k], pairs["synthetic_id"].iloc[k])
        if got != want:
            raise InputError(
                f"{labels_csv} row {r + 2}: pair {pid} is {got[0]!r} / {got[1]!r} there but "
                f"{want[0]!r} / {want[1]!r} in {pairs_path}: the labels come from another "
                "audit's labelling page. Validate them against that audit."
            )
    values = labels["label"].str.strip().str.lower()
    bad = ~values.isin([*LABEL_VALUES, ""])
    if bad.any():
        r = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{labels_csv} row {r + 2}: label {labels['label'].iloc[r]!r} is not one of "
            f"{', '.join(LABEL_VALUES)} (or empty for unlabelled)."
        )

    n_unsure = int((values == "unsure").sum())
    n_unlabelled = int((values == "").sum()) + (len(pairs) - len(labels))
    definite = values.isin(["copy", "novel"]).to_numpy()
    if not definite.any():
        raise InputError(
            f"{labels_csv}: no pair is labelled copy or novel ({n_unsure} unsure, "
            f"{n_unlabelled} unlabelled): label some pairs, save, and validate again."
        )
    ids_def = label_ids[definite]
    human_copy = (values[definite] == "copy").to_numpy()
    corr = np.array([corr_by_pair[int(p)] for p in ids_def], dtype=np.float64)
    said_copy = corr >= tau
    tp = int((said_copy & human_copy).sum())
    fn = int((~said_copy & human_copy).sum())
    fp = int((said_copy & ~human_copy).sum())
    tn = int((~said_copy & ~human_copy).sum())
    sens, sens_ci = _rate(tp, tp + fn, confidence)
    spec, spec_ci = _rate(tn, tn + fp, confidence)
    for name, n_class, label in (
        ("sensitivity", tp + fn, "copy"),
        ("specificity", tn + fp, "novel"),
    ):
        if n_class == 0:
            warnings.warn(
                f"no pair is labelled {label}, so {name} is undefined; label more pairs.",
                category=MedmemWarning,
                stacklevel=2,
            )

    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "medmem_version": __version__,
        "audit": str(folder),
        "labels_csv": str(labels_csv),
        "pairs_csv": str(pairs_path),
        "tau": tau,
        "positive": "human label copy (negative: novel; unsure and unlabelled excluded)",
        "audit_verdict": "copy when nearest_synthetic_corr >= tau",
        "n_pairs": int(len(pairs)),
        "n_definite": int(definite.sum()),
        "counts": {
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "unsure": n_unsure,
            "unlabelled": n_unlabelled,
        },
        "confidence": confidence,
        "sensitivity": sens,
        "sensitivity_ci": sens_ci,
        "specificity": spec,
        "specificity_ci": spec_ci,
        "agreement": (tp + tn) / int(definite.sum()),
    }
    if "weight" in pairs.columns:
        w_all = pd.to_numeric(pairs["weight"], errors="coerce").to_numpy(np.float64)
        if np.isfinite(w_all).all() and (w_all > 0).all():
            w = np.array([w_all[pairs_by_id[int(p)]] for p in ids_def])

            def ratio(num: np.ndarray, den: np.ndarray) -> float | None:
                d = float(w[den].sum())
                return float(w[num].sum()) / d if d > 0 else None

            result["weighted"] = {
                "sensitivity": ratio(said_copy & human_copy, human_copy),
                "specificity": ratio(~said_copy & ~human_copy, ~human_copy),
                "method": "each pair weighted by images in its stratum / pairs drawn from it "
                "(pairs.csv weight), undoing the oversampling near tau; unsure pairs treated "
                "as missing at random within their stratum",
            }
    a = auroc(corr[human_copy], corr[~human_copy])
    result["auroc"] = None if math.isnan(a) else a
    result["best_tau"] = _best_tau(corr, human_copy, tau)
    if result["best_tau"] is None:
        result["best_tau_note"] = (
            "needs pairs labelled copy and novel"
            if human_copy.all() or not human_copy.any()
            else "no threshold on nearest_synthetic_corr agrees with the labels better than "
            "chance (Youden's J <= 0)"
        )
    result["disagreements"] = [
        {
            "pair_id": int(p),
            "train_id": pairs["train_id"].iloc[pairs_by_id[int(p)]],
            "synthetic_id": pairs["synthetic_id"].iloc[pairs_by_id[int(p)]],
            "label": "copy" if h else "novel",
            "verdict": "copy" if s else "novel",
            "nearest_synthetic_corr": float(c),
        }
        for p, h, s, c in zip(ids_def, human_copy, said_copy, corr, strict=True)
        if h != s
    ]
    if write:
        atomic_write_json(folder / "validation.json", result)
    return result


def format_validation(result: dict[str, Any]) -> str:
    """The validation as a small table (for the CLI)."""

    def rate(name: str) -> str:
        v, ci = result[name], result[f"{name}_ci"]
        if v is None:
            return f"{name:<12} undefined (no such labels)"
        c = result["counts"]
        k, n = (
            (c["tp"], c["tp"] + c["fn"]) if name == "sensitivity" else (c["tn"], c["tn"] + c["fp"])
        )
        pct = round(100 * result["confidence"])
        return f"{name:<12} {v:6.3f}  ({pct}% CI {ci[0]:.3f}-{ci[1]:.3f})  {k}/{n}"

    c = result["counts"]
    lines = [
        f"audit verdicts (copy when nearest_synthetic_corr >= tau = {result['tau']:.4f}) "
        f"against {result['n_definite']} human labels",
        f"{'':<14}{'human copy':>12}{'human novel':>13}",
        f"{'audit copy':<14}{str(c['tp']) + ' TP':>12}{str(c['fp']) + ' FP':>13}",
        f"{'audit novel':<14}{str(c['fn']) + ' FN':>12}{str(c['tn']) + ' TN':>13}",
        f"unsure {c['unsure']}, unlabelled {c['unlabelled']} (excluded)",
        rate("sensitivity"),
        rate("specificity"),
    ]
    w = result.get("weighted")
    if w and w["sensitivity"] is not None and w["specificity"] is not None:
        lines.append(
            f"weighted to the training set: sensitivity {w['sensitivity']:.3f}, "
            f"specificity {w['specificity']:.3f}"
        )
    b = result.get("best_tau")
    if b:
        lines.append(
            f"tau best matching the labels: {b['tau']:.4f} (sensitivity {b['sensitivity']:.3f}, "
            f"specificity {b['specificity']:.3f})"
        )
    elif result.get("best_tau_note"):
        lines.append(f"tau best matching the labels: none ({result['best_tau_note']})")
    return "\n".join(lines)


__all__ = [
    "LABELS_COLUMNS",
    "PAIRS_COLUMNS",
    "format_validation",
    "make_labeling_page",
    "sample_pairs",
    "validate",
]
