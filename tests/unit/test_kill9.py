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
from collections.abc import Callable
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
    _kill_once(
        args,
        lambda: checkpoints.is_dir() and any(checkpoints.rglob(CHECKPOINT)),
        "a checkpoint",
        poll=0.02,
    )


def _kill_once(args: list[str], ready: Callable[[], bool], what: str, poll: float) -> None:
    """Run ``medmem ARGS`` in a subprocess; SIGKILL it as soon as ``ready()`` holds."""
    # the same thread count as this process, which runs the reference and the rerun: float
    # sums in another order would differ in the last bits, and the hashes with them
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": "src"}
    code = "import sys; from medmem.cli import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert proc.poll() is None, f"medmem ended ({proc.returncode}) before {what}"
            assert time.monotonic() < deadline, f"no {what} within 120 s"
            time.sleep(poll)
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


@pytest.mark.cpu_exact
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


@pytest.mark.cpu_exact
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


def _confidential_leftovers(root: Path) -> list[str]:
    """Temporary folders and files of a medmem run anywhere under ``root``."""
    marks = ("medmem-partial-", "medmem-old-", "medmem-resume", ".lock")
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if any(m in p.name for m in marks)
    )


@pytest.mark.slow
def test_screen_killed_midway_leaves_nothing_and_reruns(tmp_path, pixel_detector) -> None:
    """A release set being written is killed: no partial release survives the rerun, and
    the rerun writes the same release as an uninterrupted run."""
    import numpy as np

    import medmem
    from medmem.data import load_dataset

    write_phantoms(tmp_path / "train", n_patients=24, size=32)
    write_phantoms(tmp_path / "val", n_patients=24, size=32, first_patient=100)
    syn = tmp_path / "syn"
    syn.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):  # enough files that writing the release takes a while
        np.save(syn / f"s{i:04d}.npy", rng.random((32, 32), dtype=np.float32))
    sets = [
        load_dataset(str(tmp_path / name), image_size=(32, 32), quiet=True)
        for name in ("train", "val", "syn")
    ]
    # the paper's tau: 400 synthetic images against 20 validation images are too many for
    # the default tau_mem; this test is about the release set, not the thresholds
    result = medmem.audit(
        *sets,
        detector=pixel_detector,
        n_bootstrap=0,
        n_controls=0,
        quiet=True,
        calibration="paper",
        score="embedding",
    )
    result.save(tmp_path / "audit")
    args = ["--quiet", "screen", "--audit", str(tmp_path / "audit")]
    ref, out = tmp_path / "ref", tmp_path / "release"
    assert CliRunner().invoke(main, [*args, "--out", str(ref)]).exit_code == 0
    partial = f".{out.name}.medmem-partial-"
    _kill_once(
        [*args, "--out", str(out)],
        lambda: any(p.name.startswith(partial) for p in tmp_path.iterdir()),
        "a partial release",
        poll=0.005,
    )
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert _tree(out) == _tree(ref)
    assert not _confidential_leftovers(tmp_path)


@pytest.mark.cpu_exact
@pytest.mark.slow
def test_generate_train_killed_after_a_checkpoint_resumes_and_leaves_nothing(tmp_path) -> None:
    from importlib.util import find_spec

    if find_spec("einops") is None:
        pytest.skip("the LDM's DiffusionModelUNet needs einops (pip install einops)")
    from importlib.util import module_from_spec, spec_from_file_location

    # the tiny LDM config of the generate CLI tests, with enough iterations to be killed
    spec = spec_from_file_location(
        "generate_cli_tests", Path(__file__).parents[1] / "integration" / "test_generate_cli.py"
    )
    assert spec is not None and spec.loader is not None
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    TINY_YAML = mod.TINY_YAML  # noqa: N806 - the module's constant

    write_phantoms(tmp_path / "train", n_patients=24, size=16, fmt="png")
    write_phantoms(tmp_path / "val", n_patients=8, size=16, fmt="png", first_patient=100)
    cfg = TINY_YAML.replace("iterations: 3", "iterations: 40").replace(
        "checkpoint_every: 2", "checkpoint_every: 1"
    )
    (tmp_path / "tiny.yaml").write_text(cfg)
    run = tmp_path / "run"
    args = ["--quiet", "generate", "train", "--config", str(tmp_path / "tiny.yaml")]
    _kill_when([*args, "--out", str(run)], tmp_path)
    r = CliRunner().invoke(main, [*args, "--out", str(run), "--resume"])
    assert r.exit_code == 0, r.output
    assert (run / "model").is_dir()
    assert not _confidential_leftovers(tmp_path)
