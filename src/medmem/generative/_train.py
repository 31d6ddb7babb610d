"""One training loop for the LDM (both stages), the VAE and the GAN.

Every source of randomness is derived from ``(train.seed, stage, iteration)`` -- network
initialisation, the batch (an epoch-wise shuffle), the augmentation, the diffusion noise
and timesteps -- so an interrupted run that resumes from its checkpoint continues exactly
as if it had never stopped (identical weights on CPU), with nothing but weights and
optimizer state in the checkpoint.

A run folder holds: ``config.json``, ``losses.csv``, ``checkpoint.safetensors``,
``timing.json`` (seconds per iteration per stage), ``model/`` (the trained model, written at
the end), and with tracking ``detector/``, ``tracking.csv``, ``tracking.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn
from tqdm import tqdm

import medmem
from medmem import _checkpoint
from medmem._errors import InputError, MedmemError, OutputExistsError
from medmem._io import atomic_save, atomic_write_json
from medmem._progress import progress
from medmem._seeds import batch_indices, derive_seed
from medmem.generative._config import GenerativeConfig
from medmem.generative._data import augment, build_datasets
from medmem.generative._networks import (
    build_autoencoder,
    build_discriminator,
    build_generator,
    build_unet,
)
from medmem.generative._pipeline import (
    GenerativeModel,
    autocast,
    diffusion_loss,
    make_scheduler,
    resolve_device,
)

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
LOSSES = "losses.csv"
TIMING = "timing.json"
MODEL_DIR = "model"
_INIT = 0x1517  # salt of the initialisation seed
_VAL = 0x7A1  # salt of the validation-loss seed


# ---------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _wrap(net: nn.Module, world: int, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (world size > 1), else the network itself."""
    if world <= 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


# ---------------------------------------------------------------------------- stages
class _Stage:
    """A training stage: builds its networks into ``run.networks`` and steps them."""

    name = ""
    trained: tuple[str, ...] = ()  # networks optimised here
    scratch: tuple[str, ...] = ()  # networks dropped when the stage ends (discriminators)

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.cfg = run.config

    def begin(self) -> None:
        """Work done once when the stage starts afresh (not on resume)."""

    def train_mode(self) -> None:
        for n in self.trained + self.scratch:
            self.run.networks[n].train()

    def finish(self) -> None:
        """Drop networks and optimizers no later stage needs."""
        for n in self.scratch:
            self.run.networks.pop(n, None)
        for n in list(self.run.optimizers):
            if n.startswith(self.name + "."):
                self.run.optimizers.pop(n)
        for n in self.trained:
            self.run.networks[n].eval().requires_grad_(False)

    def step(self, x: torch.Tensor, iteration: int) -> dict[str, float]:
        raise NotImplementedError

    def val_loss(self, x: torch.Tensor) -> float:
        return math.nan


class _AutoencoderStage(_Stage):
    """L1 + KL (or VQ) + optional perceptual + patch-adversarial after ``adv_start``."""

    name = "autoencoder"

    def __init__(self, run: _Run) -> None:
        super().__init__(run)
        ae_cfg = self.cfg.autoencoder
        run.networks["autoencoder"] = build_autoencoder(self.cfg).to(run.device)
        self.trained = ("autoencoder",)
        run.optimizers["autoencoder.g"] = torch.optim.Adam(
            run.networks["autoencoder"].parameters(), lr=ae_cfg.lr
        )
        if ae_cfg.adv_weight > 0:
            run.networks["discriminator"] = build_discriminator(
                self.cfg.spatial_dims, ae_cfg.disc_channels, ae_cfg.disc_layers
            ).to(run.device)
            self.scratch = ("discriminator",)
            run.optimizers["autoencoder.d"] = torch.optim.Adam(
                run.networks["discriminator"].parameters(), lr=ae_cfg.disc_lr
            )
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual: nn.Module | None = None
        if ae_cfg.perceptual_weight > 0:
            self.perceptual = _perceptual_loss(self.cfg.spatial_dims).to(run.device)
        self.ae = run.wrap(run.networks["autoencoder"])
        self.disc = run.wrap(run.networks["discriminator"]) if self.scratch else None

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, regulariser: KL or VQ loss)."""
        if self.cfg.autoencoder.kind == "kl":
            recon, mu, sigma = self.ae(x)
            dims = list(range(1, mu.ndim))
            kl = 0.5 * torch.sum(
                mu.float().pow(2) + sigma.float().pow(2) - torch.log(sigma.float().pow(2)) - 1,
                dim=dims,
            )
            return recon, kl.mean()
        recon, q_loss = self.ae(x)
        return recon, q_loss.float()

    def step(self, x: torch.Tensor, iteration: int) -> dict[str, float]:
        c = self.cfg.autoencoder
        run = self.run
        opt_g = run.optimizers["autoencoder.g"]
        adv = self.disc is not None and iteration >= c.adv_start
        with run.autocast():
            recon, reg = self._forward(x)
            rec = F.l1_loss(recon.float(), x)
            weight = c.kl_weight if c.kind == "kl" else 1.0
            loss_g = rec + weight * reg
            out = {"recon_l1": rec.item(), "kl" if c.kind == "kl" else "vq": reg.item()}
            if self.perceptual is not None:
                p = self.perceptual(recon.float(), x)
                loss_g = loss_g + c.perceptual_weight * p
                out["perceptual"] = p.item()
            if adv:
                assert self.disc is not None
                g_adv = self.adv_loss(
                    self.disc(recon.contiguous().float())[-1],
                    target_is_real=True,
                    for_discriminator=False,
                )
                loss_g = loss_g + c.adv_weight * g_adv
                out["gen_adv"] = g_adv.item()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if adv:
            assert self.disc is not None
            opt_d = run.optimizers["autoencoder.d"]
            with run.autocast():
                fake = self.adv_loss(
                    self.disc(recon.contiguous().detach().float())[-1],
                    target_is_real=False,
                    for_discriminator=True,
                )
                real = self.adv_loss(
                    self.disc(x.contiguous())[-1], target_is_real=True, for_discriminator=True
                )
                loss_d = c.adv_weight * 0.5 * (fake + real)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            out["disc"] = loss_d.item()
        out["loss"] = loss_g.item()
        return out

    @torch.no_grad()
    def val_loss(self, x: torch.Tensor) -> float:
        """Mean L1 reconstruction error on the validation images (posterior mean)."""
        ae = self.run.networks["autoencoder"]
        was = ae.training
        ae.eval()
        total = 0.0
        for batch in torch.split(x, self.cfg.autoencoder.batch_size):
            batch = batch.to(self.run.device)
            with self.run.autocast():
                if self.cfg.autoencoder.kind == "kl":
                    recon = ae.decode(ae.encode(batch)[0])
                else:
                    recon = ae(batch)[0]
            total += F.l1_loss(recon.float(), batch, reduction="sum").item()
        ae.train(was)
        return total / x.numel()


class _DiffusionStage(_Stage):
    """DDPM training of the UNet on latents scaled by 1/std (the frozen first stage)."""

    name = "diffusion"
    trained = ("unet",)

    def __init__(self, run: _Run) -> None:
        super().__init__(run)
        run.networks["autoencoder"].eval().requires_grad_(False)
        run.networks["unet"] = build_unet(self.cfg).to(run.device)
        run.optimizers["diffusion.unet"] = torch.optim.Adam(
            run.networks["unet"].parameters(), lr=self.cfg.diffusion.lr
        )
        self.scheduler = make_scheduler(self.cfg, "ddpm")
        self.unet = run.wrap(run.networks["unet"])

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
        ae = self.run.networks["autoencoder"]
        with self.run.autocast():
            if mean and self.cfg.autoencoder.kind == "kl":
                z = ae.encode(x)[0]
            else:
                z = ae.encode_stage_2_inputs(x)
        return z.float()

    def begin(self) -> None:
        """scale_factor = 1 / std of the latents of up to ``scale_images`` training images."""
        run = self.run
        n = min(self.cfg.diffusion.scale_images, run.n_train)
        torch.manual_seed(derive_seed(self.cfg.train.seed, run.stage_index, _INIT, 1))
        zs = [self._latents(run.batch(list(range(i, min(n, i + 16))))) for i in range(0, n, 16)]
        std = torch.cat(zs).std().item()
        if not math.isfinite(std) or std <= 0:
            raise MedmemError(f"latents of the training images have std {std}; retrain stage 1.")
        run.scale_factor = 1.0 / std
        logger.info("latent scale factor 1/std = %.4f", run.scale_factor)

    def step(self, x: torch.Tensor, iteration: int) -> dict[str, float]:
        run = self.run
        opt = run.optimizers["diffusion.unet"]
        z = self._latents(x) * run.scale_factor
        noise = torch.randn_like(z)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (z.shape[0],), device=z.device)
        with run.autocast():
            noisy = self.scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
            pred = self.unet(noisy, timesteps=t)
            loss = diffusion_loss(
                self.scheduler, self.cfg.diffusion.prediction_type, z, noise, t, pred
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def val_loss(self, x: torch.Tensor) -> float:
        """Noise-prediction MSE on validation latents, fixed noise and timesteps."""
        run = self.run
        unet = run.networks["unet"]
        gen = torch.Generator(device=run.device).manual_seed(derive_seed(self.cfg.train.seed, _VAL))
        total, count = 0.0, 0
        for batch in torch.split(x, self.cfg.diffusion.batch_size):
            z = self._latents(batch.to(run.device), mean=True) * run.scale_factor
            noise = torch.randn(z.shape, generator=gen, device=run.device)
            t = torch.randint(
                0,
                self.scheduler.num_train_timesteps,
                (z.shape[0],),
                generator=gen,
                device=run.device,
            )
            with run.autocast():
                pred = unet(self.scheduler.add_noise(z, noise, t), timesteps=t)
            kind = self.cfg.diffusion.prediction_type
            total += diffusion_loss(self.scheduler, kind, z, noise, t, pred, reduction="sum").item()
            count += z.numel()
        return total / count


class _GANStage(_Stage):
    """DCGAN-style generator vs PatchDiscriminator, least-squares adversarial loss."""

    name = "gan"
    trained = ("generator",)
    scratch = ("discriminator",)

    def __init__(self, run: _Run) -> None:
        super().__init__(run)
        g = self.cfg.gan
        run.networks["generator"] = build_generator(self.cfg).to(run.device)
        run.networks["discriminator"] = build_discriminator(
            self.cfg.spatial_dims, g.disc_channels, g.disc_layers
        ).to(run.device)
        for n in ("generator", "discriminator"):
            run.optimizers[f"gan.{n}"] = torch.optim.Adam(
                run.networks[n].parameters(), lr=g.lr, betas=(0.5, 0.999)
            )
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.gen = run.wrap(run.networks["generator"])
        self.disc = run.wrap(run.networks["discriminator"])

    def step(self, x: torch.Tensor, iteration: int) -> dict[str, float]:
        run = self.run
        z = torch.randn((x.shape[0], self.cfg.gan.latent_dim), device=run.device)
        with run.autocast():
            fake = self.gen(z)
            d_fake = self.adv_loss(self.disc(fake.detach().float())[-1], False, True)
            d_real = self.adv_loss(self.disc(x)[-1], True, True)
            loss_d = 0.5 * (d_fake + d_real)
        opt_d = run.optimizers["gan.discriminator"]
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with run.autocast():
            loss_g = self.adv_loss(self.disc(fake.float())[-1], True, False)
        opt_g = run.optimizers["gan.generator"]
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return {"loss": loss_g.item(), "disc": loss_d.item()}


_STAGES: dict[str, type[_Stage]] = {
    "autoencoder": _AutoencoderStage,
    "diffusion": _DiffusionStage,
    "gan": _GANStage,
}


def _perceptual_loss(spatial_dims: int) -> nn.Module:
    """MONAI's LPIPS-style PerceptualLoss; needs its pretrained weights (downloaded once)."""
    from monai.losses import PerceptualLoss

    try:
        return PerceptualLoss(
            spatial_dims=spatial_dims,
            network_type="squeeze",
            is_fake_3d=spatial_dims == 3,
            fake_3d_ratio=0.2,
        )
    except Exception as exc:  # network access or missing package
        raise InputError(
            f"autoencoder.perceptual_weight > 0 needs MONAI's perceptual network weights, which "
            f"could not be loaded ({type(exc).__name__}: {exc}). Download them once where the "
            "machine has network access (torch hub cache), or set perceptual_weight: 0."
        ) from exc


# ---------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder.
        model: the trained model (None when stopped early with ``stop_after``).
        finished: all stages done.
        seconds_per_iteration: measured per stage (``{stage: seconds}``).
        tracking: the memorization tracking table (empty without tracking).
    """

    run_dir: Path
    model: GenerativeModel | None
    finished: bool
    seconds_per_iteration: dict[str, float] = field(default_factory=dict)
    tracking: pd.DataFrame = field(default_factory=pd.DataFrame)


class _Run:
    """State shared by the stages: data, device, networks, optimizers, scale factor."""

    def __init__(self, config: GenerativeConfig, device: torch.device, train_ds: Any) -> None:
        self.config = config
        self.device = device
        self.train_ds = train_ds
        self.n_train = len(train_ds)
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scale_factor = 1.0
        self.stage_index = 0
        self.rank, _, self.world = _dist_info()
        self._cache: torch.Tensor | None = None
        if config.data.in_memory:
            self._cache = torch.stack([train_ds[i] for i in range(self.n_train)])

    def wrap(self, net: nn.Module) -> nn.Module:
        return _wrap(net, self.world, self.device)

    def autocast(self) -> Any:
        return autocast(self.device, self.config.train.mixed_precision)

    def batch(self, indices: list[int], rng: np.random.Generator | None = None) -> torch.Tensor:
        """Images ``indices`` as a (B, 1, *size) tensor on the device (augmented with rng)."""
        if self._cache is not None:
            items = [self._cache[i] for i in indices]
        else:
            items = [self.train_ds[i] for i in indices]
        if rng is not None:
            items = [augment(x, rng, self.config.train) for x in items]
        return torch.stack(items).to(self.device, dtype=torch.float32)


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    frame = pd.DataFrame(rows)
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))


def _read_rows(path: Path, keep: Any) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return [r for r in frame.to_dict("records") if keep(r)]


def train(
    config: GenerativeConfig,
    out: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train the model described by ``config``, writing the run folder ``out``.

    Args:
        config: the settings (:func:`medmem.generative.load_config` reads them from YAML).
        out: run folder (created). It may not hold a run unless ``resume``.
        resume: continue the run in ``out`` from its checkpoint; the settings that decide
            the weights and the training set must be the same, except the ``iterations`` of
            the stage being trained, which may be raised to train longer.
        stop_after: stop after this many iterations in this call (over all stages), leaving
            a checkpoint to resume from (time-limited jobs); the model is not written.
        device: "cpu", "cuda"...; default ``config.train.device`` ("auto": CUDA if present).
            Under torchrun (WORLD_SIZE > 1) each process uses cuda:LOCAL_RANK and the
            trained networks are wrapped in DistributedDataParallel; rank 0 writes.
        quiet: no progress bars or timing messages.

    Returns:
        A :class:`TrainResult`; ``result.model`` samples images.

    Example:
        >>> cfg = load_config("configs/generative/ldm-2d-cpu.yaml")  # doctest: +SKIP
        >>> result = train(cfg, "runs/ldm-2d")  # doctest: +SKIP
        >>> result.model.sample(4, seed=0).shape  # doctest: +SKIP
        torch.Size([4, 1, 64, 64])
    """
    if not isinstance(config, GenerativeConfig):
        raise InputError(f"config must be a GenerativeConfig, got {type(config).__name__}.")
    out = Path(out)
    rank, local_rank, world = _dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dev = (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    else:
        dev = resolve_device(device if device is not None else config.train.device)
    found = _checkpoint.read_checkpoint(out)
    if (found is not None or (out / RUN_CONFIG).exists()) and not resume:
        raise OutputExistsError(
            f"{out} already holds a training run; pass --resume (resume=True) to continue it, "
            "or choose another --out folder."
        )
    if world > 1:  # every rank has checked the folder before rank 0 writes into it
        import torch.distributed as dist

        dist.barrier()
    train_ds, val_ds = build_datasets(config, quiet=quiet)
    fingerprint = train_ds.fingerprint()
    if found is not None:
        _check_resume(out, found[0], config, fingerprint, len(train_ds))
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out / RUN_CONFIG,
            {
                "config": config.to_dict(),
                "n_train": len(train_ds),
                "n_val": len(val_ds),
                "train_ids": list(train_ds.ids),
                "val_ids": list(val_ds.ids),
                "medmem_version": medmem.__version__,
            },
        )
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # leave the caller's RNG alone
        return _train(
            config, out, dev, train_ds, val_ds, fingerprint, found, stop_after, quiet, is_main
        )


def _train(
    config: GenerativeConfig,
    out: Path,
    dev: torch.device,
    train_ds: Any,
    val_ds: Any,
    fingerprint: str,
    found: tuple[dict[str, Any], dict[str, torch.Tensor]] | None,
    stop_after: int | None,
    quiet: bool,
    is_main: bool,
) -> TrainResult:
    tc = config.train
    run = _Run(config, dev, train_ds)
    stages_names = config.stages
    start_stage, start_it = 0, 0
    if found is not None:
        start_stage, start_it = int(found[0]["stage"]), int(found[0]["iteration"])
    stages: list[_Stage] = []
    for si in range(start_stage + 1):
        run.stage_index = si
        torch.manual_seed(derive_seed(tc.seed, si, _INIT))
        stages.append(_STAGES[stages_names[si]](run))
        if si < start_stage:
            stages[si].finish()
    if found is not None:
        meta, tensors = found
        _checkpoint.restore(meta, tensors, networks=run.networks, optimizers=run.optimizers)
        run.scale_factor = float(meta["scale_factor"])
        if start_stage > 0:  # re-freeze what earlier stages trained
            for st in stages[:start_stage]:
                st.finish()
        logger.info(
            "resuming %s from stage %s, iteration %d", out, stages_names[start_stage], start_it
        )
    pos = (start_stage, start_it)
    losses = _read_rows(out / LOSSES, lambda r: (r["stage_index"], r["iteration"]) <= pos)
    tracking_rows = _read_rows(out / "tracking.csv", lambda r: r["iteration"] <= start_it)
    timing: dict[str, float] = {}
    if (out / TIMING).exists():
        timing = json.loads((out / TIMING).read_text())
    tracker = None
    last = len(stages_names) - 1
    if config.tracking.enabled and is_main:
        from medmem.generative._tracking import Tracker

        tracker = Tracker(config, out, train_ds, val_ds, quiet=quiet)
        if start_stage < last:
            tracking_rows = []

    val_x = torch.stack([val_ds[i] for i in range(len(val_ds))])
    done_here = 0
    stopped = False
    for si in range(start_stage, len(stages_names)):
        run.stage_index = si
        if si >= len(stages):
            torch.manual_seed(derive_seed(tc.seed, si, _INIT))
            stages.append(_STAGES[stages_names[si]](run))
        stage = stages[si]
        first = start_it if si == start_stage else 0
        if first == 0:
            stage.begin()
        settings = config.stage_settings(stage.name)
        total, bs = settings.iterations, settings.batch_size
        stage.train_mode()
        bar = progress(None, desc=f"training {stage.name}", total=total, quiet=quiet or not is_main)
        bar.update(first)
        running: dict[str, list[float]] = {}
        t_start: float | None = None
        timed = 0
        for it in range(first, total):
            if stop_after is not None and done_here >= stop_after:
                stopped = True
                break
            idx = batch_indices(run.n_train, bs, it, tc.seed, si)
            if run.world > 1:
                idx = idx[run.rank :: run.world]
            aug_rng = np.random.default_rng([tc.seed, si, it, 1]) if tc.augment else None
            x = run.batch(idx, aug_rng)
            torch.manual_seed(derive_seed(tc.seed, si, it))
            if it - first == 2:
                t_start = time.perf_counter()
            values = stage.step(x, it)
            done_here += 1
            if not all(math.isfinite(v) for v in values.values()):
                raise MedmemError(
                    f"{stage.name} training diverged at iteration {it + 1} ({values}); lower "
                    f"{stage.name}.lr (now {settings.lr})."
                )
            if t_start is not None and timed < tc.timing_iterations:
                timed += 1
                if timed == tc.timing_iterations or it + 1 == total:
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    spi = (time.perf_counter() - t_start) / timed
                    timing[stage.name] = spi
                    msg = (
                        f"{stage.name}: ~{spi:.3f} s/iteration on {dev} "
                        f"(~{spi * (total - it - 1) / 60:.1f} min for the remaining "
                        f"{total - it - 1} iterations)"
                    )
                    logger.debug(msg)
                    if is_main and not quiet:
                        tqdm.write(msg, file=sys.stderr)
                    if is_main:
                        atomic_write_json(out / TIMING, timing)
            for k, v in values.items():
                running.setdefault(k, []).append(v)
            bar.update(1)
            if (it + 1) % tc.log_every == 0 or it + 1 == total:
                row = {"stage": stage.name, "stage_index": si, "iteration": it + 1}
                row.update({k: float(np.mean(v)) for k, v in running.items()})
                losses.append(row)
                running = {}
                bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", refresh=False)
                if is_main:
                    _write_table(losses, out / LOSSES)
            if tracker is not None and si == last and config.tracking.due(it + 1, total):
                model = GenerativeModel(
                    config, _model_networks(run), scale_factor=run.scale_factor, device=dev
                )
                row = tracker.check(model, it + 1, stage.val_loss(val_x))
                stage.train_mode()
                tracking_rows.append(row)
                tracker.write(tracking_rows)
            if is_main and ((it + 1) % tc.checkpoint_every == 0 or it + 1 == total):
                _save(out, run, si, it + 1, config, fingerprint)
        bar.close()
        if stopped:
            break
        if si < last:
            stage.finish()
    result = TrainResult(
        run_dir=out,
        model=None,
        finished=not stopped,
        seconds_per_iteration=timing,
        tracking=pd.DataFrame(tracking_rows),
    )
    if not stopped:
        model = GenerativeModel(
            config,
            _model_networks(run),
            scale_factor=run.scale_factor,
            info={
                "n_train": run.n_train,
                "train_fingerprint": fingerprint,
                "iterations": {s: config.stage_settings(s).iterations for s in stages_names},
                "seconds_per_iteration": timing,
            },
            device=dev,
        )
        if is_main:
            model.save(out / MODEL_DIR, overwrite=True)
        result.model = model
    return result


def _model_networks(run: _Run) -> dict[str, nn.Module]:
    return {k: v for k, v in run.networks.items() if k in ("autoencoder", "unet", "generator")}


def _save(
    out: Path, run: _Run, stage: int, iteration: int, config: GenerativeConfig, fp: str
) -> None:
    _checkpoint.save_checkpoint(
        out,
        networks=run.networks,
        optimizers=run.optimizers,
        info={
            "stage": stage,
            "iteration": iteration,
            "scale_factor": run.scale_factor,
            "config": config.identity_dict(),
            "train_fingerprint": fp,
            "n_train": run.n_train,
            "medmem_version": medmem.__version__,
        },
    )


def _check_resume(
    out: Path, meta: dict[str, Any], config: GenerativeConfig, fp: str, n: int
) -> None:
    """Refuse to resume with other data or settings that change the weights."""
    # a stage not yet finished may be given more (or fewer) iterations: training longer
    # continues exactly where the checkpoint stopped (the learning rate is constant)
    open_stages = config.stages[int(meta.get("stage", 0)) :]
    _checkpoint.check_resume(
        out / _checkpoint.CHECKPOINT_NAME,
        meta,
        data={"train_fingerprint": fp, "n_train": n},
        saved_settings=meta.get("config", {}),
        settings=config.identity_dict(),
        elsewhere="another --out folder",
        may_change=lambda d: any(d.startswith(f"{s}.iterations:") for s in open_stages),
    )


__all__ = ["TrainResult", "train"]
