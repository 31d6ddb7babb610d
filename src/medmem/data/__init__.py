"""Data: find, read and preprocess 2D and 3D medical images, streamed one at a time.

``load_dataset(src)`` indexes a folder, glob, CSV manifest or list of paths (PNG, JPEG, TIFF,
DICOM files and series, NIfTI, NumPy) into an :class:`ImageDataset` whose items are float32
tensors ``(1, *image_size)`` in [0, 1]. ``make_phantom``/``write_phantoms`` make built-in
anatomy-like test data.
"""

from __future__ import annotations

from medmem.data._base import ArrayDataset, BaseImageDataset
from medmem.data._dataset import ImageDataset, load_dataset
from medmem.data._preprocess import DEFAULT_IMAGE_SIZE, SPATIAL_MODES, Preprocess
from medmem.data._readers import SUPPORTED_SUFFIXES, ImageInfo, probe_image, read_image
from medmem.data.phantoms import PHANTOM_FORMATS, make_phantom, write_phantoms

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "PHANTOM_FORMATS",
    "SPATIAL_MODES",
    "SUPPORTED_SUFFIXES",
    "ArrayDataset",
    "BaseImageDataset",
    "ImageDataset",
    "ImageInfo",
    "Preprocess",
    "load_dataset",
    "make_phantom",
    "probe_image",
    "read_image",
    "write_phantoms",
]
