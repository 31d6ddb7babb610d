"""``medmem screen``: the release set, i.e. the audited synthetic images that are not copies.

Given an audit folder (``summary.json``, ``synthetic.csv``, ``training.csv``), the synthetic
images with ``nearest_train_corr < tau - margin`` are written, de-identified, in their
original format (a DICOM series as a folder of its slices), into a new folder with
``release_manifest.csv`` and ``README.txt``. The folder is built aside and moved into place.

Nothing in the release names or points to a training image or patient:

* every file is written de-identified (:mod:`medmem._deid`): DICOM by the PS3.15 Basic
  Application Level Confidentiality Profile (identifying attributes removed or emptied,
  private attributes removed, new UIDs), PNG/JPEG/TIFF without text chunks, EXIF, XMP or
  ICC profiles, NIfTI without description, intent name, aux file or extensions, NumPy
  without pickles; pixels bit for bit those of the synthetic file. The manifest's
  ``removed`` column says what was removed from each file;
* files that are not images made by the generator are refused (``drop_nonimages``: left
  out and counted): outputs of an earlier audit (a folder holding ``summary.json``),
  figures medmem wrote (PNG ``Software: medmem``), medmem's ``gallery.png`` and
  ``histogram.png``;
* files that identify a training or validation patient are refused (``drop_identifying``:
  left out and counted): metadata whose patient id is a training or validation patient's
  (training.csv; the validation source recorded in summary.json, read again), metadata or
  bytes holding a training or validation identifier (id, file name or stem, patient id,
  path), files byte for byte equal to a validation file;
* the manifest has no training column (no ``nearest_train_id``), no paths outside the
  release, no thumbnails;
* a synthetic file whose name or path contains a training or validation identifier is
  renamed to a neutral name (``renamed`` in the manifest), and a DICOM UID in a file name
  is replaced by its new UID.

Identifiers shorter than :data:`MIN_IDENTIFIER_LENGTH` characters are not searched for: they
occur by chance in names and bytes (a warning says how many there were).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from medmem import __version__
from medmem._deid import PROFILE_CODE, PROFILE_NAME, UidMap, deidentify_file, metadata_text
from medmem._errors import InputError, MedmemWarning, OutputExistsError
from medmem._io import atomic_dir, atomic_write_text, claim_output, file_sha256
from medmem._progress import progress
from medmem._validation import check_in_range

logger = logging.getLogger(__name__)

MANIFEST_NAME = "release_manifest.csv"
README_NAME = "README.txt"
MANIFEST_COLUMNS = [
    "file",
    "nearest_train_corr",
    "tau",
    "margin",
    "renamed",
    "removed",
    "medmem_version",
    "audit_fingerprint",
]
MIN_IDENTIFIER_LENGTH = 4  # in names; in file contents 5 (see _ContentScanner)
_MIN_CONTENT_LENGTH = 5
_GZ_SCAN_BYTES = 1 << 20  # of a .gz file, the first MiB decompressed is scanned too
#: figures written by ``medmem audit`` (found in a synthetic folder: not generator images)
MEDMEM_FIGURES = ("gallery.png", "histogram.png")
_AUDIT_MARKERS = ("training.csv", "synthetic.csv", "report.html")  # beside summary.json
# metadata fields holding a patient's id or name: compared whole with the patient ids
_PATIENT_FIELDS = {
    "dicom:PatientID",
    "dicom:OtherPatientIDs",
    "dicom:PatientName",
    "dicom:OtherPatientNames",
    "dicom:PatientBirthName",
}
# a DICOM UID in a file or folder name (e.g. slices named by their SOPInstanceUID)
_UID_IN_NAME = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){3,}(?!\.?[0-9])")


@dataclass
class ScreenResult:
    """What ``screen`` released and withheld.

    The lists hold synthetic ids (the synthetic files' own names): they stay in memory and
    are not written into the release (a synthetic file's own name may contain a training
    identifier; such files appear in the release under a neutral name).
    """

    out: Path
    n_synthetic: int
    n_released: int
    n_copies: int  # withheld: nearest_train_corr >= tau
    n_margin: int  # withheld: tau - margin <= nearest_train_corr < tau
    n_identifier: int  # withheld: identifies a training or validation patient
    tau: float
    margin: float
    audit_fingerprint: str
    released: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # synthetic id -> release path
    withheld_identifier: list[str] = field(default_factory=list)
    n_nonimage: int = 0  # withheld (drop_nonimages): not an image made by the generator
    withheld_nonimage: list[str] = field(default_factory=list)
    deidentified: bool = True
    removed: dict[str, list[str]] = field(default_factory=dict)  # synthetic id -> kinds
    validation_checked: str = ""  # what was known of the validation patients
    n_identity: int = 0  # withheld (drop identity): re-identifies a training patient

    def __str__(self) -> str:
        lines = [
            f"released {self.n_released} of {self.n_synthetic} synthetic images to {self.out}"
            + (" (de-identified)" if self.deidentified else " (NOT de-identified)"),
            f"withheld: {self.n_copies} copies (nearest_train_corr >= tau = {self.tau:.4f}), "
            f"{self.n_margin} within the margin {self.margin:g} below tau, "
            f"{self.n_identifier} that identify a training or validation patient, "
            f"{self.n_nonimage} that are not generator images (audit outputs, figures)",
        ]
        if self.n_identity:
            lines.append(
                f"withheld also {self.n_identity} that re-identify a training patient "
                "(identity_corr >= tau_identity; --drop identity)"
            )
        if self.renamed:
            lines.append(
                f"renamed {len(self.renamed)} file(s) whose names contained a training "
                "identifier (see the 'renamed' column of release_manifest.csv)"
            )
        if self.validation_checked.startswith("not checked"):
            lines.append(f"validation patients {self.validation_checked}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- audit folder
def _read_audit(audit_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, str]:
    """The audit's summary, synthetic and training tables (read by ``AuditResult.load``)
    and its fingerprint (SHA-256 of summary.json)."""
    from medmem._audit import AuditResult

    result = AuditResult.load(audit_dir)
    summary_path = audit_dir / "summary.json"
    summary = result.summary
    for key in ("tau", "fingerprints", "spatial_dims", "image_size"):
        if key not in summary:
            raise InputError(
                f"{summary_path}: has no {key!r}; it was not written by `medmem audit` "
                "(audits of in-memory embeddings cannot be screened). Run medmem audit again."
            )
    raw = summary_path.read_bytes()
    return summary, result.synthetic, result.training, hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------- identifiers
def _identifiers(src: Any, ids: list[str], patient_ids: list[str]) -> set[str]:
    """Every string that names an image or patient of a set: ids, file names and stems,
    patient ids, the source and absolute paths."""
    out: set[str] = set()
    base = None
    if src:
        out.add(str(src))
        p = Path(str(src))
        base = p if p.is_dir() else (p.parent if p.suffix.lower() == ".csv" else None)
        if base is not None:
            out.add(str(base.resolve()))
    for tid in ids:
        tid = str(tid)
        if not tid:
            continue
        out.add(tid)
        path = PurePosixPath(tid.split("#", 1)[0])
        out.add(path.name)
        out.add(path.name.split(".", 1)[0] if not path.name.startswith(".") else path.name)
        if base is not None:
            out.add(str(base / tid))
            out.add(str((base / tid).resolve()))
    out.update(str(p).strip() for p in patient_ids if p is not None and str(p).strip())
    return {t for t in out if t}


def _training_identifiers(train: pd.DataFrame, summary: dict[str, Any]) -> set[str]:
    """Every string that names a training image or patient (see :func:`_identifiers`)."""
    pids = list(train["patient_id"]) if "patient_id" in train.columns else []
    src = (summary.get("sources") or {}).get("training")
    return _identifiers(src, list(train["train_id"]), pids)


@dataclass
class _Validation:
    """What screen knows of the validation set: identifiers, patient ids, file sizes."""

    identifiers: set[str] = field(default_factory=set)
    patient_ids: set[str] = field(default_factory=set)
    files_by_size: dict[int, list[Path]] = field(default_factory=dict)
    note: str = ""


def _validation(summary: dict[str, Any], audit_dir: Path) -> _Validation:
    """Re-read the validation source recorded in summary.json (headers only): the audit
    stores no validation ids. When it cannot be read, say so (a warning and README.txt)."""
    from medmem.data._sources import collect, probe_entries

    src = (summary.get("sources") or {}).get("validation")
    if not src:
        return _Validation(
            note="not checked: summary.json records no validation source (the audit was "
            "given an in-memory set)"
        )
    try:
        items = probe_entries(collect(str(src)), on_error=lambda *_: None, quiet=True)
    except (InputError, OSError) as exc:
        return _Validation(
            note=f"not checked: the validation source recorded in {audit_dir / 'summary.json'} "
            f"cannot be read ({exc})"
        )
    pids = {
        p.strip()
        for it in items
        for p in (it.manifest_patient_id, it.dicom_patient_id)
        if p is not None and p.strip()
    }
    by_size: dict[int, list[Path]] = {}
    for it in items:
        for f in it.files or (it.path,):
            try:
                by_size.setdefault(Path(f).stat().st_size, []).append(Path(f))
            except OSError:
                continue
    with_pid = sum(1 for it in items if it.manifest_patient_id or it.dicom_patient_id)
    note = f"checked: {len(items)} validation images, {len(pids)} patient ids"
    if with_pid < len(items):
        note += (
            f" ({len(items) - with_pid} images without a patient id (no manifest patient_id, "
            "no DICOM PatientID): only their file names and bytes were searched for)"
        )
    return _Validation(
        identifiers=_identifiers(src, [it.id for it in items], sorted(pids)),
        patient_ids=pids,
        files_by_size=by_size,
        note=note,
    )


def _trie_pattern(tokens: list[str]) -> str:
    """A regex matching any of ``tokens``, built as a trie: fast with thousands of tokens."""
    trie: dict = {}
    for t in tokens:
        node = trie
        for ch in t:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a token

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


class _NameScanner:
    """Finds training identifiers anywhere in a release path (plain substring search)."""

    def __init__(self, identifiers: set[str]) -> None:
        tokens = sorted(t for t in identifiers if len(t) >= MIN_IDENTIFIER_LENGTH)
        self.pattern = re.compile(_trie_pattern(tokens)) if tokens else None

    def clean(self, name: str) -> bool:
        return bool(name) and (self.pattern is None or self.pattern.search(name) is None)


class _ContentScanner:
    """Finds training identifiers in file bytes. A match counts only when not flanked by a
    letter or digit, so '2024' inside '20240101', or an id spelled by chance inside pixel
    data, does not count; identifiers shorter than 5 characters are not searched for."""

    def __init__(self, identifiers: set[str]) -> None:
        # utf-8 bytes spelled as latin-1 characters: a str pattern that encodes to bytes
        tokens = sorted(
            {
                t.encode("utf-8").decode("latin-1")
                for t in identifiers
                if len(t) >= _MIN_CONTENT_LENGTH
            }
        )
        self.pattern = None
        if tokens:
            body = _trie_pattern(tokens)
            regex = f"(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])"
            self.pattern = re.compile(regex.encode("latin-1"))

    def find_text(self, text: str) -> str | None:
        """The first identifier in ``text``."""
        if self.pattern is None:
            return None
        for encoding in ("utf-8", "latin-1"):  # text, or bytes read as latin-1
            try:
                m = self.pattern.search(text.encode(encoding))
            except UnicodeEncodeError:
                continue
            if m is not None:
                return m.group(0).decode("utf-8", "replace")
        return None

    def find(self, path: Path) -> str | None:
        """The first identifier in the file (or in the decompressed start of a .gz file)."""
        if self.pattern is None:
            return None
        data = path.read_bytes()
        m = self.pattern.search(data)
        if m is None and path.name.lower().endswith(".gz"):
            try:
                with gzip.open(io.BytesIO(data)) as fh:
                    m = self.pattern.search(fh.read(_GZ_SCAN_BYTES))
            except (OSError, EOFError):
                m = None
        return None if m is None else m.group(0).decode("utf-8", "replace")


# ---------------------------------------------------------------------------- release names
def _suffix(name: str) -> str:
    low = name.lower()
    for multi in (".nii.gz",):
        if low.endswith(multi):
            return name[-len(multi) :]
    return PurePosixPath(name).suffix


def _sanitize(item_id: str) -> str:
    """A relative posix path inside the release from an item id ('' if nothing is left)."""
    parts = [
        p for p in PurePosixPath(item_id.replace("\\", "/")).parts if p not in ("/", ".", "..")
    ]
    parts = [p.replace("#", "_") for p in parts if not re.fullmatch(r"[A-Za-z]:", p)]
    return "/".join(parts)


class _Namer:
    """Release paths: the synthetic file's own relative path, or a neutral name when that
    contains a training identifier or collides with another file's."""

    def __init__(self, names: _NameScanner) -> None:
        self.clean = names.clean
        self.taken: set[str] = set()
        self.counter = 0

    def neutral(self, suffix: str) -> str:
        while True:
            self.counter += 1
            name = f"synthetic_{self.counter:05d}{suffix}"
            if not self.clean(name):  # a training id like '00001': fall back to a hash
                name = f"synthetic_{hashlib.sha256(name.encode()).hexdigest()[:16]}{suffix}"
            if self.clean(name) and name.lower() not in self.taken:
                self.taken.add(name.lower())
                return name

    def name(self, item_id: str, suffix: str) -> tuple[str, bool]:
        """(release path, renamed) of an item."""
        rel = _sanitize(item_id)
        if self.clean(rel) and rel.lower() not in self.taken:
            self.taken.add(rel.lower())
            return rel, False
        return self.neutral(suffix), True


def _item_files(files: list[list[Path]], paths: list[Path], i: int) -> list[Path] | None:
    """The files of a DICOM series item (None for a single-file item); ``files`` and
    ``paths`` are the dataset's ``files`` and ``paths``."""
    return None if files[i] == [paths[i]] else files[i]


# ---------------------------------------------------------------------------- screening
def _load_synthetic(
    synthetic: Any, summary: dict[str, Any], audit_dir: Path, quiet: bool
) -> tuple[Any, str]:
    from medmem.data import load_dataset

    src = synthetic
    if src is None:
        src = (summary.get("sources") or {}).get("synthetic")
        if src is None:
            raise InputError(
                f"{audit_dir / 'summary.json'} records no synthetic source (the audit was given "
                "an in-memory set). Pass the audited synthetic images with --synthetic SRC."
            )
        where = f"the synthetic source recorded in {audit_dir / 'summary.json'} ({src!r})"
    else:
        where = f"--synthetic {src!r}"
    if hasattr(src, "ids") and not hasattr(src, "paths"):
        raise InputError(
            "the synthetic set is in memory (no files): screening copies files. Save the images "
            "and audit the folder, or pass the folder with --synthetic."
        )
    skip = any(it.get("set") == "synthetic" for it in summary.get("skipped_files") or [])
    try:
        ds = load_dataset(
            src,
            spatial_dims=int(summary["spatial_dims"]),
            image_size=tuple(summary["image_size"]),
            skip_unreadable=skip,
            quiet=quiet,
        )
    except InputError as exc:
        raise InputError(
            f"{where}: cannot be loaded ({exc}). Relative paths are resolved from the current "
            "folder; pass the audited synthetic images with --synthetic SRC."
        ) from None
    return ds, where


def _check_same_set(ds: Any, syn: pd.DataFrame, summary: dict[str, Any], where: str) -> None:
    expected = (summary.get("fingerprints") or {}).get("synthetic_set")
    found = ds.fingerprint()
    if expected != found:
        raise InputError(
            f"{where}: these are not the synthetic images that were audited (fingerprint "
            f"{found[:12]}..., summary.json has {str(expected)[:12]}...): files were added, "
            "removed or changed since the audit. Pass the audited set with --synthetic, or "
            "audit this set again."
        )
    ids, audited = list(ds.ids), list(syn["synthetic_id"])
    if sorted(ids) != sorted(audited):
        extra = sorted(set(ids) - set(audited))
        lost = sorted(set(audited) - set(ids))
        example = f"{extra[0]!r} is not in synthetic.csv" if extra else f"{lost[0]!r} is missing"
        raise InputError(
            f"{where}: the images match the audit but their names do not ({example}); the files "
            "were renamed or moved. Pass the folder, glob or manifest given to medmem audit."
        )


def _check_out(out: Path, audit_dir: Path, ds: Any, src_text: str | None) -> None:
    """Refuse an output folder whose replacement would delete the audit or the inputs."""
    o = out.resolve()
    protected = [audit_dir.resolve(), *(Path(p).resolve() for p in ds.paths)]
    if src_text and Path(src_text).is_dir():
        protected.append(Path(src_text).resolve())
    for p in protected:
        if o == p or o in p.parents or p in o.parents:
            raise InputError(
                f"{out}: the release folder must be outside the audit folder and the synthetic "
                f"images, and must not contain them ({p}). Choose another --out."
            )


def _is_audit_folder(folder: Path, seen: dict[Path, bool]) -> bool:
    """True if ``folder`` holds the outputs of ``medmem audit`` (its summary.json, with
    training.csv, synthetic.csv or report.html beside it)."""
    if folder not in seen:
        found = False
        summary = folder / "summary.json"
        if summary.is_file() and any((folder / n).is_file() for n in _AUDIT_MARKERS):
            try:
                data = json.loads(summary.read_text(encoding="utf-8"))
                found = isinstance(data, dict) and {"tau", "fingerprints"} <= set(data)
            except (OSError, ValueError):
                found = False
        seen[folder] = found
    return seen[folder]


def _not_generator_image(
    path: Path, files: list[Path] | None, seen: dict[Path, bool]
) -> str | None:
    """Why the item at ``path`` is not an image made by the generator, or None."""
    from medmem._deid import png_text
    from medmem.data._readers import format_of

    if _is_audit_folder(path if files is not None else path.parent, seen):
        return "it lies in the output folder of a medmem audit (summary.json beside it)"
    if files is None and format_of(path) == "PNG":
        try:
            software = [v.strip().lower() for k, v in png_text(path) if k.endswith(":Software")]
        except InputError:
            software = []
        if any(v.startswith("medmem") for v in software):
            return "it is a figure written by medmem (its PNG Software text is 'medmem')"
        if path.name.lower() in MEDMEM_FIGURES and any(
            v.startswith("matplotlib") for v in software
        ):
            return f"it is a matplotlib figure named like medmem's audit figure {path.name}"
    return None


class _Identity:
    """Does a synthetic file identify a training or validation patient (by its metadata,
    its bytes, or being a validation file)?"""

    def __init__(self, train_ids: set[str], train_pids: set[str], validation: _Validation) -> None:
        self.where = {t: "validation" for t in validation.identifiers}
        self.where.update({t: "training" for t in train_ids})
        self.pids = {p: "validation" for p in validation.patient_ids}
        self.pids.update({p: "training" for p in train_pids})
        self.pids = {p: w for p, w in self.pids.items() if len(p) >= MIN_IDENTIFIER_LENGTH}
        self.scanner = _ContentScanner(set(self.where))
        self.val_sizes = validation.files_by_size
        self._val_hashes: dict[int, set[str]] = {}

    def _is_validation_file(self, f: Path) -> bool:
        size = f.stat().st_size
        if size not in self.val_sizes:
            return False
        if size not in self._val_hashes:
            self._val_hashes[size] = {file_sha256(v) for v in self.val_sizes[size] if v.exists()}
        return file_sha256(f) in self._val_hashes[size]

    def reason(self, files: list[Path]) -> str | None:
        """Why the item made of ``files`` identifies a patient (no identifier in it), or None."""
        for f in files:
            if self._is_validation_file(f):
                return "it is byte for byte a file of the validation set"
            for name, value in metadata_text(f):
                if name in _PATIENT_FIELDS:
                    parts = {value.strip(), *(x.strip() for x in re.split(r"[\\^=]", value))}
                    hit = next((self.pids[x] for x in parts if x in self.pids), None)
                    if hit is not None:
                        return f"its {name} holds a {hit} patient's id"
                token = self.scanner.find_text(value)
                if token is not None:
                    which = self.where.get(token, "training")
                    return f"its metadata ({name}) names a {which} image or patient"
            token = self.scanner.find(f)
            if token is not None:
                return f"its bytes contain a {self.where.get(token, 'training')} identifier"
        return None


def _uid_names(rel: str, uids: UidMap | None) -> tuple[str, bool]:
    """``rel`` with each DICOM UID in it replaced by its new UID."""
    if uids is None:
        return rel, False
    new = _UID_IN_NAME.sub(lambda m: uids(m.group(0)), rel)
    return new, new != rel


#: Verdicts ``screen(drop=...)`` (``--drop``) can withhold beside the copies.
DROPS = ("identity",)


def _identity_hits(syn: pd.DataFrame, summary: dict[str, Any], audit_dir: Path) -> set[str]:
    """Synthetic ids that re-identify a training patient, checked against tau_identity."""
    block = summary.get("identity")
    if not isinstance(block, dict) or "identity" not in syn.columns:
        raise InputError(
            f"{audit_dir}: the audit has no identity section (no identity column in "
            "synthetic.csv); audit with --identity-detector DIR (identity_detector=...) and "
            "training patient ids, or screen without --drop identity."
        )
    thr = float(block["tau_identity"])
    hits = set()
    for sid, c, h in zip(syn["synthetic_id"], syn["identity_corr"], syn["identity"], strict=True):
        if bool(h) != (float(c) >= thr):
            raise InputError(
                f"{audit_dir / 'synthetic.csv'}: {sid!r} has identity={bool(h)} but "
                f"identity_corr={c} and tau_identity={thr}: the file was edited. Run the audit "
                "again."
            )
        if h:
            hits.add(str(sid))
    return hits


def _refuse(what: str, found: dict[str, str], paths: dict[str, Path], fix: str) -> InputError:
    sid = sorted(found)[0]
    return InputError(
        f"{len(found)} synthetic file(s) {what}, e.g. {paths[sid]}: {found[sid]}. {fix}"
    )


def screen(
    audit_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    synthetic: Any = None,
    margin: float = 0.0,
    overwrite: bool = False,
    quiet: bool = False,
    drop_nonimages: bool = False,
    drop_identifying: bool = False,
    deidentify: bool = True,
    force: bool = False,
    drop: Sequence[str] = (),
) -> ScreenResult:
    """Write the release set of an audit: the synthetic images that are not copies.

    Keeps the synthetic images with ``nearest_train_corr < tau - margin``, written
    de-identified in their own format (a DICOM series as a folder of its slices) under their
    own relative paths, plus ``release_manifest.csv`` (``file`` relative to the release,
    ``nearest_train_corr``, ``tau``, ``margin``, ``renamed``, ``removed`` = what
    de-identification removed, ``medmem_version``, ``audit_fingerprint`` = SHA-256 of
    summary.json) and ``README.txt``. See the module docstring for what is done so that
    nothing in the release names a training image or patient.

    Args:
        audit_dir: the output folder of ``medmem audit``.
        out: the release folder (must not exist unless ``overwrite``).
        synthetic: the audited synthetic images (folder, glob, manifest or an ImageDataset);
            default: the source recorded in summary.json (``sources.synthetic``).
        margin: withhold also images within ``margin`` below tau (a safety margin for
            near-threshold images), in [0, 2).
        overwrite: replace an existing ``out``.
        quiet: no progress bars.
        drop_nonimages: leave out (and count) files that are not images made by the
            generator (audit outputs, medmem figures) instead of refusing the set.
        drop_identifying: leave out (and count) files that identify a training or
            validation patient instead of refusing the set.
        deidentify: False copies the files byte for byte (no de-identification; the
            release then keeps whatever their headers hold). Files that identify a patient
            or are not generator images are refused or dropped all the same.
        force: screen even when the audit's measured control sensitivity is below
            :data:`medmem._audit.SENSITIVITY_FLOOR` (a near-blind detector misses copies).
        drop: further verdicts to withhold: ``"identity"`` withholds the synthetic images
            that re-identify a training patient (``identity`` in synthetic.csv; the audit
            needs its identity section, ``--identity-detector``).

    Raises:
        InputError: not an audit folder; the synthetic images differ from the audited ones
            (fingerprint or names); an unsafe ``out``; a synthetic file that is not a
            generator image or identifies a patient (unless dropped); a file that cannot be
            de-identified; a measured control sensitivity below the floor, unless ``force``.
        OutputError: ``out`` is or holds an input, is not writable, or is being written by
            another medmem run.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> r = screen("audit/", "release/", margin=0.02)  # doctest: +SKIP
        >>> r.n_released, r.n_copies  # doctest: +SKIP
    """
    audit_dir, out = Path(audit_dir), Path(out)
    margin = check_in_range(margin, "margin", 0.0, 2.0, high_open=True)
    from medmem.data._sources import input_roots

    with claim_output(
        out,
        inputs=input_roots([audit_dir, synthetic]),
        overwrite=overwrite,
        need_bytes=_release_bytes(audit_dir, synthetic),
    ):
        return _screen(
            audit_dir,
            out,
            synthetic=synthetic,
            margin=margin,
            overwrite=overwrite,
            quiet=quiet,
            drop_nonimages=drop_nonimages,
            drop_identifying=drop_identifying,
            deidentify=deidentify,
            force=force,
            drop=tuple(drop),
        )


def _release_bytes(audit_dir: Path, synthetic: Any) -> int:
    """Room a release needs: the synthetic images (copied) plus the outputs' floor."""
    from medmem._io import MIN_FREE_BYTES, tree_bytes
    from medmem.data._sources import input_roots

    if synthetic is None:
        try:
            summary = json.loads((audit_dir / "summary.json").read_text(encoding="utf-8"))
            synthetic = (summary.get("sources") or {}).get("synthetic")
        except (OSError, ValueError, AttributeError):
            synthetic = None
    return MIN_FREE_BYTES + tree_bytes(input_roots(synthetic))


def _screen(
    audit_dir: Path,
    out: Path,
    *,
    synthetic: Any,
    margin: float,
    overwrite: bool,
    quiet: bool,
    drop_nonimages: bool,
    drop_identifying: bool,
    deidentify: bool,
    force: bool,
    drop: tuple[str, ...] = (),
) -> ScreenResult:
    """:func:`screen`, with ``out`` claimed."""
    from medmem._audit import low_sensitivity_warning

    bad = sorted(set(drop) - set(DROPS))
    if bad:
        raise InputError(f"drop: unknown verdict(s) {bad}; choose from {list(DROPS)}.")
    summary, syn, train, audit_fp = _read_audit(audit_dir)
    identity_hits = _identity_hits(syn, summary, audit_dir) if "identity" in drop else set()
    warning = low_sensitivity_warning(summary)
    if warning and not force:
        raise InputError(
            f"{audit_dir}: {warning} Screening with this audit would release copies it "
            "cannot see; pass --force (force=True) to screen anyway."
        )
    if warning:
        logger.warning("%s (screening anyway: --force)", warning)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out}: output folder exists. Choose another folder, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    tau = float(summary["tau"])
    ds, where = _load_synthetic(synthetic, summary, audit_dir, quiet)
    _check_same_set(ds, syn, summary, where)
    src_text = synthetic if isinstance(synthetic, (str, os.PathLike)) else None
    if src_text is None and synthetic is None:
        src_text = (summary.get("sources") or {}).get("synthetic")
    _check_out(out, audit_dir, ds, str(src_text) if src_text is not None else None)

    corr = dict(zip(syn["synthetic_id"], syn["nearest_train_corr"].astype(float), strict=True))
    flagged = dict(zip(syn["synthetic_id"], syn["copy"].astype(bool), strict=True))
    for sid, c in corr.items():
        if flagged[sid] != (c >= tau):
            raise InputError(
                f"{audit_dir / 'synthetic.csv'}: {sid!r} has copy={flagged[sid]} but "
                f"nearest_train_corr={c} and tau={tau}: the file was edited. Run the audit again."
            )

    train_ids = _training_identifiers(train, summary)
    validation = _validation(summary, audit_dir)
    if validation.note.startswith("not checked"):
        warnings.warn(
            f"validation patients {validation.note}; synthetic files were checked against "
            "training patients only.",
            category=MedmemWarning,
            stacklevel=2,
        )
    identifiers = train_ids | validation.identifiers
    short = [t for t in identifiers if len(t) < MIN_IDENTIFIER_LENGTH]
    if short:
        warnings.warn(
            f"{len(short)} training or validation identifiers are shorter than "
            f"{MIN_IDENTIFIER_LENGTH} characters (e.g. {sorted(short)[0]!r}) and were not "
            "searched for in the release's names, metadata and bytes; give images and patients "
            "longer ids.",
            category=MedmemWarning,
            stacklevel=2,
        )
    train_pids = set()
    if "patient_id" in train.columns:
        train_pids = {str(p).strip() for p in train["patient_id"] if str(p).strip()}
    namer = _Namer(_NameScanner(identifiers))
    identity = _Identity(train_ids, train_pids, validation)

    n_copies = sum(1 for c in corr.values() if c >= tau)
    n_margin = sum(1 for c in corr.values() if tau - margin <= c < tau)
    result = ScreenResult(
        out=out,
        n_synthetic=len(ds),
        n_released=0,
        n_copies=n_copies,
        n_margin=n_margin,
        n_identifier=0,
        tau=tau,
        margin=margin,
        audit_fingerprint=audit_fp,
        deidentified=deidentify,
        validation_checked=validation.note,
    )
    keep = [i for i, sid in enumerate(ds.ids) if corr[sid] < tau - margin]
    result.n_identity = sum(1 for i in keep if ds.ids[i] in identity_hits)
    keep = [i for i in keep if ds.ids[i] not in identity_hits]
    paths = {ds.ids[i]: Path(ds.paths[i]) for i in keep}
    ds_files, ds_paths = ds.files, [Path(p) for p in ds.paths]

    # Before anything is written: files that are not generator images, then files that
    # identify a patient (their metadata, their bytes, or a validation file's bytes).
    nonimage: dict[str, str] = {}
    identifying: dict[str, str] = {}
    audit_folders: dict[Path, bool] = {}
    for i in progress(keep, desc="checking synthetic files", total=len(keep), quiet=quiet):
        sid, files = ds.ids[i], _item_files(ds_files, ds_paths, i)
        why = _not_generator_image(paths[sid], files, audit_folders)
        if why is not None:
            nonimage[sid] = why
            continue
        why = identity.reason(files if files is not None else [paths[sid]])
        if why is not None:
            identifying[sid] = why
    if nonimage and not drop_nonimages:
        raise _refuse(
            "are not images made by the generator",
            nonimage,
            paths,
            "Remove them from the synthetic folder and audit again, or pass --drop-nonimages "
            "(drop_nonimages=True) to leave them out of the release.",
        )
    if identifying and not drop_identifying:
        raise _refuse(
            "identify a training or validation patient",
            identifying,
            paths,
            "Such a file is a patient's image or carries a patient's data; find out how it got "
            "into the synthetic set, or pass --drop-identifying (drop_identifying=True) to "
            "leave it out of the release.",
        )
    result.withheld_nonimage = sorted(nonimage)
    result.withheld_identifier = sorted(identifying)
    if nonimage or identifying:
        logger.warning(
            "withheld %d synthetic file(s) that are not generator images and %d that identify "
            "a training or validation patient",
            len(nonimage),
            len(identifying),
        )
    keep = [i for i in keep if ds.ids[i] not in nonimage and ds.ids[i] not in identifying]

    uids = UidMap() if deidentify else None
    rows: list[dict[str, Any]] = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i in progress(keep, desc="writing release", total=len(keep), quiet=quiet):
            sid = ds.ids[i]
            files = _item_files(ds_files, ds_paths, i)
            src = paths[sid]
            is_dicom = files is not None or _is_dicom(src)
            name_id, uid_renamed = _uid_names(sid, uids if is_dicom else None)
            rel, renamed = namer.name(name_id, "" if files is not None else _suffix(src.name))
            written, renamed_inside, removed = _write_item(src, files, tmp / rel, namer, uids)
            renamed = renamed or renamed_inside or uid_renamed
            if deidentify:  # what de-identification kept must not name a patient either
                hit = next(
                    (h for p in written if (h := identity.scanner.find(p)) is not None), None
                )
                if hit is not None:
                    if not drop_identifying:
                        raise InputError(
                            f"{src}: after de-identification, the file still holds a training "
                            "or validation identifier (in an attribute the profile keeps). "
                            "Pass --drop-identifying (drop_identifying=True) to leave it out."
                        )
                    (shutil.rmtree if files is not None else os.unlink)(tmp / rel)
                    result.withheld_identifier.append(sid)
                    continue
            if renamed:
                result.renamed[sid] = rel
            result.released.append(sid)
            result.removed[sid] = removed
            rows.append(
                {
                    "file": rel + ("/" if files is not None else ""),
                    "nearest_train_corr": repr(corr[sid]),
                    "tau": repr(tau),
                    "margin": repr(margin),
                    "renamed": renamed,
                    "removed": ";".join(removed),
                    "medmem_version": __version__,
                    "audit_fingerprint": audit_fp,
                }
            )
        result.n_released = len(rows)
        result.n_identifier = len(result.withheld_identifier)
        result.n_nonimage = len(result.withheld_nonimage)
        rows.sort(key=lambda r: r["file"])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(tmp / MANIFEST_NAME, buf.getvalue())
        atomic_write_text(
            tmp / README_NAME,
            _readme(
                result,
                len(result.renamed),
                summary.get("percentile", 95.0),
                summary.get("calibration", "paper"),
            ),
        )
        _remove_empty_dirs(tmp)
    return result


def _is_dicom(path: Path) -> bool:
    from medmem.data._readers import format_of

    return format_of(path) == "DICOM"


def _write_item(
    src: Path, files: list[Path] | None, dst: Path, namer: _Namer, uids: UidMap | None
) -> tuple[list[Path], bool, list[str]]:
    """Write one item (a series: its slice files into folder ``dst``) de-identified with
    ``uids`` (shared by the release), or, when ``uids`` is None, copied byte for byte and
    checked against its source's SHA-256. Returns the files written, whether a slice file
    had to be renamed, and the kinds of things removed."""
    pairs: list[tuple[Path, Path]] = []
    renamed = False
    if files is None:
        pairs.append((src, dst))
    else:
        for f in files:
            name, changed = _uid_names(f.name, uids)
            renamed |= changed
            if not namer.clean(name):
                name, renamed = namer.neutral(_suffix(name)), True
            pairs.append((f, dst / name))
    out: list[Path] = []
    removed: set[str] = set()
    for s, d in pairs:
        d.parent.mkdir(parents=True, exist_ok=True)
        before = file_sha256(s)
        if uids is not None:
            removed.update(deidentify_file(s, d, uids=uids))
        else:
            shutil.copyfile(s, d)
            if file_sha256(d) != before:
                raise InputError(
                    f"{s}: changed while it was being copied. Run medmem screen again."
                )
        if file_sha256(s) != before:
            raise InputError(f"{s}: changed while it was being written. Run medmem screen again.")
        out.append(d)
    return out, renamed, sorted(removed)


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        p = Path(dirpath)
        if p != root and not any(p.iterdir()):
            p.rmdir()


def _readme(r: ScreenResult, n_renamed: int, percentile: float, calibration: str = "paper") -> str:
    rate = f"{100 - float(percentile):g}"
    design = {
        "conformal": f"By design about {rate}% of novel images exceed tau",
        "conservative": f"By design at most about {rate}% of novel images exceed tau",
    }.get(
        calibration,
        f"With the paper's calibration more than {rate}% of novel images can exceed tau "
        "(the more so, the smaller the validation set)",
    )
    code, scheme, meaning = PROFILE_CODE
    if r.deidentified:
        files = f"""Files are de-identified copies of the synthetic files, in their original formats
(a DICOM series is a folder of its slices); pixel values are unchanged (checked by
reading each file back):
  DICOM: {PROFILE_NAME}
    ({scheme} {code} "{meaning}"): identifying attributes removed or emptied at every
    depth of sequences, private attributes, curves and overlays removed, UIDs replaced
    by new ones (the same new UID for the same old one throughout this release, so a
    series stays one series), PatientIdentityRemoved = YES, DeidentificationMethod and
    DeidentificationMethodCodeSequence set;
  PNG: only the image header, palette, transparency and image data kept (no text
    chunks, EXIF, ICC profile, time); JPEG: no APPn segments (EXIF, XMP, ICC, IPTC) or
    comments; TIFF: image structure tags only (no description, software, date, EXIF,
    XMP, private tags);
  NIfTI: descrip, aux_file, intent_name, db_name, data_type emptied and header
    extensions removed (geometry, scaling and voxels kept);
  NumPy: arrays written again without pickles; non-numeric arrays of .npz files dropped.
The 'removed' column of release_manifest.csv lists, per file, the kinds of things removed.
Text burned into the pixels is not removed."""
    else:
        files = """Files are byte-for-byte copies of the synthetic files (screen was run with
deidentify=False): they were NOT de-identified and keep whatever their headers hold."""
    return f"""Release set screened by medmem {__version__}

These {r.n_released} synthetic images (of {r.n_synthetic} audited) are the ones whose
nearest training image, as seen by the audit's copy detector, correlates below
tau - margin = {r.tau:.6f} - {r.margin:g}.
{files}

Withheld:
  {r.n_copies} copies (nearest_train_corr >= tau)
  {r.n_margin} images within the margin below tau
  {r.n_identifier} files that identify a training or validation patient (metadata holding a
    patient's id, metadata or bytes holding a training or validation identifier, or a
    validation file itself)
  {r.n_nonimage} files that are not images made by the generator (outputs of an audit,
    figures written by medmem)
  {r.n_identity} images that re-identify a training patient (identity_corr >= tau_identity;
    counted only with --drop identity)
Renamed: {n_renamed} files whose names contained a training or validation identifier (or a
DICOM UID) got neutral names (or the new UID).
Validation patients: {r.validation_checked or "not checked"}.

release_manifest.csv lists each file (path relative to this folder) with its
nearest_train_corr, tau, margin, whether it was renamed, what was removed, the medmem
version and the audit fingerprint (SHA-256 of the audit's summary.json), which ties this
release to its audit.

What this does and does not mean: a copy is a near-copy of a training image up to flips,
small rotations and contrast changes, as seen by the detector. {design}
({calibration} calibration), so some withheld images are not copies;
images below tau may still resemble a training image in ways the detector does not
measure. Screening lowers the risk of sharing patient images; it is not a proof of privacy.
"""


__all__ = ["DROPS", "MANIFEST_COLUMNS", "MIN_IDENTIFIER_LENGTH", "ScreenResult", "screen"]
