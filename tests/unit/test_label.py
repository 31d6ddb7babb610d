"""Manual validation: stratified sampling, the blind labelling page, and validate."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medmem import InputError, MedmemWarning, OutputExistsError, audit_embeddings, load_dataset
from medmem.cli import main
from medmem.data import write_phantoms
from medmem.label import PAIRS_COLUMNS, make_labeling_page, sample_pairs, validate

MALICIOUS = "<script>alert(1)</script>.png"


def _training(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "train_id": [f"t{i:04d}" for i in range(n)],
            "nearest_synthetic_id": [f"s{i:04d}" for i in rng.integers(0, n, n)],
            "nearest_synthetic_corr": rng.uniform(0.0, 1.0, n),
        }
    )


def _make_audit(root: Path, *, spatial_dims: int = 2, malicious: bool = False) -> Path:
    """A small audit folder with real image files: random embeddings, 10 near copies."""
    size, fmt = (32, "png") if spatial_dims == 2 else (16, "npy")
    write_phantoms(root / "train", n_patients=24, size=size, fmt=fmt, spatial_dims=spatial_dims)
    write_phantoms(
        root / "syn",
        n_patients=20,
        size=size,
        fmt=fmt,
        spatial_dims=spatial_dims,
        first_patient=200,
    )
    if malicious:  # the id is the path under the folder: a folder '<script>alert(1)<'
        nested = root / "train" / MALICIOUS
        nested.parent.mkdir()
        shutil.copy(root / "train" / f"P0000_00.{fmt}", nested)
    image_size = (size,) * spatial_dims
    tr = load_dataset(root / "train", image_size=image_size, quiet=True)
    sy = load_dataset(root / "syn", image_size=image_size, quiet=True)
    rng = np.random.default_rng(0)
    e_tr = rng.normal(size=(len(tr), 16))
    e_sy = rng.normal(size=(len(sy), 16))
    e_sy[:10] = e_tr[-10:] + 0.1 * rng.normal(size=(10, 16))
    r = audit_embeddings(
        e_tr,
        rng.normal(size=(30, 16)),
        e_sy,
        train_ids=tr.ids,
        synthetic_ids=sy.ids,
        n_bootstrap=0,
    )
    r.summary.update(
        sources={
            "training": str(root / "train"),
            "validation": None,
            "synthetic": str(root / "syn"),
        },
        image_size=list(image_size),
        spatial_dims=spatial_dims,
    )
    return r.save(root / "audit", figures=False)


def _page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="medmem-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_stratified_and_covers_both_sides_of_tau() -> None:
    training = _training(500)
    tau = float(np.quantile(training["nearest_synthetic_corr"], 0.7))  # 150 above, 350 below
    a = sample_pairs(training, tau, n=100, seed=3)
    assert list(a.columns) == PAIRS_COLUMNS
    pd.testing.assert_frame_equal(a, sample_pairs(training, tau, n=100, seed=3))
    assert not a.equals(sample_pairs(training, tau, n=100, seed=4))
    # the row order of training.csv does not matter
    shuffled = training.sample(frac=1.0, random_state=1).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, sample_pairs(shuffled, tau, n=100, seed=3))

    assert list(a["pair_id"]) == list(range(1, 101))
    assert a["train_id"].is_unique
    above = a["nearest_synthetic_corr"] >= tau
    assert above.sum() == 50 and (~above).sum() == 50
    assert (a["stratum"].str.startswith("above_tau") == above).all()
    counts = a["stratum"].value_counts().to_dict()
    for side in ("above_tau", "below_tau"):
        assert [counts[f"{side}_{b}"] for b in (1, 2, 3, 4)] == [20, 15, 10, 5]
    # oversampled near tau: closer than the population is
    dist = (a["nearest_synthetic_corr"] - tau).abs().median()
    assert dist < 0.75 * (training["nearest_synthetic_corr"] - tau).abs().median()
    # weights undo the oversampling: they add up to each side's size
    w = a.groupby(above)["weight"].sum()
    assert w[True] == pytest.approx(150) and w[False] == pytest.approx(350)
    # the page order does not follow the strata
    assert not a["stratum"].is_monotonic_increasing


def test_a_small_side_gives_all_it_has() -> None:
    training = _training(200, seed=1)
    corr = training["nearest_synthetic_corr"]
    tau = float(np.sort(corr)[-3])  # exactly 3 at or above tau
    with pytest.warns(MedmemWarning, match="only 3 training image.*at or above tau"):
        pairs = sample_pairs(training, tau, n=20)
    assert (pairs["nearest_synthetic_corr"] >= tau).sum() == 3
    assert len(pairs) == 20
    with pytest.warns(MedmemWarning, match="labelling all 200"):
        assert len(sample_pairs(training, 0.5, n=500)) == 200
    with pytest.raises(InputError, match="n must be an integer >= 1"):
        sample_pairs(training, tau, n=0)


# ----------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def audit_2d(tmp_path_factory) -> Path:
    return _make_audit(tmp_path_factory.mktemp("label2d"), malicious=True)


def test_page_is_blind_self_contained_and_escapes_ids(audit_2d, tmp_path) -> None:
    out = make_labeling_page(audit_2d, tmp_path / "labels.html", n=25, seed=0, quiet=True)
    page = out.read_text(encoding="utf-8")
    pairs = pd.read_csv(tmp_path / "pairs.csv", keep_default_na=False)
    assert len(pairs) == 25  # all 25 training images, the malicious one included
    assert MALICIOUS in set(pairs["train_id"])

    # blind: no correlation, verdict, stratum or weight
    training = pd.read_csv(audit_2d / "training.csv")
    summary = json.loads((audit_2d / "summary.json").read_text())
    for value in [*training["nearest_synthetic_corr"], *training["nearest_val_corr"]]:
        for text in (repr(float(value)), f"{value:.4f}", f"{value:.3f}"):
            assert text not in page
    assert f"{summary['tau']:.3f}" not in page
    text = re.sub(r'"[A-Za-z0-9+/]{40,}=*"', '""', page).lower()  # without the PNGs
    for word in ("tau", "corr", "stratum", "above_tau", "below_tau", "verdict", '"weight'):
        assert word not in text
    data = _page_data(page)
    assert set(data) == {"token", "views", "pairs"}
    assert all(
        set(p) == {"pair_id", "train_id", "synthetic_id", "train", "synthetic"}
        for p in data["pairs"]
    )
    assert [p["train_id"] for p in data["pairs"]] == list(pairs["train_id"])

    # self-contained: no URL to fetch, a CSP that forbids the network
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page

    # escaping: the id never appears raw; the data block cannot be closed early
    assert "<script>alert" not in page
    assert page.count("</script") == 2  # the two real closing tags
    assert MALICIOUS in {p["train_id"] for p in data["pairs"]}  # survives the round trip


def test_page_for_3d_shows_three_central_slices(tmp_path) -> None:
    audit = _make_audit(tmp_path, spatial_dims=3)
    make_labeling_page(audit, tmp_path / "page" / "labels.html", n=4, quiet=True)
    data = _page_data((tmp_path / "page" / "labels.html").read_text(encoding="utf-8"))
    assert len(data["views"]) == 3
    assert all(len(p["train"]) == 3 and len(p["synthetic"]) == 3 for p in data["pairs"])
    assert (tmp_path / "page" / "pairs.csv").is_file()


def test_page_errors_missing_sources_and_existing_output(audit_2d, tmp_path) -> None:
    audit = tmp_path / "audit"
    shutil.copytree(audit_2d, audit)
    summary = json.loads((audit / "summary.json").read_text())
    train_src = summary["sources"]["training"]
    summary["sources"]["training"] = None
    (audit / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="pass --train"):
        make_labeling_page(audit, tmp_path / "p.html", n=3, quiet=True)
    page = make_labeling_page(audit, tmp_path / "p.html", n=3, train=train_src, quiet=True)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        make_labeling_page(audit, page, n=3, train=train_src, quiet=True)
    make_labeling_page(audit, page, n=3, train=train_src, overwrite=True, quiet=True)
    other = tmp_path / "other"
    write_phantoms(other, n_patients=2, size=32)
    with pytest.raises(InputError, match=r"not in .*pass --synthetic"):
        make_labeling_page(
            audit, tmp_path / "q" / "p.html", n=3, train=train_src, synthetic=other, quiet=True
        )
    with pytest.raises(InputError, match="summary.json: not found"):
        make_labeling_page(tmp_path, tmp_path / "r.html")


# ----------------------------------------------------------------------------- validate

# tau = 0.5; (corr, label, weight): 4 TP, 1 FN, 2 FP, 3 TN, 1 unsure, 1 unlabelled
_CASE = [
    (0.9, "copy", 1), (0.8, "copy", 1), (0.7, "Copy", 1), (0.6, "copy", 1), (0.3, "copy", 3),
    (0.55, "novel", 2), (0.52, "novel", 2), (0.4, "novel", 4), (0.2, "novel", 4),
    (0.1, " novel", 4), (0.45, "unsure", 1), (0.35, "", 1),
]  # fmt: skip


@pytest.fixture
def hand_audit(tmp_path) -> Path:
    audit = tmp_path / "audit"
    audit.mkdir()
    # a complete audit folder of schema version 1 (AuditResult.load checks the schema)
    (audit / "summary.json").write_text(json.dumps({"schema_version": 1, "tau": 0.5}))
    n = len(_CASE)
    extra = 5  # training images not drawn
    corrs = [c for c, _, _ in _CASE] + [0.0] * extra
    pd.DataFrame(
        {
            "train_id": [f"t,{i}" for i in range(n + extra)],  # a comma: CSV quoting
            "patient_id": "",
            "nearest_val_id": "v",
            "nearest_val_corr": 0.0,
            "nearest_synthetic_id": [f"s{i}" for i in range(n + extra)],
            "nearest_synthetic_corr": corrs,
            "memorized": [c >= 0.5 for c in corrs],
        }
    ).to_csv(audit / "training.csv", index=False)
    pd.DataFrame(
        {
            "synthetic_id": [f"s{i}" for i in range(n + extra)],
            "nearest_train_id": [f"t,{i}" for i in range(n + extra)],
            "nearest_train_corr": corrs,
            "copy": [c >= 0.5 for c in corrs],
        }
    ).to_csv(audit / "synthetic.csv", index=False)
    pd.DataFrame(
        {
            "pair_id": range(1, n + 1),
            "train_id": [f"t,{i}" for i in range(n)],
            "synthetic_id": [f"s{i}" for i in range(n)],
            "nearest_synthetic_corr": [c for c, _, _ in _CASE],
            "stratum": "x",
            "weight": [w for _, _, w in _CASE],
        }
    ).to_csv(audit / "pairs.csv", index=False)
    _labels(audit / "labels.csv", [lab for _, lab, _ in _CASE])
    return audit


def _labels(
    path: Path, labels: list[str], *, ids: list[int] | None = None, train: str = "t,{}"
) -> Path:
    ids = ids or list(range(1, len(labels) + 1))
    pd.DataFrame(
        {
            "pair_id": ids,
            "train_id": [train.format(i - 1) for i in ids],
            "synthetic_id": [f"s{i - 1}" for i in ids],
            "label": labels,
        }
    ).to_csv(path, index=False)
    return path


def test_validate_gives_hand_computed_sensitivity_and_specificity(hand_audit) -> None:
    v = validate(hand_audit, hand_audit / "labels.csv")
    assert v["counts"] == {"tp": 4, "fp": 2, "tn": 3, "fn": 1, "unsure": 1, "unlabelled": 1}
    assert v["sensitivity"] == pytest.approx(4 / 5)
    assert v["specificity"] == pytest.approx(3 / 5)
    assert v["sensitivity_ci"] == pytest.approx([0.375535, 0.963776], abs=1e-6)  # Wilson 4/5
    assert v["specificity_ci"] == pytest.approx([0.230724, 0.882379], abs=1e-6)  # Wilson 3/5
    assert v["agreement"] == pytest.approx(7 / 10)
    assert v["auroc"] == pytest.approx(22 / 25)
    assert v["weighted"]["sensitivity"] == pytest.approx(4 / 7)
    assert v["weighted"]["specificity"] == pytest.approx(12 / 16)
    # J = 0.8 only between 0.55 and 0.6: sensitivity 4/5, specificity 5/5
    assert v["best_tau"]["tau"] == pytest.approx(0.575)
    assert (v["best_tau"]["sensitivity"], v["best_tau"]["specificity"]) == (0.8, 1.0)
    assert {d["pair_id"] for d in v["disagreements"]} == {5, 6, 7}
    assert json.loads((hand_audit / "validation.json").read_text()) == v


def test_best_tau_needs_labels_the_correlation_separates(hand_audit, tmp_path) -> None:
    # copies only below tau, novel only above: no threshold beats chance
    labels = ["novel"] * 4 + ["copy"] + ["novel"] * 2 + ["copy"] * 3 + ["", ""]
    v = validate(hand_audit, _labels(tmp_path / "l.csv", labels), write=False)
    assert v["best_tau"] is None and "better than chance" in v["best_tau_note"]
    assert v["sensitivity"] == 0.0 and v["specificity"] == 0.0
    with pytest.warns(MedmemWarning, match="no pair is labelled novel, so specificity"):
        v = validate(hand_audit, _labels(tmp_path / "c.csv", ["copy"] * 3), write=False)
    assert v["specificity"] is None and v["specificity_ci"] is None
    assert v["best_tau"] is None and "copy and novel" in v["best_tau_note"]
    assert not (hand_audit / "validation.json").exists()


def test_validate_errors(hand_audit, tmp_path) -> None:
    bad = _labels(tmp_path / "unknown.csv", ["copy", "novel"], ids=[1, 99])
    with pytest.raises(InputError, match=r"1 label\(s\) for pairs not in .*pair 99"):
        validate(hand_audit, bad)
    other = _labels(tmp_path / "other.csv", ["copy", "novel"], train="u{}")
    with pytest.raises(InputError, match="from another audit's labelling page"):
        validate(hand_audit, other)
    none = _labels(tmp_path / "none.csv", ["unsure", "", "unsure"])
    with pytest.raises(InputError, match=r"no pair is labelled copy or novel \(2 unsure, 10 unl"):
        validate(hand_audit, none)
    (tmp_path / "empty.csv").write_text("pair_id,train_id,synthetic_id,label\n")
    with pytest.raises(InputError, match="has no rows"):
        validate(hand_audit, tmp_path / "empty.csv")
    typo = _labels(tmp_path / "typo.csv", ["copy", "maybe"])
    with pytest.raises(InputError, match=r"row 3: label 'maybe' is not one of copy, novel"):
        validate(hand_audit, typo)
    (tmp_path / "cols.csv").write_text("pair,label\n1,copy\n")
    with pytest.raises(InputError, match="missing column"):
        validate(hand_audit, tmp_path / "cols.csv")
    # a pairs.csv from another audit
    pairs = pd.read_csv(hand_audit / "pairs.csv")
    pairs.loc[0, "synthetic_id"] = "elsewhere"
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(InputError, match="pairs.csv was made from another audit"):
        validate(hand_audit, hand_audit / "labels.csv", pairs_csv=tmp_path / "pairs.csv")
    assert not (hand_audit / "validation.json").exists()


def test_label_and_validate_commands(audit_2d, tmp_path) -> None:
    audit = tmp_path / "audit"
    shutil.copytree(audit_2d, audit)
    r = CliRunner().invoke(main, ["--quiet", "label", "--audit", str(audit), "--n", "12"])
    assert r.exit_code == 0, r.output
    assert (audit / "labels.html").is_file()
    pairs = pd.read_csv(audit / "pairs.csv", keep_default_na=False)
    assert len(pairs) == 12
    tau = json.loads((audit / "summary.json").read_text())["tau"]
    said = pairs["nearest_synthetic_corr"] >= tau
    labels = np.where(said, "copy", "novel").astype(object)
    labels[0] = "unsure"
    pd.DataFrame(
        {
            "pair_id": pairs["pair_id"],
            "train_id": pairs["train_id"],
            "synthetic_id": pairs["synthetic_id"],
            "label": labels,
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    r = CliRunner().invoke(
        main, ["validate", "--audit", str(audit), "--labels", str(tmp_path / "labels.csv")]
    )
    assert r.exit_code == 0, r.output
    assert "sensitivity" in r.output and "1.000" in r.output and "TP" in r.output
    v = json.loads((audit / "validation.json").read_text())
    assert v["counts"]["unsure"] == 1 and v["counts"]["fp"] == v["counts"]["fn"] == 0

    r = CliRunner().invoke(main, ["label", "--audit", str(audit), "--n", "12"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--overwrite" in r.output
    r = CliRunner().invoke(
        main, ["validate", "--audit", str(tmp_path), "--labels", str(tmp_path / "labels.csv")]
    )
    assert r.exit_code == 2 and "medmem: error:" in r.output


def test_page_from_templates_escapes_file_and_folder_names(tmp_path, pixel_detector) -> None:
    """The page is built from medmem/_assets templates; names from the data are escaped."""
    from PIL import Image

    import medmem

    rng = np.random.default_rng(0)
    sets = {"t": 12, "v": 30, "s": 6}
    for name, n in sets.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            stem = f"<script>alert({i})" if name == "s" else str(i)
            img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / name / f"{stem}.png")
    train, val, syn = (load_dataset(tmp_path / k, image_size=(16, 16), quiet=True) for k in sets)
    result = medmem.audit(
        train, val, syn, detector=pixel_detector, n_bootstrap=0, n_controls=0, quiet=True,
        percentile=80, calibration="paper", score="embedding",
    )  # fmt: skip
    audit_dir = result.save(tmp_path / "audit<script>", figures=False, report=False)
    with warnings.catch_warnings():  # random images: whether the strata are uneven (a
        # MedmemWarning) depends on the draw; this test is about escaping
        warnings.filterwarnings("ignore", "only .* training image.s. have", MedmemWarning)
        page = make_labeling_page(
            audit_dir, tmp_path / "label.html", n=4, train=train, synthetic=syn, quiet=True
        ).read_text()
    assert page.count("<script") == 2  # the data block and the page's own script only
    assert "<script>alert(" not in page and "\\u003cscript\\u003ealert(" in page
    assert "audit&lt;script&gt;" in page and "audit<script>" not in page
    assert ":root { color-scheme: dark; }" in page  # label.css
    assert 'document.body.setAttribute("data-ready", "1")' in page  # label.js


def test_templates_are_package_data() -> None:
    from medmem._templates import TEMPLATES

    root = Path(__file__).resolve().parents[2]
    text = (root / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    globs = re.findall(r'"([^"]+)"', section.split("medmem =", 1)[1].split("]", 1)[0])
    shipped = {p.name for g in globs for p in (root / "src" / "medmem").glob(g)}
    assert shipped == {p.name for p in TEMPLATES.iterdir() if p.is_file()}
    assert {"label.html", "label.css", "label.js", "report.html", "report.css"} <= shipped
