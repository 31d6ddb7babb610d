"""Training checkpoints without pickles.

A checkpoint is ONE safetensors file, ``checkpoint.safetensors``, written atomically (so a
kill leaves either the previous checkpoint or the new one, never a mix):

* tensors: ``model/<name>`` for the encoder's state_dict (weights and BatchNorm buffers),
  ``optimizer/<param index>/<key>`` for every tensor of the optimizer state (AdamW's
  ``exp_avg``, ``exp_avg_sq``, ``step``);
* the rest as JSON in the header metadata under ``"medmem"``: epoch count, config,
  training-set fingerprint and size, loss history, the optimizer's param_groups and
  non-tensor state, the scheduler's state_dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medmem._checkpoint import flatten_optimizer_state, jsonable, unflatten_optimizer_state
from medmem._io import read_versioned_tensors, save_tensors

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "medmem.detector.checkpoint"
CHECKPOINT_SCHEMA = 1


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: dict[str, Any],
) -> Path:
    """Write ``directory/checkpoint.safetensors`` atomically; ``info`` goes into the JSON."""
    tensors = {
        f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors.update(opt_tensors)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": CHECKPOINT_SCHEMA,
        **info,
        "optimizer": opt_meta,
        "scheduler": jsonable(sched),
    }
    path = Path(directory) / CHECKPOINT_NAME
    save_tensors(path, tensors, meta)
    return path


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Return (info, tensors) of ``directory/checkpoint.safetensors``, or None if absent."""
    return read_versioned_tensors(
        Path(directory) / CHECKPOINT_NAME,
        fmt=CHECKPOINT_FORMAT,
        schema=CHECKPOINT_SCHEMA,
        fix="Delete it to start training afresh, or pass another checkpoint_dir.",
    )


def restore(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load model, optimizer and scheduler state from a checkpoint, in place."""
    model.load_state_dict(
        {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    )
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
    optimizer.load_state_dict(
        unflatten_optimizer_state(opt_tensors, meta["optimizer"], optimizer.state_dict())
    )
    sched = dict(meta["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)


__all__ = [
    "CHECKPOINT_NAME",
    "flatten_optimizer_state",
    "read_checkpoint",
    "restore",
    "save_checkpoint",
    "unflatten_optimizer_state",
]
