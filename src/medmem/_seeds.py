"""Seeds and batch orders that are pure functions of their arguments, so that a training
run resumed from a checkpoint continues exactly as an uninterrupted one would."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, stage, iteration)), independent across parts."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def batch_indices(n: int, batch_size: int, iteration: int, seed: int, stage: int) -> list[int]:
    """Indices of a stage's batch ``iteration``: consecutive slices of per-epoch seeded
    permutations (every image once per epoch), a pure function of its arguments."""
    return [
        int(_permutation(n, seed, stage, pos // n)[pos % n])
        for pos in range(iteration * batch_size, (iteration + 1) * batch_size)
    ]


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, epoch, 7]).permutation(n)


__all__ = ["batch_indices", "derive_seed"]
