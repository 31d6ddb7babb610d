"""kill -9 (issue 14): an audit or a detector training killed while training leaves
nothing that a rerun trips over, the rerun resumes and gives the result of an
uninterrupted run (compared by hash), and no temporary folder survives it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from medmem.cli import main
from medmem.data import write_phantoms

# Two-epoch detectors on phantoms: the resume plumbing, not meant to learn, and the detector
# says so (tests/unit/test_detector.py checks that warning). Any other medmem warning fails.
pytestmark = pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning")


CHECKPOINT = "checkpoint.safetensors"


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill9")
    write_phantoms(root / "train", n_patients=8, follow_ups=2, size=32)
    write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    write_phantoms(root / "syn", n_patients=4, size=32, fmt="npy", first_patient=200)
    return root


def _kill_when(args: list[str], checkpoints: Path) -> None:
    """Run ``medmem ARGS`` in a subprocess; SIGKILL it once a checkpoint is under
    ``checkpoints``."""
    # the same thread count as this process, which runs the reference and the rerun: float
    # sums in another order would differ in the last bits, and the hashes with them
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": "src"}
    code = "import sys; from medmem.cli import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoints.is_dir() and any(checkpoints.rglob(CHECKPOINT))):
            assert proc.poll() is None, f"medmem ended ({proc.returncode}) before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"


def audit_args(sets: Path, out: Path) -> list[str]:
    return [
        "--quiet",
        "audit",
        *("--train", str(sets / "train"), "--val", str(sets / "val")),
        *("--synthetic", str(sets / "syn"), "--out", str(out)),
        *("--epochs", "3", "--batch-size", "8", "--image-size", "32,32"),
        *("--no-early-stopping", "--n-bootstrap", "20", "--no-controls"),
    ]


def result_hashes(out: Path) -> dict[str, str]:
    """SHA-256 of the tables and weights, and of summary.json without its timings."""
    hashes = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix in {".csv", ".safetensors"}
    }
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("timings_s")
    hashes["summary"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return hashes


def _leftovers(folder: Path) -> list[str]:
    return [
        p.name
        for p in folder.iterdir()
        if any(t in p.name for t in ("medmem-partial-", "medmem-old-", "medmem-resume", ".lock"))
    ]


@pytest.mark.slow
def test_audit_killed_mid_training_reruns_to_the_same_result(sets, tmp_path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "audit"
    assert CliRunner().invoke(main, audit_args(sets, ref)).exit_code == 0
    _kill_when(audit_args(sets, out), tmp_path / f".{out.name}.medmem-resume")
    assert not out.exists()
    r = CliRunner().invoke(main, audit_args(sets, out))  # the rerun: resumes, then finishes
    assert r.exit_code == 0, r.output
    assert result_hashes(out) == result_hashes(ref)
    assert not _leftovers(tmp_path)


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.mark.slow
def test_train_detector_killed_mid_training_reruns_to_the_same_detector(sets, tmp_path) -> None:
    def args(out: Path, ckpt: Path) -> list[str]:
        return [
            "--quiet",
            "train-detector",
            *("--train", str(sets / "train"), "--out", str(out)),
            *("--checkpoint-dir", str(ckpt), "--epochs", "3", "--batch-size", "8"),
            *("--image-size", "32,32", "--no-early-stopping"),
        ]

    ref = tmp_path / "ref"
    assert CliRunner().invoke(main, args(ref, tmp_path / "ref-ckpt")).exit_code == 0
    out, ckpt = tmp_path / "det", tmp_path / "ckpt"
    _kill_when(args(out, ckpt), ckpt)
    assert not out.exists() or not (out / "config.json").exists()
    r = CliRunner().invoke(main, args(out, ckpt))
    assert r.exit_code == 0, r.output
    assert _tree(out) == _tree(ref)
    assert not _leftovers(tmp_path)
