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

from medmem._io import read_versioned_tensors, save_tensors

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "medmem.detector.checkpoint"
CHECKPOINT_SCHEMA = 1


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if "/" in str(key):
                raise ValueError(f"optimizer state key {key!r} contains '/'")
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{int(pid)}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(int(pid)), {})[key] = value
    groups = [_jsonable(dict(g)) for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict, template: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; ``template`` is a fresh optimizer's
    state_dict, used to restore tuples (JSON has only lists)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, pstate in meta["state_scalars"].items():
        state.setdefault(int(pid), {}).update(pstate)
    groups = []
    for saved, fresh in zip(meta["param_groups"], template["param_groups"], strict=True):
        g = dict(saved)
        for key, value in fresh.items():
            if isinstance(value, tuple) and isinstance(g.get(key), list):
                g[key] = tuple(g[key])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON")


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
        "scheduler": _jsonable(sched),
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
