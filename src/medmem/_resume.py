"""Resume plumbing of the audit: the detector an audit trains keeps checkpoints beside its
``--out`` (``.<name>.medmem-resume/<key>/``), so an audit killed while training picks up
where it stopped when run again; the folder is removed once the audit's output is written.

The key covers the training set's fingerprint and the detector settings, so a rerun with
other images or settings starts afresh (and drops the old checkpoint) instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

RESUME = "medmem-resume"


def resume_root(out: str | Path) -> Path:
    """The checkpoint folder of an audit writing to ``out``: a hidden sibling of it."""
    out = Path(out)
    return out.parent / f".{out.name}.{RESUME}"


def _key(train: Any, overrides: dict[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha256(f"{train.fingerprint()}|{text}".encode()).hexdigest()[:16]


def checkpoint_for(root: str | Path | None, train: Any, overrides: dict[str, Any]) -> Path | None:
    """The checkpoint folder under ``root`` for training on ``train`` with ``overrides``;
    checkpoints of other data or settings under ``root`` are removed. None without root."""
    if root is None:
        return None
    root = Path(root)
    here = root / _key(train, overrides)
    if root.is_dir():
        for p in root.iterdir():
            if p != here and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
    return here


def remove_resume(out: str | Path) -> None:
    """Drop the checkpoints of the audit writing to ``out`` (its output is complete)."""
    shutil.rmtree(resume_root(out), ignore_errors=True)


__all__ = ["checkpoint_for", "remove_resume", "resume_root"]
