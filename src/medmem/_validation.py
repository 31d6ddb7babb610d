"""Input checks used once, at the public boundary (scikit-learn's manners)."""

from __future__ import annotations

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
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InputError(f"{name}: row {bad} contains NaN or infinity.")
    return arr


def check_seed(seed: int | np.random.Generator | None) -> np.random.Generator:
    """Return a NumPy Generator from an int seed, a Generator, or None (seed 0)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}.")
    return np.random.default_rng(int(seed))


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
    "check_embeddings",
    "check_in_range",
    "check_positive_int",
    "check_seed",
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
