"""Training of the text-conditional LDM on (image, report) pairs; resumable, seeded.

The frozen first stage encodes every distinct training image once (posterior mean, scaled
by 1/std); the frozen text encoder encodes every distinct caption once. Each iteration then
draws a batch of pairs (consecutive slices of per-epoch seeded permutations, as in
``medmem.generative``), drops captions with probability ``caption_dropout`` (classifier-free
guidance), noises the latents and regresses the noise (DDPM).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medmem._checkpoint import (
    CHECKPOINT_NAME,
    check_resume,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from medmem._errors import InputError, OutputExistsError
from medmem._io import atomic_save, atomic_write_json
from medmem._progress import progress
from medmem._seeds import batch_indices, derive_seed
from medmem.data import load_dataset
from medmem.generative._pipeline import diffusion_loss
from medmem.text2image._config import Text2ImageConfig
from medmem.text2image._encoder import MARKER_RE, TextEncoder
from medmem.text2image._model import TextToImageModel

logger = logging.getLogger(__name__)


@dataclass
class Pairs:
    """Training pairs: ``paths`` (absolute), ``texts``, optional ``patient_ids``."""

    paths: list[str]
    texts: list[str]
    patient_ids: list[str | None]


def read_pairs(csv: str | Path, *, path_column: str = "path", text_column: str = "text") -> Pairs:
    """Read a CSV of image paths (relative to the CSV's folder) and report texts."""
    csv = Path(csv)
    if not csv.is_file():
        raise InputError(f"{csv}: pairs CSV not found (columns {path_column}, {text_column}).")
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = [c for c in (path_column, text_column) if c not in frame.columns]
    if missing:
        raise InputError(
            f"{csv}: missing column(s) {missing}; found {list(frame.columns)}. Name the image "
            f"path column {path_column!r} and the report column {text_column!r}."
        )
    if frame.empty:
        raise InputError(f"{csv}: no rows.")
    base = csv.resolve().parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in frame[path_column]]
    pids = list(frame["patient_id"]) if "patient_id" in frame.columns else [None] * len(paths)
    return Pairs(paths, list(frame[text_column]), pids)


def treat_markers(
    text: str,
    mode: str,
    *,
    neutral: str = "unspecified",
    rng: Any = None,
    vocab: list[str] | None = None,
) -> str:
    """Apply a de-identification marker treatment: keep, remove, neutral word, random word."""
    if mode == "keep":
        return text
    if mode == "remove":
        return " ".join(MARKER_RE.sub("", text).split())
    if mode == "neutral":
        return MARKER_RE.sub(neutral, text)
    if mode == "random":
        if rng is None or not vocab:
            raise InputError("markers 'random' needs a random generator and a vocabulary.")
        return MARKER_RE.sub(lambda _m: vocab[rng.randrange(len(vocab))], text)
    raise InputError(f"unknown marker treatment {mode!r}: use keep, remove, neutral or random.")


@dataclass
class T2ITrainResult:
    """What :func:`train_t2i` returns: the run folder, the model (None if stopped early),
    whether it finished, seconds per iteration."""

    run_dir: Path
    model: TextToImageModel | None
    finished: bool
    seconds_per_iteration: float


def _identity(config: Text2ImageConfig) -> dict[str, Any]:
    d = config.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("checkpoint_every", "log_every")}
    d.pop("sampling")
    d.pop("guidance_scale")
    d["diffusion"].pop("iterations")
    return d


def train_t2i(
    config: Text2ImageConfig,
    out: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    encoder: TextEncoder | None = None,
    quiet: bool = False,
) -> T2ITrainResult:
    """Train the text-to-image LDM of ``config`` into the run folder ``out``.

    Args:
        config: settings (``load_t2i_config`` reads YAML); ``config.data`` is the pairs CSV.
        out: run folder; may hold a run only with ``resume``.
        resume: continue from the checkpoint (same settings; iterations may be raised).
        stop_after: stop after this many iterations in this call (checkpoint kept).
        encoder: a loaded text encoder (default: ``config.text.encoder``).
        quiet: no progress bar.

    Example:
        >>> result = train_t2i(load_t2i_config("configs/text2image/ldm-t2i-cpu.yaml"),
        ...                    "runs/t2i")  # doctest: +SKIP
    """
    out = Path(out)
    if not config.data:
        raise InputError("config.data is required: a CSV of image paths and report texts.")
    found = read_checkpoint(out)
    if (found is not None or (out / "model").exists()) and not resume:
        raise OutputExistsError(
            f"{out} already holds a training run; pass --resume to continue it, or choose "
            "another folder."
        )
    pairs = read_pairs(config.data, path_column=config.path_column, text_column=config.text_column)
    torch.manual_seed(derive_seed(config.train.seed, 0))
    model = TextToImageModel.create(config, encoder=encoder)
    enc = model.encoder
    unique_paths = sorted(set(pairs.paths))
    index = {p: i for i, p in enumerate(unique_paths)}
    ds = load_dataset(
        unique_paths,
        spatial_dims=model.first_stage.spatial_dims,
        image_size=model.first_stage.image_size,
        quiet=quiet,
    )
    raw = _encode_streamed(model, ds)
    if found is not None:
        meta = found[0]
        check_resume(  # diffusion.iterations may change (not part of the identity)
            out / CHECKPOINT_NAME,
            meta,
            data={"n_pairs": len(pairs.paths)},
            saved_settings=meta.get("identity") or {},
            settings=_identity(config),
            elsewhere="a new folder",
        )
        scale = float(meta["scale_factor"])
    else:
        scale = 1.0 / float(raw.std())
    model.scale_factor = scale
    latents = raw * scale  # (n_images, C, *S)
    image_of = torch.tensor([index[p] for p in pairs.paths])

    tc = config.text
    if tc.markers in ("remove", "neutral"):
        captions = [treat_markers(t, tc.markers, neutral=tc.neutral_word) for t in pairs.texts]
    else:
        captions = list(pairs.texts)
    distinct = sorted(set(captions))
    cap_index = {c: i for i, c in enumerate(distinct)}
    encoded = enc.encode(distinct)
    cap_of = torch.tensor([cap_index[c] for c in captions])
    variants = None
    if tc.markers == "random":  # a seeded pool of random-word variants per caption, encoded once
        vocab = enc.vocab_words()
        rng0 = random.Random(derive_seed(config.train.seed, 2))
        variants = torch.stack(
            [
                enc.encode(
                    [treat_markers(c, "random", rng=rng0, vocab=vocab) for c in distinct]
                ).states
                for _ in range(tc.random_variants)
            ]
        )  # (variants, n_captions, L, d)
    replacements = None
    if tc.caption_replacement > 0:  # a seeded pool of random word sequences, encoded once
        vocab = enc.vocab_words()
        rng1 = random.Random(derive_seed(config.train.seed, 3))
        lengths = [len(c.split()) or 1 for c in distinct]
        replacements = enc.encode(
            [
                " ".join(rng1.choice(vocab) for _ in range(rng1.choice(lengths)))
                for _ in range(16 * tc.random_variants)
            ]
        ).states

    unet = model.unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=config.diffusion.lr)
    start = 0
    if found is not None:
        restore(found[0], found[1], networks={"unet": unet}, optimizers={"unet": opt})
        start = int(found[0]["iteration"])
    total = config.diffusion.iterations
    if start > total:
        raise InputError(f"{out}: the checkpoint is at iteration {start} > iterations {total}.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "run.json",
        {
            "config": config.to_dict(),
            "n_pairs": len(pairs.paths),
            "n_images": len(unique_paths),
            "n_captions": len(distinct),
        },
    )
    scheduler = model.scheduler("ddpm")
    n = len(pairs.paths)
    bs = config.diffusion.batch_size
    rows = _read_losses(out / "losses.csv", start)
    dropper = None
    warmup = config.train.drop_warmup
    if config.train.drop_high_d > 0:
        state = found[0].get("drop_filter") if found is not None else None
        dropper = HighDFilter(config.train.drop_high_d, scheduler.num_train_timesteps, state=state)
    n_dropped = n_seen = 0
    bar = progress(None, desc="training text-to-image LDM", total=total - start, quiet=quiet)
    t0 = time.perf_counter()
    done = 0
    it = start
    while it < total and (stop_after is None or done < stop_after):
        idx = torch.tensor(batch_indices(n, bs, it, config.train.seed, 0))
        gen = torch.Generator().manual_seed(derive_seed(config.train.seed, 1, it))
        z = latents[image_of[idx]]
        ctx = encoded.states[cap_of[idx]].clone()
        if variants is not None:
            pick = torch.randint(0, variants.shape[0], (len(idx),), generator=gen)
            ctx = variants[pick, cap_of[idx]].clone()
        if replacements is not None:
            swap = torch.rand(len(idx), generator=gen) < tc.caption_replacement
            other = torch.randint(0, len(replacements), (len(idx),), generator=gen)
            ctx[swap] = replacements[other[swap]]
        drop = torch.rand(len(idx), generator=gen) < tc.caption_dropout
        ctx[drop] = model.empty.states[0]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
        pred = unet(noisy, timesteps=t, context=ctx)
        kind = config.diffusion.prediction_type
        per_sample = diffusion_loss(scheduler, kind, z, noise, t, pred, reduction="sample")
        if dropper is not None:
            with torch.no_grad():
                empty = model.empty.states.expand(len(idx), -1, -1)
                d = (pred.detach() - unet(noisy, timesteps=t, context=empty)).flatten(1)
            keep = dropper.keep(d.norm(dim=1), t, conditioned=~drop, active=it >= warmup)
            dropper.count(idx, keep, n)
            n_dropped += int((~keep).sum())
            per_sample = per_sample[keep]
        n_seen += len(idx)
        loss = per_sample.mean() if len(per_sample) else pred.sum() * 0.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        done += 1
        bar.update(1)
        if it % config.train.log_every == 0 or it == total:
            rows.append(
                {
                    "iteration": it,
                    "loss": float(loss.item()),
                    "dropped": n_dropped / max(n_seen, 1),
                }
            )
            n_dropped = n_seen = 0
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if it % config.train.checkpoint_every == 0 or it == total:
            _checkpoint(out, unet, opt, it, scale, config, n, dropper)
            _write_losses(out / "losses.csv", rows)
    bar.close()
    if done:
        _checkpoint(out, unet, opt, it, scale, config, n, dropper)
        _write_losses(out / "losses.csv", rows)
    spi = (time.perf_counter() - t0) / max(done, 1)
    unet.eval()
    if it < total:
        return T2ITrainResult(out, None, False, spi)
    model.info.update(
        {
            "iterations": total,
            "n_pairs": n,
            "n_images": len(unique_paths),
            "n_captions": len(distinct),
        }
    )
    model.save(out / "model", overwrite=True)
    return T2ITrainResult(out, model, True, spi)


class HighDFilter:
    """Which samples of a batch to keep under ``train.drop_high_d`` (Wen et al., ICLR 2024).

    A sample is dropped when its d_t exceeds ``factor`` times the running median of d_t in
    its timestep bin (10 bins; the last ``window`` conditioned samples of each). Samples
    trained with the empty caption have no d_t and are always kept. ``state`` (from
    :meth:`state` in a checkpoint) restores the medians and tallies, so a resumed run drops
    exactly what an uninterrupted one would.
    """

    n_bins = 10
    min_history = 32  # values a bin needs before its median is trusted

    def __init__(
        self,
        factor: float,
        num_train_timesteps: int,
        *,
        window: int = 256,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.factor = factor
        self.num_train_timesteps = num_train_timesteps
        self.window = window
        state = state or {}
        self.history: list[list[float]] = [
            list(h) for h in state.get("d_history", [[] for _ in range(self.n_bins)])
        ]
        self.seen: list[int] = list(state.get("seen", []))
        self.dropped: list[int] = list(state.get("dropped", []))

    def count(self, rows: torch.Tensor, keep: torch.Tensor, n_rows: int) -> None:
        """Tally, per training row, how often it was drawn and how often dropped."""
        if not self.seen:
            self.seen, self.dropped = [0] * n_rows, [0] * n_rows
        for r, k in zip(rows.tolist(), keep.tolist(), strict=True):
            self.seen[r] += 1
            self.dropped[r] += int(not k)

    def state(self) -> dict[str, Any]:
        """JSON-able state for the checkpoint."""
        return {"d_history": self.history, "seen": self.seen, "dropped": self.dropped}

    def keep(
        self, d: torch.Tensor, t: torch.Tensor, *, conditioned: torch.Tensor, active: bool
    ) -> torch.Tensor:
        """Boolean mask of the samples to keep; records the conditioned samples' d_t."""
        bins = (t * self.n_bins // self.num_train_timesteps).clamp(max=self.n_bins - 1)
        keep = torch.ones(len(d), dtype=torch.bool)
        for i in range(len(d)):
            if not conditioned[i]:
                continue
            h = self.history[int(bins[i])]
            if active and len(h) >= self.min_history:
                keep[i] = float(d[i]) <= self.factor * float(torch.tensor(h).median())
            h.append(float(d[i]))
            del h[: max(0, len(h) - self.window)]
        return keep


def _checkpoint(
    out: Path,
    unet: Any,
    opt: Any,
    it: int,
    scale: float,
    config: Text2ImageConfig,
    n: int,
    dropper: HighDFilter | None = None,
) -> None:
    info = {"iteration": it, "scale_factor": scale, "identity": _identity(config), "n_pairs": n}
    if dropper is not None:
        info["drop_filter"] = dropper.state()
        frame = pd.DataFrame({"seen": dropper.seen, "dropped": dropper.dropped})
        frame.index.name = "row"
        atomic_save(out / "drops.csv", lambda tmp: frame.to_csv(tmp))
    save_checkpoint(out, networks={"unet": unet}, optimizers={"unet": opt}, info=info)


def _encode_streamed(model: TextToImageModel, ds: Any, batch: int = 32) -> torch.Tensor:
    """Latent means of every image, read ``batch`` images at a time (only latents kept)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            x = torch.stack([ds[i] for i in range(start, min(len(ds), start + batch))]).float()
            out.append(model.autoencoder.encode(x)[0])
    return torch.cat(out).float()


def _read_losses(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return [r for r in frame.to_dict("records") if r["iteration"] <= upto]


def _write_losses(path: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=["iteration", "loss", "dropped"])
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))


__all__ = ["HighDFilter", "Pairs", "T2ITrainResult", "read_pairs", "train_t2i", "treat_markers"]
