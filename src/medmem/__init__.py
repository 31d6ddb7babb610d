"""medmem: find patient data memorized by generative models of medical images.

Example:
    >>> import medmem
    >>> train = medmem.load_dataset("data/train")  # doctest: +SKIP
    >>> detector = medmem.Detector.train(train)  # doctest: +SKIP
    >>> result = medmem.audit(train, val, synthetic, detector=detector)  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from medmem import search
from medmem._errors import InputError, MedmemError, NotFittedError, OutputExistsError, ReadError
from medmem.audit import AuditResult, audit, audit_embeddings, calibrate
from medmem.data import ArrayDataset, ImageDataset, load_dataset
from medmem.detector import Detector, DetectorConfig

__all__ = [
    "ArrayDataset",
    "AuditResult",
    "Detector",
    "DetectorConfig",
    "ImageDataset",
    "InputError",
    "MedmemError",
    "NotFittedError",
    "OutputExistsError",
    "ReadError",
    "__version__",
    "audit",
    "audit_embeddings",
    "calibrate",
    "load_dataset",
    "search",
]
