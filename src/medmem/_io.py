"""Atomic file writes and content fingerprints.

Every output medmem writes goes through these helpers: the data are written to a temporary
file in the same folder and renamed over the target, so a crash never leaves a half file
that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from medmem._errors import InputError, OutputError, OutputExistsError


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a finished temporary file (0600) or folder (0700) the mode a plain create
    would: 0666 or 0777 less the umask. Until then partial outputs stay private."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (NumPy scalars allowed)."""
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_save(path: str | os.PathLike, save_fn: Any) -> None:
    """Call ``save_fn(tmp_path)`` to write a file, then rename it over ``path``.

    For writers that want a file name rather than a handle (matplotlib, safetensors, pandas).
    The temporary name keeps the suffix so that format detection by extension still works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        save_fn(tmp)
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_PARTIAL = "medmem-partial-"  # atomic_dir's folder being built: ".<name>.medmem-partial-XXXXXXXX"
_OLD = "medmem-old-"  # the previous output being replaced: ".<name>.medmem-old-XXXXXXXX"


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build an output folder in a temporary sibling; move it into place only on success.

    A crash leaves ``path`` as it was (absent, or the previous complete output), never a
    half-written folder. An existing ``path`` is refused unless ``overwrite``. The sibling
    is named ``.<name>.medmem-partial-*``; one left by a killed run is removed by the next
    :func:`claim_output` of the same folder.
    """
    from medmem._errors import OutputExistsError

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path}: output folder exists. Choose another folder, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder; choose another path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_PARTIAL}", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, folder=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_OLD}", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------
# Output safety: one function, claim_output, used by every command that writes.

_HELD: dict[Path, int] = {}  # output paths this process has claimed -> the claiming thread
_HELD_LOCK = threading.Lock()
_NAME_ROOM = 32  # bytes the temporary and lock names add to an output's name


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def _check_inputs(out: Path, inputs: Any, flag: str) -> None:
    o = _abs(out)
    for item in inputs or ():
        if item is None:
            continue
        root, is_folder = item if isinstance(item, tuple) else (Path(item), None)
        if is_folder is None:
            is_folder = not Path(root).is_file()
        r = _abs(root)
        if o == r or o in r.parents:
            what = "is" if o == r else "contains"
        elif is_folder and r in o.parents:
            what = "lies inside"
        else:
            continue
        raise OutputError(
            f"{flag} {out}: {what} the input {root}; writing there could delete or mix "
            "with the inputs. Choose an output folder outside every input."
        )


def _check_writable(out: Path, flag: str, kind: str) -> None:
    """The output location can be created and written: clear errors naming ``flag``."""
    if out.exists() and not out.is_dir() and kind == "folder":
        raise OutputError(
            f"{flag} {out}: is a file, not a folder. Choose a folder path (absent or, with "
            "--overwrite, an earlier output folder)."
        )
    if out.is_dir() and kind == "file":
        raise OutputError(f"{flag} {out}: is a folder; give a file path.")
    anchor = out.absolute()
    missing: list[str] = [anchor.name]
    anchor = anchor.parent
    while not anchor.exists():
        missing.append(anchor.name)
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(
            f"{flag} {out}: {anchor} is a file, so nothing can be written under it. "
            "Choose another path."
        )
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for k, name in enumerate(missing):
        room = _NAME_ROOM if k == 0 else 0
        if len(os.fsencode(name)) + room > name_max:
            raise OutputError(
                f"{flag} {out}: the name {name[:40]!r}... is too long ({len(os.fsencode(name))} "
                f"bytes; this file system allows {name_max - room}"
                f"{' for an output, with room for its temporary names' if room else ''}). "
                "Choose a shorter name."
            )
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputError(
            f"{flag} {out}: cannot write in {anchor} (read-only or no permission). Choose a "
            "writable location."
        )


MIN_FREE_BYTES = 64 << 20  # room every output needs at least: tables, figures, a report


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):,.1f} GiB"


def tree_bytes(roots: Any) -> int:
    """Bytes of the files under ``roots`` (paths or ``(path, is_folder)`` pairs); unreadable
    entries count 0. An estimate of what copying them needs."""
    total = 0
    for item in roots or ():
        root = Path(item[0] if isinstance(item, tuple) else item)
        if root.is_file():
            total += root.stat().st_size
            continue
        for folder, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
    return total


def _check_space(out: Path, need_bytes: int, flag: str) -> None:
    """The file system of ``out`` has ``need_bytes`` free: an error naming ``flag`` if not."""
    anchor = out.absolute()
    while not anchor.exists():
        anchor = anchor.parent
    try:
        free = shutil.disk_usage(anchor).free
    except OSError:
        return  # no figure to check against; a full disk still fails atomically later
    if free < need_bytes:
        raise OutputError(
            f"{flag} {out}: only {_mib(free)} free on {anchor}'s file system, about "
            f"{_mib(need_bytes)} needed. Free some space, or choose a location with more room."
        )


def _remove_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by a killed run (the caller holds the
    claim on ``out``, so no live writer owns them); returns what was removed."""
    import re

    name = re.escape(out.name)
    rx = re.compile(
        rf"^\.{name}\.(?:(?:{_PARTIAL}|{_OLD})[a-z0-9_]{{8}}|[a-z0-9_]{{8}}\.(?:tmp|old))$"
    )
    removed = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    for p in siblings:
        if rx.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        import logging

        logging.getLogger("medmem").warning(
            "removed %d unfinished temporary folder(s) of an earlier, interrupted run to %s: %s",
            len(removed),
            out,
            ", ".join(p.name for p in removed),
        )
    return removed


@contextmanager
def claim_output(
    out: str | os.PathLike,
    *,
    inputs: Any = (),
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "out",
    kind: str = "folder",
    need_bytes: int | None = None,
    shared: bool = False,
) -> Iterator[Path]:
    """Claim the output ``out`` for this process, before any work; release it on exit.

    Refuses (:class:`OutputError`, naming ``flag``) an ``out`` that is or contains any of
    ``inputs``, or lies inside an input folder (``inputs``: paths, or ``(path, is_folder)``
    pairs as ``medmem.data._sources.input_roots`` gives them for a source); an ``out``
    that is a file (``kind="folder"``) or a folder (``kind="file"``), whose location is
    not writable, or whose name is too long, or whose file system has less than
    ``need_bytes`` free (default :data:`MIN_FREE_BYTES`); an existing ``out`` unless
    ``overwrite`` or ``resume`` (:class:`OutputExistsError`). Then takes an exclusive lock,
    ``.<name>.lock`` beside ``out``: a second writer to the same ``out`` fails at once
    instead of replacing the first one's results. Temporary folders of an earlier, killed
    run to ``out`` are removed. Claiming again, in the thread holding the claim, is a no-op.

    ``shared=True`` makes the same checks but takes no lock and removes nothing: for a
    writer that joins another run to an existing ``out`` whose parts are locked one by one
    (``medmem study --join``: each cell has its own lock).
    """
    import filelock

    out = Path(out)
    _check_inputs(out, inputs, flag)
    _check_writable(out, flag, kind)
    _check_space(out, MIN_FREE_BYTES if need_bytes is None else need_bytes, flag)
    if out.exists() and not (overwrite or resume):
        raise OutputExistsError(
            f"{flag} {out}: exists. Choose another path, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    if shared:
        if not out.is_dir():
            raise OutputError(
                f"{flag} {out}: not found; joining needs a run that has started there. "
                "Start the first run without joining."
            )
        yield out
        return
    key = _abs(out)
    me = threading.get_ident()
    with _HELD_LOCK:
        if _HELD.get(key) == me:
            nested = True
        else:
            nested = False
    if nested:
        yield out
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot create {out.parent} ({exc}).") from exc
    lock_path = out.parent / f".{out.name}.lock"
    lock = filelock.FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputError(
            f"{flag} {out}: another medmem run is writing there now (lock {lock_path}). "
            "Wait for it to finish, or choose another path."
        ) from None
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot write in {out.parent} ({exc}).") from exc
    with _HELD_LOCK:
        _HELD[key] = me
    try:
        _remove_stale(out)
        yield out
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        try:
            os.unlink(lock_path)  # still held: no other writer is between open and lock
        except OSError:
            pass
        lock.release()


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write tensors and a JSON-able ``meta`` dict as one safetensors file, atomically.

    The one checkpoint format of medmem (detector and generative models): no pickle.
    """
    from safetensors.torch import save_file

    text = json.dumps(meta, allow_nan=False, sort_keys=True)
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"medmem": text}))


def load_tensors(path: str | os.PathLike, *, fix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``(meta, tensors)`` written by :func:`save_tensors`; ``fix`` ends the error."""
    from safetensors import SafetensorError, safe_open

    from medmem._errors import InputError

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["medmem"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a readable medmem checkpoint ({exc}). {fix}") from exc
    return meta, tensors


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (memory does not grow with file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def combine_hashes(hashes: list[str] | tuple[str, ...], *, salt: str = "") -> str:
    """One SHA-256 over an ordered list of hex digests (a set fingerprint)."""
    h = hashlib.sha256(salt.encode())
    for item in hashes:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()


__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "claim_output",
    "combine_hashes",
    "file_sha256",
    "load_tensors",
    "save_tensors",
    "tree_bytes",
]


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; errors name the file and the problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level.")
    return data


MODEL_CONFIG = "config.json"  # the JSON half of a saved model folder


def save_model_folder(
    directory: str | os.PathLike,
    networks: dict[str, Any],
    meta: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """A saved model: one ``<name>.safetensors`` per network (``torch.nn.Module``) and
    ``config.json`` holding ``meta``, each written atomically; nothing is pickled.

    A folder already holding a ``config.json`` is refused unless ``overwrite``.
    """
    directory = Path(directory)
    if (directory / MODEL_CONFIG).exists() and not overwrite:
        raise OutputExistsError(
            f"{directory} already holds a saved model; pass overwrite=True or choose "
            "another folder."
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name, net in networks.items():
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        save_tensors(directory / f"{name}.safetensors", state, {"network": name})
    atomic_write_json(directory / MODEL_CONFIG, meta)
    return directory


def read_versioned_tensors(
    path: str | os.PathLike, *, fmt: str, schema: int, fix: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(meta, tensors)`` of a :func:`save_tensors` file whose meta names format ``fmt``
    and ``schema_version`` ``schema``; None when the file is absent. ``fix`` ends errors."""
    path = Path(path)
    if not path.exists():
        return None
    meta, tensors = load_tensors(path, fix=fix)
    if meta.get("format") != fmt or meta.get("schema_version") != schema:
        raise InputError(
            f"{path}: unknown checkpoint format {meta.get('format')!r} version "
            f"{meta.get('schema_version')!r} (expected {fmt!r} version {schema}). {fix}"
        )
    return meta, tensors


def resolve_paths(
    data: dict[str, Any], keys: tuple[tuple[str | None, str], ...], base: str | os.PathLike
) -> None:
    """Make the relative path strings of a config mapping relative to ``base`` (the folder
    of the file naming them), in place. ``keys`` are (section or None for the top level,
    key) pairs; absolute paths and URLs are kept."""
    for section, key in keys:
        holder = data if section is None else data.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            value = holder[key]
            if "://" not in value and not Path(value).is_absolute():
                holder[key] = str(Path(base) / value)
