"""Input checks used once, at the public boundary (scikit-learn's manners)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from difflib import get_close_matches
from typing import Any

import numpy as np

from medmem._errors import InputError


def check_embeddings(x: Any, name: str, *, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array of shape (n, d), or raise naming ``name``."""
    try:
        arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    except Exception as exc:  # pragma: no cover - defensive
        raise InputError(f"{name}: cannot convert to an array ({exc}).") from exc
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-d array (n, d), got shape {arr.shape}.")
    if arr.shape[0] == 0:
        raise InputError(f"{name}: is empty (0 rows); give at least one embedding.")
    if arr.shape[1] < 2:
        raise InputError(
            f"{name}: embeddings need at least 2 dimensions for a Pearson correlation, "
            f"got d={arr.shape[1]}."
        )
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"{name}: expected d={dim} columns, got {arr.shape[1]}.")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name}: expected numbers, got dtype {arr.dtype}.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # in chunks of rows: the check's scratch memory stays bounded for 10^6 x d inputs
    step = max(1, (1 << 22) // arr.shape[1])
    if not all(np.isfinite(arr[i : i + step]).all() for i in range(0, len(arr), step)):
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InputError(f"{name}: row {bad} contains NaN or infinity.")
    return arr


def check_dataset(
    ds: Any,
    name: str,
    *,
    needs: tuple[str, ...] = ("spatial_dims", "image_size", "__getitem__", "__len__"),
) -> Any:
    """A non-empty medmem dataset (has every attribute of ``needs``), else one InputError."""
    if not all(hasattr(ds, a) for a in needs):
        raise InputError(
            f"{name}: expected a medmem dataset (medmem.load_dataset(...) or "
            f"medmem.data.ArrayDataset), got {type(ds).__name__}."
        )
    if len(ds) == 0:
        raise InputError(f"{name} is empty: give at least one image.")
    return ds


def check_seed(seed: int | np.random.Generator | None) -> np.random.Generator:
    """Return a NumPy Generator from an int seed, a Generator, or None (seed 0)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        seed = 0
    return np.random.default_rng(check_seed_int(seed))


def check_seed_int(seed: Any, name: str = "seed") -> int:
    """Return ``seed`` as an int >= 0 or raise naming ``name`` and the fix."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"{name} must be an integer >= 0 (e.g. {name}=0), got {seed!r}.")
    return int(seed)


def check_percentile(value: Any, name: str = "percentile", *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float percentile on the 0-100 scale, in (0, 100).

    ``allow_zero`` admits 0 ([0, 100)). A value strictly between 0 and 1 is refused with a
    hint: it is almost always a fraction meant as a percentile (0.95 for 95), and taken
    literally it would call nearly every image a copy.
    """
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number on the 0-100 scale (e.g. 95), got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"{name} must be a number on the 0-100 scale (e.g. 95), got {value!r}."
        ) from None
    if 0.0 < v < 1.0:
        raise InputError(
            f"{name}={value!r} looks like a fraction; use {100.0 * v:g} ({name} is on the "
            f"0-100 scale: 95 means a nominal false copy rate of 5%)."
        )
    low_ok = v >= 0.0 if allow_zero else v > 0.0
    if not (low_ok and v < 100.0 and np.isfinite(v)):
        lb = "[0" if allow_zero else "(0"
        raise InputError(
            f"{name} must be in {lb}, 100) on the 0-100 scale (e.g. 95 for a nominal false "
            f"copy rate of 5%), got {value!r}."
        )
    return v


def check_detector(detector: Any, name: str = "detector", *, allow_none: bool = True) -> Any:
    """Return ``detector`` if it is a trained detector object (or None when allowed).

    A path (``"det/"``) is refused with the call that loads it; anything without
    ``embed`` and ``fingerprint`` (what the audit uses of a Detector) is refused naming
    its type.
    """
    if detector is None and allow_none:
        return None
    if isinstance(detector, (str, os.PathLike)):
        path = os.fspath(detector)
        raise InputError(
            f'{name} must be a trained detector object, got the path "{path}": load it first '
            f'with medmem.Detector.load("{path}") and pass the result.'
        )
    if not (hasattr(detector, "embed") and hasattr(detector, "fingerprint")):
        what = "a trained medmem.Detector" + (" or None (to train one)" if allow_none else "")
        raise InputError(
            f"{name} must be {what}, got {type(detector).__name__}. Train one with "
            "medmem.Detector.train(train) or load one with medmem.Detector.load(folder)."
        )
    return detector


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum`` or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_in_range(
    value: Any,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float within [low, high] (ends optionally open) or raise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (lo_ok and hi_ok and np.isfinite(v)):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise InputError(f"{name} must be in {lb}{low}, {high}{hb}, got {value!r}.")
    return v


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; else raise listing them (did you mean?)."""
    options = list(choices)
    if value in options:
        return value
    hint = ""
    close = get_close_matches(str(value), [str(c) for c in options], n=1)
    if close:
        hint = f" Did you mean {close[0]!r}?"
    raise InputError(f"{name} must be one of {options}, got {value!r}.{hint}")


def require_einops(where: str) -> None:
    """MONAI's attention blocks need einops; say so before MONAI fails deep inside."""
    import importlib.util

    if importlib.util.find_spec("einops") is None:
        raise InputError(
            f"the {where} network uses self-attention, which MONAI builds with the einops "
            "package (not installed). Install it: pip install einops."
        )


__all__ = [
    "require_einops",
    "check_choice",
    "check_dataset",
    "check_detector",
    "check_embeddings",
    "check_in_range",
    "check_percentile",
    "check_positive_int",
    "check_seed",
    "check_seed_int",
]


def check_keys(data: Any, allowed: Iterable[str], where: str) -> None:
    """Raise on keys not in ``allowed``, suggesting the closest spelling."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of settings, got {type(data).__name__}.")
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            close = get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"{where}: unknown setting {key!r}.{hint} Known settings: {sorted(allowed)}."
            )
