"""medmem.study: training-set size at comparable training (``size_budget``) and FID in an
independent feature space beside the detector's (``independent_features``), on the tiny
study's sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medmem._errors import InputError
from medmem.detector import Detector
from medmem.generative import build_datasets
from medmem.study import (
    OLD_COLUMN_NAMES,
    StudyConfig,
    _independent_training_set,
    _read_row,
    load_study,
    plan,
    run_study,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "study" / "tiny-phantoms.yaml"
pytestmark = [
    pytest.mark.filterwarnings("ignore:FID from .* singular:medmem.MedmemWarning"),
    pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning"),
]


def _tiny(**changes) -> StudyConfig:
    d = load_study(TINY).to_dict()
    d.update(changes)
    return StudyConfig(**d)


def _iterations(cell) -> dict[str, int]:
    return {s: cell.config.stage_settings(s).iterations for s in cell.config.stages}


def test_fixed_epochs_scale_every_stage_by_the_training_set_size():
    study = _tiny(vary={"n_train": [6, 16, 24]}, control=False)
    assert study.size_budget == "epochs"  # the default, as the paper (3k epochs for all sizes)
    cells = {c.n_train: c for c in plan(study)}
    base = _iterations(cells[12])
    assert base == {"autoencoder": 4, "diffusion": 4}
    for n, cell in cells.items():
        want = {s: max(1, round(it * n / 12)) for s, it in base.items()}
        assert _iterations(cell) == want, n
        assert cell.iterations == want["diffusion"]
        last = cell.config.stage_settings("diffusion")
        # the same epochs (iterations x batch / n_train) whatever the set's size, to rounding
        assert last.iterations * last.batch_size / n == pytest.approx(4 * 4 / 12, rel=0.2)
    assert [cells[n].key for n in (6, 16, 24)] == [
        "ldm_n6_aug0_it2_s0",
        "ldm_n16_aug0_it5_s0",
        "ldm_n24_aug0_it8_s0",
    ]


def test_fixed_iterations_keep_old_plans_and_controls_follow_their_cells():
    old = _tiny(vary={"n_train": [16]}, size_budget="iterations")
    assert {c.key for c in plan(old)} == {"ldm_n12_aug0_it4_s0", "ldm_n16_aug0_it4_s0"}
    assert {c.run_key for c in plan(old)} == {"ldm_n12_aug0_s0", "ldm_n16_aug0_s0"}
    # a scaled cell never resumes the run of a fixed-iterations study in the same folder
    # (its autoencoder trained another number of iterations): its own run folder
    new = {c.n_train: c.run_key for c in plan(_tiny(vary={"n_train": [16]}))}
    assert new == {12: "ldm_n12_aug0_s0", 16: "ldm_n16_aug0_s0_epochs"}
    assert all(_iterations(c) == {"autoencoder": 4, "diffusion": 4} for c in plan(old))
    # a control trains exactly as its cell, on other patients
    d = load_study(TINY).to_dict()
    d["generative"] = {**d["generative"], "data": {"source": "phantoms", "n_patients": 64}}
    study = StudyConfig(**{**d, "vary": {"n_train": [16]}, "control": True})
    cells = plan(study)
    for c in (c for c in cells if c.control):
        main = next(m for m in cells if m.key == c.main_key)
        assert _iterations(c) == _iterations(main) and c.config.data.split == "control"
    with pytest.raises(InputError, match="study.size_budget"):
        _tiny(size_budget="steps")
    with pytest.raises(InputError, match="study.independent_features"):
        _tiny(independent_features="inception")


def test_the_independent_extractor_never_sees_a_training_or_validation_patient():
    d = load_study(TINY).to_dict()
    d["generative"] = {
        **d["generative"],
        "data": {"source": "phantoms", "n_patients": 48, "val_fraction": 0.25},
    }
    study = StudyConfig(
        **{**d, "vary": {"n_train": [16]}, "independent_features": "other_patients"}
    )
    cells = plan(study)
    ds = _independent_training_set(study, cells)
    used = set()
    for c in cells:
        train, val = build_datasets(c.config, quiet=True)
        used |= set(train.patient_ids) | set(val.patient_ids)
    assert len(ds) == 48 - 12 - 16 and used.isdisjoint(ds.patient_ids)
    val_study = StudyConfig(**{**study.to_dict(), "independent_features": "validation"})
    assert list(_independent_training_set(val_study, cells).ids) == list(val.ids)
    # too few patients left over: one error that names the alternatives
    with pytest.raises(InputError, match="'validation'.*'random'"):
        _independent_training_set(_tiny(independent_features="other_patients"), plan(_tiny()))


def test_random_features_are_fixed_by_the_seed():
    a = Detector.random(2, (16, 16), embed_dim=8, seed=3)
    assert a.fingerprint == Detector.random(2, (16, 16), embed_dim=8, seed=3).fingerprint
    assert a.fingerprint != Detector.random(2, (16, 16), embed_dim=8, seed=4).fingerprint
    assert a.n_train_ == 0


def test_study_reports_fid_in_both_named_feature_spaces(tmp_path):
    d = load_study(TINY).to_dict()
    d["generative"] = {
        **d["generative"],
        "data": {"source": "phantoms", "n_patients": 48, "val_fraction": 0.25},
    }
    study = StudyConfig(
        **{**d, "vary": {"augment": [True]}, "independent_features": "other_patients"}
    )
    out = tmp_path / "study"
    result = run_study(study, out, quiet=True)
    table = result.table
    assert set(table["independent_features"]) == {"other_patients"}
    assert table["fid_independent"].map(math.isfinite).all()
    assert table["fid_train_val_independent"].map(math.isfinite).all()
    assert (table["fid_independent"] != table["fid_detector"]).all()
    info = json.loads((out / "detector-independent" / "study-detector.json").read_text())
    assert info["kind"] == "other_patients" and info["n_images"] == 48 - 12 - 12
    row = json.loads((out / "cells" / table["cell"][0] / "row.json").read_text())
    assert row["independent_features"] == "other_patients" and row["fid_independent"] > 0
    for name in ("quality-vs-memorization", "augmentation"):
        assert (out / "figures" / f"{name}.png").exists()
    # another independent feature space recomputes the audits, not the generators
    samples = sorted(out.glob("cells/*/synthetic.safetensors"))
    before = [p.stat().st_mtime_ns for p in samples]
    again = run_study(
        StudyConfig(**{**study.to_dict(), "independent_features": "random"}),
        out,
        quiet=True,
        figures=False,
    )
    assert sorted(again.computed) == sorted(table["cell"]) and again.skipped == []
    assert set(again.table["independent_features"]) == {"random"}
    assert len(samples) == len(table) and [p.stat().st_mtime_ns for p in samples] == before


def test_rows_written_before_the_renames_are_read(tmp_path):
    folder = tmp_path / "cell"
    folder.mkdir()
    old = {"cell": "x", "fid": 3.5, "fid_train_val": 1.5, "settings_hash": "h"}
    (folder / "row.json").write_text(json.dumps(old))
    row = _read_row(folder, "h")
    assert row["fid_detector"] == 3.5 and row["fid_train_val_detector"] == 1.5
    assert "fid" not in row and OLD_COLUMN_NAMES["fid"] == "fid_detector"
