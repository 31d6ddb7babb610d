"""The shipped study configs (configs/study/*.yaml) parse and plan their cells; the real-3D
study on ../shared/data/ixi-t1 lists its cells with ``medmem study --plan`` (skipped when
../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from medmem.cli import main
from medmem.study import load_study, plan

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "study").glob("*.yaml"))
IXI = ROOT.parent / "shared" / "data" / "ixi-t1" / "manifest.csv"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_study_configs_parse_and_plan(path: Path) -> None:
    study = load_study(path)
    cells = plan(study, n_available=1000)  # no data read: the baseline's size when it is all
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) and keys
    if study.control:  # one control per cell, after the cells
        main = [c for c in cells if not c.control]
        assert [c.key for c in cells[len(main) :]] == [f"{c.key}_control" for c in main]


def test_the_real_3d_study_compares_vq_and_kl_with_controls_and_seeds() -> None:
    study = load_study(ROOT / "configs" / "study" / "ixi-3d-cpu.yaml")
    assert study.generative["spatial_dims"] == 3 and study.generative["image_size"] == [32] * 3
    assert study.generative["data"]["train"].endswith("shared/data/ixi-t1/manifest.csv")
    kinds = {m: study.generative_config(m).autoencoder.kind for m in study.models}
    assert kinds == {"ldm": "kl", "ldm-vq": "vq"}
    assert study.control and study.seeds == {
        "values": [0, 1, 2],
        "factors": ["baseline", "augment"],
    }
    assert set(study.vary) == {"augment", "model", "iterations"}


@pytest.mark.skipif(not IXI.exists(), reason=f"{IXI} absent (../shared/data is not here)")
def test_the_real_3d_study_lists_its_cells() -> None:
    result = CliRunner().invoke(
        main, ["study", str(ROOT / "configs/study/ixi-3d-cpu.yaml"), "--plan"]
    )
    assert result.exit_code == 0, result.output
    keys = result.output.split()
    assert len(keys) == 18 and sum(k.endswith("_control") for k in keys) == 9
    assert "ldm-vq_n40_aug0_it1500_s0" in keys and "ldm_n40_aug1_it1500_s2" in keys
    assert {"ldm_n40_aug0_it500_s0", "ldm_n40_aug0_it3000_s0"} <= set(keys)


@pytest.mark.skipif(not IXI.exists(), reason=f"{IXI} absent (../shared/data is not here)")
def test_the_real_3d_study_has_subjects_for_its_controls_and_independent_features() -> None:
    from medmem.generative import build_datasets
    from medmem.study import _independent_training_set

    study = load_study(ROOT / "configs" / "study" / "ixi-3d-cpu.yaml")
    cells = plan(study)
    control = next(c for c in cells if c.control)
    ctrl, val = build_datasets(control.config, quiet=True)
    train, _ = build_datasets(control.audited_config, quiet=True)
    assert len(ctrl) == len(train) == 40 and len(val) == 37
    assert set(ctrl.patient_ids).isdisjoint(set(train.patient_ids) | set(val.patient_ids))
    assert train.image_size == (32, 32, 32)
    independent = _independent_training_set(study, cells)
    assert len(independent) == 185 - 37 - 40
    assert set(independent.patient_ids).isdisjoint(set(train.patient_ids) | set(val.patient_ids))


def test_the_size_study_runs_the_full_2d_studys_own_cells() -> None:
    """configs/study/nih-cxr-size-cpu.yaml is the training-set-size factor of
    nih-cxr-cpu.yaml alone: the same cells (keys, training runs, settings) and no others."""
    full = load_study(ROOT / "configs" / "study" / "nih-cxr-cpu.yaml")
    size = load_study(ROOT / "configs" / "study" / "nih-cxr-size-cpu.yaml")
    full_cells = {c.key: c for c in plan(full, n_available=1000)}
    cells = plan(size, n_available=1000)
    assert len(cells) == 18 and sum(c.control for c in cells) == 9
    assert {(c.n_train, c.iterations) for c in cells} == {(50, 4000), (100, 8000), (200, 16000)}
    assert {c.seed for c in cells} == {0, 1, 2} and not any(c.augment for c in cells)
    for c in cells:
        twin = full_cells[c.key]
        assert c.run_key == twin.run_key
        assert c.settings_hash(size, "det", "ind") == twin.settings_hash(full, "det", "ind")
