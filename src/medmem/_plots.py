"""Figures shared by the audit, the report and the studies (matplotlib, no display).

Figures are ``matplotlib.figure.Figure`` objects drawn and saved without pyplot: medmem
never sets the matplotlib backend nor keeps figures in pyplot's global list, so importing
it leaves a notebook's plotting as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from medmem._io import atomic_save

#: written into every PNG figure: ``medmem screen`` recognises medmem's own figures by it
PNG_METADATA = {"Software": "medmem"}


def subplots(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    **kwargs: Any,
) -> tuple[Figure, Any]:
    """Like ``pyplot.subplots``, on a stand-alone Figure (no backend, no global state)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def central_slices(image: np.ndarray) -> list[np.ndarray]:
    """One 2D view of a 2D image; three orthogonal central slices of a (D, H, W) volume."""
    image = np.asarray(image)
    while image.ndim > 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        return [image]
    if image.ndim != 3:
        raise ValueError(f"expected a 2D or 3D image, got shape {image.shape}")
    d, h, w = image.shape
    return [image[d // 2], image[:, h // 2, :], image[:, :, w // 2]]


def draw_histogram(
    ax: Axes,
    nearest_val_corr: np.ndarray,
    nearest_synthetic_corr: np.ndarray,
    tau: float,
    *,
    title: str = "",
    legend: bool = True,
) -> None:
    """Draw the paper's Fig. 2 on ``ax``: per training image, correlation to its nearest
    validation and nearest synthetic image, with tau marked."""
    values = np.concatenate([nearest_val_corr, nearest_synthetic_corr])
    lo = float(np.floor(min(values.min(), tau) * 50) / 50)
    bins = np.linspace(lo, 1.0, 41)
    ax.hist(nearest_val_corr, bins=bins, alpha=0.6, label="train → nearest validation")
    ax.hist(nearest_synthetic_corr, bins=bins, alpha=0.6, label="train → nearest synthetic")
    ax.axvline(tau, color="k", ls="--", lw=1.2, label=f"tau = {tau:.3f}")
    ax.set_xlabel("Pearson correlation of embeddings")
    ax.set_ylabel("training images")
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=8, loc="upper left")


def plot_histogram(
    nearest_val_corr: np.ndarray,
    nearest_synthetic_corr: np.ndarray,
    tau: float,
    path: str | os.PathLike,
    *,
    title: str = "",
) -> None:
    """One audit's histogram (:func:`draw_histogram`) as a PNG file."""
    fig, ax = subplots(figsize=(6.4, 3.8), dpi=110)
    draw_histogram(ax, nearest_val_corr, nearest_synthetic_corr, tau, title=title)
    fig.tight_layout()
    save_figure(fig, path)


def png_base64(image: np.ndarray) -> str:
    """A 2D array in [0, 1] as a base64 grayscale PNG (NaN as 0; for data: URIs)."""
    import base64
    import io

    from PIL import Image

    arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    u8 = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def save_figure(fig: Figure, path: str | os.PathLike, **kwargs: Any) -> None:
    """Write a figure as PNG atomically, marked as medmem's (``PNG_METADATA``)."""
    atomic_save(path, lambda p: fig.savefig(p, format="png", metadata=PNG_METADATA, **kwargs))


@dataclass(frozen=True)
class GalleryPair:
    """A synthetic image and the training image it is nearest to."""

    synthetic: np.ndarray
    train: np.ndarray
    corr: float
    synthetic_id: str
    train_id: str


def plot_gallery(
    pairs: Sequence[GalleryPair],
    path: str | os.PathLike,
    *,
    tau: float,
    title: str = "Top synthetic images beside their nearest training images",
) -> None:
    """Rows of (synthetic | nearest training) views; three central slices per 3D volume."""
    if not pairs:
        return
    n_views = len(central_slices(pairs[0].synthetic))
    ncols = 2 * n_views
    nrows = len(pairs)
    fig, axes = subplots(
        nrows, ncols, figsize=(1.7 * ncols, 1.8 * nrows + 0.5), dpi=100, squeeze=False
    )
    for r, pair in enumerate(pairs):
        views = central_slices(pair.synthetic) + central_slices(pair.train)
        for c, view in enumerate(views):
            ax = axes[r, c]
            ax.imshow(view, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        flag = "copy" if pair.corr >= tau else "novel"
        axes[r, 0].set_ylabel(f"r={pair.corr:.3f}\n{flag}", fontsize=7)
        axes[r, 0].set_title(_short(pair.synthetic_id), fontsize=6)
        axes[r, n_views].set_title(_short(pair.train_id), fontsize=6)
    fig.suptitle(f"{title} (left: synthetic, right: training; tau={tau:.3f})", fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png", metadata=PNG_METADATA))


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


__all__ = [
    "GalleryPair",
    "central_slices",
    "draw_histogram",
    "plot_gallery",
    "plot_histogram",
    "png_base64",
    "save_figure",
    "subplots",
]
