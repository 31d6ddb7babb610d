"""``GenerativeModel``: a trained LDM, VAE or GAN that samples images; saved without pickles.

The pipeline wires networks and a noise scheduler for inference (diffusers' separation):
the networks come from :mod:`medmem.generative._networks`, the schedulers are MONAI's
DDPM/DDIM (algorithms with settings and no weights), and :meth:`GenerativeModel.sample`
runs the reverse process in the scaled latent space, then decodes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import medmem
from medmem._errors import InputError
from medmem._io import MODEL_CONFIG, save_model_folder
from medmem._progress import progress
from medmem._seeds import derive_seed
from medmem._validation import check_choice, check_positive_int
from medmem.generative._config import SAMPLERS, GenerativeConfig
from medmem.generative._networks import networks_for_sampling

SCHEMA_VERSION = 1
CONFIG_NAME = MODEL_CONFIG
MODEL_KIND = "medmem.generative.GenerativeModel"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """ "auto"/None -> CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool) -> Any:
    """bfloat16 autocast on CUDA when ``enabled`` (and supported); a no-op elsewhere."""
    on = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def make_scheduler(config: GenerativeConfig, sampler: str = "ddpm") -> Any:
    """MONAI DDPM or DDIM scheduler with the model's noise schedule.

    ``clip_sample`` is off: latents are not confined to [-1, 1].
    """
    d = config.diffusion
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    return cls(
        num_train_timesteps=d.num_train_timesteps,
        schedule=d.schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
        clip_sample=False,
    )


def latent_shape(config: GenerativeConfig) -> tuple[int, ...]:
    """(channels, *spatial) of the first stage's latent (VAE prior / LDM diffusion space)."""
    k = config.autoencoder.downsamplings
    return (config.autoencoder.latent_channels, *(s // 2**k for s in config.image_size))


class GenerativeModel:
    """A trained generative model: ``sample``, ``save``, ``load``.

    Attributes:
        config: the :class:`GenerativeConfig` it was trained with.
        networks: ``{"autoencoder", "unet"}`` (LDM), ``{"autoencoder"}`` (VAE) or
            ``{"generator"}`` (GAN), in eval mode.
        scale_factor: latents are multiplied by it before diffusion (LDM; 1/std).
        info: training facts (n_train, iterations, train_fingerprint...).

    Example:
        >>> model = GenerativeModel.load("runs/ldm/model")  # doctest: +SKIP
        >>> images = model.sample(8, seed=0, sampler="ddim", steps=50)  # doctest: +SKIP
        >>> images.shape  # doctest: +SKIP
        torch.Size([8, 1, 64, 64])
    """

    def __init__(
        self,
        config: GenerativeConfig,
        networks: dict[str, nn.Module],
        *,
        scale_factor: float = 1.0,
        info: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.networks = {k: v.to(self.device).eval() for k, v in networks.items()}
        self.scale_factor = float(scale_factor)
        self.info = dict(info or {})

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        seed: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        batch_size: int | None = None,
        quiet: bool = False,
    ) -> torch.Tensor:
        """Draw ``n`` images: float32 (n, 1, *image_size) in [0, 1], on the CPU.

        Args:
            n: number of images.
            seed: the same seed, settings and device give the same images.
            steps: denoising steps (LDM); default ``config.sampling.steps``.
            sampler: "ddpm" or "ddim" (LDM); default ``config.sampling.sampler``.
            batch_size: images per batch; default ``config.sampling.batch_size``.
            quiet: no progress bar.
        """
        check_positive_int(n, "n")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}.")
        cfg = self.config
        sampler = check_choice(sampler or cfg.sampling.sampler, "sampler", SAMPLERS)
        steps = check_positive_int(steps or cfg.sampling.steps, "steps")
        if cfg.model == "ldm" and steps > cfg.diffusion.num_train_timesteps:
            raise InputError(
                f"steps={steps} exceeds the {cfg.diffusion.num_train_timesteps} timesteps the "
                "model was trained with; use fewer steps."
            )
        batch_size = check_positive_int(batch_size or cfg.sampling.batch_size, "batch_size")
        for net in self.networks.values():
            net.eval()
        n_batches = math.ceil(n / batch_size)
        bar = progress(None, desc="sampling", total=n_batches, quiet=quiet, unit="batch")
        out = []
        for b in range(n_batches):
            nb = min(batch_size, n - b * batch_size)
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(seed, b))
            with autocast(self.device, cfg.train.mixed_precision):
                x = self._sample_batch(nb, gen, sampler, steps)
            out.append(x.float().clamp(0.0, 1.0).cpu())
            bar.update(1)
        bar.close()
        return torch.cat(out)

    def _sample_batch(self, n: int, gen: torch.Generator, sampler: str, steps: int) -> torch.Tensor:
        cfg = self.config
        dev = self.device
        if cfg.model == "gan":
            z = torch.randn((n, cfg.gan.latent_dim), generator=gen, device=dev)
            return self.networks["generator"](z)
        shape = (n, *latent_shape(cfg))
        z = torch.randn(shape, generator=gen, device=dev)
        ae = self.networks["autoencoder"]
        if cfg.model == "vae":
            return ae.decode(z)
        unet = self.networks["unet"]
        scheduler = make_scheduler(cfg, sampler)
        scheduler.set_timesteps(steps, device=dev)
        for t in scheduler.timesteps:
            t_batch = torch.full((n,), int(t), device=dev, dtype=torch.long)
            pred = unet(z, timesteps=t_batch).float()
            if sampler == "ddpm":
                z, _ = scheduler.step(pred, int(t), z, generator=gen)
            else:
                z, _ = scheduler.step(pred, int(t), z)
        return ae.decode_stage_2_outputs(z / self.scale_factor)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` and one ``<network>.safetensors`` per network (atomically).

        Example:
            >>> model.save("runs/ldm/model")  # doctest: +SKIP
        """
        return save_model_folder(
            directory,
            self.networks,
            {
                "schema_version": SCHEMA_VERSION,
                "kind": MODEL_KIND,
                "config": self.config.to_dict(),
                "networks": sorted(self.networks),
                "scale_factor": self.scale_factor,
                "info": self.info,
                "medmem_version": medmem.__version__,
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(
        cls, directory: str | Path, *, device: str | torch.device | None = None
    ) -> GenerativeModel:
        """Rebuild a model saved with :meth:`save` (JSON + safetensors; never unpickles).

        ``directory`` is a saved model, or a training run folder (its ``model/`` is used).

        Example:
            >>> model = GenerativeModel.load("runs/ldm/model")  # doctest: +SKIP
        """
        directory = Path(directory)
        if (directory / "model" / CONFIG_NAME).is_file():  # a run folder: its trained model
            directory = directory / "model"
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            hint = ""
            if (directory / "model" / CONFIG_NAME).is_file():
                hint = f" Did you mean {directory / 'model'} (the run's saved model)?"
            raise InputError(
                f"{cfg_path} not found: {directory} is not a saved generative model (written by "
                f"medmem generate train into RUN/model).{hint}"
            )
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{cfg_path}: corrupt JSON ({exc}).") from exc
        if meta.get("kind") != MODEL_KIND or meta.get("schema_version") != SCHEMA_VERSION:
            raise InputError(
                f"{cfg_path}: not a medmem generative model of schema version {SCHEMA_VERSION} "
                f"(kind {meta.get('kind')!r}, version {meta.get('schema_version')!r})."
            )
        try:
            config = GenerativeConfig.from_dict(meta["config"], "config")
        except InputError as exc:
            raise InputError(f"{cfg_path}: {exc}") from exc
        nets = networks_for_sampling(config)
        for name, net in nets.items():
            path = directory / f"{name}.safetensors"
            try:
                net.load_state_dict(load_file(str(path)), strict=True)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise InputError(
                    f"{path}: missing, unreadable or not matching {cfg_path} ({exc})."
                ) from exc
        return cls(
            config,
            nets,
            scale_factor=float(meta.get("scale_factor", 1.0)),
            info=meta.get("info", {}),
            device=device,
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"GenerativeModel(model={c.model!r}, spatial_dims={c.spatial_dims}, "
            f"image_size={c.image_size}, scale_factor={self.scale_factor:.4g})"
        )


def diffusion_loss(
    scheduler: Any,
    prediction_type: str,
    z: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    pred: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Squared error of the UNet's ``pred`` against its target, the noise ("epsilon") or
    the velocity ("v_prediction"), in float32: "mean", "sum" or "sample" (per sample, (B,))."""
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
    pred, target = pred.float(), target.float()
    if reduction == "sample":
        return (pred - target).pow(2).flatten(1).mean(1)
    return torch.nn.functional.mse_loss(pred, target, reduction=reduction)


__all__ = [
    "GenerativeModel",
    "autocast",
    "diffusion_loss",
    "derive_seed",
    "latent_shape",
    "make_scheduler",
    "resolve_device",
]
