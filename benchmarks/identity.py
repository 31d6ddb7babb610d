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

Each is also scored with a *margin* (the identity score minus the mean score of the next
``MARGIN_K`` training patients), calibrated the same way.

Statistics: per seed, 95% percentile-bootstrap intervals over patients (follow-up, novel
and validation patients resampled independently, the threshold recalibrated in every
replicate, the same draws for every method); over seeds (each a new patient split and new
detector seeds), the mean with a Student t 95% interval. Each finished seed is kept in
``<name>-runs/seed<k>.json`` (raw scores), so seeds can run in separate processes and
``--render`` summarizes them without training.

CPU-cheap by design: 64x64 images, a fixed number of epochs, no early stopping.

Usage:
    python -m benchmarks.identity --seeds 0 1 2      # docs/results/identity.{json,md}
    python -m benchmarks.identity --seeds 0 1 2 --render   # the page again from the runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import medmem
from benchmarks._common import NIH, load_nih, machine, read_manifest, split_patients
from medmem import calibrate, nearest_patient, search
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


MARGIN_K = 10  # the margin score subtracts the mean of the next MARGIN_K patients' scores
# two-sided 95% Student t quantiles (interval across seeds), by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
METRICS = (
    "auroc",
    "tpr_at_1pct_fpr",
    "follow_up_rate_at_threshold",
    "novel_rate_at_threshold",
    "reidentified_correct_patient",
)


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives above the score that at most ``fpr`` of negatives exceed."""
    thr = np.quantile(neg, 1 - fpr, method="higher")
    return float(np.mean(pos > thr))


def repeat_patient_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Patients of the whole subset by number of images (explains the learning curve's x-axis)."""
    c = manifest["patient_id"].astype(str).value_counts()
    return {
        "images": int(len(manifest)),
        "patients": int(c.size),
        "patients_with_2_or_more_images": int((c >= 2).sum()),
        "patients_with_3_or_more_images": int((c >= 3).sum()),
    }


def patient_scores(
    e: np.ndarray, e_tr: np.ndarray, train_pids: list[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Nearest training patient, its identity score (``nearest_patient``) and the margin score.

    The margin score is the identity score minus the mean score of the next ``MARGIN_K``
    training patients (each patient's score = max correlation over its images): a query that
    resembles many training patients no longer scores high only for that. It uses the query
    and the training images alone, so the conformal calibration on validation patients holds
    for it as for the raw score.
    """
    ids, s, _ = nearest_patient(e, e_tr, train_pids)
    vals, idx = search.nearest(e, e_tr, k=min(len(e_tr), 200))
    margin = np.empty(len(e))
    for r in range(len(e)):
        best: dict[str, float] = {}
        for v, i in zip(vals[r], idx[r], strict=True):
            best.setdefault(train_pids[i], float(v))
            if len(best) > MARGIN_K:
                break
        top = list(best.values())
        margin[r] = top[0] - np.mean(top[1:])
    return ids, s, margin


def rates(pos: np.ndarray, neg: np.ndarray, val: np.ndarray, percentile: float) -> dict:
    """AUROC, TPR at 1% FPR, the calibrated threshold (from ``val``) and the rates at it."""
    thr = calibrate(val, percentile)
    return {
        "auroc": float(auroc(pos, neg)),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg),
        "threshold": float(thr),
        "follow_up_rate_at_threshold": float(np.mean(pos >= thr)),
        "novel_rate_at_threshold": float(np.mean(neg >= thr)),
    }


def pixels(ds: medmem.ImageDataset) -> np.ndarray:
    """Images as flat rows (the pixel baseline)."""
    return torch.stack([ds[i] for i in range(len(ds))]).reshape(len(ds), -1).numpy()


def _wanted(only: list[str] | None, name: str) -> bool:
    return only is None or name in only


def run_seed(args: argparse.Namespace, manifest: pd.DataFrame, seed: int) -> dict:
    """Train and score every method on the patient split of ``seed``: the raw scores."""
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    parts = identity_split(manifest, seed)
    size = (args.image_size,) * 2
    data = {k: load_nih(args.data, v["file"], size) for k, v in parts.items()}
    pids = {k: [str(p) for p in v["patient_id"]] for k, v in parts.items()}
    train_pids = pids["train"]
    counts = pd.Series(train_pids).value_counts()
    sizes = {k: len(v) for k, v in parts.items()}
    sizes.update(
        train_patients=int(counts.size),
        train_repeat_patients=int((counts >= 2).sum()),
        follow_up_patients=len(set(pids["follow"])),
        val_patients=len(set(pids["val"])),
        novel_patients=len(set(pids["novel"])),
    )
    print(f"seed {seed} sizes {sizes} load {load:.2f}", flush=True)
    seconds: dict[str, float] = {}
    methods: dict[str, dict] = {}

    def score(name: str, emb: dict[str, np.ndarray], extra: dict) -> None:
        out: dict = {"raw": {}, "margin": {}, **extra}
        for part in ("follow", "val", "novel"):
            ids, s, m = patient_scores(emb[part], emb["train"], train_pids)
            out["raw"][part] = [round(float(x), 6) for x in s]
            out["margin"][part] = [round(float(x), 6) for x in m]
            if part == "follow":
                out["reidentified"] = [a == b for a, b in zip(ids, pids["follow"], strict=True)]
        methods[name] = out

    if _wanted(args.only, "pixel"):
        t = time.perf_counter()
        score("pixel", {k: pixels(v) for k, v in data.items()}, {})
        seconds["pixel"] = time.perf_counter() - t
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, early_stopping=False, seed=seed)
    runs = [("copy", "copy", 0.0)] + [
        ("identity" if s == 1.0 else f"identity-{round(100 * s)}%", "identity", s)
        for s in args.shares
    ]
    for name, objective, share in [r for r in runs if _wanted(args.only, r[0])]:
        t = time.perf_counter()
        ids = masked_ids(train_pids, share, seed) if objective == "identity" else None
        det = Detector.train(
            data["train"], objective=objective, patient_ids=ids, quiet=True, **settings
        )
        extra: dict = {"final_loss": det.loss_history_[-1]}
        if det.identity_training_ is not None:
            extra.update(
                share=share, repeat_patients_used=det.identity_training_["n_repeat_patients"]
            )
        score(name, {k: det.embed(v, quiet=True) for k, v in data.items()}, extra)
        seconds[name] = time.perf_counter() - t
        print(f"seed {seed} {name} {seconds[name]:.0f}s", flush=True)
    seconds["total"] = time.perf_counter() - t0
    return {
        "seed": seed,
        "load_average_at_start": round(load, 2),
        "sizes": sizes,
        "patients": {k: pids[k] for k in ("follow", "val", "novel")},
        "methods": methods,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _clusters(pids: list[str]) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pids):
        groups.setdefault(p, []).append(i)
    return [np.array(v) for v in groups.values()]


def _resample(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Indices of a bootstrap sample of patients (all images of each patient drawn)."""
    pick = rng.integers(0, len(groups), len(groups))
    return np.concatenate([groups[i] for i in pick])


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def seed_statistics(
    run: dict, percentile: float, n_boot: int, boot_seed: int, replicates: dict | None = None
) -> dict:
    """Point values and 95% percentile-bootstrap intervals for every method and score.

    Follow-up, novel and validation patients are resampled independently (a patient with
    several images is drawn with all of them), the same draws for every method (paired), and
    the threshold is recalibrated in every replicate. The detectors stay as trained, so the
    intervals are conditional on the training run; the spread over seeds covers the rest.
    ``replicates``, when given, receives every bootstrap replicate, keyed
    ``(variant, method, metric)`` (for the seed-averaged intervals of ``summarize``).
    """
    keep = replicates if replicates is not None else {}
    rng = np.random.default_rng(boot_seed)
    groups = {k: _clusters(v) for k, v in run["patients"].items()}
    draws = [{k: _resample(g, rng) for k, g in groups.items()} for _ in range(n_boot)]
    out: dict = {}
    boot: dict[str, dict[str, np.ndarray]] = {}
    for variant in ("raw", "margin"):
        block: dict = {}
        boot_auroc = boot[variant] = {}
        for name, m in run["methods"].items():
            s = {k: np.asarray(v) for k, v in m[variant].items()}
            reid = np.asarray(m["reidentified"], dtype=float)
            point = rates(s["follow"], s["novel"], s["val"], percentile)
            point["reidentified_correct_patient"] = float(reid.mean())
            reps = {k: np.empty(n_boot) for k in METRICS}
            for b, d in enumerate(draws):
                r = rates(
                    s["follow"][d["follow"]], s["novel"][d["novel"]], s["val"][d["val"]], percentile
                )
                for k in METRICS[:-1]:
                    reps[k][b] = r[k]
                reps["reidentified_correct_patient"][b] = reid[d["follow"]].mean()
            boot_auroc[name] = reps["auroc"]
            keep.update({(variant, name, k): v for k, v in reps.items()})
            block[name] = {
                **{k: round(float(v), 4) for k, v in point.items()},
                "ci": {k: _ci(reps[k]) for k in METRICS},
            }
            for k in ("final_loss", "share", "repeat_patients_used"):
                if k in m:
                    block[name][k] = m[k]
        if "identity" in boot_auroc:
            for name in boot_auroc:
                if name != "identity":
                    diff = block["identity"]["auroc"] - block[name]["auroc"]
                    block["identity"].setdefault("auroc_minus", {})[name] = {
                        "value": round(diff, 4),
                        "ci": _ci(boot_auroc["identity"] - boot_auroc[name]),
                    }
                    keep[(variant, "identity", f"minus:{name}")] = (
                        boot_auroc["identity"] - boot_auroc[name]
                    )
        if variant != "raw":
            for name in boot_auroc:
                block[name]["auroc_minus_raw"] = {
                    "value": round(block[name]["auroc"] - out["raw"][name]["auroc"], 4),
                    "ci": _ci(boot_auroc[name] - boot["raw"][name]),
                }
                keep[(variant, name, "minus_raw")] = boot_auroc[name] - boot["raw"][name]
        out[variant] = block
    return out


def across_seeds(values: list[float], bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict:
    """Mean over seeds with a Student t 95% interval (seed = patient split + training).

    The interval is clipped to ``bounds`` (a rate or an AUROC lies in [0, 1]).
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    out = {"mean": round(float(v.mean()), 4), "values": [round(float(x), 4) for x in v]}
    if n >= 2:
        sd = float(v.std(ddof=1))
        half = T975.get(n - 1, 1.96) * sd / np.sqrt(n)
        lo, hi = float(v.mean() - half), float(v.mean() + half)
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        out.update(sd=round(sd, 4), ci=[round(lo, 4), round(hi, 4)])
    return out


def summarize(per_seed: list[dict], replicates: list[dict] | None = None) -> dict:
    """Across-seed means and intervals of every method's metrics and AUROC differences.

    ``ci``: Student t over seeds (split and training vary: the interval to quote).
    ``pooled_ci``: percentile interval of the seed-averaged bootstrap replicates (patient
    sampling within these splits only; narrower, it leaves out training variation).
    """

    def entry(variant: str, name: str, key: str, values: list[float], bounds) -> dict:
        out = across_seeds(values, bounds)
        if replicates and all((variant, name, key) in r for r in replicates):
            out["pooled_ci"] = _ci(np.mean([r[(variant, name, key)] for r in replicates], axis=0))
        return out

    out: dict = {}
    for variant in ("raw", "margin"):
        block: dict = {}
        for name in per_seed[0][variant]:
            rows = [s[variant][name] for s in per_seed]
            block[name] = {
                k: entry(variant, name, k, [r[k] for r in rows], (0.0, 1.0)) for k in METRICS
            }
            for other in rows[0].get("auroc_minus", {}):
                block[name].setdefault("auroc_minus", {})[other] = entry(
                    variant,
                    name,
                    f"minus:{other}",
                    [r["auroc_minus"][other]["value"] for r in rows],
                    (-1.0, 1.0),
                )
            if "auroc_minus_raw" in rows[0]:
                block[name]["auroc_minus_raw"] = entry(
                    variant,
                    name,
                    "minus_raw",
                    [r["auroc_minus_raw"]["value"] for r in rows],
                    (-1.0, 1.0),
                )
        out[variant] = block
    return out


def learning_curve(
    per_seed: list[dict],
    seeds: list[int],
    variant: str = "raw",
    replicates: list[dict] | None = None,
) -> dict:
    """Points per share and seed, and a log-linear trend AUROC = m + b * log2(repeat patients).

    The slope is fitted per seed (one split, its shares) and summarized over seeds; the
    extrapolated number of repeat patients for AUROC 0.90 follows from the mean trend and the
    slope's interval, and is labelled as an extrapolation. With ``replicates`` the slope
    also gets a patient-sampling interval (each seed's slope refitted on every bootstrap
    replicate, the same draws at every share, then averaged over seeds).
    """
    points = []
    for seed, s in zip(seeds, per_seed, strict=True):
        for name, m in s[variant].items():
            if "share" in m:
                points.append(
                    {
                        "seed": seed,
                        "method": name,
                        "share": m["share"],
                        "repeat_patients_used": m["repeat_patients_used"],
                        "auroc": m["auroc"],
                        "auroc_ci": m["ci"]["auroc"],
                        "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
                        "tpr_ci": m["ci"]["tpr_at_1pct_fpr"],
                    }
                )
    shares = sorted({p["share"] for p in points})
    by_share = []
    for sh in shares:
        ps = [p for p in points if p["share"] == sh]
        by_share.append(
            {
                "share": sh,
                "repeat_patients_used": across_seeds([p["repeat_patients_used"] for p in ps], None),
                "auroc": across_seeds([p["auroc"] for p in ps]),
                "tpr_at_1pct_fpr": across_seeds([p["tpr_at_1pct_fpr"] for p in ps]),
            }
        )
    out: dict = {"points": points, "by_share": by_share}
    if len(shares) < 2:
        return out
    slopes = []
    for seed in seeds:
        ps = [p for p in points if p["seed"] == seed]
        x = np.log2([p["repeat_patients_used"] for p in ps])
        y = np.array([p["auroc"] for p in ps])
        slopes.append(float(np.polyfit(x, y, 1)[0]))
    x = np.log2([p["repeat_patients_used"] for p in points])
    y = np.array([p["auroc"] for p in points])
    centre, mean = float(x.mean()), float(y.mean())
    slope = across_seeds(slopes, None)
    if replicates:
        boot_slopes = []
        for seed, reps in zip(seeds, replicates, strict=True):
            ps = [p for p in points if p["seed"] == seed]
            xs = np.log2([p["repeat_patients_used"] for p in ps])
            ys = np.stack([reps[(variant, p["method"], "auroc")] for p in ps])
            xc = (xs - xs.mean())[:, None]
            boot_slopes.append((xc * (ys - ys.mean(axis=0))).sum(axis=0) / (xc**2).sum())
        slope["pooled_ci"] = _ci(np.mean(boot_slopes, axis=0))
    trend = {
        "slope_per_doubling": slope,
        "centre_repeat_patients": round(2**centre, 1),
        "auroc_at_centre": round(mean, 4),
    }

    def needed(b: float) -> float | None:
        return None if b <= 0 else float(2 ** (centre + (0.90 - mean) / b))

    b = slope["mean"]
    lo, hi = slope.get("ci", [b, b])
    trend["extrapolated_repeat_patients_for_auroc_0.90"] = {
        "at_mean_slope": needed(b),
        "at_upper_slope": needed(hi),
        "at_lower_slope": needed(lo),
    }
    out["trend"] = trend
    return out


def paired_check(
    main_run: dict, other_run: dict, method: str, percentile: float, n_boot: int, boot_seed: int
) -> dict | None:
    """AUROC of ``method`` in another run minus the main run, same split, paired bootstrap."""
    if (
        main_run["patients"] != other_run["patients"]
        or method not in main_run["methods"]
        or method not in other_run["methods"]
    ):
        return None
    rng = np.random.default_rng(boot_seed)
    groups = {k: _clusters(v) for k, v in main_run["patients"].items()}
    a = {k: np.asarray(v) for k, v in main_run["methods"][method]["raw"].items()}
    o = {k: np.asarray(v) for k, v in other_run["methods"][method]["raw"].items()}
    reps = np.empty(n_boot)
    for b in range(n_boot):
        f, n = _resample(groups["follow"], rng), _resample(groups["novel"], rng)
        reps[b] = auroc(o["follow"][f], o["novel"][n]) - auroc(a["follow"][f], a["novel"][n])
    value = auroc(o["follow"], o["novel"]) - auroc(a["follow"], a["novel"])
    return {"value": round(float(value), 4), "ci": _ci(reps)}


def _key(args: argparse.Namespace) -> dict:
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "shares": list(args.shares),
        "only": args.only,
        "margin_k": MARGIN_K,
    }


def _command(args: argparse.Namespace) -> str:
    cmd = (
        f"python -m benchmarks.identity --seeds {' '.join(map(str, args.seeds))} "
        f"--image-size {args.image_size} --epochs {args.epochs} --batch-size {args.batch_size}"
    )
    if args.name != "identity":
        cmd += f" --name {args.name}"
    if args.only:
        cmd += " --only " + " ".join(args.only)
    return cmd


def _load_runs(
    out: Path, name: str, seeds: list[int], key: dict | None = None
) -> list[dict] | None:
    runs = []
    for seed in seeds:
        path = out / f"{name}-runs" / f"seed{seed}.json"
        if not path.exists():
            return None
        run = json.loads(path.read_text())
        if key is not None and run.get("key") != key:
            return None
        runs.append(run)
    return runs


def main() -> int:
    """Run the benchmark (or reuse finished seeds) and write docs/results/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=NIH)
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="Patient splits (and detector seeds); one run per seed.",
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--percentile", type=float, default=95.0)
    ap.add_argument("--n-boot", type=int, default=2000, help="Bootstrap replicates per seed.")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--name", default="identity", help="Output file stem.")
    ap.add_argument(
        "--only", nargs="+", default=None, help="Run only these methods, e.g. identity copy."
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="Train nothing: summarize the finished seeds (<name>-runs/) and write the page.",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    manifest = read_manifest(args.data)
    if manifest is None:
        return 0
    key = _key(args)
    runs = []
    for seed in args.seeds:
        path = args.out / f"{args.name}-runs" / f"seed{seed}.json"
        old = json.loads(path.read_text()) if path.exists() else None
        if old is not None and old.get("key") == key:
            print(f"seed {seed}: reusing {path}", flush=True)
            runs.append(old)
            continue
        if args.render:
            raise SystemExit(f"--render: no finished run with these settings at {path}")
        run = {"key": key, **run_seed(args, manifest, seed)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run) + "\n")
        runs.append(run)
    record = build_record(args, manifest, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(render(record))
    print("wrote", args.out / f"{args.name}.md")
    return 0


def build_record(args: argparse.Namespace, manifest: pd.DataFrame, runs: list[dict]) -> dict:
    """Per-seed statistics, the summary over seeds, the learning curve and the checks."""
    seeds = [r["seed"] for r in runs]
    replicates: list[dict] = [{} for _ in runs]
    per_seed = [
        seed_statistics(r, args.percentile, args.n_boot, 1000 + r["seed"], reps)
        for r, reps in zip(runs, replicates, strict=True)
    ]
    checks = []
    for path in sorted(args.out.glob(f"{args.name}-epochs*.json")):
        check = json.loads(path.read_text())
        if "summary" not in check:
            continue  # an older single-seed record
        stem = path.stem
        other = _load_runs(args.out, stem, check["seeds"])
        diffs = {}
        if other is not None:
            mine = {r["seed"]: r for r in runs}
            for o in other:
                if o["seed"] in mine:
                    d = paired_check(
                        mine[o["seed"]],
                        o,
                        "identity",
                        args.percentile,
                        args.n_boot,
                        boot_seed=2000 + o["seed"],
                    )
                    if d is not None:
                        diffs[o["seed"]] = d
        checks.append(
            {
                "name": stem,
                "command": check["command"],
                "seeds": check["seeds"],
                "epochs": check["settings"]["epochs"],
                "seconds_total": {s: v["total"] for s, v in check["seconds"].items()},
                "identity": check["summary"]["raw"].get("identity"),
                "identity_auroc_minus_main": {
                    "per_seed": diffs,
                    **(
                        across_seeds([d["value"] for d in diffs.values()], (-1.0, 1.0))
                        if diffs
                        else {}
                    ),
                },
            }
        )
    return {
        "command": _command(args),
        "name": args.name,
        "data": "NIH ChestX-ray14 subset (../shared/data/nih-cxr)",
        "subset": repeat_patient_counts(manifest),
        "machine": machine(),
        "threads": 1,
        "seeds": seeds,
        "settings": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "early_stopping": False,
            "image_size": [args.image_size] * 2,
            "percentile": args.percentile,
            "shares": list(args.shares),
            "n_boot": args.n_boot,
            "margin_k": MARGIN_K,
        },
        "sizes": {str(r["seed"]): r["sizes"] for r in runs},
        "load_average_at_start": {str(r["seed"]): r["load_average_at_start"] for r in runs},
        "seconds": {str(r["seed"]): r["seconds"] for r in runs},
        "summary": summarize(per_seed, replicates),
        "per_seed": {str(s): p for s, p in zip(seeds, per_seed, strict=True)},
        "learning_curve": learning_curve(per_seed, seeds, "raw", replicates),
        "checks": checks,
    }


def _f(x: float, d: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{d}f}"


def _mci(s: dict) -> str:
    """Mean over seeds with its interval."""
    ci = s.get("ci")
    return f"{_f(s['mean'])} [{_f(ci[0])}, {_f(ci[1])}]" if ci else _f(s["mean"])


def _pci(s: dict) -> str:
    """The seed-averaged patient-sampling interval."""
    ci = s.get("pooled_ci")
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else "n/a"


def _vci(v: float, ci: list[float]) -> str:
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def render(r: dict) -> str:
    """The Markdown page of a benchmark record."""
    seeds = r["seeds"]
    n = len(seeds)
    st = r["settings"]
    summ = r["summary"]["raw"]
    sub = r["subset"]
    s0 = r["sizes"][str(seeds[0])]
    loads = ", ".join(f"seed {k}: {v}" for k, v in r["load_average_at_start"].items())
    total = sum(v["total"] for v in r["seconds"].values())
    secs = ", ".join(f"seed {k}: {v['total']:.0f}" for k, v in r["seconds"].items())
    lines = [
        "# Identity benchmark: follow-ups of training patients vs novel patients (NIH)",
        "",
        f"Generated by `{r['command']}` (do not edit by hand; `--render` rewrites it from the "
        f"finished seeds in `{r['name']}-runs/`); numbers in the "
        "JSON beside this page.",
        "",
        f"- Data: {r['data']}: {sub['images']} images of {sub['patients']} patients; "
        f"{sub['patients_with_2_or_more_images']} patients have 2 or more images, "
        f"{sub['patients_with_3_or_more_images']} have 3 or more.",
        f"- Split by patient (60% training / 20% validation / 20% novel), once per seed "
        f"({', '.join(map(str, seeds))}; the seed also seeds the detectors). Sizes for seed "
        f"{seeds[0]}: {s0}; every seed's in the JSON.",
        "- Positives: the last study of each multi-study training patient, kept out of "
        "training (follow-ups, one per patient). Negatives: every image of the novel patients. "
        "Threshold: conformal calibration on the validation patients (`calibrate`, q = "
        f"{st['percentile']:g}: nominal 5% of novel patients above it).",
        f"- CPU-cheap settings: images {st['image_size'][0]}x{st['image_size'][1]}, "
        f"{st['epochs']} epochs, batch {st['batch_size']}, no early stopping, one thread.",
        f"- Intervals. Per seed: 95% percentile bootstrap ({st['n_boot']} replicates) over "
        "patients: follow-up, novel and validation patients resampled independently (a "
        "patient with several images drawn with all of them), the threshold recalibrated in "
        "every replicate, the same draws for every method (paired differences); the trained "
        f"detectors are held fixed. Over seeds: mean with a Student t 95% interval over the "
        f"{n} seeds (each seed a new patient split and new training), the interval to quote.",
        f"- Machine: {r['machine']}"
        + (
            ", shared with other jobs while this ran"
            if max(r["load_average_at_start"].values()) > 1.5
            else ""
        )
        + f" (1-minute load average at the start of each seed: {loads}; one thread per "
        "process; a load above the core count means other work competed): the seconds are "
        f"upper bounds. Seconds per seed: {secs} (sum {total:.0f}); per method in the JSON.",
        "",
        f"## Results over {n} seeds (mean [95% interval over seeds])",
        "",
        "The last column is the narrower interval of the same mean from patient sampling "
        "alone (the seeds' bootstrap replicates averaged; it leaves out training variation).",
        "",
        "| method | AUROC | TPR at 1% FPR | follow-ups at threshold | novel at threshold "
        "| nearest patient correct | AUROC, patient sampling only |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in summ.items():
        lines.append(
            f"| {name} | " + " | ".join(_mci(m[k]) for k in METRICS) + f" | {_pci(m['auroc'])} |"
        )
    ident = summ.get("identity")
    if ident and "auroc_minus" in ident:
        lines += [
            "",
            "AUROC of the identity mode minus each other method (paired: same split, same "
            "bootstrap draws):",
            "",
            "| minus | "
            + " | ".join(f"seed {s}" for s in seeds)
            + " | mean over seeds | patient sampling only |",
            "|---|" + "---|" * (n + 2),
        ]
        for other, d in ident["auroc_minus"].items():
            cells = [
                _vci(
                    r["per_seed"][str(s)]["raw"]["identity"]["auroc_minus"][other]["value"],
                    r["per_seed"][str(s)]["raw"]["identity"]["auroc_minus"][other]["ci"],
                )
                for s in seeds
            ]
            lines.append(f"| {other} | " + " | ".join(cells) + f" | {_mci(d)} | {_pci(d)} |")
    lines += [
        "",
        "## Per seed (value [95% bootstrap interval over patients])",
        "",
        "| method | seed | AUROC | TPR at 1% FPR | follow-ups at threshold | novel at threshold "
        "| nearest patient correct | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in summ:
        for s in seeds:
            m = r["per_seed"][str(s)]["raw"][name]
            lines.append(
                f"| {name} | {s} | "
                + " | ".join(_vci(m[k], m["ci"][k]) for k in METRICS)
                + f" | {m['threshold']:.4f} |"
            )
    lc = r["learning_curve"]
    top = max((p["repeat_patients_used"] for p in lc["points"]), default=0)
    if len(lc["by_share"]) >= 2:
        lines += [
            "",
            "## Learning curve over the repeat patients used (identity mode)",
            "",
            "Repeat patient: a training patient with 2 or more training images (after its "
            "follow-up is kept out, so 3 or more images in the subset). Only these give the "
            "identity objective positive pairs; the other training patients' images each get an "
            "id of their own, so every point trains on the same images.",
            "",
            "| share of repeat patients | repeat patients per seed | "
            + " | ".join(f"AUROC seed {s}" for s in seeds)
            + " | AUROC mean | TPR at 1% FPR mean |",
            "|---|---|" + "---|" * n + "---|---|",
        ]
        for b in lc["by_share"]:
            pts = {p["seed"]: p for p in lc["points"] if p["share"] == b["share"]}
            cells = [_vci(pts[s]["auroc"], pts[s]["auroc_ci"]) for s in seeds]
            used = ", ".join(str(int(v)) for v in b["repeat_patients_used"]["values"])
            lines.append(
                f"| {100 * b['share']:.0f}% | {used} | "
                + " | ".join(cells)
                + f" | {_mci(b['auroc'])} | {_mci(b['tpr_at_1pct_fpr'])} |"
            )
        tr = lc.get("trend")
        if tr:
            sl = tr["slope_per_doubling"]
            ex = tr["extrapolated_repeat_patients_for_auroc_0.90"]

            def num(v: float | None) -> str:
                if v is None:
                    return "no finite number (the slope interval reaches 0)"
                return "more than a million" if v > 1e6 else f"about {v:,.0f}"

            slope_txt = _mci(sl)
            lines += [
                "",
                f"Trend (log-linear fit per seed, AUROC = m + b log2(repeat patients)): slope b = "
                f"{slope_txt} AUROC per doubling of the repeat patients (mean [95% interval] over "
                f"seeds; per seed {sl['values']}; patient sampling only {_pci(sl)}).",
                "",
                f"*Extrapolation, far outside the measured range "
                f"({min(p['repeat_patients_used'] for p in lc['points'])}-"
                f"{max(p['repeat_patients_used'] for p in lc['points'])} repeat patients), "
                "not a measurement:* if the trend held, AUROC 0.90 would need "
                f"{num(ex['at_mean_slope'])} repeat patients at the mean slope (range "
                f"{num(ex['at_upper_slope'])} at the interval's steepest slope to "
                f"{num(ex['at_lower_slope'])} at its shallowest). A log-linear trend in a bounded "
                "quantity cannot hold indefinitely, and 64x64 inputs and the CPU budget may cap it "
                "sooner: read it as an order of magnitude at most.",
                "",
                f"Why the x-axis stops near {top}: "
                f"the whole subset has {sub['patients_with_3_or_more_images']} patients with 3 or "
                "more images (a training image pair left after the held-out follow-up); with 60% "
                f"of patients in training about {0.6 * sub['patients_with_3_or_more_images']:.0f} "
                "of them land in training. Putting every such patient in training would not even "
                "double the x-axis.",
            ]
    mg = r["summary"]["margin"]
    lines += [
        "",
        f"## Margin score (identity score minus the mean of the next {st['margin_k']} "
        "training patients' scores)",
        "",
        "Same embeddings, same calibration (validation patients), fixed before looking at "
        "the results: a query that resembles many training patients should no longer score "
        "high for that alone. Mean [95% interval over seeds]:",
        "",
        "| method | AUROC | TPR at 1% FPR | follow-ups at threshold | novel at threshold "
        "| AUROC minus the raw score's (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in mg.items():
        lines.append(
            f"| {name} | "
            + " | ".join(_mci(m[k]) for k in METRICS[:4])
            + f" | {_mci(m['auroc_minus_raw'])} |"
        )
    for c in r.get("checks", []):
        m = c["identity"]
        if m is None:
            continue
        d = c["identity_auroc_minus_main"]
        per = ", ".join(f"seed {s}: {_vci(v['value'], v['ci'])}" for s, v in d["per_seed"].items())
        lines += [
            "",
            f"## Check: {c['epochs']} epochs instead of {st['epochs']}",
            "",
            f"`{c['command']}` (seconds per seed: {c['seconds_total']}): identity AUROC "
            f"{_mci(m['auroc'])}, TPR at 1% FPR {_mci(m['tpr_at_1pct_fpr'])}, follow-ups at "
            f"threshold {_mci(m['follow_up_rate_at_threshold'])}, novel at threshold "
            f"{_mci(m['novel_rate_at_threshold'])} (mean [95% interval over seeds {c['seeds']}]).",
            "",
            f"AUROC minus this page's identity mode, paired on the same split: {per}"
            + (f"; mean {_mci(d)}." if "mean" in d else "."),
        ]
    if ident:
        target = ident["auroc"]
        met = "met" if target.get("ci", [target["mean"]])[0] >= 0.90 else "not met"
        lines += [
            "",
            f"Target AUROC >= 0.90 for the identity mode: {met} (measured {_mci(target)}).",
        ]
    lines += ["", *reading(r)]
    return "\n".join(lines) + "\n"


def _excludes_zero(d: dict | None) -> bool:
    ci = (d or {}).get("ci")
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def _verdict(d: dict) -> str:
    """What the interval of a difference says."""
    if not _excludes_zero(d):
        return "the interval includes 0: no established difference"
    return "the interval excludes 0: " + ("a gain" if d["mean"] > 0 else "a loss")


def reading(r: dict) -> list[str]:
    """The page's reading, its figures taken from the record."""
    summ = r["summary"]["raw"]
    ident = summ.get("identity")
    if ident is None or "copy" not in summ or "pixel" not in summ:
        return []
    n = len(r["seeds"])
    sub = r["subset"]
    diffs = ident.get("auroc_minus", {})
    copy_d = diffs.get("copy", {"mean": float("nan")})
    lines = [
        "## Reading",
        "",
        f"- Over {n} seeds the identity mode's AUROC for follow-ups vs novel patients is "
        f"{_mci(ident['auroc'])}, the copy detector's {_mci(summ['copy']['auroc'])}, the "
        f"pixels' {_mci(summ['pixel']['auroc'])}. The identity mode's paired advantage over "
        f"the copy detector is {_mci(copy_d)} AUROC ("
        + (
            "its interval over seeds excludes 0"
            if _excludes_zero(copy_d)
            else "its interval over seeds includes 0: not established with these seeds"
        )
        + f"; patient sampling alone gives {_pci(copy_d)}). Either way it is far below the "
        "0.90 target. Re-identification as a ranking "
        f"(nearest patient correct: identity {_mci(ident['reidentified_correct_patient'])}, "
        f"copy {_mci(summ['copy']['reidentified_correct_patient'])}, pixels "
        f"{_mci(summ['pixel']['reidentified_correct_patient'])}; chance about 1 in "
        f"{r['sizes'][str(r['seeds'][0])]['train_patients']}) is well above chance for every "
        "method: follow-ups do resemble their own patient, but a novel patient's image that "
        "resembles many training images scores as high as a follow-up.",
    ]
    tr = r["learning_curve"].get("trend")
    if tr:
        sl = tr["slope_per_doubling"]
        lines.append(
            f"- Learning curve: {_mci(sl)} AUROC per doubling of the repeat patients "
            f"(patient sampling alone: {_pci(sl)}); "
            + (
                "the interval excludes 0, so AUROC does rise with the repeat patients"
                if _excludes_zero(sl)
                else "the interval includes 0, so even the rise is not established over "
                "this short range (a factor of 4 in repeat patients within each split)"
            )
            + (
                ". The extrapolation above is the honest reach of these data: an order of "
                "magnitude, with a wide range."
                if _excludes_zero(sl)
                else "; the extrapolation above therefore has no upper end."
            )
        )
    reps = [v["train_repeat_patients"] for v in r["sizes"].values()]
    steep = (tr or {}).get("extrapolated_repeat_patients_for_auroc_0.90", {}).get("at_upper_slope")
    lines.append(
        f"- Measured limit: the subset's repeat patients. Of its {sub['patients']} patients "
        f"{sub['patients_with_2_or_more_images']} have 2 or more images but only "
        f"{sub['patients_with_3_or_more_images']} have 3 or more, i.e. still 2 training "
        "images after the follow-up is kept out; a 60/20/20 patient split leaves "
        f"{min(reps)}-{max(reps)} repeat patients for training (seeds {r['seeds']}). "
        "Then 64x64 inputs and a CPU budget. Packhauser et al. "
        "(AUC 0.994) trained their verification network on ChestX-ray14 (about 30,000 "
        "patients, many with follow-ups)."
        + (
            f" Even the steepest trend the seeds allow would need about {steep:,.0f} repeat "
            f"patients for AUROC 0.90 ({steep / sub['patients_with_3_or_more_images']:.0f} "
            f"times the {sub['patients_with_3_or_more_images']} this subset has at most; an "
            "extrapolation, and an optimistic one)."
            if steep
            else ""
        )
    )
    for c in r.get("checks", []):
        d = c["identity_auroc_minus_main"]
        if "mean" not in d:
            continue
        lines.append(
            f"- Longer training ({c['epochs']} epochs instead of {r['settings']['epochs']}, "
            f"the check above) changes the identity AUROC by {_mci(d)} (paired, over seeds "
            f"{sorted(d['per_seed'])}): "
            + _verdict(d)
            + (f"; the {c['epochs']}-epoch run itself: AUROC {_mci(c['identity']['auroc'])}.")
        )
    mg = r["summary"]["margin"].get("identity")
    if mg:
        lines.append(
            f"- The margin score gives the identity mode AUROC {_mci(mg['auroc'])}, "
            f"{_mci(mg['auroc_minus_raw'])} against its raw score (paired; "
            + _verdict(mg["auroc_minus_raw"])
            + ")."
        )
    novel = {k: m["novel_rate_at_threshold"]["mean"] for k, m in summ.items()}
    lines += [
        "- Calibration: the novel-patient rate at the calibrated threshold, averaged over "
        f"seeds, ranges {min(novel.values()):.3f}-{max(novel.values()):.3f} over the methods "
        "(nominal 0.05; the guarantee holds on average over exchangeable splits, and a split "
        "has only about 96 validation and 96 novel patients, several images each).",
        "- On data like this subset the audit's identity section therefore says little; "
        "summary.json (``identity.detector.training``) and report.html say when the identity "
        "detector saw fewer than 20 repeat patients.",
        "",
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
