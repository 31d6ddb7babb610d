"""Phantoms (medmem.data.phantoms): determinism, patient vs follow-up structure, writers."""

from __future__ import annotations

import numpy as np
import pytest

from medmem import InputError
from medmem.data import PHANTOM_FORMATS, load_dataset, make_phantom, read_image, write_phantoms
from medmem.data.phantoms import phantom_seed


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("spatial_dims", "size", "shape"),
    [(2, None, (128, 128)), (2, (64, 48), (64, 48)), (3, None, (64, 64, 64)), (3, 24, (24,) * 3)],
)
def test_shape_range_and_determinism(spatial_dims, size, shape):
    a = make_phantom(5, 1, spatial_dims=spatial_dims, size=size)
    assert a.shape == shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.std() > 0.05
    np.testing.assert_array_equal(a, make_phantom(5, 1, spatial_dims=spatial_dims, size=size))
    assert not np.array_equal(a, make_phantom(5, 2, spatial_dims=spatial_dims, size=size))


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, 128), (3, 32)])
def test_follow_ups_closer_than_other_patients(spatial_dims, size):
    n = 6
    imgs = {
        (p, f): make_phantom(p, f, spatial_dims=spatial_dims, size=size)
        for p in range(n)
        for f in range(2)
    }
    same = [_corr(imgs[p, 0], imgs[p, 1]) for p in range(n)]
    other = [_corr(imgs[p, 0], imgs[q, 0]) for p in range(n) for q in range(p + 1, n)]
    assert np.mean(same) > np.mean(other) + 0.05
    # each patient's follow-up is closer than that patient's nearest other patient
    for p in range(n):
        nearest_other = max(
            _corr(imgs[p, 0], imgs[q, f]) for q in range(n) if q != p for f in (0, 1)
        )
        assert same[p] > nearest_other
    mad_same = np.mean([np.abs(imgs[p, 0] - imgs[p, 1]).mean() for p in range(n)])
    mad_other = np.mean(
        [np.abs(imgs[p, 0] - imgs[q, 0]).mean() for p in range(n) for q in range(p + 1, n)]
    )
    assert mad_same < mad_other
    # and a follow-up is not a copy
    assert max(same) < 0.995


def test_bad_arguments():
    with pytest.raises(InputError, match=r"patient_seed must be a non-negative int, got -1"):
        make_phantom(-1)
    with pytest.raises(InputError, match=r"spatial_dims must be one of \[2, 3\], got 4"):
        make_phantom(1, spatial_dims=4)
    with pytest.raises(InputError, match=r"size must be an int or 2 ints, each >= 16"):
        make_phantom(1, size=(8, 8))
    with pytest.raises(InputError, match=r"fmt \(for 2D\) must be one of \['png', 'dcm', 'npy'\]"):
        write_phantoms("unused", n_patients=1, fmt="nii.gz")


@pytest.mark.parametrize(
    ("spatial_dims", "fmt"),
    [(d, f) for d, fmts in PHANTOM_FORMATS.items() for f in fmts],
)
def test_write_phantoms_round_trip(tmp_path, spatial_dims, fmt):
    size = 32 if spatial_dims == 2 else (16, 24, 20)
    manifest = write_phantoms(
        tmp_path / "out",
        n_patients=2,
        follow_ups=2,
        spatial_dims=spatial_dims,
        size=size,
        fmt=fmt,
        seed=4,
        first_patient=3,
        id_prefix="T",
    )
    assert manifest.name == "manifest.csv"
    assert manifest.read_text().splitlines()[0] == "path,patient_id,follow_up"
    expected_pids = ["T0003", "T0003", "T0004", "T0004"]
    ds = load_dataset(manifest, image_size=size, quiet=True)
    assert ds.spatial_dims == spatial_dims and len(ds) == 4
    assert ds.patient_ids == expected_pids
    assert ds.ids[1].startswith("T0003_01")
    # the folder, without the manifest, finds the same images (DICOM: PatientID tag)
    by_folder = load_dataset(tmp_path / "out", image_size=size, quiet=True)
    assert by_folder.ids == ds.ids and by_folder.spatial_dims == spatial_dims
    if fmt.startswith("dcm"):
        assert by_folder.patient_ids == expected_pids
    # pixel values survive the format (16-bit quantisation for PNG/DICOM)
    ref = make_phantom(phantom_seed(4, 4), 1, spatial_dims=spatial_dims, size=size)
    raw = ds.read_raw(3)
    assert raw.shape == ref.shape
    assert _corr(raw, ref) > 0.9999
    x = ds[3][0].numpy()
    ref01 = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(x, ref01, atol=2e-3)


def test_write_phantoms_is_deterministic_and_ranges_are_consistent(tmp_path):
    a = write_phantoms(tmp_path / "a", n_patients=3, fmt="dcm", size=32, seed=1)
    write_phantoms(tmp_path / "b", n_patients=1, fmt="dcm", size=32, seed=1, first_patient=2)
    same = (tmp_path / "a" / "P0002_00.dcm").read_bytes()
    assert same == (tmp_path / "b" / "P0002_00.dcm").read_bytes()
    again = write_phantoms(tmp_path / "c", n_patients=3, fmt="dcm", size=32, seed=1)
    assert again.read_text() == a.read_text()
    for k in range(3):
        name = f"P000{k}_00.dcm"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    other = write_phantoms(tmp_path / "d", n_patients=1, fmt="npy", size=32, seed=2)
    assert not np.array_equal(
        read_image(other.parent / "P0000_00.npy"), read_image(tmp_path / "a" / "P0000_00.dcm")
    )
    nii = write_phantoms(tmp_path / "e", n_patients=1, spatial_dims=3, fmt="nii.gz", size=16)
    nii2 = write_phantoms(tmp_path / "f", n_patients=1, spatial_dims=3, fmt="nii.gz", size=16)
    assert (nii.parent / "P0000_00.nii.gz").read_bytes() == (
        nii2.parent / "P0000_00.nii.gz"
    ).read_bytes()
