"""File-backed datasets: ``load_dataset`` and ``ImageDataset``.

Images are streamed: the dataset holds paths, shapes and ids, and ``__getitem__`` reads and
preprocesses one file. It pickles cheaply (no open handles), so it works in a
``torch.utils.data.DataLoader`` with worker processes.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmem._errors import InputError, MedmemWarning
from medmem._io import combine_hashes, file_sha256
from medmem._progress import progress
from medmem.data._base import BaseImageDataset
from medmem.data._preprocess import Preprocess, check_image_size, check_pixels
from medmem.data._readers import SUPPORTED_SUFFIXES, read_item
from medmem.data._sources import (
    Item,
    collect,
    describe_ignored,
    probe_entries,
    resolve_patient_ids,
)

logger = logging.getLogger(__name__)


class ImageDataset(BaseImageDataset):
    """Images on disk, read one at a time and preprocessed to ``(1, *image_size)`` in [0, 1].

    Build it with :func:`load_dataset`. Attributes (one entry per image, same order):
    ``ids`` (path relative to the source folder, posix), ``paths`` (absolute; a DICOM series
    is its folder), ``patient_ids`` (str or None), ``shapes`` (raw shapes from the headers).
    ``skipped`` lists ``{"path", "reason"}`` of files dropped by ``skip_unreadable=True``.

    Args:
        items: probed items (from the loader).
        preprocess: the preprocessing applied in ``__getitem__``.
        skipped: files dropped while loading.
    """

    source: str | None = None  # the folder, glob or manifest given to load_dataset

    def __init__(
        self,
        items: Sequence[Item],
        preprocess: Preprocess,
        skipped: Iterable[dict[str, str]] = (),
    ) -> None:
        self._items: list[Item] = list(items)
        ids = [it.id for it in self._items]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"image ids must be unique; {dup!r} occurs more than once.")
        dims = {it.spatial_dims for it in self._items}
        if dims - {preprocess.spatial_dims}:
            raise InputError(
                f"items are {sorted(dims)}D but the preprocessing is for "
                f"{preprocess.spatial_dims}D images."
            )
        self.preprocess = preprocess
        self.spatial_dims = preprocess.spatial_dims
        self.image_size = preprocess.image_size
        self.ids = ids
        self.patient_ids = [it.patient_id for it in self._items]
        self.paths = [Path(it.path) for it in self._items]
        self.shapes = [it.shape for it in self._items]
        self.skipped: list[dict[str, str]] = [dict(s) for s in skipped]
        self._hashes: list[str | None] = [None] * len(self._items)
        self._files: list[list[Path]] | None = None

    @property
    def files(self) -> list[list[Path]]:
        """The files of each image: a DICOM series' slices, or the one file ``paths[i]``."""
        if self._files is None:
            self._files = [
                [Path(f) for f in it.files] if it.files is not None else [Path(it.path)]
                for it in self._items
            ]
        return [list(f) for f in self._files]

    def _index(self, i: Any) -> int:
        k = operator.index(i)
        n = len(self._items)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        return k

    def read_raw(self, i: int) -> np.ndarray:
        """Image ``i`` as read from disk, before preprocessing: float32 (H, W) or (D, H, W)."""
        it = self._items[self._index(i)]
        return read_item(it.path, it.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i`` preprocessed: float32 tensor ``(1, *image_size)`` in [0, 1]."""
        it = self._items[self._index(i)]
        return self.preprocess(read_item(it.path, it.files), name=it.path)

    def content_hash(self, i: int) -> str:
        """SHA-256 of the file's bytes (a DICOM series: combined over its files by name)."""
        k = self._index(i)
        h = self._hashes[k]
        if h is None:
            it = self._items[k]
            try:
                if it.files is None:
                    h = file_sha256(it.path)
                else:
                    h = combine_hashes([file_sha256(f) for f in it.files], salt="dicom-series")
            except FileNotFoundError as exc:
                raise InputError(
                    f"{exc.filename}: no longer exists (it was there when the dataset was "
                    "loaded). Reload the dataset."
                ) from exc
            self._hashes[k] = h
        return h

    def preprocessing_key(self) -> str:
        """Everything that changes the tensors: reader version, shape, resizing, scaling."""
        return "medmem.readers/v1;" + self.preprocess.key()

    def subset(self, indices: Iterable[int]) -> ImageDataset:
        """A dataset of the images at ``indices`` (in that order), same preprocessing."""
        ks = [self._index(i) for i in indices]
        sub = ImageDataset([self._items[k] for k in ks], self.preprocess, self.skipped)
        sub._hashes = [self._hashes[k] for k in ks]
        return sub

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, spatial_dims={self.spatial_dims}, "
            f"image_size={self.image_size}, skipped={len(self.skipped)})"
        )


def _describe(item: Item) -> str:
    return f"{item.id!r} (shape {item.shape})"


def load_dataset(
    src: str | os.PathLike | Sequence[str | os.PathLike] | BaseImageDataset,
    *,
    spatial_dims: int | None = None,
    image_size: int | Sequence[int] | None = None,
    patient_id_pattern: str | re.Pattern | None = None,
    skip_unreadable: bool = False,
    quiet: bool = False,
    spatial_mode: str = "resample",
    path_column: str | None = None,
    patient_column: str | None = None,
) -> ImageDataset:
    """Find, probe and index 2D or 3D images; pixels are read later, one item at a time.

    Args:
        src: a folder (searched recursively; hidden and unsupported files ignored), a glob
            pattern (``"data/*.png"``, ``"data/**/*.dcm"``), a CSV manifest (``path`` column,
            optional ``patient_id``; paths relative to the manifest's folder), or a list of
            files/folders. In a search, the single-frame DICOM files of one series in one
            folder become one 3D item. A dataset is returned as is (after checks).
        spatial_dims: 2 or 3; default: from the images. A mismatch is an error.
        image_size: output shape, (H, W) or (D, H, W); default 128x128 (2D), 64^3 (3D).
            Every image is resampled to it, whole field of view kept (``spatial_mode``).
        patient_id_pattern: regex giving the patient id from the file name (then its path):
            group ``patient`` if named, else group 1, else the whole match. Manifest
            ``patient_id`` values take precedence; DICOM PatientID is the fallback.
        skip_unreadable: drop files that cannot be probed, decoded or normalised (each file
            is then read once now) and list them in ``dataset.skipped``; default: raise.
        quiet: no progress bars.
        spatial_mode: "resample" (default: resize every axis, whole field of view) or
            "crop" (centre crop or zero pad, voxel size kept; the paper's 3D sub-volumes).
        path_column, patient_column: a CSV manifest's image and patient-id columns; default
            ``path`` / ``patient_id``, else (with a logged note) ``file``, ``filename``,
            ``image`` or ``Image Index`` (ChestX-ray14's table) / ``Patient ID``,
            ``patient`` or ``subject_id``.

    Returns:
        An :class:`ImageDataset`.

    Raises:
        InputError: nothing found, mixed 2D/3D, unreadable files, bad options.

    Example:
        >>> ds = load_dataset("data/train", image_size=(128, 128))  # doctest: +SKIP
        >>> ds[0].shape, ds.ids[0], ds.patient_ids[0]  # doctest: +SKIP
        (torch.Size([1, 128, 128]), 'P0000_00.png', 'P0000')
    """
    if spatial_dims is not None and spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}.")
    Preprocess(spatial_dims or 2, spatial_mode=spatial_mode)  # checks spatial_mode up front
    if isinstance(src, BaseImageDataset):
        return _check_given_dataset(src, spatial_dims, image_size)  # type: ignore[return-value]

    collected = collect(src, path_column=path_column, patient_column=patient_column)
    skipped: list[dict[str, str]] = []

    def on_error(path: str, where: str, exc: Exception) -> None:
        if not skip_unreadable:
            raise exc
        skipped.append({"path": path, "reason": str(exc)})

    items = probe_entries(collected, on_error=on_error, quiet=quiet)
    if not items:
        if skipped:
            raise InputError(
                f"all {len(skipped)} image(s) in {collected.searched} are unreadable, e.g. "
                f"{skipped[0]['reason']}"
            )
        raise InputError(
            f"no images found in {collected.searched}; found {describe_ignored(collected.ignored)}"
            f" (hidden files ignored). medmem reads {', '.join(SUPPORTED_SUFFIXES)} files and "
            "DICOM series folders: give a folder, glob or manifest of such images."
        )

    items = resolve_patient_ids(items, patient_id_pattern)

    by_dims: dict[int, Item] = {}
    for it in items:
        by_dims.setdefault(it.spatial_dims, it)
    if len(by_dims) > 1:
        raise InputError(
            f"{collected.searched} mixes 2D and 3D images: {_describe(by_dims[2])} is 2D but "
            f"{_describe(by_dims[3])} is 3D. Load them as separate datasets (e.g. with a glob "
            "or a manifest)."
        )
    found_dims = next(iter(by_dims))
    if spatial_dims is not None and spatial_dims != found_dims:
        raise InputError(
            f"spatial_dims={spatial_dims} was given but the images in {collected.searched} are "
            f"{found_dims}D, e.g. {_describe(items[0])}."
        )
    preprocess = Preprocess(
        found_dims, check_image_size(image_size, found_dims), spatial_mode=spatial_mode
    )

    if skip_unreadable:
        items = _drop_unusable(items, skipped, quiet=quiet)
        if not items:
            raise InputError(
                f"all {len(skipped)} image(s) in {collected.searched} are unreadable, e.g. "
                f"{skipped[0]['reason']}"
            )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable file(s) in {collected.searched}, e.g. "
            f"{skipped[0]['reason']} (listed in dataset.skipped)",
            category=MedmemWarning,
            stacklevel=2,
        )
    ds = ImageDataset(items, preprocess, skipped)
    # where the images came from, as given (a folder, glob or manifest), for the record
    ds.source = str(src) if isinstance(src, (str, os.PathLike)) else None
    logger.info("loaded %s from %s", ds, collected.searched)
    return ds


def _drop_unusable(items: list[Item], skipped: list[dict[str, str]], *, quiet: bool) -> list[Item]:
    """Read every item once; drop (and record) those that fail to decode or normalise."""
    kept = []
    for it in progress(items, desc="Checking images", total=len(items), quiet=quiet):
        try:
            check_pixels(read_item(it.path, it.files), it.path)
        except InputError as exc:
            skipped.append({"path": it.path, "reason": str(exc)})
            continue
        kept.append(it)
    return kept


def _check_given_dataset(
    ds: BaseImageDataset,
    spatial_dims: int | None,
    image_size: int | Sequence[int] | None,
) -> BaseImageDataset:
    if spatial_dims is not None and spatial_dims != ds.spatial_dims:
        raise InputError(
            f"spatial_dims={spatial_dims} was given but the dataset is {ds.spatial_dims}D."
        )
    if image_size is not None:
        size = check_image_size(image_size, ds.spatial_dims)
        if size != tuple(ds.image_size):
            raise InputError(
                f"image_size={size} was given but the dataset's images are "
                f"{tuple(ds.image_size)}. Load the source again with this image_size."
            )
    return ds


__all__ = ["ImageDataset", "load_dataset"]
