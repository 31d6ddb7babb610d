"""Text-to-image memorization study on a CPU (docs/results/text2image.md).

ARTIFICIAL PAIRING: real NIH ChestX-ray radiographs (../shared/data/nih-cxr) paired with real
IU X-ray report texts (../shared/data/iu-reports) by finding: "normal" reports with
No_findings images, reports whose MeSH terms name pneumonia, consolidation, opacity or
infiltrate with Pneumonia images. The texts keep their "XXXX" de-identification markers.
A few pairs are duplicated in training to induce memorization; the study then asks whether
d_t and attention entropy find those prompts, which tokens drive them, what the markers do,
and whether inference-time mitigations help.

Resumable: every stage writes its output under ``out`` and is skipped when that exists; the
training stages resume from their checkpoints. Run at low priority on one thread:

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/text2image_study.py \
        configs/text2image/study-cpu.yaml [--stages pairs,autoencoder,t2i,...]

Public medmem API only: the copy audit of generations is ``medmem.text2image.CopyJudge`` and
``audit_mitigations`` (``medmem prompts mitigate --train --val --detector``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import save_file

import medmem
from medmem.generative import load_config, train
from medmem.text2image import (
    MARKER_GROUP,
    MARKER_RE,
    MID_WINDOW,
    SCORES,
    CopyJudge,
    EncodedText,
    TextToImageModel,
    audit_mitigations,
    detection,
    generate,
    load_t2i_config,
    plot_bars,
    plot_score_histogram,
    pool_tokens,
    rank_prompts,
    token_significance,
    token_table,
    train_t2i,
    treat_markers,
    write_html,
    write_table,
)

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("text2image_study")
STAGES = (
    "pairs",
    "autoencoder",
    "t2i",
    "scores",
    "tokens",
    "markers",
    "detector",
    "mitigations",
    "fix_t2i",
    "fix_eval",
    "variants",
    "variants_eval",
    "unconditional",
    "labels",
    "report",
)
PNEUMONIA_MESH = r"pneumonia|consolidation|opacity|infiltrat"


def _timed(timings: dict, name: str, t0: float) -> None:
    timings[name] = round(time.perf_counter() - t0, 1)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Indented JSON, written to a temporary file and renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(x: Any) -> Any:
    """NumPy scalars and arrays, paths: as JSON values."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Tensors and a JSON ``meta`` in one safetensors file (medmem's layout)."""
    save_file(tensors, str(path), metadata={"medmem": json.dumps(meta, sort_keys=True)})


def load_tensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of :func:`save_tensors`."""
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})["medmem"])
        return meta, {k: fh.get_tensor(k) for k in fh.keys()}


def subplots(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """A stand-alone Figure (no pyplot state) and its axes."""
    fig = Figure(figsize=kw.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kw)


def save_figure(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------- stages
def stage_pairs(cfg: dict, out: Path) -> None:
    """Patient split, pairing by finding, duplication; CSVs under ``out``."""
    rng = np.random.default_rng(cfg["seed"])
    img_csv = ROOT / cfg["images"]
    images = pd.read_csv(img_csv, dtype=str)
    images["path"] = [str((img_csv.parent / f).resolve()) for f in images["file"]]
    images["finding"] = images["finding"].str.lower()
    patients = np.array(sorted(images["patient_id"].unique()))
    rng.shuffle(patients)
    n_val = int(round(cfg["val_fraction"] * len(patients)))
    val_p = set(patients[:n_val])
    reports = pd.read_csv(ROOT / cfg["reports"], dtype=str, keep_default_na=False)
    text = (reports["findings"].str.strip() + " " + reports["impression"].str.strip()).str.strip()
    reports = reports.assign(text=text.str.replace(r"\s+", " ", regex=True))
    words = reports["text"].str.split().str.len()
    ok = (words >= cfg["min_words"]) & (words <= cfg["max_words"])
    kinds = {
        "no_finding": ok & (reports["Problems"] == "normal"),
        "pneumonia": ok
        & (reports["Problems"] != "normal")
        & reports["MeSH"].str.contains(PNEUMONIA_MESH, case=False),
    }
    rows, unseen = [], []
    for finding, sel in kinds.items():
        texts = reports.loc[sel, "text"].drop_duplicates().tolist()
        texts = [texts[i] for i in rng.permutation(len(texts))]
        n, n_u = cfg["pairs_per_class"], cfg["unseen_per_class"]
        if len(texts) < n + n_u:
            raise SystemExit(f"only {len(texts)} distinct {finding} reports; lower the sizes.")
        pool = images[(images["finding"] == finding) & ~images["patient_id"].isin(val_p)]
        first = pool.groupby("patient_id").head(1)  # one image per patient
        first = first.iloc[rng.permutation(len(first))]
        if len(first) < n:
            raise SystemExit(f"only {len(first)} {finding} training patients; lower the sizes.")
        for j in range(n):
            im = first.iloc[j]
            rows.append(
                {
                    "path": im["path"],
                    "patient_id": im["patient_id"],
                    "finding": finding,
                    "text": texts[j],
                    "duplicated": j < cfg["duplicated_per_class"],
                }
            )
        unseen += [{"text": t, "finding": finding} for t in texts[n : n + n_u]]
    pairs = pd.DataFrame(rows)
    train_rows = pd.concat(
        [pairs] + [pairs[pairs["duplicated"]]] * (cfg["copies"] - 1), ignore_index=True
    )
    out.mkdir(parents=True, exist_ok=True)
    write_table(train_rows[["path", "text", "patient_id"]], out / "pairs.csv")
    write_table(pairs, out / "pairs-unique.csv")
    write_table(pd.DataFrame(unseen), out / "unseen.csv")
    pairs[["path", "patient_id"]].to_csv(out / "ae-train.csv", index=False)
    val = images[images["patient_id"].isin(val_p)].groupby("patient_id").head(1)
    val[["path", "patient_id", "finding"]].to_csv(out / "val.csv", index=False)
    log.info(
        "%d unique pairs (%d duplicated x%d), %d training rows, %d unseen, %d val images",
        len(pairs),
        int(pairs["duplicated"].sum()),
        cfg["copies"],
        len(train_rows),
        len(unseen),
        len(val),
    )


def stage_autoencoder(cfg: dict, out: Path) -> None:
    ae_cfg = load_config(ROOT / cfg["autoencoder_config"])
    ae_cfg = ae_cfg.replace(
        data=ae_cfg.data.replace(train=str(out / "ae-train.csv"), val=str(out / "val.csv"))
    )
    run = out / "autoencoder"
    result = train(ae_cfg, run, resume=(run / "checkpoint.safetensors").exists(), device="cpu")
    if not result.finished:
        raise SystemExit("autoencoder training stopped early; run again to resume.")


def model_config(cfg: dict, out: Path) -> Any:
    c = load_t2i_config(ROOT / cfg["model_config"])
    return c.replace(data=str(out / "pairs.csv"), autoencoder=str(out / "autoencoder" / "model"))


def stage_t2i(cfg: dict, out: Path) -> None:
    run = out / "t2i"
    result = train_t2i(
        model_config(cfg, out), run, resume=(run / "checkpoint.safetensors").exists()
    )
    atomic_write_json(
        out / "t2i-timing.json", {"seconds_per_iteration_last_call": result.seconds_per_iteration}
    )
    if not result.finished:
        raise SystemExit("text-to-image training stopped early; run again to resume.")


# ---------------------------------------------------------------------------- training-time fix
def stage_fix_t2i(cfg: dict, out: Path) -> None:
    """The same model trained with the de-identification markers treated (``fix.markers``)."""
    c = model_config(cfg, out)
    c = c.replace(text=c.text.replace(markers=cfg["fix"]["markers"]))
    run = out / "t2i-fix"
    result = train_t2i(c, run, resume=(run / "checkpoint.safetensors").exists())
    if not result.finished:
        raise SystemExit("training of the fixed model stopped early; run again to resume.")


def variant_config(cfg: dict, out: Path, name: str) -> Any:
    """``model_config`` with the overrides of ``variants.<name>`` (nested mappings)."""
    base = model_config(cfg, out)

    def merge(into: dict, over: dict) -> dict:
        for k, v in over.items():
            into[k] = merge(dict(into.get(k) or {}), v) if isinstance(v, dict) else v
        return into

    return base.from_dict(merge(base.to_dict(), cfg["variants"][name]), name)


def stage_variants(cfg: dict, out: Path, only: list[str] | None = None) -> None:
    """Train every model of ``variants`` (or those named in ``only``) into t2i-<name>."""
    for name in only or list(cfg["variants"]):
        run = out / f"t2i-{name}"
        if (run / "model").exists():
            continue
        t0 = time.perf_counter()
        result = train_t2i(
            variant_config(cfg, out, name), run, resume=(run / "checkpoint.safetensors").exists()
        )
        if not result.finished:
            raise SystemExit(f"training of variant {name} stopped early; run again to resume.")
        atomic_write_json(
            run / "timing.json",
            {
                "seconds_last_call": round(time.perf_counter() - t0, 1),
                "seconds_per_iteration_last_call": result.seconds_per_iteration,
            },
        )


def _judge(cfg: dict, out: Path, prompts: pd.DataFrame, model: Any = None) -> CopyJudge:
    """The copy audit of generations for ``prompts`` (medmem.text2image.CopyJudge)."""
    train_ds, val_ds, pairs = _datasets(out)
    return CopyJudge(
        train_ds,
        val_ds,
        medmem.Detector.load(out / "detector"),
        prompts.assign(memorized=prompts["group"] == "duplicated")
        if "group" in prompts.columns
        else prompts,
        captions=pairs[["path", "text", "finding"]],
        encoder=model.encoder if model is not None else None,
        seed=cfg["seed"],
        cache_dir=out / "embedding-cache",
    )


def stage_fix_eval(cfg: dict, out: Path) -> None:
    """Scores and image copies of the fixed model vs the original, same prompts and noises."""
    ev = cfg["eval"]
    prompts = pd.read_csv(out / "prompts-scored.csv")
    fixed = TextToImageModel.load(out / "t2i-fix" / "model")
    cond = fixed.encode_prompts(prompts["text"].tolist())
    gen = generate(
        fixed, cond, n_per_prompt=ev["n_per_prompt"], seed=cfg["seed"], batch_size=ev["batch_size"]
    )
    sc = gen.scores()
    fixed_prompts = prompts.assign(**sc)
    write_table(fixed_prompts, out / "fix-prompts-scored.csv")
    sel = pd.concat(
        [
            prompts[prompts["group"] == "duplicated"],
            prompts[prompts["group"] == "single"].head(ev["mitigation_single"]),
        ]
    )
    G = ev["n_per_prompt"]
    _, base_t = load_tensors(out / "mitigation-none-images.safetensors")
    judge = _judge(cfg, out, sel)
    base_flags = judge.flags(base_t["images"], sel["path"].tolist())
    fix_images = gen.images[torch.tensor(sel.index.to_numpy().copy())]
    fix_flags = judge.flags(fix_images, sel["path"].tolist())
    rows = []
    group = np.repeat(sel["group"].to_numpy(), G)
    marker = np.repeat(sel["n_markers"].to_numpy() > 0, G)
    for name, flags in (("original", base_flags), ("fixed", fix_flags)):
        for g in ("duplicated", "single"):
            for m in (True, False):
                k = (group == g) & (marker == m)
                rows.append(
                    {
                        "model": name,
                        "group": g,
                        "has_marker": m,
                        "n_images": int(k.sum()),
                        "copies": float(flags.copy[k].mean()) if k.any() else None,
                        "own_copies": float(flags.own_copy[k].mean()) if k.any() else None,
                    }
                )
    write_table(pd.DataFrame(rows), out / "fix-copies.csv")


def stage_unconditional(cfg: dict, out: Path) -> None:
    """Diagnostic: do unconditional samples (empty prompt) copy the duplicated images?"""
    model, _, _ = _load(out)
    n = cfg["eval"].get("n_unconditional", 64)
    e = model.empty
    cond = EncodedText(
        e.states.expand(n, -1, -1).clone(),
        e.mask.expand(n, -1).clone(),
        e.ids.expand(n, -1).clone(),
    )
    gen = generate(
        model, cond, n_per_prompt=1, seed=cfg["seed"] + 1, batch_size=cfg["eval"]["batch_size"]
    )
    pairs = pd.read_csv(out / "pairs-unique.csv", dtype={"patient_id": str})
    flags = _judge(cfg, out, pd.DataFrame({"text": [""] * n})).flags(gen.images)
    train_ds, _, _ = _datasets(out)
    dup_paths = {str(Path(p).resolve()) for p in pairs.loc[pairs["duplicated"], "path"]}
    near = flags.nearest
    is_dup = np.array([p in dup_paths for p in near])
    atomic_write_json(
        out / "unconditional.json",
        {
            "n_samples": n,
            "copies": int(flags.copy.sum()),
            "copies_of_duplicated_images": int((flags.copy & is_dup).sum()),
            "nearest_is_duplicated_image": int(is_dup.sum()),
            "distinct_duplicated_images_copied": int(
                len({p for p, c, d in zip(near, flags.copy, is_dup, strict=True) if c and d})
            ),
            "n_duplicated_images": len(dup_paths),
            "n_training_images": len(train_ds),
            "tau": flags.tau,
            "d_mean_unconditional": float(gen.d.mean()),
        },
    )


def stage_labels(cfg: dict, out: Path) -> None:
    """Audit-judged memorization of every scored training prompt: an own copy (its paired
    training image, by medmem.audit) among its generations of the scores stage."""
    prompts = pd.read_csv(out / "prompts-scored.csv")
    _, t = load_tensors(out / "scores.safetensors")
    train = prompts[prompts["group"] != "unseen"]
    images = t["images"][torch.tensor(train.index.to_numpy().copy())]
    flags = _judge(cfg, out, train).flags(images, train["path"].tolist())
    G = images.shape[1]
    own = flags.own_copy.reshape(-1, G).sum(1)
    copy = flags.copy.reshape(-1, G).sum(1)
    write_table(train.assign(own_copies=own, copies=copy, n_generations=G), out / "labels.csv")


# ---------------------------------------------------------------------------- evaluation
def _load(out: Path) -> tuple[TextToImageModel, pd.DataFrame, pd.DataFrame]:
    model = TextToImageModel.load(out / "t2i" / "model")
    return (
        model,
        pd.read_csv(out / "pairs-unique.csv", dtype={"patient_id": str}),
        pd.read_csv(out / "unseen.csv"),
    )


def evaluated_prompts(cfg: dict, out: Path) -> pd.DataFrame:
    """Duplicated training prompts, a seeded subset of the single ones, the unseen ones."""
    pairs = pd.read_csv(out / "pairs-unique.csv", dtype={"patient_id": str})
    unseen = pd.read_csv(out / "unseen.csv")
    rng = np.random.default_rng([cfg["seed"], 5])
    single = pairs[~pairs["duplicated"]]
    single = single.iloc[
        np.sort(rng.choice(len(single), cfg["eval"]["single_sample"], replace=False))
    ]
    frames = [
        pairs[pairs["duplicated"]].assign(group="duplicated"),
        single.assign(group="single"),
        unseen.assign(group="unseen", path="", patient_id=""),
    ]
    return pd.concat(frames, ignore_index=True)[["group", "finding", "text", "path", "patient_id"]]


def stage_scores(cfg: dict, out: Path) -> None:
    """d_t and attention entropy of every evaluated prompt; detection AUROC/TPR."""
    ev = cfg["eval"]
    model, _, _ = _load(out)
    prompts = evaluated_prompts(cfg, out)
    cond = model.encode_prompts(prompts["text"].tolist())
    t0 = time.perf_counter()
    gen = generate(
        model, cond, n_per_prompt=ev["n_per_prompt"], seed=cfg["seed"], batch_size=ev["batch_size"]
    )
    seconds = time.perf_counter() - t0
    save_tensors(
        out / "scores.safetensors",
        {
            "d": gen.d.contiguous(),
            "entropy": gen.entropy.contiguous(),
            "images": gen.images.contiguous(),
        },
        {"timesteps": gen.timesteps, "seconds": seconds},
    )
    scores = gen.scores()
    ranked = rank_prompts(
        prompts["text"].tolist(),
        scores,
        group=prompts["group"],
        finding=prompts["finding"],
        memorized=prompts["group"].eq("duplicated"),
    )
    write_table(ranked, out / "prompts-ranked.csv")  # report texts: stays under runs/
    write_html(
        ranked,
        None,
        out / "prompts-ranked.html",
        title="Text-to-image CPU study: prompts ranked by d_t",
    )
    n_tok = cond.mask.sum(1).numpy()
    prompts = prompts.assign(
        **scores, n_tokens=n_tok, n_markers=[len(MARKER_RE.findall(t)) for t in prompts["text"]]
    )
    write_table(prompts, out / "prompts-scored.csv")
    log.info(
        "scored %d prompts x %d generations in %.0f s", len(prompts), ev["n_per_prompt"], seconds
    )


def detection_table(prompts: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dup = prompts["group"] == "duplicated"
    for neg_name, neg in (
        ("single", prompts["group"] == "single"),
        ("unseen", prompts["group"] == "unseen"),
        ("single+unseen", prompts["group"] != "duplicated"),
    ):
        for score in [s for s in SCORES if s in prompts.columns]:
            out[f"{score} | duplicated vs {neg_name}"] = detection(
                prompts.loc[dup, score].to_numpy(), prompts.loc[neg, score].to_numpy()
            )
    return out


def stage_tokens(cfg: dict, out: Path) -> None:
    """Token significance (gradient of d_t) of the duplicated and of 16 single prompts."""
    model, _, _ = _load(out)
    prompts = pd.read_csv(out / "prompts-scored.csv")
    sel = pd.concat(
        [prompts[prompts["group"] == "duplicated"], prompts[prompts["group"] == "single"].head(16)]
    )
    cond = model.encode_prompts(sel["text"].tolist())
    gen = generate(
        model,
        cond,
        n_per_prompt=1,
        seed=cfg["seed"],
        keep_latents=True,
        batch_size=cfg["eval"]["batch_size"],
    )
    sig = token_significance(model, gen, cond)
    table = token_table(model.encoder, cond, sig, prompt_ids=list(sel.index))
    table["group"] = sel.loc[table["prompt_id"], "group"].to_numpy()
    write_table(table, out / "tokens-per-prompt.csv")
    for group in ("duplicated", "single"):
        pooled = pool_tokens(table[table["group"] == group], min_prompts=2)
        write_table(pooled, out / f"tokens-pooled-{group}.csv")


def _ablate(texts: list[str], mode: str, vocab: list[str], seed: int) -> list[str]:
    return [
        treat_markers(
            t, mode, neutral="unspecified", rng=random.Random(seed * 1000 + i), vocab=vocab
        )
        for i, t in enumerate(texts)
    ]


def stage_markers(cfg: dict, out: Path) -> None:
    """Prompts with XXXX markers: d_t as written vs markers removed / neutral / random."""
    model, _, _ = _load(out)
    prompts = pd.read_csv(out / "prompts-scored.csv")
    sel = prompts[prompts["n_markers"] > 0]
    texts = sel["text"].tolist()
    vocab = model.encoder.vocab_words()
    rows = []
    for mode in ("keep", "remove", "neutral", "random"):
        cond = model.encode_prompts(_ablate(texts, mode, vocab, cfg["seed"]))
        gen = generate(
            model,
            cond,
            n_per_prompt=cfg["eval"]["n_per_prompt"],
            seed=cfg["seed"],
            batch_size=cfg["eval"]["batch_size"],
        )
        sc = gen.scores()
        rows += [
            {
                "prompt": int(i),
                "group": g,
                "ablation": mode,
                "d_first": a,
                "d_mean": b,
                "entropy_first": c,
            }
            for i, g, a, b, c in zip(
                sel.index,
                sel["group"],
                sc["d_first"],
                sc["d_mean"],
                sc["entropy_first"],
                strict=True,
            )
        ]
    write_table(pd.DataFrame(rows), out / "markers.csv")


def _datasets(out: Path) -> tuple[Any, Any, pd.DataFrame]:
    pairs = pd.read_csv(out / "pairs-unique.csv", dtype={"patient_id": str})
    val = pd.read_csv(out / "val.csv", dtype={"patient_id": str})
    train_ds = medmem.load_dataset(
        pairs["path"].tolist(), image_size=(64, 64), patient_id_pattern=r"^(\d+)_", quiet=True
    )
    val_ds = medmem.load_dataset(
        val["path"].tolist(), image_size=(64, 64), patient_id_pattern=r"^(\d+)_", quiet=True
    )
    return train_ds, val_ds, pairs


def stage_detector(cfg: dict, out: Path) -> None:
    """The copy detector of the image audit, trained on the training images."""
    train_ds, _, _ = _datasets(out)
    det = medmem.Detector.train(
        train_ds, epochs=cfg["eval"]["detector_epochs"], checkpoint_dir=out / "detector-checkpoint"
    )
    det.save(out / "detector")


def _mitigation_selection(cfg: dict, out: Path) -> pd.DataFrame:
    """The prompts of the mitigation runs: the duplicated ones and the first single ones."""
    prompts = pd.read_csv(out / "prompts-scored.csv")
    return pd.concat(
        [
            prompts[prompts["group"] == "duplicated"],
            prompts[prompts["group"] == "single"].head(cfg["eval"]["mitigation_single"]),
        ]
    )


def stage_mitigations(cfg: dict, out: Path) -> None:
    """Each inference-time mitigation on the duplicated and some single prompts: d_t, image
    copies (medmem.audit), FID in the detector's feature space, prompt faithfulness."""
    ev = cfg["eval"]
    model, _, _ = _load(out)
    sel = _mitigation_selection(cfg, out)
    train_ds, val_ds, pairs = _datasets(out)
    audit_mitigations(
        model,
        sel.assign(memorized=sel["group"] == "duplicated"),
        train_ds,
        val_ds,
        medmem.Detector.load(out / "detector"),
        out,
        captions=pairs[["path", "text", "finding"]],
        n_per_prompt=ev["n_per_prompt"],
        seed=cfg["seed"],
        batch_size=ev["batch_size"],
        cache_dir=out / "embedding-cache",
    )


def _models(cfg: dict, out: Path) -> dict[str, Path]:
    """Every trained text-to-image model of the study, by name."""
    models = {"original": out / "t2i", "markers_random": out / "t2i-fix"}
    models.update({name: out / f"t2i-{name}" for name in cfg.get("variants", {})})
    return models


def stage_variants_eval(cfg: dict, out: Path) -> None:
    """Every model on the same prompts and noises: detection of the duplicated prompts by
    each score (d_mid fixed from the original model, tested on the others), per-step
    AUROC, and the mitigation-table row of its images (training-time mitigations)."""
    ev = cfg["eval"]
    prompts = evaluated_prompts(cfg, out)
    scored = pd.read_csv(out / "prompts-scored.csv")
    if not scored["text"].equals(prompts["text"]):
        raise SystemExit("prompts-scored.csv does not match the evaluated prompts; rerun scores.")
    groups = prompts["group"].to_numpy()
    sel_rows = torch.tensor(_mitigation_selection(cfg, out).index.to_numpy().copy())
    rows, per_step = [], {}
    if (out / "variants.csv").exists():  # resumable: models evaluated already are kept
        rows = pd.read_csv(out / "variants.csv").to_dict("records")
        per_step = json.loads((out / "variants-per-step.json").read_text())
    judge = None
    missing: list[str] = []
    for name, run in _models(cfg, out).items():
        if any(r["model"] == name for r in rows):
            continue
        if not (run / "model").exists():
            log.info("variants_eval: %s not trained yet, skipped", name)
            missing.append(name)
            continue
        model = TextToImageModel.load(run / "model")
        judge = judge or _judge(cfg, out, _mitigation_selection(cfg, out), model)
        t0 = time.perf_counter()
        gen = generate(
            model,
            model.encode_prompts(prompts["text"].tolist()),
            n_per_prompt=ev["n_per_prompt"],
            seed=cfg["seed"],
            batch_size=ev["batch_size"],
            quiet=True,
        )
        seconds = time.perf_counter() - t0
        sc = gen.scores()
        write_table(prompts.assign(**sc), out / f"variant-{name}-prompts-scored.csv")
        det = {}
        for score in SCORES:
            for neg in ("single", "unseen"):
                r = detection(sc[score][groups == "duplicated"], sc[score][groups == neg])
                det[f"auroc_{score}_vs_{neg}"] = r["auroc"]
                det[f"tpr1_{score}_vs_{neg}"] = r["tpr_at_1pct_fpr"]
        d_steps = gen.d.mean(1).numpy()
        per_step[name] = {
            neg: [
                detection(d_steps[groups == "duplicated", k], d_steps[groups == neg, k])["auroc"]
                for k in range(d_steps.shape[1])
            ]
            for neg in ("single", "unseen")
        }
        per_step["timesteps"] = gen.timesteps
        sel_scores = {k: v[sel_rows.numpy()] for k, v in sc.items()}
        row = {"model": name, **det, **judge.row(gen.images[sel_rows], sel_scores)}
        drops = run / "drops.csv"
        if drops.exists():  # drop_high_d: which training rows the filter kept out
            d = pd.read_csv(drops)
            pairs = pd.read_csv(out / "pairs.csv")
            repeated = pairs.duplicated(["path", "text"], keep=False).to_numpy()
            row["dropped_share_duplicated_rows"] = float(
                d["dropped"][repeated].sum() / d["seen"][repeated].sum()
            )
            row["dropped_share_single_rows"] = float(
                d["dropped"][~repeated].sum() / d["seen"][~repeated].sum()
            )
        row["seconds_scoring"] = round(seconds, 1)
        rows.append(row)
        log.info("variants_eval %s: %s", name, row)
        write_table(pd.DataFrame(rows), out / "variants.csv")
        atomic_write_json(out / "variants-per-step.json", per_step)
    if missing:
        raise SystemExit(f"variants_eval: {missing} not trained yet; run the variants stage.")


def stage_report(cfg: dict, out: Path) -> None:
    """docs/results/text2image.json and docs/figures/text2image-*.png (aggregates only)."""
    prompts = pd.read_csv(out / "prompts-scored.csv")
    meta, tensors = load_tensors(out / "scores.safetensors")
    det = detection_table(prompts)
    groups_arr = prompts["group"].to_numpy()
    d_steps = tensors["d"].mean(1).numpy()  # (P, S): mean over generations
    step_auroc = {
        neg: [
            detection(d_steps[groups_arr == "duplicated", k], d_steps[groups_arr == neg, k])[
                "auroc"
            ]
            for k in range(d_steps.shape[1])
        ]
        for neg in ("single", "unseen")
    }
    groups = {
        g: prompts.loc[prompts["group"] == g, "d_first"].to_numpy()
        for g in ("duplicated", "single", "unseen")
    }
    figs = ROOT / "docs" / "figures"
    plot_score_histogram(groups, figs / "text2image-d-first.png")
    plot_score_histogram(
        {g: prompts.loc[prompts["group"] == g, "entropy_first"].to_numpy() for g in groups},
        figs / "text2image-entropy-first.png",
        xlabel="cross-attention entropy at the first step (nats)",
    )
    _plot_steps(
        tensors["d"],
        prompts["group"].to_numpy(),
        meta["timesteps"],
        figs / "text2image-d-per-step.png",
    )
    pooled = {g: pd.read_csv(out / f"tokens-pooled-{g}.csv") for g in ("duplicated", "single")}
    top = pooled["duplicated"].head(15)
    plot_bars(
        [str(w) for w in top["word"]],
        top["mean_share"].to_numpy(),
        figs / "text2image-top-tokens.png",
        xlabel="mean share of the prompt's d_t-gradient significance",
        title="Top words over the duplicated (memorized) prompts",
    )
    tokens = pd.read_csv(out / "tokens-per-prompt.csv")
    marker_stats = {}
    for g in ("duplicated", "single"):
        t = tokens[(tokens["group"] == g)]
        with_m = t.groupby("prompt_id")["is_marker"].any()
        ids = with_m[with_m].index
        tm = t[t["prompt_id"].isin(ids)]
        per = tm.groupby("prompt_id").apply(
            lambda x: pd.Series(
                {
                    "marker_share": x.loc[x["is_marker"], "share"].sum(),
                    "marker_word_share": x["is_marker"].mean(),
                    "marker_top1": bool(x.loc[x["rank"] == 1, "is_marker"].any()),
                }
            ),
            include_groups=False,
        )
        marker_stats[g] = {
            "n_prompts_with_markers": int(len(ids)),
            "mean_significance_share_of_markers": float(per["marker_share"].mean())
            if len(per)
            else None,
            "mean_share_of_words_that_are_markers": float(per["marker_word_share"].mean())
            if len(per)
            else None,
            "prompts_with_a_marker_ranked_first": int(per["marker_top1"].sum()) if len(per) else 0,
        }
    markers = pd.read_csv(out / "markers.csv")
    ablation = (
        markers.groupby(["group", "ablation"])[["d_first", "d_mean", "entropy_first"]]
        .mean()
        .reset_index()
    )
    base = markers[markers["ablation"] == "keep"].set_index("prompt")["d_first"]
    paired = {}
    for mode in ("remove", "neutral", "random"):
        m = markers[markers["ablation"] == mode].set_index("prompt")
        for g in ("duplicated", "single", "unseen"):
            idx = m.index[m["group"] == g]
            if len(idx):
                rel = (m.loc[idx, "d_first"] - base.loc[idx]) / base.loc[idx]
                paired[f"{mode} | {g}"] = {
                    "n": int(len(idx)),
                    "mean_relative_change_d_first": float(rel.mean()),
                }
    with_without = {}
    for g in ("duplicated", "single", "unseen"):
        sub = prompts[prompts["group"] == g]
        wm, wo = sub[sub["n_markers"] > 0], sub[sub["n_markers"] == 0]
        with_without[g] = {
            "n_with": int(len(wm)),
            "n_without": int(len(wo)),
            "d_first_with": float(wm["d_first"].mean()) if len(wm) else None,
            "d_first_without": float(wo["d_first"].mean()) if len(wo) else None,
            "auroc_with_vs_without_d_first": float(
                detection(wm["d_first"].to_numpy(), wo["d_first"].to_numpy())["auroc"]
            )
            if len(wm) and len(wo)
            else None,
        }
    mit = pd.read_csv(out / "mitigations.csv")
    plot_bars(
        mit["mitigation"].tolist(),
        mit["d_first_duplicated"].to_numpy(),
        figs / "text2image-mitigations.png",
        xlabel="mean first-step d_t of the duplicated prompts",
        title="Inference-time mitigations",
    )
    fix: dict[str, Any] | None = None
    if (out / "fix-copies.csv").exists():
        fp = pd.read_csv(out / "fix-prompts-scored.csv")
        fix = {
            "markers": cfg["fix"]["markers"],
            "detection": detection_table(fp),
            "score_means": fp.groupby("group")[["d_first", "d_mean", "entropy_first"]]
            .mean()
            .to_dict(),
            "d_first_by_marker": fp.assign(has_marker=fp["n_markers"] > 0)
            .groupby(["group", "has_marker"])["d_first"]
            .mean()
            .reset_index()
            .to_dict("records"),
            "copies": pd.read_csv(out / "fix-copies.csv").to_dict("records"),
        }
    labels = None
    if (out / "labels.csv").exists():
        lab = pd.read_csv(out / "labels.csv")
        scored = out / "variant-original-prompts-scored.csv"
        if scored.exists():  # d_mid of the original model, fixed after the labels stage
            mid = pd.read_csv(scored).set_index("text")["d_mid"]
            lab = lab.assign(d_mid=mid.loc[lab["text"]].to_numpy())
        mem = lab["own_copies"].to_numpy() > 0
        labels = {
            "definition": "training prompt with >= 1 own copy among its generations",
            "n_memorized": int(mem.sum()),
            "n_not_memorized": int((~mem).sum()),
            "memorized_by_group": lab.assign(m=mem).groupby("group")["m"].mean().to_dict(),
            "own_copy_rate_by_group": (
                lab.groupby("group")["own_copies"].sum()
                / lab.groupby("group")["n_generations"].sum()
            ).to_dict(),
            "detection": {
                sc: detection(lab.loc[mem, sc].to_numpy(), lab.loc[~mem, sc].to_numpy())
                for sc in SCORES
                if sc in lab.columns
            }
            if mem.any() and (~mem).any()
            else None,
        }
    variants = None
    if (out / "variants.csv").exists():
        per_step = json.loads((out / "variants-per-step.json").read_text())
        _plot_step_auroc(per_step, figs / "text2image-step-auroc-models.png")
        variants = {
            "mid_window": list(MID_WINDOW),
            "mid_timesteps": [
                t for t in per_step["timesteps"] if MID_WINDOW[0] <= t / 1000 <= MID_WINDOW[1]
            ],
            "overrides": cfg.get("variants", {}),
            "rows": [
                {k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in r.items()}
                for r in pd.read_csv(out / "variants.csv").to_dict("records")
            ],
            "auroc_per_step": per_step,
            "training_seconds": {
                name: json.loads((out / f"t2i-{name}" / "timing.json").read_text())
                for name in cfg.get("variants", {})
                if (out / f"t2i-{name}" / "timing.json").exists()
            },
        }
    unconditional = None
    if (out / "unconditional.json").exists():
        unconditional = json.loads((out / "unconditional.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    result = {
        "schema_version": 1,
        "pairing": "ARTIFICIAL: NIH radiographs paired with IU report texts by finding",
        "n_pairs": int(len(pd.read_csv(out / "pairs-unique.csv"))),
        "n_training_rows": int(len(pd.read_csv(out / "pairs.csv"))),
        "config": cfg,
        "model": yaml.safe_load((ROOT / cfg["model_config"]).read_text(encoding="utf-8")),
        "prompt_groups": {g: int((prompts["group"] == g).sum()) for g in groups},
        "detection": det,
        "d_auroc_per_step": {"timesteps": meta["timesteps"], **step_auroc},
        "score_means": prompts.groupby("group")[["d_first", "d_mean", "entropy_first"]]
        .mean()
        .to_dict(),
        "tokens_top_duplicated": pooled["duplicated"].head(20).to_dict("records"),
        "tokens_top_single": pooled["single"].head(20).to_dict("records"),
        "marker_group": MARKER_GROUP,
        "marker_attribution": marker_stats,
        "marker_with_vs_without": with_without,
        "marker_ablation_means": ablation.to_dict("records"),
        "marker_ablation_paired": paired,
        "mitigations": mit.to_dict("records"),
        "training_time_fix": fix,
        "variants": variants,
        "unconditional_diagnostic": unconditional,
        "audit_labels": labels,
        "timings_s": timings,
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    atomic_write_json(ROOT / "docs" / "results" / "text2image.json", result)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _plot_steps(d: torch.Tensor, groups: np.ndarray, timesteps: list[int], path: Path) -> None:
    fig, ax = subplots(figsize=(6, 3.5))
    for g in ("duplicated", "single", "unseen"):
        m = d[torch.from_numpy(groups == g)].mean(1)  # (P_g, S)
        mean = m.mean(0).numpy()
        ax.plot(range(len(mean)), mean, label=f"{g} (n={len(m)})")
    ax.set_xlabel(f"sampling step (DDIM, t = {timesteps[0]} ... {timesteps[-1]})")
    ax.set_ylabel("mean d_t")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_step_auroc(per_step: dict[str, Any], path: Path) -> None:
    """AUROC of d_t at each sampling step, duplicated vs unseen and vs single, per model;
    the shaded band is MID_WINDOW (d_mid)."""
    t = np.array(per_step["timesteps"])
    models = [k for k in per_step if k != "timesteps"]
    fig, axes = subplots(1, 2, figsize=(10, 3.6), sharey=True)
    lo, hi = MID_WINDOW
    for ax, neg in zip(axes, ("unseen", "single"), strict=True):
        for name in models:
            ax.plot(t, per_step[name][neg], marker=".", label=name)
        ax.axvspan(lo * 1000, hi * 1000, color="0.85", zorder=0)
        ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
        ax.axhline(0.9, color="0.5", lw=0.8, ls="--")
        ax.set_xlim(t.max() + 20, t.min() - 20)
        ax.set_xlabel("sampling timestep t (noisiest left)")
        ax.set_title(f"duplicated vs {neg} prompts")
    axes[0].set_ylabel("AUROC of d_t at that step")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    parser.add_argument(
        "--variant",
        action="append",
        help="with --stages variants: train only this variant (repeatable; one process per "
        "variant can run side by side)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    out = ROOT / cfg["out"]
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    done_marker = {
        "pairs": out / "pairs.csv",
        "autoencoder": out / "autoencoder" / "model",
        "t2i": out / "t2i" / "model",
    }
    for stage in args.stages.split(","):
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; choose from {STAGES}")
        target = done_marker.get(stage, out / f"{stage}.done")
        if target.exists() and stage != "report":
            log.info("stage %s: done already (%s)", stage, target)
            continue
        log.info("stage %s: start", stage)
        if stage == "variants" and args.variant:  # a subset: no done marker, own timing files
            stage_variants(cfg, out, only=args.variant)
            continue
        t0 = time.perf_counter()
        globals()[f"stage_{stage}"](cfg, out)
        if stage not in done_marker and stage != "report":
            target.write_text("done\n")
        _timed(timings, stage, t0)
        atomic_write_json(timings_path, timings)
        log.info("stage %s: %.0f s", stage, timings[stage])


if __name__ == "__main__":
    main()
