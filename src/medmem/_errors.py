"""Exception types. Every error medmem raises on bad input subclasses :class:`MedmemError`.

Messages say where (file, row, argument), what is wrong (with the value found), and what to
do about it, so that the CLI can print them as one line.
"""

from __future__ import annotations


class MedmemError(Exception):
    """Base class of medmem's errors about inputs, files and settings."""


class InputError(MedmemError, ValueError):
    """An input (file, folder, array or parameter) is unusable."""


class ReadError(InputError):
    """A file could not be read or decoded as an image."""


class NotFittedError(MedmemError, RuntimeError):
    """An object is used before it was trained or loaded."""


class OutputExistsError(MedmemError, FileExistsError):
    """An output folder exists and overwriting was not asked for."""


class OutputError(InputError):
    """An output location is unusable: read-only, a file, a name too long, an input folder,
    or claimed by another running medmem."""


class MedmemWarning(UserWarning):
    """Base class of the warnings medmem gives: results that may mislead (tiny sets, a
    collapsed detector, skipped files), so that callers can filter or escalate them."""


__all__ = [
    "InputError",
    "MedmemError",
    "MedmemWarning",
    "NotFittedError",
    "OutputError",
    "OutputExistsError",
    "ReadError",
]
