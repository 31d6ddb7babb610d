"""The identity objective: multi-positive NT-Xent, patient-pair batches, ids required."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medmem._errors import InputError
from medmem.data import ArrayDataset
from medmem.detector import Detector, DetectorConfig, multi_positive_nt_xent, nt_xent
from medmem.detector._detector import PatientPairBatches, identity_training_summary


def _direct(z1: torch.Tensor, z2: torch.Tensor, labels: list[int], t: float) -> float:
    """The SupCon L_out formula, written out anchor by anchor."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()
    lab = labels + labels
    n = len(lab)
    total = 0.0
    for a in range(n):
        denom = sum(math.exp(float(z[a] @ z[j]) / t) for j in range(n) if j != a)
        pos = [p for p in range(n) if p != a and lab[p] == lab[a]]
        total += -sum(math.log(math.exp(float(z[a] @ z[p]) / t) / denom) for p in pos) / len(pos)
    return total / n


def test_multi_positive_loss_matches_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    labels = [0, 0, 1, 2, 2]  # two repeat patients, one single-image patient
    got = float(multi_positive_nt_xent(z1, z2, torch.tensor(labels), 0.5))
    assert got == pytest.approx(_direct(z1, z2, labels, 0.5), rel=1e-5)


def test_multi_positive_loss_is_nt_xent_without_repeat_patients() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    got = multi_positive_nt_xent(z1, z2, torch.arange(6), 0.07)
    assert float(got) == pytest.approx(float(nt_xent(z1, z2, 0.07)), rel=1e-6)


def test_multi_positive_loss_rejects_bad_labels() -> None:
    with pytest.raises(InputError, match="labels must have 3"):
        multi_positive_nt_xent(torch.zeros(3, 2), torch.zeros(3, 2), torch.arange(2))


def test_patient_pair_batches_keep_repeat_patients_together() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7])
    batches = list(PatientPairBatches(labels, 4, seed=3))
    assert batches
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))  # no image twice in an epoch
    for b in batches:
        assert 4 <= len(b) <= 6
    # every batch containing an image of a repeat patient holds a second one of it
    for b in batches:
        lab = labels[b].tolist()
        for p in (0, 2, 5):
            assert lab.count(p) != 1
    assert list(PatientPairBatches(labels, 4, seed=3)) == batches  # seeded


def test_summary_flags_few_repeat_patients() -> None:
    info = identity_training_summary(np.array([0, 1, 2, 2]))
    assert info["n_repeat_patients"] == 1 and info["few_repeat_patients"]


def test_identity_objective_needs_patient_ids() -> None:
    ds = ArrayDataset(np.random.default_rng(0).random((8, 16, 16)))
    with pytest.raises(InputError, match="needs a patient id"):
        Detector.train(ds, objective="identity", epochs=1, batch_size=4, quiet=True)
    with pytest.raises(InputError, match="must have 8 items"):
        Detector.train(
            ds, objective="identity", patient_ids=["a"], epochs=1, batch_size=4, quiet=True
        )


@pytest.mark.filterwarnings(
    "ignore:the detector did not learn:medmem.MedmemWarning"
)  # two epochs on phantoms: the loss is not the point here
def test_identity_detector_trains_saves_and_warns(tmp_path) -> None:
    ds = ArrayDataset(np.random.default_rng(0).random((8, 16, 16)))
    ids = ["a", "a", "b", "b", "c", "d", "e", "f"]
    with pytest.warns(UserWarning, match="only 2 of 6 training patients"):
        det = Detector.train(
            ds,
            objective="identity",
            patient_ids=ids,
            epochs=1,
            batch_size=4,
            quiet=True,
            early_stopping=False,
            embed_dim=8,
            resnet_channels=(8, 8, 8, 8),
        )
    assert det.config.objective == "identity"
    assert det.identity_training_["n_repeat_patients"] == 2
    back = Detector.load(det.save(tmp_path / "d"))
    assert back.identity_training_ == det.identity_training_
    assert back.fingerprint == det.fingerprint


def test_copy_objective_keeps_old_fingerprint_settings() -> None:
    assert "objective" not in DetectorConfig().identity_dict()
    assert DetectorConfig(objective="identity").identity_dict()["objective"] == "identity"
    with pytest.raises(InputError):
        DetectorConfig(objective="patient")
