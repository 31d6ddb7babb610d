"""`medmem study` from the command line: plan, one cell, resume, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from medmem.cli import main

# The tiny study's sets are far below what FID and a detector need: both warn, rightly.
pytestmark = [
    pytest.mark.filterwarnings("ignore:FID from .* singular:medmem.MedmemWarning"),
    pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning"),
]
TINY = str(Path(__file__).resolve().parents[2] / "configs" / "study" / "tiny-phantoms.yaml")


def test_study_plan_lists_the_cells():
    res = CliRunner().invoke(main, ["study", TINY, "--plan"])
    assert res.exit_code == 0, res.output
    cells = res.output.split()
    assert cells[0] == "ldm_n12_aug0_it2_s0" and len(cells) == 7


def test_study_runs_one_cell_then_reuses_it(tmp_path):
    out = tmp_path / "study"
    args = ["--quiet", "study", TINY, "--out", str(out), "--cell", "gan_n12_aug0_it4_s0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "1 cells computed, 0 reused" in res.output
    table = pd.read_csv(out / "results.csv")
    assert list(table["cell"]) == ["gan_n12_aug0_it4_s0"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "0 cells computed, 1 reused" in again.output


def test_study_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    res = CliRunner().invoke(main, ["study", str(missing)])
    assert res.exit_code == 2
    assert "nope.yaml: study config not found" in res.output
    res = CliRunner().invoke(main, ["study", TINY, "--out", str(tmp_path / "s"), "--cell", "x"])
    assert res.exit_code == 2
    assert "unknown cells ['x']" in res.output


def test_study_plan_lists_seeds_and_control_cells_from_yaml(tmp_path):
    config = tmp_path / "controls.yaml"
    config.write_text(
        Path(TINY)
        .read_text()
        .replace("n_patients: 40, val_fraction: 0.5", "n_patients: 48, val_fraction: 0.25")
        + "\ncontrol: true\nseeds: {values: [0, 3], factors: [baseline]}\n"
    )
    res = CliRunner().invoke(main, ["study", str(config), "--plan"])
    assert res.exit_code == 0, res.output
    cells = res.output.split()
    assert len(cells) == 16  # 7 cells + the baseline with seed 3, and a control for each
    assert "ldm_n12_aug0_it4_s3" in cells and "ldm_n12_aug0_it4_s3_control" in cells
    assert sum(c.endswith("_control") for c in cells) == 8
