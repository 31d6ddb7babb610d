"""medmem.study: the factor study runs end to end, writes its table and figures, and
resumes without recomputing finished cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medmem._errors import InputError
from medmem.study import COLUMNS, StudyConfig, load_study, plan, run_study

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "study" / "tiny-phantoms.yaml"
# The tiny study's sets are far below what FID and a detector need: both warn, rightly.
pytestmark = [
    pytest.mark.filterwarnings("ignore:FID from .* singular:medmem.MedmemWarning"),
    pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning"),
]
EXPECTED_CELLS = {
    "ldm_n12_aug0_it2_s0",
    "ldm_n12_aug0_it4_s0",
    "ldm_n12_aug1_it4_s0",
    # fixed epochs (size_budget: epochs, the default): 16 images train 16/12 x 4 iterations
    "ldm_n16_aug0_it5_s0",
    "ldm-small_n12_aug0_it4_s0",
    "vae_n12_aug0_it4_s0",
    "gan_n12_aug0_it4_s0",
}


def _run(study: StudyConfig, out: Path, **kw):
    return run_study(study, out, quiet=True, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny study run once, stopped after two cells and resumed (as after a kill)."""
    study = load_study(TINY)
    out = tmp_path_factory.mktemp("study") / "tiny"
    first = _run(study, out, only=["ldm_n12_aug0_it2_s0", "gan_n12_aug0_it4_s0"])
    rows_before = {c: (out / "cells" / c / "row.json").stat().st_mtime_ns for c in first.computed}
    second = _run(study, out)
    return study, out, first, second, rows_before


def test_plan_varies_one_factor_at_a_time_and_shares_runs():
    cells = plan(load_study(TINY))
    assert {c.key for c in cells} == EXPECTED_CELLS
    # the baseline's run first; the cells of one run by rising iterations
    assert [c.key for c in cells[:3]] == [
        "ldm_n12_aug0_it2_s0",
        "ldm_n12_aug0_it4_s0",
        "ldm_n12_aug1_it4_s0",
    ]
    runs = {c.run_key for c in cells}
    assert len(runs) == len(cells) - 1  # it2 and it4 of the baseline share a run


def test_factorial_design_crosses_the_factors():
    study = load_study(TINY)
    cross = StudyConfig(
        **{
            **study.to_dict(),
            "design": "factorial",
            "vary": {"augment": [False, True], "n_train": [12, 16]},
        }  # fmt: skip
    )
    keys = {c.key for c in plan(cross)}
    assert keys == {
        "ldm_n12_aug0_it4_s0",
        "ldm_n12_aug1_it4_s0",
        "ldm_n16_aug0_it5_s0",
        "ldm_n16_aug1_it5_s0",
    }


def test_study_writes_the_table_with_every_cell_and_column(finished):
    study, out, first, second, _ = finished
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == list(COLUMNS)
    assert set(table["cell"]) == EXPECTED_CELLS
    assert (table["n_synthetic"] == table["n_train"]).all()  # N_syn = N_train, as the paper
    assert set(table["model_type"]) == {"ldm", "vae", "gan"}
    assert table["tau"].between(-1, 1).all()
    assert ((table["n_copies"] >= 0) & (table["n_copies"] <= table["n_synthetic"])).all()
    assert ((table["n_mem"] >= 0) & (table["n_mem"] <= table["n_train"])).all()
    assert table["fid_detector"].notna().all() and table["ms_ssim"].between(0, 1).all()
    # FID in a second feature space, named (the tiny config: a random-init encoder)
    assert table["fid_independent"].notna().all()
    assert set(table["independent_features"]) == {"random"}
    assert set(table["size_budget"]) == {"epochs"}
    assert table["epochs"].gt(0).all()
    # one shared detector: tau depends only on the training set it is calibrated against
    assert table.groupby("n_train")["tau"].nunique().eq(1).all()
    md = (out / "results.md").read_text()
    assert md.count("\n") == len(table) + 4 and "| model |" in md
    assert "fixed epochs" in md and "fid_independent (independent_features: random)" in md
    for name in ("histograms", "augmentation", "training-size", "iterations"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    for cell in EXPECTED_CELLS:
        assert (out / "cells" / cell / "audit" / "summary.json").exists()


def test_resumed_study_skips_finished_cells(finished):
    study, out, first, second, rows_before = finished
    assert sorted(first.computed) == ["gan_n12_aug0_it4_s0", "ldm_n12_aug0_it2_s0"]
    assert sorted(second.skipped) == sorted(first.computed)
    assert set(second.computed) == EXPECTED_CELLS - set(first.computed)
    for cell, mtime in rows_before.items():  # not rewritten
        assert (out / "cells" / cell / "row.json").stat().st_mtime_ns == mtime
    third = _run(study, out)
    assert third.computed == [] and set(third.skipped) == EXPECTED_CELLS
    assert len(third.table) == len(EXPECTED_CELLS)


def test_interrupted_cell_is_redone_and_changed_settings_recompute(finished, tmp_path):
    study, out, *_ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "cells" / "vae_n12_aug0_it4_s0" / "row.json").unlink()  # killed mid-cell
    again = _run(study, copy)
    assert again.computed == ["vae_n12_aug0_it4_s0"]
    # killed so early that its run folder holds no checkpoint yet: trained from the start
    (copy / "cells" / "gan_n12_aug0_it4_s0" / "row.json").unlink()
    (copy / "cells" / "gan_n12_aug0_it4_s0" / "synthetic.safetensors").unlink()
    (copy / "runs" / "gan_n12_aug0_s0" / "checkpoint.safetensors").unlink()
    again = _run(study, copy)
    assert again.computed == ["gan_n12_aug0_it4_s0"]
    assert (copy / "runs" / "gan_n12_aug0_s0" / "checkpoint.safetensors").exists()
    # another percentile changes every cell's numbers: all are recomputed, and the
    # training runs are reused (no run folder is trained from scratch)
    changed = StudyConfig(**{**study.to_dict(), "percentile": 80.0})
    runs_before = sorted(p.name for p in (copy / "runs").iterdir())
    two = ["ldm_n12_aug0_it2_s0", "ldm_n12_aug0_it4_s0"]
    redo = _run(changed, copy, only=two)
    assert redo.computed == two and redo.skipped == []
    assert sorted(p.name for p in (copy / "runs").iterdir()) == runs_before
    row = json.loads((copy / "cells" / "ldm_n12_aug0_it4_s0" / "row.json").read_text())
    assert (
        row["tau"]
        < json.loads((out / "cells" / "ldm_n12_aug0_it4_s0" / "row.json").read_text())["tau"]
    )


def test_bad_study_configs_name_the_problem(tmp_path):
    study = load_study(TINY)
    d = study.to_dict()
    with pytest.raises(InputError, match="model 'unet' is not one of the model variants"):
        StudyConfig(**{**d, "vary": {"model": ["unet"]}})
    with pytest.raises(InputError, match="unknown setting 'n_trian'"):
        StudyConfig(**{**d, "vary": {"n_trian": [5]}})
    with pytest.raises(InputError, match="non-empty list"):
        StudyConfig(**{**d, "vary": {"augment": []}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngenerative: nowhere.yaml\n")
    with pytest.raises(InputError, match="nowhere.yaml"):
        load_study(bad)
    with pytest.raises(InputError, match="unknown cells"):
        run_study(study, tmp_path / "s", only=["ldm_n99_aug0_it4_s0"], quiet=True)


def test_a_cell_claimed_by_a_live_process_is_left_to_it(tmp_path):
    import filelock

    study = load_study(TINY)
    out = tmp_path / "s"
    lock_path = out / "cells" / "gan_n12_aug0_it4_s0" / "running.lock"
    lock_path.parent.mkdir(parents=True)
    held_lock = filelock.FileLock(lock_path, timeout=0)
    with held_lock:  # another process (here: another lock object) runs the cell
        held = _run(study, out, only=["gan_n12_aug0_it4_s0"])
        assert held.computed == []
    lock_path.write_text('{"host": "old", "pid": 1}')  # a file left by a dead run: no claim
    taken = _run(study, out, only=["gan_n12_aug0_it4_s0"])
    assert taken.computed == ["gan_n12_aug0_it4_s0"]
    with held_lock:  # released after the cell: free again
        pass


def test_rows_written_before_the_column_rename_read_with_the_audit_names(tmp_path) -> None:
    from medmem.study import OLD_COLUMN_NAMES, _read_row

    row = {"settings_hash": "h", "n_mem": 1, "patients_memorized": 2, "pct_patients_memorized": 5.0}
    (tmp_path / "row.json").write_text(json.dumps(row))
    got = _read_row(tmp_path, "h")
    assert got is not None and got["n_patients_mem"] == 2 and got["pct_patients_mem"] == 5.0
    assert not set(OLD_COLUMN_NAMES) & set(got) and set(OLD_COLUMN_NAMES.values()) <= set(COLUMNS)
    assert _read_row(tmp_path, "other") is None


def test_a_second_process_joins_a_running_study(tmp_path, monkeypatch) -> None:
    """`medmem study --join` runs beside the process that holds the study folder (here its
    claim is held by another lock object), taking the cells it names; without --join the
    folder is refused, and joining needs a run of the same study there. The shared detector
    is trained (or loaded) under a lock, so a joining process waits for the first's."""
    import filelock
    from click.testing import CliRunner

    from medmem import study as study_module
    from medmem._io import atomic_write_json
    from medmem.cli import main

    locked = []
    shared_detector = study_module._shared_detector

    def spy(study, cells, out, quiet):  # the real one, noting whether the lock is held
        try:
            filelock.FileLock(out / "shared-models.lock", timeout=0).acquire()
            locked.append(False)
        except filelock.Timeout:
            locked.append(True)
        return shared_detector(study, cells, out, quiet)

    monkeypatch.setattr(study_module, "_shared_detector", spy)

    out, cell = tmp_path / "s", "gan_n12_aug0_it4_s0"
    cmd = ["study", str(TINY), "--out", str(out), "--cell", cell]
    runner = CliRunner()
    nothing = runner.invoke(main, ["-q", *cmd, "--join"])
    assert nothing.exit_code != 0 and "joining needs a run that has started" in nothing.output
    study = load_study(TINY)
    out.mkdir()
    with pytest.raises(InputError, match="no study to join"):
        run_study(study, out, only=[cell], quiet=True, join=True)
    atomic_write_json(out / "study.json", study.to_dict())  # as the first process starts
    with filelock.FileLock(tmp_path / ".s.lock", timeout=0) as first:
        refused = runner.invoke(main, ["-q", *cmd])
        assert refused.exit_code != 0 and "another medmem run is writing there" in refused.output
        joined = runner.invoke(main, ["-q", *cmd, "--join"])
        assert joined.exit_code == 0, joined.output
        assert (out / "cells" / cell / "row.json").exists() and first.is_locked
    assert locked == [True]
    other = StudyConfig(**{**study.to_dict(), "percentile": 80.0})
    with pytest.raises(InputError, match="other settings"):
        run_study(other, out, only=[cell], quiet=True, join=True)
