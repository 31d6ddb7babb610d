"""De-identification of release files, in their original formats (used by ``medmem screen``).

One function per format writes a copy of a synthetic image that keeps its pixels, bit for bit,
and drops what could name a patient; each returns the kinds of things it removed (names of
attributes, chunks, segments or fields, never their values), for the release manifest.

* DICOM (files, multi-frame files and the slices of a series): the Basic Application Level
  Confidentiality Profile of DICOM PS3.15 Annex E (Table E.1-1, the "Basic Prof." column;
  where the table offers a choice, attributes are emptied (Z) rather than given dummy
  values). Listed attributes are removed (X) or emptied (Z), at any depth of sequences;
  private attributes, curves (50xx) and overlays (60xx) removed; every UID that is not a
  DICOM-defined one (root ``1.2.840.10008``) replaced by a new ``2.25.`` UID, the same new
  UID for the same old one throughout a :class:`UidMap` (a series stays one series, its
  frame of reference one frame of reference); file meta reduced to what the file format
  needs; the 128-byte preamble zeroed; PatientIdentityRemoved = YES,
  DeidentificationMethod and DeidentificationMethodCodeSequence (DCM 113100) added.
  PixelData is not touched.
* PNG: only IHDR, PLTE, tRNS and the image data are written (text chunks tEXt/zTXt/iTXt,
  eXIf, iCCP, tIME, pHYs, private chunks... dropped); the compressed image data are
  decompressed and compressed again, so nothing hidden after the zlib stream survives. The
  bit depth and colour type are those of the input (16-bit stays 16-bit).
* JPEG: APPn segments (Exif, XMP, ICC, IPTC...), comments and data after the end of image
  are dropped; a JFIF header is rewritten without density or thumbnail and an Adobe APP14
  marker kept (both say how to decode the colours). The entropy-coded data are kept, so
  the decoded pixels are those of the input (a re-encode of a JPEG would change them).
* TIFF: the first series (what medmem reads) is written again with the image structure tags
  only (no description, software, dates, EXIF, XMP, ICC, private tags).
* NIfTI: ``descrip``, ``aux_file``, ``intent_name``, ``db_name`` and ``data_type`` emptied,
  header extensions (which may hold a whole DICOM header) removed; header geometry, scaling
  and the voxel bytes kept. A ``.nii.gz`` is written without the gzip file name and time.
* NumPy: ``.npy`` written again from the array (no pickle, no trailing bytes); ``.npz``
  numeric arrays written again, non-numeric ones (text, dates, objects) dropped.

Each writer reads its output back and checks that the pixels are those of the input
(:class:`InputError` otherwise).
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medmem._errors import InputError
from medmem._io import atomic_write_bytes

PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
_DICOM_ROOT = "1.2.840.10008."  # UIDs defined by the standard (SOP classes, syntaxes): kept

# PS3.15 Table E.1-1, Basic Profile column (group, element, action). X: remove; Z: empty
# (zero length); D: a dummy value. Choices of the table are resolved as X/Z -> Z, X/Z/D ->
# Z, Z/D -> Z, X/D -> X. UIDs (action U) are replaced by VR, not from this table; sequences
# not listed are kept and their items de-identified in turn.
_TABLE = """
0008,0014 U 0008,0015 X 0008,0020 Z 0008,0021 X 0008,0022 Z 0008,0023 Z 0008,0024 X
0008,0025 X 0008,002A X 0008,0030 Z 0008,0031 X 0008,0032 Z 0008,0033 Z 0008,0034 X
0008,0035 X 0008,0050 Z 0008,0080 Z 0008,0081 X 0008,0082 Z 0008,0090 Z 0008,0092 X
0008,0094 X 0008,0096 X 0008,0201 X 0008,1010 Z 0008,1030 X 0008,103E X 0008,1040 X
0008,1048 X 0008,1049 X 0008,1050 X 0008,1052 X 0008,1060 X 0008,1062 X 0008,1070 Z
0008,1072 X 0008,1080 X 0008,1084 X 0008,1110 Z 0008,1111 Z 0008,1120 X 0008,2111 X
0008,4000 X 0008,0012 X 0008,0013 Z
0010,0010 Z 0010,0020 Z 0010,0021 X 0010,0022 X 0010,0024 X 0010,0030 Z 0010,0032 X
0010,0033 X 0010,0034 X 0010,0035 X 0010,0040 Z 0010,0050 X 0010,0101 X 0010,0102 X
0010,1000 X 0010,1001 X 0010,1002 X 0010,1005 X 0010,1010 X 0010,1020 X 0010,1030 X
0010,1040 X 0010,1050 X 0010,1060 X 0010,1080 X 0010,1081 X 0010,1090 X 0010,1100 X
0010,2000 X 0010,2110 X 0010,2150 X 0010,2152 X 0010,2154 X 0010,2155 X 0010,2160 X
0010,2180 X 0010,21A0 X 0010,21B0 X 0010,21C0 X 0010,21D0 X 0010,21F0 X 0010,2203 Z
0010,2297 X 0010,2299 X 0010,4000 X
0012,0010 D 0012,0020 D 0012,0021 Z 0012,0030 Z 0012,0031 Z 0012,0040 D 0012,0042 D
0012,0050 Z 0012,0051 X 0012,0060 Z 0012,0071 X 0012,0072 X 0012,0081 D 0012,0082 X
0018,0010 Z 0018,1000 Z 0018,1002 U 0018,1004 X 0018,1005 X 0018,1007 X 0018,1008 X
0018,1012 X 0018,1014 X 0018,1030 X 0018,1200 X 0018,1201 X 0018,1400 X 0018,4000 X
0018,700A X 0018,9424 X 0018,A003 X
0020,0010 Z 0020,3401 X 0020,3404 X 0020,3406 X 0020,4000 X 0020,9158 X
0028,4000 X
0032,0012 X 0032,1020 X 0032,1021 X 0032,1030 X 0032,1032 X 0032,1033 X 0032,1060 Z
0032,1070 X 0032,4000 X
0038,0010 X 0038,0011 X 0038,001E X 0038,0020 X 0038,0021 X 0038,0040 X 0038,0050 X
0038,0060 X 0038,0061 X 0038,0062 X 0038,0300 X 0038,0400 X 0038,0500 X 0038,1234 X
0038,4000 X
0040,0001 X 0040,0002 X 0040,0003 X 0040,0004 X 0040,0005 X 0040,0006 X 0040,0007 X
0040,000B X 0040,0010 X 0040,0011 X 0040,0012 X 0040,0241 X 0040,0242 X 0040,0243 X
0040,0244 X 0040,0245 X 0040,0248 X 0040,0253 X 0040,0254 X 0040,0275 X 0040,0280 X
0040,0555 X 0040,1001 X 0040,1004 X 0040,1005 X 0040,1010 X 0040,1011 X 0040,1101 D
0040,1102 X 0040,1103 X 0040,1400 X 0040,2001 X 0040,2004 X 0040,2005 X 0040,2008 X
0040,2009 X 0040,2010 X 0040,2016 Z 0040,2017 Z 0040,2400 X 0040,3001 X 0040,4025 X
0040,4027 X 0040,4030 X 0040,4034 X 0040,4035 X 0040,4036 X 0040,4037 X 0040,A027 X
0040,A030 D 0040,A073 D 0040,A075 D 0040,A078 X 0040,A07A X 0040,A07C X 0040,A088 Z
0040,A123 D 0040,A730 X
0070,0001 D 0070,0084 Z 0070,0086 X
0088,0200 X 0088,0904 X 0088,0906 X 0088,0910 X 0088,0912 X
0400,0100 X 0400,0402 X 0400,0403 X 0400,0404 X 0400,0550 X 0400,0561 X
2030,0020 X 300E,0008 Z
4000,0010 X 4000,4000 X
4008,0042 X 4008,0102 X 4008,010A X 4008,010B X 4008,010C X 4008,0111 X 4008,0114 X
4008,0115 X 4008,0118 X 4008,0119 X 4008,011A X 4008,0202 X 4008,0300 X 4008,4000 X
FFFA,FFFA X 0000,1000 X
"""


def _parse_table(text: str) -> dict[int, str]:
    words = text.split()
    out: dict[int, str] = {}
    for tag, action in zip(words[::2], words[1::2], strict=True):
        group, elem = tag.split(",")
        if action != "U":  # UIDs are handled by VR
            out[(int(group, 16) << 16) | int(elem, 16)] = action
    return out


DICOM_ACTIONS: dict[int, str] = _parse_table(_TABLE)

_META_KEEP = {
    "FileMetaInformationGroupLength",
    "FileMetaInformationVersion",
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
    "TransferSyntaxUID",
    "ImplementationClassUID",
    "ImplementationVersionName",
}
_DUMMY = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM"}
_TEXT_VRS |= {"UC", "UR", "UT", "UI"}
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class UidMap:
    """Old UID -> new UID (``2.25.<random>``), the same new UID for the same old one.

    One map per release keeps a series one series (and its frame of reference, and the
    references between instances) while nothing links a new UID to the old one.
    """

    def __init__(self) -> None:
        self._map: dict[str, str] = {}

    def __call__(self, old: str) -> str:
        old = str(old).strip()
        if not old or old.startswith(_DICOM_ROOT):
            return old
        new = self._map.get(old)
        if new is None:
            from pydicom.uid import generate_uid

            new = self._map[old] = str(generate_uid(prefix=None))
        return new

    def __len__(self) -> int:
        return len(self._map)


# --------------------------------------------------------------------------- DICOM
def _keyword(tag: Any) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes, list, tuple)) or hasattr(value, "__len__"):
        try:
            return len(value) == 0
        except TypeError:
            return False
    return False


def _deid_dataset(ds: Any, uids: UidMap, removed: set[str]) -> None:
    """Apply the profile to ``ds`` in place (and to the items of its sequences)."""
    from pydicom.multival import MultiValue

    for tag in list(ds.keys()):
        elem = ds[tag]
        group = tag.group
        if tag.is_private:
            del ds[tag]
            removed.add("dicom:private-tags")
            continue
        if group % 2 == 0 and 0x5000 <= group <= 0x501E:
            del ds[tag]
            removed.add("dicom:curves")
            continue
        if group % 2 == 0 and 0x6000 <= group <= 0x601E:
            del ds[tag]
            removed.add("dicom:overlays")
            continue
        action = DICOM_ACTIONS.get(int(tag))
        name = f"dicom:{_keyword(tag)}"
        if action == "X":
            del ds[tag]
            removed.add(name)
        elif action == "Z":
            if not _is_empty(elem.value):
                removed.add(name)
            elem.value = [] if elem.VR == "SQ" else None
        elif action == "D":
            if not _is_empty(elem.value):
                removed.add(name)
            if elem.VR == "SQ":
                elem.value = []
            elif elem.VR in _DUMMY:
                elem.value = _DUMMY[elem.VR]
            elif elem.VR in _TEXT_VRS:
                elem.value = "ANONYMIZED"
            else:
                del ds[tag]
        elif elem.VR == "UI" and not _is_empty(elem.value):
            if isinstance(elem.value, MultiValue):
                new = [uids(v) for v in elem.value]
                changed = new != [str(v) for v in elem.value]
            else:
                new = uids(elem.value)
                changed = new != str(elem.value)
            if changed:
                elem.value = new
                removed.add("dicom:uids-replaced")
        elif elem.VR == "SQ":
            for item in elem.value or []:
                _deid_dataset(item, uids, removed)


def _mark_deidentified(ds: Any, removed: set[str]) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from medmem import __version__

    ds.PatientIdentityRemoved = "YES"
    method = f"{PROFILE_CODE[2]}; medmem {__version__}"
    ds.DeidentificationMethod = method[:64]  # LO: at most 64 characters
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    if any(r.endswith(("Date", "Time", "DateTime")) for r in removed):
        ds.LongitudinalTemporalInformationModified = "REMOVED"


def _pixel_bytes(ds: Any) -> dict[int, bytes]:
    out = {}
    for tag in _PIXEL_TAGS:
        if tag in ds:
            value = ds[tag].value
            out[tag] = bytes(value) if value is not None else b""
    return out


def _dcmread(path: Path, **kw: Any) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(str(path), **kw)
    except pydicom.errors.InvalidDicomError:
        return pydicom.dcmread(str(path), force=True, **kw)


def deidentify_dicom(src: Path, dst: Path, uids: UidMap | None = None) -> list[str]:
    """Write ``src`` (a DICOM file) de-identified to ``dst``; return what was removed."""
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    from medmem import __version__

    uids = UidMap() if uids is None else uids
    try:
        ds = _dcmread(src)
    except Exception as exc:
        raise InputError(f"{src}: cannot be read as DICOM for de-identification ({exc}).") from exc
    pixels = _pixel_bytes(ds)
    removed: set[str] = set()
    _deid_dataset(ds, uids, removed)
    _mark_deidentified(ds, removed)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and len(meta):
        for tag in list(meta.keys()):
            kw = _keyword(tag)
            if kw not in _META_KEEP:
                del meta[tag]
                removed.add(f"dicom:{kw}")
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = uids(meta.MediaStorageSOPInstanceUID)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"MEDMEM_{__version__}"[:16]
    preamble = getattr(ds, "preamble", None)
    if preamble is not None:
        if any(preamble):
            removed.add("dicom:preamble")
        ds.preamble = b"\x00" * 128
    dst.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    ds.save_as(buf)
    atomic_write_bytes(dst, buf.getvalue())
    back = _dcmread(dst)
    if _pixel_bytes(back) != pixels:
        raise InputError(f"{src}: the pixel data changed while de-identifying; not released.")
    return sorted(removed)


def dicom_text(path: Path) -> list[tuple[str, str]]:
    """Every text value of a DICOM header (all depths, private attributes and file meta
    included) as ``(dicom:Keyword, value)``; pixel data are not read."""
    from pydicom.multival import MultiValue

    ds = _dcmread(path, stop_before_pixels=True)
    out: list[tuple[str, str]] = []

    def visit(dataset: Any) -> None:
        for elem in dataset:
            name = f"dicom:{'private' if elem.tag.is_private else _keyword(elem.tag)}"
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
                continue
            value = elem.value
            if isinstance(value, bytes):
                if elem.tag.is_private or elem.VR in ("UN", "OB", "UT"):
                    out.append((name, value.decode("latin-1")))
                continue
            if elem.VR not in _TEXT_VRS or elem.VR == "UI" or value is None:
                continue  # UIDs are replaced; digits in them would match numeric ids
            values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
            for v in values:
                text = str(v).strip()
                if text:
                    out.append((name, text))

    visit(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        visit(meta)
    return out


# --------------------------------------------------------------------------- PNG
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_KEEP = {b"IHDR", b"PLTE", b"tRNS"}
_PNG_KINDS = {
    b"tEXt": "png:text-chunks",
    b"zTXt": "png:text-chunks",
    b"iTXt": "png:text-chunks",
    b"eXIf": "png:exif",
    b"iCCP": "png:icc-profile",
    b"tIME": "png:time",
    b"pHYs": "png:physical-size",
    b"gAMA": "png:colour-info",
    b"cHRM": "png:colour-info",
    b"sRGB": "png:colour-info",
    b"sBIT": "png:colour-info",
    b"cICP": "png:colour-info",
    b"mDCV": "png:colour-info",
    b"cLLI": "png:colour-info",
    b"acTL": "png:animation",
    b"fcTL": "png:animation",
    b"fdAT": "png:animation",
}


def _png_chunks(path: Path, data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(type, payload) of each chunk up to IEND, and the bytes after IEND."""
    if not data.startswith(_PNG_SIG):
        raise InputError(f"{path}: not a PNG file (no PNG signature).")
    chunks, i = [], len(_PNG_SIG)
    while True:
        if i + 8 > len(data):
            raise InputError(f"{path}: truncated PNG file (no IEND chunk).")
        (length,) = struct.unpack(">I", data[i : i + 4])
        ctype = data[i + 4 : i + 8]
        if i + 12 + length > len(data):
            raise InputError(f"{path}: truncated PNG file (chunk {ctype!r} cut off).")
        chunks.append((ctype, data[i + 8 : i + 8 + length]))
        i += 12 + length
        if ctype == b"IEND":
            return chunks, data[i:]


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(ctype + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", crc)


def _pil_pixels(path: Path | io.BytesIO) -> tuple[str, tuple[int, int], np.ndarray]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.mode, im.size, np.asarray(im).copy()


def _same_pil_pixels(src: Path, dst: Path) -> None:
    a, b = _pil_pixels(src), _pil_pixels(dst)
    if a[0] != b[0] or a[1] != b[1] or not np.array_equal(a[2], b[2]):
        raise InputError(f"{src}: the pixels changed while de-identifying; not released.")


def deidentify_png(src: Path, dst: Path) -> list[str]:
    """Write ``src`` (PNG) to ``dst`` with IHDR, PLTE, tRNS and the image data only."""
    data = src.read_bytes()
    chunks, trailing = _png_chunks(src, data)
    removed: set[str] = set()
    head: list[bytes] = []
    idat: list[bytes] = []
    for ctype, payload in chunks:
        if ctype in _PNG_KEEP:
            head.append(_png_chunk(ctype, payload))
        elif ctype == b"IDAT":
            idat.append(payload)
        elif ctype != b"IEND":
            removed.add(_PNG_KINDS.get(ctype, f"png:{ctype.decode('latin-1')}"))
    if trailing:
        removed.add("png:trailing-data")
    dec = zlib.decompressobj()
    try:
        raw = dec.decompress(b"".join(idat))
    except zlib.error as exc:
        raise InputError(f"{src}: corrupt PNG image data ({exc}).") from exc
    if not dec.eof:
        raise InputError(f"{src}: truncated PNG image data.")
    if dec.unused_data:
        removed.add("png:hidden-data")
    body = _PNG_SIG + b"".join(head)
    body += _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b"")
    atomic_write_bytes(dst, body)
    _same_pil_pixels(src, dst)
    return sorted(removed)


def png_text(path: Path) -> list[tuple[str, str]]:
    """Text of a PNG's ancillary chunks: text chunks (decompressed), EXIF, ICC profile,
    private chunks, as ``(png:chunk:key, value)``."""
    chunks, trailing = _png_chunks(path, path.read_bytes())
    out: list[tuple[str, str]] = []
    for ctype, payload in chunks:
        kind = ctype.decode("latin-1")
        try:
            if ctype == b"tEXt":
                key, _, value = payload.partition(b"\0")
                out.append((f"png:tEXt:{key.decode('latin-1')}", value.decode("latin-1")))
            elif ctype == b"zTXt":
                key, _, rest = payload.partition(b"\0")
                text = zlib.decompress(rest[1:]).decode("latin-1")
                out.append((f"png:zTXt:{key.decode('latin-1')}", text))
            elif ctype == b"iTXt":
                key, _, rest = payload.partition(b"\0")
                flag, _method, rest = rest[0], rest[1], rest[2:]
                lang, _, rest = rest.partition(b"\0")
                translated, _, text = rest.partition(b"\0")
                if flag:
                    text = zlib.decompress(text)
                name = f"png:iTXt:{key.decode('latin-1')}"
                out.append((name, translated.decode("utf-8", "replace")))
                out.append((name, text.decode("utf-8", "replace")))
            elif ctype == b"iCCP":
                name, _, rest = payload.partition(b"\0")
                out.append(("png:iCCP", name.decode("latin-1")))
                out.append(("png:iCCP", zlib.decompress(rest[1:]).decode("latin-1")))
            elif ctype not in _PNG_KEEP and ctype not in (b"IDAT", b"IEND"):
                out.append((f"png:{kind}", payload.decode("latin-1")))
        except (zlib.error, IndexError):
            out.append((f"png:{kind}", payload.decode("latin-1")))
    if trailing:
        out.append(("png:trailing-data", trailing.decode("latin-1")))
    return [(k, v) for k, v in out if v.strip()]


# --------------------------------------------------------------------------- JPEG
def _jpeg_segments(path: Path, data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(marker, whole segment bytes) from SOI to EOI (scan data with its SOS), and the bytes
    after EOI."""
    if not data.startswith(b"\xff\xd8"):
        raise InputError(f"{path}: not a JPEG file (no start-of-image marker).")
    out: list[tuple[int, bytes]] = [(0xD8, b"\xff\xd8")]
    i, n = 2, len(data)
    while True:
        while i + 1 < n and data[i] == 0xFF and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 1 >= n or data[i] != 0xFF:
            raise InputError(f"{path}: truncated or corrupt JPEG file (no end-of-image marker).")
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((0xD9, b"\xff\xd9"))
            return out, data[i + 2 :]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            out.append((marker, data[i : i + 2]))
            i += 2
            continue
        if i + 4 > n:
            raise InputError(f"{path}: truncated JPEG file.")
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        end = i + 2 + length
        if end > n:
            raise InputError(f"{path}: truncated JPEG file.")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            j = end
            while j + 1 < n:
                if data[j] == 0xFF and data[j + 1] != 0x00 and not 0xD0 <= data[j + 1] <= 0xD7:
                    break
                j += 1
            else:
                raise InputError(f"{path}: truncated JPEG file (scan data cut off).")
            end = j
        out.append((marker, data[i:end]))
        i = end


def _jpeg_kind(marker: int, payload: bytes) -> str:
    if marker == 0xFE:
        return "jpeg:comment"
    if marker == 0xE1 and payload.startswith(b"Exif"):
        return "jpeg:exif"
    if marker == 0xE1 and b"ns.adobe.com/xap" in payload[:64]:
        return "jpeg:xmp"
    if marker == 0xE2 and payload.startswith(b"ICC_PROFILE"):
        return "jpeg:icc-profile"
    if marker == 0xED:
        return "jpeg:iptc"
    return f"jpeg:app{marker - 0xE0}"


_JFIF = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def deidentify_jpeg(src: Path, dst: Path) -> list[str]:
    """Write ``src`` (JPEG) to ``dst`` without APPn/COM segments and trailing data."""
    segments, trailing = _jpeg_segments(src, src.read_bytes())
    removed: set[str] = set()
    kept: list[bytes] = []
    for marker, seg in segments:
        payload = seg[4:]
        if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
            if len(payload) > 14 and any(payload[12:14]):
                removed.add("jpeg:jfif-thumbnail")
            kept.append(_JFIF)
        elif marker == 0xEE and payload.startswith(b"Adobe"):
            kept.append(seg)  # colour transform flag: needed to decode the colours
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            removed.add(_jpeg_kind(marker, payload) if marker != 0xE0 else "jpeg:app0")
        else:
            kept.append(seg)
    if trailing.strip(b"\x00"):
        removed.add("jpeg:trailing-data")
    atomic_write_bytes(dst, b"".join(kept))
    _same_pil_pixels(src, dst)
    return sorted(removed)


def jpeg_text(path: Path) -> list[tuple[str, str]]:
    """APPn, comment and trailing bytes of a JPEG as text."""
    segments, trailing = _jpeg_segments(path, path.read_bytes())
    out = [
        (_jpeg_kind(m, seg[4:]), seg[4:].decode("latin-1"))
        for m, seg in segments
        if 0xE0 <= m <= 0xEF or m == 0xFE
    ]
    if trailing.strip(b"\x00"):
        out.append(("jpeg:trailing-data", trailing.decode("latin-1")))
    return out


# --------------------------------------------------------------------------- TIFF
_TIFF_STRUCTURE = set(
    """
    NewSubfileType SubfileType ImageWidth ImageLength BitsPerSample Compression
    PhotometricInterpretation FillOrder StripOffsets Orientation SamplesPerPixel
    RowsPerStrip StripByteCounts XResolution YResolution PlanarConfiguration
    ResolutionUnit Predictor ColorMap TileWidth TileLength TileOffsets TileByteCounts
    ExtraSamples SampleFormat SMinSampleValue SMaxSampleValue JPEGTables
    YCbCrSubSampling YCbCrPositioning ReferenceBlackWhite ImageDepth TileDepth
    """.split()
)


def _tiff_tag_kind(tag: Any) -> str:
    if tag.code >= 32768 and str(tag.name) == str(tag.code):
        return "tiff:private-tags"
    return f"tiff:{tag.name}"


def deidentify_tiff(src: Path, dst: Path) -> list[str]:
    """Write the first series of ``src`` (TIFF) to ``dst`` with image structure tags only."""
    import tifffile

    removed: set[str] = set()
    with tifffile.TiffFile(src) as tf:
        series = tf.series[0]
        page = series.pages[0]
        arr = series.asarray()
        if len(tf.series) > 1:
            removed.add("tiff:other-series")
        for p in tf.pages:
            for tag in p.tags.values():
                if tag.name not in _TIFF_STRUCTURE:
                    removed.add(_tiff_tag_kind(tag))
        photometric = page.photometric
        planar = page.planarconfig
        colormap = page.colormap if photometric == tifffile.PHOTOMETRIC.PALETTE else None
        extrasamples = tuple(page.extrasamples) if page.extrasamples else None
    kwargs: dict[str, Any] = dict(
        photometric=photometric,
        planarconfig=planar if page.samplesperpixel > 1 else None,
        colormap=colormap,
        extrasamples=extrasamples,
        software=False,
        description=None,
        datetime=None,
        resolution=None,
    )
    for metadata in (None, {}):  # {}: shape-only description, for more than 3 axes
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, metadata=metadata, **kwargs)
        with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as back:
            again = back.series[0].asarray()
        if again.dtype == arr.dtype and again.shape == arr.shape and np.array_equal(again, arr):
            atomic_write_bytes(dst, buf.getvalue())
            return sorted(removed)
    raise InputError(f"{src}: the pixels changed while de-identifying the TIFF; not released.")


def tiff_text(path: Path) -> list[tuple[str, str]]:
    """Text of a TIFF's non-structural tags (descriptions, EXIF, XMP, private tags...)."""
    import tifffile

    out: list[tuple[str, str]] = []

    def flatten(name: str, value: Any) -> None:
        if isinstance(value, bytes):
            out.append((name, value.decode("latin-1")))
        elif isinstance(value, str):
            out.append((name, value))
        elif isinstance(value, dict):
            for v in value.values():
                flatten(name, v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                flatten(name, v)

    with tifffile.TiffFile(path) as tf:
        for p in tf.pages:
            for tag in p.tags.values():
                if tag.name not in _TIFF_STRUCTURE:
                    flatten(_tiff_tag_kind(tag), tag.value)
    return [(k, v) for k, v in out if v.strip()]


# --------------------------------------------------------------------------- NIfTI
_NIFTI_TEXT = ("descrip", "aux_file", "intent_name", "db_name", "data_type")


def _nifti_parts(path: Path) -> tuple[bytes, Any, set[str]]:
    """(decompressed bytes, header, gzip fields found) of a .nii or .nii.gz file."""
    import nibabel as nib

    data = path.read_bytes()
    found: set[str] = set()
    if data[:2] == b"\x1f\x8b":
        flags = data[3] if len(data) > 3 else 0
        if flags & 0x08:
            found.add("gzip:file-name")
        if flags & 0x10:
            found.add("gzip:comment")
        if flags & 0x04:
            found.add("gzip:extra-field")
        if len(data) >= 8 and any(data[4:8]):
            found.add("gzip:time")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt gzip data ({exc}).") from exc
    size = struct.unpack("<i", data[:4])[0] if len(data) >= 4 else 0
    if size not in (348, 540):
        size = struct.unpack(">i", data[:4])[0] if len(data) >= 4 else 0
    klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
    if klass is None:
        raise InputError(f"{path}: not a NIfTI-1 or NIfTI-2 file.")
    try:
        header = klass.from_fileobj(io.BytesIO(data))
    except Exception as exc:
        raise InputError(f"{path}: unreadable NIfTI header ({exc}).") from exc
    return data, header, found


def deidentify_nifti(src: Path, dst: Path) -> list[str]:
    """Write ``src`` (.nii/.nii.gz) with its text fields emptied and extensions removed."""
    import nibabel as nib

    data, hdr, removed = _nifti_parts(src)
    for field in _NIFTI_TEXT:
        if field in hdr.keys():
            if bytes(hdr[field]).strip(b"\x00 "):
                removed.add(f"nifti:{field}")
            hdr[field] = b""
    old_offset = int(hdr["vox_offset"])
    if len(hdr.extensions):
        removed.add("nifti:extensions")
        hdr.extensions.clear()
    dims = hdr["dim"][1 : int(hdr["dim"][0]) + 1]
    nbytes = int(np.prod([int(d) for d in dims])) * int(hdr["bitpix"]) // 8
    voxels = data[old_offset : old_offset + nbytes]
    if len(voxels) < nbytes:
        raise InputError(f"{src}: truncated NIfTI file ({len(voxels)} of {nbytes} voxel bytes).")
    if data[old_offset + nbytes :]:
        removed.add("nifti:trailing-data")
    hdr["vox_offset"] = 0  # the smallest offset (no extensions)
    buf = io.BytesIO()
    hdr.write_to(buf)
    new_offset = int(hdr["vox_offset"])
    buf.write(b"\x00" * (new_offset - buf.tell()))
    buf.write(voxels)
    body = buf.getvalue()
    if src.name.lower().endswith(".gz"):
        out = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
            gz.write(body)
        body = out.getvalue()
    atomic_write_bytes(dst, body)
    a, b = nib.load(str(src)), nib.load(str(dst))
    same = (
        np.array_equal(a.affine, b.affine)
        and a.header.get_data_dtype() == b.header.get_data_dtype()
        and a.shape == b.shape
        and np.asanyarray(a.dataobj.get_unscaled()).tobytes()
        == np.asanyarray(b.dataobj.get_unscaled()).tobytes()
        and [float(x) for x in a.header.get_slope_inter() if x is not None]
        == [float(x) for x in b.header.get_slope_inter() if x is not None]
    )
    if not same:
        raise InputError(f"{src}: the image changed while de-identifying the NIfTI; not released.")
    return sorted(removed)


def nifti_text(path: Path) -> list[tuple[str, str]]:
    """The NIfTI header's text fields and extension contents."""
    _, hdr, _ = _nifti_parts(path)
    out = [
        (f"nifti:{f}", bytes(hdr[f]).decode("latin-1").strip("\x00 "))
        for f in _NIFTI_TEXT
        if f in hdr.keys()
    ]
    for ext in hdr.extensions:
        content = ext.get_content()
        text = content if isinstance(content, str) else None
        if text is None:
            raw = getattr(ext, "_raw_content", None)
            if raw is None:
                raw = content if isinstance(content, bytes) else str(content).encode()
            text = bytes(raw).decode("latin-1")
        out.append(("nifti:extensions", text))
    return [(k, v) for k, v in out if v.strip()]


# --------------------------------------------------------------------------- NumPy
def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(
            f"{path}: holds Python objects (pickled); an image must be a numeric array."
        ) from exc


def deidentify_npy(src: Path, dst: Path) -> list[str]:
    """Write the array of ``src`` (.npy) again: no pickle, nothing after the array."""
    arr = _load_npy(src)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{src}: holds values of dtype {arr.dtype}; not an image.")
    removed = []
    fmt = np.lib.format
    with open(src, "rb") as fh:
        version = fmt.read_magic(fh)
        (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
        start = fh.tell()
    if src.stat().st_size > start + arr.nbytes:
        removed.append("npy:trailing-data")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(dst, buf.getvalue())
    back = np.load(dst, allow_pickle=False)
    if back.dtype != arr.dtype or not np.array_equal(back, arr, equal_nan=True):
        raise InputError(f"{src}: the array changed while writing it again; not released.")
    return removed


def deidentify_npz(src: Path, dst: Path) -> list[str]:
    """Write the numeric arrays of ``src`` (.npz) again; drop other members."""
    removed: set[str] = set()
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(src) as zf:
        compressed = any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())
        if zf.comment:
            removed.add("npz:zip-comment")
        names = zf.namelist()
    for name in names:
        if not name.endswith(".npy"):
            removed.add("npz:other-files")
            continue
        with zipfile.ZipFile(src) as zf, zf.open(name) as fh:
            try:
                arr = np.lib.format.read_array(io.BytesIO(fh.read()), allow_pickle=False)
            except ValueError:
                removed.add("npz:object-arrays")
                continue
        if arr.dtype.kind not in "biufc":
            removed.add("npz:non-numeric-arrays")
            continue
        arrays[name[: -len(".npy")]] = arr
    if not arrays:
        raise InputError(f"{src}: holds no numeric array; not an image.")
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    atomic_write_bytes(dst, buf.getvalue())
    with np.load(dst, allow_pickle=False) as back:
        same = set(back.files) == set(arrays) and all(
            back[k].dtype == v.dtype and np.array_equal(back[k], v, equal_nan=True)
            for k, v in arrays.items()
        )
    if not same:
        raise InputError(f"{src}: the arrays changed while writing them again; not released.")
    return sorted(removed)


def npz_text(path: Path) -> list[tuple[str, str]]:
    """Member names and the contents of non-numeric arrays of an .npz file."""
    out: list[tuple[str, str]] = []
    with zipfile.ZipFile(path) as zf:
        if zf.comment:
            out.append(("npz:zip-comment", zf.comment.decode("latin-1")))
        for name in zf.namelist():
            out.append(("npz:member-name", name))
            with zf.open(name) as fh:
                raw = fh.read()
            if not name.endswith(".npy"):
                out.append(("npz:other-files", raw.decode("latin-1")))
                continue
            try:
                arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            except ValueError:
                out.append(("npz:object-arrays", raw.decode("latin-1")))
                continue
            if arr.dtype.kind in "USM":
                out.extend(("npz:non-numeric-arrays", str(v)) for v in arr.ravel())
    return [(k, v) for k, v in out if v.strip()]


# --------------------------------------------------------------------------- dispatch
_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".dcm": "DICOM",
    ".dicom": "DICOM",
    ".ima": "DICOM",
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".npy": "NPY",
    ".npz": "NPZ",
}


def _format(path: Path) -> str | None:
    """The format of a file as medmem's readers see it (by suffix; DICOM also by its
    preamble when there is no suffix). Private helpers import no stage, so this mirrors
    ``medmem.data._readers.format_of`` for files."""
    name = path.name.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    if suffix == "" and path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return "DICOM"
    return None


def deidentify_file(src: Path, dst: Path, *, uids: UidMap | None = None) -> list[str]:
    """Write ``src`` de-identified to ``dst`` in its own format; return the kinds of things
    removed (e.g. ``dicom:PatientName``, ``png:text-chunks``), sorted.

    ``uids``: the UID map shared by the files of a release (DICOM), so that files of one
    series keep one new SeriesInstanceUID.
    """
    src, dst = Path(src), Path(dst)
    fmt = _format(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "DICOM":
        return _guarded(deidentify_dicom, src, dst, uids)
    writers: dict[str, Callable[[Path, Path], list[str]]] = {
        "PNG": deidentify_png,
        "JPEG": deidentify_jpeg,
        "TIFF": deidentify_tiff,
        "NIfTI": deidentify_nifti,
        "NPY": deidentify_npy,
        "NPZ": deidentify_npz,
    }
    if fmt not in writers:
        raise InputError(f"{src}: no de-identification for this file type ({fmt or 'unknown'}).")
    return _guarded(writers[fmt], src, dst)


def _guarded(writer: Callable[..., list[str]], src: Path, *args: Any) -> list[str]:
    """Run a writer; an unexpected failure becomes an InputError naming the file."""
    try:
        return writer(src, *args)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{src}: cannot be de-identified ({type(exc).__name__}: {exc}); it is not "
            "released. Re-export the file, or remove it from the synthetic set and audit again."
        ) from exc


def deidentify_series(
    files: Iterable[Path], dsts: Iterable[Path], *, uids: UidMap | None = None
) -> list[str]:
    """De-identify the DICOM files of a series (``files[k]`` -> ``dsts[k]``) with one UID
    map, so that the slices keep one new SeriesInstanceUID; return the kinds removed."""
    uids = UidMap() if uids is None else uids
    removed: set[str] = set()
    for src, dst in zip(files, dsts, strict=True):
        removed.update(deidentify_file(Path(src), Path(dst), uids=uids))
    return sorted(removed)


def metadata_text(path: Path) -> list[tuple[str, str]]:
    """Every text value in a file's metadata (headers, text chunks, tags, extensions) as
    ``(field, value)``: what can name a patient apart from the pixels."""
    path = Path(path)
    fmt = _format(path)
    readers: dict[str, Callable[[Path], list[tuple[str, str]]]] = {
        "DICOM": dicom_text,
        "PNG": png_text,
        "JPEG": jpeg_text,
        "TIFF": tiff_text,
        "NIfTI": nifti_text,
        "NPZ": npz_text,
    }
    reader = readers.get(fmt or "")
    if reader is None:
        return []
    try:
        return reader(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read its metadata ({exc}).") from exc


__all__ = [
    "DICOM_ACTIONS",
    "PROFILE_CODE",
    "PROFILE_NAME",
    "UidMap",
    "deidentify_file",
    "deidentify_series",
    "metadata_text",
]
