"""Training checkpoints of several networks and optimizers, without pickles.

One safetensors file, ``checkpoint.safetensors``, written atomically: tensors
``net/<network>/<key>`` and ``opt/<optimizer>/<param index>/<key>``; everything else (stage,
iteration, scale factor, config, training-set fingerprint, optimizer param_groups) as JSON
in the header. The optimizer (de)serialisation is the detector's
(:mod:`medmem.detector._checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medmem._errors import InputError
from medmem._io import read_versioned_tensors, save_tensors
from medmem.detector._checkpoint import flatten_optimizer_state, unflatten_optimizer_state

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "medmem.generative.checkpoint"
CHECKPOINT_SCHEMA = 1


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


__all__ = ["CHECKPOINT_NAME", "read_checkpoint", "restore", "save_checkpoint"]
