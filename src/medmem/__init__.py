"""medmem: find patient data memorized by generative models of medical images.

Example:
    >>> import medmem
    >>> train = medmem.load_dataset("data/train")  # doctest: +SKIP
    >>> detector = medmem.Detector.train(train)  # doctest: +SKIP
    >>> result = medmem.audit(train, val, synthetic, detector=detector)  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from medmem import _distributed as distributed  # torchrun helpers: init_from_env, rank...
from medmem import search, verify
from medmem._audit import (
    CALIBRATIONS,
    AuditResult,
    audit,
    audit_embeddings,
    calibrate,
    check_patient_overlap,
    control_images,
    format_verdict,
    make_controls,
    min_calibration_size,
)
from medmem._errors import (
    InputError,
    MedmemError,
    MedmemWarning,
    NotFittedError,
    OutputExistsError,
    ReadError,
)
from medmem._identity import identity_section, nearest_patient
from medmem.data import ArrayDataset, ImageDataset, load_dataset
from medmem.detector import Detector, DetectorConfig

# The audit's module is private (medmem/_audit.py), so that ``medmem.audit`` is one thing,
# the function, as scikit-learn does: no public module shares a name with a public function.
__all__ = [
    "CALIBRATIONS",
    "ArrayDataset",
    "AuditResult",
    "Detector",
    "DetectorConfig",
    "ImageDataset",
    "InputError",
    "MedmemError",
    "MedmemWarning",
    "NotFittedError",
    "OutputExistsError",
    "ReadError",
    "__version__",
    "audit",
    "audit_embeddings",
    "calibrate",
    "check_patient_overlap",
    "distributed",
    "control_images",
    "format_verdict",
    "identity_section",
    "load_dataset",
    "make_controls",
    "min_calibration_size",
    "nearest_patient",
    "search",
    "verify",
]
