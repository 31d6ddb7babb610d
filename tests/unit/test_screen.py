"""medmem.screen: the release set holds no copy and nothing that names a training image."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import medmem
from medmem import InputError, OutputExistsError
from medmem.cli import main
from medmem.data import load_dataset, write_phantoms
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
    result = medmem.audit(
        train, val, synthetic, detector=pixel_detector, n_bootstrap=50, quiet=True
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
    r = screen(audited / "audit", out, quiet=True)
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
    # byte-for-byte copies of the synthetic files; the training-named one renamed
    assert r.renamed == {"sample_P0003_00.npy": "synthetic_00001.npy"}
    back = {v: k for k, v in r.renamed.items()}
    for f in manifest["file"]:
        assert sha(out / f) == sha(audited / "syn" / back.get(f, f))
    assert manifest.set_index("file").loc["synthetic_00001.npy", "renamed"]
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
    base = screen(audited / "audit", tmp_path / "a", quiet=True)
    syn = pd.read_csv(audited / "audit" / "synthetic.csv")
    tau = json.loads((audited / "audit" / "summary.json").read_text())["tau"]
    novel = np.sort(syn.loc[~syn["copy"], "nearest_train_corr"].to_numpy())
    margin = float(tau - np.median(novel)) + 1e-9
    wide = screen(audited / "audit", tmp_path / "b", margin=margin, quiet=True)
    assert wide.n_released < base.n_released and wide.n_margin > 0
    kept = pd.read_csv(tmp_path / "b" / "release_manifest.csv")
    assert (kept["nearest_train_corr"] < tau - margin).all() and (kept["margin"] == margin).all()
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
    r = screen(audited / "audit", tmp_path / "ok", synthetic=str(moved), quiet=True)
    assert r.n_released > 0


def test_existing_output_is_refused_without_overwrite(audited, tmp_path) -> None:
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        screen(audited / "audit", out)
    assert (out / "keep.txt").read_text() == "mine"
    screen(audited / "audit", out, overwrite=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "release_manifest.csv").exists()
    with pytest.raises(InputError, match="outside the audit folder"):
        screen(audited / "audit", audited / "audit" / "release")
    with pytest.raises(InputError, match="not an audit folder"):
        screen(tmp_path, tmp_path / "x")


def test_screen_cli(audited, tmp_path) -> None:
    out = tmp_path / "release"
    args = ["--quiet", "screen", "--audit", str(audited / "audit"), "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "released" in r.output and "withheld" in r.output
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 2 and "exists" in r2.output


def test_dicom_series_are_released_as_folders(tmp_path, pixel_detector) -> None:
    """3D: DICOM series folders in, the same folders (slice files byte for byte) out."""
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
    for folder in series:
        src = sorted((syn / folder).iterdir())
        dst = sorted((tmp_path / "release" / folder).iterdir())
        assert [p.name for p in dst] == [p.name for p in src] and len(src) == 16
        assert [sha(p) for p in dst] == [sha(p) for p in src]
