"""The dataset contract every stage downstream relies on.

A medmem dataset is a ``torch.utils.data.Dataset`` of preprocessed images: item ``i`` is a
float32 tensor of shape ``(1, *image_size)`` with intensities in [0, 1]. Beside the items it
knows, without reading pixels, each image's id, patient id (or None) and a content hash,
and a fingerprint of the whole set (content + preprocessing) used by caches and audits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medmem._errors import InputError
from medmem._io import combine_hashes


class BaseImageDataset(Dataset):
    """Shared behaviour of file-backed and in-memory datasets.

    Subclasses set ``ids``, ``patient_ids``, ``spatial_dims``, ``image_size`` and implement
    ``__getitem__`` and ``content_hash``.
    """

    ids: list[str]
    patient_ids: list[str | None]
    spatial_dims: int
    image_size: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def content_hash(self, i: int) -> str:  # pragma: no cover - abstract
        """Hex SHA-256 identifying the content of image ``i`` (before preprocessing)."""
        raise NotImplementedError

    def preprocessing_key(self) -> str:
        """A string that changes whenever preprocessing would change the tensors."""
        return f"dims={self.spatial_dims};size={tuple(self.image_size)}"

    def item_key(self, i: int) -> str:
        """Hash of image ``i``'s content together with the preprocessing (a cache key)."""
        return hashlib.sha256(
            (self.content_hash(i) + "|" + self.preprocessing_key()).encode()
        ).hexdigest()

    def fingerprint(self) -> str:
        """SHA-256 over the ordered content hashes and the preprocessing."""
        return combine_hashes(
            [self.content_hash(i) for i in range(len(self))], salt=self.preprocessing_key()
        )

    @property
    def has_patient_ids(self) -> bool:
        """True when every image has a patient id."""
        return len(self) > 0 and all(p is not None for p in self.patient_ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, spatial_dims={self.spatial_dims}, "
            f"image_size={tuple(self.image_size)})"
        )


class ArrayDataset(BaseImageDataset):
    """An in-memory dataset of already preprocessed images (tests, demos, generated samples).

    Args:
        images: array (n, *image_size) or (n, 1, *image_size), float, values in [0, 1].
        ids: one id per image (default ``img00000``...).
        patient_ids: one patient id per image, or None.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        ids: Sequence[str] | None = None,
        patient_ids: Sequence[str | None] | None = None,
    ) -> None:
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim in (4, 5) and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim not in (3, 4):
            raise InputError(
                f"images must have shape (n, H, W) or (n, D, H, W) (optionally with a channel "
                f"axis of 1), got {arr.shape}."
            )
        if arr.shape[0] == 0:
            raise InputError("images is empty: give at least one image.")
        if not np.isfinite(arr).all():
            raise InputError("images contain NaN or infinity.")
        self._images = np.ascontiguousarray(arr)
        n = arr.shape[0]
        self.ids = list(ids) if ids is not None else [f"img{i:05d}" for i in range(n)]
        if len(self.ids) != n or len(set(self.ids)) != n:
            raise InputError(f"ids must be {n} unique strings, got {len(self.ids)} items.")
        self.patient_ids = list(patient_ids) if patient_ids is not None else [None] * n
        if len(self.patient_ids) != n:
            raise InputError(f"patient_ids must have {n} items, got {len(self.patient_ids)}.")
        self.spatial_dims = arr.ndim - 1
        self.image_size = tuple(int(s) for s in arr.shape[1:])
        self._hashes: list[str | None] = [None] * n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._images[i][None].copy())

    def content_hash(self, i: int) -> str:
        h = self._hashes[i]
        if h is None:
            h = hashlib.sha256(self._images[i].tobytes()).hexdigest()
            self._hashes[i] = h
        return h

    def array(self, i: int) -> np.ndarray:
        """Image ``i`` as a (*image_size) float32 array."""
        return self._images[i]


__all__ = ["ArrayDataset", "BaseImageDataset"]
