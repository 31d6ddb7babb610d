"""The null synthetic set: images of a generator that never saw the training set, scored
like the synthetic images; their share above tau is the chance level of generator outputs
(summary["null_synthetic"], the verdict line, the report section)."""

from __future__ import annotations

import numpy as np
import pytest

import medmem
from medmem import InputError
from medmem._audit import audit_embeddings, format_verdict
from medmem._stats import difference_interval, t_interval, wilson_interval
from medmem.data import ArrayDataset, make_phantom
from medmem.report import render_report

NULL_KEYS = {
    "n",
    "n_above_tau",
    "share_above_tau",
    "share_above_tau_ci",
    "expected_copies",
    "expected_copies_ci",
    "excess_copies",
    "excess_copies_ci",
    "n_mem",
    "pct_mem",
    "n_mem_ci",
    "excess_mem",
    "excess_mem_ci",
    "n_mem_comparable",
    "validation_expected_copies",
    "validation_expected_copies_ci",
    "confidence",
    "method",
}


def _phantoms(first: int, n: int, size: int = 32, follow_up: int = 0) -> np.ndarray:
    return np.stack([make_phantom(first + p, follow_up, size=size) for p in range(n)])


def _sets(null: np.ndarray) -> dict[str, ArrayDataset]:
    train = _phantoms(0, 30)
    return {
        "train": ArrayDataset(train, patient_ids=[f"T{i}" for i in range(30)]),
        "val": ArrayDataset(_phantoms(100, 30), patient_ids=[f"V{i}" for i in range(30)]),
        # half copies of training images, half novel: N_copies well above chance
        "synthetic": ArrayDataset(np.concatenate([train[:10], _phantoms(200, 10)])),
        "null": ArrayDataset(null),
    }


def _audit(sets: dict[str, ArrayDataset], detector, score: str = "embedding"):
    return medmem.audit(
        sets["train"],
        sets["val"],
        sets["synthetic"],
        detector=detector,
        n_controls=0,
        n_bootstrap=50,
        quiet=True,
        score=score,
        null_synthetic=sets["null"],
    )


def test_novel_null_images_sit_at_chance_and_copies_do_not(pixel_detector) -> None:
    novel = _audit(_sets(_phantoms(300, 40)), pixel_detector)
    s = novel.summary
    null = s["null_synthetic"]
    assert set(null) == NULL_KEYS
    assert null["n"] == 40
    # novel phantoms cross tau about as often as the validation images (alpha = 0.05)
    assert null["share_above_tau"] <= 0.2
    assert null["share_above_tau"] == pytest.approx(s["chance"]["false_copy_rate"], abs=0.15)
    assert null["expected_copies"] == pytest.approx(null["share_above_tau"] * 20)
    assert null["excess_copies"] == pytest.approx(s["n_copies"] - null["expected_copies"])
    lo, hi = null["excess_copies_ci"]
    assert lo <= null["excess_copies"] <= hi and lo > 0  # 10 copies of 20: a real excess
    assert null["validation_expected_copies"] == s["chance"]["expected_copies"]
    assert null["n_mem"] <= 6 and null["n_mem_comparable"] is False
    # a null set made of training images (a generator that copies): share high
    copies = _audit(_sets(_phantoms(0, 20)), pixel_detector)
    c = copies.summary["null_synthetic"]
    assert c["share_above_tau"] == 1.0 and c["n_above_tau"] == 20
    assert c["n_mem"] == 20 and c["n_mem_comparable"] is True
    assert c["excess_copies"] < 0
    # the synthetic verdicts do not change with the null set
    assert copies.summary["n_copies"] == s["n_copies"] and copies.summary["n_mem"] == s["n_mem"]
    assert len(copies.synthetic) == 20


def test_aligned_score_scores_the_null_set_too(pixel_detector) -> None:
    r = _audit(_sets(_phantoms(0, 20)), pixel_detector, score="aligned")
    null = r.summary["null_synthetic"]
    assert null["n_above_tau"] == 20  # exact training images: the aligned score is ~1
    assert r.summary["fingerprints"]["null_synthetic_set"]


def test_verdict_line_and_report_section(pixel_detector, tmp_path) -> None:
    r = _audit(_sets(_phantoms(300, 40)), pixel_detector)
    text = format_verdict(r.summary)
    assert "expected from a generator that never saw the training set" in text
    assert "of 40 above tau" in text
    r.summary["null_synthetic"]["method"] = "<script>alert(1)</script>"
    page = render_report(r)
    assert 'id="null-synthetic"' in page and 'id="null_expected_copies"' in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    out = r.save(tmp_path / "a")
    loaded = medmem.AuditResult.load(out)
    assert set(loaded.summary["null_synthetic"]) == NULL_KEYS
    plain = medmem.audit(
        *[_sets(_phantoms(300, 4))[k] for k in ("train", "val", "synthetic")],
        detector=pixel_detector,
        n_controls=0,
        n_bootstrap=0,
        quiet=True,
        score="embedding",
    )
    assert "null_synthetic" not in plain.summary
    assert "never saw" not in format_verdict(plain.summary)
    assert 'id="null-synthetic"' not in render_report(plain)


def test_null_set_of_another_size_or_kind_is_refused(pixel_detector) -> None:
    sets = _sets(_phantoms(300, 4, size=16))
    with pytest.raises(InputError, match="null synthetic set"):
        _audit(sets, pixel_detector)


def test_embedding_level_null_matches_the_validation_chance() -> None:
    rng = np.random.default_rng(0)
    tr, va, sy, nu = (rng.normal(size=(n, 8)) for n in (300, 300, 100, 600))
    r = audit_embeddings(tr, va, sy, n_bootstrap=0, null_synthetic=nu)
    null, chance = r.summary["null_synthetic"], r.summary["chance"]
    # null and validation images come from one distribution: about alpha each
    assert null["share_above_tau"] == pytest.approx(0.05, abs=0.03)
    assert null["share_above_tau"] == pytest.approx(chance["false_copy_rate"], abs=0.04)
    assert null["validation_expected_copies_ci"] is None  # no bootstrap
    with pytest.raises(InputError, match="null_synthetic: give at least one image"):
        audit_embeddings(tr, va, sy, n_bootstrap=0, null_synthetic=nu[:, :4])


def test_interval_helpers() -> None:
    lo, hi = difference_interval(56, 70, 48, 80)  # Newcombe (1998), method 10
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    lo, hi = t_interval([4.0, 4.0, 4.0])
    assert lo == hi == 4.0
    assert all(np.isnan(t_interval([1.0])))
