"""Identity benchmark on real radiographs: do follow-ups of training patients stand out?

Patients of ../shared/data/nih-cxr are split three ways (training / validation / novel,
seeded, ``benchmarks._common.split_patients``). One study of each multi-study training
patient is kept out of training: these *follow-ups* are the positives (same patient, new
image, never trained on). Negatives are the images of novel patients. Every image of a
validation patient calibrates the identity threshold (conformal, the audit's ``calibrate``).

Scored per image: the nearest training patient's identity score (max Pearson correlation
over that patient's training images) with

* ``identity``: the detector trained with ``objective="identity"`` on all repeat patients;
* ``identity-<p>%``: the same with only p% of the repeat patients' ids (the images of the
  others each get an id of their own, so the training images are the same): the learning
  curve over the number of repeat patients;
* ``copy``: the detector trained with the copy objective (same images, same settings);
* ``pixel``: Pearson correlation of the pixels.

CPU-cheap by design: 64x64 images, a fixed number of epochs, no early stopping.

Usage:
    python -m benchmarks.identity            # docs/results/identity.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import medmem
from benchmarks._common import NIH, load_nih, machine, read_manifest, split_patients
from medmem import calibrate, nearest_patient
from medmem.detector import Detector
from medmem.metrics import auroc

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def identity_split(manifest: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """Training / follow-up / validation / novel images; follow-ups = the last study of each
    multi-study training patient, kept out of training."""
    parts = split_patients(manifest, seed)
    tr = parts["train"].sort_values(["patient_id", "follow_up"])
    multi = tr.groupby("patient_id")["file"].transform("size") > 1
    held = tr[multi].groupby("patient_id").tail(1)
    return {
        "train": tr.drop(held.index).reset_index(drop=True),
        "follow": held.reset_index(drop=True),
        "val": parts["val"],
        "novel": parts["novel"],
    }


def masked_ids(patient_ids: list[str], share: float, seed: int) -> list[str]:
    """Keep the ids of ``share`` of the repeat patients; every other image its own id."""
    counts = pd.Series(patient_ids).value_counts()
    repeat = np.array(sorted(counts[counts >= 2].index))
    rng = np.random.default_rng(seed)
    keep = set(rng.permutation(repeat)[: int(round(share * len(repeat)))].tolist())
    return [p if p in keep else f"{p}#{i}" for i, p in enumerate(patient_ids)]


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives above the score that at most ``fpr`` of negatives exceed."""
    thr = np.quantile(neg, 1 - fpr, method="higher")
    return float(np.mean(pos > thr))


def score_method(
    e_tr: np.ndarray,
    train_pids: list[str],
    sets: dict[str, np.ndarray],
    follow_pids: list[str],
    percentile: float,
) -> dict:
    """AUROC, TPR at 1% FPR, calibrated threshold and rates, re-identification accuracy."""
    out = {}
    scores = {}
    for name, e in sets.items():
        ids, s, _ = nearest_patient(e, e_tr, train_pids)
        scores[name] = s
        if name == "follow":
            out["reidentified_correct_patient"] = float(
                np.mean([a == b for a, b in zip(ids, follow_pids, strict=True)])
            )
    thr = calibrate(scores["val"], percentile)
    pos, neg = scores["follow"], scores["novel"]
    out.update(
        auroc=float(auroc(pos, neg)),
        tpr_at_1pct_fpr=tpr_at_fpr(pos, neg),
        threshold=float(thr),
        follow_up_rate_at_threshold=float(np.mean(pos >= thr)),
        novel_rate_at_threshold=float(np.mean(neg >= thr)),
    )
    return out


def pixels(ds: medmem.ImageDataset) -> np.ndarray:
    """Images as flat rows (the pixel baseline)."""
    return torch.stack([ds[i] for i in range(len(ds))]).reshape(len(ds), -1).numpy()


def _wanted(args: argparse.Namespace, name: str) -> bool:
    return args.only is None or name in args.only


def main() -> int:
    """Run the benchmark and write docs/results/identity.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=NIH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--percentile", type=float, default=95.0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--name", default="identity", help="Output file stem.")
    ap.add_argument(
        "--only", nargs="+", default=None, help="Run only these methods, e.g. identity copy."
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="Only write the page again from the JSON files (and <name>-epochs*.json checks).",
    )
    args = ap.parse_args()
    if args.render:
        record = json.loads((args.out / f"{args.name}.json").read_text())
        record["checks"] = [
            json.loads(p.read_text()) for p in sorted(args.out.glob(f"{args.name}-epochs*.json"))
        ]
        (args.out / f"{args.name}.md").write_text(render(record))
        return 0
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    manifest = read_manifest(args.data)
    if manifest is None:
        return 0
    parts = identity_split(manifest, args.seed)
    size = (args.image_size,) * 2
    data = {k: load_nih(args.data, v["file"], size) for k, v in parts.items()}
    train_pids = [str(p) for p in parts["train"]["patient_id"]]
    follow_pids = [str(p) for p in parts["follow"]["patient_id"]]
    counts = pd.Series(train_pids).value_counts()
    sizes = {k: len(v) for k, v in parts.items()}
    sizes.update(
        train_patients=int(counts.size),
        train_repeat_patients=int((counts >= 2).sum()),
        follow_up_patients=len(set(follow_pids)),
    )
    print("sizes", sizes, flush=True)
    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    curve = []

    if _wanted(args, "pixel"):
        t = time.perf_counter()
        pix = {k: pixels(v) for k, v in data.items()}
        results["pixel"] = score_method(
            pix["train"],
            train_pids,
            {k: pix[k] for k in ("follow", "val", "novel")},
            follow_pids,
            args.percentile,
        )
        seconds["pixel"] = time.perf_counter() - t
        print("pixel", results["pixel"], flush=True)

    settings = dict(
        epochs=args.epochs, batch_size=args.batch_size, early_stopping=False, seed=args.seed
    )
    runs = [("copy", "copy", 0.0)] + [
        ("identity" if s == 1.0 else f"identity-{round(100 * s)}%", "identity", s)
        for s in args.shares
    ]
    runs = [r for r in runs if _wanted(args, r[0])]
    for name, objective, share in runs:
        t = time.perf_counter()
        ids = masked_ids(train_pids, share, args.seed) if objective == "identity" else None
        det = Detector.train(
            data["train"], objective=objective, patient_ids=ids, quiet=True, **settings
        )
        emb = {k: det.embed(v, quiet=True) for k, v in data.items()}
        r = score_method(
            emb["train"],
            train_pids,
            {k: emb[k] for k in ("follow", "val", "novel")},
            follow_pids,
            args.percentile,
        )
        r["final_loss"] = det.loss_history_[-1]
        if det.identity_training_ is not None:
            r["repeat_patients_used"] = det.identity_training_["n_repeat_patients"]
            curve.append({"share": share, **r})
        results[name] = r
        seconds[name] = time.perf_counter() - t
        print(name, r, f"{seconds[name]:.0f}s", flush=True)
    seconds["total"] = time.perf_counter() - t0
    record = {
        "command": "python -m benchmarks.identity "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k in ("epochs", "batch_size", "image_size", "seed", "name")
        )
        + (" --only " + " ".join(args.only) if args.only else ""),
        "data": "NIH ChestX-ray14 subset (../shared/data/nih-cxr)",
        "machine": machine(),
        "threads": 1,
        "sizes": sizes,
        "settings": {**settings, "image_size": size, "percentile": args.percentile},
        "results": results,
        "learning_curve": curve,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(render(record))
    print("wrote", args.out / f"{args.name}.md")
    return 0


def render(r: dict) -> str:
    """The Markdown page of a benchmark record."""
    res = r["results"]
    target = res.get("identity", {}).get("auroc", float("nan"))
    lines = [
        "# Identity benchmark: follow-ups of training patients vs novel patients (NIH)",
        "",
        f"Generated by `{r['command']}` (do not edit by hand); numbers in the JSON "
        "beside this page.",
        "",
        f"- Data: {r['data']}; split by patient (60% training / 20% validation / 20% novel, "
        f"seed {r['settings']['seed']}). Sizes: {r['sizes']}.",
        "- Positives: the last study of each multi-study training patient, kept out of "
        "training (follow-ups). Negatives: every image of the novel patients. Threshold: "
        f"conformal calibration on the validation patients (`calibrate`, q = "
        f"{r['settings']['percentile']:g}: nominal 5% of novel patients above it).",
        f"- CPU-cheap settings: images {r['settings']['image_size'][0]}x"
        f"{r['settings']['image_size'][1]}, {r['settings']['epochs']} epochs, batch "
        f"{r['settings']['batch_size']}, no early stopping, one thread.",
        f"- Machine: {r['machine']}. Seconds: {r['seconds']}.",
        "",
        "| method | AUROC | TPR at 1% FPR | follow-ups at threshold | novel at threshold "
        "| nearest patient correct | threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in res.items():
        lines.append(
            f"| {name} | {m['auroc']:.3f} | {m['tpr_at_1pct_fpr']:.3f} | "
            f"{m['follow_up_rate_at_threshold']:.3f} | {m['novel_rate_at_threshold']:.3f} | "
            f"{m['reidentified_correct_patient']:.3f} | {m['threshold']:.4f} |"
        )
    lines += [
        "",
        "## Learning curve over the repeat patients used",
        "",
        "| share of repeat patients | repeat patients with ids | AUROC | TPR at 1% FPR |",
        "|---|---|---|---|",
    ]
    for c in r["learning_curve"]:
        lines.append(
            f"| {100 * c['share']:.0f}% | {c['repeat_patients_used']} | {c['auroc']:.3f} | "
            f"{c['tpr_at_1pct_fpr']:.3f} |"
        )
    met = "met" if target >= 0.90 else "not met"
    lines += [
        "",
        f"Target AUROC >= 0.90 for the identity mode: {met} (measured {target:.3f}).",
        "",
    ]
    for extra in r.get("checks", []):
        m = extra["results"].get("identity")
        if m is None:
            continue
        lines += [
            f"Check with longer training (`{extra['command']}`, "
            f"{extra['seconds']['total']:.0f} s): "
            f"identity AUROC {m['auroc']:.3f}, TPR at 1% FPR {m['tpr_at_1pct_fpr']:.3f}, "
            f"follow-ups at threshold {m['follow_up_rate_at_threshold']:.3f}, novel at "
            f"threshold {m['novel_rate_at_threshold']:.3f}.",
            "",
        ]
    rates = [m["novel_rate_at_threshold"] for m in res.values()]
    lines += READING
    lines[-1:-1] = [
        "- The threshold is calibrated as tau is (validation patients, conformal); in this "
        f"one split the novel-patient rate at it ranges {min(rates):.3f}-{max(rates):.3f} "
        "over the methods (nominal 0.05: the guarantee holds on average over exchangeable "
        f"splits; {r['sizes']['novel']} novel and {r['sizes']['val']} validation images, "
        "several per patient, vary from split to split). One seed throughout: with 74 "
        "positives and 128 negatives an AUROC has a standard error of about 0.04.",
    ]
    return "\n".join(lines)


READING = [
    "## Reading",
    "",
    "- The identity mode's AUROC rises with the number of repeat patients it trains on "
    "(learning curve) but stays far below the 0.90 target. Re-identification as a ranking "
    "is well above chance for every method (column *nearest patient correct*; chance is 1 "
    "in the number of training patients), and only a little higher with the identity mode "
    "than with the copy detector: follow-ups do resemble their own patient, but the "
    "max-correlation score is not comparable across images, so a novel patient's image "
    "that resembles many training images scores as high as a follow-up.",
    "- Measured limit: 30 repeat patients (the training share of this subset's multi-study "
    "patients, after one study of each is kept out as the positive), 64x64 inputs and a "
    "CPU budget. Packhauser et al. (AUC 0.994) trained their verification network on "
    "ChestX-ray14 (about 30,000 patients, many with follow-ups). The learning curve says more "
    "repeat patients is the first lever; training twice as long also helped (the check "
    "above); larger inputs were not tried within the CPU budget.",
    "- On data like this subset the audit's identity section therefore says little; "
    "summary.json (``identity.detector.training``) and report.html say when the identity "
    "detector saw fewer than 20 repeat patients.",
    "",
]


if __name__ == "__main__":
    raise SystemExit(main())
