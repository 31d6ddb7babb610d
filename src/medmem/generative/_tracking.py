"""Memorization tracked during training (Dar et al., Fig. 8).

At chosen iterations the model samples ``n_synthetic`` images, which are audited with
``medmem.audit`` against the training and validation sets using ONE detector for the
whole run (given, or trained once on the training set and kept in ``RUN/detector``), so
that the numbers are comparable across iterations. Each check appends a row to
``tracking.csv`` (iteration, n_mem, n_copies, pct_mem, pct_copies, tau, val_loss, fid,
ms_ssim) and redraws ``tracking.png``.

FID and MS-SSIM come from ``medmem.metrics`` when it is importable (FID on the detector's
features, so it is comparable only to FIDs computed with the same detector); otherwise NaN.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medmem._errors import MedmemWarning
from medmem._io import atomic_save
from medmem._seeds import derive_seed
from medmem.data import ArrayDataset
from medmem.generative._config import GenerativeConfig
from medmem.generative._pipeline import GenerativeModel

logger = logging.getLogger(__name__)

TRACKING_CSV = "tracking.csv"
TRACKING_PNG = "tracking.png"
DETECTOR_DIR = "detector"
COLUMNS = (
    "iteration",
    "n_train",
    "n_val",
    "n_synthetic",
    "n_mem",
    "n_copies",
    "pct_mem",
    "pct_copies",
    "tau",
    "val_loss",
    "fid",
    "ms_ssim",
    "seconds",
)


def _metrics() -> Any:
    try:
        from medmem import metrics
    except ImportError:
        return None
    needed = ("fid", "extract_features", "ms_ssim_diversity")
    return metrics if all(hasattr(metrics, n) for n in needed) else None


class Tracker:
    """Audits samples of the model under training with a fixed detector."""

    def __init__(
        self, config: GenerativeConfig, run_dir: Path, train: Any, val: Any, *, quiet: bool
    ) -> None:
        # audit sits to the right of generative in medmem's import order; imported here so
        # that the generative package loads without it.
        from medmem import Detector

        self.config = config
        self.run_dir = Path(run_dir)
        self.train = train
        self.val = val
        self.quiet = quiet
        tc = config.tracking
        saved = self.run_dir / DETECTOR_DIR
        if tc.detector is not None:
            self.detector = Detector.load(tc.detector)
        elif (saved / "config.json").exists():
            self.detector = Detector.load(saved)
        else:
            logger.info("training the tracking detector on %d images", len(train))
            self.detector = Detector.train(
                train,
                epochs=tc.detector_epochs,
                seed=config.train.seed,
                checkpoint_dir=self.run_dir / "detector-checkpoint",
                quiet=quiet,
            )
            self.detector.save(saved)
        self._metrics = _metrics() if tc.quality else None
        self._train_features: np.ndarray | None = None

    def check(self, model: GenerativeModel, iteration: int, val_loss: float) -> dict[str, Any]:
        """Sample, audit and score; returns the tracking row for ``iteration``."""
        from medmem import audit

        tc = self.config.tracking
        t0 = time.perf_counter()
        images = model.sample(
            tc.n_synthetic,
            seed=derive_seed(self.config.train.seed, iteration),
            sampler=tc.sampler if self.config.model == "ldm" else None,
            steps=min(tc.steps, self.config.diffusion.num_train_timesteps),
            quiet=True,
        )
        syn = ArrayDataset(images, ids=[f"it{iteration}_syn{i:05d}" for i in range(len(images))])
        result = audit(
            self.train,
            self.val,
            syn,
            detector=self.detector,
            percentile=tc.percentile,
            calibration="paper",  # tracking reproduces the paper's analysis (Fig. 4)
            score="embedding",  # and its score: the embedding correlation
            n_bootstrap=0,
            n_controls=0,
            cache_dir=self.run_dir / "embedding-cache",
            quiet=True,
        )
        s = result.summary
        row: dict[str, Any] = {
            "iteration": iteration,
            "n_train": s["n_train"],
            "n_val": s["n_val"],
            "n_synthetic": s["n_synthetic"],
            "n_mem": s["n_mem"],
            "n_copies": s["n_copies"],
            "pct_mem": s["pct_mem"],
            "pct_copies": s["pct_copies"],
            "tau": s["tau"],
            "val_loss": val_loss,
            "fid": math.nan,
            "ms_ssim": math.nan,
        }
        if self._metrics is not None:
            row["fid"], row["ms_ssim"] = self._quality(syn)
        row["seconds"] = time.perf_counter() - t0
        logger.info(
            "iteration %d: n_mem=%d (%.1f%% of n_train), n_copies=%d (%.1f%% of n_synthetic)",
            iteration,
            row["n_mem"],
            row["pct_mem"],
            row["n_copies"],
            row["pct_copies"],
        )
        return row

    def _quality(self, syn: Any) -> tuple[float, float]:
        m = self._metrics
        fid = ms = math.nan
        try:
            if self._train_features is None:
                self._train_features = m.extract_features(self.train, self.detector, quiet=True)
            fid = float(
                m.fid(self._train_features, m.extract_features(syn, self.detector, quiet=True))
            )
        except Exception as exc:  # a metric failing must not stop training
            warnings.warn(
                f"FID failed during tracking ({exc}); recorded NaN.",
                category=MedmemWarning,
                stacklevel=2,
            )
        try:
            ms = float(m.ms_ssim_diversity(syn, seed=0, quiet=True))
        except Exception as exc:
            warnings.warn(
                f"MS-SSIM failed during tracking ({exc}); recorded NaN.",
                category=MedmemWarning,
                stacklevel=2,
            )
        return fid, ms

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Write tracking.csv and tracking.png (atomically)."""
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        atomic_save(self.run_dir / TRACKING_CSV, lambda p: frame.to_csv(p, index=False))
        plot_tracking(frame, self.run_dir / TRACKING_PNG)


def plot_tracking(frame: pd.DataFrame, path: str | Path, *, title: str = "") -> None:
    """Memorization, validation loss and quality over training iterations (Fig. 8 style)."""
    from medmem._plots import subplots

    has_quality = frame[["fid", "ms_ssim"]].notna().any().any() if len(frame) else False
    n = 3 if has_quality else 2
    fig, axes = subplots(n, 1, figsize=(5.5, 2.2 * n + 0.4), dpi=110, sharex=True)
    it = frame["iteration"]
    ax = axes[0]
    ax.plot(it, frame["pct_mem"], "o-", label="memorized (% of n_train)")
    ax.plot(it, frame["pct_copies"], "s--", label="copies (% of n_synthetic)")
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    axes[1].plot(it, frame["val_loss"], "o-", color="tab:green")
    axes[1].set_ylabel("validation loss")
    axes[1].grid(alpha=0.3)
    if has_quality:
        ax = axes[2]
        ax.plot(it, frame["fid"], "o-", color="tab:red", label="FID (detector features)")
        ax.set_ylabel("FID")
        ax2 = ax.twinx()
        ax2.plot(it, frame["ms_ssim"], "s--", color="tab:purple", label="MS-SSIM")
        ax2.set_ylabel("MS-SSIM")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training iteration")
    fig.suptitle(title or "Memorization during training", fontsize=9)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png"))


def save_grid(images: Any, path: str | Path, *, ncols: int = 8, title: str = "") -> None:
    """A PNG grid of (n, 1, *size) images in [0, 1]; 3D volumes show their central slices."""
    from medmem._plots import central_slices, subplots

    arr = np.asarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images)
    arr = arr[:, 0]
    views = [central_slices(a) if a.ndim == 3 else [a] for a in arr]
    per = len(views[0])
    ncols = min(ncols, len(arr)) * per
    nrows = math.ceil(len(arr) * per / ncols)
    fig, axes = subplots(
        nrows, ncols, figsize=(1.2 * ncols, 1.2 * nrows + 0.3), dpi=100, squeeze=False
    )
    flat = [v for vs in views for v in vs]
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < len(flat):
            ax.imshow(flat[k], cmap="gray", vmin=0.0, vmax=1.0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png"))


__all__ = ["COLUMNS", "Tracker", "plot_tracking", "save_grid"]
