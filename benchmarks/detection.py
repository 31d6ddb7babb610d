"""Copy-detection benchmark on real scans, 2D (NIH radiographs) and 3D (IXI brain MRI).

Ground truth is built, not guessed. Patients are split three ways (training / validation /
novel, seeded). Positives are training images passed through one realistic change each
(``benchmarks/_changes.py``: other code and often stronger ranges than the detector's own
training variations), every kind reported separately. Negatives are novel patients' images.
In 2D, one study of each multi-study training patient is kept out of training: the
"follow-up" group (same patient, different image; not a copy, reported on its own).

Detectors trained here (each with medmem's default settings apart from its variations):

* ``default``: the default training variations (``VariationConfig()``); the audit's
  positive-control kinds (elastic, sharpen, patch) are held out of it.
* ``all``: every variation kind: each change is then *trained on*.
* ``minus-<group>``: the default without one group of kinds (geometry: flips, rotations,
  zoom, shifts; appearance: intensity, resolution and blends): the changes of that group are
  then *held out*.

Every change kind is so reported twice, trained on and held out, beside pixel Pearson
correlation and SSIM. Thresholds are the audit's: tau from the validation set with the
default (conformal) calibration, and the paper's tau beside it. The audit's positive
controls (``medmem.make_controls``) are scored with the default detector, so their
measured sensitivity can be set against the held-out-kind sensitivity measured here.

Usage:
    python -m benchmarks.detection --dims 2        # docs/results/detection.{json,md}
    python -m benchmarks.detection --dims 3        # docs/results/detection-3d.{json,md}
Training checkpoints go to runs/detection-benchmark/ (a killed run resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import medmem
from benchmarks._changes import CHANGES, GROUP_OF, GROUPS
from benchmarks._common import (
    IXI,
    IXI_CREDIT,
    NIH,
    load_ixi,
    machine,
    read_manifest,
    split_patients,
)
from medmem import audit_embeddings, calibrate, control_images
from medmem.data import ArrayDataset
from medmem.detector import CONTROL_VARIATION_KINDS, VariationConfig
from medmem.metrics import auroc
from medmem.search import nearest
from medmem.verify import AlignConfig, AlignedScorer, AlignedSearch


# ------------------------------------------------------------------ data
def load_2d(args: argparse.Namespace) -> dict:
    manifest = read_manifest(args.data or NIH)
    if manifest is None:
        return {}
    parts = split_patients(manifest, args.seed, fractions=tuple(args.fractions_2d))
    tr = parts["train"].sort_values(["patient_id", "follow_up"])
    multi = tr.groupby("patient_id")["file"].transform("size") > 1
    held = tr[multi].groupby("patient_id").tail(1)
    train_df = tr.drop(held.index)
    size = (args.image_size or 128,) * 2
    root = args.data or NIH

    def load(files: pd.Series) -> medmem.ImageDataset:
        return medmem.load_dataset(
            [root / f for f in files], image_size=size, patient_id_pattern=r"^(\d+)_", quiet=True
        )

    return {
        "train": load(train_df["file"]),
        "val": load(parts["val"]["file"]),
        "novel": load(parts["novel"]["file"]),
        "follow": load(held["file"]),
        "data": "NIH ChestX-ray14 subset (../shared/data/nih-cxr)",
    }


def load_3d(args: argparse.Namespace) -> dict:
    root = args.data or IXI
    manifest = read_manifest(root)
    if manifest is None:
        return {}
    parts = split_patients(manifest, args.seed, fractions=tuple(args.fractions))
    size = (args.image_size or 64,) * 3

    return {
        **{k: load_ixi(root, parts[k]["path"], size) for k in ("train", "val", "novel")},
        "follow": None,
        "data": IXI_CREDIT,
    }


def _stack(ds: medmem.ImageDataset) -> torch.Tensor:
    return torch.stack([ds[i] for i in range(len(ds))])


# ------------------------------------------------------------------ positives
def train_autoencoder(images: torch.Tensor, *, iters: int, seed: int) -> torch.nn.Module:
    """A small KL autoencoder (MONAI AutoencoderKL) fitted to the training images: what a
    latent diffusion model's decoder does to a memorized image is a round trip through it."""
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(16, 32, 32),
        latent_channels=3,
        num_res_blocks=1,
        norm_num_groups=8,
        attention_levels=(False, False, False),
    )
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    for _ in range(iters):
        batch = images[rng.choice(len(images), size=8, replace=False)]
        recon, mu, sigma = ae(batch)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
        loss = F.l1_loss(recon, batch) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.eval()


def make_positives(
    x_train: torch.Tensor, patients: list, per_kind: int, seed: int, ae: torch.nn.Module | None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``per_kind`` changed copies of training images for every change kind."""
    changes = dict(CHANGES)
    if ae is not None:

        def ae_round_trip(x: torch.Tensor, rng: np.random.Generator, p: torch.Tensor):
            with torch.no_grad():
                return ae.reconstruct(x[None])[0].clamp(0, 1)

        changes["autoencoder"] = ae_round_trip
    rng = np.random.default_rng([seed, 11])
    n = len(x_train)
    imgs, kinds, sources = [], [], []
    for kind, change in changes.items():
        for s in rng.choice(n, size=min(per_kind, n), replace=False):
            others = [j for j in range(n) if patients[j] is None or patients[j] != patients[s]]
            partner = x_train[int(rng.choice(others))]
            imgs.append(change(x_train[int(s)], rng, partner))
            kinds.append(kind)
            sources.append(int(s))
    return torch.stack(imgs), np.array(kinds), np.array(sources)


# ------------------------------------------------------------------ scoring
def _ssim_max(queries: torch.Tensor, base: torch.Tensor, block: int = 32) -> np.ndarray:
    """Highest SSIM of each query against any base image (Gaussian window, sigma 1.5,
    separable, 2D or 3D)."""
    c1, c2 = 0.01**2, 0.03**2
    dims = queries.ndim - 2
    r = 5 if dims == 2 else 3
    k = torch.exp(-((torch.arange(2 * r + 1) - float(r)) ** 2) / (2 * 1.5**2))
    k = k / k.sum()
    conv = F.conv2d if dims == 2 else F.conv3d

    def blur(x: torch.Tensor) -> torch.Tensor:
        for axis in range(dims):
            shape = [1, 1] + [1] * dims
            shape[2 + axis] = k.numel()
            x = conv(x, k.reshape(shape))
        return x

    mu_b, sq_b = blur(base), blur(base * base)
    out = np.full(len(queries), -np.inf)
    with torch.no_grad():
        for s in range(0, len(queries), block):
            q = queries[s : s + block]
            mu_q, sq_q = blur(q), blur(q * q)
            for j in range(len(base)):
                b = base[j : j + 1]
                mu_y = mu_b[j : j + 1]
                sxy = blur(q * b) - mu_q * mu_y
                sxx, syy = sq_q - mu_q**2, sq_b[j : j + 1] - mu_y**2
                ssim = ((2 * mu_q * mu_y + c1) * (2 * sxy + c2)) / (
                    (mu_q**2 + mu_y**2 + c1) * (sxx + syy + c2)
                )
                val = ssim.flatten(1).mean(1).numpy()
                out[s : s + block] = np.maximum(out[s : s + block], val)
    return out


def _thresholds(e_tr: np.ndarray, e_va: np.ndarray) -> dict[str, float]:
    """The audit's thresholds for these embeddings: default (conformal) and the paper's."""
    r = audit_embeddings(e_tr, e_va, e_va[:1], n_bootstrap=0)
    s = r.summary
    return {"tau": float(s["tau"]), "tau_paper": float(s["paper"]["tau"])}


def _metrics(pos: np.ndarray, neg: np.ndarray, tau: float) -> dict[str, float]:
    thr = np.quantile(neg, 0.99, method="higher")  # at most 1% of negatives above
    return {
        "auroc": auroc(pos, neg),
        "tpr_at_1pct_fpr": float(np.mean(pos > thr)),
        "sensitivity_at_tau": float(np.mean(pos >= tau)),
        "specificity_at_tau": float(np.mean(neg < tau)),
    }


def _bootstrap(pos: np.ndarray, neg: np.ndarray, tau: float, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    reps = [
        _metrics(
            pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))], tau
        )
        for _ in range(n)
    ]
    return {
        k: [
            float(np.percentile([r[k] for r in reps], 2.5)),
            float(np.percentile([r[k] for r in reps], 97.5)),
        ]
        for k in reps[0]
    }


def score_embeddings(emb, sets: dict[str, torch.Tensor]) -> dict:
    """Nearest-training correlation of every query set, and the thresholds."""
    e = {k: emb(v) for k, v in sets.items() if v is not None}
    th = _thresholds(e["train"], e["val"])
    out = {k: nearest(v, e["train"])[0][:, 0] for k, v in e.items() if k not in ("train", "val")}
    return {"scores": out, **th}


def aligned_search(
    det,
    sets: dict[str, torch.Tensor],
    coarse_cache: dict | None = None,
    patients: list | None = None,
) -> AlignedSearch:
    """The audit's default score: candidates from ``det``'s embeddings, the pixels and the
    coarse search, each pair scored by its aligned NCC (medmem.verify). ``coarse_cache``:
    the coarse search's scores, shared by every detector's search (they do not depend on the
    detector); ``patients``: the training images' patient ids, so that the unaligned
    channel's null leaves out same-patient pairs as the audit's does."""
    scorer = AlignedScorer(sets["train"], AlignConfig())
    small = {k: scorer.small(v) for k, v in sets.items() if v is not None}
    emb = {k: det.embed(ArrayDataset(v), quiet=True) for k, v in sets.items() if v is not None}
    return AlignedSearch(scorer, small, emb, coarse_cache=coarse_cache, groups=patients)


def score_aligned(search: AlignedSearch, sets: dict[str, torch.Tensor]) -> dict:
    """Nearest-training aligned scores of every query set, and the audit's thresholds."""
    out = {
        k: search(k, "train", 1)[0][:, 0]
        for k, v in sets.items()
        if k not in ("train", "val", "controls") and v is not None
    }
    rho_chance = search("val", "train", 1)[0][:, 0]
    rho_val = search("train", "val", 1)[0][:, 0]
    return {
        "scores": out,
        "tau": float(calibrate(rho_chance, 95.0, "conformal")),
        "tau_paper": float(calibrate(rho_val, 95.0, "paper")),
    }


def summarise(res: dict, kinds: np.ndarray, n_boot: int, seed: int) -> dict:
    sc, tau = res["scores"], res["tau"]
    m = _metrics(sc["pos"], sc["novel"], tau)
    m["ci95"] = _bootstrap(sc["pos"], sc["novel"], tau, n_boot, seed)
    m["tau"], m["tau_paper"] = tau, res["tau_paper"]
    m["specificity_at_tau_paper"] = float(np.mean(sc["novel"] < res["tau_paper"]))
    m["sensitivity_at_tau_paper"] = float(np.mean(sc["pos"] >= res["tau_paper"]))
    m["per_kind_above_tau"] = {
        k: float(np.mean(sc["pos"][kinds == k] >= tau)) for k in dict.fromkeys(kinds)
    }
    m["per_kind_auroc"] = {
        k: auroc(sc["pos"][kinds == k], sc["novel"]) for k in dict.fromkeys(kinds)
    }
    if "follow" in sc:
        m["follow_up_above_tau"] = float(np.mean(sc["follow"] >= tau))
        m["follow_up_auroc_vs_novel"] = auroc(sc["follow"], sc["novel"])
    return m


# ------------------------------------------------------------------ main
def detector_variants(groups: list[str]) -> dict[str, VariationConfig]:
    default = VariationConfig()
    out = {"default": default, "all": VariationConfig.preset("all")}
    for g in groups:
        kinds = [k for k in default.kinds if k not in GROUPS[g]]
        out[f"minus-{g}"] = VariationConfig(kinds=tuple(kinds), kind_prob=default.kind_prob)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--image-size", type=int, default=None, help="default 128 (2D), 64 (3D)")
    ap.add_argument("--fractions", type=float, nargs=2, default=(0.33, 0.22), help="3D split")
    ap.add_argument(
        "--fractions-2d", type=float, nargs=2, default=(0.4, 0.25), help="2D split (train, val)"
    )
    ap.add_argument("--per-kind", type=int, default=None, help="default 40 (2D), 20 (3D)")
    ap.add_argument(
        "--groups",
        default="geometry,appearance",
        help="variation groups held out one at a time (comma-separated, '' for none)",
    )
    ap.add_argument("--ae-iters", type=int, default=80)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--n-controls", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ssim", action="store_true")
    ap.add_argument("--only", default=None, help="train only these detectors (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("runs/detection-benchmark-v2"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = load_2d(args) if args.dims == 2 else load_3d(args)
    if not data:
        return 0
    train, val, novel, follow = data["train"], data["val"], data["novel"], data["follow"]
    print(
        f"train {len(train)}, val {len(val)}, novel {len(novel)}, "
        f"follow-ups {len(follow) if follow is not None else 0}",
        flush=True,
    )
    seconds: dict[str, float] = {}
    x = {
        "train": _stack(train),
        "val": _stack(val),
        "novel": _stack(novel),
        "follow": _stack(follow) if follow is not None else None,
    }
    ae = None
    if args.dims == 2 and args.ae_iters > 0:
        t = time.perf_counter()
        ae = train_autoencoder(x["train"], iters=args.ae_iters, seed=args.seed)
        seconds["autoencoder"] = round(time.perf_counter() - t, 1)
    per_kind = args.per_kind or (40 if args.dims == 2 else 20)
    x["pos"], kinds, _ = make_positives(
        x["train"], list(train.patient_ids), per_kind, args.seed, ae
    )
    print(f"positives: {len(kinds)} ({len(set(kinds))} kinds)", flush=True)

    groups = [g for g in args.groups.split(",") if g]
    variants = detector_variants(groups)
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    detectors, epochs, resumed = {}, {}, {}
    for name, variations in variants.items():
        t = time.perf_counter()
        ckpt = args.checkpoint_dir / f"{args.dims}d" / name
        resumed[name] = any(ckpt.glob("*.safetensors"))
        det = medmem.Detector.train(
            train, seed=args.seed, variations=variations, checkpoint_dir=ckpt, quiet=True
        )
        seconds[f"detector {name}"] = round(time.perf_counter() - t, 1)
        detectors[name] = det
        epochs[name] = det.epochs_trained
        print(f"detector {name}: {seconds[f'detector {name}']} s, {det.epochs_trained} epochs")

    def detector_embed(det):
        return lambda v: det.embed(ArrayDataset(v), quiet=True)

    # the audit's default score (aligned) for every detector; the embedding correlation
    # alone (the paper's score) for the default detector
    raw: dict[str, dict] = {}
    t = time.perf_counter()
    raw["pixel Pearson"] = score_embeddings(lambda v: v.flatten(1).numpy(), x)
    seconds["pixel Pearson"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    raw["medmem (default, embedding score)"] = score_embeddings(
        detector_embed(detectors["default"]), x
    )
    seconds["medmem (default, embedding score)"] = round(time.perf_counter() - t, 1)
    searches = {}
    coarse: dict = {}  # the first detector's time includes the coarse search, once for all
    for name, det in detectors.items():
        t = time.perf_counter()
        searches[name] = aligned_search(det, x, coarse, list(train.patient_ids))
        raw[f"medmem ({name})"] = score_aligned(searches[name], x)
        seconds[f"medmem ({name})"] = round(time.perf_counter() - t, 1)
    if not args.no_ssim:
        t = time.perf_counter()
        ssim_val = np.array(
            [_ssim_max(x["train"][i : i + 1], x["val"])[0] for i in range(len(x["train"]))]
        )
        # SSIM is not a correlation of embeddings: its thresholds are computed the same way
        # on its own scores (conformal on validation images, and the paper's percentile)
        val_scores = _ssim_max(x["val"], x["train"])
        res = {
            k: _ssim_max(v, x["train"])
            for k, v in x.items()
            if k not in ("train", "val") and v is not None
        }
        raw["SSIM"] = {
            "scores": res,
            "tau": float(np.quantile(val_scores, 0.95, method="weibull")),
            "tau_paper": float(np.percentile(ssim_val, 95)),
        }
        seconds["SSIM"] = round(time.perf_counter() - t, 1)

    report: dict = {
        "dims": args.dims,
        "data": data["data"],
        "sizes": {
            "train": len(train),
            "val": len(val),
            "novel": len(novel),
            "follow_ups": len(follow) if follow is not None else 0,
            "positives_per_kind": per_kind,
        },
        "image_size": list(train.image_size),
        "detectors": {
            n: {
                "variations": list(d.config.variations.kinds),
                "kind_prob": d.config.variations.kind_prob,
                "arch": d.config.arch,
                "input_size": list(d.config.encoder_input_size),
                "epochs_trained": d.epochs_trained,
                "max_epochs": d.config.epochs,
                "stopped_early": d.stopped_early_,
                "resumed_from_checkpoint": resumed[n],
            }
            for n, d in detectors.items()
        },
        "groups": {g: list(GROUPS[g]) for g in groups if f"minus-{g}" in detectors},
        "control_kinds": list(CONTROL_VARIATION_KINDS),
        "group_of": GROUP_OF,
        "methods": {
            name: summarise(r, kinds, args.n_bootstrap, args.seed) for name, r in raw.items()
        },
    }

    # held out: each kind scored by the detector that did not train on its group
    held_pos, held_kind = [], []
    held = {}
    for kind in dict.fromkeys(kinds):
        g = GROUP_OF.get(kind)
        name = "default" if g == "controls" else (f"minus-{g}" if g in groups else None)
        if name is None or f"medmem ({name})" not in raw:  # that detector was not trained
            continue
        r = raw[f"medmem ({name})"]
        pos = r["scores"]["pos"][kinds == kind]
        held[kind] = {
            "detector": name,
            "auroc": auroc(pos, r["scores"]["novel"]),
            "sensitivity_at_tau": float(np.mean(pos >= r["tau"])),
            "specificity_at_tau": float(np.mean(r["scores"]["novel"] < r["tau"])),
        }
        held_pos.append(pos >= r["tau"])
        held_kind.append(kind)
    report["held_out"] = held
    if held:
        report["held_out_all"] = {
            "kinds": held_kind,
            "sensitivity_at_tau": float(np.mean(np.concatenate(held_pos))),
            "auroc_mean": float(np.mean([h["auroc"] for h in held.values()])),
            "auroc_min": float(np.min([h["auroc"] for h in held.values()])),
        }
    # the audit's positive controls with the default detector and the default score
    det = detectors["default"]
    t = time.perf_counter()
    ctrl_img, _, info = control_images(train, det, n_controls=args.n_controls, seed=args.seed)
    search = searches["default"]
    ctrl = torch.from_numpy(ctrl_img)
    search.small["controls"] = search.scorer.small(ctrl)
    search.emb["controls"] = det.embed(ArrayDataset(ctrl_img), quiet=True)
    rho = search("controls", "train", 1)[0][:, 0]
    tau = raw["medmem (default)"]["tau"]
    ctrl_kinds = np.array(info["control_kinds"])
    report["controls"] = {
        "kinds": info["kinds"],
        "n": int(len(rho)),
        "sensitivity_at_tau": float(np.mean(rho >= tau)),
        "per_kind": {k: float(np.mean(rho[ctrl_kinds == k] >= tau)) for k in info["kinds"]},
    }
    d_pos = raw["medmem (default)"]["scores"]["pos"]
    ctrl_bench = np.isin(kinds, [k for k, g in GROUP_OF.items() if g == "controls"])
    report["controls"]["benchmark_held_out_sensitivity_default"] = float(
        np.mean(d_pos[ctrl_bench] >= tau)
    )
    seconds["controls"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    report["seconds"] = seconds
    report["align"] = AlignConfig().resolved(args.dims).to_dict()  # the aligned score's settings
    report["machine"] = machine()
    report["command"] = " ".join(["python", "-m", "benchmarks.detection", *sys.argv[1:]])
    stem = "detection" if args.dims == 2 else "detection-3d"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(render(report))
    print(render(report))
    return 0


# ------------------------------------------------------------------ report
def render(r: dict) -> str:
    """The benchmark as Markdown (docs/results/detection.md, detection-3d.md)."""
    names = list(r["methods"])
    dim = f"{r['dims']}D"
    size = "x".join(map(str, r["image_size"]))
    d = r["detectors"]["default"]
    coarse = r.get("align", {})  # runs before the coarse search recorded no settings
    lines = [
        f"# Copy-detection benchmark, {dim}, on real scans",
        "",
        f"Generated by `{r['command']}` (do not edit by hand); numbers in the JSON beside "
        "this page.",
        "",
        f"- Data: {r['data']}; images {size}; patients split into training / validation / "
        f"novel. Sizes: {r['sizes']}.",
        f"- Default detector: {d['arch']}, works at {'x'.join(map(str, d['input_size']))}, "
        f"trained {d['epochs_trained']} epochs (at most {d['max_epochs']}; early stopping "
        f"{'ended it' if d['stopped_early'] else 'did not end it'}), variations "
        f"{', '.join(d['variations'])} (each applied with probability {d['kind_prob']}).",
        f"- Held out of the default detector (the audit's control kinds): "
        f"{', '.join(r['control_kinds'])}. Groups held out one at a time: "
        + "; ".join(f"{g}: {', '.join(k)}" for g, k in r["groups"].items())
        + ".",
        f"- Machine: {r['machine']}. Seconds: {r['seconds']}"
        + (
            " (a detector resumed from a finished checkpoint: its seconds are loading time; "
            "training time is in docs/benchmarks/detector-speed.md)."
            if any(v.get("resumed_from_checkpoint") for v in r["detectors"].values())
            else "."
        ),
        "- Score: *medmem (name)* rows use the audit's default score (`--score aligned`: the "
        "detector's embeddings pick 10 candidate training images per image, the pixels 5 more "
        "(and 5 for the image mirrored along each axis)"
        + (
            f", a coarse aligned search over every pair {coarse['coarse_candidates']} more "
            f"({coarse['coarse_size']} px grid, shifts up to {coarse['coarse_max_shift']:.0%}, "
            f"zooms {', '.join(f'{v:g}' for v in coarse['coarse_scales'])})"
            if coarse.get("coarse_candidates")
            else ""
        )
        + ", and each pair is scored by its "
        "normalized cross-correlation (of the images and of their high-passed copies) after "
        "the best flip, rotation, zoom and shift, tile by tile with the worst tile left out, "
        "minus half the image's background (its mean over its 2nd to 5th best candidates)"
        + (
            "; the larger of that and the pair's plain aligned NCC (of the images alone, "
            "without the high-passed copies) minus half its own background, mapped onto the "
            "same scale by the training set's null"
            if coarse.get("plain")
            else ""
        )
        + (
            "; the larger of that and the pair's unaligned pixel correlation minus half its "
            "own background, mapped onto the same scale by the training set's null"
            if coarse.get("unaligned")
            else ""
        )
        + "; src/medmem/verify.py, docs/scoring.md). *medmem (default, embedding score)* is the "
        "paper's score, the correlation of the same detector's embeddings.",
        "- tau: the audit's default (conformal on validation->training scores, nominal "
        "false-copy rate 5%); the paper's tau (95th percentile of training->validation) beside.",
        "",
        "## All change kinds together vs images of novel patients",
        "",
        "| method | AUROC | TPR at 1% FPR | sensitivity at tau | specificity at tau "
        "| tau | specificity at paper's tau |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        m, ci = r["methods"][n], r["methods"][n]["ci95"]

        def cell(k: str, m: dict = m, ci: dict = ci) -> str:
            return f"{m[k]:.3f} ({ci[k][0]:.3f}-{ci[k][1]:.3f})"

        lines.append(
            f"| {n} | {cell('auroc')} | {cell('tpr_at_1pct_fpr')} | "
            f"{cell('sensitivity_at_tau')} | {cell('specificity_at_tau')} | "
            f"{m['tau']:.4f} | {m['specificity_at_tau_paper']:.3f} |"
        )
    lines += ["", "Intervals: percentile bootstrap 95% over positives and negatives (tau fixed)."]
    kinds = list(r["methods"][names[0]]["per_kind_auroc"])
    held = r.get("held_out", {})
    base = [n for n in names if not n.startswith("medmem") or "embedding score" in n]
    lines += [
        "",
        "## Per change kind: trained on, held out, default, baselines",
        "",
        "Share of positives at or above tau (AUROC vs novel patients in brackets). *Trained "
        "on*: the detector trained on every kind. *Held out*: the detector trained without "
        "the kind's group (named). *Default*: the default detector. All with the aligned "
        "score, beside the baselines and the default detector's embedding score.",
        "",
        "| change | trained on | held out | default | " + " | ".join(base) + " |",
        "|---" * (4 + len(base)) + "|",
    ]

    def pk(name: str, k: str) -> str:
        if name not in r["methods"]:
            return "-"
        m = r["methods"][name]
        return f"{m['per_kind_above_tau'][k]:.2f} ({m['per_kind_auroc'][k]:.3f})"

    for k in kinds:
        h = held.get(k)
        hcell = f"{h['sensitivity_at_tau']:.2f} ({h['auroc']:.3f}) [{h['detector']}]" if h else "-"
        cells = " | ".join(pk(b, k) for b in base)
        lines.append(
            f"| {k} | {pk('medmem (all)', k)} | {hcell} | {pk('medmem (default)', k)} | {cells} |"
        )
    if "held_out_all" in r:
        h = r["held_out_all"]
        lines += [
            "",
            f"Held-out kinds together: sensitivity at tau {h['sensitivity_at_tau']:.3f}; AUROC "
            f"mean {h['auroc_mean']:.3f}, lowest {h['auroc_min']:.3f}.",
        ]
    c = r["controls"]
    lines += [
        "",
        "## The audit's positive controls against held-out copies",
        "",
        f"`medmem.control_images` with the default detector and score ({c['n']} controls of the "
        f"held-out kinds {', '.join(c['kinds'])}): measured sensitivity "
        f"{c['sensitivity_at_tau']:.3f} (per kind {c['per_kind']}). The benchmark's copies of "
        "the same kinds (other code, other ranges) scored by the same detector: sensitivity "
        f"{c['benchmark_held_out_sensitivity_default']:.3f}.",
    ]
    if "follow_up_above_tau" in r["methods"][names[0]]:
        lines += [
            "",
            "## Follow-up studies of training patients (same patient, different image)",
            "",
            "Not copies by the paper's definition; shown so that a user knows how they score.",
            "",
            "| method | share at or above tau | AUROC vs novel patients |",
            "|---|---|---|",
        ]
        for n in names:
            m = r["methods"][n]
            lines.append(
                f"| {n} | {m['follow_up_above_tau']:.2f} | {m['follow_up_auroc_vs_novel']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
