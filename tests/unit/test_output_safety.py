"""Output safety (issue 14): no command that writes may delete or mix with its inputs, two
writers to one --out cannot both succeed, output problems show before any work with the
flag named, and temporary folders of killed runs do not survive the next run; a near-blind
detector is flagged and not trusted by screen."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import medmem
from medmem import InputError
from medmem._audit import SENSITIVITY_FLOOR, format_verdict, low_sensitivity_warning
from medmem._errors import OutputError
from medmem._io import atomic_dir, claim_output
from medmem.cli import cli_message, main
from medmem.data import load_dataset, write_phantoms
from medmem.screen import screen


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    write_phantoms(root / "train", n_patients=6, follow_ups=2, size=32)
    write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    write_phantoms(root / "syn", n_patients=4, size=32, fmt="npy", first_patient=200)
    return root


def _audit_args(sets: Path, out: Path) -> list[str]:
    return [
        "audit",
        "--train",
        str(sets / "train"),
        "--val",
        str(sets / "val"),
        "--synthetic",
        str(sets / "syn"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--image-size",
        "32,32",
    ]


def _invoke(args: list[str]):
    return CliRunner().invoke(main, ["--quiet", *args])


@pytest.mark.parametrize("which", ["train", "val", "syn"])
def test_audit_out_equal_to_an_input_is_refused_with_the_folder_intact(sets, which) -> None:
    folder = sets / which
    before = tree_hash(folder)
    r = _invoke([*_audit_args(sets, folder), "--overwrite"])
    assert r.exit_code == 2, r.output
    msg = r.output
    assert "--out" in msg and str(folder) in msg and "input" in msg
    assert len(msg.strip().splitlines()) == 1
    assert tree_hash(folder) == before


def test_audit_out_containing_or_inside_an_input_is_refused(sets, tmp_path) -> None:
    before = tree_hash(sets / "train")
    # --out contains the training folder
    r = _invoke([*_audit_args(sets, sets), "--overwrite"])
    assert r.exit_code == 2 and "contains the input" in r.output, r.output
    # --out lies inside the synthetic folder (its outputs would be audited next time)
    inner = sets / "syn" / "audit"
    r = _invoke(_audit_args(sets, inner))
    assert r.exit_code == 2 and "lies inside the input" in r.output, r.output
    assert not inner.exists()
    assert tree_hash(sets / "train") == before


def test_manifest_inputs_are_protected(sets, tmp_path) -> None:
    # a manifest naming files elsewhere: an --out holding those files is refused
    with pytest.raises(OutputError, match="contains the input"):
        with claim_output(sets, inputs=[sets / "val" / "manifest.csv"], overwrite=True):
            pass
    with pytest.raises(OutputError, match="is the input"):
        with claim_output(sets / "val" / "manifest.csv", inputs=[sets / "val" / "manifest.csv"]):
            pass


def test_screen_out_inside_the_audit_folder_is_refused(tmp_path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    r = _invoke(["screen", "--audit", str(audit_dir), "--out", str(audit_dir / "release")])
    assert r.exit_code == 2 and "--out" in r.output and str(audit_dir) in r.output, r.output


def test_a_second_writer_to_the_same_out_fails_fast(sets, tmp_path) -> None:
    out = tmp_path / "audit"
    ready = tmp_path / "ready"
    holder = (
        "import sys, time, pathlib\n"
        "from medmem._io import claim_output\n"
        "with claim_output(sys.argv[1]):\n"
        "    pathlib.Path(sys.argv[2]).write_text('x')\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.perf_counter()
        r = _invoke(_audit_args(sets, out))
        assert time.perf_counter() - t0 < 10
        assert r.exit_code == 2, r.output
        assert "another medmem run is writing there" in r.output and "--out" in r.output
        assert not out.exists()
    finally:
        proc.kill()
        proc.wait()
    # the lock of a killed holder is no obstacle (the OS releases it)
    with claim_output(out) as claimed:
        assert claimed == out


def test_claims_in_one_thread_nest_and_are_released(tmp_path) -> None:
    out = tmp_path / "o"
    with claim_output(out), claim_output(out):
        pass
    assert not (tmp_path / ".o.lock").exists()
    with claim_output(out):
        pass


def test_stale_temporary_folders_of_a_killed_run_are_removed(tmp_path, caplog) -> None:
    out = tmp_path / "audit"
    stale = [tmp_path / ".audit.medmem-partial-ab12cd34", tmp_path / ".audit.medmem-old-zz99yy88"]
    legacy = tmp_path / ".audit.k3j4h5g6.tmp"  # the naming of earlier versions
    other = tmp_path / ".audit.v2.medmem-partial-ab12cd34"  # another output's: kept
    for d in [*stale, legacy, other]:
        (d / "x").mkdir(parents=True)
        (d / "x" / "summary.json").write_text("{}")
    # the next run to the same --out (here one that then fails on a missing input)
    r = _invoke(
        [
            "audit",
            "--train",
            str(tmp_path / "missing"),
            "--val",
            str(tmp_path / "missing"),
            "--synthetic",
            str(tmp_path / "missing"),
            "--out",
            str(out),
        ]
    )
    assert r.exit_code == 2, r.output
    assert not any(d.exists() for d in [*stale, legacy])
    assert other.exists()


def test_atomic_dir_temporary_folder_is_named_for_cleanup(tmp_path) -> None:
    out = tmp_path / "r"
    with atomic_dir(out) as tmp:
        assert tmp.name.startswith(".r.medmem-partial-")
    assert out.is_dir()


def test_out_that_is_a_file_is_refused_naming_the_flag(sets, tmp_path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("keep")
    r = _invoke([*_audit_args(sets, f), "--overwrite"])
    assert r.exit_code == 2 and "--out" in r.output and "is a file" in r.output, r.output
    assert "Traceback" not in r.output
    assert f.read_text() == "keep"
    r = _invoke(["train-detector", "--train", str(sets / "train"), "--out", str(f / "det")])
    assert r.exit_code == 2 and "--out" in r.output and "is a file" in r.output, r.output


def test_name_too_long_is_refused_naming_the_flag(sets, tmp_path) -> None:
    r = _invoke(_audit_args(sets, tmp_path / ("a" * 250)))
    assert r.exit_code == 2 and "--out" in r.output and "too long" in r.output, r.output


def test_read_only_location_is_refused_before_any_work(sets, tmp_path, monkeypatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # root ignores permission bits: the read-only check is driven through os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw)
    )
    r = _invoke(_audit_args(sets, ro / "audit"))
    assert r.exit_code == 2 and "--out" in r.output and "cannot write" in r.output, r.output
    assert list(ro.iterdir()) == []


def _disk_with_free(free: int):
    import shutil

    return lambda path: shutil._ntuple_diskusage(1 << 40, (1 << 40) - free, free)


def test_full_disk_is_refused_before_any_work_naming_out_and_the_space(
    sets, tmp_path, monkeypatch
) -> None:
    import medmem._io as io_mod

    monkeypatch.setattr(io_mod.shutil, "disk_usage", _disk_with_free(3 << 20))
    r = _invoke(_audit_args(sets, tmp_path / "audit"))
    assert r.exit_code == 2, r.output
    assert "--out" in r.output and "3 MiB free" in r.output and "128 MiB needed" in r.output
    assert "Free some space" in r.output and len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    # a screen needs room for the synthetic images it copies, on top of the floor
    monkeypatch.setattr(io_mod.shutil, "disk_usage", _disk_with_free(io_mod.MIN_FREE_BYTES + 1))
    need = io_mod.MIN_FREE_BYTES + io_mod.tree_bytes([sets / "syn"])
    with pytest.raises(OutputError, match=f"{need >> 20} MiB needed"):
        screen(tmp_path / "audit", tmp_path / "release", synthetic=str(sets / "syn"))
    # enough room: claimed
    monkeypatch.setattr(io_mod.shutil, "disk_usage", _disk_with_free(1 << 30))
    with claim_output(tmp_path / "x", need_bytes=1 << 29) as claimed:
        assert claimed == tmp_path / "x"


def test_cli_errors_name_flags_not_python_arguments() -> None:
    assert "--skip-unreadable" in cli_message("(or pass skip_unreadable=True to skip it).")
    assert cli_message("pass --overwrite (overwrite=True) to replace it.") == (
        "pass --overwrite to replace it."
    )
    assert "--patient-id-pattern" in cli_message("patient_id_pattern '^x' does not match")


def test_patient_id_pattern_applies_to_train_and_val_only(sets, tmp_path, monkeypatch) -> None:
    # synthetic names (P0200_00.npy...) renamed so that the pattern cannot match them
    syn = tmp_path / "syn"
    syn.mkdir()
    for p in sorted((sets / "syn").glob("*.npy")):
        (syn / f"sample-{p.stem[-4:]}{p.suffix}").write_bytes(p.read_bytes())
    import medmem.cli as cli

    loaded = []
    real = cli._load

    def spy(src, opts, **kw):
        ds = real(src, opts, **kw)
        loaded.append((kw.get("option", ""), ds))
        if kw.get("option") == "--synthetic":
            raise InputError("stop here")
        return ds

    monkeypatch.setattr(cli, "_load", spy)
    args = _audit_args(sets, tmp_path / "audit")
    args[args.index("--synthetic") + 1] = str(syn)
    r = _invoke([*args, "--patient-id-pattern", r"^(P\d+)_"])
    assert "stop here" in r.output, r.output
    assert [o for o, _ in loaded] == ["", "--val", "--synthetic"]
    assert loaded[0][1].patient_ids[0] == "P0000"


def _saved_audit(sets: Path, folder: Path, pixel_detector, sensitivity: float) -> Path:
    train = load_dataset(sets / "train", image_size=(32, 32), quiet=True)
    val = load_dataset(sets / "val", image_size=(32, 32), quiet=True)
    syn = load_dataset(str(sets / "syn"), image_size=(32, 32), quiet=True)
    result = medmem.audit(train, val, syn, detector=pixel_detector, n_bootstrap=20, quiet=True)
    result.summary["controls"] = {
        "n": 20,
        "caught": round(20 * sensitivity),
        "sensitivity": sensitivity,
        "sensitivity_ci": [max(0.0, sensitivity - 0.1), min(1.0, sensitivity + 0.1)],
    }
    result.save(folder)
    return folder


def test_low_control_sensitivity_warns_and_screen_refuses_unless_forced(
    sets, tmp_path, pixel_detector
) -> None:
    audit_dir = _saved_audit(sets, tmp_path / "audit", pixel_detector, 0.15)
    summary = json.loads((audit_dir / "summary.json").read_text())
    assert low_sensitivity_warning(summary) is not None
    verdict = format_verdict(summary)
    assert "WARNING" in verdict and "0.15" in verdict and str(SENSITIVITY_FLOOR) in verdict
    html = (audit_dir / "report.html").read_text()
    assert 'id="low-sensitivity"' in html
    out = tmp_path / "release"
    with pytest.raises(InputError, match=r"sensitivity 0\.15.*force"):
        screen(audit_dir, out, quiet=True)
    assert not out.exists()
    r = _invoke(["screen", "--audit", str(audit_dir), "--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.output and "force=True" not in r.output
    res = screen(audit_dir, out, quiet=True, force=True)
    assert out.is_dir() and res.n_released >= 1
    # at or above the floor: no warning
    summary["controls"]["sensitivity"] = 0.9
    assert low_sensitivity_warning(summary) is None
    assert "WARNING" not in format_verdict(summary)
    del summary["controls"]
    assert low_sensitivity_warning(summary) is None


def test_outputs_respect_the_umask(tmp_path) -> None:
    from medmem._io import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
            assert (tmp.stat().st_mode & 0o777) == 0o700  # private while being written
    finally:
        os.umask(old)
    assert ((tmp_path / "a.txt").stat().st_mode & 0o777) == 0o640
    assert ((tmp_path / "d").stat().st_mode & 0o777) == 0o750


def test_cli_warnings_are_one_logged_line_with_cli_flags(tmp_path, caplog, monkeypatch) -> None:
    import warnings

    from medmem.cli import _log_warning

    with caplog.at_level("WARNING", logger="medmem"):
        _log_warning(
            UserWarning("skipped 2 files;\n  pass skip_unreadable=True"), UserWarning, "x.py", 3
        )
    (rec,) = [r for r in caplog.records if r.name == "medmem"]
    assert rec.getMessage() == "medmem: warning: skipped 2 files; pass --skip-unreadable"
    # the CLI routes Python warnings there
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    missing = str(tmp_path / "missing")
    r = _invoke(["screen", "--audit", missing, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert warnings.formatwarning is _log_warning
    # recording warnings (pytest.warns, catch_warnings(record=True)) still works
    with pytest.warns(UserWarning, match="recorded"):
        warnings.warn("recorded", UserWarning, stacklevel=1)


def test_image_size_ignored_with_a_detector_is_said(sets, tmp_path, caplog) -> None:
    from medmem.detector import Detector, DetectorConfig
    from medmem.detector._detector import build_encoder

    cfg = DetectorConfig(spatial_dims=2, image_size=(32, 32), arch="conv", embed_dim=8)
    det = Detector(cfg)
    det.model_ = build_encoder(cfg).eval()
    det.save(tmp_path / "det")
    args = _audit_args(sets, tmp_path / "out")
    args[args.index("--image-size") + 1] = "64,64"
    args[args.index("--val") + 1] = str(tmp_path / "missing")  # stop right after the warning
    with caplog.at_level("WARNING", logger="medmem"):
        r = _invoke([*args, "--detector", str(tmp_path / "det")])
    assert r.exit_code == 2, r.output
    text = " ".join(rec.getMessage() for rec in caplog.records)
    assert (
        "--image-size 64,64 is ignored" in text
        and "32,32" in text
        and str(tmp_path / "det") in text
    )
    assert "--epochs ignored" in text
