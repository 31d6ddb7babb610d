"""The detector's names for its checkpoint functions, all in :mod:`medmem._checkpoint`.

(Kept so that ``medmem.detector._detector`` reads ``_checkpoint.save_checkpoint``; the
format and the code live in the one checkpoint module.)
"""

from __future__ import annotations

from medmem._checkpoint import CHECKPOINT_NAME
from medmem._checkpoint import read_detector_checkpoint as read_checkpoint
from medmem._checkpoint import restore_detector as restore
from medmem._checkpoint import save_detector_checkpoint as save_checkpoint

__all__ = ["CHECKPOINT_NAME", "read_checkpoint", "restore", "save_checkpoint"]
