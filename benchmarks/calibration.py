"""Calibration benchmark: how often novel patients are called copies, at every set size.

Real scans with NO copies at all: chest radiographs (../shared/data/nih-cxr, ``--dims 2``,
the default) or T1 brain MRI volumes (../shared/data/ixi-t1, ``--dims 3``). For each of several
patient splits (seeded), patients are divided into training (about ``--n-train`` images), a
validation pool and a novel pool; a detector with medmem's default settings is trained on the
training images. Then, for |val| / |train| from 0.1 to 1.5, validation sets of that size
are drawn from the pool (``--draws`` times) and the audit's thresholds computed:

* the default (conformal) tau: a novel image is a false copy when its nearest training image
  correlates >= tau; the rate is measured on every novel-pool image;
* the paper's tau (95th percentile of training -> nearest-validation correlations);
* tau_mem for N_mem: a "synthetic" set of |train| novel-pool images (none a copy) is drawn,
  and the share of training images whose nearest of them correlates >= tau_mem is the
  false-memorized rate (the paper's tau beside it).

Rates are pooled over draws and splits; the interval is a t interval over the split means
(splits are the independent units). Nominal rate: 5%.

A validation set smaller than the conformal quantile needs for the nominal rate is refused
by the audit (the table says so).

Usage: python -m benchmarks.calibration [--dims 3] [--splits 5] [--draws 20]
Writes docs/results/calibration.{json,md} (2D) or calibration-3d.{json,md} (3D).
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
from benchmarks._common import IXI, IXI_CREDIT, NIH, load_ixi, load_nih, machine, read_manifest
from medmem.search import nearest
from medmem.verify import AlignConfig, AlignedScorer, AlignedSearch, stack_images

RATIOS = (0.1, 0.2, 0.33, 0.5, 0.75, 1.0, 1.5)


def split(manifest: pd.DataFrame, seed: int, n_train: int, n_val_pool: int) -> dict:
    """Whole patients to training (~n_train images), validation pool, novel pool."""
    rng = np.random.default_rng(seed)
    patients = np.array(sorted(manifest["patient_id"].unique()))
    rng.shuffle(patients)
    counts = manifest.groupby("patient_id").size()
    parts: dict[str, list] = {"train": [], "val": [], "novel": []}
    sizes = {"train": 0, "val": 0}
    for p in patients:
        for part, cap in (("train", n_train), ("val", n_val_pool)):
            if sizes[part] < cap:
                parts[part].append(p)
                sizes[part] += int(counts[p])
                break
        else:
            parts["novel"].append(p)
    pid = manifest["patient_id"]
    return {k: manifest[pid.isin(set(v))].reset_index(drop=True) for k, v in parts.items()}


def t_interval(values: list[float]) -> list[float]:
    """95% t interval of the mean of independent values."""
    from math import sqrt

    t975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    half = t975.get(len(v), 2.0) * v.std(ddof=1) / sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--data", type=Path, default=None, help="default: nih-cxr, or ixi-t1 in 3D")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=None, help="default 200 in 2D, 40 in 3D")
    ap.add_argument("--image-size", type=int, default=None, help="default 128 in 2D, 64 in 3D")
    ap.add_argument("--percentile", type=float, default=95.0)
    ap.add_argument(
        "--score",
        choices=("aligned", "embedding"),
        default="aligned",
        help="the audit's score (default: aligned, as medmem audit)",
    )
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="default runs/calibration-benchmark[-3d]"
    )
    args = ap.parse_args()
    three = args.dims == 3
    args.data = args.data or (IXI if three else NIH)
    args.n_train = args.n_train or (40 if three else 200)
    args.image_size = args.image_size or (64 if three else 128)
    suffix = "-3d" if three else ""
    args.checkpoint_dir = args.checkpoint_dir or Path(f"runs/calibration-benchmark{suffix}")
    manifest = read_manifest(args.data)
    if manifest is None:
        return 0
    t0 = time.perf_counter()
    size = (args.image_size,) * args.dims
    column = "path" if three else "file"

    def load(files: pd.Series) -> object:
        return load_ixi(args.data, files, size) if three else load_nih(args.data, files, size)

    n_pool = int(np.ceil(max(RATIOS) * args.n_train))
    per_split, seconds = [], {}
    for sp in range(args.splits):
        parts = split(manifest, 1000 + sp, args.n_train, n_pool)
        train, val_pool, novel = (load(parts[k][column]) for k in ("train", "val", "novel"))
        t = time.perf_counter()
        det = medmem.Detector.train(
            train, seed=sp, checkpoint_dir=args.checkpoint_dir / f"split{sp}", quiet=True
        )
        seconds[f"detector split {sp}"] = round(time.perf_counter() - t, 1)
        e_tr, e_vp, e_nv = (det.embed(ds, quiet=True) for ds in (train, val_pool, novel))
        t = time.perf_counter()
        pool = None
        if args.score == "aligned":
            align = AlignConfig().resolved(args.dims)
            work = int(align.size or 32)  # as medmem.audit reads them
            train_2x = stack_images(train, 2 * work)
            scorer = AlignedScorer(train_2x, align)
            small = {
                "train": scorer.small(train_2x),
                "val": stack_images(val_pool, work),
                "synthetic": stack_images(novel, work),
            }
            emb = {"train": e_tr, "val": e_vp, "synthetic": e_nv}
            ids = {"val": [f"v{i}" for i in range(len(val_pool))]}
            ids["synthetic"] = [f"n{i}" for i in range(len(novel))]
            patients = train.patient_ids  # the null leaves out same-patient pairs, as the audit
            pool = AlignedSearch(scorer, small, emb, ids=ids, groups=patients)
            novel_scores = pool("synthetic", "train", 1)[0][:, 0]
        else:
            novel_scores = nearest(e_nv, e_tr)[0][:, 0]
        n_tr = len(train)
        print(
            f"split {sp}: train {n_tr}, val pool {len(val_pool)}, novel {len(novel)}, detector "
            f"{seconds[f'detector split {sp}']} s ({det.epochs_trained} epochs)",
            flush=True,
        )
        rng = np.random.default_rng([sp, 7])
        rows = []
        for ratio in RATIOS:
            n_val = min(len(val_pool), max(2, int(round(ratio * n_tr))))
            for d in range(args.draws):
                vi = rng.choice(len(val_pool), size=n_val, replace=False)
                si = rng.choice(len(novel), size=min(n_tr, len(novel)), replace=False)
                row = {"ratio": ratio, "n_val": n_val, "draw": d}
                search = None
                if pool is not None:  # this draw's sets, scores shared with the pool's
                    search = AlignedSearch(
                        pool.scorer,
                        {
                            "train": pool.small["train"],
                            "val": pool.small["val"][vi],
                            "synthetic": pool.small["synthetic"][si],
                        },
                        {"train": e_tr, "val": e_vp[vi], "synthetic": e_nv[si]},
                        ids={
                            "val": [pool.ids["val"][i] for i in vi],
                            "synthetic": [pool.ids["synthetic"][i] for i in si],
                        },
                        cache=pool.cache,
                        coarse_cache=pool.coarse_cache,
                        groups=patients,
                    )
                for cal in ("conformal", "paper"):
                    try:
                        r = medmem.audit_embeddings(
                            e_tr,
                            e_vp[vi],
                            e_nv[si],
                            percentile=args.percentile,
                            calibration=cal,
                            n_bootstrap=0,
                            search=search,
                        )
                    except medmem.InputError as exc:  # too few validation images for the rate
                        row[f"{cal}_error"] = str(exc).split(".")[0]
                        continue
                    s = r.summary
                    tau = s["tau"]
                    tau_mem = s.get("tau_mem", tau)
                    row[f"{cal}_tau"] = tau
                    row[f"{cal}_tau_mem"] = tau_mem
                    row[f"{cal}_false_copy_rate"] = float(np.mean(novel_scores >= tau))
                    row[f"{cal}_false_mem_rate"] = float(
                        np.mean(r.training["nearest_synthetic_corr"].to_numpy() >= tau_mem)
                    )
                rows.append(row)
        per_split.append(pd.DataFrame(rows).assign(split=sp, n_train=n_tr, n_novel=len(novel)))
        seconds[f"scoring split {sp}"] = round(time.perf_counter() - t, 1)
    df = pd.concat(per_split, ignore_index=True)
    table = []
    for ratio in RATIOS:
        sub = df[df["ratio"] == ratio]
        entry: dict = {"ratio": ratio, "n_val": sorted(sub["n_val"].unique().tolist())}
        for cal in ("conformal", "paper"):
            for what in ("false_copy_rate", "false_mem_rate"):
                col = f"{cal}_{what}"
                if col not in sub or sub[col].isna().all():
                    entry[col] = None
                    continue
                by_split = sub.groupby("split")[col].mean().dropna().tolist()
                entry[col] = float(sub[col].mean())
                entry[f"{col}_ci95"] = t_interval(by_split)
                entry[f"{col}_by_split"] = by_split
            if f"{cal}_error" in sub and sub[f"{cal}_error"].notna().any():
                entry[f"{cal}_error"] = sub[f"{cal}_error"].dropna().iloc[0]
        table.append(entry)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    report = {
        "dims": args.dims,
        "data": (IXI_CREDIT if three else "NIH ChestX-ray14 subset (../shared/data/nih-cxr)")
        + ", no copies",
        "score": args.score,
        "nominal_rate": (100 - args.percentile) / 100,
        "splits": args.splits,
        "draws": args.draws,
        "n_train_target": args.n_train,
        "image_size": list(size),
        "table": table,
        "seconds": seconds,
        "machine": machine(),
        "command": " ".join(["python", "-m", "benchmarks.calibration", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibration{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"calibration{suffix}.md").write_text(render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    def cell(e: dict, col: str) -> str:
        if e.get(col) is None:
            return "refused (too few validation images: below)"
        lo, hi = e[f"{col}_ci95"]
        return f"{100 * e[col]:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"

    three = r.get("dims", 2) == 3
    what = "brain MRI volumes" if three else "radiographs"
    suffix = "-3d" if three else ""
    lines = [
        f"# Calibration on real {what} with no copies",
        "",
        f"Generated by `{r['command']}` (do not edit by hand); numbers in "
        f"calibration{suffix}.json.",
        "",
        f"- Data: {r['data']}; {r['splits']} patient splits, a default detector trained on "
        f"each split's ~{r['n_train_target']} training images; {r['draws']} validation "
        "(and synthetic) draws per ratio and split.",
        f"- Nominal rate: {100 * r['nominal_rate']:.0f}%. False-copy rate: the share of "
        "novel-pool images (patients in neither set) whose nearest training image correlates "
        ">= tau. False-memorized rate: the share of training images whose nearest image in a "
        "novel 'synthetic' set of |train| images correlates >= tau_mem.",
        f"- Score: {r.get('score', 'embedding')} (`--score {r.get('score', 'embedding')}`; "
        "docs/scoring.md). Detector seconds are loading time when a split's detector "
        "resumed from a finished checkpoint in "
        f"runs/calibration-benchmark{suffix}/.",
        "- Brackets: 95% t interval over the split means (splits are the independent units).",
        f"- Machine: {r['machine']}. Seconds: {r['seconds']}.",
        "",
        "| val/train | n_val | false-copy rate, default | false-copy rate, paper's tau "
        "| false-memorized, default | false-memorized, paper's tau |",
        "|---|---|---|---|---|---|",
    ]
    for e in r["table"]:
        lines.append(
            f"| {e['ratio']:g} | {', '.join(map(str, e['n_val']))} | "
            f"{cell(e, 'conformal_false_copy_rate')} | {cell(e, 'paper_false_copy_rate')} | "
            f"{cell(e, 'conformal_false_mem_rate')} | {cell(e, 'paper_false_mem_rate')} |"
        )
    refused = {  # one example per calibration: the message a user would see
        cal: next((e[f"{cal}_error"] for e in r["table"] if e.get(f"{cal}_error")), None)
        for cal in ("conformal", "paper")
    }
    if any(refused.values()):
        lines += ["", "Refused by the audit (`medmem.InputError`), for example:", ""]
        lines += [f"- {cal}: {msg}." for cal, msg in refused.items() if msg]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
