"""The audit resumes its detector training after a kill (issue 14): checkpoints are kept
beside --out, a rerun picks them up and gives the same numbers as an uninterrupted run,
and they are removed once the output is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from medmem._resume import resume_root
from medmem.cli import main
from medmem.data import write_phantoms
from medmem.detector import _checkpoint

# Two-epoch detectors on phantoms: the resume plumbing, not meant to learn, and the detector
# says so (tests/unit/test_detector.py checks that warning). Any other medmem warning fails.
pytestmark = pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_phantoms(root / "train", n_patients=8, follow_ups=2, size=32)
    write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    write_phantoms(root / "syn", n_patients=4, size=32, fmt="npy", first_patient=200)
    return root


def audit_args(sets: Path, out: Path) -> list[str]:
    return [
        "--quiet",
        "audit",
        *("--train", str(sets / "train"), "--val", str(sets / "val")),
        *("--synthetic", str(sets / "syn"), "--out", str(out)),
        *("--epochs", "2", "--batch-size", "8", "--image-size", "32,32"),
        *("--no-early-stopping", "--n-bootstrap", "20", "--no-controls"),
    ]


def result_hashes(out: Path) -> dict[str, str]:
    """SHA-256 of every output that does not hold timings, and of summary.json without them."""
    hashes = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.suffix in {".csv", ".safetensors"}:
            hashes[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("timings_s")
    summary["sources"] = None
    hashes["summary"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return hashes


@pytest.mark.cpu_exact
def test_audit_killed_while_training_resumes_with_identical_numbers(
    sets, tmp_path, monkeypatch, caplog
) -> None:
    ref = tmp_path / "ref"
    r = CliRunner().invoke(main, audit_args(sets, ref))
    assert r.exit_code == 0, r.output
    assert not resume_root(ref).exists()  # removed once the output is written

    out = tmp_path / "audit"
    real = _checkpoint.save_checkpoint

    def killed_after_first_epoch(directory, **kw):
        real(directory, **kw)
        raise RuntimeError("simulated kill after epoch 1")

    monkeypatch.setattr(_checkpoint, "save_checkpoint", killed_after_first_epoch)
    r = CliRunner().invoke(main, audit_args(sets, out))
    assert isinstance(r.exception, RuntimeError), r.output
    assert not out.exists()
    kept = list(resume_root(out).rglob("*.safetensors"))
    assert kept, "the checkpoint of epoch 1 is kept beside --out"
    monkeypatch.setattr(_checkpoint, "save_checkpoint", real)

    with caplog.at_level("INFO", logger="medmem"):
        r = CliRunner().invoke(main, audit_args(sets, out))
    assert r.exit_code == 0, r.output
    assert any("resuming detector training" in rec.getMessage() for rec in caplog.records)
    assert result_hashes(out) == result_hashes(ref)
    assert not resume_root(out).exists()
    assert not [p for p in tmp_path.iterdir() if "medmem-" in p.name]
