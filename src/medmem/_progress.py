"""One progress-bar helper for all long work; ``quiet=True`` silences it."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm  # the plain class: tqdm.auto iterates its input twice

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None,
    desc: str,
    total: int | None = None,
    *,
    quiet: bool = False,
    unit: str = "it",
) -> tqdm:
    """Wrap ``iterable`` in a tqdm bar on stderr, unless ``quiet``.

    The bar is returned, so callers can ``set_postfix(loss=...)`` while iterating; with
    ``iterable=None`` it is updated by hand (``bar.update(n)``).
    """
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=quiet,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


__all__ = ["progress"]
