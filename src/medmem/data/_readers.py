"""Read 2D and 3D medical images from files into float32 arrays, one file at a time.

Formats: PNG/JPEG (Pillow), TIFF (tifffile), DICOM files and DICOM series folders (pydicom),
NIfTI (nibabel), NumPy ``.npy``/``.npz``.

Axis convention. A 2D image is ``(H, W)`` (rows, columns). A 3D volume is ``(D, H, W)``:
slices first, the last two axes are the in-plane slice axes.

- DICOM multi-frame: ``(frames, Rows, Columns)``.
- DICOM series folder: ``(slices, Rows, Columns)``, slices sorted by ImagePositionPatient
  projected on the slice normal (for axial CT: feet to head), else by InstanceNumber.
- NIfTI: the voxel array ``(X, Y, Z)`` is transposed to ``(Z, Y, X)``, in stored voxel
  order (no reorientation to RAS). ``nib.Nifti1Image(vol.transpose(2, 1, 0), affine)`` thus
  writes a volume that reads back unchanged.
- NumPy and TIFF: the array as stored (TIFF pages are slices).

Axes of length 1 are dropped in every format, so a ``(1, H, W)`` array or an ``(X, Y, 1)``
NIfTI is a 2D image. Colour images are converted to grayscale (ITU-R 601 luma).

``probe_image`` reads headers only, so that 2D mixed with 3D is found before pixels are read.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmem._errors import InputError, ReadError

#: File name endings medmem can read (lower case; a DICOM series is a folder of DICOM files).
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".dcm",
    ".dicom",
    ".ima",
    ".nii",
    ".nii.gz",
    ".npy",
    ".npz",
)

_FORMAT_BY_SUFFIX = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".dcm": "DICOM",
    ".dicom": "DICOM",
    ".ima": "DICOM",
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".npy": "NPY",
    ".npz": "NPZ",
}

# Projection radiography: files of these modalities are 2D images even when several share a
# SeriesInstanceUID (a PA and a lateral view are not the slices of a volume).
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "XA"})

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_SKIP_HINT = (
    "Re-export the file or remove it from the set "
    "(or pass skip_unreadable=True to skip and list it)."
)


@dataclass(frozen=True)
class ImageInfo:
    """What a header says about an image: its array shape and number of spatial axes.

    ``shape`` is the shape ``read_image`` will return ((H, W) or (D, H, W)).
    """

    shape: tuple[int, ...]
    spatial_dims: int


@dataclass(frozen=True)
class _DicomHeader:
    """The DICOM header fields that grouping, sorting and patient ids need."""

    path: str
    series_uid: str | None
    patient_id: str | None
    modality: str | None
    rows: int
    columns: int
    frames: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    instance: int | None

    @property
    def groupable(self) -> bool:
        """True if this file may be a slice of a multi-file series volume."""
        return (
            self.series_uid is not None
            and self.frames == 1
            and (self.modality or "").upper() not in _PROJECTION_MODALITIES
        )


# --------------------------------------------------------------------------- formats


def suffix_of(path: str | os.PathLike) -> str:
    """The lower-case suffix used for format detection (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def format_of(path: str | os.PathLike) -> str | None:
    """Name of the reader for ``path`` ("PNG", "DICOM", ...), "DICOM series" for a folder, or
    None if unsupported. Files without a suffix are DICOM when they carry the DICM preamble."""
    p = Path(path)
    if p.is_dir():
        return "DICOM series"
    suffix = suffix_of(p)
    if suffix in _FORMAT_BY_SUFFIX:
        return _FORMAT_BY_SUFFIX[suffix]
    if suffix == "" and p.is_file() and _has_dicom_magic(p):
        return "DICOM"
    return None


def _unsupported(path: Path) -> ReadError:
    return ReadError(
        f"{path}: unsupported file type {suffix_of(path) or '(no suffix)'!r}. medmem reads "
        f"{', '.join(SUPPORTED_SUFFIXES)} files and DICOM series folders. Convert the file, "
        "or list only supported files in a CSV manifest with a 'path' column."
    )


def _squeezed_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop axes of length 1; require 2 or 3 axes left."""
    out = tuple(int(s) for s in shape if int(s) != 1)
    if len(out) not in (2, 3) or any(s == 0 for s in shape):
        raise InputError(
            f"{path}: has shape {tuple(int(s) for s in shape)}; medmem reads 2D (H, W) and 3D "
            "(D, H, W) images (axes of length 1 are ignored). Save each image in its own file "
            "with 2 or 3 axes."
        )
    return out


def _info(path: Path, shape: tuple[int, ...]) -> ImageInfo:
    shape = _squeezed_shape(path, shape)
    return ImageInfo(shape=shape, spatial_dims=len(shape))


def _finish(path: Path, arr: np.ndarray) -> np.ndarray:
    """Squeeze, check the number of axes, convert to contiguous float32."""
    if arr.dtype.kind not in "biuf":
        raise InputError(
            f"{path}: holds values of dtype {arr.dtype}; an image needs real numbers. "
            "Save it as integers or floats."
        )
    _squeezed_shape(path, arr.shape)
    return np.ascontiguousarray(np.squeeze(arr), dtype=np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Grayscale from the first three samples of the last axis (ITU-R 601 weights)."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


# --------------------------------------------------------------------------- PIL


def _probe_pil(path: Path) -> ImageInfo:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return _info(path, (h, w))


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("L", "I", "F") or mode.startswith("I;16"):
            arr = np.asarray(im)
        elif mode in ("LA", "La"):
            arr = np.asarray(im.getchannel(0))
        elif mode == "1":
            arr = np.asarray(im.convert("L"))
        else:  # RGB, RGBA, P, PA, CMYK, YCbCr...: luma at float precision
            arr = _luma(np.asarray(im.convert("RGB")))
    return _finish(path, arr)


# --------------------------------------------------------------------------- TIFF


def _tiff_layout(path: Path, shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """Shape after dropping the samples axis (colour) from a tifffile series."""
    if "S" in axes:
        s = axes.index("S")
        if shape[s] not in (1, 3, 4):
            raise InputError(
                f"{path}: has {shape[s]} samples per pixel; medmem reads grayscale or RGB(A) "
                "TIFF images."
            )
        shape = shape[:s] + shape[s + 1 :]
    return shape


def _probe_tiff(path: Path) -> ImageInfo:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        shape = _tiff_layout(path, tuple(series.shape), series.axes)
    return _info(path, shape)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        axes = series.axes
        arr = series.asarray()
    if "S" in axes:
        s = axes.index("S")
        arr = np.moveaxis(arr, s, -1)
        arr = arr[..., 0] if arr.shape[-1] == 1 else _luma(arr)
    return _finish(path, arr)


# --------------------------------------------------------------------------- NIfTI


def _probe_nifti(path: Path) -> ImageInfo:
    import nibabel as nib

    shape = tuple(nib.load(str(path)).shape)
    return _info(path, tuple(reversed(shape)))


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path), mmap=False)
    arr = np.asarray(img.get_fdata(dtype=np.float32))
    arr = np.squeeze(arr)
    # (X, Y, Z) -> (Z, Y, X); (X, Y) -> (Y, X): in-plane axes last, rows = Y.
    return _finish(path, arr.transpose(tuple(reversed(range(arr.ndim)))))


# --------------------------------------------------------------------------- NumPy


def _npz_key(path: Path, keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    for key in ("image", "arr_0"):
        if key in keys:
            return key
    raise InputError(
        f"{path}: holds {len(keys)} arrays {sorted(keys)} and none is named 'image' or "
        "'arr_0'. Save the image alone, or under the key 'image'."
    )


def _probe_npy(path: Path) -> ImageInfo:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    shape, dtype = tuple(arr.shape), arr.dtype
    del arr
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: holds values of dtype {dtype}; an image needs real numbers.")
    return _info(path, shape)


def _probe_npz(path: Path) -> ImageInfo:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".npy")]
        keys = [n[: -len(".npy")] for n in names]
        key = _npz_key(path, keys)
        with zf.open(key + ".npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    if np.dtype(dtype).kind not in "biuf":
        raise InputError(f"{path}: holds values of dtype {dtype}; an image needs real numbers.")
    return _info(path, tuple(shape))


def _read_npy(path: Path) -> np.ndarray:
    return _finish(path, np.load(path, allow_pickle=False))


def _read_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        key = _npz_key(path, list(npz.files))
        arr = npz[key]
    return _finish(path, arr)


# --------------------------------------------------------------------------- DICOM


def _dcmread(path: Path, *, header_only: bool) -> Any:
    import pydicom

    if path.is_file() and path.stat().st_size == 0:
        raise ReadError(f"{path}: is empty (0 bytes). Copy it again, or remove it from the set.")
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except pydicom.errors.InvalidDicomError:
        # A DICOM file without the 128-byte preamble: still readable when forced.
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only, force=True)
        except Exception:
            ds = None
        if ds is None or "Rows" not in ds:
            raise ReadError(
                f"{path}: is not a DICOM file (no 'DICM' marker and no image header; another "
                f"format, or a damaged file). {_SKIP_HINT}"
            ) from None
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(
            f"{path}: is a DICOM file without an image (no Rows/Columns: a report, a DICOMDIR, "
            "or a file cut short). Remove it from the set, or copy it again."
        )
    return ds


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_dicom_header(path: str | os.PathLike) -> _DicomHeader:
    """Read the header fields medmem needs from a DICOM file (no pixel data)."""
    p = Path(path)
    ds = _dcmread(p, header_only=True)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    instance = ds.get("InstanceNumber", None)
    try:
        instance = int(instance) if instance not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    return _DicomHeader(
        path=str(p),
        series_uid=_text(ds.get("SeriesInstanceUID", None)),
        patient_id=_text(ds.get("PatientID", None)),
        modality=_text(ds.get("Modality", None)),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=frames,
        position=_floats(ds.get("ImagePositionPatient", None), 3),
        orientation=_floats(ds.get("ImageOrientationPatient", None), 6),
        instance=instance,
    )


def _dicom_pixels(path: Path, ds: Any) -> np.ndarray:
    """Decoded pixels with the modality LUT (slope/intercept) applied, colour -> gray."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ReadError(
            f"{path}: is a DICOM file without pixel data (a header only, e.g. a structured "
            f"report or a file cut short before its image). {_SKIP_HINT}"
        )
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts)
        if ts is not None and not getattr(ts, "is_compressed", True):
            raise ReadError(
                f"{path}: its DICOM pixel data is damaged or cut short ({exc}); the file is "
                f"uncompressed ({name}), so no decoder will help. {_SKIP_HINT}"
            ) from exc
        raise ReadError(
            f"{path}: cannot decode the DICOM pixel data (transfer syntax {name}; {exc}). "
            "Decompress it (e.g. 'gdcmconv --raw' or 'dcmdjpeg'), install a pydicom "
            f"decoder plugin (pylibjpeg, gdcm), or remove it from the set. {_SKIP_HINT}"
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        return _luma(apply_color_lut(arr, ds))
    if samples > 1:
        return _luma(arr)
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _invert(arr: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (low = white) to MONOCHROME2 polarity, keeping the value range."""
    return arr.max() + arr.min() - arr


def _read_dicom_file(path: Path) -> np.ndarray:
    ds = _dcmread(path, header_only=False)
    arr = _dicom_pixels(path, ds)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = _invert(arr)
    return _finish(path, arr)


def _probe_dicom_file(path: Path) -> tuple[ImageInfo, _DicomHeader]:
    h = read_dicom_header(path)
    shape = (h.frames, h.rows, h.columns) if h.frames > 1 else (h.rows, h.columns)
    return _info(path, shape), h


def sort_series(headers: list[_DicomHeader]) -> list[_DicomHeader]:
    """Slices in volume order: position along the slice normal, else InstanceNumber, else name."""
    ref = headers[0].orientation
    if ref is not None and all(h.position is not None for h in headers):
        normal = np.cross(np.asarray(ref[:3]), np.asarray(ref[3:]))
        return sorted(headers, key=lambda h: (float(np.dot(normal, h.position)), h.path))
    if all(h.instance is not None for h in headers):
        return sorted(headers, key=lambda h: (h.instance, h.path))
    return sorted(headers, key=lambda h: h.path)


def _check_series(folder: Path, headers: list[_DicomHeader]) -> None:
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        raise InputError(
            f"{folder}: the {len(headers)} files of DICOM series {headers[0].series_uid} have "
            f"different slice sizes {sorted(sizes)}; they cannot be stacked into one volume. "
            "Remove the odd files (e.g. a localizer) or list the files in a manifest."
        )


def probe_series(folder: Path, headers: list[_DicomHeader]) -> ImageInfo:
    """Shape of the volume that a series of single-frame DICOM files stacks into."""
    _check_series(folder, headers)
    return _info(folder, (len(headers), headers[0].rows, headers[0].columns))


def read_series(folder: Path, files: list[str] | tuple[str, ...]) -> np.ndarray:
    """Read single-frame DICOM files of one series into a (D, H, W) volume."""
    headers = sort_series([read_dicom_header(f) for f in files])
    _check_series(folder, headers)
    slices = []
    monochrome1 = False
    for h in headers:
        ds = _dcmread(Path(h.path), header_only=False)
        monochrome1 |= str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
        slices.append(_dicom_pixels(Path(h.path), ds))  # slope/intercept per slice
    vol = np.stack(slices)
    if monochrome1:
        vol = _invert(vol)
    return _finish(folder, vol)


def series_in_folder(folder: Path) -> list[_DicomHeader]:
    """Headers of the DICOM files directly in ``folder`` (must form exactly one series)."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and format_of(p) == "DICOM"
    )
    if not files:
        raise InputError(
            f"{folder}: is a folder without DICOM files; a folder can be read as one image "
            "only when it holds the slices of one DICOM series."
        )
    headers = [read_dicom_header(f) for f in files]
    uids = sorted({str(h.series_uid) for h in headers})
    if len(uids) > 1 or not all(h.groupable for h in headers):
        raise InputError(
            f"{folder}: holds {len(files)} DICOM files that are not the single-frame slices of "
            f"one series (series found: {uids}). Load the folder with load_dataset, which "
            "separates series, or give the files one by one."
        )
    return headers


# --------------------------------------------------------------------------- public


def _wrap(path: Path, fmt: str, exc: Exception) -> ReadError:
    hint = " (truncated file?)" if "truncat" in str(exc).lower() else ""
    return ReadError(f"{path}: cannot decode as {fmt}{hint}: {exc}. {_SKIP_HINT}")


def _missing(path: Path) -> ReadError:
    return ReadError(f"{path}: file not found. Check the path, or remove it from the set.")


def probe(path: str | os.PathLike) -> tuple[ImageInfo, _DicomHeader | None]:
    """``probe_image`` plus the DICOM header of a DICOM file (None for other formats)."""
    p = Path(path)
    if not p.exists():
        raise _missing(p)
    fmt = format_of(p)
    if fmt is None:
        raise _unsupported(p)
    try:
        if fmt == "DICOM series":
            headers = series_in_folder(p)
            return probe_series(p, headers), headers[0]
        if fmt == "DICOM":
            return _probe_dicom_file(p)
        probers = {
            "PNG": _probe_pil,
            "JPEG": _probe_pil,
            "TIFF": _probe_tiff,
            "NIfTI": _probe_nifti,
            "NPY": _probe_npy,
            "NPZ": _probe_npz,
        }
        return probers[fmt](p), None
    except InputError:
        raise
    except Exception as exc:
        raise _wrap(p, fmt, exc) from exc


def probe_image(path: str | os.PathLike) -> ImageInfo:
    """Shape and number of spatial axes of an image, from its header where the format allows.

    Args:
        path: an image file, or a folder holding the slices of one DICOM series.

    Returns:
        ``ImageInfo(shape, spatial_dims)``; ``shape`` is what :func:`read_image` returns.

    Raises:
        ReadError: the file is missing, of an unsupported type, or its header is unreadable.

    Example:
        >>> probe_image("ct/scan01.nii.gz")  # doctest: +SKIP
        ImageInfo(shape=(32, 256, 256), spatial_dims=3)
    """
    return probe(path)[0]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image as float32: (H, W) for 2D, (D, H, W) for 3D (see the module docstring).

    Intensities are the stored values after the format's own scaling (DICOM RescaleSlope and
    RescaleIntercept, NIfTI scl_slope/scl_inter); DICOM MONOCHROME1 images are inverted
    (``max + min - value``) so that high values are bright. No normalisation is done here.

    Args:
        path: an image file, or a folder holding the slices of one DICOM series.

    Raises:
        ReadError: the file is missing, unsupported, or cannot be decoded.
        InputError: the image has an unusable shape or dtype.

    Example:
        >>> read_image("xr/p001.png").shape  # doctest: +SKIP
        (512, 512)
    """
    p = Path(path)
    if not p.exists():
        raise _missing(p)
    fmt = format_of(p)
    if fmt is None:
        raise _unsupported(p)
    try:
        if fmt == "DICOM series":
            return read_series(p, [h.path for h in series_in_folder(p)])
        readers = {
            "PNG": _read_pil,
            "JPEG": _read_pil,
            "TIFF": _read_tiff,
            "DICOM": _read_dicom_file,
            "NIfTI": _read_nifti,
            "NPY": _read_npy,
            "NPZ": _read_npz,
        }
        return readers[fmt](p)
    except InputError:
        raise
    except Exception as exc:
        raise _wrap(p, fmt, exc) from exc


def read_item(path: str | os.PathLike, files: tuple[str, ...] | None = None) -> np.ndarray:
    """Read a dataset item: a file, or (``files`` given) the listed slices of a DICOM series."""
    if files is None:
        return read_image(path)
    p = Path(path)
    try:
        return read_series(p, list(files))
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise ReadError(
            f"{p}: a slice of this DICOM series is missing ({exc.filename}). Reload the dataset."
        ) from exc
    except Exception as exc:
        raise _wrap(p, "DICOM series", exc) from exc


__all__ = ["SUPPORTED_SUFFIXES", "ImageInfo", "probe_image", "read_image"]
