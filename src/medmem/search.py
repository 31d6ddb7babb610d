"""Exact nearest-neighbour search by Pearson correlation, in blocks.

Embeddings are standardised per vector (subtract the mean, divide by the norm), so the
inner product of two standardised vectors is their Pearson correlation. ``nearest`` then
computes the correlations block by block with matrix products and keeps a running top-k, so
memory is bounded by the block size and never holds the dense N x M matrix that a direct
implementation of the paper's Algorithm 1 would.

This module needs only arrays: it knows nothing of images or detectors.
"""

from __future__ import annotations

import numpy as np
import torch

from medmem._errors import InputError
from medmem._validation import check_embeddings, check_positive_int

# A (1024, 1024) float32 block (4 MiB) stays in cache; see benchmarks/search.py.
DEFAULT_BLOCK_SIZE = 1024


def standardize(x: np.ndarray | torch.Tensor, name: str = "embeddings") -> np.ndarray:
    """Return float32 rows with zero mean and unit norm (their inner product is Pearson's r).

    Raises ``InputError`` for a constant row, whose correlation is undefined.
    """
    arr = check_embeddings(x, name).astype(np.float64)
    arr -= arr.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    flat = norms[:, 0] <= 1e-12 * max(1.0, float(np.abs(arr).max(initial=0.0)))
    if flat.any():
        bad = int(np.flatnonzero(flat)[0])
        raise InputError(
            f"{name}: row {bad} is constant, so its Pearson correlation is undefined. "
            "Check the image behind it (a blank or constant image?)."
        )
    return (arr / norms).astype(np.float32)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense Pearson correlation matrix between rows of ``a`` and ``b`` (small inputs only)."""
    return standardize(a, "a") @ standardize(b, "b").T


def _sorted_candidates(
    values: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order candidates by value (descending), ties by lower index; keep k. Shapes (q, c)."""
    order = torch.argsort(indices, dim=1, stable=True)
    values = torch.gather(values, 1, order)
    indices = torch.gather(indices, 1, order)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(values, 1, order), torch.gather(indices, 1, order)


def _block_topk(sims: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of one block (q, b), ties broken by lowest column; global indices."""
    if k == 1:
        # torch.max returns the first maximal index: the tie rule holds without sorting.
        vals, idx = sims.max(dim=1, keepdim=True)
        return vals, idx + offset
    kk = min(k, sims.shape[1])
    vals, idx = torch.topk(sims, kk, dim=1, largest=True, sorted=True)
    # Rows whose k-th value is tied with columns topk did not return need the exact rule.
    kth = vals[:, -1:]
    n_ge = (sims >= kth).sum(dim=1)
    tied_rows = torch.nonzero(n_ge > kk).flatten()
    for r in tied_rows.tolist():
        row = sims[r]
        order = torch.argsort(row, descending=True, stable=True)[:kk]
        vals[r] = row[order]
        idx[r] = order
    vals, idx = _sorted_candidates(vals, idx, kk)
    return vals, idx + offset


@torch.no_grad()
def nearest(
    queries: np.ndarray | torch.Tensor,
    base: np.ndarray | torch.Tensor,
    k: int = 1,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    standardized: bool = False,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k Pearson correlations of each query row against the rows of ``base``.

    Args:
        queries: (n_queries, d) embeddings.
        base: (n_base, d) embeddings.
        k: how many neighbours to return per query (at most n_base).
        block_size: rows of queries and of base per block; peak extra memory is about
            ``block_size**2 * 4`` bytes, whatever the sizes of the inputs.
        standardized: the inputs are already standardised (skip that step).
        exclude_self: queries and base are the same set; a row is not its own neighbour.

    Returns:
        ``(values, indices)``, both (n_queries, k): correlations in descending order and the
        base rows they belong to. Ties go to the lower base index, so results are
        deterministic.

    Example:
        >>> values, indices = nearest(np.eye(3, 4), np.eye(3, 4), k=1)
        >>> indices[:, 0].tolist()
        [0, 1, 2]
    """
    k = check_positive_int(k, "k")
    block_size = check_positive_int(block_size, "block_size")
    if standardized:
        q = check_embeddings(queries, "queries")
        b = check_embeddings(base, "base", dim=q.shape[1])
    else:
        q = standardize(queries, "queries")
        b = standardize(base, "base")
    if q.shape[1] != b.shape[1]:
        raise InputError(
            f"queries have d={q.shape[1]} but base has d={b.shape[1]}: embeddings must come "
            "from the same detector."
        )
    n_base = b.shape[0] - (1 if exclude_self else 0)
    if k > n_base:
        raise InputError(f"k={k} is larger than the number of base rows available ({n_base}).")
    if exclude_self and q.shape[0] != b.shape[0]:
        raise InputError("exclude_self=True needs queries and base to be the same set.")

    qt = torch.from_numpy(q)
    bt = torch.from_numpy(b)
    n_q, n_b = qt.shape[0], bt.shape[0]
    out_v = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    buf = torch.empty(min(block_size, n_q) * min(block_size, n_b), dtype=torch.float32)
    for qs in range(0, n_q, block_size):
        qblock = qt[qs : qs + block_size]  # (bq, d)
        best_v: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for bs in range(0, n_b, block_size):
            bblock = bt[bs : bs + block_size]  # (bb, d)
            # reuse one buffer: no allocation per block, and it stays in cache
            sims = buf[: qblock.shape[0] * bblock.shape[0]].view(qblock.shape[0], -1)
            torch.mm(qblock, bblock.T, out=sims)  # (bq, bb)
            if exclude_self:
                rows = torch.arange(qblock.shape[0])
                cols = rows + qs - bs
                ok = (cols >= 0) & (cols < sims.shape[1])
                sims[rows[ok], cols[ok]] = -torch.inf
            v, i = _block_topk(sims, k, bs)
            if best_v is None:
                best_v, best_i = v, i
            elif k == 1:
                better = v > best_v  # strict: earlier (lower-index) block wins ties
                best_v = torch.where(better, v, best_v)
                best_i = torch.where(better, i, best_i)
            else:
                best_v, best_i = _sorted_candidates(
                    torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k
                )
        out_v[qs : qs + block_size] = best_v.numpy()
        out_i[qs : qs + block_size] = best_i.numpy()
    return out_v, out_i


__all__ = ["DEFAULT_BLOCK_SIZE", "nearest", "pearson", "standardize"]
