"""``medmem demo``: the whole audit on built-in phantoms with known copies.

The demo writes phantom patients to disk in real formats (2D: PNG training images, DICOM
validation images; 3D: NIfTI training volumes, DICOM series validation volumes), builds a
synthetic set of novel phantoms (patients seen nowhere else) plus known copies of training
images (exact, and varied as the paper's definition allows), trains the copy detector on
the training set, audits, and reports how many known copies the audit recovered and how
many novel images it called copies (about 100 - q percent by design).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medmem._audit import AuditResult, audit, format_verdict
from medmem._errors import OutputExistsError
from medmem._io import atomic_save, atomic_write_bytes, atomic_write_json
from medmem._section import ConfigSection
from medmem._stats import wilson_interval
from medmem.data import load_dataset, make_phantom, write_phantoms
from medmem.data.phantoms import phantom_seed
from medmem.detector import PAPER_VARIATION_KINDS, Detector, vary
from medmem.metrics import format_quality, quality
from medmem.screen import screen


@dataclass(frozen=True)
class DemoConfig(ConfigSection):
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    spatial_dims: int = 2
    image_size: tuple[int, ...] = (64, 64)
    n_train_patients: int = 100
    train_follow_ups: int = 2
    n_val_patients: int = 100
    val_follow_ups: int = 2
    n_novel: int = 200
    n_exact_copies: int = 10
    n_varied_copies: int = 40
    epochs: int = 150
    batch_size: int = 32

    @classmethod
    def default(cls, spatial_dims: int) -> DemoConfig:
        if spatial_dims == 3:
            return cls(
                spatial_dims=3,
                image_size=(32, 32, 32),
                n_train_patients=40,
                train_follow_ups=1,
                n_val_patients=40,
                val_follow_ups=1,
                n_novel=40,
                n_exact_copies=5,
                n_varied_copies=10,
                epochs=40,
                batch_size=16,
            )
        return cls()


def _write_image(path: Path, image: np.ndarray) -> None:
    """A synthetic image as 16-bit PNG (2D) or .npy (3D)."""
    if image.ndim == 2:
        from io import BytesIO

        from PIL import Image

        buf = BytesIO()
        Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(
            buf, format="PNG"
        )
        atomic_write_bytes(path, buf.getvalue())
    else:
        atomic_save(path, lambda p: np.save(p, image.astype(np.float32), allow_pickle=False))


def build_demo_data(
    root: Path, cfg: DemoConfig, seed: int = 0, *, quiet: bool = False
) -> pd.DataFrame:
    """Write train/val/synthetic folders under ``root``; return the synthetic ground truth.

    Training and validation hold disjoint patients; the synthetic set holds novel patients'
    phantoms and copies of training images, under neutral shuffled names, so nothing in it
    gives the answer away. The ground truth goes to ``root/ground_truth.csv``.
    """
    d = cfg.spatial_dims
    train_fmt, val_fmt = ("png", "dcm") if d == 2 else ("nii.gz", "dcm")
    write_phantoms(
        root / "train",
        n_patients=cfg.n_train_patients,
        follow_ups=cfg.train_follow_ups,
        spatial_dims=d,
        size=cfg.image_size,
        fmt=train_fmt,
        seed=seed,
        first_patient=0,
    )
    write_phantoms(
        root / "val",
        n_patients=cfg.n_val_patients,
        follow_ups=cfg.val_follow_ups,
        spatial_dims=d,
        size=cfg.image_size,
        fmt=val_fmt,
        seed=seed,
        first_patient=10_000,
    )
    train = load_dataset(root / "train" / "manifest.csv", image_size=cfg.image_size, quiet=quiet)
    rng = np.random.default_rng([seed, 1])
    items: list[tuple[np.ndarray, str, str]] = []  # image, kind, source training id
    for k in range(cfg.n_novel):
        # patients 20000+ are seen nowhere else (training 0+, validation 10000+)
        img = make_phantom(phantom_seed(seed, 20_000 + k), 0, spatial_dims=d, size=cfg.image_size)
        items.append((img, "novel", ""))
    n_copies = cfg.n_exact_copies + cfg.n_varied_copies
    sources = rng.choice(len(train), size=n_copies, replace=False)
    for j, src in enumerate(sources):
        img = train[int(src)]  # (1, *size), preprocessed as the audit will see it
        if j < cfg.n_exact_copies:
            items.append((img[0].numpy(), "exact copy", train.ids[src]))
        else:
            varied = vary(img, rng, kinds=PAPER_VARIATION_KINDS)  # flip, rotation, gamma
            items.append((varied[0].numpy(), "varied copy", train.ids[src]))
    order = rng.permutation(len(items))
    suffix = ".png" if d == 2 else ".npy"
    rows = []
    for new_pos, old in enumerate(order):
        img, kind, source = items[old]
        name = f"syn_{new_pos:04d}{suffix}"
        _write_image(root / "synthetic" / name, img)
        rows.append({"synthetic_id": name, "kind": kind, "source_train_id": source})
    truth = pd.DataFrame(rows)
    atomic_save(root / "ground_truth.csv", lambda p: truth.to_csv(p, index=False))
    return truth


def recovery(
    result: AuditResult, truth: pd.DataFrame, patient_of: dict[str, Any] | None = None
) -> dict[str, Any]:
    """How the audit's verdicts compare with the known ground truth (Wilson 95% intervals)."""
    merged = truth.merge(result.synthetic, on="synthetic_id", validate="one_to_one")
    out: dict[str, Any] = {}
    for kind, group in merged.groupby("kind"):
        out[str(kind)] = {"n": len(group), "called_copy": int(group["copy"].sum())}
    copies = merged[merged["kind"] != "novel"]
    novel = merged[merged["kind"] == "novel"]
    k_hit, k_fp = int(copies["copy"].sum()), int(novel["copy"].sum())
    out["sensitivity"] = k_hit / len(copies) if len(copies) else float("nan")
    out["sensitivity_ci"] = list(wilson_interval(k_hit, len(copies)))
    out["source_found"] = int(
        ((copies["nearest_train_id"] == copies["source_train_id"]) & copies["copy"]).sum()
    )
    if patient_of is not None:
        same_patient = [
            patient_of.get(a) is not None and patient_of.get(a) == patient_of.get(b)
            for a, b in zip(copies["nearest_train_id"], copies["source_train_id"], strict=True)
        ]
        out["source_patient_found"] = int((np.array(same_patient) & copies["copy"]).sum())
    out["false_copy_rate_novel"] = k_fp / len(novel) if len(novel) else float("nan")
    out["false_copy_rate_novel_ci"] = list(wilson_interval(k_fp, len(novel)))
    out["design_false_copy_rate"] = (100.0 - result.summary["percentile"]) / 100.0
    return out


def run_demo(
    out: str | Path,
    *,
    spatial_dims: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    config: DemoConfig | None = None,
) -> str:
    """Run the demo into folder ``out``; return the printed report."""
    cfg = config or DemoConfig.default(spatial_dims)
    out = Path(out)
    t0 = time.perf_counter()
    # The demo works in place, so that the paths recorded in the audit stay valid; its
    # results (detector, audit, release) are each written atomically.
    if out.exists():
        if not overwrite:
            raise OutputExistsError(
                f"{out}: output folder exists. Choose another folder, or pass --overwrite."
            )
        shutil.rmtree(out)
    truth = build_demo_data(out / "data", cfg, seed, quiet=quiet)
    t_data = time.perf_counter() - t0
    train = load_dataset(
        out / "data" / "train" / "manifest.csv", image_size=cfg.image_size, quiet=quiet
    )
    val = load_dataset(
        out / "data" / "val" / "manifest.csv", image_size=cfg.image_size, quiet=quiet
    )
    synthetic = load_dataset(out / "data" / "synthetic", image_size=cfg.image_size, quiet=quiet)
    t = time.perf_counter()
    detector = Detector.train(
        train,
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        quiet=quiet,
    )
    t_train = time.perf_counter() - t
    detector.save(out / "detector")
    result = audit(train, val, synthetic, detector=detector, seed=seed, quiet=quiet)
    result.summary["timings_s"]["detector_training"] = round(t_train, 3)
    t = time.perf_counter()
    qual = quality(val, synthetic, extractor=detector, seed=seed, quiet=quiet)
    t_quality = time.perf_counter() - t
    result.save(out / "audit", quality=qual)
    # the demo shows every step: a measured control sensitivity below the floor is warned
    # about in its verdict, and the release is written all the same
    released = screen(out / "audit", out / "release", quiet=quiet, force=True)
    rec = recovery(result, truth, dict(zip(train.ids, train.patient_ids, strict=True)))
    rec["released"] = released.n_released
    known = truth.loc[truth["kind"] != "novel", "synthetic_id"]
    rec["released_known_copies"] = int(known.isin(released.released).sum())
    rec["timings_s"] = {
        "data": round(t_data, 3),
        "detector_training": round(t_train, 3),
        "quality": round(t_quality, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out / "demo_recovery.json", rec)
    lines = [
        f"medmem demo ({cfg.spatial_dims}D phantoms, {len(train)} training images of "
        f"{cfg.n_train_patients} patients, {len(val)} validation images of other patients, "
        f"{len(synthetic)} synthetic images)",
        format_verdict(result.summary),
        "",
        "Known ground truth:",
    ]
    for kind in ("exact copy", "varied copy", "novel"):
        if kind in rec:
            r = rec[kind]
            lines.append(f"  {kind:<12} {r['called_copy']:>4} of {r['n']:<4} called copies")
    s_lo, s_hi = rec["sensitivity_ci"]
    f_lo, f_hi = rec["false_copy_rate_novel_ci"]
    lines += [
        f"  sensitivity on known copies: {rec['sensitivity']:.3f} (95% CI {s_lo:.3f}-{s_hi:.3f});"
        f" the nearest training image is the source image for {rec['source_found']}, "
        f"an image of the source patient for {rec.get('source_patient_found', '?')}",
        f"  novel images called copies: {rec['false_copy_rate_novel']:.1%} (95% CI "
        f"{f_lo:.1%}-{f_hi:.1%}); by design about {rec['design_false_copy_rate']:.0%} of truly "
        "novel images score above tau",
        "",
        "Quality of the synthetic set (against the validation images):",
        format_quality(qual),
        "",
        f"report:  {out / 'audit' / 'report.html'}",
        f"audit:   {out / 'audit'} (summary.json, training.csv, synthetic.csv, figures)",
        f"release: {out / 'release'} ({released.n_released} of {len(synthetic)} synthetic "
        f"images; {rec['released_known_copies']} known copies slipped through; the manifest "
        "names no training image or patient)",
        f"took {rec['timings_s']['total']:.0f} s",
    ]
    return "\n".join(lines)


__all__ = ["DemoConfig", "build_demo_data", "recovery", "run_demo"]
