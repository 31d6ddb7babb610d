"""``Detector``: train the self-supervised copy detector, embed images, save and load it.

Training (paper section 4.2.1 and supplement S1.1): each image y_i of a batch is paired
with a variation y_i' (flip, rotation, contrast); the encoder is trained with NT-Xent so
that each image lies close to its variation and far from the 2(K - 1) other images of the
batch. Copies of training images then lie close to them in the embedding space, where
Pearson's correlation is computed (``medmem.search``).

``objective="identity"`` trains "same patient" instead: with patient ids, every view of
every image of a patient in the batch is a positive (``multi_positive_nt_xent``), and
batches hold repeat patients in pairs (:class:`PatientPairBatches`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset

import medmem
from medmem import _distributed
from medmem._checkpoint import check_resume
from medmem._errors import (
    InputError,
    MedmemError,
    MedmemWarning,
    NotFittedError,
    OutputExistsError,
)
from medmem._io import atomic_save, atomic_write_json
from medmem._progress import progress
from medmem._seeds import derive_seed
from medmem._validation import check_positive_int
from medmem.detector import _checkpoint
from medmem.detector._cache import EmbeddingCache, embed_in_shards
from medmem.detector._config import DetectorConfig, identity_settings
from medmem.detector._encoder import ContrastiveEncoder, resample
from medmem.detector._loss import multi_positive_nt_xent, nt_xent
from medmem.detector._variations import apply_variation, needs_partner, sample_variation

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: input_size, early stopping, broader variations
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_encoder(config: DetectorConfig) -> ContrastiveEncoder:
    """The encoder described by ``config`` (random weights)."""
    return ContrastiveEncoder(
        config.spatial_dims,
        config.in_channels,
        config.embed_dim,
        arch=config.arch,
        image_size=config.image_size,
        input_size=config.encoder_input_size,
        norm=config.norm,
        resnet_layers=config.resnet_layers,
        resnet_channels=config.resnet_channels,
        conv_channels=config.conv_channels,
        conv_max_channels=config.conv_max_channels,
        latent_channels=config.latent_channels,
        hidden_dim=config.hidden_dim,
        dropout=config.dropout,
    )


def _draw_view(
    y: torch.Tensor, i: int, source: Any, rng: np.random.Generator, cfg: DetectorConfig
) -> torch.Tensor:
    """One variation of item ``i``; blends and patches take another item as the partner."""
    params = sample_variation(cfg.spatial_dims, rng, cfg.variations)
    partner = None
    if needs_partner(params):
        n = len(source)
        j = int(rng.integers(n - 1))
        j += j >= i
        partner = torch.as_tensor(source[j], dtype=torch.float32)
    return apply_variation(y, params, partner=partner)


class _ContrastivePairs(Dataset):
    """Item i -> (y_i, y_i'), the variation drawn from (seed, epoch, i): reproducible, and
    independent of batch order and DataLoader workers, so a resumed run is identical."""

    def __init__(self, dataset: Any, config: DetectorConfig, epoch: int) -> None:
        self.dataset = dataset
        self.config = config
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        y = torch.as_tensor(self.dataset[i], dtype=torch.float32)
        rng = np.random.default_rng([cfg.seed, self.epoch, int(i)])
        y_var = _draw_view(y, int(i), self.dataset, rng, cfg)
        if cfg.vary_both:
            y = _draw_view(y, int(i), self.dataset, rng, cfg)
        return y, y_var


class _LabelledPairs(_ContrastivePairs):
    """Item i -> (y_i, y_i', patient label of i): the identity objective's training pairs."""

    def __init__(
        self, dataset: Any, config: DetectorConfig, epoch: int, labels: np.ndarray
    ) -> None:
        super().__init__(dataset, config, epoch)
        self.labels = labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:  # type: ignore[override]
        y, y_var = super().__getitem__(i)
        return y, y_var, int(self.labels[i])


#: Below this many patients with two or more training images the identity objective
#: learns mostly the copy objective: a warning says so.
MIN_REPEAT_PATIENTS = 20


def patient_labels(patient_ids: Sequence[Any]) -> np.ndarray:
    """Integer label per image (equal ids, equal labels), in order of first appearance."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(str(p), len(seen)) for p in patient_ids], dtype=np.int64)


def identity_training_summary(labels: np.ndarray) -> dict[str, Any]:
    """Patients, repeat patients (two or more images) and their images, for the record."""
    counts = np.bincount(labels)
    repeat = counts >= 2
    n_rep = int(repeat.sum())
    return {
        "n_images": int(labels.size),
        "n_patients": int(counts.size),
        "n_repeat_patients": n_rep,
        "n_repeat_images": int(counts[repeat].sum()),
        "few_repeat_patients": n_rep < MIN_REPEAT_PATIENTS,
        "behaviour": (
            "images of the same patient are positives; a patient with one image keeps the "
            "copy objective (its image and its variation are the positives)"
        ),
    }


class PatientPairBatches:
    """Batches of the identity objective: each repeat patient's images, shuffled, in pairs
    (an odd last one joins the last pair), and every single-image patient alone; these units
    are shuffled and packed into batches of ``batch_size`` images (a unit never split, so a
    batch holds batch_size or batch_size + 1 or + 2 images). Seeded per epoch.

    Example:
        >>> b = PatientPairBatches(np.array([0, 0, 1, 2, 2, 3]), 2, seed=0)
        >>> sorted(len(x) for x in b)
        [2, 2, 2]
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int) -> None:
        self.labels = np.asarray(labels)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._batches = self._draw()

    def _draw(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, 0x1D])
        units: list[list[int]] = []
        for label in np.unique(self.labels):
            idx = rng.permutation(np.flatnonzero(self.labels == label)).tolist()
            pairs = [idx[i : i + 2] for i in range(0, len(idx) - 1, 2)] or [idx]
            if len(idx) > 1 and len(idx) % 2:
                pairs[-1].append(idx[-1])
            units.extend(pairs)
        order = rng.permutation(len(units))
        batches: list[list[int]] = []
        current: list[int] = []
        for u in order:
            current.extend(units[u])
            if len(current) >= self.batch_size:
                batches.append(current)
                current = []
        return batches  # the last incomplete batch is dropped

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class _AtInputSize:
    """A dataset's images resampled to the encoder's input size, where training views are
    made: a variation of a 64^2 (32^3) image costs a quarter (an eighth) of one at 128^2
    (64^3), and the encoder would average the larger image down to that size anyway. Held in
    memory as one tensor when they fit in ``cache_bytes`` (read from disk once), else read
    and resampled item by item."""

    def __init__(self, dataset: Any, size: tuple[int, ...], cache_bytes: int, quiet: bool):
        self.dataset = dataset
        self.size = tuple(size)
        self.images: torch.Tensor | None = None
        n = len(dataset)
        if n * 4 * math.prod(self.size) <= cache_bytes:
            items = progress(range(n), desc="reading training images", quiet=quiet, unit="image")
            self.images = torch.stack([self._read(i) for i in items])

    def _read(self, i: int) -> torch.Tensor:
        x = torch.as_tensor(self.dataset[i], dtype=torch.float32)
        return resample(x[None], self.size)[0] if tuple(x.shape[1:]) != self.size else x

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i] if self.images is not None else self._read(i)


def _standardize_rows(z: torch.Tensor) -> torch.Tensor:
    z = z.double() - z.double().mean(dim=1, keepdim=True)
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _Probe:
    """The early-stopping signal: copy retrieval on a fixed set of training images.

    ``size`` training images and one fixed variation of each (seeded, with the training
    variations) are embedded in eval mode. ``retrieval`` (the stopping score) = the share of
    variations whose most correlated probe image is their source. Also recorded: ``pos`` =
    each variation's correlation with its source; ``novel`` = each source's correlation with
    its nearest OTHER probe image (how a novel image of this data scores); ``margin`` = 5th
    percentile of pos - 95th percentile of novel. The margin is not the stopping score: an
    untrained encoder maps every image alike, so it starts high before it means anything.
    """

    def __init__(self, source: Any, cfg: DetectorConfig) -> None:
        n = len(source)
        rng = np.random.default_rng([cfg.seed, 0x9B0BE])
        idx = np.sort(rng.choice(n, size=min(cfg.probe_size, n), replace=False))
        self.originals = torch.stack([torch.as_tensor(source[int(i)]) for i in idx]).float()
        self.views = torch.stack(
            [_draw_view(self.originals[k], int(i), source, rng, cfg) for k, i in enumerate(idx)]
        )

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            e = [
                _standardize_rows(
                    torch.cat(
                        [model.net(x[s : s + 64].to(device)).cpu() for s in range(0, len(x), 64)]
                    )
                )
                for x in (self.originals, self.views)
            ]
        model.train(was_training)
        e_x, e_v = e
        c = e_v @ e_x.T  # (P, P): variation j vs source k
        pos = torch.diagonal(c)
        g = e_x @ e_x.T
        g.fill_diagonal_(-math.inf)
        novel = g.max(dim=1).values
        pos_q05 = float(torch.quantile(pos, 0.05))
        novel_q95 = float(torch.quantile(novel, 0.95))
        return {
            "margin": pos_q05 - novel_q95,
            "retrieval": float((c.argmax(dim=1) == torch.arange(len(c))).double().mean()),
            "pos_q05": pos_q05,
            "novel_q95": novel_q95,
        }


#: Early stopping compares the mean retrieval of this many latest checks.
SMOOTHING = 3


class _EarlyStopping:
    """Stop once probe retrieval (mean of the last three checks) has not improved by
    ``min_delta`` for ``patience`` checks."""

    def __init__(self, cfg: DetectorConfig, steps_per_epoch: int) -> None:
        self.enabled = cfg.early_stopping
        self.eval_every = cfg.eval_every or max(1, round(10 / steps_per_epoch))
        self.min_epochs = (
            cfg.min_epochs if cfg.min_epochs is not None else math.ceil(150 / steps_per_epoch)
        )
        self.patience = cfg.patience
        self.min_delta = cfg.min_delta
        self.history: list[dict[str, float]] = []
        self.best = -math.inf
        self.wait = 0

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Evaluate after ``epoch`` (1-based count of finished epochs)?"""
        return self.enabled and (epoch % self.eval_every == 0 or epoch == last_epoch)

    def update(self, epoch: int, scores: dict[str, float]) -> bool:
        """Record a check; True when training should stop."""
        self.history.append({"epoch": epoch, **scores})
        # the mean of the last three checks: one check of 128 probes moves by a few hits
        recent = [h["retrieval"] for h in self.history[-SMOOTHING:]]
        smoothed = sum(recent) / len(recent)
        self.history[-1]["retrieval_smoothed"] = smoothed
        if smoothed > self.best + self.min_delta:
            self.best, self.wait = smoothed, 0
        else:
            self.wait += 1
        return epoch >= self.min_epochs and self.wait >= self.patience

    def state(self) -> dict[str, Any]:
        best = None if math.isinf(self.best) else self.best
        return {"history": self.history, "best": best, "wait": self.wait}

    def restore(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        best = state.get("best")
        self.best = -math.inf if best is None else float(best)
        self.wait = int(state.get("wait", 0))


def _lr_factor(total_steps: int, warmup_fraction: float, min_lr_ratio: float):
    """Linear warmup, then cosine decay from 1 to ``min_lr_ratio`` (a LambdaLR factor)."""
    warmup = int(round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        progress_ = min(1.0, progress_)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress_))

    return factor


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_dataset(dataset: Any, name: str = "dataset") -> None:
    needed = ("spatial_dims", "image_size", "__len__", "__getitem__")
    missing = [a for a in needed if not hasattr(dataset, a)]
    if missing:
        raise InputError(
            f"{name} must be a medmem dataset (item i a (1, *image_size) tensor, with "
            f"spatial_dims and image_size); missing {missing}. Wrap arrays in "
            "medmem.data.ArrayDataset, or load files with medmem.load_dataset."
        )
    if len(dataset) == 0:
        raise InputError(f"{name} is empty.")


def chance_loss(batch_size: int) -> float:
    """NT-Xent when every embedding is the same: each of the 2K views sees its positive
    among 2K - 1 equally similar candidates, so the loss is ln(2K - 1)."""
    return math.log(2 * batch_size - 1)


def warn_if_not_learned(history: list[float], batch_size: int, cfg: DetectorConfig) -> bool:
    """Warn (and return True) when training ended at the chance loss: the embeddings have
    collapsed, every image looks like every other, tau will be about 1 and no copy can be
    found. Seen with the small 3D conv encoder on 32^3 volumes."""
    if not history:
        return False
    chance = chance_loss(batch_size)
    if history[-1] < 0.97 * chance:
        return False
    warnings.warn(
        f"the detector did not learn: its final loss {history[-1]:.3f} is not below the "
        f"chance value ln(2K - 1) = {chance:.3f} (K = {batch_size}), the loss when all "
        "embeddings are the same. Audits with it cannot find copies. Train longer "
        f"(epochs {cfg.epochs}), change the learning rate (lr {cfg.lr}) or the architecture "
        f"(arch {cfg.arch!r}; a 3D 'resnet' learned where 'conv' collapsed on 32^3 phantoms).",
        category=MedmemWarning,
        stacklevel=3,
    )
    return True


class Detector:
    """The self-supervised copy detector SS_theta: an encoder trained with NT-Xent.

    Build one with :meth:`train` or :meth:`load`; ``Detector(config)`` alone is untrained.
    The config (``self.config``) and the learned state (attributes ending in ``_``) are kept
    apart.

    Attributes:
        config: the :class:`DetectorConfig`.
        model_: the trained :class:`ContrastiveEncoder` (eval mode).
        train_fingerprint_: fingerprint of the training set.
        n_train_: number of training images.
        loss_history_: mean NT-Xent loss of each epoch (its length: epochs trained).
        probe_history_: the early-stopping checks (epoch, margin, retrieval, ...).
        stopped_early_: True when the probe margin saturated before ``config.epochs``.

    Example:
        >>> import numpy as np
        >>> from medmem.data import ArrayDataset
        >>> train = ArrayDataset(np.random.default_rng(0).random((8, 32, 32)))
        >>> det = Detector.train(train, epochs=1, batch_size=4, quiet=True)
        >>> det.embed(train, quiet=True).shape
        (8, 128)
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config
        self.model_: ContrastiveEncoder | None = None
        self.train_fingerprint_: str | None = None
        self.n_train_: int | None = None
        self.loss_history_: list[float] = []
        self.probe_history_: list[dict[str, float]] = []
        self.stopped_early_: bool = False
        self.identity_training_: dict[str, Any] | None = None
        self._device = torch.device("cpu")
        self._fingerprint: str | None = None
        self.source_: str | None = None  # the folder it was loaded from

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        dataset: Dataset,
        *,
        config: DetectorConfig | None = None,
        checkpoint_dir: str | Path | None = None,
        quiet: bool = False,
        device: str | torch.device | None = None,
        patient_ids: Sequence[Any] | None = None,
        **overrides: Any,
    ) -> Detector:
        """Train a detector on ``dataset`` (self-supervised: no labels needed).

        With ``objective="identity"`` the patient ids (``patient_ids``, else the dataset's)
        are needed: images of the same patient are then the positives.

        Args:
            dataset: a medmem dataset of training images.
            config: settings; default ``DetectorConfig.default(dataset.spatial_dims)``.
            checkpoint_dir: if given, a checkpoint is written there after every epoch and a
                later call with the same folder, data and settings resumes where it stopped
                (ending with the same weights as an uninterrupted run).
            quiet: no progress bars.
            device: "cpu", "cuda", ...; default CUDA when available. Same seed and data give
                identical weights on CPU.
            patient_ids: one id per training image, for ``objective="identity"``; default
                the dataset's ``patient_ids``.
            **overrides: DetectorConfig fields, e.g. ``epochs=20, lr=1e-3``.

        Example:
            >>> det = Detector.train(train, epochs=20, checkpoint_dir="runs/det")  # doctest: +SKIP
        """
        _check_dataset(dataset)
        spatial_dims = int(dataset.spatial_dims)
        image_size = tuple(int(s) for s in dataset.image_size)
        if config is None:
            config = DetectorConfig(spatial_dims=spatial_dims)
        elif not isinstance(config, DetectorConfig):
            raise InputError(f"config must be a DetectorConfig, got {type(config).__name__}.")
        if overrides:
            config = config.replace(**overrides)
        if config.spatial_dims != spatial_dims:
            raise InputError(
                f"config has spatial_dims={config.spatial_dims} but the dataset is "
                f"{spatial_dims}D; pass spatial_dims={spatial_dims} or "
                f"DetectorConfig.default({spatial_dims})."
            )
        if config.image_size is None:
            config = config.replace(image_size=image_size)
        elif config.image_size != image_size:
            raise InputError(
                f"config has image_size={config.image_size} but the dataset's images are "
                f"{image_size}; preprocess the images to {config.image_size} or leave "
                "image_size unset."
            )
        n = len(dataset)
        if n < 2:
            raise InputError(
                f"training needs at least 2 images (each batch contrasts an image with the "
                f"others), got {n}."
            )
        labels = None
        if config.objective == "identity":
            labels = _identity_labels(dataset, patient_ids)
        det = cls(config)
        det._device = _resolve_device(device)
        det._fit(dataset, checkpoint_dir=checkpoint_dir, quiet=quiet, labels=labels)
        return det

    @classmethod
    def random(
        cls,
        spatial_dims: int,
        image_size: Sequence[int],
        *,
        config: DetectorConfig | None = None,
        **overrides: Any,
    ) -> Detector:
        """An untrained detector: the encoder of ``config`` with its seeded random initial
        weights (``config.seed``), never trained on any image.

        A feature space independent of every data set, e.g. for a second FID beside the
        detector's own. Weak (random features see texture and intensity, little anatomy),
        but nothing in it was learned from the audited images.

        Example:
            >>> det = Detector.random(2, (32, 32), embed_dim=16)
            >>> det.n_train_
            0
        """
        if config is None:
            config = DetectorConfig(spatial_dims=int(spatial_dims))
        if overrides:
            config = config.replace(**overrides)
        config = config.replace(image_size=tuple(int(s) for s in image_size))
        det = cls(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            det.model_ = build_encoder(config).eval()
        det.n_train_ = 0
        return det

    def _fit(
        self,
        dataset: Dataset,
        *,
        checkpoint_dir: str | Path | None,
        quiet: bool,
        labels: np.ndarray | None = None,
    ) -> None:
        cfg = self.config
        assert cfg is not None
        n = len(dataset)  # type: ignore[arg-type]
        fingerprint = dataset.fingerprint()  # type: ignore[attr-defined]
        batch_size = min(cfg.batch_size, n)
        _distributed.check_batch_size(batch_size)
        steps_per_epoch = n // batch_size  # the last incomplete batch is dropped
        if labels is not None:
            if _distributed.world_size() > 1:
                raise InputError(
                    "objective='identity' trains in one process (its batches vary in size); "
                    "run it without torchrun."
                )
            # the patients' ids enter the fingerprint: other ids, other training
            fingerprint = hashlib.sha256(
                (fingerprint + "|" + ",".join(map(str, labels.tolist()))).encode()
            ).hexdigest()
            steps_per_epoch = max(1, len(PatientPairBatches(labels, batch_size, cfg.seed)))
            self.identity_training_ = identity_training_summary(labels)
        total_steps = cfg.epochs * steps_per_epoch
        device = self._device
        cache = cfg.cache_bytes if cfg.num_workers == 0 else 0  # workers each read their own
        source = _AtInputSize(dataset, cfg.encoder_input_size, cache, quiet)

        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):  # leave the caller's RNG alone
            torch.manual_seed(cfg.seed)
            # under torchrun batch norm uses the global batch's statistics (_distributed)
            model = _distributed.global_batchnorm(build_encoder(cfg)).to(device)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, _lr_factor(total_steps, cfg.warmup_fraction, cfg.min_lr_ratio)
            )
            stopper = _EarlyStopping(cfg, steps_per_epoch)
            probe = _Probe(source, cfg) if cfg.early_stopping else None
            history: list[float] = []
            start_epoch = 0
            stopped = False
            ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
            if ckpt_dir is not None:
                found = _checkpoint.read_checkpoint(ckpt_dir)
                if found is not None:
                    meta, tensors = found
                    _check_resume(ckpt_dir, meta, cfg, fingerprint, n)
                    _checkpoint.restore(
                        meta, tensors, model=model, optimizer=optimizer, scheduler=scheduler
                    )
                    start_epoch = int(meta["epoch"])
                    history = [float(v) for v in meta["loss_history"]]
                    stopper.restore(meta.get("early_stopping", {}))
                    stopped = bool(meta.get("stopped_early", False))
                    logger.info(
                        "resuming detector training from %s at epoch %d", ckpt_dir, start_epoch
                    )

            # one bar over all steps, so a resumed run shows where it picks up
            bar = progress(
                None, desc="training detector", total=total_steps, quiet=quiet, unit="step"
            )
            bar.update(start_epoch * steps_per_epoch)
            epoch = start_epoch
            while epoch < cfg.epochs and not stopped:
                epoch_seed = derive_seed(cfg.seed, epoch)
                torch.manual_seed(epoch_seed)  # dropout
                gen = torch.Generator().manual_seed(epoch_seed)  # shuffle and worker seeds
                if labels is not None:
                    pairs: Dataset = _LabelledPairs(source, cfg, epoch, labels)
                    batches: Any = PatientPairBatches(labels, batch_size, epoch_seed)
                else:
                    pairs = _ContrastivePairs(source, cfg, epoch)
                    # under torchrun: this rank's slice of each global batch (_distributed)
                    batches = _distributed.RankBatches(
                        BatchSampler(RandomSampler(pairs, generator=gen), batch_size, True)
                    )
                loader = DataLoader(
                    pairs,
                    batch_sampler=batches,
                    num_workers=cfg.num_workers,
                    generator=gen,
                    persistent_workers=False,
                )
                model.train()
                running = 0.0
                for step, items in enumerate(loader):
                    y = items[0].to(device, non_blocking=True)  # (K, C, *image_size)
                    y_var = items[1].to(device, non_blocking=True)
                    z = model.net(torch.cat([y, y_var]))  # (2K, embed_dim), at input size
                    # K = the global batch: embeddings gathered across ranks (_distributed)
                    z1 = _distributed.all_gather_with_grad(z[: len(y)])
                    z2 = _distributed.all_gather_with_grad(z[len(y) :])
                    if labels is not None:  # identity: same patient = positive
                        loss = multi_positive_nt_xent(z1, z2, items[2].to(device), cfg.temperature)
                    else:
                        loss = nt_xent(z1, z2, cfg.temperature)
                    if not torch.isfinite(loss):
                        raise MedmemError(
                            f"detector training diverged at epoch {epoch + 1}, step {step + 1} "
                            f"(loss {loss.item()}); lower lr (now {cfg.lr}) or raise "
                            f"temperature (now {cfg.temperature})."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    _distributed.sum_gradients(model)
                    optimizer.step()
                    scheduler.step()
                    running += loss.item()
                    bar.update(1)
                    bar.set_postfix(
                        epoch=f"{epoch + 1}/{cfg.epochs}",
                        loss=f"{running / (step + 1):.4f}",
                        refresh=False,
                    )
                history.append(running / steps_per_epoch)
                epoch += 1
                logger.debug("detector epoch %d/%d: loss %.4f", epoch, cfg.epochs, history[-1])
                if probe is not None and stopper.due(epoch, cfg.epochs):
                    scores = probe.evaluate(model, device)
                    stopped = stopper.update(epoch, scores) and epoch < cfg.epochs
                    bar.set_postfix(
                        epoch=f"{epoch}/{cfg.epochs}",
                        loss=f"{history[-1]:.4f}",
                        retrieval=f"{scores['retrieval']:.3f}",
                        refresh=False,
                    )
                    if stopped:
                        logger.info(
                            "detector: probe retrieval saturated at %.3f; stopped at epoch %d/%d",
                            stopper.best,
                            epoch,
                            cfg.epochs,
                        )
                if ckpt_dir is not None and _distributed.is_main():
                    _checkpoint.save_checkpoint(
                        ckpt_dir,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        info={
                            "epoch": epoch,
                            "config": cfg.to_dict(),
                            "train_fingerprint": fingerprint,
                            "n_train": n,
                            "loss_history": history,
                            "early_stopping": stopper.state(),
                            "stopped_early": stopped,
                            "medmem_version": medmem.__version__,
                        },
                    )

            bar.close()
        warn_if_not_learned(history, batch_size, cfg)
        model.eval()
        self.model_ = model
        self.train_fingerprint_ = fingerprint
        self.n_train_ = n
        self.loss_history_ = history
        self.probe_history_ = stopper.history
        self.stopped_early_ = stopped
        self._fingerprint = None

    # ------------------------------------------------------------------ embedding
    def embed(
        self,
        dataset: Dataset,
        *,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        quiet: bool = False,
    ) -> np.ndarray:
        """Embeddings of every image of ``dataset``, in order: float32 (n, embed_dim).

        Args:
            dataset: a medmem dataset with the detector's spatial_dims and image_size.
            batch_size: images per forward pass.
            cache_dir: if given, embeddings are cached there, keyed by this detector's
                fingerprint and each image's ``item_key`` (content + preprocessing), so an
                unchanged image is read back and a changed one recomputed.
            num_workers: DataLoader workers reading the images.
            quiet: no progress bar.

        Example:
            >>> emb = det.embed(train, cache_dir="cache/")  # doctest: +SKIP
        """
        self._require_fitted()
        cfg = self.config
        assert cfg is not None
        _check_dataset(dataset)
        check_positive_int(batch_size, "batch_size")
        check_positive_int(num_workers, "num_workers", minimum=0)
        size = tuple(int(s) for s in dataset.image_size)  # type: ignore[attr-defined]
        if int(dataset.spatial_dims) != cfg.spatial_dims or size != cfg.image_size:  # type: ignore[attr-defined]
            raise InputError(
                f"the dataset has spatial_dims={dataset.spatial_dims}, image_size={size}, but "  # type: ignore[attr-defined]
                f"this detector was trained on spatial_dims={cfg.spatial_dims}, image_size="
                f"{cfg.image_size}; preprocess the images to image_size={cfg.image_size} (the "
                "same preprocessing as the training set)."
            )
        n = len(dataset)  # type: ignore[arg-type]
        cache = keys = None
        if cache_dir is not None:
            cache = EmbeddingCache(cache_dir, self.fingerprint, cfg.embed_dim)
            keys = [dataset.item_key(i) for i in range(n)]  # type: ignore[attr-defined]

        # sharded (resumable) and, under torchrun, split across ranks: medmem.detector._cache
        def compute(idx: np.ndarray) -> np.ndarray:
            return self._forward(Subset(dataset, idx.tolist()), batch_size, num_workers, quiet)

        return embed_in_shards(compute, n, cfg.embed_dim, cache, keys)

    def _forward(
        self, dataset: Dataset, batch_size: int, num_workers: int, quiet: bool
    ) -> np.ndarray:
        model = self._require_fitted()
        cfg = self.config
        assert cfg is not None
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        chunks = []
        expected = (cfg.in_channels, *cfg.image_size)
        model.eval()
        with torch.no_grad():
            for batch in progress(
                iter(loader), desc="embedding", total=len(loader), quiet=quiet, unit="batch"
            ):
                if tuple(batch.shape[1:]) != expected:
                    raise InputError(
                        f"dataset items have shape {tuple(batch.shape[1:])}, expected "
                        f"{expected} (channels, *image_size)."
                    )
                z = model(batch.to(self._device, dtype=torch.float32))  # (B, embed_dim)
                chunks.append(z.float().cpu().numpy())
        return np.concatenate(chunks, axis=0)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically).

        Returns the directory. Load it back with :meth:`load`; nothing is pickled. A folder
        that already holds a saved detector is only replaced with ``overwrite=True``.

        Example:
            >>> det.save("det/")  # doctest: +SKIP
        """
        model = self._require_fitted()
        cfg = self.config
        assert cfg is not None
        directory = Path(directory)
        existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (directory / n).exists()]
        if existing and not overwrite:
            raise OutputExistsError(
                f"{directory} already holds a saved detector ({', '.join(existing)}); pass "
                "overwrite=True to replace it, or choose another folder."
            )
        directory.mkdir(parents=True, exist_ok=True)
        state = _state_tensors(model)
        atomic_save(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        # config.json last: it names the weights' fingerprint, so a crash between the two
        # writes is detected by load.
        atomic_write_json(
            directory / CONFIG_NAME,
            {
                "schema_version": SCHEMA_VERSION,
                "kind": "medmem.Detector",
                "config": cfg.to_dict(),
                "fingerprint": self.fingerprint,
                "train_fingerprint": self.train_fingerprint_,
                "n_train": self.n_train_,
                "loss_history": self.loss_history_,
                "probe_history": self.probe_history_,
                "stopped_early": self.stopped_early_,
                "identity_training": self.identity_training_,
                "medmem_version": medmem.__version__,
            },
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device | None = None) -> Detector:
        """Rebuild a detector saved with :meth:`save` (JSON + safetensors; never unpickles).

        Example:
            >>> det = Detector.load("det/")  # doctest: +SKIP
        """
        directory = Path(directory)
        cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise InputError(
                    f"{p} not found: {directory} is not a saved detector (it needs "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by Detector.save)."
                )
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("top level is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{cfg_path}: corrupt JSON ({exc}). Save the detector again.") from exc
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                f"{cfg_path}: schema_version {version!r} is not supported (this medmem reads "
                f"{SCHEMA_VERSION}; version 1 detectors predate input_size and early stopping). "
                "Train the detector again with this version (medmem train-detector)."
            )
        if "config" not in meta:
            raise InputError(f"{cfg_path}: has no 'config' entry. Save the detector again.")
        try:
            config = DetectorConfig.from_dict(meta["config"])
        except InputError as exc:
            raise InputError(f"{cfg_path}: {exc}") from exc
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"{weights_path}: not a readable safetensors file ({exc}). Save the detector again."
            ) from exc
        model = build_encoder(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(
                f"{weights_path}: weights do not fit the architecture in {cfg_path} ({exc})."
            ) from exc
        det = cls(config)
        det._device = _resolve_device(device)
        det.model_ = model.to(det._device).eval()
        det.train_fingerprint_ = meta.get("train_fingerprint")
        det.n_train_ = meta.get("n_train")
        det.loss_history_ = [float(v) for v in meta.get("loss_history", [])]
        det.probe_history_ = [dict(h) for h in meta.get("probe_history", [])]
        det.stopped_early_ = bool(meta.get("stopped_early", False))
        det.identity_training_ = meta.get("identity_training")
        det.source_ = str(directory)  # named by the audit's compatibility checks
        saved_fp = meta.get("fingerprint")
        if not saved_fp:
            raise InputError(
                f"{cfg_path}: has no 'fingerprint' entry, so the detector cannot be identified "
                "in an audit. Save the detector again (Detector.save, medmem train-detector)."
            )
        if saved_fp != det.fingerprint:
            raise InputError(
                f"{weights_path} does not match {cfg_path} (fingerprint {det.fingerprint[:12]} "
                f"vs {str(saved_fp)[:12]} recorded): the folder was modified or half written. "
                "Save the detector again."
            )
        return det

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """SHA-256 over the config (JSON, runtime-only fields left out) and weight bytes."""
        model = self._require_fitted()
        if self._fingerprint is None:
            cfg = self.config
            assert cfg is not None
            h = hashlib.sha256()
            h.update(json.dumps(cfg.identity_dict(), sort_keys=True).encode())
            for name, t in sorted(_state_tensors(model).items()):
                h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def epochs_trained(self) -> int:
        """Epochs actually trained (early stopping may end before ``config.epochs``)."""
        return len(self.loss_history_)

    @property
    def is_fitted(self) -> bool:
        """True after :meth:`train` or :meth:`load`."""
        return self.model_ is not None

    @property
    def device(self) -> torch.device:
        """Where the encoder runs."""
        return self._device

    def _require_fitted(self) -> ContrastiveEncoder:
        if self.model_ is None:
            raise NotFittedError(
                "this Detector is not trained: call Detector.train or Detector.load first."
            )
        return self.model_

    def __repr__(self) -> str:
        if self.config is None:
            return "Detector(untrained)"
        c = self.config
        state = f"n_train={self.n_train_}" if self.is_fitted else "untrained"
        return (
            f"Detector(spatial_dims={c.spatial_dims}, image_size={c.image_size}, arch={c.arch!r}, "
            f"embed_dim={c.embed_dim}, {state})"
        )


def _identity_labels(dataset: Any, patient_ids: Sequence[Any] | None) -> np.ndarray:
    """Patient labels for the identity objective; InputError without ids, a warning with
    few repeat patients."""
    ids = (
        list(patient_ids) if patient_ids is not None else list(getattr(dataset, "patient_ids", []))
    )
    if patient_ids is not None and len(ids) != len(dataset):
        raise InputError(f"patient_ids must have {len(dataset)} items, got {len(ids)}.")
    if len(ids) != len(dataset) or any(p is None for p in ids):
        raise InputError(
            "objective='identity' needs a patient id for every training image (images of the "
            "same patient are its positives); none or not all are known. Pass patient_ids=..., "
            "load the images with patient_id_pattern / a manifest with patient_id, or use "
            "objective='copy'."
        )
    labels = patient_labels(ids)
    info = identity_training_summary(labels)
    if info["few_repeat_patients"]:
        warnings.warn(
            f"only {info['n_repeat_patients']} of {info['n_patients']} training patients have "
            f"two or more images (fewer than {MIN_REPEAT_PATIENTS}): the identity objective "
            "then learns mostly the copy objective (a patient with one image keeps its image "
            "and its variation as positives), so the identity scores say little about "
            "patients. Give more follow-up studies per patient.",
            MedmemWarning,
            stacklevel=3,
        )
    return labels


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _check_resume(
    ckpt_dir: Path, meta: dict[str, Any], cfg: DetectorConfig, fingerprint: str, n: int
) -> None:
    """Refuse to resume a checkpoint made with other data or other settings (the one
    resume check of medmem._checkpoint, as generative and text-to-image training)."""
    check_resume(
        ckpt_dir / _checkpoint.CHECKPOINT_NAME,
        meta,
        data={"n_train": n, "train_fingerprint": fingerprint},
        saved_settings=identity_settings(meta.get("config", {})),
        settings=cfg.identity_dict(),
        elsewhere="a new checkpoint_dir",
    )


__all__ = [
    "MIN_REPEAT_PATIENTS",
    "Detector",
    "PatientPairBatches",
    "build_encoder",
    "identity_training_summary",
    "patient_labels",
]
