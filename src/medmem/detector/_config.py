"""``DetectorConfig``: every setting of the copy detector, frozen, checked once, saved as JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from medmem._errors import InputError
from medmem._section import ConfigSection
from medmem._validation import check_choice, check_in_range, check_keys, check_positive_int
from medmem.detector._variations import VariationConfig

ARCHS = ("resnet", "conv")
OBJECTIVES = ("copy", "identity")
NORMS = ("batch", "group", "instance")

# Settings that change how fast training runs but not its result; they are left out of the
# detector fingerprint and of the resume check.
RUNTIME_FIELDS = frozenset({"num_workers", "cache_bytes"})

# Defaults that depend on the dimension. 2D follows the paper (section 4.3); in 3D the
# paper's strided-conv encoder ("conv") collapsed to the chance loss on real MRI and
# phantoms within a CPU budget, so a 3D ResNet is the default and "conv" an option.
_DIM_DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"arch": "resnet", "embed_dim": 128, "batch_size": 64},
    3: {"arch": "resnet", "embed_dim": 32, "batch_size": 16},
}

#: The encoder works at most at this size per axis (``input_size`` None): larger images are
#: area-averaged down first. Copies are whole-image matches, which 64^2 / 32^3 resolve
#: (docs/results/detection.md); the training cost falls about fourfold (2D) to eightfold (3D).
MAX_INPUT_SIDE: dict[int, int] = {2: 64, 3: 32}


def conv_downsamplings(image_size: Iterable[int]) -> tuple[int, ...]:
    """Halvings per axis that bring ``image_size`` to 4 (the paper's 4^3 x 8 bottleneck).

    Every side must be 4 * 2**k; e.g. (64, 64, 64) -> (4, 4, 4), (32, 256, 256) -> (3, 6, 6).
    """
    size = tuple(int(s) for s in image_size)
    out = []
    for s in size:
        k = math.log2(s / 4) if s >= 4 else -1.0
        if k < 0 or k != int(k):
            valid = [4 * 2**j for j in range(9)]
            nearest = min(valid, key=lambda v: abs(v - s))
            raise InputError(
                f"arch='conv' needs every side of image_size to be 4 * 2**k "
                f"(4, 8, 16, 32, 64, 128, 256, ...), got image_size={size}. Crop or pad to "
                f"e.g. {tuple(min(valid, key=lambda v, t=t: abs(v - t)) for t in size)} "
                f"(side {s} -> {nearest}), or use arch='resnet'."
            )
        out.append(int(k))
    return tuple(out)


@dataclass(frozen=True)
class DetectorConfig(ConfigSection):
    """Settings of the self-supervised copy detector (architecture, training, variations).

    Fields left as None take the default for ``spatial_dims``: 2D -> arch "resnet",
    embed_dim 128, batch_size 64 (the paper's); 3D -> arch "resnet", embed_dim 32,
    batch_size 16 (the paper's 3D "conv" encoder, batch 10, is ``arch="conv"``).
    ``image_size`` None means "the training set's".

    Args:
        spatial_dims: 2 or 3.
        image_size: input size (without channel axis) the encoder is built for.
        input_size: the size the network works at; images are area-averaged down to it
            inside the encoder. None: each side of image_size capped at
            :data:`MAX_INPUT_SIDE` (64 in 2D, 32 in 3D); set it to image_size for no resampling.
        in_channels: image channels (medmem datasets have 1).
        arch: "resnet" (MONAI ResNet, last layer a dense layer to embed_dim; the paper's 2D
            model, the default in 2D and 3D) or "conv" (strided convolutions down to
            4^d x latent_channels, flatten, dense layers to embed_dim; the paper's 3D model).
        embed_dim: length of the embedding vector.
        norm: normalisation layers: "group" (8 groups), "batch" or "instance". Group norm
            is the default: it has no running statistics, so embeddings in eval mode match
            training even after a few hundred steps (with "batch", short runs gave near-
            constant eval embeddings) and do not depend on the batch size (3D batches are
            small).
        resnet_layers: residual blocks per ResNet stage ((1, 1, 1, 1) ~ ResNet-10, fast on
            CPU; (2, 2, 2, 2) = ResNet-18).
        resnet_channels: channels of the four ResNet stages (MONAI's block_inplanes).
        conv_channels: channels after the stem of the "conv" encoder; doubled at each
            downsampling up to ``conv_max_channels`` (MedDiff's n_hiddens = 16).
        conv_max_channels: cap on the "conv" encoder's channels.
        latent_channels: channels of the 4^d bottleneck of the "conv" encoder (paper: 8).
        hidden_dim: width of the dense layer of the "conv" head (authors' code: 128).
        dropout: dropout before the last dense layer of the "conv" head (authors' code: 0.5).
        temperature: NT-Xent temperature (authors' code: 0.07).
        epochs: at most this many epochs (authors' code: 200, always all of them); with
            ``early_stopping`` training usually ends sooner.
        early_stopping: stop when copy retrieval on a fixed probe set saturates: every
            ``eval_every`` epochs, ``probe_size`` training images and a fixed variation of
            each (drawn once, with the training variations) are embedded; the score is the
            share of variations whose most correlated probe image is their source, averaged
            over the last three checks. Training stops once it has not improved by
            ``min_delta`` for ``patience`` evaluations, after ``min_epochs``.
        probe_size: images in the probe set (at most the training set).
        eval_every: epochs between probe evaluations; 0 = about every 10 optimizer steps.
        patience: evaluations without improvement before stopping.
        min_delta: improvement of probe retrieval that counts (0.01: two more of 128 probes).
        min_epochs: never stop before this epoch; None = enough epochs for 150 steps.
        batch_size: images per batch, K; each brings its variation (2K in all).
        lr: peak learning rate. The authors' code used 1e-4 for 200 epochs of 10k images
            (>30k steps); 1e-3 reaches the same or better copy matching within the few
            hundred steps a CPU run affords, and did not hurt longer runs in our checks.
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio (authors' code: 0.5).
        weight_decay: AdamW weight decay (0 = Adam, as in the authors' code).
        warmup_fraction: share of all steps with a linear learning-rate warmup.
        seed: seeds initialisation, shuffling, variations and dropout.
        variations: which variations make a training pair, and their ranges.
        vary_both: vary both views of a pair (SimCLR); False varies only the second view
            (the paper's pairs (y_i, y_i')).
        objective: "copy" (the paper's: an image and its variation are the positives) or
            "identity" (same patient: every view of every image of a patient is a positive
            of every other, with the copy variations still applied; needs patient ids;
            patients with one image keep the copy objective, their two views). Early
            stopping still watches copy retrieval, so identity training is best run for a
            fixed number of epochs (``early_stopping=False``).
        num_workers: DataLoader worker processes (does not change the result).
        cache_bytes: the preprocessed training images are held in memory when they fit in
            this many bytes (read from disk once instead of every epoch); does not change the
            result.
    """

    spatial_dims: int = 2
    image_size: tuple[int, ...] | None = None
    input_size: tuple[int, ...] | None = None
    in_channels: int = 1
    arch: str | None = None
    embed_dim: int | None = None
    norm: str = "group"
    resnet_layers: tuple[int, ...] = (1, 1, 1, 1)
    resnet_channels: tuple[int, ...] = (32, 64, 128, 256)
    conv_channels: int = 16
    conv_max_channels: int = 256
    latent_channels: int = 8
    hidden_dim: int = 128
    dropout: float = 0.5
    temperature: float = 0.07
    epochs: int = 200
    early_stopping: bool = True
    probe_size: int = 128
    eval_every: int = 0
    patience: int = 6
    min_delta: float = 0.01
    min_epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.5
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    seed: int = 0
    variations: VariationConfig = field(default_factory=VariationConfig)
    vary_both: bool = False
    objective: str = "copy"
    num_workers: int = 0
    cache_bytes: int = 2**31

    @classmethod
    def default(cls, spatial_dims: int, **overrides: Any) -> DetectorConfig:
        """The paper's defaults for 2D or 3D, with ``overrides`` applied.

        Example:
            >>> DetectorConfig.default(3).arch
            'resnet'
        """
        return cls(spatial_dims=spatial_dims, **overrides)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        check_choice(self.spatial_dims, "DetectorConfig.spatial_dims", (2, 3))
        dims = _DIM_DEFAULTS[self.spatial_dims]
        for name, value in dims.items():
            if getattr(self, name) is None:
                set_(self, name, value)
        check_choice(self.arch, "DetectorConfig.arch", ARCHS)
        check_choice(self.norm, "DetectorConfig.norm", NORMS)
        for name in ("image_size", "input_size"):
            if getattr(self, name) is None:
                continue
            size = _int_tuple(getattr(self, name), f"DetectorConfig.{name}")
            if len(size) != self.spatial_dims:
                raise InputError(
                    f"DetectorConfig.{name} must have {self.spatial_dims} sides for "
                    f"spatial_dims={self.spatial_dims}, got {size}."
                )
            set_(self, name, size)
        net = self.encoder_input_size
        if net is not None:
            if self.arch == "conv":
                conv_downsamplings(net)
            elif min(net) < 16:
                raise InputError(
                    f"arch='resnet' needs images of at least 16 pixels a side, got {net}; "
                    "use arch='conv', larger images or a larger input_size."
                )
        check_positive_int(self.in_channels, "DetectorConfig.in_channels")
        check_positive_int(self.embed_dim, "DetectorConfig.embed_dim", minimum=2)
        layers = _int_tuple(self.resnet_layers, "DetectorConfig.resnet_layers")
        chans = _int_tuple(self.resnet_channels, "DetectorConfig.resnet_channels")
        if len(layers) != 4 or len(chans) != 4:
            raise InputError(
                "DetectorConfig.resnet_layers and resnet_channels need 4 entries (one per "
                f"ResNet stage), got {layers} and {chans}."
            )
        set_(self, "resnet_layers", layers)
        set_(self, "resnet_channels", chans)
        check_positive_int(self.conv_channels, "DetectorConfig.conv_channels")
        check_positive_int(self.conv_max_channels, "DetectorConfig.conv_max_channels")
        check_positive_int(self.latent_channels, "DetectorConfig.latent_channels")
        check_positive_int(self.hidden_dim, "DetectorConfig.hidden_dim")
        if self.norm == "group":
            widths = (
                chans if self.arch == "resnet" else (self.conv_channels, self.conv_max_channels)
            )
            if any(c % 8 for c in widths):
                raise InputError(
                    f"norm='group' uses 8 groups, so channel counts must be multiples of 8; "
                    f"got {widths}. Use norm='batch' or change the channels."
                )
        check_in_range(self.dropout, "DetectorConfig.dropout", 0.0, 1.0, high_open=True)
        check_in_range(
            self.temperature,
            "DetectorConfig.temperature",
            0.0,
            math.inf,
            low_open=True,
            high_open=True,
        )
        check_positive_int(self.epochs, "DetectorConfig.epochs")
        if not isinstance(self.early_stopping, bool):
            raise InputError(
                f"DetectorConfig.early_stopping must be True or False, got {self.early_stopping!r}."
            )
        check_positive_int(self.probe_size, "DetectorConfig.probe_size", minimum=4)
        check_positive_int(self.eval_every, "DetectorConfig.eval_every", minimum=0)
        check_positive_int(self.patience, "DetectorConfig.patience")
        check_in_range(self.min_delta, "DetectorConfig.min_delta", 0.0, 1.0)
        if self.min_epochs is not None:
            check_positive_int(self.min_epochs, "DetectorConfig.min_epochs")
        check_positive_int(self.cache_bytes, "DetectorConfig.cache_bytes", minimum=0)
        check_positive_int(self.batch_size, "DetectorConfig.batch_size", minimum=2)
        check_in_range(self.lr, "DetectorConfig.lr", 0.0, 1.0, low_open=True)
        check_in_range(self.min_lr_ratio, "DetectorConfig.min_lr_ratio", 0.0, 1.0)
        check_in_range(self.weight_decay, "DetectorConfig.weight_decay", 0.0, 10.0)
        check_in_range(
            self.warmup_fraction, "DetectorConfig.warmup_fraction", 0.0, 1.0, high_open=True
        )
        check_positive_int(self.seed, "DetectorConfig.seed", minimum=0)
        if isinstance(self.variations, dict):
            set_(self, "variations", VariationConfig.from_dict(self.variations))
        elif not isinstance(self.variations, VariationConfig):
            raise InputError(
                "DetectorConfig.variations must be a VariationConfig or a dict, got "
                f"{type(self.variations).__name__}."
            )
        if not isinstance(self.vary_both, bool):
            raise InputError(
                f"DetectorConfig.vary_both must be True or False, got {self.vary_both!r}."
            )
        check_choice(self.objective, "DetectorConfig.objective", OBJECTIVES)
        check_positive_int(self.num_workers, "DetectorConfig.num_workers", minimum=0)

    @property
    def encoder_input_size(self) -> tuple[int, ...] | None:
        """The size the network works at: ``input_size``, or image_size capped per axis."""
        if self.input_size is not None:
            return self.input_size
        if self.image_size is None:
            return None
        cap = MAX_INPUT_SIDE[self.spatial_dims]
        return tuple(min(s, cap) for s in self.image_size)

    def replace(self, **changes: Any) -> DetectorConfig:
        """A copy with ``changes`` applied (unknown names fail with a did-you-mean)."""
        check_keys(changes, [f.name for f in fields(self)], "DetectorConfig")
        new_dims = changes.get("spatial_dims", self.spatial_dims)
        if new_dims != self.spatial_dims:
            # Fields still at the old dimension's default follow the new dimension's.
            for name, value in _DIM_DEFAULTS.get(self.spatial_dims, {}).items():
                if name not in changes and getattr(self, name) == value:
                    changes[name] = None
        return replace(self, **changes)

    def identity_dict(self) -> dict[str, Any]:
        """The settings that determine the trained weights (no runtime-only fields).

        ``objective`` is left out at its default "copy", so detectors saved before it
        existed keep their fingerprint.
        """
        return identity_settings(self.to_dict())


def identity_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The weight-determining entries of a config dict (see ``identity_dict``)."""
    return {
        k: v
        for k, v in config.items()
        if k not in RUNTIME_FIELDS and not (k == "objective" and v == "copy")
    }


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        msg = f"{name} must be a sequence of positive integers, got {value!r}."
        raise InputError(msg) from None
    if not items or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in items
    ):
        raise InputError(f"{name} must be a sequence of positive integers, got {value!r}.")
    return tuple(int(v) for v in items)


__all__ = [
    "ARCHS",
    "MAX_INPUT_SIDE",
    "NORMS",
    "OBJECTIVES",
    "DetectorConfig",
    "conv_downsamplings",
    "identity_settings",
]
