"""The audit's identity section on phantoms whose follow-ups share anatomy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import medmem
from medmem import calibrate, identity_section, nearest_patient
from medmem._audit import AuditResult
from medmem._errors import InputError
from medmem.data import ArrayDataset
from medmem.data.phantoms import write_phantoms


class PixelIdentityDetector:
    """An identity detector stand-in: pixels as embeddings, ``objective="identity"``."""

    config = SimpleNamespace(objective="identity")
    fingerprint = "0" * 50 + "pixelidentity"
    identity_training_ = {"n_repeat_patients": 12, "few_repeat_patients": True}

    def embed(self, dataset, **_: object) -> np.ndarray:
        return np.stack([np.asarray(dataset[i]).ravel() for i in range(len(dataset))])


class BlindCopyDetector:
    """A copy detector stand-in that sees no copies: a random embedding per image content."""

    fingerprint = "0" * 52 + "blinddetector"
    train_fingerprint_ = None

    def embed(self, dataset, **_: object) -> np.ndarray:
        rows = []
        for i in range(len(dataset)):
            x = np.asarray(dataset[i], dtype=np.float64)
            seed = int(abs(x.sum() * 1e6)) % 2**32
            rows.append(np.random.default_rng(seed).normal(size=16))
        return np.stack(rows)


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("idphantoms")
    write_phantoms(root / "train", n_patients=12, follow_ups=3, size=32, seed=0)
    write_phantoms(root / "val", n_patients=24, size=32, seed=0, first_patient=100)
    write_phantoms(root / "novel", n_patients=6, size=32, seed=0, first_patient=200)
    # the synthetic set: new images (follow-up 2) of 6 training patients and 6 novel
    # patients, as neutral .npy files (no name or metadata names a patient)
    write_phantoms(root / "npy", n_patients=6, follow_ups=3, size=32, seed=0, fmt="npy")
    write_phantoms(root / "npy", n_patients=6, size=32, seed=0, first_patient=200, fmt="npy")
    (root / "synth").mkdir()
    follow_ids = set()
    for k in range(6):
        shutil.copy(root / "npy" / f"P{k:04d}_02.npy", root / "synth" / f"f{k:02d}.npy")
        shutil.copy(root / "npy" / f"P{200 + k:04d}_00.npy", root / "synth" / f"n{k:02d}.npy")
        follow_ids.add(f"f{k:02d}.npy")
    train_files = [f for f in sorted((root / "train").glob("*.png")) if not f.stem.endswith("_02")]
    pat = r"^(P\d+)_"

    def load(paths):
        return medmem.load_dataset(paths, patient_id_pattern=pat, quiet=True)

    return {
        "train": load(train_files),
        "val": load(sorted((root / "val").glob("*.png"))),
        "synthetic": medmem.load_dataset(root / "synth", image_size=(128, 128), quiet=True),
        "follow_ids": follow_ids,
        "truth": {f"f{k:02d}.npy": f"P{k:04d}" for k in range(6)},
        "root": root,
    }


@pytest.fixture(scope="module")
def id_audit(phantom_sets, tmp_path_factory):
    s = phantom_sets
    r = medmem.audit(
        s["train"],
        s["val"],
        s["synthetic"],
        detector=BlindCopyDetector(),
        identity_detector=PixelIdentityDetector(),
        n_bootstrap=0,
        n_controls=0,
        score="embedding",
        quiet=True,
    )
    out = r.save(tmp_path_factory.mktemp("idaudit") / "audit")
    return r, out


def test_identity_columns_and_keys(id_audit, phantom_sets) -> None:
    r, out = id_audit
    for c in ("nearest_patient_id", "identity_corr", "identity", "nearest_patient_train_id"):
        assert c in r.synthetic.columns
    assert "patient_reidentified" in r.training.columns
    block = r.summary["identity"]
    for k in (
        "tau_identity",
        "n_synthetic_identity",
        "n_patients_reidentified",
        "n_train_patients",
        "calibration",
        "expected_by_chance",
    ):
        assert k in block
    assert block["n_synthetic_identity"] == int(r.synthetic["identity"].sum())
    hit_patients = set(r.synthetic.loc[r.synthetic["identity"], "nearest_patient_id"])
    assert block["n_patients_reidentified"] == len(hit_patients)
    assert set(r.training.loc[r.training["patient_reidentified"], "patient_id"]) == hit_patients
    # follow-ups of training patients score above novel patients (shared anatomy)
    is_follow = r.synthetic["synthetic_id"].isin(phantom_sets["follow_ids"])
    fol = r.synthetic.loc[is_follow, "identity_corr"].to_numpy()
    nov = r.synthetic.loc[~is_follow, "identity_corr"].to_numpy()
    assert fol.mean() > nov.mean()
    # nearest patient of a follow-up is its own patient
    own = r.synthetic.loc[is_follow]
    own_pid = own["synthetic_id"].map(phantom_sets["truth"])
    assert (own["nearest_patient_id"] == own_pid).mean() >= 0.8
    # saved: columns typed back, summary key, report section
    loaded = AuditResult.load(out)
    assert loaded.synthetic["identity"].dtype == bool
    assert loaded.training["patient_reidentified"].dtype == bool
    assert json.loads((out / "summary.json").read_text())["identity"] == block
    assert "re-identify a training patient" in medmem.format_verdict(r.summary)
    html = (out / "report.html").read_text()
    assert 'id="identity"' in html and 'id="tau-identity"' in html


def test_identity_threshold_is_calibrated_on_validation_patients(id_audit, phantom_sets) -> None:
    r, _ = id_audit
    s = phantom_sets
    det = PixelIdentityDetector()
    e_tr, e_va = det.embed(s["train"]), det.embed(s["val"])
    _, val_scores, _ = nearest_patient(e_va, e_tr, s["train"].patient_ids)
    assert r.summary["identity"]["tau_identity"] == pytest.approx(calibrate(val_scores, 95.0))
    assert r.summary["identity"]["val_rate_at_threshold"] <= 0.05 + 1 / (len(val_scores) + 1)


def test_calibration_rate_on_exchangeable_novel_patients() -> None:
    """Novel patients (drawn like the validation ones) cross the threshold at about alpha."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16))
    pids = [f"p{i // 2}" for i in range(200)]
    rates = []
    for _ in range(20):
        val, syn = rng.normal(size=(99, 16)), rng.normal(size=(400, 16))
        _block, cols, _flag = identity_section(
            train, val, syn, pids, train_ids=[f"t{i}" for i in range(200)]
        )
        rates.append(cols["identity"].mean())
    assert abs(np.mean(rates) - 0.05) < 0.02


def test_identity_needs_patient_ids_and_identity_detector(phantom_sets, pixel_detector) -> None:
    s = phantom_sets
    with pytest.raises(InputError, match="objective="):
        medmem.audit(
            s["train"], s["val"], s["synthetic"], detector=pixel_detector,
            identity_detector=SimpleNamespace(config=SimpleNamespace(objective="copy")),
            n_bootstrap=0, n_controls=0, score="embedding", quiet=True,
        )  # fmt: skip
    tr = s["train"]
    no_ids = ArrayDataset(np.stack([tr[i][0].numpy() for i in range(len(tr))]))
    with pytest.raises(InputError, match="patient id"):
        medmem.audit(
            no_ids, s["val"], s["synthetic"], detector=pixel_detector,
            identity_detector=PixelIdentityDetector(), n_bootstrap=0, n_controls=0,
            score="embedding", quiet=True, allow_patient_overlap=True,
        )  # fmt: skip


@pytest.mark.filterwarnings(
    "ignore:validation patients not checked:medmem.MedmemWarning"
)  # an in-memory validation set: screen says so; this test is about identity hits
def test_screen_drops_identity_hits(id_audit, phantom_sets, tmp_path: Path) -> None:
    r, out = id_audit
    from medmem.screen import screen

    syn = phantom_sets["root"] / "synth"
    plain = screen(out, tmp_path / "rel1", synthetic=syn, quiet=True)
    dropped = screen(out, tmp_path / "rel2", synthetic=syn, quiet=True, drop=["identity"])
    hits = r.synthetic["identity"] & ~r.synthetic["copy"]
    assert int(hits.sum()) > 0
    assert dropped.n_identity == int(hits.sum())
    assert dropped.n_released == plain.n_released - int(hits.sum())
    readme = (tmp_path / "rel2" / "README.txt").read_text()
    assert f"{int(hits.sum())} images that re-identify a training patient" in readme
    with pytest.raises(InputError, match="unknown verdict"):
        screen(out, tmp_path / "rel3", synthetic=syn, quiet=True, drop=["patients"])


def test_screen_drop_identity_needs_identity_section(phantom_sets, pixel_detector, tmp_path):
    s = phantom_sets
    r = medmem.audit(
        s["train"], s["val"], s["synthetic"], detector=pixel_detector, n_bootstrap=0,
        n_controls=0, score="embedding", quiet=True,
    )  # fmt: skip
    out = r.save(tmp_path / "a", figures=False)
    from medmem.screen import screen

    with pytest.raises(InputError, match="no identity section"):
        screen(out, tmp_path / "rel", synthetic=s["root"] / "synth", quiet=True, drop=["identity"])


def test_report_identity_section_escapes_data_text() -> None:
    from medmem import audit_embeddings
    from medmem._identity import add_identity
    from medmem.report import render_report

    rng = np.random.default_rng(0)
    tr, va = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    syn = tr[:3] + 0.01
    evil = ["<script>alert(1)</script>"] * 30
    r = audit_embeddings(tr, va, syn, train_patient_ids=evil, n_bootstrap=0)
    block, cols, flag = identity_section(
        tr, va, syn, evil, train_ids=[f"<b>t{i}</b>" for i in range(30)]
    )
    add_identity(r, block, cols, flag)
    assert block["n_synthetic_identity"] == 3
    html = render_report(r)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;t0&lt;/b&gt;" in html
