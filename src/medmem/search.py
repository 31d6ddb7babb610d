"""Exact nearest-neighbour search by Pearson correlation, in blocks.

Embeddings are standardised per vector (subtract the mean, divide by the norm), so the
inner product of two standardised vectors is their Pearson correlation. ``nearest`` then
computes the correlations block by block with matrix products and keeps a running top-k, so
memory is bounded by the block size and never holds the dense N x M matrix that a direct
implementation of the paper's Algorithm 1 would.

``nearest`` runs where the embeddings are (a CUDA tensor is searched on its GPU), or with
FAISS (``backend="faiss"``, ``pip install medmem[faiss]``): its exact ``IndexFlatIP`` only,
so the verdict never depends on an approximate index. Both give the same neighbours and the
same tie rule (ties go to the lower base index).

This module needs only arrays: it knows nothing of images or detectors.
"""

from __future__ import annotations

import numpy as np
import torch

from medmem import _distributed
from medmem._errors import InputError
from medmem._validation import check_embeddings, check_positive_int

# 1024 queries x 256 base rows on the CPU (a 1 MiB block: CPU_BASE_DIVISOR). With square
# 1024 x 1024 blocks (4 MiB) the row maxima after each product took a tenth of the search's
# time (a probe on this 2-core machine, 512 KiB of L2 per core); in an A/B run there
# (20,000 x 100,000, three repetitions) the search's median share of the matmul rate was
# 69% with square blocks, 77% with a half, 79% with a quarter and 76% with an eighth. The
# smaller block keeps more of the products in cache for the maxima; the A/B, not a cache
# model, chose a quarter.
DEFAULT_BLOCK_SIZE = 1024
# On a GPU (measured on an H200, docs/benchmarks/search-gpu.md): 16384 searched 10^6 x 10^5
# in 1.06 s, 8192 in 1.26 s and 32768 in 1.12 s; 1024 took 27 s (Python per block).
DEFAULT_GPU_BLOCK_SIZE = 16384
BACKENDS = ("torch", "faiss")
_STANDARDIZE_ROWS = 65536  # rows standardised at a time: bounded float64 scratch memory
#: On the CPU each block pairs ``block_size`` queries with ``block_size // 4`` base rows (1
#: MiB of products at 1024, read again at once for the row maxima); 1 gives square blocks.
CPU_BASE_DIVISOR = 4
# Base blocks whose row maxima are kept before they are reduced (64 x 1024 floats: 256 KiB
# at the CPU default); reducing once per 64 blocks instead of after each took the top-1
# search closer to the rate of a loop of products alone (A/B in the commit message).
_MAXIMA_BLOCKS = 64


def _base_rows(block_size: int, device: torch.device) -> int:
    """Base rows per block: a quarter of ``block_size`` on the CPU, all of it on a GPU."""
    return block_size if device.type == "cuda" else max(1, block_size // CPU_BASE_DIVISOR)


def standardize(x: np.ndarray | torch.Tensor, name: str = "embeddings") -> np.ndarray:
    """Return float32 rows with zero mean and unit norm (their inner product is Pearson's r).

    Raises ``InputError`` for a constant row, whose correlation is undefined.
    """
    src = check_embeddings(x, name)
    out = np.empty_like(src)
    for start in range(0, len(src), _STANDARDIZE_ROWS):
        arr = src[start : start + _STANDARDIZE_ROWS].astype(np.float64)
        arr -= arr.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        flat = norms[:, 0] <= 1e-12 * max(1.0, float(np.abs(arr).max(initial=0.0)))
        if flat.any():
            bad = start + int(np.flatnonzero(flat)[0])
            raise InputError(
                f"{name}: row {bad} is constant, so its Pearson correlation is undefined. "
                "Check the image behind it (a blank or constant image?)."
            )
        out[start : start + _STANDARDIZE_ROWS] = arr / norms
    return out


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


def _mask_own(sims: torch.Tensor, own: torch.Tensor | None, start: int) -> None:
    """Set each row's own base column (``own[r] - start``, where inside the block) to -inf."""
    if own is None:
        return
    cols = own - start
    ok = (cols >= 0) & (cols < sims.shape[1])
    sims[torch.nonzero(ok).flatten(), cols[ok]] = -torch.inf


def _search_top1(
    q: torch.Tensor, b: torch.Tensor, block_size: int, own: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked exact top-1 of ``q @ b.T`` in two passes.

    A row's maximum (``amax``) is a fast vectorised reduction; the position of the maximum
    (``max``/``argmax``) costs about 15 times more per value on a CPU. So the first pass keeps
    only each query's maximum in each base block, written into a small table
    (``_MAXIMA_BLOCKS`` blocks x queries) that is reduced once per ``_MAXIMA_BLOCKS`` blocks
    to each query's best value and the first block holding it (ties go to the lower index);
    per block that leaves a product and a row maximum, nothing else. The second pass
    recomputes each query against its best block alone, the queries grouped by that block
    over the whole query set (few groups, so little Python per query), and takes the first
    position of the maximum there.
    """
    n_q, n_b = q.shape[0], b.shape[0]
    dev = q.device
    base_rows = _base_rows(block_size, dev)
    starts = list(range(0, n_b, base_rows))
    buf = torch.empty(min(block_size, n_q) * min(base_rows, n_b), device=dev)
    maxima = torch.empty((min(_MAXIMA_BLOCKS, len(starts)), min(block_size, n_q)), device=dev)
    best_block = torch.zeros(n_q, dtype=torch.int64, device=dev)  # first row of each best
    # views made once: per block the loop below is a product and a row maximum, nothing else
    blocks_t = [b[bs : bs + base_rows].T for bs in starts]  # (d, bb) each
    for qs in range(0, n_q, block_size):
        qblock = q[qs : qs + block_size]  # (bq, d)
        n_rows = qblock.shape[0]
        own_rows = own[qs : qs + n_rows] if own is not None else None
        best_v = torch.full((n_rows,), -torch.inf, device=dev)
        # reuse one buffer: no allocation per block, and it stays in cache
        full = buf[: n_rows * blocks_t[0].shape[1]].view(n_rows, -1)
        for c0 in range(0, len(starts), _MAXIMA_BLOCKS):
            chunk = starts[c0 : c0 + _MAXIMA_BLOCKS]
            table = maxima[: len(chunk), :n_rows]
            for bs, bt, row_max in zip(chunk, blocks_t[c0 : c0 + len(chunk)], table, strict=True):
                last = bt.shape[1] != full.shape[1]  # a shorter last block
                sims = buf[: n_rows * bt.shape[1]].view(n_rows, -1) if last else full
                torch.mm(qblock, bt, out=sims)  # (bq, bb)
                if own_rows is not None:
                    _mask_own(sims, own_rows, bs)
                torch.amax(sims, dim=1, out=row_max)
            # torch.max returns the first maximal index: the earliest block wins a tie, and
            # a later chunk replaces the best only with a strictly larger value
            m, j_best = table.max(dim=0)
            better = m > best_v
            best_v = torch.where(better, m, best_v)
            best = best_block[qs : qs + n_rows]
            best.copy_(torch.where(better, (j_best + c0) * base_rows, best))
    # second pass, over all queries at once: the queries that share a best block are
    # recomputed against it together (at most one group per base block, plus one per
    # ``block_size`` queries), and each takes the first position of its maximum there
    out_v = torch.empty((n_q, 1), dtype=torch.float32, device=dev)
    out_i = torch.empty((n_q, 1), dtype=torch.int64, device=dev)
    order = torch.argsort(best_block, stable=True)
    blocks, counts = torch.unique_consecutive(best_block[order], return_counts=True)
    pos = 0
    for bs, count in zip(blocks.tolist(), counts.tolist(), strict=True):
        bblock = b[bs : bs + base_rows]
        for r0 in range(pos, pos + count, block_size):
            rows = order[r0 : min(r0 + block_size, pos + count)]
            sims = buf[: rows.numel() * bblock.shape[0]].view(rows.numel(), -1)
            torch.mm(q.index_select(0, rows), bblock.T, out=sims)
            _mask_own(sims, own.index_select(0, rows) if own is not None else None, bs)
            # torch.max returns the first maximal index: the tie rule holds without sorting
            v, i = sims.max(dim=1)
            out_v[rows, 0] = v
            out_i[rows, 0] = i + bs
        pos += count
    return out_v, out_i


def _search_torch(
    q: torch.Tensor, b: torch.Tensor, k: int, block_size: int, own: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked exact top-k of ``q @ b.T`` on ``q``'s device; ``own[i]``: base row excluded
    for query i (or None). Returns (values, indices) tensors (n_q, k)."""
    if k == 1:
        return _search_top1(q, b, block_size, own)
    n_q, n_b = q.shape[0], b.shape[0]
    dev = q.device
    base_rows = _base_rows(block_size, dev)
    out_v = torch.empty((n_q, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=dev)
    buf = torch.empty(min(block_size, n_q) * min(base_rows, n_b), device=dev)
    for qs in range(0, n_q, block_size):
        qblock = q[qs : qs + block_size]  # (bq, d)
        n_rows = qblock.shape[0]
        # running top-k; placeholders (-inf, index n_b) lose every tie to a real column
        best_v = torch.full((n_rows, k), -torch.inf, device=dev)
        best_i = torch.full((n_rows, k), n_b, dtype=torch.int64, device=dev)
        for bs in range(0, n_b, base_rows):
            bblock = b[bs : bs + base_rows]  # (bb, d)
            # reuse one buffer: no allocation per block, and it stays in cache
            sims = buf[: n_rows * bblock.shape[0]].view(n_rows, -1)
            torch.mm(qblock, bblock.T, out=sims)  # (bq, bb)
            _mask_own(sims, own[qs : qs + n_rows] if own is not None else None, bs)
            # Only rows with a value above their k-th best so far can change (an equal value
            # loses the tie to the earlier, lower index); after the first blocks that is a
            # few rows, so the per-block cost beyond the matmul is one vectorised row max.
            rows = torch.nonzero(sims.amax(dim=1) > best_v[:, -1]).flatten()
            if rows.numel() == 0:
                continue
            sub = sims if rows.numel() == n_rows else sims.index_select(0, rows)
            v, i = _block_topk(sub, k, bs)
            if k > 1:
                v, i = _sorted_candidates(
                    torch.cat([best_v[rows], v], 1), torch.cat([best_i[rows], i], 1), k
                )
            best_v[rows] = v
            best_i[rows] = i
        out_v[qs : qs + n_rows] = best_v
        out_i[qs : qs + n_rows] = best_i
    return out_v, out_i


def _is_cuda(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_cuda


def _on_device(
    x: torch.Tensor, name: str, standardized: bool, dim: int | None = None
) -> torch.Tensor:
    """``x``, a CUDA tensor, checked and (unless ``standardized``) standardised on its device,
    as :func:`check_embeddings` and :func:`standardize` do on the host: the embeddings never
    leave the GPU. Anything those would reject goes through them, for the same error."""
    ok = x.ndim == 2 and x.shape[0] > 0 and x.shape[1] >= 2 and (dim in (None, x.shape[1]))
    ok = ok and not x.is_complex() and x.dtype != torch.bool
    out = x.float().contiguous() if ok else x
    ok = ok and bool(torch.isfinite(out).all())
    if ok and not standardized:
        std = torch.empty_like(out)
        for start in range(0, len(out), _STANDARDIZE_ROWS):
            arr = out[start : start + _STANDARDIZE_ROWS].double()
            arr -= arr.mean(dim=1, keepdim=True)
            norms = torch.linalg.vector_norm(arr, dim=1, keepdim=True)
            scale = max(1.0, float(arr.abs().max()))
            if bool((norms[:, 0] <= 1e-12 * scale).any()):
                ok = False  # a constant row: the host path names it
                break
            std[start : start + _STANDARDIZE_ROWS] = (arr / norms).float()
        out = std
    if ok:
        return out
    host = check_embeddings(x, name, dim=dim) if standardized else standardize(x, name)
    return torch.from_numpy(host).to(x.device)  # a d mismatch is named by nearest


def _import_faiss():  # noqa: ANN202 - faiss has no type stubs
    try:
        import faiss
    except ImportError as exc:
        raise InputError(
            'backend="faiss" needs the faiss package: pip install "medmem[faiss]" '
            '(or faiss-cpu); the default backend="torch" needs nothing more.'
        ) from exc
    return faiss


def _search_faiss(
    q: np.ndarray, b: np.ndarray, k: int, block_size: int, own: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k with FAISS's brute-force ``IndexFlatIP``, then the torch tie rule.

    FAISS returns one or two extra candidates per query; candidates are ordered by value
    then lower index, and a query whose k-th value ties the next candidate (so more tied
    rows may exist than FAISS returned) is searched again with the torch backend.
    """
    faiss = _import_faiss()
    n_q, n_b = q.shape[0], b.shape[0]
    index = faiss.IndexFlatIP(b.shape[1])
    index.add(b)
    kk = min(n_b, k + 1 + int(own is not None))
    out_v = torch.empty((n_q, k), dtype=torch.float32)
    out_i = torch.empty((n_q, k), dtype=torch.int64)
    step = max(block_size, 16384)  # queries per FAISS call: bounds the (step, kk) results
    for qs in range(0, n_q, step):
        dist, ids = index.search(q[qs : qs + step], kk)
        v, i = torch.from_numpy(dist), torch.from_numpy(ids)
        if own is not None:
            v = v.masked_fill(i == torch.from_numpy(own[qs : qs + len(v)])[:, None], -torch.inf)
        v, i = _sorted_candidates(v, i, kk)
        if kk < n_b:  # a tie at the k-th place may hide rows FAISS did not return
            tied = torch.nonzero(v[:, k - 1] == v[:, k]).flatten()
            if tied.numel():
                rows = (tied + qs).numpy()
                own_t = torch.from_numpy(own[rows]) if own is not None else None
                tv, ti = _search_torch(
                    torch.from_numpy(q[rows]), torch.from_numpy(b), k, block_size, own_t
                )
                v[tied, :k], i[tied, :k] = tv, ti
        out_v[qs : qs + len(v)] = v[:, :k]
        out_i[qs : qs + len(v)] = i[:, :k]
    return out_v, out_i


@torch.no_grad()
def nearest(
    queries: np.ndarray | torch.Tensor,
    base: np.ndarray | torch.Tensor,
    k: int = 1,
    *,
    block_size: int | None = None,
    standardized: bool = False,
    exclude_self: bool = False,
    backend: str = "torch",
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k Pearson correlations of each query row against the rows of ``base``.

    Args:
        queries: (n_queries, d) embeddings.
        base: (n_base, d) embeddings.
        k: how many neighbours to return per query (at most n_base).
        block_size: rows of queries per block (and of base rows: a quarter of it on the
            CPU); peak extra memory is about ``block_size**2`` bytes on the CPU and
            ``block_size**2 * 4`` on a GPU whatever the sizes of the inputs, beside the
            results and a few integers per query (k = 1: its best block, sorted). Default
            ``DEFAULT_BLOCK_SIZE`` (1024) on the CPU, ``DEFAULT_GPU_BLOCK_SIZE`` (16384,
            1 GiB) on a GPU.
        standardized: the inputs are already standardised (skip that step).
        exclude_self: queries and base are the same set; a row is not its own neighbour.
        backend: "torch" (default) or "faiss" (exact ``IndexFlatIP``, on the CPU).
        device: where the torch backend computes; default the device of ``queries`` when it
            is a tensor (a CUDA tensor is searched on its GPU), else the CPU.

    Under torchrun every rank must call ``nearest`` with the same inputs: each searches its
    contiguous share of the queries, and every rank returns the whole result.

    Returns:
        ``(values, indices)``, both (n_queries, k): correlations in descending order and the
        base rows they belong to. Ties go to the lower base index, so results are
        deterministic. A tie is equality in float32: a BLAS may round two mathematically
        equal correlations (duplicate images) 1 ulp apart depending on where their rows
        fall in a block, so on some CPUs duplicates can come back in either order.

    Example:
        >>> values, indices = nearest(np.eye(3, 4), np.eye(3, 4), k=1)
        >>> indices[:, 0].tolist()
        [0, 1, 2]
    """
    k = check_positive_int(k, "k")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if device is None:
        device = queries.device if isinstance(queries, torch.Tensor) else "cpu"
    dev = torch.device(device)
    on_gpu = backend == "torch" and dev.type == "cuda"
    if block_size is None:
        block_size = DEFAULT_GPU_BLOCK_SIZE if on_gpu else DEFAULT_BLOCK_SIZE
    block_size = check_positive_int(block_size, "block_size")
    # CUDA tensors searched on their GPU stay there: checked and standardised on the device
    gpu = on_gpu and _is_cuda(queries) and _is_cuda(base)
    if gpu:
        q = _on_device(queries.to(dev), "queries", standardized)
        b = _on_device(base.to(dev), "base", standardized, dim=q.shape[1])
    elif standardized:
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

    # under torchrun each rank searches its contiguous share of the queries (_distributed)
    rows = _distributed.split(np.arange(q.shape[0]))
    part = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)
    own = rows if exclude_self else None  # the base row each query may not match
    if gpu:
        own_t = torch.from_numpy(own).to(dev) if own is not None else None
        v, i = _search_torch(q[part], b, k, block_size, own_t)
    elif backend == "faiss":
        v, i = _search_faiss(q[part], b, k, block_size, own)
    else:
        qt, bt = torch.from_numpy(q[part]).to(dev), torch.from_numpy(b).to(dev)
        own_t = torch.from_numpy(own).to(dev) if own is not None else None
        v, i = _search_torch(qt, bt, k, block_size, own_t)
    return _distributed.gather_rows(v.cpu().numpy()), _distributed.gather_rows(i.cpu().numpy())


__all__ = [
    "BACKENDS",
    "CPU_BASE_DIVISOR",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GPU_BLOCK_SIZE",
    "nearest",
    "pearson",
    "standardize",
]
