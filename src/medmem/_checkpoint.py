"""Training checkpoints of several networks and optimizers, without pickles.

Shared by the training loops of ``medmem.generative`` and ``medmem.text2image`` (the
detector keeps its own single-network layout but shares the optimizer (de)serialisation).
One safetensors file, ``checkpoint.safetensors``, written atomically: tensors
``net/<network>/<key>`` and ``opt/<optimizer>/<param index>/<key>``; everything else (stage,
iteration, scale factor, config, training-set fingerprint, optimizer param_groups) as JSON
in the header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medmem._errors import InputError
from medmem._io import read_versioned_tensors, save_tensors

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "medmem.generative.checkpoint"
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
    groups = [jsonable(dict(g)) for g in state["param_groups"]]
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


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON")


def save_checkpoint(
    directory: Path,
    *,
    networks: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    info: dict[str, Any],
) -> Path:
    """Write ``directory/checkpoint.safetensors`` atomically; ``info`` goes into the JSON."""
    tensors: dict[str, torch.Tensor] = {}
    for name, net in networks.items():
        for k, v in net.state_dict().items():
            tensors[f"net/{name}/{k}"] = v.detach().cpu().contiguous().clone()
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = flatten_optimizer_state(opt.state_dict())
        tensors.update({f"opt/{name}/{k[len('optimizer/') :]}": v for k, v in t.items()})
        opt_meta[name] = meta
    meta = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": CHECKPOINT_SCHEMA,
        **info,
        "optimizers": opt_meta,
    }
    path = Path(directory) / CHECKPOINT_NAME
    save_tensors(path, tensors, meta)
    return path


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(info, tensors) of ``directory/checkpoint.safetensors``, or None when absent."""
    return read_versioned_tensors(
        Path(directory) / CHECKPOINT_NAME,
        fmt=CHECKPOINT_FORMAT,
        schema=CHECKPOINT_SCHEMA,
        fix="Delete it to start afresh, or use another run folder.",
    )


def restore(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    networks: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> None:
    """Load the networks and optimizers named in the checkpoint, in place (strict)."""
    for name, net in networks.items():
        prefix = f"net/{name}/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise InputError(f"checkpoint has no weights for network {name!r}.")
        net.load_state_dict(state, strict=True)
    for name, opt in optimizers.items():
        prefix = f"opt/{name}/"
        t = {"optimizer/" + k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if name not in meta["optimizers"]:
            raise InputError(f"checkpoint has no state for optimizer {name!r}.")
        opt.load_state_dict(
            unflatten_optimizer_state(t, meta["optimizers"][name], opt.state_dict())
        )


__all__ = [
    "CHECKPOINT_NAME",
    "flatten_optimizer_state",
    "jsonable",
    "read_checkpoint",
    "restore",
    "save_checkpoint",
    "unflatten_optimizer_state",
]
