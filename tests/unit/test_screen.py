"""medmem.screen: the release set holds no copy and nothing that names a training image or
patient; files are written de-identified (medmem._deid), in their own formats, with the
pixels of the synthetic files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner

import medmem
from medmem import InputError, OutputExistsError
from medmem._deid import DICOM_ACTIONS, deidentify_file, deidentify_series, metadata_text
from medmem.cli import main
from medmem.data import load_dataset, read_image, write_phantoms
from medmem.screen import MANIFEST_COLUMNS, screen


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def audited(tmp_path_factory, pixel_detector) -> Path:
    """A saved 2D audit: training PNGs with patient ids (manifest), PNG validation, and a
    synthetic folder of novel NumPy phantoms, byte copies of training images, a novel image
    whose *name* holds a training id, and a novel DICOM whose *header* holds a training
    patient's PatientID."""
    root = tmp_path_factory.mktemp("screen")
    train_manifest = write_phantoms(root / "train", n_patients=12, follow_ups=2, size=32)
    write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    syn = root / "syn"
    write_phantoms(syn, n_patients=8, size=32, fmt="npy", first_patient=200)
    (syn / "manifest.csv").unlink()
    for name in ("P0000_00.png", "P0001_01.png", "P0004_00.png"):
        shutil.copy(root / "train" / name, syn / f"copy_{name}")
    (syn / "P0204_00.npy").rename(syn / "sample_P0003_00.npy")  # novel (corr far below tau)
    write_phantoms(root / "dcm", n_patients=1, size=32, fmt="dcm", first_patient=3, seed=9)
    shutil.copy(root / "dcm" / "P0003_00.dcm", syn / "dicom_sample.dcm")
    train = load_dataset(train_manifest, image_size=(32, 32), quiet=True)
    val = load_dataset(root / "val", image_size=(32, 32), quiet=True)
    synthetic = load_dataset(str(syn), image_size=(32, 32), quiet=True)
    # the embedding score: with pixel "embeddings" of these look-alike phantoms it catches
    # the controls above the sensitivity floor (this module tests screening, not scores)
    result = medmem.audit(
        train,
        val,
        synthetic,
        detector=pixel_detector,
        n_bootstrap=50,
        quiet=True,
        score="embedding",
    )
    result.save(root / "audit")
    return root


def training_identifiers(root: Path) -> list[str]:
    t = pd.read_csv(root / "audit" / "training.csv", dtype=str, keep_default_na=False)
    s = json.loads((root / "audit" / "summary.json").read_text())
    ids = list(t["train_id"]) + list(t["patient_id"])
    ids += [str((root / "train" / i).resolve()) for i in t["train_id"]]
    ids += [Path(i).stem for i in t["train_id"]]
    ids.append(s["sources"]["training"])
    assert all(len(i) >= 5 for i in ids)
    return sorted(set(ids))


def test_release_has_no_copies_and_no_training_identifiers(audited, tmp_path) -> None:
    out = tmp_path / "release"
    # dicom_sample.dcm carries a training patient's PatientID: refused by default...
    with pytest.raises(
        InputError, match=r"identify a training.*dicom_sample.dcm.*--drop-identifying"
    ):
        screen(audited / "audit", out, quiet=True)
    assert not out.exists()
    # ... or left out and counted
    r = screen(audited / "audit", out, quiet=True, drop_identifying=True)
    syn = pd.read_csv(audited / "audit" / "synthetic.csv")
    tau = json.loads((audited / "audit" / "summary.json").read_text())["tau"]
    copies = set(syn.loc[syn["copy"], "synthetic_id"])
    assert copies >= {"copy_P0000_00.png", "copy_P0001_01.png", "copy_P0004_00.png"}
    assert r.n_copies == len(copies) and not copies & set(r.released)
    assert r.withheld_identifier == ["dicom_sample.dcm"]  # training PatientID in its header
    expected = set(syn.loc[~syn["copy"], "synthetic_id"]) - {"dicom_sample.dcm"}
    assert set(r.released) == expected and r.n_released == len(expected)

    manifest = pd.read_csv(out / "release_manifest.csv")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert (manifest["nearest_train_corr"] < tau).all() and (manifest["tau"] == tau).all()
    assert manifest["audit_fingerprint"].nunique() == 1
    assert manifest["audit_fingerprint"][0] == sha(audited / "audit" / "summary.json")
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(
        [*manifest["file"], "README.txt", "release_manifest.csv"]
    )
    # the synthetic files' pixels, bit for bit; the training-named one renamed
    assert r.renamed == {"sample_P0003_00.npy": "synthetic_00001.npy"}
    back = {v: k for k, v in r.renamed.items()}
    for f in manifest["file"]:
        src = np.load(audited / "syn" / back.get(f, f), allow_pickle=False)
        released = np.load(out / f, allow_pickle=False)
        assert released.dtype == src.dtype and np.array_equal(released, src)
    assert manifest.set_index("file").loc["synthetic_00001.npy", "renamed"]
    assert manifest["removed"].isna().all()  # NumPy arrays: nothing to remove
    assert "de-identified" in (out / "README.txt").read_text()
    # no copy's bytes, no training image's bytes
    banned = {sha(audited / "syn" / c) for c in copies} | {
        sha(p) for p in (audited / "train").glob("*.png")
    }
    assert not banned & {sha(p) for p in written}
    # no training id, patient id or training path anywhere, in any byte
    for p in written:
        data = p.read_bytes()
        for ident in training_identifiers(audited):
            assert ident.encode() not in data, (p.name, ident)
    assert "nearest_train_id" not in (out / "release_manifest.csv").read_text()


def test_margin_withholds_more(audited, tmp_path) -> None:
    base = screen(audited / "audit", tmp_path / "a", quiet=True, drop_identifying=True)
    syn = pd.read_csv(audited / "audit" / "synthetic.csv")
    tau = json.loads((audited / "audit" / "summary.json").read_text())["tau"]
    novel = np.sort(syn.loc[~syn["copy"], "nearest_train_corr"].to_numpy())
    margin = float(tau - np.median(novel)) + 1e-9
    wide = screen(
        audited / "audit", tmp_path / "b", margin=margin, quiet=True, drop_identifying=True
    )
    assert wide.n_released < base.n_released and wide.n_margin > 0
    # the margin is written with repr(): Python's float() reads it back exactly (a pandas
    # parser can be 1 ulp off: seen with another pandas on another machine)
    kept = pd.read_csv(tmp_path / "b" / "release_manifest.csv", dtype={"margin": str})
    assert (kept["nearest_train_corr"] < tau - margin).all()
    assert all(float(m) == margin for m in kept["margin"])
    with pytest.raises(InputError, match="margin must be in"):
        screen(audited / "audit", tmp_path / "c", margin=-0.1)


def test_changed_synthetic_set_is_refused(audited, tmp_path) -> None:
    changed = tmp_path / "syn"
    shutil.copytree(audited / "syn", changed)
    arr = np.load(changed / "P0200_00.npy")
    np.save(changed / "P0200_00.npy", arr[::-1].copy())  # same name, other content
    with pytest.raises(InputError, match="not the synthetic images that were audited"):
        screen(audited / "audit", tmp_path / "out", synthetic=str(changed), quiet=True)
    renamed = tmp_path / "syn2"
    shutil.copytree(audited / "syn", renamed)
    (renamed / "P0200_00.npy").rename(renamed / "P0200_00_b.npy")
    with pytest.raises(InputError, match="names do not"):
        screen(audited / "audit", tmp_path / "out", synthetic=str(renamed), quiet=True)
    assert not (tmp_path / "out").exists()
    # the same images elsewhere are accepted
    moved = tmp_path / "syn3"
    shutil.copytree(audited / "syn", moved)
    r = screen(
        audited / "audit", tmp_path / "ok", synthetic=str(moved), quiet=True, drop_identifying=True
    )
    assert r.n_released > 0


def test_existing_output_is_refused_without_overwrite(audited, tmp_path) -> None:
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        screen(audited / "audit", out)
    assert (out / "keep.txt").read_text() == "mine"
    screen(audited / "audit", out, overwrite=True, quiet=True, drop_identifying=True)
    assert not (out / "keep.txt").exists() and (out / "release_manifest.csv").exists()
    with pytest.raises(InputError, match="lies inside the input .*outside every input"):
        screen(audited / "audit", audited / "audit" / "release")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an audit folder"):
        screen(tmp_path / "empty", tmp_path / "x")


def test_screen_cli(audited, tmp_path) -> None:
    out = tmp_path / "release"
    args = ["--quiet", "screen", "--audit", str(audited / "audit"), "--out", str(out)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--drop-identifying" in refused.output
    assert not out.exists()
    args.append("--drop-identifying")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "released" in r.output and "withheld" in r.output
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 2 and "exists" in r2.output


def test_dicom_series_are_released_as_folders(tmp_path, pixel_detector) -> None:
    """3D: DICOM series folders in, the same folders out: slices de-identified, pixel data
    bit for bit, one new SeriesInstanceUID per series."""
    train = write_phantoms(tmp_path / "train", n_patients=6, spatial_dims=3, size=16, fmt="npy")
    write_phantoms(
        tmp_path / "val", n_patients=6, spatial_dims=3, size=16, fmt="npy", first_patient=50
    )
    syn = tmp_path / "syn"
    # patients 60-62: two of them fall below tau with pixel correlations
    write_phantoms(syn, n_patients=3, spatial_dims=3, size=16, fmt="dcm", first_patient=60)
    (syn / "manifest.csv").unlink()
    shutil.copy(tmp_path / "train" / "P0001_00.npy", syn / "copied.npy")
    sets = [
        load_dataset(p, image_size=(16, 16, 16), quiet=True)
        for p in (train, tmp_path / "val", str(syn))
    ]
    result = medmem.audit(*sets, detector=pixel_detector, percentile=80, n_bootstrap=0)
    result.save(tmp_path / "audit")
    r = screen(tmp_path / "audit", tmp_path / "release", quiet=True)
    assert "copied.npy" not in r.released and r.n_copies >= 1
    manifest = pd.read_csv(tmp_path / "release" / "release_manifest.csv")
    series = [f for f in manifest["file"] if f.endswith("/")]
    assert series, manifest
    new_series = set()
    for folder in series:
        src = sorted((syn / folder).iterdir())
        dst = sorted((tmp_path / "release" / folder).iterdir())
        assert [p.name for p in dst] == [p.name for p in src] and len(src) == 16
        a = [pydicom.dcmread(p) for p in src]
        b = [pydicom.dcmread(p) for p in dst]
        assert [x.PixelData for x in b] == [x.PixelData for x in a]
        assert len({x.SeriesInstanceUID for x in b}) == 1
        assert b[0].SeriesInstanceUID != a[0].SeriesInstanceUID
        assert len({x.SOPInstanceUID for x in b}) == 16
        assert not {x.SOPInstanceUID for x in b} & {x.SOPInstanceUID for x in a}
        assert all(not x.PatientID and not x.PatientName for x in b)
        assert all(x.PatientIdentityRemoved == "YES" for x in b)
        new_series.add(b[0].SeriesInstanceUID)
        np.testing.assert_array_equal(
            read_image(tmp_path / "release" / folder), read_image(syn / folder)
        )
    assert len(new_series) == len(series)
    removed = manifest.set_index("file").loc[series[0], "removed"].split(";")
    assert {"dicom:PatientID", "dicom:PatientName", "dicom:uids-replaced"} <= set(removed)


# ---------------------------------------------------------------------------- de-identification
# A training-like DICOM header: every value names a (fictitious) patient, hospital or person.
FULL_HEADER = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "MRN-448812",
    "PatientBirthDate": "19580214",
    "PatientBirthTime": "083000",
    "PatientSex": "F",
    "PatientAge": "066Y",
    "PatientWeight": "71",
    "PatientAddress": "12 Elm Street Springfield",
    "PatientTelephoneNumbers": "555-0100",
    "OtherPatientIDs": "HOSP-99-1234",
    "OtherPatientNames": "SMITH^JANE",
    "AccessionNumber": "ACC20240117",
    "InstitutionName": "St Elsewhere Hospital",
    "InstitutionAddress": "1 Hospital Road",
    "InstitutionalDepartmentName": "Radiology East",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PerformingPhysicianName": "WILSON^JAMES",
    "OperatorsName": "TECH^ANNA",
    "StudyID": "S4471",
    "StudyDate": "20240117",
    "StudyTime": "101500",
    "SeriesDate": "20240117",
    "SeriesTime": "101600",
    "AcquisitionDate": "20240117",
    "AcquisitionTime": "101700",
    "ContentDate": "20240117",
    "ContentTime": "101800",
    "DeviceSerialNumber": "SN-88123",
    "StationName": "CTROOM2",
    "StudyDescription": "CHEST CT JANE DOE",
    "SeriesDescription": "AXIAL JANE DOE",
    "ImageComments": "follow-up of JANE DOE",
}
# values that must not occur anywhere in a released file
FULL_HEADER_VALUES = [
    "DOE^JANE", "MRN-448812", "19580214", "Elm Street", "555-0100", "HOSP-99-1234",
    "SMITH^JANE", "ACC20240117", "Elsewhere", "Hospital Road", "Radiology East", "HOUSE^",
    "WILSON^", "TECH^ANNA", "S4471", "20240117", "SN-88123", "CTROOM2", "JANE DOE",
    "ACME secret",
]  # fmt: skip


def write_full_header_dicom(
    path: Path, pixels: np.ndarray, *, uids: dict[str, str], instance: int = 1
) -> None:
    """A CT slice whose header holds FULL_HEADER, UIDs, private attributes (top level and in
    a sequence), a sequence with a nested PatientName, overlays, and a non-zero preamble."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "ELSEWHERE_PACS"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"ACME secret".ljust(128, b"\0")
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    for key, value in FULL_HEADER.items():
        setattr(ds, key, value)
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(instance)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.add_new(0x00091001, "LO", "MRN-448812")  # a private attribute without creator
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "ACME secret JANE DOE")
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = uids["ref"]
    ref.PatientName = "DOE^JANE^Q"  # nested identifier
    ref.private_block(0x0031, "ACME 1.0", create=True).add_new(0x10, "LO", "JANE DOE")
    ds.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.RequestedProcedureID = "ACC20240117"
    ds.RequestAttributesSequence = Sequence([req])
    ds.add_new(0x60004000, "LT", "JANE DOE overlay")  # OverlayComments
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def new_uids(tag: str) -> dict[str, str]:
    from pydicom.uid import generate_uid

    return {
        k: generate_uid(entropy_srcs=[tag, k]) for k in ("sop", "study", "series", "frame", "ref")
    }


def assert_deidentified(src: Path, dst: Path) -> None:
    """``dst`` is ``src`` without an identifying attribute, checked tag by tag."""
    a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
    for key in FULL_HEADER:  # removed, or present and empty (PS3.15 X or Z)
        assert key not in b or b[key].value in (None, "", []), key
    assert "RequestAttributesSequence" not in b and 0x60004000 not in b  # OverlayComments
    assert b.ReferencedImageSequence[0].PatientName in (None, "")
    for elem in b.iterall():
        assert not elem.tag.is_private, elem
        assert not 0x6000 <= elem.tag.group <= 0x601E, elem
        if elem.tag in DICOM_ACTIONS and DICOM_ACTIONS[elem.tag] in "XZ":
            assert DICOM_ACTIONS[elem.tag] == "Z" and elem.value in (None, "", []), elem
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert b[key].value and b[key].value != a[key].value, key
    new_ref = b.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert new_ref != a.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert b.SOPClassUID == a.SOPClassUID  # DICOM-defined UIDs are kept
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in b.file_meta
    assert b.PatientIdentityRemoved == "YES"
    code = b.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert b.PixelData == a.PixelData and b.Rows == a.Rows and b.Modality == "CT"
    data = dst.read_bytes()
    for value in FULL_HEADER_VALUES:
        assert value.encode() not in data, value
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert str(a[key].value).encode() not in data, key


def png_with_text(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Source", "scanner 7, file JANE_DOE_0042.dcm, record 17", zip=True)  # zTXt
    info.add_text("Comment", "MRN-448812")  # tEXt
    info.add_itxt("Description", "JANE DOE follow-up", zip=True)  # iTXt
    exif = Image.Exif()
    exif[0x010E] = "HOSP-99-1234"  # ImageDescription
    Image.fromarray(pixels).save(path, pnginfo=info, exif=exif, dpi=(150, 150))


def assert_png_clean(src: Path, dst: Path) -> None:
    from PIL import Image

    with Image.open(src) as a, Image.open(dst) as b:
        assert b.mode == a.mode and b.size == a.size
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        assert np.asarray(b).dtype == np.asarray(a).dtype
        assert not b.info and not b.getexif()
    data = dst.read_bytes()
    for chunk in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"pHYs"):
        assert chunk not in data, chunk
    assert metadata_text(dst) == []


def write_nifti_with_text(path: Path, pixels: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(pixels.T[:, :, None], np.diag([0.7, 0.8, 2.5, 1.0]))
    img.header["descrip"] = b"JANE DOE chest"
    img.header["aux_file"] = b"MRN-448812.lut"
    img.header["intent_name"] = b"HOSP-99-1234"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"ACME secret JANE DOE"))
    nib.save(img, path)


def assert_nifti_clean(src: Path, dst: Path) -> None:
    import nibabel as nib

    a, b = nib.load(src), nib.load(dst)
    for key in ("descrip", "aux_file", "intent_name"):
        assert bytes(b.header[key]).strip(b"\0") == b"", key
    assert len(b.header.extensions) == 0
    np.testing.assert_array_equal(b.affine, a.affine)
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    assert b.get_data_dtype() == a.get_data_dtype()
    data = __import__("gzip").decompress(dst.read_bytes())
    for value in (b"JANE DOE", b"MRN-448812", b"HOSP-99-1234", b"ACME"):
        assert value not in data


@pytest.fixture(scope="module")
def leaky(tmp_path_factory, pixel_detector) -> Path:
    """A 2D audit whose synthetic folder holds, besides novel NumPy images: a DICOM with a
    full training-like header, PNGs (8- and 16-bit) with text chunks and EXIF, a NIfTI with
    header text and an extension (all of unknown people: released de-identified); a
    validation file and a DICOM of a validation patient (identifying); an earlier audit's
    outputs and a medmem figure (not generator images)."""
    root = tmp_path_factory.mktemp("leaky")
    train = write_phantoms(root / "train", n_patients=12, follow_ups=2, size=32)
    val = write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    syn = root / "syn"
    write_phantoms(syn, n_patients=6, size=32, fmt="npy", first_patient=200)
    (syn / "manifest.csv").unlink()
    sets = [load_dataset(p, image_size=(32, 32), quiet=True) for p in (train, val, str(syn))]
    old = medmem.audit(*sets, detector=pixel_detector, n_bootstrap=0, n_controls=0, quiet=True)
    # gallery.png, histogram.png, report.html, summary.json, csv files; saved elsewhere and
    # copied in (medmem refuses to write an audit inside one of its inputs)
    old.save(root / "old")
    shutil.copytree(root / "old", syn / "old")
    shutil.copy(syn / "old" / "histogram.png", syn / "figure.png")  # a medmem figure
    write_phantoms(root / "novel", n_patients=4, size=32, fmt="npy", first_patient=300)
    novel = [np.load(root / "novel" / f"P030{k}_00.npy") for k in range(4)]
    png_with_text(syn / "text8.png", np.round(novel[0] * 255).astype(np.uint8))
    png_with_text(syn / "text16.png", np.round(novel[1] * 65535).astype(np.uint16))
    pixels = np.round(novel[2] * 4000).astype(np.uint16)
    write_full_header_dicom(syn / "full_header.dcm", pixels, uids=new_uids("full"))
    write_nifti_with_text(syn / "meta.nii.gz", novel[3].astype(np.float32))
    shutil.copy(root / "val" / "P0101_00.png", syn / "val_copy.png")
    write_phantoms(root / "dcm", n_patients=1, size=32, fmt="dcm", first_patient=105, seed=9)
    shutil.copy(root / "dcm" / "P0105_00.dcm", syn / "val_patient.dcm")
    sets[2] = load_dataset(str(syn), image_size=(32, 32), quiet=True)
    # the embedding score, as the `audited` fixture: this module tests screening, not scores
    result = medmem.audit(
        *sets, detector=pixel_detector, n_bootstrap=0, quiet=True, score="embedding"
    )
    result.save(root / "audit", figures=False, report=False)
    audited_syn = pd.read_csv(root / "audit" / "synthetic.csv").set_index("synthetic_id")
    special = ["old/gallery.png", "old/histogram.png", "figure.png", "text8.png", "text16.png"]
    special += ["full_header.dcm", "meta.nii.gz", "val_copy.png", "val_patient.dcm"]
    assert not audited_syn.loc[special, "copy"].any(), audited_syn.loc[special]
    return root


@pytest.fixture(scope="module")
def leaky_release(leaky, tmp_path_factory):
    out = tmp_path_factory.mktemp("leaky_release") / "release"
    r = screen(leaky / "audit", out, quiet=True, drop_nonimages=True, drop_identifying=True)
    return r, out


def test_audit_outputs_in_the_synthetic_folder_are_refused_or_dropped(
    leaky, leaky_release, tmp_path
) -> None:
    out = tmp_path / "release"
    with pytest.raises(InputError, match=r"3 synthetic file.*not images made by the generator.*"
                       r"--drop-nonimages"):  # fmt: skip
        screen(leaky / "audit", out, quiet=True)
    with pytest.raises(InputError, match=r"2 synthetic file.*identify a training or validation"):
        screen(leaky / "audit", out, quiet=True, drop_nonimages=True)
    assert not out.exists()
    r, release = leaky_release
    assert r.withheld_nonimage == ["figure.png", "old/gallery.png", "old/histogram.png"]
    assert r.n_nonimage == 3 and "3 that are not generator images" in str(r)
    # the validation file itself, and a DICOM whose PatientID is a validation patient's
    assert r.withheld_identifier == ["val_copy.png", "val_patient.dcm"] and r.n_identifier == 2
    assert r.validation_checked.startswith("checked: 20 validation images, 20 patient ids")
    manifest = pd.read_csv(release / "release_manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert not any(f.startswith("old") or "val_" in f or "figure" in f for f in manifest["file"])
    assert {"full_header.dcm", "text8.png", "text16.png", "meta.nii.gz"} <= set(manifest["file"])
    readme = (release / "README.txt").read_text()
    assert "Basic Application Level Confidentiality Profile" in readme and "113100" in readme
    assert "3 files that are not images made by the generator" in readme


def test_cli_drops_nonimages_and_identifying_files(leaky, tmp_path) -> None:
    args = ["--quiet", "screen", "--audit", str(leaky / "audit"), "--out", str(tmp_path / "r")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--drop-nonimages" in refused.output
    r = CliRunner().invoke(main, [*args, "--drop-nonimages", "--drop-identifying"])
    assert r.exit_code == 0, r.output
    assert "2 that identify a training or validation patient" in r.output


def test_full_dicom_header_is_released_without_identifiers(leaky, leaky_release) -> None:
    r, release = leaky_release
    assert_deidentified(leaky / "syn" / "full_header.dcm", release / "full_header.dcm")
    np.testing.assert_array_equal(
        read_image(release / "full_header.dcm"), read_image(leaky / "syn" / "full_header.dcm")
    )
    manifest = pd.read_csv(release / "release_manifest.csv", keep_default_na=False)
    removed = set(manifest.set_index("file").loc["full_header.dcm", "removed"].split(";"))
    assert {
        "dicom:PatientName", "dicom:PatientID", "dicom:PatientBirthDate", "dicom:AccessionNumber",
        "dicom:InstitutionName", "dicom:private-tags", "dicom:overlays", "dicom:uids-replaced",
        "dicom:preamble", "dicom:SourceApplicationEntityTitle",
    } <= removed  # fmt: skip
    assert r.removed["full_header.dcm"] == sorted(removed)


def test_png_text_chunks_and_exif_are_removed(leaky, leaky_release) -> None:
    _, release = leaky_release
    manifest = pd.read_csv(release / "release_manifest.csv", keep_default_na=False)
    for name in ("text8.png", "text16.png"):
        assert_png_clean(leaky / "syn" / name, release / name)
        kinds = manifest.set_index("file").loc[name, "removed"].split(";")
        assert kinds == ["png:exif", "png:physical-size", "png:text-chunks"]
    assert pydicom.dcmread(release / "full_header.dcm").BitsStored == 16


def test_nifti_header_text_is_cleared(leaky, leaky_release) -> None:
    _, release = leaky_release
    assert_nifti_clean(leaky / "syn" / "meta.nii.gz", release / "meta.nii.gz")
    manifest = pd.read_csv(release / "release_manifest.csv", keep_default_na=False)
    kinds = manifest.set_index("file").loc["meta.nii.gz", "removed"].split(";")
    assert {"nifti:descrip", "nifti:aux_file", "nifti:intent_name", "nifti:extensions"} <= set(
        kinds
    )


def test_no_deidentify_copies_bytes_but_still_refuses(leaky, tmp_path) -> None:
    with pytest.raises(InputError, match="not images made by the generator"):
        screen(leaky / "audit", tmp_path / "a", quiet=True, deidentify=False)
    r = screen(
        leaky / "audit", tmp_path / "b", quiet=True, deidentify=False,
        drop_nonimages=True, drop_identifying=True,
    )  # fmt: skip
    assert not r.deidentified and r.n_identifier == 2
    assert sha(tmp_path / "b" / "full_header.dcm") == sha(leaky / "syn" / "full_header.dcm")
    assert "NOT de-identified" in (tmp_path / "b" / "README.txt").read_text()


def test_series_keep_one_new_series_uid(tmp_path) -> None:
    """The slices of a series share their new Study/Series/FrameOfReference UIDs."""
    pixels = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    shared = new_uids("series")
    src = []
    for k in range(3):
        uids = {**shared, "sop": new_uids(f"slice{k}")["sop"]}
        write_full_header_dicom(tmp_path / "in" / f"s{k}.dcm", pixels[k], uids=uids, instance=k)
        src.append(tmp_path / "in" / f"s{k}.dcm")
    dst = [tmp_path / "out" / p.name for p in src]
    removed = deidentify_series(src, dst)
    assert "dicom:uids-replaced" in removed and "dicom:PatientName" in removed
    out = [pydicom.dcmread(p) for p in dst]
    keys = {
        "StudyInstanceUID": "study",
        "SeriesInstanceUID": "series",
        "FrameOfReferenceUID": "frame",
    }
    for key, old in keys.items():
        assert len({d[key].value for d in out}) == 1 and out[0][key].value != shared[old], key
    assert len({d.SOPInstanceUID for d in out}) == 3
    for s, d in zip(src, dst, strict=True):
        assert_deidentified(s, d)
    np.testing.assert_array_equal(read_image(tmp_path / "out"), read_image(tmp_path / "in"))


def test_multiframe_jpeg_tiff_numpy(tmp_path) -> None:
    import tifffile
    from PIL import Image

    # DICOM multi-frame (phantom writer), read back as the same volume
    write_phantoms(tmp_path / "mf", n_patients=1, spatial_dims=3, size=16, fmt="dcm-multiframe")
    mf = next((tmp_path / "mf").glob("*.dcm"))
    assert "dicom:PatientID" in deidentify_file(mf, tmp_path / "mf_out.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "mf_out.dcm"), read_image(mf))
    # JPEG: EXIF, comment and ICC profile dropped, the decoded pixels identical
    rgb = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010E] = "MRN-448812"
    Image.fromarray(rgb).save(
        tmp_path / "a.jpg", exif=exif, comment=b"JANE DOE", icc_profile=b"x" * 64
    )
    kinds = deidentify_file(tmp_path / "a.jpg", tmp_path / "b.jpg")
    assert kinds == ["jpeg:comment", "jpeg:exif", "jpeg:icc-profile"]
    with Image.open(tmp_path / "a.jpg") as a, Image.open(tmp_path / "b.jpg") as b:
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert b"MRN-448812" not in (tmp_path / "b.jpg").read_bytes()
    # TIFF: description, software and date dropped; a 3D stack stays a 3D stack
    vol = np.random.default_rng(1).integers(0, 4000, (4, 12, 12), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "a.tif",
        vol,
        photometric="minisblack",
        description="JANE DOE",
        software="ACME",
        metadata=None,
    )
    kinds = deidentify_file(tmp_path / "a.tif", tmp_path / "b.tif")
    assert {"tiff:ImageDescription", "tiff:Software"} <= set(kinds)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), vol)
    assert b"JANE" not in (tmp_path / "b.tif").read_bytes()
    # NumPy: arrays only; pickles refused; non-numeric .npz arrays dropped
    np.save(tmp_path / "o.npy", np.array([{"id": "MRN-448812"}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        deidentify_file(tmp_path / "o.npy", tmp_path / "o2.npy")
    np.savez(tmp_path / "a.npz", image=vol, patient=np.array(["MRN-448812"]))
    assert deidentify_file(tmp_path / "a.npz", tmp_path / "b.npz") == ["npz:non-numeric-arrays"]
    with np.load(tmp_path / "b.npz") as z:
        assert z.files == ["image"] and np.array_equal(z["image"], vol)


def test_profile_table_covers_the_identifying_attributes() -> None:
    from pydicom.datadict import tag_for_keyword

    for key in FULL_HEADER:
        if key not in ("PatientWeight",):
            assert tag_for_keyword(key) in DICOM_ACTIONS, key
    assert DICOM_ACTIONS[tag_for_keyword("PatientName")] == "Z"
    assert DICOM_ACTIONS[tag_for_keyword("OtherPatientIDs")] == "X"
