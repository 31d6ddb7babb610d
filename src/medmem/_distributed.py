"""Running under torchrun: process groups, splitting work, gathering results in order.

``medmem`` commands started with ``torchrun --nproc-per-node N ...`` find ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in the environment; :func:`init_from_env` then joins the process
group (NCCL when CUDA is present, else gloo). Embedding splits the images into one
contiguous part per rank (:func:`split`) and gathers the embeddings back in the original
order (:func:`gather_rows`), so every rank holds the same arrays as a single process would,
and everything after embedding runs on every rank on the same arrays: the search splits
its queries across ranks the same way (``medmem.search.nearest``), thresholds and bootstrap
are repeated. Rank 0 alone writes outputs (:func:`is_main`).

Detector training is data-parallel the SimCLR way: every rank draws the same global batch
order, forwards its contiguous slice of each batch (:class:`RankBatches`), the embeddings
are gathered across ranks (:func:`all_gather_with_grad`) so NT-Xent sees the K images of
the global batch and their 2(K - 1) negatives, and the gradients, each rank's share of the
global loss's gradient, are summed (:func:`sum_gradients`): the same step as one process.

Without torchrun (or with one process) every function here is a no-op: ``split`` returns
all indices and ``gather_rows`` its input.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist

from medmem._errors import InputError


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; True when distributed.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, and nothing more when
    the group is already initialised. Uses NCCL (one GPU per rank, ``LOCAL_RANK``) when CUDA
    is available with a GPU for every process of the node, else gloo (NCCL cannot put two
    ranks on one GPU; under gloo the processes share the node's GPUs or run on the CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_initialized():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if torch.cuda.is_available() and torch.cuda.device_count() >= per_node:
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
    mine = torch.from_numpy(np.ascontiguousarray(local))  # dtype kept (float32, int64)
    padded = torch.zeros((width, *local.shape[1:]), dtype=mine.dtype, device=dev)
    padded[: len(local)] = mine
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    rows = [p[: int(c)].cpu().numpy() for p, c in zip(parts, counts.tolist(), strict=True)]
    return np.concatenate(rows, axis=0)


class RankBatches:
    """This rank's contiguous slice of every batch of ``batches`` (a batch sampler); the
    whole batch in one process. Every rank must iterate the same batches (same seed)."""

    def __init__(self, batches: Iterable[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield split(np.asarray(batch)).tolist()

    def __len__(self) -> int:
        assert isinstance(self.batches, Sized)
        return len(self.batches)


def check_batch_size(batch_size: int) -> None:
    """Raise unless the global batch splits evenly across the ranks."""
    if batch_size % world_size():
        raise InputError(
            f"batch_size {batch_size} does not split evenly across {world_size()} processes; "
            f"use a multiple of {world_size()}."
        )


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, in rank order; gradients flow to this rank's own
    rows (the other ranks' rows are constants here, as in SimCLR). Same shape on every
    rank."""
    if not is_distributed():
        return x
    # on the backend's device: gloo gathers CUDA tensors through the CPU (it has no CUDA
    # all_gather), NCCL CPU tensors through the rank's GPU; no copy when they agree
    mine = x.detach().to(_device()).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    parts = [p.to(x.device) for p in parts]
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def sum_gradients(model: torch.nn.Module) -> None:
    """Sum every parameter's gradient across ranks (each holds its rows' share)."""
    if not is_distributed():
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def _sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum): its backward sums the ranks' gradients."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated for a private successor; still the API
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span the global batch (every rank's rows), as
    one process computes them; ``torch.nn.SyncBatchNorm`` does this on GPUs only. Outside
    training, or in one process, it is plain batch norm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.numel() // input.shape[1] * world_size()  # equal rows on every rank
        mean = _sum_with_grad(input.sum(dims)) / count
        centred = input - mean.view(shape)
        var = _sum_with_grad((centred * centred).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            momentum = 0.1 if self.momentum is None else self.momentum
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), momentum)
        out = centred / torch.sqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def global_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every batch-norm layer computing global-batch statistics under
    torchrun (:class:`GlobalBatchNorm`, same parameters and buffers); unchanged otherwise."""
    if not is_distributed():
        return model
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            global_batchnorm(child)
    return model


__all__ = [
    "GlobalBatchNorm",
    "global_batchnorm",
    "RankBatches",
    "all_gather_with_grad",
    "check_batch_size",
    "sum_gradients",
    "barrier",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "split",
    "world_size",
]
