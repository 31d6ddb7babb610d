"""medmem.study: negative-control cells (the same generator trained on other patients) and
generator seeds (means and intervals across seeds), on the tiny study's sizes."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest

from medmem._errors import InputError
from medmem.generative import build_datasets
from medmem.study import COLUMNS, StudyConfig, load_study, plan, run_study, seed_table

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "study" / "tiny-phantoms.yaml"
MAIN = ["ldm_n12_aug0_it2_s0", "ldm_n12_aug0_it4_s0", "ldm_n12_aug0_it4_s1", "ldm_n12_aug1_it4_s0"]


def _study(**changes) -> StudyConfig:
    """The tiny study with patients left over for a control set of the same size: 48
    phantom patients, 12 held out for validation, 12 training images of 36."""
    d = load_study(TINY).to_dict()
    d["generative"] = {
        **d["generative"],
        "data": {"source": "phantoms", "n_patients": 48, "val_fraction": 0.25},
    }
    d.update(
        {
            "vary": {"iterations": [2], "augment": [True]},
            "seeds": {"values": [1], "factors": ["baseline"]},
            "control": True,
            "quality": False,
        }
    )
    d.update(changes)
    return StudyConfig(**d)


def test_plan_repeats_chosen_cells_per_seed_and_adds_a_control_per_cell():
    cells = plan(_study())
    main = [c for c in cells if not c.control]
    controls = [c for c in cells if c.control]
    # seeds only for the baseline (seed 0 kept); it2 shares the baseline's run
    assert [c.key for c in main] == MAIN
    assert [c.key for c in controls] == [f"{k}_control" for k in MAIN]
    assert all(c.config.data.split == "control" for c in controls)
    assert {c.run_key for c in controls}.isdisjoint({c.run_key for c in main})
    # every cell repeated when seeds is a plain list; the old format is unchanged
    every = plan(_study(seeds=[0, 2], control=False, vary={"augment": [True]}))
    assert {c.key for c in every} == {
        "ldm_n12_aug0_it4_s0",
        "ldm_n12_aug0_it4_s2",
        "ldm_n12_aug1_it4_s0",
        "ldm_n12_aug1_it4_s2",
    }
    old = load_study(TINY)
    assert old.seeds is None and old.control is False
    assert len(plan(old)) == 7 and not any(c.control for c in plan(old))


def test_control_patients_are_disjoint_and_as_many():
    for cell in (c for c in plan(_study()) if c.control):
        control, val = build_datasets(cell.config, quiet=True)
        train, val2 = build_datasets(cell.audited_config, quiet=True)
        assert len(control) == len(train) == cell.n_train
        assert set(control.patient_ids).isdisjoint(train.patient_ids)
        assert set(control.patient_ids).isdisjoint(val.patient_ids)
        assert list(val.ids) == list(val2.ids)  # audited against the same validation set
    # the main cells' data (and hashes) are those of the config without the option, and
    # of configs written before data.split existed
    assert "split" not in plan(_study())[0].config.identity_dict()["data"]
    plain = _study(control=False, seeds=None)
    assert (
        plan(plain)[0].config.identity_dict()
        == next(c for c in plan(_study()) if c.key == MAIN[0]).config.identity_dict()
    )


def test_too_few_patients_for_a_control_is_one_clear_error():
    study = _study(baseline={**load_study(TINY).baseline, "n_train": 20})
    control = next(c for c in plan(study) if c.control)
    with pytest.raises(InputError, match="patients outside the training set"):
        build_datasets(control.config, quiet=True)


def test_bad_seed_and_control_settings_name_the_problem():
    with pytest.raises(InputError, match="study.seeds.values"):
        _study(seeds={"values": []})
    with pytest.raises(InputError, match="study.seeds.factors"):
        _study(seeds={"values": [1], "factors": ["colour"]})
    with pytest.raises(InputError, match="study.control"):
        _study(control="yes")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "controls"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID of 12 images and an untrained detector
        return out, run_study(_study(), out, quiet=True)


def test_rows_carry_the_control_counts_and_the_excess(finished):
    out, result = finished
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == list(COLUMNS)
    main = table[table["role"] == "main"]
    ctrl = table[table["role"] == "control"]
    assert list(main["cell"]) == MAIN
    assert list(table["role"]) == ["main"] * 4 + ["control"] * 4  # controls last
    for rec in main.to_dict("records"):
        c = ctrl[ctrl["cell"] == rec["cell"] + "_control"].iloc[0]
        assert rec["control_n_copies"] == c["n_copies"] and rec["control_n_mem"] == c["n_mem"]
        assert rec["excess_copies_control"] == pytest.approx(rec["n_copies"] - c["n_copies"])
        assert rec["excess_mem_control"] == pytest.approx(rec["n_mem"] - c["n_mem"])
        assert (
            rec["excess_copies_control_ci_low"]
            <= rec["excess_copies_control"]
            <= rec["excess_copies_control_ci_high"]
        )
        assert c["n_train"] == rec["n_train"] and c["tau"] == rec["tau"]  # same audit
    assert ctrl["control_n_copies"].isna().all()
    row = json.loads((out / "cells" / f"{MAIN[0]}_control" / "row.json").read_text())
    assert row["control_of"] == MAIN[0] and row["n_control_images"] == 12
    assert "control_n_copies" in (out / "results.md").read_text()
    # figures: main cells only, seeds as ranges, the controls beside them
    for name in ("augmentation", "iterations"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000


def test_seed_table_reports_mean_interval_and_per_seed_values(finished):
    out, result = finished
    seeds = json.loads((out / "results-seeds.json").read_text())
    assert "Student-t" in seeds["interval"]
    rows = {(r["role"], r["augment"], r["iterations"]): r for r in seeds["rows"]}
    base = rows[("main", False, 4)]
    assert base["n_seeds"] == 2 and base["seeds"] == [0, 1]
    assert base["n_copies"] == pytest.approx(sum(base["n_copies_values"]) / 2)
    assert base["n_copies_ci_low"] <= base["n_copies"] <= base["n_copies_ci_high"]
    assert base["excess_copies_control_values"][0] is not None
    one = rows[("main", True, 4)]
    assert one["n_seeds"] == 1 and one["n_copies_ci_low"] is None
    csv = pd.read_csv(out / "results-seeds.csv")
    assert len(csv) == 6 and "n_copies_values" in csv
    assert "Student-t" in (out / "results-seeds.md").read_text()
    assert math.isnan(seed_table(result.table).query("n_seeds == 1")["n_mem_ci_low"].iloc[0])
    again = run_study(_study(), out, quiet=True, figures=False)  # resumes, nothing redone
    assert again.computed == [] and len(again.skipped) == 8


def test_the_study_writes_each_factors_values_against_each_other(finished):
    """results-comparisons.*: per varied factor, its values pooled over their seeds against
    each other (the baseline among them), controls left out, counts as in the table."""
    out, result = finished
    comp = json.loads((out / "results-comparisons.json").read_text())
    assert "Newcombe" in comp["interval"]
    rows = {(r["factor"], r["a"], r["b"]): r for r in comp["rows"]}
    assert set(rows) == {("iterations", 2, 4), ("augment", False, True)}
    main = result.table[result.table["role"] == "main"].set_index("cell")
    it = rows[("iterations", 2, 4)]
    assert it["seeds_a"] == [0] and it["seeds_b"] == [0, 1]
    k_b = int(main.loc[["ldm_n12_aug0_it4_s0", "ldm_n12_aug0_it4_s1"], "n_copies"].sum())
    assert (it["n_copies_b"], it["n_synthetic_b"]) == (k_b, 24)
    assert it["n_copies_a"] == main.loc["ldm_n12_aug0_it2_s0", "n_copies"]
    # seed against seed: the 4-iteration cells of seed 0 only
    assert it["seeds_same"] == [0] and it["n_synthetic_b_same_seeds"] == 12
    assert it["n_copies_b_same_seeds"] == main.loc["ldm_n12_aug0_it4_s0", "n_copies"]
    aug = rows[("augment", False, True)]
    assert aug["seeds_a"] == [0, 1] and aug["seeds_b"] == [0] and aug["n_train_b"] == 12
    assert "->" in (out / "results-comparisons.md").read_text()


def test_factor_comparisons_pool_the_seeds_and_take_newcombes_interval() -> None:
    """The 2D study's training-set sizes: 5, 2, 2 copies of 50 against 23, 7, 9 of 100 give
    9/150 -> 39/300, +7.0 points, Newcombe's interval on those sums."""
    from medmem._stats import difference_interval
    from medmem.study import factor_comparisons

    study = load_study(ROOT / "configs" / "study" / "nih-cxr-size-cpu.yaml")
    base = {"role": "main", "model": "ldm", "model_type": "ldm", "augment": False, "n_mem": 0}
    frame = pd.DataFrame(
        [{**base, "n_train": 50, "iterations": 4000, "n_synthetic": 50, "seed": s,
          "n_copies": k} for s, k in ((0, 5), (1, 2), (2, 2))]
        + [{**base, "n_train": 100, "iterations": 8000, "n_synthetic": 100, "seed": s,
            "n_copies": k} for s, k in ((0, 23), (1, 7), (2, 9))]
        + [{**base, "n_train": 100, "iterations": 8000, "n_synthetic": 100, "seed": 0,
            "n_copies": 2, "role": "control"}]
    )  # fmt: skip
    (row,) = factor_comparisons(frame, study).to_dict("records")
    assert (row["factor"], row["a"], row["b"]) == ("n_train", 50, 100)
    assert (row["n_copies_a"], row["n_synthetic_a"]) == (9, 150)
    assert (row["n_copies_b"], row["n_synthetic_b"]) == (39, 300)
    assert row["diff_pct_copies"] == pytest.approx(7.0)
    lo, hi = difference_interval(39, 300, 9, 150)
    assert (row["diff_pct_copies_ci_low"], row["diff_pct_copies_ci_high"]) == pytest.approx(
        (100 * lo, 100 * hi)
    )
    assert row["diff_pct_mem"] == 0.0


def test_seed_table_says_when_a_mean_covers_fewer_seeds(tmp_path) -> None:
    """Controls run for one of two seeds: the seed table's control cells say '1 of 2 seeds'
    instead of passing a one-seed value off as the mean of both."""
    from medmem.study import write_table

    base = {"model": "ldm", "model_type": "ldm", "n_train": 10, "iterations": 4,
            "augment": False, "n_synthetic": 10, "n_mem": 2, "n_copies": 2}  # fmt: skip
    rows = [
        {**base, "cell": "ldm_n10_aug0_it4_s0", "seed": 0, "role": "main"},
        {**base, "cell": "ldm_n10_aug0_it4_s1", "seed": 1, "role": "main", "n_copies": 4},
        {**base, "cell": "ldm_n10_aug0_it4_s0_control", "seed": 0, "role": "control",
         "control_of": "ldm_n10_aug0_it4_s0", "n_mem": 0, "n_copies": 0},
    ]  # fmt: skip
    write_table(rows, tmp_path)
    text = (tmp_path / "results-seeds.md").read_text()
    main = next(line for line in text.splitlines() if line.startswith("| main"))
    assert "3.000" in main  # the mean of 2 and 4 copies
    assert main.count("[1 of 2 seeds]") == 2  # control N_copies and the excess over it
    # pooled over the seeds that have a control (seed 0 alone): 2/10 against 0/10
    assert "2/10 vs 0/10: 20.0 points" in main
    pooled = json.loads((tmp_path / "results-seeds.json").read_text())["rows"][0]
    assert pooled["pooled_seeds"] == [0] and pooled["pooled_excess_pct_copies"] == 20.0
    low, high = (pooled[f"pooled_excess_pct_copies_ci_{e}"] for e in ("low", "high"))
    assert low < 20.0 < high


def test_seed_table_pools_the_seeds_against_their_controls() -> None:
    """The pooled comparison equals Newcombe's interval on the summed counts (here 9 of 150
    against 0 of 150, as the 2D baseline's three seeds), and skips seeds without a control."""
    from medmem._stats import difference_interval
    from medmem.study import SEED_METRICS

    base = {**dict.fromkeys(SEED_METRICS), "role": "main", "model": "ldm", "model_type": "ldm",
            "n_train": 50, "iterations": 4, "augment": False, "n_synthetic": 50, "n_mem": 0,
            "control_n_mem": 0, "control_n_copies": 0}  # fmt: skip
    frame = pd.DataFrame(
        [{**base, "seed": s, "n_copies": k} for s, k in ((0, 5), (1, 2), (2, 2))]
        + [{**base, "seed": 3, "n_copies": 7, "control_n_copies": None}]
    )
    row = seed_table(frame).iloc[0]
    lo, hi = difference_interval(9, 150, 0, 150)
    assert row["pooled_seeds"] == [0, 1, 2] and row["n_seeds"] == 4
    assert (row["pooled_n_copies"], row["pooled_n_synthetic"]) == (9, 150)
    assert row["pooled_excess_pct_copies"] == pytest.approx(6.0)
    assert row["pooled_excess_pct_copies_ci_low"] == pytest.approx(100 * lo)
    assert row["pooled_excess_pct_copies_ci_high"] == pytest.approx(100 * hi)
