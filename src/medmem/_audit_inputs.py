"""The audit's early input checks: everything that can fail on the inputs fails before the
detector trains (issue 14).

- :func:`check_detector_fits`: a given detector has a fingerprint and fits the images
  (spatial_dims, image size, channels); messages name the detector's folder.
- :func:`probe_images`: every image of the three sets is read and preprocessed once
  (the loader's own checks: readable, finite, non-constant) and has the right shape;
  training and validation images with identical preprocessed pixels (a re-encoded copy:
  other format, same pixels) are an error, as identical files are.
- :func:`patient_overlap_status`: "none", "shared" or "unknown" (ids missing), for
  summary.json, instead of reporting 0 shared patients when nothing could be compared.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import numpy as np

from medmem._errors import InputError
from medmem._progress import progress

OVERLAP_FIX = "Split by patient, or pass allow_patient_overlap=True (--allow-patient-overlap)"


def _detector_name(detector: Any) -> str:
    src = getattr(detector, "source_", None)
    return f"the detector {src}" if src else "the detector"


def check_detector_fits(detector: Any, dataset: Any) -> None:
    """Raise when ``detector`` has no fingerprint or does not fit ``dataset``'s images."""
    name = _detector_name(detector)
    fp = getattr(detector, "fingerprint", None)
    if not isinstance(fp, str) or not fp:
        raise InputError(
            f"{name} has no fingerprint, so the audit could not say which detector it rests "
            "on. Save it with Detector.save (medmem train-detector) and load it again."
        )
    cfg = getattr(detector, "config", None)
    if cfg is None:  # a duck-typed embedder: it takes what it is given
        return
    size = tuple(int(s) for s in dataset.image_size)
    fix = (
        f"Use a detector trained on such images, or leave --detector out to train one; the "
        f"images are resized to the detector's image_size {tuple(cfg.image_size)} when given."
    )
    if int(dataset.spatial_dims) != int(cfg.spatial_dims):
        raise InputError(
            f"{name} is for {cfg.spatial_dims}D images but the training images are "
            f"{dataset.spatial_dims}D. {fix}"
        )
    if size != tuple(cfg.image_size):
        raise InputError(
            f"{name} was trained on images of size {tuple(cfg.image_size)} but the images "
            f"are preprocessed to {size}. {fix}"
        )
    want = int(getattr(cfg, "in_channels", 1))
    if want != 1:  # medmem images have one channel (probe_images checks each image)
        raise InputError(
            f"{name} takes {want}-channel images but medmem images have 1 channel. {fix}"
        )


def _where(ds: Any, i: int) -> str:
    paths = getattr(ds, "paths", None)
    return str(paths[i]) if paths is not None else repr(ds.ids[i])


# datasets already probed (a study or a tracked training audits the same sets many
# times): dataset -> (its fingerprint then, pixel hashes); weak, so datasets can be freed
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(ds: Any) -> str | None:
    fp = getattr(ds, "fingerprint", None)
    return fp() if callable(fp) else None


def _remember(ds: Any, pixel_hashes: list[str]) -> None:
    key = _identity(ds)
    if key is not None:
        try:
            _PROBED[ds] = (key, tuple(pixel_hashes))
        except TypeError:  # not weakly referable: probed again next time
            pass


def probe_images(
    sets: dict[str, Any], *, hash_sets: tuple[str, ...] = (), quiet: bool = False
) -> dict[str, list[str]]:
    """Read and preprocess every image of ``sets`` (name -> dataset) once; raise on the
    first one that is unreadable, not finite, constant or of the wrong shape, naming its
    file. Returns SHA-256 of the preprocessed pixels of the sets in ``hash_sets``. A
    dataset probed before, unchanged (same fingerprint), is not read again."""
    hashes: dict[str, list[str]] = {}
    todo = {}
    for name, ds in sets.items():
        try:
            done = _PROBED.get(ds)
        except TypeError:  # not weakly referable
            done = None
        if done is not None and done[0] == _identity(ds):
            if name in hash_sets:
                hashes[name] = list(done[1])
        else:
            todo[name] = ds
    total = sum(len(ds) for ds in todo.values())
    bar = progress(None, desc="checking images", total=total, quiet=quiet, unit="img")
    try:
        for name, ds in todo.items():
            want = (1, *(int(s) for s in ds.image_size))
            pixel_hashes = []
            for i in range(len(ds)):
                x = np.asarray(ds[i], dtype=np.float32)
                where = _where(ds, i)
                if tuple(x.shape) != want:
                    raise InputError(
                        f"{where} ({name} set): preprocessed to shape {tuple(x.shape)}, "
                        f"expected {want} (one channel, {ds.spatial_dims}D). Convert it to a "
                        "single-channel image of the set's dimensionality, or remove it."
                    )
                if not np.isfinite(x).all():
                    raise InputError(
                        f"{where} ({name} set): contains NaN or infinite values after "
                        "preprocessing. Fix or remove the file."
                    )
                pixel_hashes.append(hashlib.sha256(x.tobytes()).hexdigest())
                bar.update(1)
            _remember(ds, pixel_hashes)
            if name in hash_sets:
                hashes[name] = pixel_hashes
    finally:
        bar.close()
    return hashes


def check_pixel_duplicates(train: Any, val: Any, h_train: list[str], h_val: list[str]) -> None:
    """Raise when a validation image has the same preprocessed pixels as a training image
    (the same scan saved twice, e.g. as PNG and DICOM), naming both files."""
    first = {}
    for i, h in enumerate(h_train):
        first.setdefault(h, i)
    same = [(first[h], j) for j, h in enumerate(h_val) if h in first]
    if same:
        i, j = same[0]
        raise InputError(
            f"{len(same)} validation image(s) have the same pixels as training images (e.g. "
            f"training {_where(train, i)} = validation {_where(val, j)}, after "
            f"preprocessing): the same scan in both sets makes tau too strict. {OVERLAP_FIX} "
            "if you know why."
        )


def patient_overlap_status(train: Any, val: Any, n_shared: int) -> str:
    """ "shared" (patients in both sets), "none" (every image has a patient id and none is
    shared) or "unknown" (some ids are missing, so an overlap cannot be excluded)."""
    if n_shared:
        return "shared"
    ids = list(getattr(train, "patient_ids", [])) + list(getattr(val, "patient_ids", []))
    if not ids or any(p is None for p in ids):
        return "unknown"
    return "none"


def check_inputs(
    train: Any,
    val: Any,
    synthetic: Any,
    *,
    detector: Any = None,
    allow_overlap: bool = False,
    quiet: bool = False,
) -> None:
    """All early checks of :func:`medmem.audit`, in order; before any training or embedding."""
    if detector is not None:
        check_detector_fits(detector, train)
    sets = {"training": train, "validation": val, "synthetic": synthetic}
    hashes = probe_images(
        sets, hash_sets=() if allow_overlap else ("training", "validation"), quiet=quiet
    )
    if not allow_overlap:
        check_pixel_duplicates(train, val, hashes["training"], hashes["validation"])


__all__ = [
    "check_detector_fits",
    "check_inputs",
    "check_pixel_duplicates",
    "patient_overlap_status",
    "probe_images",
]
