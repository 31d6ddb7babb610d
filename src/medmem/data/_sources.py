"""Turn a source (folder, glob, CSV manifest, list of paths) into probed dataset items.

Nothing here reads pixels: files are listed, headers probed, DICOM slices grouped into
series, ids and patient ids assigned.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medmem._errors import InputError
from medmem._progress import progress
from medmem.data._readers import (
    ImageInfo,
    _DicomHeader,
    format_of,
    probe,
    probe_series,
    series_in_folder,
    sort_series,
    suffix_of,
)

log = logging.getLogger("medmem")

_GLOB_CHARS = re.compile(r"[*?\[]")
_IGNORED_NAMES = frozenset({"DICOMDIR", "Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Item:
    """One dataset item, probed: where it is, what it is, who it belongs to."""

    id: str
    path: str  # absolute; for a DICOM series, its folder
    shape: tuple[int, ...]
    spatial_dims: int
    patient_id: str | None = None  # resolved: manifest > patient_id_pattern > DICOM PatientID
    files: tuple[str, ...] | None = None  # slices of a DICOM series, sorted by file name
    manifest_patient_id: str | None = None
    dicom_patient_id: str | None = None

    @property
    def name(self) -> str:
        """File (or series folder) name, used by ``patient_id_pattern``."""
        return Path(self.path).name


@dataclass(frozen=True)
class _Entry:
    """A path found in the source, before probing."""

    path: Path
    root: Path  # ids are relative to this folder
    where: str  # location for messages, e.g. "manifest.csv row 3" or the path
    patient_id: str | None = None
    explicit: bool = False  # a manifest row: one item as given, no series grouping


@dataclass
class Collected:
    """Entries of a source and a description of what was searched (for messages)."""

    entries: list[_Entry]
    searched: str
    ignored: Counter


def _is_hidden(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = (path.name,)
    return any(p.startswith(".") for p in parts)


def _walk(folder: Path, root: Path, ignored: Counter) -> list[_Entry]:
    """Supported files under ``folder``, recursively, in sorted order; hidden ones skipped."""
    out: list[_Entry] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name in _IGNORED_NAMES:
                continue
            p = Path(dirpath) / name
            if format_of(p) is None:
                ignored[suffix_of(p) or "(no suffix)"] += 1
                continue
            out.append(_Entry(path=p, root=root, where=str(p)))
    return out


def _collect_folder(folder: Path) -> Collected:
    ignored: Counter = Counter()
    entries = _walk(folder, folder, ignored)
    return Collected(entries, f"folder {folder} (searched recursively)", ignored)


def _collect_glob(pattern: str) -> Collected:
    static = Path(pattern).parts
    i = next((k for k, part in enumerate(static) if _GLOB_CHARS.search(part)), len(static))
    root = Path(*static[:i]) if i else Path(".")
    root = root.resolve()
    ignored: Counter = Counter()
    entries: list[_Entry] = []
    for match in sorted(_glob.glob(pattern, recursive=True)):
        p = Path(match).resolve()
        if _is_hidden(p, root) or p.name in _IGNORED_NAMES:
            continue
        if p.is_dir():
            entries.extend(_walk(p, root, ignored))
        elif format_of(p) is None:
            ignored[suffix_of(p) or "(no suffix)"] += 1
        else:
            entries.append(_Entry(path=p, root=root, where=str(p)))
    return Collected(entries, f"glob pattern {pattern!r}", ignored)


def _collect_list(paths: Sequence[Any]) -> Collected:
    resolved = []
    for k, raw in enumerate(paths):
        if not isinstance(raw, (str, os.PathLike)):
            raise InputError(
                f"src[{k}] must be a path (str or Path), got {type(raw).__name__} {raw!r}."
            )
        p = Path(raw).expanduser().resolve()
        if not p.exists():
            raise InputError(f"src[{k}]: {str(raw)!r} not found. Fix the path or drop it.")
        resolved.append(p)
    if not resolved:
        raise InputError("src is an empty list: give at least one image path.")
    root = Path(os.path.commonpath([p if p.is_dir() else p.parent for p in resolved]))
    ignored: Counter = Counter()
    entries: list[_Entry] = []
    for k, p in enumerate(resolved):
        if p.is_dir():
            entries.extend(_walk(p, root, ignored))
        else:
            entries.append(_Entry(path=p, root=root, where=f"src[{k}] {p}"))
    return Collected(entries, f"a list of {len(resolved)} path(s)", ignored)


# Image and patient columns of manifests as users have them (ChestX-ray14's Data_Entry
# table: "Image Index", "Patient ID"), tried in this order when 'path' / 'patient_id' are
# absent and no column is named.
PATH_COLUMN_ALIASES = ("file", "filename", "image", "Image Index")
PATIENT_COLUMN_ALIASES = ("Patient ID", "patient", "subject_id")


def _pick_column(
    manifest: Path, columns: list[str], given: str | None, default: str, aliases: tuple, flag: str
) -> str | None:
    if given is not None:
        if given not in columns:
            raise InputError(
                f"{manifest}: no column {given!r} ({flag}); its columns are {columns}."
            )
        return given
    if default in columns:
        return default
    for alias in aliases:
        if alias in columns:
            log.info(
                "%s: no %r column; reading %r as the %s column (name it with %s)",
                manifest.name,
                default,
                alias,
                "image" if default == "path" else "patient id",
                flag,
            )
            return alias
    return None


def _check_utf8(manifest: Path) -> None:
    """Raise naming the first line of ``manifest`` that is not UTF-8 text."""
    try:
        with open(manifest, "rb") as fh:
            for n, line in enumerate(fh, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(
                        f"{manifest}, line {n}: not UTF-8 text (byte 0x{line[exc.start]:02x} at "
                        f"column {exc.start + 1}). Save the manifest as UTF-8 (e.g. "
                        f"'iconv -f latin1 -t utf-8 {manifest.name} > fixed.csv')."
                    ) from None
    except OSError as exc:
        raise InputError(f"{manifest}: cannot be read ({exc}).") from exc


def _collect_manifest(
    manifest: Path, *, path_column: str | None = None, patient_column: str | None = None
) -> Collected:
    import pandas as pd

    _check_utf8(manifest)
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise InputError(f"{manifest}: cannot be read as a CSV manifest ({exc}).") from exc
    df.columns = [str(c).strip() for c in df.columns]
    columns = list(df.columns)
    path_col = _pick_column(
        manifest, columns, path_column, "path", PATH_COLUMN_ALIASES, "--path-column"
    )
    if path_col is None:
        raise InputError(
            f"{manifest}: has no 'path' column (columns: {columns}). A manifest needs a "
            "'path' column (one image file or DICOM series folder per row, relative to the "
            "manifest's folder; also read: "
            f"{', '.join(repr(a) for a in PATH_COLUMN_ALIASES)}) and optionally 'patient_id'; "
            "or name the columns with --path-column / --patient-column (path_column=, "
            "patient_column=)."
        )
    pid_col = _pick_column(
        manifest,
        columns,
        patient_column,
        "patient_id",
        PATIENT_COLUMN_ALIASES,
        "--patient-column",
    )
    base = manifest.parent.resolve()
    paths = df[path_col].tolist()
    pids = df[pid_col].tolist() if pid_col is not None else [""] * len(paths)
    entries: list[_Entry] = []
    seen: dict[Path, int] = {}
    for k, (cell, pid_cell) in enumerate(zip(paths, pids, strict=True)):
        rowno = k + 2  # line in the file: the header is row 1
        where = f"{manifest.name} row {rowno}"
        raw = str(cell).strip()
        if not raw:
            raise InputError(
                f"{where}: the {path_col!r} cell is empty. Fill it in or drop the row."
            )
        p = Path(raw).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if p in seen:
            raise InputError(
                f"{manifest.name} rows {seen[p]} and {rowno} both name {raw!r}. Drop one of them."
            )
        seen[p] = rowno
        pid = str(pid_cell).strip()
        entries.append(
            _Entry(path=p, root=base, where=where, patient_id=pid or None, explicit=True)
        )
    return Collected(entries, f"manifest {manifest}", Counter())


def collect(
    src: Any, *, path_column: str | None = None, patient_column: str | None = None
) -> Collected:
    """List the entries of ``src``: folder, glob string, ``.csv`` manifest, or list of paths.

    ``path_column`` / ``patient_column`` name a manifest's image and patient-id columns
    (default: ``path`` / ``patient_id``, else a known alias, with a logged note)."""
    if isinstance(src, (list, tuple)):
        return _collect_list(src)
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(
            "src must be a folder, a glob pattern, a CSV manifest or a list of paths, got "
            f"{type(src).__name__}."
        )
    text = os.fspath(src)
    p = Path(text).expanduser()
    if p.is_dir():
        return _collect_folder(p.resolve())
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return _collect_manifest(p, path_column=path_column, patient_column=patient_column)
        return _collect_list([p])
    if isinstance(src, str) and _GLOB_CHARS.search(text):
        return _collect_glob(text)
    raise InputError(
        f"{text}: not found. Check the path: give a folder, a glob pattern (e.g. "
        "'data/*.png'), a CSV manifest or a list of paths."
    )


def input_roots(src: Any) -> list[tuple[Path, bool]]:
    """``(path, is_folder)`` of what an input source reads: a folder (all of it), a glob's
    fixed folder, a CSV manifest and the files its rows name, listed files, a dataset's
    files. Reads no pixels; a source that cannot be listed contributes its own path."""
    if src is None:
        return []
    if isinstance(src, (list, tuple)):
        return [r for s in src for r in input_roots(s)]
    if not isinstance(src, (str, os.PathLike)):
        paths = getattr(src, "paths", None)  # a Dataset
        return [(Path(p), False) for p in paths] if paths is not None else []
    text = os.fspath(src)
    p = Path(text).expanduser()
    if p.is_dir():
        return [(p, True)]
    if p.is_file():
        roots = [(p, False)]
        if p.suffix.lower() == ".csv":
            try:
                roots += [(e.path, e.path.is_dir()) for e in collect(p).entries]
            except (InputError, OSError):
                pass  # the loader reports a bad manifest, with its row
        return roots
    if isinstance(src, str) and _GLOB_CHARS.search(text):
        parts = Path(text).parts
        i = next((k for k, part in enumerate(parts) if _GLOB_CHARS.search(part)), 0)
        return [(Path(*parts[:i]) if i else Path("."), True)]
    return [(p, True)]


def _rel_id(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
    return rel if rel not in ("", ".") else path.name


def _missing_message(entry: _Entry) -> str:
    if entry.explicit:
        try:
            rel = entry.path.relative_to(entry.root).as_posix()
        except ValueError:
            rel = entry.path.as_posix()
        return f"{entry.where}: {rel!r} not found under {entry.root}. Fix the path or drop the row."
    return f"{entry.where}: not found. Fix the path or remove it."


def probe_entries(
    collected: Collected,
    *,
    on_error: Callable[[str, str, Exception], None],
    quiet: bool = False,
) -> list[Item]:
    """Probe every entry (headers only) and group DICOM slices of one series into volumes.

    ``on_error(path, where, exc)`` is called for an entry whose probe fails; it re-raises or
    records the failure (``skip_unreadable``).
    """
    probed: list[tuple[_Entry, ImageInfo, _DicomHeader | None, tuple[str, ...] | None]] = []
    for entry in progress(
        collected.entries, desc="Reading headers", total=len(collected.entries), quiet=quiet
    ):
        try:
            if not entry.path.exists():
                raise InputError(_missing_message(entry))
            files = None
            if entry.path.is_dir():  # a manifest row naming a DICOM series folder
                headers = series_in_folder(entry.path)
                info = probe_series(entry.path, headers)
                header = sort_series(headers)[0]
                files = tuple(sorted(h.path for h in headers))
            else:
                info, header = probe(entry.path)
        except InputError as exc:
            msg = str(exc)
            if entry.explicit and not msg.startswith(entry.where):
                exc = type(exc)(f"{entry.where}: {msg}")
            on_error(str(entry.path), entry.where, exc)
            continue
        probed.append((entry, info, header, files))

    # Group single-frame DICOM files found by searching (not manifest rows) by folder+series.
    groups: dict[tuple[Path, str], list[int]] = defaultdict(list)
    for k, (entry, _info, header, files) in enumerate(probed):
        if header is not None and not entry.explicit and files is None and header.groupable:
            groups[(entry.path.parent, str(header.series_uid))].append(k)
    series_of: dict[int, tuple[Path, str]] = {}
    per_folder: Counter = Counter()
    for key, members in groups.items():
        if len(members) > 1:
            per_folder[key[0]] += 1
            for k in members:
                series_of[k] = key

    items: list[Item] = []
    done: set[tuple[Path, str]] = set()
    for k, (entry, info, header, files) in enumerate(probed):
        dicom_pid = header.patient_id if header is not None else None
        if k not in series_of:
            items.append(
                Item(
                    id=_rel_id(entry.path, entry.root),
                    path=str(entry.path),
                    shape=info.shape,
                    spatial_dims=info.spatial_dims,
                    files=files,
                    manifest_patient_id=entry.patient_id,
                    dicom_patient_id=dicom_pid,
                )
            )
            continue
        key = series_of[k]
        if key in done:
            continue
        done.add(key)
        folder, uid = key
        headers = [probed[j][2] for j in groups[key]]
        try:
            vinfo = probe_series(folder, headers)  # type: ignore[arg-type]
        except InputError as exc:
            on_error(str(folder), str(folder), exc)
            continue
        item_id = _rel_id(folder, entry.root)
        if per_folder[folder] > 1:
            item_id = f"{item_id}#{uid}"
        first = sort_series(headers)[0]  # type: ignore[arg-type]
        items.append(
            Item(
                id=item_id,
                path=str(folder),
                shape=vinfo.shape,
                spatial_dims=vinfo.spatial_dims,
                files=tuple(sorted(h.path for h in headers)),  # type: ignore[union-attr]
                dicom_patient_id=first.patient_id,
            )
        )
    return items


def resolve_patient_ids(items: list[Item], pattern: str | re.Pattern | None) -> list[Item]:
    """Set each item's patient id: manifest column > ``pattern`` > DICOM PatientID > None.

    ``pattern`` is searched in the file name (a series: its folder name), then in the id
    path; its group ``patient`` if named, else group 1, else the whole match is the id.
    """
    rx = None
    if pattern is not None:
        try:
            rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        except (re.error, TypeError) as exc:
            raise InputError(
                f"patient_id_pattern {pattern!r} is not a valid regex: {exc}."
            ) from exc
    out = []
    for item in items:
        if item.manifest_patient_id:
            pid: str | None = item.manifest_patient_id
        elif rx is not None:
            pid = _match_patient(item, rx)
        else:
            pid = item.dicom_patient_id
        out.append(replace(item, patient_id=pid))
    return out


def _match_patient(item: Item, rx: re.Pattern) -> str:
    m = rx.search(item.name) or rx.search(item.id)
    if m is None:
        where = f"the file name {item.name!r}"
        if item.id != item.name:
            where += f" or its path {item.id!r}"
        raise InputError(
            f"{item.path}: patient_id_pattern '{rx.pattern}' does not match {where}. Fix the "
            "pattern, or give patient ids in a manifest 'patient_id' column."
        )
    if "patient" in rx.groupindex:
        pid = m.group("patient")
    elif rx.groups >= 1:
        pid = m.group(1)
    else:
        pid = m.group(0)
    if not pid:
        raise InputError(
            f"{item.path}: patient_id_pattern '{rx.pattern}' matched an empty patient id in "
            f"{item.id!r}. Fix the pattern."
        )
    return pid


def describe_ignored(ignored: Counter) -> str:
    """'3 files: 2 '.txt', 1 '.json'' — what a search found but could not use."""
    if not ignored:
        return "no files"
    n = sum(ignored.values())
    parts = ", ".join(f"{c} {s!r}" for s, c in ignored.most_common())
    return f"{n} unsupported file(s): {parts}"


__all__ = [
    "Collected",
    "Item",
    "collect",
    "describe_ignored",
    "input_roots",
    "probe_entries",
    "resolve_patient_ids",
]
