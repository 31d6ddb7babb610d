"""Readers, sources, preprocessing and the file-backed dataset (medmem.data)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medmem import InputError, MedmemWarning, ReadError
from medmem.data import (
    SUPPORTED_SUFFIXES,
    ImageDataset,
    ImageInfo,
    Preprocess,
    load_dataset,
    probe_image,
    read_image,
)

# ----------------------------------------------------------------------------- helpers


def _ramp(shape: tuple[int, ...], hi: float = 255.0) -> np.ndarray:
    """A non-constant test image with distinct values."""
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    return a / a.max() * hi


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    series_uid: str | None = None,
    patient_id: str = "PAT1",
    sop_class: str = SecondaryCaptureImageStorage,
    **attrs: object,
) -> Path:
    """Write an uncompressed unsigned 16-bit DICOM file; ``attrs`` are extra elements."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def _series(folder: Path, vol: np.ndarray, *, shuffle: bool = True, positions: bool = True):
    """Write ``vol`` (D, H, W) as a CT series; file names do not follow slice order."""
    uid = generate_uid()
    order = list(range(vol.shape[0]))
    if shuffle:
        random.Random(0).shuffle(order)
    for name_k, k in enumerate(order):
        attrs: dict = {"InstanceNumber": k + 1}
        if positions:
            # slice k at z = 10 - 2.5 k along the normal: ascending position = descending k
            attrs["ImagePositionPatient"] = [0.0, 0.0, 10.0 - 2.5 * k]
            attrs["ImageOrientationPatient"] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        _dicom(
            folder / f"IM{name_k:03d}.dcm",
            vol[k],
            series_uid=uid,
            sop_class=CTImageStorage,
            Modality="CT",
            **attrs,
        )
    return uid


def _nifti(path: Path, vol: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.float32), np.eye(4)), str(path))
    return path


# ----------------------------------------------------------------------------- readers


def test_png_8bit_and_16bit_exact(tmp_path):
    a8 = _ramp((12, 20)).astype(np.uint8)
    a16 = _ramp((12, 20), 65535).astype(np.uint16)
    r8 = read_image(_png(tmp_path / "a8.png", a8))
    r16 = read_image(_png(tmp_path / "a16.png", a16))
    assert r8.dtype == np.float32 and r8.shape == (12, 20)
    np.testing.assert_array_equal(r8, a8.astype(np.float32))
    np.testing.assert_array_equal(r16, a16.astype(np.float32))  # full 16-bit precision
    assert probe_image(tmp_path / "a16.png") == ImageInfo(shape=(12, 20), spatial_dims=2)


def test_png_rgb_is_converted_to_luma(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 100
    out = read_image(_png(tmp_path / "rgb.png", rgb))
    assert out.shape == (4, 5)
    np.testing.assert_allclose(out, 0.299 * 200 + 0.114 * 100, rtol=1e-6)


def test_jpeg_approximately(tmp_path):
    a = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    path = tmp_path / "a.jpg"
    Image.fromarray(a).save(path, quality=95)
    out = read_image(path)
    assert out.shape == (32, 32)
    assert np.abs(out - a).mean() < 2.0


def test_tiff_16bit_float_and_multipage(tmp_path):
    a16 = _ramp((10, 14), 60000).astype(np.uint16)
    af = _ramp((10, 14), 3.5).astype(np.float32) - 1.0
    vol = _ramp((5, 10, 14), 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a16)
    tifffile.imwrite(tmp_path / "f.tiff", af)
    tifffile.imwrite(tmp_path / "v.tif", vol)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), a16.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "f.tiff"), af)
    np.testing.assert_array_equal(read_image(tmp_path / "v.tif"), vol.astype(np.float32))
    assert probe_image(tmp_path / "v.tif") == ImageInfo((5, 10, 14), 3)


def test_dicom_rescale_slope_intercept(tmp_path):
    raw = _ramp((6, 8), 4000).astype(np.uint16)
    path = _dicom(tmp_path / "ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-1024)
    out = read_image(path)
    np.testing.assert_allclose(out, raw * 2.0 - 1024.0)
    assert probe_image(path) == ImageInfo((6, 8), 2)


def test_dicom_monochrome1_is_inverted_after_rescale(tmp_path):
    raw = _ramp((6, 8), 1000).astype(np.uint16) + 100
    path = _dicom(
        tmp_path / "cr.dcm",
        raw,
        PhotometricInterpretation="MONOCHROME1",
        RescaleSlope=0.5,
        RescaleIntercept=10,
    )
    out = read_image(path)
    scaled = raw * 0.5 + 10
    np.testing.assert_allclose(out, scaled.max() + scaled.min() - scaled, rtol=1e-6)
    # low stored value = white in MONOCHROME1: the darkest stored pixel is now the brightest
    assert out.flat[0] == out.max()


def test_dicom_multiframe_is_3d(tmp_path):
    vol = _ramp((4, 6, 8), 3000).astype(np.uint16)
    path = _dicom(tmp_path / "mf.dcm", vol)
    assert probe_image(path) == ImageInfo((4, 6, 8), 3)
    np.testing.assert_array_equal(read_image(path), vol.astype(np.float32))


def test_dicom_series_folder_sorted_by_position(tmp_path):
    vol = _ramp((5, 6, 7), 2000).astype(np.uint16)
    _series(tmp_path / "s", vol)
    out = read_image(tmp_path / "s")
    # ascending position along the normal: z = 10 - 2.5k, so slice 4 first
    np.testing.assert_array_equal(out, vol[::-1].astype(np.float32))
    assert probe_image(tmp_path / "s") == ImageInfo((5, 6, 7), 3)


def test_dicom_series_falls_back_to_instance_number(tmp_path):
    vol = _ramp((4, 6, 7), 2000).astype(np.uint16)
    _series(tmp_path / "s", vol, positions=False)
    np.testing.assert_array_equal(read_image(tmp_path / "s"), vol.astype(np.float32))


def test_nifti_nii_and_niigz(tmp_path):
    vol = _ramp((3, 5, 7), 10).astype(np.float32)
    for name in ("v.nii", "v.nii.gz"):
        path = _nifti(tmp_path / name, vol)
        assert probe_image(path) == ImageInfo((3, 5, 7), 3)
        np.testing.assert_array_equal(read_image(path), vol)  # (X,Y,Z) -> (D,H,W)


def test_npy_and_npz(tmp_path):
    a = _ramp((5, 9)).astype(np.float64)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "one.npz", whatever=a)
    np.savez(tmp_path / "img.npz", image=a, mask=a > 3)
    np.savez(tmp_path / "two.npz", x=a, y=a)
    np.save(tmp_path / "c.npy", a[None, :, :, None])  # singleton axes are dropped
    for name in ("a.npy", "one.npz", "img.npz", "c.npy"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, a.astype(np.float32))
        assert probe_image(tmp_path / name) == ImageInfo((5, 9), 2)
    with pytest.raises(InputError, match=r"two\.npz: holds 2 arrays \['x', 'y'\].*'image'"):
        read_image(tmp_path / "two.npz")


def test_npy_object_array_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReadError, match=r"o\.npy: cannot decode as NPY"):
        read_image(tmp_path / "o.npy")


def test_unknown_suffix_lists_supported_and_suggests_manifest(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"abc")
    with pytest.raises(
        ReadError, match=r"scan\.xyz: unsupported file type '\.xyz'.*\.nii\.gz.*manifest"
    ):
        read_image(path)
    assert ".nii.gz" in SUPPORTED_SUFFIXES and ".dcm" in SUPPORTED_SUFFIXES


def test_bad_shape_is_an_input_error(tmp_path):
    np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(InputError, match=r"4d\.npy: has shape \(2, 3, 4, 5\)"):
        probe_image(tmp_path / "4d.npy")


def test_truncated_png_probes_but_fails_to_read(tmp_path):
    path = _png(tmp_path / "scans" / "p03.png", _ramp((64, 64), 65535).astype(np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert probe_image(path).shape == (64, 64)  # header only
    with pytest.raises(ReadError, match=r"p03\.png: cannot decode as PNG \(truncated file\?\)"):
        read_image(path)


# ----------------------------------------------------------------------------- sources


def _phantomish(shape=(16, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, size=shape).astype(np.uint16)


def test_manifest_relative_paths_and_patient_ids(tmp_path):
    _png(tmp_path / "scans" / "a.png", _phantomish(seed=1))
    _png(tmp_path / "scans" / "b.png", _phantomish(seed=2))
    np.save(tmp_path / "c.npy", _phantomish(seed=3).astype(np.float32))
    (tmp_path / "m.csv").write_text(
        "path,patient_id,site\nscans/b.png,PB,x\nscans/a.png,PA,y\nc.npy,,z\n"
    )
    ds = load_dataset(tmp_path / "m.csv", quiet=True)
    assert isinstance(ds, ImageDataset)
    assert ds.ids == ["scans/b.png", "scans/a.png", "c.npy"]  # manifest order
    assert ds.patient_ids == ["PB", "PA", None]
    assert ds.paths[0] == (tmp_path / "scans" / "b.png").resolve()
    assert ds.spatial_dims == 2 and ds.image_size == (128, 128)
    assert ds[0].shape == (1, 128, 128)


def test_manifest_missing_file_names_the_row(tmp_path):
    _png(tmp_path / "a.png", _phantomish())
    _png(tmp_path / "a2.png", _phantomish(seed=5))
    (tmp_path / "manifest.csv").write_text("path\na.png\na2.png\nscans/p03.nii\n")
    with pytest.raises(
        InputError,
        match=r"manifest\.csv row 4: 'scans/p03\.nii' not found under .*\. Fix the path or drop",
    ):
        load_dataset(tmp_path / "manifest.csv", quiet=True)


def test_manifest_without_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("scan,patient_id\na.png,1\n")
    with pytest.raises(
        InputError, match=r"m\.csv: has no 'path' column \(columns: \['scan'.*--path-column"
    ):
        load_dataset(tmp_path / "m.csv")


@pytest.mark.parametrize("column", ["file", "filename", "image", "Image Index"])
def test_manifest_image_column_aliases_are_read_with_a_note(tmp_path, caplog, column):
    _png(tmp_path / "a.png", _phantomish(seed=1))
    _png(tmp_path / "b.png", _phantomish(seed=2))
    # ChestX-ray14's Data_Entry table: "Image Index", "Finding Labels", "Patient ID"
    (tmp_path / "m.csv").write_text(
        f"{column},Finding Labels,Patient ID\nb.png,No Finding,12\na.png,Effusion,7\n"
    )
    with caplog.at_level("INFO", logger="medmem"):
        ds = load_dataset(tmp_path / "m.csv", quiet=True)
    assert ds.ids == ["b.png", "a.png"]
    assert ds.patient_ids == ["12", "7"]
    notes = " ".join(r.getMessage() for r in caplog.records)
    assert f"reading '{column}' as the image column" in notes and "--path-column" in notes
    assert "'Patient ID' as the patient id column" in notes


def test_manifest_columns_named_explicitly(tmp_path):
    _png(tmp_path / "a.png", _phantomish(seed=1))
    (tmp_path / "m.csv").write_text("scan,subject,path\na.png,S1,missing.png\n")
    ds = load_dataset(tmp_path / "m.csv", path_column="scan", patient_column="subject", quiet=True)
    assert ds.ids == ["a.png"] and ds.patient_ids == ["S1"]
    with pytest.raises(InputError, match=r"no column 'img' \(--path-column\)"):
        load_dataset(tmp_path / "m.csv", path_column="img")
    with pytest.raises(InputError, match=r"no column 'pid' \(--patient-column\)"):
        load_dataset(tmp_path / "m.csv", path_column="scan", patient_column="pid")


def test_cli_path_and_patient_column_options(tmp_path):
    from click.testing import CliRunner

    from medmem.cli import main

    _png(tmp_path / "a.png", _phantomish(seed=1))
    (tmp_path / "m.csv").write_text("scan\na.png\n")
    r = CliRunner().invoke(
        main,
        [
            "train-detector",
            "--train",
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path / "d"),
            "--path-column",
            "nope",
        ],
    )
    assert r.exit_code == 2 and "no column 'nope' (--path-column)" in r.output, r.output


def test_patient_id_pattern_variants(tmp_path):
    for name in ("P0001_00.png", "P0001_01.png", "P0002_00.png"):
        _png(tmp_path / "d" / name, _phantomish(seed=len(name)))
    ds = load_dataset(tmp_path / "d", patient_id_pattern=r"(?P<patient>P\d{4})_", quiet=True)
    assert ds.patient_ids == ["P0001", "P0001", "P0002"]
    ds = load_dataset(tmp_path / "d", patient_id_pattern=r"P(\d+)_", quiet=True)
    assert ds.patient_ids == ["0001", "0001", "0002"]
    ds = load_dataset(tmp_path / "d", patient_id_pattern=r"P\d{4}", quiet=True)
    assert ds.patient_ids == ["P0001", "P0001", "P0002"]
    with pytest.raises(InputError, match=r"P0001_00\.png: patient_id_pattern 'Q\(\\d\+\)'"):
        load_dataset(tmp_path / "d", patient_id_pattern=r"Q(\d+)", quiet=True)


def test_patient_pattern_searches_folders_and_manifest_wins(tmp_path):
    _png(tmp_path / "pat7" / "img.png", _phantomish(seed=1))
    _png(tmp_path / "pat8" / "img.png", _phantomish(seed=2))
    ds = load_dataset(tmp_path, patient_id_pattern=r"pat(\d+)", quiet=True)
    assert ds.ids == ["pat7/img.png", "pat8/img.png"]
    assert ds.patient_ids == ["7", "8"]
    (tmp_path / "m.csv").write_text("path,patient_id\npat7/img.png,X\npat8/img.png,\n")
    ds = load_dataset(tmp_path / "m.csv", patient_id_pattern=r"pat(\d+)", quiet=True)
    assert ds.patient_ids == ["X", "8"]


def test_glob_and_list_sources(tmp_path):
    for k in range(3):
        _png(tmp_path / "data" / f"im{k}.png", _phantomish(seed=k))
    np.save(tmp_path / "data" / "x.npy", _phantomish(seed=9).astype(np.float32))
    ds = load_dataset(str(tmp_path / "data" / "*.png"), quiet=True)
    assert ds.ids == ["im0.png", "im1.png", "im2.png"]
    ds = load_dataset([tmp_path / "data" / "im2.png", tmp_path / "data" / "x.npy"], quiet=True)
    assert ds.ids == ["im2.png", "x.npy"]


def test_recursive_folder_ignores_hidden_and_unsupported(tmp_path):
    _png(tmp_path / "b" / "deep" / "z.png", _phantomish(seed=1))
    _png(tmp_path / "a.png", _phantomish(seed=2))
    _png(tmp_path / ".hidden" / "h.png", _phantomish(seed=3))
    _png(tmp_path / ".h.png", _phantomish(seed=4))
    (tmp_path / "notes.txt").write_text("hello")
    ds = load_dataset(tmp_path, quiet=True)
    assert ds.ids == ["a.png", "b/deep/z.png"]


def test_empty_and_unusable_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no images found in folder .*empty.*found no files"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    (tmp_path / "txt" / "b.txt").write_text("x")
    (tmp_path / "txt" / "c.json").write_text("{}")
    with pytest.raises(InputError, match=r"found 3 unsupported file\(s\): 2 '\.txt', 1 '\.json'"):
        load_dataset(tmp_path / "txt")
    with pytest.raises(InputError, match=r"nothere: not found\. Check the path"):
        load_dataset(tmp_path / "nothere")


def test_mixed_2d_3d_is_an_error(tmp_path):
    _png(tmp_path / "flat.png", _phantomish())
    _nifti(tmp_path / "vol.nii.gz", _ramp((4, 5, 6)).astype(np.float32))
    with pytest.raises(InputError, match=r"mixes 2D and 3D.*'flat\.png'.*2D.*'vol\.nii\.gz'.*3D"):
        load_dataset(tmp_path, quiet=True)


def test_spatial_dims_mismatch(tmp_path):
    _png(tmp_path / "flat.png", _phantomish())
    with pytest.raises(InputError, match=r"spatial_dims=3 was given but the images .* are 2D"):
        load_dataset(tmp_path, spatial_dims=3, quiet=True)


def test_dicom_series_in_folder_is_one_item_with_patient_id(tmp_path):
    vol = _ramp((6, 8, 8), 3000).astype(np.uint16)
    _series(tmp_path / "ct" / "case1", vol)
    ds = load_dataset(tmp_path, image_size=(6, 8, 8), quiet=True)
    assert len(ds) == 1 and ds.ids == ["ct/case1"]
    assert ds.paths == [(tmp_path / "ct" / "case1").resolve()]
    assert ds.patient_ids == ["PAT1"]  # from the DICOM PatientID tag
    assert ds.shapes == [(6, 8, 8)]
    np.testing.assert_array_equal(ds.read_raw(0), vol[::-1].astype(np.float32))


def test_single_frame_dicom_alone_is_2d_and_two_series_split(tmp_path):
    _dicom(tmp_path / "xr" / "a.dcm", _phantomish(seed=1), patient_id="X1")
    _dicom(tmp_path / "xr" / "b.dcm", _phantomish(seed=2), patient_id="X2")
    ds = load_dataset(tmp_path / "xr", quiet=True)
    assert ds.spatial_dims == 2 and ds.ids == ["a.dcm", "b.dcm"]
    assert ds.patient_ids == ["X1", "X2"]
    uid1 = _series(tmp_path / "two", _ramp((3, 8, 8), 100).astype(np.uint16))
    uid2 = _series(tmp_path / "two2", _ramp((4, 8, 8), 100).astype(np.uint16))
    for f in (tmp_path / "two2").iterdir():
        f.rename(tmp_path / "two" / ("b" + f.name))
    ds = load_dataset(tmp_path / "two", quiet=True)
    assert sorted(ds.ids) == sorted([f"two#{uid1}", f"two#{uid2}"])
    assert sorted(s[0] for s in ds.shapes) == [3, 4]


def test_corrupt_png_raises_at_read_and_can_be_skipped(tmp_path):
    for k in range(3):
        _png(tmp_path / "scans" / f"p0{k}.png", _phantomish(shape=(64, 64), seed=k))
    bad = tmp_path / "scans" / "p01.png"
    bad.write_bytes(bad.read_bytes()[:300])
    ds = load_dataset(tmp_path / "scans", quiet=True)  # headers are fine
    assert len(ds) == 3
    with pytest.raises(ReadError, match=r"p01\.png: cannot decode as PNG.*skip_unreadable=True"):
        ds[1]
    with pytest.warns(MedmemWarning, match=r"skipped 1 unreadable file"):
        ds = load_dataset(tmp_path / "scans", skip_unreadable=True, quiet=True)
    assert ds.ids == ["p00.png", "p02.png"]
    assert len(ds.skipped) == 1 and ds.skipped[0]["path"].endswith("p01.png")
    assert "cannot decode as PNG" in ds.skipped[0]["reason"]


def test_unreadable_header_is_skipped_at_probe(tmp_path):
    _png(tmp_path / "ok.png", _phantomish())
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ReadError, match=r"junk\.png: cannot decode as PNG"):
        load_dataset(tmp_path, quiet=True)
    with pytest.warns(MedmemWarning, match=r"skipped 1 unreadable file"):
        ds = load_dataset(tmp_path, skip_unreadable=True, quiet=True)
    assert ds.ids == ["ok.png"] and ds.skipped[0]["path"].endswith("junk.png")


def test_constant_and_nan_images(tmp_path):
    np.save(tmp_path / "const.npy", np.zeros((8, 8), np.float32))
    nan = np.ones((8, 8), np.float32)
    nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "ok.npy", _ramp((8, 8)).astype(np.float32))
    ds = load_dataset(tmp_path, quiet=True)
    assert ds.ids == ["const.npy", "nan.npy", "ok.npy"]
    with pytest.raises(
        InputError, match=r"const\.npy: is constant \(every pixel 0\.0\).*remove it"
    ):
        ds[0]
    with pytest.raises(InputError, match=r"nan\.npy: contains 1 NaN or infinite value"):
        ds[1]
    with pytest.warns(MedmemWarning, match=r"skipped 2 unreadable file"):
        ds = load_dataset(tmp_path, skip_unreadable=True, quiet=True)
    assert ds.ids == ["ok.npy"] and len(ds.skipped) == 2


# ----------------------------------------------------------------------------- preprocessing


def test_resize_2d_to_requested_shape_in_unit_range(tmp_path):
    _png(tmp_path / "a.png", _ramp((50, 70), 65535).astype(np.uint16))
    ds = load_dataset(tmp_path, image_size=(32, 24), quiet=True)
    x = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 32, 24)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.max()) > 0.95 and float(x.min()) < 0.05
    assert ds.read_raw(0).shape == (50, 70)


def test_same_size_2d_is_only_rescaled():
    raw = _ramp((16, 16), 1000).astype(np.float32) + 5
    x = Preprocess(2, image_size=16)(raw)
    np.testing.assert_allclose(x[0].numpy(), (raw - 5) / 1000, atol=1e-6)


def test_crop_or_pad_3d(tmp_path):
    vol = _ramp((4, 64, 32), 100).astype(np.float32) + 1
    _nifti(tmp_path / "v.nii.gz", vol)
    ds = load_dataset(tmp_path, image_size=(8, 48, 48), spatial_mode="crop", quiet=True)
    x = ds[0]
    assert x.shape == (1, 8, 48, 48) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    scaled = (vol - vol.min()) / (vol.max() - vol.min())
    # D: 4 -> 8 padded 2 each side; H: 64 -> 48 centre crop 8 each side; W: 32 -> 48 pad 8
    np.testing.assert_allclose(x[0, 2:6, :, 8:40].numpy(), scaled[:, 8:56, :], atol=1e-6)
    assert float(x[0, :2].abs().max()) == 0.0 and float(x[0, :, :, :8].abs().max()) == 0.0


def test_paper_volume_shape(tmp_path):
    _nifti(tmp_path / "knee.nii", _ramp((30, 20, 24)).astype(np.float32))
    ds = load_dataset(tmp_path, image_size=(32, 256, 256), quiet=True)
    assert ds[0].shape == (1, 32, 256, 256)


def test_image_size_validation(tmp_path):
    _png(tmp_path / "a.png", _phantomish())
    with pytest.raises(InputError, match=r"image_size must be 2 positive ints \(H, W\)"):
        load_dataset(tmp_path, image_size=(8, 8, 8), quiet=True)


# ----------------------------------------------------------------------------- dataset


def _small_set(folder: Path, n: int = 6) -> Path:
    for k in range(n):
        _png(folder / f"im{k}.png", _phantomish(shape=(20, 20), seed=k))
    return folder


def test_dataloader_with_two_workers(tmp_path):
    ds = load_dataset(_small_set(tmp_path), image_size=16, quiet=True)
    ds.content_hash(0)  # memoised state must not break pickling
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(4, 1, 16, 16), (2, 1, 16, 16)]
    torch.testing.assert_close(batches[1][1], ds[5])


def test_pickle_roundtrip(tmp_path):
    ds = load_dataset(_small_set(tmp_path, 2), quiet=True)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2.ids == ds.ids and ds2.fingerprint() == ds.fingerprint()
    torch.testing.assert_close(ds2[1], ds[1])


def test_fingerprint_tracks_content_and_preprocessing(tmp_path):
    folder = _small_set(tmp_path)
    ds = load_dataset(folder, quiet=True)
    fp = ds.fingerprint()
    assert load_dataset(folder, quiet=True).fingerprint() == fp  # stable
    assert load_dataset(folder, image_size=64, quiet=True).fingerprint() != fp
    assert (
        ds.preprocessing_key()
        != load_dataset(folder, image_size=64, quiet=True).preprocessing_key()
    )
    _png(folder / "im3.png", _phantomish(shape=(20, 20), seed=99))
    assert load_dataset(folder, quiet=True).fingerprint() != fp


def test_content_hash_is_file_sha256_and_memoised(tmp_path):
    import hashlib

    ds = load_dataset(_small_set(tmp_path, 2), quiet=True)
    expected = hashlib.sha256((tmp_path / "im1.png").read_bytes()).hexdigest()
    assert ds.content_hash(1) == expected
    assert ds._hashes[1] == expected


def test_subset_keeps_metadata_aligned(tmp_path):
    folder = _small_set(tmp_path)
    (folder / "m.csv").write_text(
        "path,patient_id\n" + "".join(f"im{k}.png,P{k}\n" for k in range(6))
    )
    ds = load_dataset(folder / "m.csv", quiet=True)
    sub = ds.subset([4, 1])
    assert isinstance(sub, ImageDataset)
    assert sub.ids == ["im4.png", "im1.png"] and sub.patient_ids == ["P4", "P1"]
    assert sub.paths == [ds.paths[4], ds.paths[1]]
    torch.testing.assert_close(sub[0], ds[4])
    assert sub.content_hash(1) == ds.content_hash(1)
    with pytest.raises(IndexError):
        ds.subset([6])


def test_getitem_after_file_removed_names_it(tmp_path):
    ds = load_dataset(_small_set(tmp_path, 2), quiet=True)
    (tmp_path / "im1.png").unlink()
    with pytest.raises(ReadError, match=r"im1\.png: file not found"):
        ds[1]


def test_series_folder_as_source_and_as_manifest_row(tmp_path):
    vol = _ramp((5, 8, 8), 3000).astype(np.uint16)
    _series(tmp_path / "case1", vol)
    ds = load_dataset(tmp_path / "case1", image_size=8, quiet=True)
    assert ds.ids == ["case1"] and ds.shapes == [(5, 8, 8)]
    (tmp_path / "m.csv").write_text("path,patient_id\ncase1,Q1\n")
    ds2 = load_dataset(tmp_path / "m.csv", image_size=8, quiet=True)
    assert ds2.ids == ["case1"] and ds2.patient_ids == ["Q1"]
    assert ds2.content_hash(0) == ds.content_hash(0)
    torch.testing.assert_close(ds2[0], ds[0])
    assert ds2[0].shape == (1, 8, 8, 8)


def test_given_dataset_passes_through_with_checks(tmp_path):
    ds = load_dataset(_small_set(tmp_path, 2), image_size=16, quiet=True)
    assert load_dataset(ds) is ds
    assert load_dataset(ds, spatial_dims=2, image_size=16) is ds
    with pytest.raises(InputError, match=r"image_size=\(32, 32\) was given but .* \(16, 16\)"):
        load_dataset(ds, image_size=32)


def test_dataset_holds_no_pixels_so_memory_does_not_grow_with_n(tmp_path):
    """Streaming: the dataset object keeps paths and metadata only, never pixel arrays."""
    from medmem.data import write_phantoms

    small = write_phantoms(tmp_path / "a", n_patients=4, size=64, fmt="npy")
    large = write_phantoms(tmp_path / "b", n_patients=40, size=64, fmt="npy")
    ds_small, ds_large = load_dataset(small, quiet=True), load_dataset(large, quiet=True)
    per_image_small = len(pickle.dumps(ds_small)) / len(ds_small)
    per_image_large = len(pickle.dumps(ds_large)) / len(ds_large)
    assert per_image_large < 1024  # a 64x64 float32 image alone would be 16 KiB
    assert per_image_large <= per_image_small * 1.5
    _ = ds_large[3]  # reading an item keeps nothing behind
    assert len(pickle.dumps(ds_large)) / len(ds_large) < 1024
