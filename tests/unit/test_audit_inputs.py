"""Early audit checks (issue 14): bad pixels in any set, a detector that does not fit, and
re-encoded train/val duplicates fail before the detector trains; patient overlap is
"unknown" without patient ids."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import medmem
from medmem import InputError
from medmem._audit_inputs import check_detector_fits, patient_overlap_status
from medmem.data import ArrayDataset, load_dataset, read_image, write_phantoms
from medmem.detector import Detector, DetectorConfig
from medmem.detector._detector import build_encoder


@pytest.fixture()
def sets(tmp_path):
    write_phantoms(tmp_path / "train", n_patients=8, size=32)
    write_phantoms(tmp_path / "val", n_patients=24, size=32, first_patient=100)
    write_phantoms(tmp_path / "syn", n_patients=4, size=32, fmt="npy", first_patient=200)
    return tmp_path


def _no_training(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("the detector trained before the inputs were checked")

    monkeypatch.setattr(Detector, "train", refuse)


def _load(sets, name: str):
    return load_dataset(sets / name, image_size=(32, 32), quiet=True)


@pytest.mark.parametrize(
    ("which", "pixels", "words"),
    [
        ("val", np.full((32, 32), 3.0, np.float32), "is constant"),
        ("syn", np.full((32, 32), np.nan, np.float32), "NaN"),
        ("syn", np.zeros((2, 2, 2, 2), np.float32), "syn"),
    ],
)
def test_bad_pixels_in_any_set_fail_before_the_detector_trains(
    sets, monkeypatch, which, pixels, words
) -> None:
    bad = sets / which / "zz_bad.npy"
    np.save(bad, pixels)
    _no_training(monkeypatch)
    with pytest.raises(InputError, match=words) as info:
        tr = _load(sets, "train")
        medmem.audit(tr, _load(sets, "val"), _load(sets, "syn"), n_controls=0, quiet=True)
    assert "zz_bad.npy" in str(info.value)


def test_constant_synthetic_image_is_named_before_training(sets, monkeypatch) -> None:
    np.save(sets / "syn" / "blank.npy", np.zeros((32, 32), np.float32))
    syn = _load(sets, "syn")
    _no_training(monkeypatch)
    with pytest.raises(InputError, match=r"blank\.npy.*constant"):
        medmem.audit(_load(sets, "train"), _load(sets, "val"), syn, n_controls=0, quiet=True)


def _fake_detector(**cfg):
    config = SimpleNamespace(**{"spatial_dims": 2, "image_size": (32, 32), **cfg})
    return SimpleNamespace(fingerprint="f" * 64, config=config, source_="/models/det")


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({"spatial_dims": 3, "image_size": (32, 32, 32)}, "is for 3D images"),
        ({"image_size": (64, 64)}, r"trained on images of size \(64, 64\)"),
        ({"in_channels": 3}, "3-channel"),
    ],
)
def test_detector_that_does_not_fit_the_images_is_named(cfg, words) -> None:
    ds = ArrayDataset(np.random.default_rng(0).random((4, 32, 32)))
    with pytest.raises(InputError, match=words) as info:
        check_detector_fits(_fake_detector(**cfg), ds)
    assert "/models/det" in str(info.value) and "--detector" in str(info.value)


def test_detector_without_fingerprint_is_refused(tmp_path) -> None:
    ds = ArrayDataset(np.random.default_rng(0).random((4, 32, 32)))
    with pytest.raises(InputError, match="no fingerprint"):
        check_detector_fits(SimpleNamespace(fingerprint=None, config=None), ds)
    cfg = DetectorConfig(spatial_dims=2, image_size=(32, 32), arch="conv", embed_dim=8)
    det = Detector(cfg)
    det.model_ = build_encoder(cfg).eval()
    det.save(tmp_path / "det")
    assert Detector.load(tmp_path / "det").source_ == str(tmp_path / "det")
    meta = (tmp_path / "det" / "config.json").read_text()
    import json

    d = json.loads(meta)
    d.pop("fingerprint")
    (tmp_path / "det" / "config.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="config.json: has no 'fingerprint' entry"):
        Detector.load(tmp_path / "det")


def test_re_encoded_train_image_in_val_is_an_error_naming_both_files(sets, monkeypatch) -> None:
    src = sets / "train" / "P0003_00.png"
    np.save(sets / "val" / "copy_of_P0003.npy", read_image(src))  # other format, same pixels
    _no_training(monkeypatch)
    with pytest.raises(InputError, match="same pixels") as info:
        medmem.audit(
            _load(sets, "train"), _load(sets, "val"), _load(sets, "syn"), n_controls=0, quiet=True
        )
    msg = str(info.value)
    assert "P0003_00.png" in msg and "copy_of_P0003.npy" in msg and "--allow-patient-overlap" in msg


def test_patient_overlap_is_unknown_without_ids(pixel_detector) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.random((60, 16, 16)).astype(np.float32)
    tr, va, sy = imgs[:20], imgs[20:50], imgs[50:]
    r = medmem.audit(
        ArrayDataset(tr),
        ArrayDataset(va),
        ArrayDataset(sy),
        detector=pixel_detector,
        n_controls=0,
        n_bootstrap=10,
        quiet=True,
    )
    assert r.summary["patient_overlap"] == "unknown"
    assert r.summary["n_patients_shared_train_val"] is None
    with_ids = medmem.audit(
        ArrayDataset(tr, patient_ids=[f"T{i // 2}" for i in range(20)]),
        ArrayDataset(va, patient_ids=[f"V{i}" for i in range(30)]),
        ArrayDataset(sy),
        detector=pixel_detector,
        n_controls=0,
        n_bootstrap=10,
        quiet=True,
    )
    assert with_ids.summary["patient_overlap"] == "none"
    assert with_ids.summary["n_patients_shared_train_val"] == 0
    one = ArrayDataset(tr[:2], patient_ids=["A", "B"])
    assert patient_overlap_status(one, ArrayDataset(va[:2], patient_ids=["B", "C"]), 1) == "shared"


def test_a_dataset_probed_before_is_not_read_again() -> None:
    from medmem._audit_inputs import probe_images

    class Counting(ArrayDataset):
        reads = 0

        def __getitem__(self, i):
            Counting.reads += 1
            return super().__getitem__(i)

    ds = Counting(np.random.default_rng(0).random((5, 8, 8)))
    first = probe_images({"training": ds}, hash_sets=("training",), quiet=True)
    again = probe_images({"training": ds}, hash_sets=("training",), quiet=True)
    assert Counting.reads == 5 and first == again and len(first["training"]) == 5
