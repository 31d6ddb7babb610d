"""Preprocessing from a raw image to the fixed-shape tensor every model in medmem consumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medmem._errors import InputError

#: Default ``image_size`` per ``spatial_dims``: 128x128 radiographs, 64^3 volumes (the whole
#: volume resampled to it). Pass ``image_size=(32, 256, 256)`` for the paper's MRNet volumes.
DEFAULT_IMAGE_SIZE: dict[int, tuple[int, ...]] = {2: (128, 128), 3: (64, 64, 64)}

#: How a raw image reaches ``image_size``: "resample" keeps the whole field of view (every
#: axis resized, anti-aliased); "crop" keeps the voxel size (centre crop or zero pad, the
#: paper's sub-volumes), which discards anatomy outside the crop.
SPATIAL_MODES: tuple[str, ...] = ("resample", "crop")

# Bump when the arithmetic below changes: it is part of every dataset fingerprint.
_VERSION = 1


def check_image_size(image_size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...]:
    """Return ``image_size`` as a tuple of ``spatial_dims`` positive ints (None: the default)."""
    if image_size is None:
        return DEFAULT_IMAGE_SIZE[spatial_dims]
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size),) * spatial_dims
    try:
        size = tuple(image_size)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(
            f"image_size must be an int or a sequence of {spatial_dims} ints, got {image_size!r}."
        ) from None
    if len(size) != spatial_dims or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in size
    ):
        axes = "(H, W)" if spatial_dims == 2 else "(D, H, W)"
        raise InputError(
            f"image_size must be {spatial_dims} positive ints {axes} for {spatial_dims}D images, "
            f"got {image_size!r}."
        )
    return tuple(int(s) for s in size)


def check_pixels(image: np.ndarray, name: str) -> None:
    """Raise InputError naming ``name`` if ``image`` has NaN/inf or is constant."""
    if not np.isfinite(image).all():
        n_bad = int((~np.isfinite(image)).sum())
        raise InputError(
            f"{name}: contains {n_bad} NaN or infinite value(s) of {image.size}; its intensity "
            "cannot be normalised. Fix or remove the file."
        )
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        raise InputError(
            f"{name}: is constant (every pixel {lo}): its intensity cannot be normalised; "
            "remove it."
        )


def _resample_3d(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(1, D, H, W) -> (1, *size): area averaging along shrinking axes (a box filter, so no
    aliasing; 5x faster than a Gaussian pre-filter on 3D volumes), trilinear where an axis
    grows."""
    import torch.nn.functional as F

    shape = tuple(x.shape[1:])
    down = tuple(min(s, n) for s, n in zip(size, shape, strict=True))
    y = x[None]
    if down != shape:
        y = F.interpolate(y, size=down, mode="area")
    if down != tuple(size):
        y = F.interpolate(y, size=tuple(size), mode="trilinear", align_corners=False)
    return y[0]


class Preprocess:
    """Raw image -> float32 tensor ``(1, *image_size)`` with values in [0, 1].

    Steps: reject NaN/inf and constant images; min-max scale the whole image to [0, 1];
    then, with ``spatial_mode="resample"`` (default, 2D and 3D), resize every axis to
    ``image_size`` (2D: MONAI ``Resize``, bilinear with Gaussian anti-aliasing when
    shrinking; 3D: area averaging along shrinking axes, trilinear along growing ones; aspect
    ratio not kept; skipped when the size already matches): the whole field of view is kept.
    With ``spatial_mode="crop"``, centre crop or zero-pad to ``image_size``
    (MONAI ``ResizeWithPadOrCrop``; voxel size kept, as in the paper's 3D crops; anatomy
    outside the crop is lost). Padding is 0, the image minimum.

    Args:
        spatial_dims: 2 for (H, W) images, 3 for (D, H, W) volumes.
        image_size: output shape; an int means a square/cube. Default 128x128 (2D), 64^3 (3D).
        spatial_mode: "resample" (default) or "crop", see above.

    Example:
        >>> pre = Preprocess(2, image_size=64)
        >>> pre(np.random.rand(100, 80)).shape
        torch.Size([1, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: int | Sequence[int] | None = None,
        spatial_mode: str = "resample",
    ) -> None:
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        if spatial_mode not in SPATIAL_MODES:
            raise InputError(
                f"spatial_mode must be one of {', '.join(SPATIAL_MODES)} (--spatial-mode), got "
                f"{spatial_mode!r}: 'resample' keeps the whole field of view, 'crop' the voxel "
                "size."
            )
        self.spatial_dims = int(spatial_dims)
        self.image_size = check_image_size(image_size, self.spatial_dims)
        self.spatial_mode = spatial_mode
        self._transform: Any = None

    def describe(self) -> str:
        """One sentence on what is done to reach ``image_size`` (for summaries and reports)."""
        size = "x".join(map(str, self.image_size))
        if self.spatial_mode == "resample":
            return (
                f"every image min-max scaled to [0, 1] and resampled to {size} (anti-aliased; "
                "whole field of view kept, aspect ratio not kept)"
            )
        return (
            f"every image min-max scaled to [0, 1] and centre-cropped or zero-padded to {size} "
            "(voxel size kept; anatomy outside the crop discarded)"
        )

    def key(self) -> str:
        """A string that changes whenever these steps would produce different tensors."""
        if self.spatial_mode == "crop":
            spatial = "center-crop-or-pad0"
        else:
            spatial = "resize-bilinear-aa" if self.spatial_dims == 2 else "resize-area-trilinear"
        return (
            f"medmem.preprocess/v{_VERSION};dims={self.spatial_dims};"
            f"size={self.image_size};intensity=minmax01;spatial={spatial};dtype=float32"
        )

    def _spatial(self) -> Any:
        if self._transform is None:
            from monai.transforms import Resize, ResizeWithPadOrCrop

            if self.spatial_mode == "resample":
                self._transform = Resize(
                    self.image_size,
                    mode="bilinear" if self.spatial_dims == 2 else "trilinear",
                    anti_aliasing=True,
                    dtype=torch.float32,
                )
            else:
                self._transform = ResizeWithPadOrCrop(self.image_size, mode="constant")
        return self._transform

    def __call__(self, image: np.ndarray, *, name: str = "image") -> torch.Tensor:
        """Preprocess one raw image; ``name`` (the file) is used in error messages."""
        arr = np.asarray(image)
        if arr.ndim != self.spatial_dims:
            raise InputError(
                f"{name}: has shape {arr.shape} ({arr.ndim}D) but this preprocessing is for "
                f"{self.spatial_dims}D images."
            )
        arr = arr.astype(np.float32, copy=False)
        check_pixels(arr, name)
        lo, hi = float(arr.min()), float(arr.max())
        # float64 for the scale so that large ranges (e.g. 0..65535) keep their precision
        scaled = ((arr.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
        x = torch.from_numpy(scaled)[None]  # (1, *raw_shape)
        if tuple(x.shape[1:]) != self.image_size:
            if self.spatial_mode == "resample" and self.spatial_dims == 3:
                x = _resample_3d(x, self.image_size)
            else:
                out = self._spatial()(x)
                x = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
        return x.clamp_(0.0, 1.0).to(torch.float32).contiguous()

    def __getstate__(self) -> dict[str, Any]:
        # MONAI transforms are rebuilt on demand: keeps pickles (DataLoader workers) small.
        state = self.__dict__.copy()
        state["_transform"] = None
        return state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocess) and other.key() == self.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return (
            f"Preprocess(spatial_dims={self.spatial_dims}, image_size={self.image_size}, "
            f"spatial_mode={self.spatial_mode!r})"
        )


__all__ = ["DEFAULT_IMAGE_SIZE", "SPATIAL_MODES", "Preprocess"]
