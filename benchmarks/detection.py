"""Copy-detection benchmark on real chest radiographs, with baselines (issue: accuracy).

Ground truth is built, not guessed. Patients of ../shared/data/nih-cxr are split three ways
(training / validation / novel, seeded). Training patients with several studies keep one
study out of training: it is the "follow-up" group (same patient, different image; not a
copy by the paper's definition, reported on its own). Positives are training images passed
through one realistic change each, every kind reported separately. Negatives are the novel
patients' images.

Each method scores a query by its highest correlation with any training image, and its
tau is calibrated exactly as the audit does (95th percentile of train -> nearest-val).
Methods: Pearson correlation of raw pixels (Akbar et al.), SSIM (max over training
images), the same encoder untrained, and medmem's trained detector.

Reported per method: AUROC (all positive kinds vs novel images), TPR at 1% FPR,
sensitivity and specificity at tau (beside the design specificity q/100), with percentile
bootstrap 95% intervals; and per change kind the share of positives above tau.

Usage: python benchmarks/detection.py [--epochs 60] [--image-size 128] [--per-kind 60]
Writes docs/results/detection.json and docs/results/detection.md. Reads the data in place.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import medmem
from medmem._stats import auroc
from medmem.data import ArrayDataset
from medmem.detector import VariationConfig, apply_variation, sample_variation
from medmem.search import nearest

sys.path.insert(0, str(Path(__file__).parent))
from _common import NIH, load_nih, machine, read_manifest, split_patients  # noqa: E402

KINDS = (
    "exact",
    "flip",
    "rotate",
    "contrast",
    "brightness",
    "noise",
    "blur",
    "shift",
    "jpeg",
    "down-up",
    "autoencoder",
)


# ------------------------------------------------------------------ changes (positives)
def _variation(kind: str, settings: VariationConfig) -> Callable:
    def f(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        params = sample_variation(img.ndim - 1, rng, settings, kinds=(kind,))
        if kind == "flip" and not params["flip"]:
            params["flip"] = [1]  # a flip that does nothing is an exact copy
        return apply_variation(img, params)

    return f


def _jpeg(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    from PIL import Image

    q = int(rng.integers(30, 80))
    arr = (img[0].numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=q)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
    return torch.from_numpy(back)[None]


def _down_up(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    factor = float(rng.uniform(2.0, 4.0))
    size = img.shape[-2:]
    small = F.interpolate(
        img[None], scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False
    )
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)


def train_autoencoder(train: medmem.ImageDataset, *, iters: int, seed: int) -> torch.nn.Module:
    """A small KL autoencoder (MONAI AutoencoderKL) fitted to the training images: what a
    latent diffusion model's decoder does to a memorized image is a round trip through it."""
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(32, 64, 64),
        latent_channels=3,
        num_res_blocks=1,
        norm_num_groups=16,
        attention_levels=(False, False, False),
    )
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    imgs = torch.stack([train[i] for i in range(len(train))])
    for _ in range(iters):
        batch = imgs[rng.choice(len(imgs), size=16, replace=False)]
        recon, mu, sigma = ae(batch)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
        loss = F.l1_loss(recon, batch) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.eval()


# ------------------------------------------------------------------ scoring methods
def _stack(ds: medmem.ImageDataset | ArrayDataset) -> torch.Tensor:
    return torch.stack([ds[i] for i in range(len(ds))])  # (n, 1, H, W)


def pixel_embed(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1).numpy()


def model_embed(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(x[i : i + batch]).numpy() for i in range(0, len(x), batch)])


def _ssim_max(queries: torch.Tensor, base: torch.Tensor, block: int = 64) -> np.ndarray:
    """Highest SSIM of each query against any base image (Gaussian window 11, sigma 1.5)."""
    c1, c2 = 0.01**2, 0.03**2
    k = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    k = k / k.sum()
    w = (k[:, None] * k[None, :])[None, None]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w)

    mu_b, sq_b = blur(base), blur(base * base)
    out = np.full(len(queries), -np.inf)
    for s in range(0, len(queries), block):
        q = queries[s : s + block]
        mu_q, sq_q = blur(q), blur(q * q)
        for j in range(len(base)):
            b = base[j : j + 1]
            mu_x, mu_y = mu_q, mu_b[j : j + 1]
            sxy = blur(q * b) - mu_x * mu_y
            sxx, syy = sq_q - mu_x**2, sq_b[j : j + 1] - mu_y**2
            ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / (
                (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
            )
            out[s : s + block] = np.maximum(out[s : s + block], ssim.mean((1, 2, 3)).numpy())
    return out


# ------------------------------------------------------------------ metrics
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=NIH)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--per-kind", type=int, default=60)
    ap.add_argument(
        "--train-kinds",
        default="flip,rotate,contrast,brightness,noise,blur,shift",
        help="variation kinds the detector trains with",
    )
    ap.add_argument("--ae-iters", type=int, default=300)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("runs/detection-benchmark"))
    args = ap.parse_args()
    manifest = read_manifest(args.data)
    if manifest is None:
        return 0
    t0 = time.perf_counter()
    size = (args.image_size, args.image_size)
    parts = split_patients(manifest, args.seed)
    # one study of each multi-study training patient is held out: the follow-up group
    tr = parts["train"].sort_values(["patient_id", "follow_up"])
    multi = tr.groupby("patient_id")["file"].transform("size") > 1
    held = tr[multi].groupby("patient_id").tail(1)
    train_df = tr.drop(held.index)

    def load(files: pd.Series) -> medmem.ImageDataset:
        return load_nih(args.data, files, size)

    train, val = load(train_df["file"]), load(parts["val"]["file"])
    novel, follow = load(parts["novel"]["file"]), load(held["file"])
    print(
        f"train {len(train)}, val {len(val)}, novel {len(novel)}, follow-ups {len(follow)}",
        flush=True,
    )

    # positives
    t = time.perf_counter()
    ae = train_autoencoder(train, iters=args.ae_iters, seed=args.seed)
    t_ae = time.perf_counter() - t
    settings = VariationConfig(max_noise_std=0.05, max_brightness=0.15)
    changes: dict[str, Callable] = {"exact": lambda img, rng: img.clone()}
    for kind in ("flip", "rotate", "contrast", "brightness", "noise", "blur", "shift"):
        changes[kind] = _variation(kind, settings)
    changes["jpeg"], changes["down-up"] = _jpeg, _down_up

    def ae_round_trip(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        with torch.no_grad():
            return ae.reconstruct(img[None])[0].clamp(0, 1)

    changes["autoencoder"] = ae_round_trip
    rng = np.random.default_rng([args.seed, 11])
    pos_imgs, pos_kind, pos_src = [], [], []
    for kind in KINDS:
        for s in rng.choice(len(train), size=min(args.per_kind, len(train)), replace=False):
            pos_imgs.append(changes[kind](train[int(s)], rng))
            pos_kind.append(kind)
            pos_src.append(int(s))
    positives = torch.stack(pos_imgs)

    # detector
    t = time.perf_counter()
    kinds = tuple(k for k in args.train_kinds.split(",") if k)
    detector = medmem.Detector.train(
        train,
        spatial_dims=2,
        image_size=size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        variations=VariationConfig(kinds=kinds),
    )
    t_det = time.perf_counter() - t
    from medmem.detector._detector import build_encoder

    torch.manual_seed(args.seed)
    untrained = build_encoder(detector.config)

    x_train, x_val, x_novel, x_follow = _stack(train), _stack(val), _stack(novel), _stack(follow)
    methods: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
        "pixel Pearson (Akbar et al.)": pixel_embed,
        "untrained encoder": lambda x: model_embed(untrained, x),
        "medmem detector": lambda x: detector.embed(ArrayDataset(x), quiet=True),
    }
    results, timings = {}, {}
    for name, emb in methods.items():
        t = time.perf_counter()
        e_tr = emb(x_train)
        rho_val = nearest(e_tr, emb(x_val))[0][:, 0]
        tau = float(np.percentile(rho_val, 95))
        scores = {
            "pos": nearest(emb(positives), e_tr)[0][:, 0],
            "novel": nearest(emb(x_novel), e_tr)[0][:, 0],
            "follow": nearest(emb(x_follow), e_tr)[0][:, 0],
        }
        results[name] = (tau, scores)
        timings[name] = time.perf_counter() - t
        print(f"{name}: {timings[name]:.1f} s", flush=True)
    t = time.perf_counter()
    rho_val = np.array([_ssim_max(x_train[i : i + 1], x_val)[0] for i in range(len(x_train))])
    tau = float(np.percentile(rho_val, 95))
    results["SSIM"] = (
        tau,
        {
            "pos": _ssim_max(positives, x_train),
            "novel": _ssim_max(x_novel, x_train),
            "follow": _ssim_max(x_follow, x_train),
        },
    )
    timings["SSIM"] = time.perf_counter() - t
    print(f"SSIM: {timings['SSIM']:.1f} s", flush=True)

    kinds_arr = np.array(pos_kind)
    report: dict = {
        "data": "NIH ChestX-ray14 subset (../shared/data/nih-cxr)",
        "sizes": {
            "train": len(train),
            "val": len(val),
            "novel": len(novel),
            "follow_ups": len(follow),
            "positives_per_kind": args.per_kind,
        },
        "image_size": list(size),
        "detector_epochs": args.epochs,
        "detector_train_kinds": list(kinds),
        "percentile": 95,
        "methods": {},
        "machine": machine(),
        "seconds": {
            "autoencoder": round(t_ae, 1),
            "detector_training": round(t_det, 1),
            **{k: round(v, 1) for k, v in timings.items()},
            "total": round(time.perf_counter() - t0, 1),
        },
        "command": " ".join(["python", *sys.argv]),
    }
    for name, (tau, sc) in results.items():
        m = _metrics(sc["pos"], sc["novel"], tau)
        m["ci95"] = _bootstrap(sc["pos"], sc["novel"], tau, args.n_bootstrap, args.seed)
        m["tau"] = tau
        m["per_kind_above_tau"] = {
            k: float(np.mean(sc["pos"][kinds_arr == k] >= tau)) for k in KINDS
        }
        m["per_kind_auroc"] = {k: auroc(sc["pos"][kinds_arr == k], sc["novel"]) for k in KINDS}
        m["follow_up_above_tau"] = float(np.mean(sc["follow"] >= tau))
        m["follow_up_auroc_vs_novel"] = auroc(sc["follow"], sc["novel"])
        report["methods"][name] = m
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "detection.md").write_text(render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    """The benchmark as Markdown (docs/results/detection.md)."""
    names = list(r["methods"])
    lines = [
        "# Copy-detection benchmark on real chest radiographs",
        "",
        "Generated by `python benchmarks/detection.py` (do not edit by hand). Command: "
        f"`{r['command']}`.",
        "",
        f"- Data: {r['data']}; image size {r['image_size'][0]}x{r['image_size'][1]}; patients "
        f"split 60/20/20 into training / validation / novel. Sizes: {r['sizes']}.",
        f"- Detector: {r['detector_epochs']} epochs, trained with variations "
        f"{', '.join(r['detector_train_kinds'])}.",
        f"- Machine: {r['machine']}. Time: {r['seconds']}.",
        "",
        "## All change kinds together vs images of novel patients",
        "",
        "| method | AUROC | TPR at 1% FPR | sensitivity at tau | specificity at tau "
        "(design 0.95) | tau |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        m, ci = r["methods"][n], r["methods"][n]["ci95"]

        def cell(k: str, m: dict = m, ci: dict = ci) -> str:
            return f"{m[k]:.3f} ({ci[k][0]:.3f}-{ci[k][1]:.3f})"

        lines.append(
            f"| {n} | {cell('auroc')} | {cell('tpr_at_1pct_fpr')} | "
            f"{cell('sensitivity_at_tau')} | {cell('specificity_at_tau')} | "
            f"{m['tau']:.4f} |"
        )
    lines += ["", "Intervals: percentile bootstrap 95% over positives and negatives (tau fixed)."]
    for title, key, fmt in (
        ("Share of positives at or above tau, per change kind", "per_kind_above_tau", ".2f"),
        ("AUROC per change kind (vs novel patients)", "per_kind_auroc", ".3f"),
    ):
        lines += ["", f"## {title}", "", "| change | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for k in KINDS:
            cells = " | ".join(f"{r['methods'][n][key][k]:{fmt}}" for n in names)
            lines.append(f"| {k} | {cells} |")
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
