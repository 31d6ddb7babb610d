"""A small audit on real radiographs: ../shared/data/nih-cxr (NIH ChestX-ray14 subset).

Skips with a message when the data folder is absent. Exact copies of training images hidden
among held-out patients' images must all be called copies. The pixel stand-in detector keeps
it under a minute; the trained detector's accuracy is measured by benchmarks/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medmem
from medmem.data import ArrayDataset

pytestmark = pytest.mark.realdata

NIH = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih-cxr"


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    path = NIH / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found: the real-data tests need ../shared/data/nih-cxr")
    return pd.read_csv(path, dtype=str)


def test_audit_finds_exact_copies_among_real_radiographs(manifest, pixel_detector) -> None:
    first = manifest.groupby("patient_id").head(1)  # one image per patient
    patients = sorted(first["patient_id"])
    rng = np.random.default_rng(0)
    rng.shuffle(patients)
    parts = {"train": patients[:60], "val": patients[60:100], "novel": patients[100:110]}
    files = {
        k: [NIH / f for f in first.loc[first["patient_id"].isin(v), "file"]]
        for k, v in parts.items()
    }
    load = {"image_size": (64, 64), "patient_id_pattern": r"^(\d+)_", "quiet": True}
    train = medmem.load_dataset(files["train"], **load)
    val = medmem.load_dataset(files["val"], **load)
    novel = medmem.load_dataset(files["novel"], image_size=(64, 64), quiet=True)
    copied = [0, 7, 21, 33, 59]
    synthetic = ArrayDataset(
        np.stack([np.asarray(train[i]) for i in copied] + [np.asarray(x) for x in novel]),
        ids=[f"copy_{i}" for i in copied] + [f"novel_{i}" for i in range(len(novel))],
    )
    result = medmem.audit(
        train, val, synthetic, detector=pixel_detector, n_bootstrap=0, n_controls=0, quiet=True
    )
    s = result.synthetic.set_index("synthetic_id")
    assert s.loc[[f"copy_{i}" for i in copied], "copy"].all()
    assert (s.loc[[f"copy_{i}" for i in copied], "nearest_train_id"].tolist()) == [
        train.ids[i] for i in copied
    ]
    assert result.summary["n_train"] == 60 and result.summary["patients"]["n_train_patients"] == 60
