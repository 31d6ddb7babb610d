"""The CLI end to end on tiny phantom data: train-detector, audit, demo, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medmem import MedmemWarning
from medmem.cli import main
from medmem.data import write_phantoms
from medmem.demo import DemoConfig, run_demo

# The CLI runs here train detectors for two or three epochs on phantoms: plumbing, not meant to
# learn, and the detector says so (tests/unit/test_detector.py checks that warning).
pytestmark = pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning")

TINY = ["--epochs", "2", "--batch-size", "8", "--image-size", "32,32", "--n-bootstrap", "50"]


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    write_phantoms(root / "train", n_patients=12, follow_ups=2, size=32, fmt="png")
    write_phantoms(root / "val", n_patients=20, size=32, fmt="dcm", first_patient=100)
    write_phantoms(root / "syn", n_patients=6, size=32, fmt="npy", first_patient=200)
    return root


def _run(args: list[str]) -> object:
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


def _sets_args(phantom_sets) -> list[str]:
    """``--train/--val/--synthetic`` for the shared phantom sets."""
    return [
        f"--{flag}={phantom_sets / name}"
        for flag, name in (("train", "train"), ("val", "val"), ("synthetic", "syn"))
    ]


def test_audit_cli_trains_a_detector_and_writes_outputs(phantom_sets, tmp_path) -> None:
    out = tmp_path / "audit"
    r = _run(
        [
            "audit",
            "--train",
            str(phantom_sets / "train"),
            "--val",
            str(phantom_sets / "val" / "manifest.csv"),
            "--synthetic",
            str(phantom_sets / "syn" / "*.npy"),
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert r.exit_code == 0, r.output
    assert "N_mem" in r.output and "N_copies" in r.output
    s = json.loads((out / "summary.json").read_text())
    assert (s["n_train"], s["n_val"], s["n_synthetic"]) == (24, 20, 6)
    assert s["pct_copies_denominator"] == "n_synthetic"
    assert len(s["fingerprints"]["detector"]) == 64
    t = pd.read_csv(out / "training.csv")
    assert len(t) == 24 and t["memorized"].dtype == bool
    assert (out / "histogram.png").stat().st_size > 1000
    # refused without --overwrite, and nothing changed
    before = (out / "summary.json").read_bytes()
    r2 = CliRunner().invoke(
        main,
        [
            "audit",
            "--train",
            str(phantom_sets / "train"),
            "--val",
            str(phantom_sets / "val"),
            "--synthetic",
            str(phantom_sets / "syn"),
            "--out",
            str(out),
        ],
    )
    assert r2.exit_code == 2
    assert "exists" in r2.output and "--overwrite" in r2.output
    assert (out / "summary.json").read_bytes() == before


def test_train_detector_then_audit_with_it_is_reproducible(phantom_sets, tmp_path) -> None:
    det = tmp_path / "det"
    r = _run(
        [
            "train-detector",
            "--train",
            str(phantom_sets / "train"),
            "--out",
            str(det),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "32,32",
        ]
    )
    assert r.exit_code == 0, r.output
    assert (det / "config.json").exists() and (det / "model.safetensors").exists()
    outs = []
    for name in ("a1", "a2"):
        r = _run(
            [
                "audit",
                "--train",
                str(phantom_sets / "train"),
                "--val",
                str(phantom_sets / "val"),
                "--synthetic",
                str(phantom_sets / "syn"),
                "--detector",
                str(det),
                "--out",
                str(tmp_path / name),
                "--n-bootstrap",
                "20",
            ]
        )
        assert r.exit_code == 0, r.output
        outs.append(pd.read_csv(tmp_path / name / "synthetic.csv"))
    pd.testing.assert_frame_equal(outs[0], outs[1])


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--patient-id-pattern", "^(P\\d+)_"], "patients are in both"), ([], "images are in both")],
)
def test_patient_overlap_is_refused(phantom_sets, tmp_path, extra, match) -> None:
    r = CliRunner().invoke(
        main,
        [
            "--quiet",
            "audit",
            *extra,
            "--train",
            str(phantom_sets / "train"),
            "--val",
            str(phantom_sets / "train"),
            "--synthetic",
            str(phantom_sets / "syn"),
            "--out",
            str(tmp_path / "o"),
            *TINY,
        ],
    )
    assert r.exit_code == 2
    assert match in r.output
    assert not (tmp_path / "o").exists()


def test_mixed_2d_3d_sets_are_refused(phantom_sets, tmp_path) -> None:
    vols = tmp_path / "vols"
    write_phantoms(vols, n_patients=3, spatial_dims=3, size=16, fmt="npy", first_patient=300)
    r = CliRunner().invoke(
        main,
        [
            "--quiet",
            "audit",
            "--train",
            str(phantom_sets / "train"),
            "--val",
            str(phantom_sets / "val"),
            "--synthetic",
            str(vols),
            "--out",
            str(tmp_path / "o"),
            *TINY,
        ],
    )
    assert r.exit_code == 2
    assert "2D" in r.output and "3D" in r.output


def test_empty_synthetic_folder_is_refused(phantom_sets, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(
        main,
        [
            "audit",
            "--train",
            str(phantom_sets / "train"),
            "--val",
            str(phantom_sets / "val"),
            "--synthetic",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2
    assert str(tmp_path / "empty") in r.output


def test_help_has_examples() -> None:
    for cmd in ("audit", "train-detector", "demo"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output


def test_tiny_demo_recovers_known_copies(tmp_path) -> None:
    cfg = DemoConfig(
        image_size=(32, 32),
        n_train_patients=20,
        n_val_patients=20,
        n_novel=20,
        n_exact_copies=5,
        n_varied_copies=5,
        epochs=3,
        batch_size=16,
    )
    # 40 real and 30 synthetic images, 128 features: the FID is biased and the demo says so
    with pytest.warns(MedmemWarning, match="FID from 40 real .* strongly biased"):
        report = run_demo(tmp_path / "demo", config=cfg, quiet=True)
    rec = json.loads((tmp_path / "demo" / "demo_recovery.json").read_text())
    assert "sensitivity on known copies" in report
    assert rec["exact copy"]["called_copy"] == 5  # exact copies correlate 1.0 >= tau
    assert rec["exact copy"]["n"] == 5 and rec["novel"]["n"] == 20
    truth = pd.read_csv(tmp_path / "demo" / "data" / "ground_truth.csv")
    syn = pd.read_csv(tmp_path / "demo" / "audit" / "synthetic.csv")
    assert set(truth["synthetic_id"]) == set(syn["synthetic_id"])
    assert np.isfinite(rec["false_copy_rate_novel"])


def test_skip_unreadable_lists_skipped_files_in_summary(phantom_sets, tmp_path) -> None:
    import shutil

    syn = tmp_path / "syn"
    shutil.copytree(phantom_sets / "syn", syn)
    (syn / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    args = [
        "--train",
        str(phantom_sets / "train"),
        "--val",
        str(phantom_sets / "val"),
        "--synthetic",
        str(syn),
        *TINY,
    ]
    r = CliRunner().invoke(main, ["--quiet", "audit", *args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "broken.png" in r.output
    assert not (tmp_path / "a").exists()
    with pytest.warns(MedmemWarning, match="skipped 1 unreadable"):
        r = _run(["audit", *args, "--skip-unreadable", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["n_synthetic"] == 6
    assert [f["set"] for f in s["skipped_files"]] == ["synthetic"]
    assert s["skipped_files"][0]["path"].endswith("broken.png")


def test_summary_carries_controls_chance_and_patients(phantom_sets, tmp_path) -> None:
    base = [
        "audit",
        "--train",
        str(phantom_sets / "train"),
        "--val",
        str(phantom_sets / "val"),
        "--synthetic",
        str(phantom_sets / "syn"),
        *TINY,
    ]
    r = _run(
        [
            *base,
            "--patient-id-pattern",
            r"^(P\d+)_",
            "--n-controls",
            "10",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert r.exit_code == 0, r.output
    assert "positive controls caught" in r.output and "expected by chance" in r.output
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    c = s["controls"]
    assert c["n"] == 10 and 0 <= c["caught"] <= 10
    assert c["sensitivity"] == pytest.approx(c["caught"] / 10)
    # changes the detector never trained on, reported per kind
    assert c["kinds"] == ["elastic", "sharpen", "patch"] == c["held_out_kinds"]
    assert sum(k["n"] for k in c["per_kind"].values()) == 10
    ch = s["chance"]
    assert ch["expected_copies"] == pytest.approx(ch["false_copy_rate"] * 6)
    assert ch["excess_copies"] == pytest.approx(s["n_copies"] - ch["expected_copies"])
    assert len(ch["expected_copies_ci"]) == 2 and len(ch["excess_copies_ci"]) == 2
    p = s["patients"]
    assert p["n_train_patients"] == 12
    t = pd.read_csv(tmp_path / "a" / "training.csv")
    assert p["n_patients_mem"] == t.loc[t["memorized"], "patient_id"].nunique()
    assert t.groupby("patient_id")["patient_memorized"].nunique().max() == 1
    # controls never appear among the outputs
    syn = pd.read_csv(tmp_path / "a" / "synthetic.csv")
    assert len(syn) == s["n_synthetic"] == 6
    r = _run([*base, "--no-controls", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    s2 = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "controls" not in s2 and "patients" not in s2


def test_null_synthetic_flag_round_trips_into_summary_and_verdict(phantom_sets, tmp_path) -> None:
    write_phantoms(tmp_path / "null", n_patients=8, size=32, fmt="npy", first_patient=300)
    out = tmp_path / "a"
    r = _run(
        [
            "audit",
            *_sets_args(phantom_sets),
            "--null-synthetic",
            str(tmp_path / "null"),
            "--patient-id-pattern",
            r"^(P\d+)_",
            "--no-controls",
            "--score",
            "embedding",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert r.exit_code == 0, r.output
    assert "expected from a generator that never saw the training set" in r.output
    s = json.loads((out / "summary.json").read_text())
    null = s["null_synthetic"]
    assert null["n"] == 8 and 0 <= null["n_above_tau"] <= 8
    assert null["expected_copies"] == pytest.approx(null["share_above_tau"] * 6)
    assert s["sources"]["null_synthetic"].endswith("null")
    assert len(s["fingerprints"]["null_synthetic_set"]) == 64
    assert 'id="null-synthetic"' in (out / "report.html").read_text()
    r = CliRunner().invoke(main, ["audit", "--help"])
    assert "--null-synthetic" in r.output
