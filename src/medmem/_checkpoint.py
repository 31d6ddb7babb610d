"""Training checkpoints without pickles: the one checkpoint module of medmem.

Every training loop (detector, ``medmem.generative``, ``medmem.text2image``) writes ONE
safetensors file, ``checkpoint.safetensors``, atomically (a kill leaves the previous
checkpoint or the new one, never a mix), with a ``format`` and ``schema_version`` in its
JSON header:

* generative and text-to-image (``medmem.generative.checkpoint``): tensors
  ``net/<network>/<key>`` and ``opt/<optimizer>/<param index>/<key>``; the rest (stage,
  iteration, scale factor, config, training-set fingerprint, optimizer param_groups) as JSON;
* detector (``medmem.detector.checkpoint``): ``model/<key>`` for the encoder's state_dict and
  ``optimizer/<param index>/<key>``; epoch count, config, training-set fingerprint and size,
  loss history, the optimizer's param_groups and the scheduler's state_dict as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medmem._errors import InputError
from medmem._io import read_versioned_tensors, save_tensors

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "medmem.generative.checkpoint"
DETECTOR_FORMAT = "medmem.detector.checkpoint"
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


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A module's state_dict as CPU tensors named ``<prefix><key>``."""
    return {
        f"{prefix}{k}": v.detach().cpu().contiguous().clone()
        for k, v in module.state_dict().items()
    }


def write_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, fmt: str
) -> Path:
    """Write ``directory/checkpoint.safetensors`` atomically, ``meta`` in its header."""
    path = Path(directory) / CHECKPOINT_NAME
    save_tensors(path, tensors, {"format": fmt, "schema_version": CHECKPOINT_SCHEMA, **meta})
    return path


def read_checkpoint(
    directory: Path,
    *,
    fmt: str = CHECKPOINT_FORMAT,
    fix: str = "Delete it to start afresh, or use another run folder.",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(info, tensors) of ``directory/checkpoint.safetensors``, or None when absent."""
    return read_versioned_tensors(
        Path(directory) / CHECKPOINT_NAME, fmt=fmt, schema=CHECKPOINT_SCHEMA, fix=fix
    )


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
        tensors.update(module_tensors(net, f"net/{name}/"))
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = flatten_optimizer_state(opt.state_dict())
        tensors.update({f"opt/{name}/{k[len('optimizer/') :]}": v for k, v in t.items()})
        opt_meta[name] = meta
    return write_checkpoint(
        directory, tensors, {**info, "optimizers": opt_meta}, fmt=CHECKPOINT_FORMAT
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


def settings_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: a saved vs b now"`` for every setting that differs (one level of sections)."""
    diff = []
    for sec in sorted(set(saved) | set(now)):
        a, b = saved.get(sec), now.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [
                f"{sec}.{k}: {a.get(k)!r} saved vs {b.get(k)!r} now"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diff.append(f"{sec}: {a!r} saved vs {b!r} now")
    return diff


def check_resume(
    path: Path,
    meta: dict[str, Any],
    *,
    data: dict[str, Any],
    saved_settings: dict[str, Any],
    settings: dict[str, Any],
    elsewhere: str,
    may_change: Any = None,
) -> None:
    """Refuse to resume ``path`` with other training data (``data``: header key -> value
    now) or other settings; ``may_change(line)`` exempts a differing setting."""
    if any(meta.get(k) != v for k, v in data.items()):
        was = ", ".join(f"{k}={meta.get(k)!r}" for k in data if "fingerprint" not in k)
        now = ", ".join(f"{k}={v!r}" for k, v in data.items() if "fingerprint" not in k)
        raise InputError(
            f"{path} was written while training on other images ({was}; now {now}). "
            f"Resume with the same data, or use {elsewhere}."
        )
    diff = settings_diff(saved_settings, settings)
    diff = [d for d in diff if not (may_change and may_change(d))]
    if diff:
        raise InputError(
            f"{path} was written with other settings ({'; '.join(diff)}). Resume with the same "
            f"settings, or use {elsewhere}."
        )


# ---------------------------------------------------------------------------- the detector's
def save_detector_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: dict[str, Any],
) -> Path:
    """The detector's checkpoint (one network, its optimizer and LR scheduler)."""
    tensors = module_tensors(model, "model/")
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors.update(opt_tensors)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {**info, "optimizer": opt_meta, "scheduler": jsonable(sched)}
    return write_checkpoint(directory, tensors, meta, fmt=DETECTOR_FORMAT)


def read_detector_checkpoint(
    directory: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(info, tensors) of a detector checkpoint, or None when absent."""
    return read_checkpoint(
        directory,
        fmt=DETECTOR_FORMAT,
        fix="Delete it to start training afresh, or pass another checkpoint_dir.",
    )


def restore_detector(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load model, optimizer and scheduler state from a detector checkpoint, in place."""
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
    "DETECTOR_FORMAT",
    "check_resume",
    "settings_diff",
    "module_tensors",
    "read_detector_checkpoint",
    "restore_detector",
    "save_detector_checkpoint",
    "write_checkpoint",
    "flatten_optimizer_state",
    "jsonable",
    "read_checkpoint",
    "restore",
    "save_checkpoint",
    "unflatten_optimizer_state",
]
