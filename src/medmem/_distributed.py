"""Running under torchrun: process groups, splitting work, gathering results in order.

``medmem`` commands started with ``torchrun --nproc-per-node N ...`` find ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in the environment; :func:`init_from_env` then joins the process
group (NCCL when CUDA is present, else gloo). Embedding splits the images into one
contiguous part per rank (:func:`split`) and gathers the embeddings back in the original
order (:func:`gather_rows`), so every rank holds the same arrays as a single process would,
and everything after embedding (search, thresholds, bootstrap) runs identically on every
rank. Rank 0 alone writes outputs (:func:`is_main`).

Without torchrun (or with one process) every function here is a no-op: ``split`` returns
all indices and ``gather_rows`` its input.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; True when distributed.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, and nothing more when
    the group is already initialised. Uses NCCL (one GPU per rank, ``LOCAL_RANK``) when CUDA
    is available, else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return is_distributed()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    """Where collectives run: this rank's GPU for NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def split(indices: np.ndarray) -> np.ndarray:
    """This rank's contiguous part of ``indices`` (``np.array_split`` order: rank 0 first)."""
    return np.array_split(np.asarray(indices), world_size())[rank()]


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows in rank order (each rank gets the whole array).

    ``local`` is this rank's (n_r, ...) part, as produced for :func:`split`'s indices.
    """
    if not is_distributed():
        return local
    dev = _device()
    counts = torch.zeros(world_size(), dtype=torch.int64, device=dev)
    counts[rank()] = len(local)
    dist.all_reduce(counts)
    width = int(counts.max())
    padded = torch.zeros((width, *local.shape[1:]), dtype=torch.float32, device=dev)
    padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32))
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    rows = [p[: int(c)].cpu().numpy() for p, c in zip(parts, counts.tolist(), strict=True)]
    return np.concatenate(rows, axis=0).astype(local.dtype, copy=False)


__all__ = [
    "barrier",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "split",
    "world_size",
]
