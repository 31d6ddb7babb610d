"""Shared pieces of the real-data benchmarks: where the data live and the patient split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIH = DATA_ROOT / "nih-cxr"
IXI = DATA_ROOT / "ixi-t1"
#: how the IXI volumes are credited wherever a result from them is shown (CC BY-SA)
IXI_CREDIT = (
    "IXI T1 brain MRI, 2 mm (../shared/data/ixi-t1; IXI dataset, brain-development.org, "
    "CC BY-SA 3.0)"
)


def read_manifest(data: Path) -> pd.DataFrame | None:
    """A data folder's manifest.csv as strings, or None (with a message) when absent."""
    path = data / "manifest.csv"
    if not path.exists():
        print(f"skipped: {path} not found (../shared/data is absent)")
        return None
    return pd.read_csv(path, dtype=str)


def split_patients(
    manifest: pd.DataFrame, seed: int, fractions: tuple[float, float] = (0.6, 0.2)
) -> dict[str, pd.DataFrame]:
    """Training / validation / novel patients (60% / 20% / 20% by default), seeded.

    Every image of a patient goes to the same part, so no patient is in two parts.
    """
    patients = np.array(sorted(manifest["patient_id"].astype(str).unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n = len(patients)
    cut1, cut2 = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
    groups = {"train": patients[:cut1], "val": patients[cut1:cut2], "novel": patients[cut2:]}
    pid = manifest["patient_id"].astype(str)
    return {k: manifest[pid.isin(set(v))].reset_index(drop=True) for k, v in groups.items()}


def load_nih(data: Path, files: pd.Series, size: tuple[int, int]) -> object:
    """The listed NIH files as a medmem dataset, patient id from the file name."""
    import medmem

    return medmem.load_dataset(
        [data / f for f in files], image_size=size, patient_id_pattern=r"^(\d+)_", quiet=True
    )


def load_ixi(data: Path, paths: pd.Series, size: tuple[int, int, int]) -> object:
    """The listed IXI volumes (manifest column ``path``) as a medmem dataset."""
    import medmem

    return medmem.load_dataset([data / p for p in paths], image_size=size, quiet=True)


def machine() -> str:
    """CPU model and core count, for the record."""
    import os
    import platform

    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {platform.machine()}, {os.cpu_count()} cores"
