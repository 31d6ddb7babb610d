"""medmem: find patient data memorized by generative models of medical images."""

from __future__ import annotations

__version__ = "0.1.0"

from medmem import search
from medmem._errors import InputError, MedmemError, NotFittedError, OutputExistsError, ReadError

__all__ = [
    "InputError",
    "MedmemError",
    "NotFittedError",
    "OutputExistsError",
    "ReadError",
    "__version__",
    "search",
]
