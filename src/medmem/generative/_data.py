"""Training data for the generative models, the paper's augmentation, and sample files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmem._errors import InputError
from medmem._io import atomic_write_bytes, atomic_write_text
from medmem.data import ArrayDataset, load_dataset, make_phantom
from medmem.data.phantoms import _nifti_gz_bytes, _png_bytes, phantom_seed
from medmem.detector import apply_variation
from medmem.generative._config import GenerativeConfig, TrainConfig


def subset(dataset: Any, indices: Sequence[int]) -> Any:
    """The images ``indices`` of a medmem dataset, as a medmem dataset (ids kept)."""
    idx = [int(i) for i in indices]
    if hasattr(dataset, "subset"):
        return dataset.subset(idx)
    images = np.stack([dataset[i].numpy()[0] for i in idx])
    return ArrayDataset(
        images,
        ids=[dataset.ids[i] for i in idx],
        patient_ids=[dataset.patient_ids[i] for i in idx],
    )


def _phantoms(config: GenerativeConfig) -> ArrayDataset:
    d = config.data
    images, ids, pids = [], [], []
    for p in range(d.n_patients):
        for f in range(d.follow_ups):
            images.append(
                make_phantom(
                    phantom_seed(d.seed, p),
                    f,
                    spatial_dims=config.spatial_dims,
                    size=config.image_size,
                )
            )
            ids.append(f"P{p:04d}_{f:02d}")
            pids.append(f"P{p:04d}")
    return ArrayDataset(np.stack(images), ids=ids, patient_ids=pids)


def _load_files(config: GenerativeConfig, src: str, quiet: bool) -> Any:
    d = config.data
    source: Any = src
    if src.lower().endswith(".csv") and d.path_column != "path":
        import pandas as pd

        table = pd.read_csv(src)
        if d.path_column not in table.columns:
            raise InputError(
                f"{src}: no column {d.path_column!r} (data.path_column); columns are "
                f"{list(table.columns)}."
            )
        root = Path(src).parent
        source = [str(root / str(p)) for p in table[d.path_column]]
    return load_dataset(
        source,
        spatial_dims=config.spatial_dims,
        image_size=config.image_size,
        patient_id_pattern=d.patient_id_pattern,
        quiet=quiet,
    )


def build_datasets(config: GenerativeConfig, *, quiet: bool = False) -> tuple[Any, Any]:
    """(train, val) medmem datasets described by ``config.data``.

    Without ``data.val``, ``val_fraction`` of the patients (a seeded draw) are held out, so
    validation images never share a patient with training images. ``n_train`` then keeps
    the first n training images of a seeded shuffle. ``data.split = "control"`` returns
    instead, as the first set, as many images of the remaining patients (none of them in
    that training set or in validation), the training set of a negative-control generator.
    """
    d = config.data
    if d.source == "phantoms":
        full: Any = _phantoms(config)
    else:
        assert d.train is not None
        full = _load_files(config, d.train, quiet)
    rng = np.random.default_rng([d.seed, 1])
    if d.val is not None:
        train, val = full, _load_files(config, d.val, quiet)
        train_idx = np.arange(len(train))
    else:
        pids = [p if p is not None else f"__img{i}" for i, p in enumerate(full.patient_ids)]
        patients = sorted(set(pids))
        if len(patients) < 2:
            raise InputError(
                "cannot split one patient into training and validation; give data.val."
            )
        n_val = min(len(patients) - 1, max(1, round(d.val_fraction * len(patients))))
        held = set(rng.permutation(np.array(patients, dtype=object))[:n_val].tolist())
        train_idx = np.array([i for i, p in enumerate(pids) if p not in held])
        val = subset(full, [i for i, p in enumerate(pids) if p in held])
        train = full
    train_idx = rng.permutation(train_idx)
    if d.n_train is not None:
        if d.n_train > len(train_idx):
            raise InputError(
                f"data.n_train={d.n_train} but only {len(train_idx)} training images are "
                "available; lower n_train."
            )
        if d.split == "control":
            train_idx = _control_rows(train, train_idx, d.n_train)
        else:
            train_idx = train_idx[: d.n_train]
    train = subset(train, np.sort(train_idx).tolist())
    if len(train) < 2 or len(val) < 2:
        raise InputError(
            f"need at least 2 training and 2 validation images, got {len(train)} and {len(val)}."
        )
    return train, val


def _control_rows(full: Any, pool: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``full`` for a control training set: ``n`` images, in the pool's (shuffled)
    order, of patients none of whose images is among the pool's first ``n`` (the audited
    training set). Images without a patient id count as their own patient."""
    pids = [p if p is not None else f"__img{i}" for i, p in enumerate(full.patient_ids)]
    audited = {pids[int(i)] for i in pool[:n]}
    rest = np.array([int(i) for i in pool[n:] if pids[int(i)] not in audited], dtype=np.int64)
    if len(rest) < n:
        raise InputError(
            f"data.split 'control' needs {n} training images of patients outside the "
            f"training set, but only {len(rest)} are left ({len(pool)} available, "
            f"{n} in training): lower n_train to at most half the available images, or "
            "add patients."
        )
    return rest[:n]


def augment(x: torch.Tensor, rng: np.random.Generator, settings: TrainConfig) -> torch.Tensor:
    """The paper's augmentation of one image (1, *size): a flip and a rotation within
    +-max_rotation degrees, each applied with probability ``augment_prob``."""
    spatial_dims = x.ndim - 1
    axes = settings.flip_axes if settings.flip_axes is not None else (spatial_dims - 1,)
    u = rng.random(len(axes) + 1)
    angles = rng.uniform(
        -settings.max_rotation, settings.max_rotation, 1 if spatial_dims == 2 else 3
    )
    params: dict[str, Any] = {
        "flip": [a for a, v in zip(axes, u[:-1], strict=True) if v < settings.augment_prob]
    }
    if u[-1] < settings.augment_prob:
        params["rotate"] = angles.tolist()
    return apply_variation(x, params)


def write_samples(images: torch.Tensor, out: Path, *, prefix: str = "sample") -> Path:
    """Write (n, 1, *size) images in [0, 1] as 16-bit PNG (2D) or NIfTI .nii.gz (3D), plus
    ``manifest.csv`` (a ``path`` column) for ``medmem audit --synthetic``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = images.detach().cpu().float().clamp(0, 1).numpy()[:, 0]
    names = []
    for i, img in enumerate(arr):
        if img.ndim == 2:
            name = f"{prefix}{i:05d}.png"
            atomic_write_bytes(out / name, _png_bytes(img))
        else:
            name = f"{prefix}{i:05d}.nii.gz"
            atomic_write_bytes(out / name, _nifti_gz_bytes(img.astype(np.float32)))
        names.append(name)
    atomic_write_text(out / "manifest.csv", "path\n" + "".join(f"{n}\n" for n in names))
    return out


__all__ = ["augment", "build_datasets", "subset", "write_samples"]
