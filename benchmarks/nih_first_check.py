"""A first real-data check of the audit on ../shared/data/nih-cxr (NIH ChestX-ray14 subset).

Patients are split three ways (seeded): training patients, validation patients (calibrate
tau) and held-out patients whose images play the *novel* synthetic images. The synthetic
set is those novel images plus varied copies of training images (flip, rotation within
+-5 degrees, gamma contrast: the paper's copy definition). A detector is trained on the
training images, the audit runs as `medmem audit` would, and the script reports the
sensitivity (copies called copies) and specificity (novel images not called copies) at
tau, beside the design value of the specificity (q percent).

Usage: python -m benchmarks.nih_first_check [--epochs 60] [--image-size 128]
       [--out docs/results/nih-cxr-first-check.json]
The data are read in place and never copied into the project.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import medmem
from benchmarks._common import NIH, load_nih, machine, read_manifest, split_patients
from medmem.data import ArrayDataset
from medmem.detector import PAPER_VARIATION_KINDS, vary
from medmem.metrics import auroc, wilson_interval


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=NIH)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-copies", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results/nih-cxr-first-check.json"))
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("runs/nih-first-check"))
    args = ap.parse_args()
    manifest = read_manifest(args.data)
    if manifest is None:
        return 0
    t0 = time.perf_counter()
    parts = split_patients(manifest, args.seed)
    size = (args.image_size, args.image_size)

    def load(df: pd.DataFrame) -> medmem.ImageDataset:
        return load_nih(args.data, df["file"], size)

    train, val, novel = load(parts["train"]), load(parts["val"]), load(parts["novel"])
    # synthetic set: novel patients' images + varied copies of training images
    rng = np.random.default_rng([args.seed, 7])
    src = rng.choice(len(train), size=min(args.n_copies, len(train)), replace=False)
    images, ids, truth = [], [], []
    for j in range(len(novel)):
        images.append(novel[j][0].numpy())
        ids.append(f"novel/{novel.ids[j]}")
        truth.append(("novel", ""))
    for s in src:
        images.append(vary(train[int(s)], rng, kinds=PAPER_VARIATION_KINDS)[0].numpy())
        ids.append(f"copy/{train.ids[s]}")
        truth.append(("varied copy", train.ids[s]))
    synthetic = ArrayDataset(np.stack(images), ids=ids)

    t = time.perf_counter()
    detector = medmem.Detector.train(
        train,
        spatial_dims=2,
        image_size=size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
    )
    t_train = time.perf_counter() - t
    result = medmem.audit(train, val, synthetic, detector=detector, seed=args.seed)
    syn = result.synthetic.assign(kind=[k for k, _ in truth], source=[s for _, s in truth])
    copies, novel_rows = syn[syn.kind != "novel"], syn[syn.kind == "novel"]
    sensitivity = float(copies["copy"].mean())
    specificity = float(1 - novel_rows["copy"].mean())
    source_right = float((copies["nearest_train_id"] == copies["source"]).mean())
    auc = auroc(
        copies["nearest_train_corr"].to_numpy(), novel_rows["nearest_train_corr"].to_numpy()
    )

    report = {
        "data": "NIH ChestX-ray14 subset (../shared/data/nih-cxr), 704 images, 480 patients",
        "split": {
            k: {"images": len(v), "patients": int(v["patient_id"].nunique())}
            for k, v in parts.items()
        },
        "n_varied_copies": len(copies),
        "image_size": list(size),
        "detector": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "fingerprint": detector.fingerprint,
        },
        "tau": result.summary["tau"],
        "percentile": result.summary["percentile"],
        "sensitivity": sensitivity,
        "sensitivity_ci95": wilson_interval(int(copies["copy"].sum()), len(copies)),
        "specificity": specificity,
        "specificity_ci95": wilson_interval(int((~novel_rows["copy"]).sum()), len(novel_rows)),
        "design_specificity": result.summary["percentile"] / 100,
        "auroc_copies_vs_novel": auc,
        "nearest_train_is_source": source_right,
        "audit_chance_false_copy_rate": result.summary["chance"]["false_copy_rate"],
        "audit_expected_chance_copies": result.summary["chance"]["expected_copies"],
        "audit_controls_sensitivity": result.summary["controls"]["sensitivity"],
        "n_mem": result.summary["n_mem"],
        "n_copies": result.summary["n_copies"],
        "machine": machine(),
        "seconds": {
            "detector_training": round(t_train, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "command": " ".join(["python", "-m", "benchmarks.nih_first_check", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    """The check as Markdown (docs/results/nih-cxr-first-check.md)."""
    sp = r["split"]
    s_lo, s_hi = r["sensitivity_ci95"]
    p_lo, p_hi = r["specificity_ci95"]
    return "\n".join(
        [
            "# First real-data check: the audit on NIH chest radiographs",
            "",
            "Generated by `python -m benchmarks.nih_first_check` (do not edit by hand). Command: "
            f"`{r['command']}`.",
            "",
            f"- Data: {r['data']}, read in place. Patients split at random (seeded) into "
            f"training ({sp['train']['patients']} patients, {sp['train']['images']} images), "
            f"validation ({sp['val']['patients']} patients, {sp['val']['images']} images: "
            f"calibrate tau) and held-out ({sp['novel']['patients']} patients, "
            f"{sp['novel']['images']} images).",
            f"- Synthetic set: the {sp['novel']['images']} held-out patients' images (novel: no "
            f"patient of theirs is in training) plus {r['n_varied_copies']} varied copies of "
            "training images (random flips, rotation within +-5 degrees, gamma contrast 0.7-1.5: "
            "the paper's definition of a copy).",
            f"- Detector: trained on the training images at {r['image_size'][0]}x"
            f"{r['image_size'][1]}, {r['detector']['epochs']} epochs, batch "
            f"{r['detector']['batch_size']}.",
            f"- Machine: {r['machine']}; detector training {r['seconds']['detector_training']:.0f}"
            f" s, whole check {r['seconds']['total']:.0f} s (other jobs shared the 2 cores; a "
            "rerun with the same --checkpoint-dir reuses the finished detector, so its time is "
            "then short).",
            "",
            "| figure | value |",
            "|---|---|",
            f"| tau ({r['percentile']:g}th percentile) | {r['tau']:.4f} |",
            f"| sensitivity at tau (varied copies called copies) | {r['sensitivity']:.3f} "
            f"(95% CI {s_lo:.3f}-{s_hi:.3f}) |",
            f"| specificity at tau (novel images not called copies) | {r['specificity']:.3f} "
            f"(95% CI {p_lo:.3f}-{p_hi:.3f}) |",
            f"| design specificity (q / 100) | {r['design_specificity']:.2f} |",
            f"| AUROC, varied copies vs novel images | {r['auroc_copies_vs_novel']:.3f} |",
            f"| copies whose nearest training image is their source | "
            f"{r['nearest_train_is_source']:.3f} |",
            f"| N_mem / N_copies reported by the audit | {r['n_mem']} / {r['n_copies']} |",
            "| the audit's own estimate of the rate at which novel images are called copies "
            f"(validation scored against training) | {r['audit_chance_false_copy_rate']:.3f} |",
            f"| the audit's positive-control sensitivity | {r['audit_controls_sensitivity']:.3f} |",
            "",
            "Specificity falls below the design value because the validation set is about a "
            "third the size of the training set: each training image's nearest-validation "
            "correlation is a maximum over fewer images than a synthetic image's "
            "nearest-training correlation, so tau runs low (the effect the detection-accuracy "
            "issue describes). The audit measures this itself: its chance rate, estimated from "
            "the validation images alone, stands above beside the specificity observed on the "
            "held-out patients.",
            "",
            "Intervals: Wilson 95%. By design about (100 - q)% of truly novel images score above "
            "tau, so specificity near q/100 is the expected outcome, not a defect; the full "
            "accuracy benchmark with baselines is `benchmarks/detection.py`.",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
