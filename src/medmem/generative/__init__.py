"""Generative models of medical images to audit: 2D/3D latent diffusion and baselines.

Dar et al. (sections 2.1, 2.4.2, 4.1, 4.3) train unconditional latent diffusion models
(a KL autoencoder, or a vector-quantised one for 3D, then a DDPM on its latents) and
compare them with a VAE and a GAN. This package builds all three from MONAI's generative
networks, with one seeded training loop that resumes exactly, and tracks memorization
during training (``medmem.audit`` on samples at chosen iterations).

Public API:

* :class:`GenerativeConfig` (and its sections) and :func:`load_config` (YAML);
* :func:`train` -> :class:`TrainResult`; a run folder with checkpoints, losses.csv,
  tracking.csv/png and the trained ``model/``;
* :class:`GenerativeModel` -- ``load(dir)``, ``sample(n, seed=, sampler=, steps=)``,
  ``save(dir)``;
* :func:`write_samples` -- 16-bit PNG / NIfTI plus manifest.csv for ``medmem audit``.

Building blocks that ``medmem.text2image`` reuses: ``build_autoencoder``, ``make_scheduler``,
``latent_shape`` and ``PATH_KEYS`` (the config keys holding paths).

Example:
    >>> from medmem.generative import load_config, train, GenerativeModel
    >>> config = load_config("configs/generative/ldm-2d-cpu.yaml")  # doctest: +SKIP
    >>> result = train(config, "runs/ldm")  # doctest: +SKIP
    >>> images = GenerativeModel.load("runs/ldm/model").sample(16, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from medmem.generative._config import (
    PATH_KEYS,
    AutoencoderConfig,
    DataConfig,
    DiffusionConfig,
    GANConfig,
    GenerativeConfig,
    SamplingConfig,
    TrackingConfig,
    TrainConfig,
    load_config,
)
from medmem.generative._data import augment, build_datasets, write_samples
from medmem.generative._networks import DCGANGenerator, build_autoencoder
from medmem.generative._pipeline import GenerativeModel, latent_shape, make_scheduler
from medmem.generative._tracking import plot_tracking, save_grid
from medmem.generative._train import TrainResult, train

__all__ = [
    "PATH_KEYS",
    "AutoencoderConfig",
    "DCGANGenerator",
    "DataConfig",
    "DiffusionConfig",
    "GANConfig",
    "GenerativeConfig",
    "GenerativeModel",
    "SamplingConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainResult",
    "augment",
    "build_autoencoder",
    "build_datasets",
    "latent_shape",
    "load_config",
    "make_scheduler",
    "plot_tracking",
    "save_grid",
    "train",
    "write_samples",
]
