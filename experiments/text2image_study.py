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

The script only orchestrates: training, scoring, the copy audit of generations
(``CopyJudge``, ``audit_mitigations``) and the summaries and figures (``detection_table``,
``marker_attribution``, ``plot_step_auroc``, ...) are public ``medmem.text2image`` API.
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
from safetensors.torch import load_file

import medmem
from medmem import text2image as t2i
from medmem.generative import load_config, train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("text2image_study")
STAGES = tuple(
    "pairs autoencoder t2i scores tokens markers detector mitigations fix_t2i fix_eval "
    "variants variants_eval unconditional labels report".split()
)
PNEUMONIA_MESH = r"pneumonia|consolidation|opacity|infiltrat"
GROUPS = ("duplicated", "single", "unseen")


def write_json(path: Path, obj: Any) -> None:
    """Indented JSON (NumPy values and paths as plain values), renamed over ``path``."""

    def plain(x: Any) -> Any:
        if isinstance(x, (np.generic, np.ndarray)):
            return x.tolist()
        if isinstance(x, Path):
            return str(x)
        raise TypeError(f"not JSON-able: {type(x).__name__}")

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=plain) + "\n")
    os.replace(tmp, path)


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient_id": str})


def _generate(cfg: dict, model: Any, cond: t2i.EncodedText, **kw: Any) -> t2i.Generation:
    """The study's generations: ``eval.n_per_prompt`` per prompt, the study's seed."""
    kw = {"n_per_prompt": cfg["eval"]["n_per_prompt"], "seed": cfg["seed"], **kw}
    return t2i.generate(model, cond, batch_size=cfg["eval"]["batch_size"], **kw)


def _train(config: Any, run: Path, what: str) -> Any:
    result = t2i.train_t2i(config, run, resume=(run / "checkpoint.safetensors").exists())
    if not result.finished:
        raise SystemExit(f"training of {what} stopped early; run again to resume.")
    return result


# ---------------------------------------------------------------------------- data and training
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
    t2i.write_table(train_rows[["path", "text", "patient_id"]], out / "pairs.csv")
    t2i.write_table(pairs, out / "pairs-unique.csv")
    t2i.write_table(pd.DataFrame(unseen), out / "unseen.csv")
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


def model_config(cfg: dict, out: Path, variant: str | None = None) -> Any:
    """The model config on the study's pairs, with the overrides of ``variants.<variant>``."""
    c = t2i.load_t2i_config(ROOT / cfg["model_config"])
    c = c.replace(data=str(out / "pairs.csv"), autoencoder=str(out / "autoencoder" / "model"))
    return c if variant is None else c.merge(cfg["variants"][variant], variant)


def stage_t2i(cfg: dict, out: Path) -> None:
    result = _train(model_config(cfg, out), out / "t2i", "the text-to-image model")
    timing = {"seconds_per_iteration_last_call": result.seconds_per_iteration}
    write_json(out / "t2i-timing.json", timing)


def stage_fix_t2i(cfg: dict, out: Path) -> None:
    """The same model trained with the de-identification markers treated (``fix.markers``)."""
    c = model_config(cfg, out)
    _train(
        c.replace(text=c.text.replace(markers=cfg["fix"]["markers"])),
        out / "t2i-fix",
        "the fixed model",
    )


def stage_variants(cfg: dict, out: Path, only: list[str] | None = None) -> None:
    """Train every model of ``variants`` (or those named in ``only``) into t2i-<name>."""
    for name in only or list(cfg["variants"]):
        run = out / f"t2i-{name}"
        if not (run / "model").exists():
            t0 = time.perf_counter()
            result = _train(model_config(cfg, out, name), run, f"variant {name}")
            write_json(
                run / "timing.json",
                {
                    "seconds_last_call": round(time.perf_counter() - t0, 1),
                    "seconds_per_iteration_last_call": result.seconds_per_iteration,
                },
            )


def _datasets(out: Path) -> tuple[Any, Any, pd.DataFrame]:
    pairs = read_csv(out / "pairs-unique.csv")
    kw = {"image_size": (64, 64), "patient_id_pattern": r"^(\d+)_", "quiet": True}
    train_ds = medmem.load_dataset(pairs["path"].tolist(), **kw)
    val_ds = medmem.load_dataset(read_csv(out / "val.csv")["path"].tolist(), **kw)
    return train_ds, val_ds, pairs


def stage_detector(cfg: dict, out: Path) -> None:
    """The copy detector of the image audit, trained on the training images."""
    det = medmem.Detector.train(
        _datasets(out)[0],
        epochs=cfg["eval"]["detector_epochs"],
        checkpoint_dir=out / "detector-checkpoint",
    )
    det.save(out / "detector")


def _judge(cfg: dict, out: Path, prompts: pd.DataFrame, model: Any = None) -> t2i.CopyJudge:
    """The copy audit of generations for ``prompts`` (medmem.text2image.CopyJudge)."""
    train_ds, val_ds, pairs = _datasets(out)
    if "group" in prompts.columns:
        prompts = prompts.assign(memorized=prompts["group"] == "duplicated")
    return t2i.CopyJudge(
        train_ds,
        val_ds,
        medmem.Detector.load(out / "detector"),
        prompts,
        captions=pairs[["path", "text", "finding"]],
        encoder=model.encoder if model is not None else None,
        seed=cfg["seed"],
        cache_dir=out / "embedding-cache",
    )


# ---------------------------------------------------------------------------- evaluation
def evaluated_prompts(cfg: dict, out: Path) -> pd.DataFrame:
    """Duplicated training prompts, a seeded subset of the single ones, the unseen ones."""
    pairs = read_csv(out / "pairs-unique.csv")
    rng = np.random.default_rng([cfg["seed"], 5])
    single = pairs[~pairs["duplicated"]]
    single = single.iloc[
        np.sort(rng.choice(len(single), cfg["eval"]["single_sample"], replace=False))
    ]
    frames = [
        pairs[pairs["duplicated"]].assign(group="duplicated"),
        single.assign(group="single"),
        pd.read_csv(out / "unseen.csv").assign(group="unseen", path="", patient_id=""),
    ]
    return pd.concat(frames, ignore_index=True)[["group", "finding", "text", "path", "patient_id"]]


def _selection(out: Path, n_single: int) -> pd.DataFrame:
    """Scored prompts: the duplicated ones and the first ``n_single`` single ones."""
    prompts = pd.read_csv(out / "prompts-scored.csv")
    single = prompts[prompts["group"] == "single"].head(n_single)
    return pd.concat([prompts[prompts["group"] == "duplicated"], single])


def _model(out: Path, run: str = "t2i") -> t2i.TextToImageModel:
    return t2i.TextToImageModel.load(out / run / "model")


def stage_scores(cfg: dict, out: Path) -> None:
    """d_t and attention entropy of every evaluated prompt; detection AUROC/TPR."""
    model, prompts = _model(out), evaluated_prompts(cfg, out)
    cond = model.encode_prompts(prompts["text"].tolist())
    t0 = time.perf_counter()
    gen = _generate(cfg, model, cond)
    seconds = time.perf_counter() - t0
    gen.save(out / "scores.safetensors", seconds=seconds)
    scores = gen.scores()
    groups = prompts["group"]
    ranked = t2i.rank_prompts(
        prompts["text"].tolist(),
        scores,
        group=groups,
        finding=prompts["finding"],
        memorized=groups.eq("duplicated"),
    )
    t2i.write_table(ranked, out / "prompts-ranked.csv")  # report texts: stays under runs/
    t2i.write_html(
        ranked,
        None,
        out / "prompts-ranked.html",
        title="Text-to-image CPU study: prompts ranked by d_t",
    )
    n_markers = [len(t2i.MARKER_RE.findall(t)) for t in prompts["text"]]
    prompts = prompts.assign(**scores, n_tokens=cond.mask.sum(1).numpy(), n_markers=n_markers)
    t2i.write_table(prompts, out / "prompts-scored.csv")
    log.info("scored %d prompts x %d in %.0f s", len(prompts), gen.d.shape[1], seconds)


def stage_tokens(cfg: dict, out: Path) -> None:
    """Token significance (gradient of d_t) of the duplicated and of 16 single prompts."""
    model, sel = _model(out), _selection(out, 16)
    cond = model.encode_prompts(sel["text"].tolist())
    gen = _generate(cfg, model, cond, n_per_prompt=1, keep_latents=True)
    sig = t2i.token_significance(model, gen, cond)
    table = t2i.token_table(model.encoder, cond, sig, prompt_ids=list(sel.index))
    table["group"] = sel.loc[table["prompt_id"], "group"].to_numpy()
    t2i.write_table(table, out / "tokens-per-prompt.csv")
    for group in ("duplicated", "single"):
        pooled = t2i.pool_tokens(table[table["group"] == group], min_prompts=2)
        t2i.write_table(pooled, out / f"tokens-pooled-{group}.csv")


def stage_markers(cfg: dict, out: Path) -> None:
    """Prompts with XXXX markers: d_t as written vs markers removed / neutral / random."""
    model, prompts = _model(out), pd.read_csv(out / "prompts-scored.csv")
    sel = prompts[prompts["n_markers"] > 0]
    vocab, seed = model.encoder.vocab_words(), cfg["seed"]
    rows = []
    for mode in ("keep", "remove", "neutral", "random"):
        texts = [
            t2i.treat_markers(
                t, mode, neutral="unspecified", vocab=vocab, rng=random.Random(seed * 1000 + i)
            )
            for i, t in enumerate(sel["text"])
        ]
        sc = _generate(cfg, model, model.encode_prompts(texts)).scores()
        kept = {k: sc[k] for k in ("d_first", "d_mean", "entropy_first")}
        rows.append(
            pd.DataFrame(
                {
                    "prompt": sel.index.astype(int),
                    "group": sel["group"].to_numpy(),
                    "ablation": mode,
                    **kept,
                }
            )
        )
    t2i.write_table(pd.concat(rows, ignore_index=True), out / "markers.csv")


def stage_mitigations(cfg: dict, out: Path) -> None:
    """Each inference-time mitigation on the duplicated and some single prompts: d_t, image
    copies (medmem.audit), FID in the detector's feature space, prompt faithfulness."""
    ev, sel = cfg["eval"], _selection(out, cfg["eval"]["mitigation_single"])
    train_ds, val_ds, pairs = _datasets(out)
    t2i.audit_mitigations(
        _model(out),
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


def stage_fix_eval(cfg: dict, out: Path) -> None:
    """Scores and image copies of the fixed model vs the original, same prompts and noises."""
    prompts, fixed = pd.read_csv(out / "prompts-scored.csv"), _model(out, "t2i-fix")
    gen = _generate(cfg, fixed, fixed.encode_prompts(prompts["text"].tolist()))
    t2i.write_table(prompts.assign(**gen.scores()), out / "fix-prompts-scored.csv")
    sel = _selection(out, cfg["eval"]["mitigation_single"])
    judge, own = _judge(cfg, out, sel), sel["path"].tolist()
    base = load_file(str(out / "mitigation-none-images.safetensors"))["images"]
    fix_images = gen.images[torch.tensor(sel.index.to_numpy().copy())]
    G = cfg["eval"]["n_per_prompt"]
    group = np.repeat(sel["group"].to_numpy(), G)
    marker = np.repeat(sel["n_markers"].to_numpy() > 0, G)
    rows = []
    for name, images in (("original", base), ("fixed", fix_images)):
        flags = judge.flags(images, own)
        for g in ("duplicated", "single"):
            for m in (True, False):
                k = (group == g) & (marker == m)
                rate = {
                    c: float(getattr(flags, c)[k].mean()) if k.any() else None
                    for c in ("copy", "own_copy")
                }
                rows.append(
                    {
                        "model": name,
                        "group": g,
                        "has_marker": m,
                        "n_images": int(k.sum()),
                        "copies": rate["copy"],
                        "own_copies": rate["own_copy"],
                    }
                )
    t2i.write_table(pd.DataFrame(rows), out / "fix-copies.csv")


def stage_unconditional(cfg: dict, out: Path) -> None:
    """Diagnostic: do unconditional samples (empty prompt) copy the duplicated images?"""
    model, n = _model(out), cfg["eval"].get("n_unconditional", 64)
    e = model.empty
    cond = t2i.EncodedText(
        e.states.expand(n, -1, -1).clone(),
        e.mask.expand(n, -1).clone(),
        e.ids.expand(n, -1).clone(),
    )
    gen = _generate(cfg, model, cond, n_per_prompt=1, seed=cfg["seed"] + 1)
    flags = _judge(cfg, out, pd.DataFrame({"text": [""] * n})).flags(gen.images)
    train_ds, _, pairs = _datasets(out)
    dup_paths = {str(Path(p).resolve()) for p in pairs.loc[pairs["duplicated"], "path"]}
    is_dup = np.array([p in dup_paths for p in flags.nearest])
    copied = {p for p, c, d in zip(flags.nearest, flags.copy, is_dup, strict=True) if c and d}
    write_json(
        out / "unconditional.json",
        {
            "n_samples": n,
            "copies": int(flags.copy.sum()),
            "copies_of_duplicated_images": int((flags.copy & is_dup).sum()),
            "nearest_is_duplicated_image": int(is_dup.sum()),
            "distinct_duplicated_images_copied": len(copied),
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
    train_rows = prompts[prompts["group"] != "unseen"]
    gen, _ = t2i.Generation.load(out / "scores.safetensors")
    images = gen.images[torch.tensor(train_rows.index.to_numpy().copy())]
    flags = _judge(cfg, out, train_rows).flags(images, train_rows["path"].tolist())
    G = images.shape[1]
    own, copy = flags.own_copy.reshape(-1, G).sum(1), flags.copy.reshape(-1, G).sum(1)
    labels = train_rows.assign(own_copies=own, copies=copy, n_generations=G)
    t2i.write_table(labels, out / "labels.csv")


def _models(cfg: dict, out: Path) -> dict[str, Path]:
    """Every trained text-to-image model of the study, by name."""
    models = {"original": out / "t2i", "markers_random": out / "t2i-fix"}
    return models | {name: out / f"t2i-{name}" for name in cfg.get("variants", {})}


def _drop_shares(run: Path, out: Path) -> dict[str, float]:
    """drop_high_d: the share of the duplicated and of the single rows the filter kept out."""
    if not (run / "drops.csv").exists():
        return {}
    d = pd.read_csv(run / "drops.csv")
    repeated = pd.read_csv(out / "pairs.csv").duplicated(["path", "text"], keep=False).to_numpy()
    share = {
        k: float(d["dropped"][r].sum() / d["seen"][r].sum())
        for k, r in (("duplicated", repeated), ("single", ~repeated))
    }
    return {f"dropped_share_{k}_rows": v for k, v in share.items()}


def stage_variants_eval(cfg: dict, out: Path) -> None:
    """Every model on the same prompts and noises: detection of the duplicated prompts by
    each score (d_mid fixed from the original model, tested on the others), per-step
    AUROC, and the mitigation-table row of its images (training-time mitigations)."""
    prompts = evaluated_prompts(cfg, out)
    if not pd.read_csv(out / "prompts-scored.csv")["text"].equals(prompts["text"]):
        raise SystemExit("prompts-scored.csv does not match the evaluated prompts; rerun scores.")
    sel = _selection(out, cfg["eval"]["mitigation_single"])
    sel_rows = torch.tensor(sel.index.to_numpy().copy())
    rows, per_step = [], {}
    if (out / "variants.csv").exists():  # resumable: models evaluated already are kept
        rows = pd.read_csv(out / "variants.csv").to_dict("records")
        per_step = json.loads((out / "variants-per-step.json").read_text())
    judge, missing, negs = None, [], ("single", "unseen")
    for name, run in _models(cfg, out).items():
        if any(r["model"] == name for r in rows):
            continue
        if not (run / "model").exists():
            log.info("variants_eval: %s not trained yet, skipped", name)
            missing.append(name)
            continue
        model = t2i.TextToImageModel.load(run / "model")
        judge = judge or _judge(cfg, out, sel, model)
        t0 = time.perf_counter()
        gen = _generate(cfg, model, model.encode_prompts(prompts["text"].tolist()), quiet=True)
        seconds = time.perf_counter() - t0
        sc = gen.scores()
        t2i.write_table(prompts.assign(**sc), out / f"variant-{name}-prompts-scored.csv")
        table = t2i.detection_table(prompts.assign(**sc), negatives=negs)
        det = {
            f"{m}_{s}_vs_{n}": table[f"{s} | duplicated vs {n}"][k]
            for s in t2i.SCORES
            for n in negs
            for m, k in (("auroc", "auroc"), ("tpr1", "tpr_at_1pct_fpr"))
        }
        per_step[name] = t2i.auroc_per_step(gen.d, prompts["group"].to_numpy(), negatives=negs)
        per_step["timesteps"] = gen.timesteps
        sel_scores = {k: v[sel_rows.numpy()] for k, v in sc.items()}
        row = {"model": name, **det, **judge.row(gen.images[sel_rows], sel_scores)}
        row |= _drop_shares(run, out) | {"seconds_scoring": round(seconds, 1)}
        rows.append(row)
        log.info("variants_eval %s: %s", name, row)
        t2i.write_table(pd.DataFrame(rows), out / "variants.csv")
        write_json(out / "variants-per-step.json", per_step)
    if missing:
        raise SystemExit(f"variants_eval: {missing} not trained yet; run the variants stage.")


# ---------------------------------------------------------------------------- report
def stage_report(cfg: dict, out: Path) -> None:
    """docs/results/text2image.json and docs/figures/text2image-*.png (aggregates only)."""
    prompts = pd.read_csv(out / "prompts-scored.csv")
    gen, _ = t2i.Generation.load(out / "scores.safetensors")
    groups = prompts["group"].to_numpy()
    figs = ROOT / "docs" / "figures"
    by_group = {g: prompts.loc[groups == g] for g in GROUPS}
    t2i.plot_score_histogram(
        {g: p["d_first"].to_numpy() for g, p in by_group.items()}, figs / "text2image-d-first.png"
    )
    t2i.plot_score_histogram(
        {g: p["entropy_first"].to_numpy() for g, p in by_group.items()},
        figs / "text2image-entropy-first.png",
        xlabel="cross-attention entropy at the first step (nats)",
    )
    t2i.plot_score_per_step(gen.d, groups, gen.timesteps, figs / "text2image-d-per-step.png")
    pooled = {g: pd.read_csv(out / f"tokens-pooled-{g}.csv") for g in ("duplicated", "single")}
    top = pooled["duplicated"].head(15)
    t2i.plot_bars(
        [str(w) for w in top["word"]],
        top["mean_share"].to_numpy(),
        figs / "text2image-top-tokens.png",
        xlabel="mean share of the prompt's d_t-gradient significance",
        title="Top words over the duplicated (memorized) prompts",
    )
    ablation_means, ablation_paired = t2i.marker_ablation(pd.read_csv(out / "markers.csv"))
    mit = pd.read_csv(out / "mitigations.csv")
    t2i.plot_bars(
        mit["mitigation"].tolist(),
        mit["d_first_duplicated"].to_numpy(),
        figs / "text2image-mitigations.png",
        xlabel="mean first-step d_t of the duplicated prompts",
        title="Inference-time mitigations",
    )
    means = ["d_first", "d_mean", "entropy_first"]
    fix = None
    if (out / "fix-copies.csv").exists():
        fp = pd.read_csv(out / "fix-prompts-scored.csv")
        fix = {
            "markers": cfg["fix"]["markers"],
            "detection": t2i.detection_table(fp),
            "score_means": fp.groupby("group")[means].mean().to_dict(),
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
        labels = t2i.label_summary(lab)
    variants = None
    if (out / "variants.csv").exists():
        per_step = json.loads((out / "variants-per-step.json").read_text())
        t2i.plot_step_auroc(
            per_step, figs / "text2image-step-auroc-models.png", negatives=("unseen", "single")
        )
        lo, hi = t2i.MID_WINDOW
        timing = {name: out / f"t2i-{name}" / "timing.json" for name in cfg.get("variants", {})}
        variants = {
            "mid_window": list(t2i.MID_WINDOW),
            "mid_timesteps": [t for t in per_step["timesteps"] if lo <= t / 1000 <= hi],
            "overrides": cfg.get("variants", {}),
            "rows": [
                {k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in r.items()}
                for r in pd.read_csv(out / "variants.csv").to_dict("records")
            ],
            "auroc_per_step": per_step,
            "training_seconds": {
                name: json.loads(p.read_text()) for name, p in timing.items() if p.exists()
            },
        }
    unconditional = None
    if (out / "unconditional.json").exists():
        unconditional = json.loads((out / "unconditional.json").read_text())
    result = {
        "schema_version": 1,
        "pairing": "ARTIFICIAL: NIH radiographs paired with IU report texts by finding",
        "n_pairs": int(len(pd.read_csv(out / "pairs-unique.csv"))),
        "n_training_rows": int(len(pd.read_csv(out / "pairs.csv"))),
        "config": cfg,
        "model": yaml.safe_load((ROOT / cfg["model_config"]).read_text(encoding="utf-8")),
        "prompt_groups": {g: int(len(p)) for g, p in by_group.items()},
        "detection": t2i.detection_table(prompts),
        "d_auroc_per_step": {"timesteps": gen.timesteps, **t2i.auroc_per_step(gen.d, groups)},
        "score_means": prompts.groupby("group")[means].mean().to_dict(),
        "tokens_top_duplicated": pooled["duplicated"].head(20).to_dict("records"),
        "tokens_top_single": pooled["single"].head(20).to_dict("records"),
        "marker_group": t2i.MARKER_GROUP,
        "marker_attribution": t2i.marker_attribution(pd.read_csv(out / "tokens-per-prompt.csv")),
        "marker_with_vs_without": t2i.marker_with_vs_without(prompts, groups=GROUPS),
        "marker_ablation_means": ablation_means,
        "marker_ablation_paired": ablation_paired,
        "mitigations": mit.to_dict("records"),
        "training_time_fix": fix,
        "variants": variants,
        "unconditional_diagnostic": unconditional,
        "audit_labels": labels,
        "timings_s": json.loads((out / "timings.json").read_text()),
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    write_json(ROOT / "docs" / "results" / "text2image.json", result)


def _cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


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
        timings[stage] = round(time.perf_counter() - t0, 1)
        write_json(timings_path, timings)
        log.info("stage %s: %.0f s", stage, timings[stage])


if __name__ == "__main__":
    main()
