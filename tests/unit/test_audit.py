"""Algorithm 1 pinned on hand-computed cases, bootstrap intervals, saving, input errors.

The hand-computed cases pin the paper's definitions (``calibration="paper"``: one tau from
training->nearest-validation correlations); tests/unit/test_calibration.py covers the
default conformal calibration."""

from __future__ import annotations

import importlib
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from medmem import InputError, MedmemWarning, OutputExistsError
from medmem._audit import (
    SYNTHETIC_COLUMNS,
    TRAINING_COLUMNS,
    AuditResult,
    audit_embeddings,
    calibrate,
    check_patient_overlap,
    min_calibration_size,
)
from medmem.data import ArrayDataset

# In 3-d, standardised vectors lie on a circle in the plane orthogonal to (1, 1, 1), so
# embeddings at angles a and b have Pearson correlation exactly cos(a - b).
_U = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
_V = np.array([1.0, 1.0, -2.0]) / np.sqrt(6)


# Validation images within ~2.5 degrees of training images give tau above 0.999, which the
# audit reports as a collapsed detector; hand-computed cases that need them assert that warning.
COLLAPSED = "embeddings have collapsed"


def at(*degrees: float) -> np.ndarray:
    r = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.cos(r)[:, None] * _U + np.sin(r)[:, None] * _V


def test_angle_embeddings_have_the_intended_correlation() -> None:
    e = at(0, 60, 90)
    c = np.corrcoef(e)
    np.testing.assert_allclose(c[0, 1:], [0.5, 0.0], atol=1e-12)


def test_paper_percentile_is_numpy_linear() -> None:
    assert calibrate(np.arange(21) / 20, 95, "paper") == pytest.approx(0.95)
    assert calibrate(np.arange(10.0), 90, "paper") == pytest.approx(8.1)
    assert calibrate(np.array([0.3, 0.1, 0.2]), 50, "paper") == pytest.approx(0.2)
    with pytest.raises(InputError, match="percentile must be in"):
        calibrate(np.arange(3.0), 100, "paper")


def test_conformal_is_the_weibull_quantile() -> None:
    # n = 21, q = 95: rank r = 22 * 0.95 = 20.9, between s_(20) = 0.95 and s_(21) = 1.0
    assert calibrate(np.arange(21) / 20, 95) == pytest.approx(0.95 + 0.9 * 0.05)
    assert calibrate(np.arange(21) / 20, 95, "conservative") == pytest.approx(1.0)
    # n = 9, q = 90: r = 9 exactly, no interpolation
    assert calibrate(np.arange(9.0), 90) == 8.0
    with pytest.raises(InputError, match="calibration must be one of"):
        calibrate(np.arange(30.0), 95, "percentile")


def test_min_calibration_size() -> None:
    assert min_calibration_size(95) == 19  # conformal: (n + 1) 0.95 <= n
    assert min_calibration_size(95, "conservative") == 19
    assert min_calibration_size(90) == 9
    assert min_calibration_size(99) == 99
    assert min_calibration_size(95, "paper") == 20
    assert min_calibration_size(50, "paper") == 2
    assert min_calibration_size(99, "paper") == 100


def _grid_case() -> tuple[np.ndarray, np.ndarray]:
    """20 training images at 18-degree steps; validation images each 10 degrees off one."""
    train = at(*np.arange(20) * 18.0)
    val = at(*(np.arange(20) * 18.0 + 10.0))
    return train, val


def test_n_mem_counts_training_images_n_copies_counts_synthetic_images() -> None:
    train, val = _grid_case()
    # nearest-val correlation is cos(8 deg) for every training image (val 10 deg off one,
    # 8 deg off the next): tau = cos(8 deg).
    tau = np.cos(np.deg2rad(8.0))
    # synthetic: 3 copies of training image 0, one 2-degree variant of image 5, one novel
    # image halfway between 10 and 11 (9 deg from both: below tau).
    synthetic = np.concatenate([train[[0, 0, 0]], at(5 * 18.0 + 2), at(10 * 18.0 + 9)])
    r = audit_embeddings(train, val, synthetic, calibration="paper", n_bootstrap=0)
    s = r.summary
    assert s["tau"] == pytest.approx(tau, abs=1e-6)
    assert s["tau_mem"] == s["tau"] == s["paper"]["tau"]
    assert s["n_copies"] == 4  # three copies of one image count three times
    assert s["n_mem"] == 2  # but they memorize one training image
    assert s["pct_mem"] == pytest.approx(100 * 2 / 20)
    assert s["pct_copies"] == pytest.approx(100 * 4 / 5)
    assert s["pct_mem_denominator"] == "n_train"
    assert s["pct_copies_denominator"] == "n_synthetic"
    assert r.training["memorized"].tolist() == [i in (0, 5) for i in range(20)]
    assert r.synthetic["copy"].tolist() == [True, True, True, True, False]
    assert r.synthetic["nearest_train_id"].tolist()[:4] == ["train00000"] * 3 + ["train00005"]
    np.testing.assert_allclose(
        r.synthetic["nearest_train_corr"],
        [1, 1, 1, np.cos(np.deg2rad(2)), np.cos(np.deg2rad(9))],
        atol=1e-6,
    )
    # nearest synthetic of image 0 is the first of the three identical copies (lowest index)
    assert r.training.loc[0, "nearest_synthetic_id"] == "synthetic00000"
    assert list(r.training.columns) == TRAINING_COLUMNS
    assert list(r.synthetic.columns) == SYNTHETIC_COLUMNS


def test_value_exactly_at_tau_is_memorized_and_a_copy() -> None:
    # 21 training images 17 degrees apart; validation image i lies 0.5 + 0.1 i degrees from
    # training image i, so nearest-val correlations are distinct and the median (q = 50,
    # n = 21) is exactly the value of image 10: no interpolation.
    train = at(*np.arange(21) * 17.0)
    val = at(*(np.arange(21) * 17.0 + 0.5 + 0.1 * np.arange(21)))
    # The synthetic set holds validation image 10 itself (correlation exactly tau with
    # training image 10) and an image 8.5 degrees from training images 3 and 4.
    synthetic = np.concatenate([val[[10]], at(3 * 17.0 + 8.5)])
    with pytest.warns(MedmemWarning, match=COLLAPSED):
        r = audit_embeddings(
            train, val, synthetic, percentile=50, calibration="paper", n_bootstrap=0
        )
    tau = r.summary["tau"]
    assert tau == r.training.loc[10, "nearest_val_corr"]
    assert r.training.loc[10, "nearest_synthetic_corr"] == tau  # bit for bit
    assert bool(r.training.loc[10, "memorized"])
    assert r.training["memorized"].sum() == 1
    assert bool(r.synthetic.loc[0, "copy"])
    assert r.synthetic.loc[1, "nearest_train_corr"] < tau
    assert not bool(r.synthetic.loc[1, "copy"])
    # a tau just above that value and it is not memorized: the test is >=, no tolerance
    with pytest.warns(MedmemWarning, match=COLLAPSED):
        r2 = audit_embeddings(
            train, val, synthetic, percentile=50.01, calibration="paper", n_bootstrap=0
        )
    assert r2.summary["tau"] > tau
    assert not bool(r2.training.loc[10, "memorized"])


def test_tau_follows_the_percentile() -> None:
    train = at(*np.arange(40) * 9.0)
    # validation offsets grow with the index: nearest-val correlations are all different
    offsets = np.linspace(0.5, 4.0, 40)
    val = at(*(np.arange(40) * 9.0 + offsets))
    with pytest.warns(MedmemWarning, match=COLLAPSED):
        r50 = audit_embeddings(train, val, train[:1], percentile=50, n_bootstrap=0)
    with pytest.warns(MedmemWarning, match=COLLAPSED):
        r95 = audit_embeddings(train, val, train[:1], percentile=95, n_bootstrap=0)
    rho = r95.training["nearest_val_corr"].to_numpy()
    # the paper's tau, always reported
    assert r50.summary["paper"]["tau"] == pytest.approx(np.percentile(rho, 50))
    assert r95.summary["paper"]["tau"] == pytest.approx(np.percentile(rho, 95))
    # the default: the weibull quantile of the validation images' nearest-training scores
    chance = np.cos(np.deg2rad(offsets))  # each validation image is nearest its own train
    for r, q in ((r50, 50), (r95, 95)):
        assert r.summary["tau"] == pytest.approx(
            np.quantile(chance, q / 100, method="weibull"), abs=1e-6
        )
    assert r95.summary["tau"] > r50.summary["tau"]


def test_bootstrap_intervals_contain_estimates_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(200, 16)), rng.normal(size=(150, 16))
    synthetic = np.concatenate(
        [train[:30] + 0.05 * rng.normal(size=(30, 16)), rng.normal(size=(70, 16))]
    )
    r1 = audit_embeddings(train, val, synthetic, n_bootstrap=300, seed=1)
    r2 = audit_embeddings(train, val, synthetic, n_bootstrap=300, seed=1)
    s = r1.summary
    assert s["intervals"] == r2.summary["intervals"]
    for key in ("tau", "tau_mem", "n_mem", "n_copies", "pct_mem", "pct_copies"):
        lo, hi = s["intervals"][key]
        assert lo <= s[key] <= hi, key
    assert s["intervals"]["n_copies"][1] > s["intervals"]["n_copies"][0]
    assert s["n_copies"] >= 30 and s["n_mem"] >= 30


def test_save_writes_all_outputs_and_refuses_existing_folder(tmp_path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.random((30, 16, 16)).astype(np.float32)
    train = ArrayDataset(imgs[:20], ids=[f"t{i}.png" for i in range(20)])
    syn = ArrayDataset(imgs[20:], ids=[f"s{i}.png" for i in range(10)])
    r = audit_embeddings(
        rng.normal(size=(20, 8)),
        rng.normal(size=(20, 8)),
        rng.normal(size=(10, 8)),
        train_ids=train.ids,
        synthetic_ids=syn.ids,
    )
    r._images = {"train": train, "synthetic": syn}
    out = r.save(tmp_path / "audit")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "gallery.png",
        "histogram.png",
        "report.html",
        "summary.json",
        "synthetic.csv",
        "training.csv",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_copies"] == r.summary["n_copies"]
    assert summary["schema_version"] == 3 and summary["calibration"] == "conformal"
    assert pd.read_csv(out / "training.csv").columns.tolist() == TRAINING_COLUMNS
    syn_csv = pd.read_csv(out / "synthetic.csv")
    assert syn_csv.columns.tolist() == SYNTHETIC_COLUMNS
    assert syn_csv["copy"].dtype == bool and syn_csv["copy_paper"].dtype == bool
    with pytest.raises(OutputExistsError, match="exists.*--overwrite"):
        r.save(out)
    r.save(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_failure_leaves_no_half_folder(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    r = audit_embeddings(
        rng.normal(size=(20, 8)), rng.normal(size=(20, 8)), rng.normal(size=(4, 8))
    )
    audit_mod = importlib.import_module("medmem._audit")  # the module; medmem.audit is the function

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(audit_mod, "plot_histogram", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        r.save(tmp_path / "audit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("n_train", "n_val", "percentile", "calibration", "match"),
    [
        (10, 40, 95, "paper", "10 training images are too few"),
        (40, 5, 95, "paper", "5 validation images are too few"),
        (150, 40, 99, "paper", "40 validation images are too few"),
        (40, 18, 95, "conformal", "18 validation images are too few.*at least 19"),
        (150, 40, 99, "conservative", "40 validation images are too few.*at least 99"),
    ],
)
def test_too_small_to_calibrate(n_train, n_val, percentile, calibration, match) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match=match):
        audit_embeddings(
            rng.normal(size=(n_train, 8)),
            rng.normal(size=(n_val, 8)),
            rng.normal(size=(3, 8)),
            percentile=percentile,
            calibration=calibration,
        )


def test_constant_embedding_names_the_image() -> None:
    rng = np.random.default_rng(0)
    syn = rng.normal(size=(3, 8))
    syn[1] = 0.5
    with pytest.raises(InputError, match="'b.png' is constant"):
        audit_embeddings(
            rng.normal(size=(20, 8)),
            rng.normal(size=(20, 8)),
            syn,
            synthetic_ids=["a.png", "b.png", "c.png"],
        )


def test_mismatched_embedding_sizes() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="embedding sizes differ"):
        audit_embeddings(
            rng.normal(size=(20, 8)), rng.normal(size=(20, 4)), rng.normal(size=(3, 8))
        )


def test_patient_overlap_is_an_error_unless_allowed() -> None:
    imgs = np.random.default_rng(0).random((4, 8, 8))
    train = ArrayDataset(imgs[:2], patient_ids=["P1", "P2"])
    val = ArrayDataset(imgs[2:], patient_ids=["P2", "P3"])
    with pytest.raises(InputError, match="1 patients are in both.*'P2'.*allow_patient_overlap"):
        check_patient_overlap(train, val)
    assert check_patient_overlap(train, val, allow=True) == 1


def test_chance_rate_matches_hand_count() -> None:
    # 20 training images 18 deg apart; validation image i is offset by i/4 deg from training
    # image i, so its nearest-train correlation is cos(i/4 deg): distinct, easy to count.
    train = at(*np.arange(20) * 18.0)
    val = at(*(np.arange(20) * 18.0 + np.arange(20) / 4.0))
    synthetic = at(3.0, 50.0, 100.0, 200.0)
    with pytest.warns(MedmemWarning, match=COLLAPSED):
        r = audit_embeddings(train, val, synthetic, n_bootstrap=0)
    tau = r.summary["tau"]
    rho = np.cos(np.deg2rad(np.arange(20) / 4.0))
    # train->nearest val equals val->nearest train here (the pairing is mutual)
    assert r.summary["chance"]["false_copy_rate"] == pytest.approx(np.mean(rho >= tau - 1e-9))
    assert r.summary["chance"]["expected_copies"] == pytest.approx(4 * np.mean(rho >= tau - 1e-9))


def test_patient_level_results() -> None:
    train, val = _grid_case()
    patients = [f"P{i // 2}" for i in range(20)]  # two images per patient
    synthetic = np.concatenate([train[[0, 0, 7]], at(5 * 18.0 + 9)])
    r = audit_embeddings(
        train, val, synthetic, train_patient_ids=patients, calibration="paper", n_bootstrap=0
    )
    p = r.summary["patients"]
    assert p == {
        "n_train_patients": 10,
        "n_patients_mem": 2,  # P0 (image 0) and P3 (image 7)
        "pct_patients_mem": 20.0,
        "pct_patients_mem_denominator": "n_train_patients",
    }
    expected = [pid in ("P0", "P3") for pid in patients]
    assert r.training["patient_memorized"].tolist() == expected
    assert r.training["memorized"].sum() == 2
    # without patient ids there is no patient-level result
    r2 = audit_embeddings(train, val, synthetic, calibration="paper", n_bootstrap=0)
    assert "patients" not in r2.summary and "patient_memorized" not in r2.training


def test_controls_are_scored_but_never_counted() -> None:
    train, val = _grid_case()
    synthetic = at(5 * 18.0 + 9, 11 * 18.0 + 9)  # two novel images
    controls = np.concatenate([train[[2, 4]], at(6 * 18.0 + 2), at(9 * 18.0 + 8.5)])
    r = audit_embeddings(
        train,
        val,
        synthetic,
        controls=controls,
        control_sources=[2, 4, 6, 9],
        calibration="paper",
        n_bootstrap=0,
    )
    c = r.summary["controls"]
    assert (c["n"], c["caught"]) == (4, 3)  # the 8.5-degree one is below tau = cos(8 deg)
    assert c["sensitivity"] == pytest.approx(0.75)
    assert c["nearest_is_source"] == 4  # caught or not, each is nearest its source
    assert r.summary["n_copies"] == 0 and r.summary["n_synthetic"] == 2
    assert len(r.synthetic) == 2 and not r.synthetic["synthetic_id"].str.contains("control").any()
    lo, hi = c["sensitivity_ci"]
    assert lo < 0.75 < hi


def test_collapsed_embeddings_warn_that_no_copy_can_be_found() -> None:
    rng = np.random.default_rng(0)
    common = rng.normal(size=16)
    # every embedding is the same vector up to a tiny jitter: what a collapsed detector gives
    train, val, syn = (common + 1e-4 * rng.normal(size=(n, 16)) for n in (30, 30, 10))
    with pytest.warns(MedmemWarning, match=COLLAPSED):
        r = audit_embeddings(train, val, syn, calibration="paper", n_bootstrap=0)
    assert r.summary["tau"] >= 0.999
    # conformal: the same warning; tau_mem cannot be calibrated on tied scores, and says so
    with (
        pytest.warns(MedmemWarning, match=COLLAPSED),
        pytest.raises(InputError, match="tau_mem cannot be calibrated.*tied scores"),
    ):
        audit_embeddings(train, val, syn, n_bootstrap=0)
    healthy = rng.normal(size=(30, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audit_embeddings(healthy, rng.normal(size=(30, 16)), syn, n_bootstrap=0)


# ----------------------------------------------------------------------------- AuditResult.load
def _saved_audit(tmp_path):
    rng = np.random.default_rng(3)
    r = audit_embeddings(
        rng.normal(size=(20, 8)),
        rng.normal(size=(20, 8)),
        rng.normal(size=(10, 8)),
        train_ids=[f"{i:03d}" for i in range(20)],  # digits: must stay str
        synthetic_ids=[f"s{i}" for i in range(10)],
        train_patient_ids=[f"{i // 2:02d}" for i in range(20)],
        n_bootstrap=0,
    )
    return r, r.save(tmp_path / "audit", figures=False, report=False)


def test_load_round_trips_save(tmp_path) -> None:
    r, out = _saved_audit(tmp_path)
    loaded = AuditResult.load(out)
    assert loaded.summary == json.loads(json.dumps(r.summary))
    pd.testing.assert_frame_equal(loaded.training, r.training)
    pd.testing.assert_frame_equal(loaded.synthetic, r.synthetic)
    assert loaded.training["train_id"].iloc[0] == "000"
    assert loaded.synthetic["copy"].dtype == bool


def test_load_reads_schema_version_1(tmp_path) -> None:
    folder = tmp_path / "v1"
    folder.mkdir()
    summary = {"schema_version": 1, "tau": 0.6, "percentile": 95, "n_mem": 1, "n_copies": 1}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "training.csv").write_text(
        "train_id,patient_id,nearest_val_id,nearest_val_corr,nearest_synthetic_id,"
        "nearest_synthetic_corr,memorized\n"
        "001,p1,v1,0.5,s1,0.7,True\n"
        "002,p2,v2,0.4,s2,0.2,False\n"
    )
    (folder / "synthetic.csv").write_text(
        "synthetic_id,nearest_train_id,nearest_train_corr,copy\ns1,001,0.7,True\ns2,002,0.2,False\n"
    )
    r = AuditResult.load(folder)
    assert r.summary["tau_mem"] == r.summary["tau"] == 0.6
    assert r.summary["calibration"] == "paper"
    assert r.summary["paper"]["tau_mem"] == 0.6 and r.summary["paper"]["n_mem"] == 1
    assert list(r.training.columns) == TRAINING_COLUMNS
    assert list(r.synthetic.columns) == SYNTHETIC_COLUMNS
    assert r.training["train_id"].tolist() == ["001", "002"]
    assert r.training["memorized"].tolist() == [True, False]
    assert r.training["memorized_paper"].dtype == bool
    assert r.synthetic["copy_paper"].tolist() == [True, False]


def test_load_reads_schema_version_2_interval_names(tmp_path) -> None:
    """Version 2 named the chance interval intervals.expected_chance_copies; one name now."""
    r, out = _saved_audit(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    summary["schema_version"] = 2
    summary["intervals"] = {"expected_chance_copies": [1.0, 2.0], "n_copies": [0, 3]}
    (out / "summary.json").write_text(json.dumps(summary))
    loaded = AuditResult.load(out)
    assert loaded.summary["intervals"] == {"expected_copies": [1.0, 2.0], "n_copies": [0, 3]}


def test_load_errors_name_the_file(tmp_path) -> None:
    _, out = _saved_audit(tmp_path)
    train = pd.read_csv(out / "training.csv").drop(columns="nearest_val_corr")
    train.to_csv(out / "training.csv", index=False)
    with pytest.raises(InputError, match=r"training\.csv: missing column\(s\) nearest_val_corr"):
        AuditResult.load(out)
    (out / "summary.json").write_text('{"tau": 0.5,')
    with pytest.raises(InputError, match=r"summary\.json: not valid JSON"):
        AuditResult.load(out)
    (out / "summary.json").write_text('{"schema_version": 9, "tau": 0.5}')
    with pytest.raises(InputError, match=r"summary\.json: schema_version 9"):
        AuditResult.load(out)
    (out / "synthetic.csv").unlink()
    with pytest.raises(InputError, match=r"synthetic\.csv: not found.*not an audit folder"):
        AuditResult.load(out)
