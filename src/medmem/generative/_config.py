"""``GenerativeConfig``: a frozen dataclass tree for every generative model, loaded from YAML.

One tree covers the three model kinds of the paper (section 2.1 and 2.4.2):

* ``model: ldm`` -- latent diffusion: a first-stage autoencoder (``autoencoder``; KL or
  vector-quantised) then a diffusion UNet on its scaled latents (``diffusion``);
* ``model: vae`` -- the autoencoder alone, sampled from its N(0, I) prior;
* ``model: gan`` -- a DCGAN-style generator against a patch discriminator (``gan``).

Unknown keys fail with a did-you-mean at every level; values are checked in
``__post_init__``; ``to_dict``/``from_dict`` round-trip through JSON/YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmem._errors import InputError
from medmem._section import ConfigSection
from medmem._validation import check_choice, check_in_range, check_percentile, check_positive_int

MODEL_KINDS = ("ldm", "vae", "gan")
AUTOENCODER_KINDS = ("kl", "vq")
SAMPLERS = ("ddpm", "ddim")
DATA_SOURCES = ("files", "phantoms")
DATA_SPLITS = ("train", "control")
BETA_SCHEDULES = ("linear_beta", "scaled_linear_beta")


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise InputError(f"{name} must be a list of positive integers, got {value!r}.") from None
    if not items or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items
    ):
        raise InputError(f"{name} must be a list of positive integers, got {value!r}.")
    return tuple(int(v) for v in items)


def _bool_tuple(value: Any, name: str, n: int) -> tuple[bool, ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(items) != n or not all(isinstance(v, bool) for v in items):
        raise InputError(f"{name} must be a list of {n} true/false values, got {value!r}.")
    return items


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}.")


def _check_groups(channels: tuple[int, ...], groups: int, name: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise InputError(
            f"{name}: channels {list(channels)} must be multiples of norm_num_groups={groups} "
            f"(GroupNorm); {bad} are not. Change the channels or norm_num_groups."
        )


@dataclass(frozen=True)
class DataConfig(ConfigSection):
    """Where the training (and validation) images come from.

    Args:
        source: "files" (``train``/``val`` are folders, globs, CSV manifests) or "phantoms"
            (built-in phantom images, ``n_patients`` patients, for tests and demos).
        train: training images (relative paths are relative to the YAML file's folder).
        val: validation images from other patients (for tau and the validation loss);
            None splits ``val_fraction`` of the patients off ``train``.
        path_column: column of a CSV manifest holding the paths (e.g. "file").
        patient_id_pattern: regex giving the patient id from the file name (group 1).
        n_train: keep only the first n training images after a seeded shuffle (a small
            training set memorizes sooner, section 2.4.1); None keeps all.
        val_fraction: share of patients held out when ``val`` is None.
        n_patients: phantom patients (source "phantoms").
        follow_ups: phantom images per patient.
        in_memory: hold the preprocessed training set in memory (fast; needs RAM).
        seed: seeds the split and the shuffle.
        split: "train" (default): the training set described above; "control": as many
            images of *other* patients (in neither that training set nor validation), for
            a negative-control generator trained on a disjoint set of the same size
            (``medmem study``'s control cells). Needs ``n_train``, and no ``val`` patients
            among the training files.
    """

    source: str = "files"
    train: str | None = None
    val: str | None = None
    path_column: str = "path"
    patient_id_pattern: str | None = None
    n_train: int | None = None
    val_fraction: float = 0.2
    n_patients: int = 64
    follow_ups: int = 1
    in_memory: bool = True
    seed: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        check_choice(self.source, "data.source", DATA_SOURCES)
        check_choice(self.split, "data.split", DATA_SPLITS)
        if self.split == "control" and self.n_train is None:
            raise InputError(
                "data.split 'control' needs data.n_train: the control set has as many images "
                "as the training set, from other patients, so the training set must leave "
                "patients over."
            )
        if self.source == "files" and not self.train:
            raise InputError(
                "data.train is required with data.source 'files': give a folder, glob or CSV "
                "manifest of training images (or use source: phantoms)."
            )
        if self.n_train is not None:
            check_positive_int(self.n_train, "data.n_train", minimum=2)
        check_in_range(
            self.val_fraction, "data.val_fraction", 0.0, 1.0, low_open=True, high_open=True
        )
        check_positive_int(self.n_patients, "data.n_patients", minimum=2)
        check_positive_int(self.follow_ups, "data.follow_ups")
        _check_bool(self.in_memory, "data.in_memory")
        check_positive_int(self.seed, "data.seed", minimum=0)


@dataclass(frozen=True)
class AutoencoderConfig(ConfigSection):
    """First stage of the LDM (and the VAE baseline): MONAI AutoencoderKL or VQVAE.

    Losses follow the MONAI generative tutorials: L1 reconstruction + ``kl_weight`` * KL
    (KL kind) or + VQ commitment loss (VQ kind), + ``perceptual_weight`` * LPIPS (off by
    default: it needs downloaded weights), + ``adv_weight`` * patch-adversarial loss once
    ``adv_start`` iterations have passed (the discriminator's warm-up).

    Args:
        kind: "kl" (AutoencoderKL) or "vq" (VQVAE, MedDiff-style 3D first stage).
        channels: channels per level; the image is halved len(channels) - 1 times (KL) or
            len(channels) times (VQ).
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level (KL only; costly at high resolution).
        latent_channels: channels of the latent (KL) or codebook vector size (VQ).
        norm_num_groups: GroupNorm groups (KL).
        num_embeddings: codebook size (VQ).
        commitment_cost: VQ commitment loss weight.
        kl_weight: weight of the KL term (tutorials: 1e-6 for an LDM; larger for a VAE).
        adv_weight: weight of the adversarial term (0 = no discriminator).
        adv_start: iteration at which the adversarial loss starts (warm-up).
        perceptual_weight: LPIPS weight; > 0 needs MONAI's perceptual network weights.
        disc_channels: channels of the PatchDiscriminator's first layer.
        disc_layers: its strided layers.
        lr: generator learning rate (Adam); disc_lr: discriminator learning rate.
        iterations: training iterations; batch_size: images per iteration.
    """

    kind: str = "kl"
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] | bool = False
    latent_channels: int = 3
    norm_num_groups: int = 32
    num_embeddings: int = 256
    commitment_cost: float = 0.25
    kl_weight: float = 1e-6
    adv_weight: float = 0.01
    adv_start: int = 200
    perceptual_weight: float = 0.0
    disc_channels: int = 32
    disc_layers: int = 3
    lr: float = 1e-4
    disc_lr: float = 5e-4
    iterations: int = 1000
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_choice(self.kind, "autoencoder.kind", AUTOENCODER_KINDS)
        chans = _int_tuple(self.channels, "autoencoder.channels")
        object.__setattr__(self, "channels", chans)
        object.__setattr__(
            self,
            "attention_levels",
            _bool_tuple(self.attention_levels, "autoencoder.attention_levels", len(chans)),
        )
        check_positive_int(self.num_res_blocks, "autoencoder.num_res_blocks")
        check_positive_int(self.latent_channels, "autoencoder.latent_channels")
        check_positive_int(self.norm_num_groups, "autoencoder.norm_num_groups")
        if self.kind == "kl":
            _check_groups(chans, self.norm_num_groups, "autoencoder")
        check_positive_int(self.num_embeddings, "autoencoder.num_embeddings", minimum=2)
        check_in_range(self.commitment_cost, "autoencoder.commitment_cost", 0.0, 10.0)
        check_in_range(self.kl_weight, "autoencoder.kl_weight", 0.0, 10.0)
        check_in_range(self.adv_weight, "autoencoder.adv_weight", 0.0, 10.0)
        check_positive_int(self.adv_start, "autoencoder.adv_start", minimum=0)
        check_in_range(self.perceptual_weight, "autoencoder.perceptual_weight", 0.0, 10.0)
        check_positive_int(self.disc_channels, "autoencoder.disc_channels")
        check_positive_int(self.disc_layers, "autoencoder.disc_layers")
        check_in_range(self.lr, "autoencoder.lr", 0.0, 1.0, low_open=True)
        check_in_range(self.disc_lr, "autoencoder.disc_lr", 0.0, 1.0, low_open=True)
        check_positive_int(self.iterations, "autoencoder.iterations")
        check_positive_int(self.batch_size, "autoencoder.batch_size")

    @property
    def downsamplings(self) -> int:
        """How many times the autoencoder halves each side."""
        return len(self.channels) - 1 if self.kind == "kl" else len(self.channels)


@dataclass(frozen=True)
class DiffusionConfig(ConfigSection):
    """Second stage of the LDM: MONAI DiffusionModelUNet on scaled latents, DDPM training.

    The latents are multiplied by ``scale_factor = 1 / std(latents)`` (estimated on up to
    ``scale_images`` training images, as in the MONAI tutorials) so that they have unit
    variance.

    Args:
        channels, num_res_blocks, attention_levels, num_head_channels, norm_num_groups:
            the UNet (MONAI DiffusionModelUNet arguments). Attention (as in the MONAI
            tutorials) needs the ``einops`` package and is off by default (slow on CPU).
        num_train_timesteps: T of the DDPM noise schedule.
        schedule, beta_start, beta_end: the beta schedule.
        prediction_type: "epsilon" or "v_prediction" (what the UNet predicts).
        lr: Adam learning rate; iterations; batch_size.
        scale_images: training images used to estimate the latent scale factor.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] | bool = False
    num_head_channels: int = 32
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"
    lr: float = 1e-4
    iterations: int = 2000
    batch_size: int = 16
    scale_images: int = 64

    def __post_init__(self) -> None:
        chans = _int_tuple(self.channels, "diffusion.channels")
        object.__setattr__(self, "channels", chans)
        levels = _bool_tuple(self.attention_levels, "diffusion.attention_levels", len(chans))
        object.__setattr__(self, "attention_levels", levels)
        check_positive_int(self.num_res_blocks, "diffusion.num_res_blocks")
        check_positive_int(self.num_head_channels, "diffusion.num_head_channels")
        check_positive_int(self.norm_num_groups, "diffusion.norm_num_groups")
        _check_groups(chans, self.norm_num_groups, "diffusion")
        bad = [c for c, a in zip(chans, levels, strict=True) if a and c % self.num_head_channels]
        if bad:
            raise InputError(
                f"diffusion: channels {bad} with attention must be multiples of "
                f"num_head_channels={self.num_head_channels}."
            )
        check_positive_int(self.num_train_timesteps, "diffusion.num_train_timesteps", minimum=2)
        check_choice(self.schedule, "diffusion.schedule", BETA_SCHEDULES)
        check_in_range(self.beta_start, "diffusion.beta_start", 0.0, 1.0, low_open=True)
        check_in_range(self.beta_end, "diffusion.beta_end", self.beta_start, 1.0, high_open=True)
        check_choice(self.prediction_type, "diffusion.prediction_type", ("epsilon", "v_prediction"))
        check_in_range(self.lr, "diffusion.lr", 0.0, 1.0, low_open=True)
        check_positive_int(self.iterations, "diffusion.iterations")
        check_positive_int(self.batch_size, "diffusion.batch_size")
        check_positive_int(self.scale_images, "diffusion.scale_images")


@dataclass(frozen=True)
class GANConfig(ConfigSection):
    """The GAN baseline: DCGAN-style generator (latent -> 4^d -> doublings) and a
    MONAI PatchDiscriminator, least-squares adversarial loss.

    Args:
        latent_dim: length of the generator's input noise vector.
        channels: generator channels at 4^d; halved at each doubling (minimum 8).
        disc_channels, disc_layers: the PatchDiscriminator.
        lr: Adam learning rate of both networks (betas 0.5, 0.999 as in DCGAN).
        iterations; batch_size.
    """

    latent_dim: int = 64
    channels: int = 128
    disc_channels: int = 32
    disc_layers: int = 3
    lr: float = 2e-4
    iterations: int = 2000
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_positive_int(self.latent_dim, "gan.latent_dim")
        check_positive_int(self.channels, "gan.channels", minimum=8)
        check_positive_int(self.disc_channels, "gan.disc_channels")
        check_positive_int(self.disc_layers, "gan.disc_layers")
        check_in_range(self.lr, "gan.lr", 0.0, 1.0, low_open=True)
        check_positive_int(self.iterations, "gan.iterations")
        check_positive_int(self.batch_size, "gan.batch_size")


@dataclass(frozen=True)
class TrainConfig(ConfigSection):
    """Settings of the one training loop shared by all models.

    Args:
        seed: seeds initialisation, batches, augmentation and noise; the same seed and
            data give identical weights (on CPU), also across a kill and resume.
        checkpoint_every: write a checkpoint every N iterations (and at each stage's end).
        log_every: write a losses.csv row every N iterations.
        augment: the paper's augmentation: flip and rotation within +-``max_rotation``
            degrees, each with probability ``augment_prob``.
        flip_axes: spatial axes that may flip (default: the last one, left-right).
        max_rotation: degrees; augment_prob: probability of each augmentation.
        mixed_precision: bfloat16 autocast on CUDA (ignored on CPU).
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1"...
        timing_iterations: iterations timed (after 2 warm-up ones) for the s/iteration
            estimate printed at the start of each stage.
    """

    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    augment: bool = False
    flip_axes: tuple[int, ...] | None = None
    max_rotation: float = 5.0
    augment_prob: float = 0.5
    mixed_precision: bool = True
    device: str = "auto"
    timing_iterations: int = 5

    def __post_init__(self) -> None:
        check_positive_int(self.seed, "train.seed", minimum=0)
        check_positive_int(self.checkpoint_every, "train.checkpoint_every")
        check_positive_int(self.log_every, "train.log_every")
        _check_bool(self.augment, "train.augment")
        _check_bool(self.mixed_precision, "train.mixed_precision")
        if self.flip_axes is not None:
            axes = _int_tuple(tuple(a + 1 for a in self.flip_axes), "train.flip_axes (0-based)")
            object.__setattr__(self, "flip_axes", tuple(a - 1 for a in axes))
        check_in_range(self.max_rotation, "train.max_rotation", 0.0, 180.0)
        check_in_range(self.augment_prob, "train.augment_prob", 0.0, 1.0)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise InputError(
                f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}."
            )
        check_positive_int(self.timing_iterations, "train.timing_iterations")


@dataclass(frozen=True)
class SamplingConfig(ConfigSection):
    """Default sampler of a saved LDM (``medmem generate sample`` may override them).

    Args:
        sampler: "ddpm" or "ddim".
        steps: denoising steps (<= num_train_timesteps; DDIM needs far fewer).
        batch_size: images per sampling batch.
    """

    sampler: str = "ddpm"
    steps: int = 1000
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_choice(self.sampler, "sampling.sampler", SAMPLERS)
        check_positive_int(self.steps, "sampling.steps")
        check_positive_int(self.batch_size, "sampling.batch_size")


@dataclass(frozen=True)
class TrackingConfig(ConfigSection):
    """Memorization tracked during training (the paper's Fig. 8).

    At each iteration in ``at`` (or every ``every`` iterations) of the last training stage,
    ``n_synthetic`` images are sampled and audited (``medmem.audit``) against the training
    and validation sets with one fixed detector: ``detector`` (a saved ``medmem.Detector``
    folder) or one trained on the training set at the start and kept in the run folder.

    Args:
        every: track every N iterations (0 = off unless ``at`` is given).
        at: explicit iterations to track at.
        n_synthetic: images sampled per check.
        detector: folder of a saved Detector; None trains one.
        detector_epochs: epochs of that detector.
        percentile: q of tau.
        sampler, steps: sampler used for the checks (DDIM with few steps is fast).
        quality: also compute FID and MS-SSIM when ``medmem.metrics`` is available.
    """

    every: int = 0
    at: tuple[int, ...] = ()
    n_synthetic: int = 100
    detector: str | None = None
    detector_epochs: int = 30
    percentile: float = 95.0
    sampler: str = "ddim"
    steps: int = 50
    quality: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.every, "tracking.every", minimum=0)
        if self.at:
            object.__setattr__(self, "at", _int_tuple(self.at, "tracking.at"))
        else:
            object.__setattr__(self, "at", ())
        check_positive_int(self.n_synthetic, "tracking.n_synthetic", minimum=2)
        check_positive_int(self.detector_epochs, "tracking.detector_epochs")
        check_percentile(self.percentile, "tracking.percentile")
        check_choice(self.sampler, "tracking.sampler", SAMPLERS)
        check_positive_int(self.steps, "tracking.steps")
        _check_bool(self.quality, "tracking.quality")

    @property
    def enabled(self) -> bool:
        """True when any check is scheduled."""
        return self.every > 0 or bool(self.at)

    def due(self, iteration: int, last: int) -> bool:
        """Whether to check after ``iteration`` (1-based) of a stage of ``last`` iterations."""
        if iteration in self.at:
            return True
        return self.every > 0 and (iteration % self.every == 0 or iteration == last)


@dataclass(frozen=True)
class GenerativeConfig(ConfigSection):
    """All settings of one generative model and its training run.

    Args:
        model: "ldm", "vae" or "gan".
        spatial_dims: 2 or 3.
        image_size: (H, W) or (D, H, W); every side must be divisible by 2**downsamplings
            of the autoencoder (GAN: 4 * 2**k).
        data, autoencoder, diffusion, gan, train, sampling, tracking: the sections.

    Example:
        >>> cfg = GenerativeConfig.from_dict({"model": "vae", "image_size": [16, 16],
        ...     "data": {"source": "phantoms"}})
        >>> cfg.autoencoder.kind
        'kl'
    """

    model: str = "ldm"
    spatial_dims: int = 2
    image_size: tuple[int, ...] = (64, 64)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="phantoms"))
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_choice(self.model, "model", MODEL_KINDS)
        check_choice(self.spatial_dims, "spatial_dims", (2, 3))
        size = _int_tuple(self.image_size, "image_size")
        if len(size) != self.spatial_dims:
            raise InputError(
                f"image_size must have {self.spatial_dims} sides for spatial_dims="
                f"{self.spatial_dims}, got {list(size)}."
            )
        object.__setattr__(self, "image_size", size)
        if self.model in ("ldm", "vae"):
            k = self.autoencoder.downsamplings
            bad = [s for s in size if s % (2**k)]
            if bad:
                raise InputError(
                    f"image_size {list(size)}: every side must be divisible by 2**{k} = {2**k} "
                    f"(the autoencoder halves it {k} times with {len(self.autoencoder.channels)} "
                    f"channel levels); change image_size or autoencoder.channels."
                )
            if self.autoencoder.kind == "vq" and self.model == "vae":
                raise InputError(
                    "model 'vae' samples from a Gaussian prior and needs autoencoder.kind 'kl'; "
                    "use kind 'vq' with model 'ldm'."
                )
        if self.model == "ldm":
            latent = [s // 2**self.autoencoder.downsamplings for s in size]
            n_down = len(self.diffusion.channels) - 1
            if any(s % (2**n_down) for s in latent):
                raise InputError(
                    f"the latent size {latent} must be divisible by 2**{n_down} (the diffusion "
                    f"UNet halves it {n_down} times); use fewer diffusion.channels levels."
                )
            if self.sampling.steps > self.diffusion.num_train_timesteps:
                raise InputError(
                    f"sampling.steps={self.sampling.steps} exceeds diffusion."
                    f"num_train_timesteps={self.diffusion.num_train_timesteps}."
                )
        if self.model == "gan":
            for s in size:
                k = math.log2(s / 4) if s >= 8 else -1
                if k < 1 or k != int(k):
                    raise InputError(
                        f"model 'gan' needs every side of image_size to be 4 * 2**k (8, 16, 32, "
                        f"64, ...), got {list(size)}."
                    )

    @property
    def stages(self) -> tuple[str, ...]:
        """Training stages in order: ("autoencoder", "diffusion"), ("autoencoder",), ("gan",)."""
        return {
            "ldm": ("autoencoder", "diffusion"),
            "vae": ("autoencoder",),
            "gan": ("gan",),
        }[self.model]

    def stage_settings(self, stage: str) -> Any:
        """The section holding ``iterations``, ``batch_size`` and ``lr`` of a stage."""
        return getattr(self, stage)

    def identity_dict(self) -> dict[str, Any]:
        """Settings that determine the trained weights (resume must match them)."""
        d = self.to_dict()
        d["train"] = {
            k: v
            for k, v in d["train"].items()
            if k not in ("checkpoint_every", "log_every", "device", "timing_iterations")
        }
        d.pop("sampling")
        d.pop("tracking")
        if d["data"].get("split") == "train":  # the default: hashes as before it existed
            d["data"].pop("split")
        return d


# the settings that hold paths (relative ones are relative to the YAML file naming them)
PATH_KEYS: tuple[tuple[str | None, str], ...] = (
    ("data", "train"),
    ("data", "val"),
    ("tracking", "detector"),
)


def load_config(path: str | Path) -> GenerativeConfig:
    """Read a YAML config into a :class:`GenerativeConfig`.

    Relative ``data.train``/``data.val``/``tracking.detector`` paths are taken relative to
    the YAML file's folder, so a config works from any working directory.

    Example:
        >>> cfg = load_config("configs/generative/ldm-2d-cpu.yaml")  # doctest: +SKIP
    """
    return GenerativeConfig.from_yaml(path, PATH_KEYS)


__all__ = [
    "AUTOENCODER_KINDS",
    "MODEL_KINDS",
    "SAMPLERS",
    "AutoencoderConfig",
    "DataConfig",
    "DiffusionConfig",
    "GANConfig",
    "GenerativeConfig",
    "SamplingConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
]
