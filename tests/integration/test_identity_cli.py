"""CLI: train-detector --objective identity, audit --identity-detector, screen --drop identity."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from medmem.cli import main
from medmem.data.phantoms import write_phantoms


def _run(args: list[str]) -> object:
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


@pytest.mark.filterwarnings(
    "ignore:only .* training patients have two or more images:medmem.MedmemWarning",
    "ignore:the detector did not learn:medmem.MedmemWarning",
    "ignore:the copy detector was trained with objective='identity':medmem.MedmemWarning",
)  # tiny phantoms, one epoch: this test is about the files the commands write
def test_identity_cli_round_trip(tmp_path) -> None:
    write_phantoms(tmp_path / "train", n_patients=8, follow_ups=2, size=32, seed=0)
    write_phantoms(tmp_path / "val", n_patients=20, size=32, seed=0, first_patient=100)
    write_phantoms(tmp_path / "syn", n_patients=6, size=32, seed=0, first_patient=200, fmt="npy")
    pat = ["--patient-id-pattern", r"^(P\d+)_", "--image-size", "32,32"]
    r = _run(
        ["train-detector", "--train", str(tmp_path / "train"), "--out", str(tmp_path / "det"),
         "--objective", "identity", "--epochs", "1", "--batch-size", "4",
         "--no-early-stopping", *pat]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "det" / "config.json").read_text())
    assert cfg["config"]["objective"] == "identity"
    assert cfg["identity_training"]["n_repeat_patients"] == 8
    r = _run(
        ["audit", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
         "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "audit"),
         "--detector", str(tmp_path / "det"), "--identity-detector", str(tmp_path / "det"),
         "--n-controls", "0", "--n-bootstrap", "0", "--score", "embedding", *pat]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["identity"]["n_train_patients"] == 8
    syn = pd.read_csv(tmp_path / "audit" / "synthetic.csv")
    assert {"nearest_patient_id", "identity_corr", "identity"} <= set(syn.columns)
    assert "patient_reidentified" in pd.read_csv(tmp_path / "audit" / "training.csv").columns
    r = _run(
        ["screen", "--audit", str(tmp_path / "audit"), "--out", str(tmp_path / "rel"),
         "--drop", "identity", "--force"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
