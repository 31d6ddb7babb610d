"""``medmem screen``: the release set, i.e. the audited synthetic images that are not copies.

Given an audit folder (``summary.json``, ``synthetic.csv``, ``training.csv``), the synthetic
images with ``nearest_train_corr < tau - margin`` are copied byte for byte, in their original
format (a DICOM series as a folder of its slices), into a new folder with
``release_manifest.csv`` and ``README.txt``. The folder is built aside and moved into place.

Nothing in the release names or points to a training image or patient:

* the manifest has no training column (no ``nearest_train_id``), no paths outside the
  release, no thumbnails;
* a synthetic file whose name or path contains a training identifier (training id, file
  name or stem, patient id, training path) is renamed to a neutral name (``renamed`` in the
  manifest);
* a file whose bytes contain a training identifier (e.g. a DICOM header carrying a
  training patient's PatientID) is withheld, and counted in README.txt.

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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from medmem import __version__
from medmem._errors import InputError, OutputExistsError
from medmem._io import atomic_dir, atomic_write_text, file_sha256
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
    "medmem_version",
    "audit_fingerprint",
]
MIN_IDENTIFIER_LENGTH = 4  # in names; in file contents 5 (see _ContentScanner)
_MIN_CONTENT_LENGTH = 5
_GZ_SCAN_BYTES = 1 << 20  # of a .gz file, the first MiB decompressed is scanned too


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
    n_identifier: int  # withheld: the file's bytes contain a training identifier
    tau: float
    margin: float
    audit_fingerprint: str
    released: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # synthetic id -> release path
    withheld_identifier: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"released {self.n_released} of {self.n_synthetic} synthetic images to {self.out}",
            f"withheld: {self.n_copies} copies (nearest_train_corr >= tau = {self.tau:.4f}), "
            f"{self.n_margin} within the margin {self.margin:g} below tau, "
            f"{self.n_identifier} whose bytes contain a training identifier",
        ]
        if self.renamed:
            lines.append(
                f"renamed {len(self.renamed)} file(s) whose names contained a training "
                "identifier (see the 'renamed' column of release_manifest.csv)"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- audit folder
def _read_audit(audit_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, str]:
    files = {n: audit_dir / n for n in ("summary.json", "synthetic.csv", "training.csv")}
    missing = [n for n, p in files.items() if not p.is_file()]
    if missing:
        raise InputError(
            f"{audit_dir}: not an audit folder ({', '.join(missing)} not found). Give the --out "
            "folder of `medmem audit`."
        )
    raw = files["summary.json"].read_bytes()
    try:
        summary = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{files['summary.json']}: not valid JSON ({exc}).") from None
    for key in ("tau", "fingerprints", "spatial_dims", "image_size"):
        if key not in summary:
            raise InputError(
                f"{files['summary.json']}: has no {key!r}; it was not written by `medmem audit` "
                "(audits of in-memory embeddings cannot be screened). Run medmem audit again."
            )
    syn = pd.read_csv(
        files["synthetic.csv"],
        dtype={"synthetic_id": str, "nearest_train_id": str},
        keep_default_na=False,
    )
    train = pd.read_csv(files["training.csv"], dtype=str, keep_default_na=False)
    for col in ("synthetic_id", "nearest_train_corr", "copy"):
        if col not in syn.columns:
            raise InputError(f"{files['synthetic.csv']}: has no {col!r} column.")
    if "train_id" not in train.columns:
        raise InputError(f"{files['training.csv']}: has no 'train_id' column.")
    return summary, syn, train, hashlib.sha256(raw).hexdigest()


def _as_bool(values: pd.Series) -> pd.Series:
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "yes"])


# ---------------------------------------------------------------------------- identifiers
def _training_identifiers(train: pd.DataFrame, summary: dict[str, Any]) -> set[str]:
    """Every string that names a training image or patient: ids, file names and stems,
    patient ids, the training source and absolute training paths."""
    out: set[str] = set()
    src = (summary.get("sources") or {}).get("training")
    base = None
    if src:
        out.add(str(src))
        p = Path(str(src))
        base = p if p.is_dir() else (p.parent if p.suffix.lower() == ".csv" else None)
        if base is not None:
            out.add(str(base.resolve()))
    for tid in train["train_id"]:
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
    if "patient_id" in train.columns:
        out.update(str(p) for p in train["patient_id"] if str(p).strip())
    return {t for t in out if t}


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


def _item_files(ds: Any, i: int) -> list[Path] | None:
    """The files of a DICOM series item (None for a single-file item)."""
    files = getattr(ds, "files", None)
    if files is not None:
        found = files[i]
    else:
        items = getattr(ds, "_items", None)
        found = items[i].files if items is not None else None
    return None if found is None else [Path(f) for f in found]


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


def screen(
    audit_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    synthetic: Any = None,
    margin: float = 0.0,
    overwrite: bool = False,
    quiet: bool = False,
) -> ScreenResult:
    """Write the release set of an audit: the synthetic images that are not copies.

    Keeps the synthetic images with ``nearest_train_corr < tau - margin``, copied byte for
    byte (a DICOM series as a folder of its slices) under their own relative paths, plus
    ``release_manifest.csv`` (``file`` relative to the release, ``nearest_train_corr``,
    ``tau``, ``margin``, ``renamed``, ``medmem_version``, ``audit_fingerprint`` = SHA-256
    of summary.json) and ``README.txt``. See the module docstring for what is done so that
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

    Raises:
        InputError: not an audit folder; the synthetic images differ from the audited ones
            (fingerprint or names); an unsafe ``out``.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> r = screen("audit/", "release/", margin=0.02)  # doctest: +SKIP
        >>> r.n_released, r.n_copies  # doctest: +SKIP
    """
    audit_dir, out = Path(audit_dir), Path(out)
    margin = check_in_range(margin, "margin", 0.0, 2.0, high_open=True)
    summary, syn, train, audit_fp = _read_audit(audit_dir)
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
    flagged = dict(zip(syn["synthetic_id"], _as_bool(syn["copy"]), strict=True))
    for sid, c in corr.items():
        if flagged[sid] != (c >= tau):
            raise InputError(
                f"{audit_dir / 'synthetic.csv'}: {sid!r} has copy={flagged[sid]} but "
                f"nearest_train_corr={c} and tau={tau}: the file was edited. Run the audit again."
            )

    identifiers = _training_identifiers(train, summary)
    short = [t for t in identifiers if len(t) < MIN_IDENTIFIER_LENGTH]
    if short:
        warnings.warn(
            f"{len(short)} training identifiers are shorter than {MIN_IDENTIFIER_LENGTH} "
            f"characters (e.g. {sorted(short)[0]!r}) and were not searched for in the release's "
            "names and bytes; give training images and patients longer ids.",
            stacklevel=2,
        )
    namer = _Namer(_NameScanner(identifiers))
    scanner = _ContentScanner(identifiers)

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
    )
    rows: list[dict[str, Any]] = []
    keep = [i for i, sid in enumerate(ds.ids) if corr[sid] < tau - margin]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i in progress(keep, desc="copying release", total=len(keep), quiet=quiet):
            sid = ds.ids[i]
            files = _item_files(ds, i)
            src = Path(ds.paths[i])
            rel, renamed = namer.name(sid, "" if files is not None else _suffix(src.name))
            written, renamed_inside = _copy_item(src, files, tmp / rel, namer)
            renamed = renamed or renamed_inside
            hit = next((h for p in written if (h := scanner.find(p)) is not None), None)
            if hit is not None:
                logger.warning(
                    "withheld a synthetic image: its bytes contain a training identifier"
                )
                (shutil.rmtree if files is not None else os.unlink)(tmp / rel)
                result.withheld_identifier.append(sid)
                continue
            if renamed:
                result.renamed[sid] = rel
            result.released.append(sid)
            rows.append(
                {
                    "file": rel + ("/" if files is not None else ""),
                    "nearest_train_corr": repr(corr[sid]),
                    "tau": repr(tau),
                    "margin": repr(margin),
                    "renamed": renamed,
                    "medmem_version": __version__,
                    "audit_fingerprint": audit_fp,
                }
            )
        result.n_released = len(rows)
        result.n_identifier = len(result.withheld_identifier)
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


def _copy_item(
    src: Path, files: list[Path] | None, dst: Path, namer: _Namer
) -> tuple[list[Path], bool]:
    """Copy one item byte for byte (a series: its slice files into folder ``dst``), checking
    each copy's SHA-256 against its source. Returns the copies and whether a slice file had
    to be renamed."""
    pairs: list[tuple[Path, Path]] = []
    renamed = False
    if files is None:
        pairs.append((src, dst))
    else:
        for f in files:
            name = f.name
            if not namer.clean(name):
                name, renamed = namer.neutral(_suffix(name)), True
            pairs.append((f, dst / name))
    out = []
    for s, d in pairs:
        d.parent.mkdir(parents=True, exist_ok=True)
        before = file_sha256(s)
        shutil.copyfile(s, d)
        if file_sha256(d) != before:
            raise InputError(f"{s}: changed while it was being copied. Run medmem screen again.")
        out.append(d)
    return out, renamed


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
    return f"""Release set screened by medmem {__version__}

These {r.n_released} synthetic images (of {r.n_synthetic} audited) are the ones whose
nearest training image, as seen by the audit's copy detector, correlates below
tau - margin = {r.tau:.6f} - {r.margin:g}. Files are byte-for-byte copies of the synthetic
files, in their original formats (a DICOM series is a folder of its slices).

Withheld:
  {r.n_copies} copies (nearest_train_corr >= tau)
  {r.n_margin} images within the margin below tau
  {r.n_identifier} images whose file contents contain a training identifier
Renamed: {n_renamed} files whose names contained a training identifier got neutral names.

release_manifest.csv lists each file (path relative to this folder) with its
nearest_train_corr, tau, margin, whether it was renamed, the medmem version and the audit
fingerprint (SHA-256 of the audit's summary.json), which ties this release to its audit.

What this does and does not mean: a copy is a near-copy of a training image up to flips,
small rotations and contrast changes, as seen by the detector. {design}
({calibration} calibration), so some withheld images are not copies;
images below tau may still resemble a training image in ways the detector does not
measure. Screening lowers the risk of sharing patient images; it is not a proof of privacy.
"""


__all__ = ["MANIFEST_COLUMNS", "MIN_IDENTIFIER_LENGTH", "ScreenResult", "screen"]
