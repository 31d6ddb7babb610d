"""End-to-end prompt workflows behind ``medmem prompts score`` and ``medmem prompts mitigate``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medmem._errors import InputError
from medmem._io import atomic_write_json, save_tensors
from medmem.text2image._analysis import (
    plot_bars,
    plot_score_histogram,
    pool_tokens,
    rank_prompts,
    token_table,
    write_html,
    write_table,
)
from medmem.text2image._copies import CopyJudge
from medmem.text2image._mitigations import MITIGATIONS, Mitigation, mitigated_generate
from medmem.text2image._model import TextToImageModel
from medmem.text2image._scores import SCORES, detection, generate, token_significance


def read_prompts(csv: str | Path, *, text_column: str = "text") -> pd.DataFrame:
    """A CSV of prompts (``text_column``; optional boolean ``memorized`` column)."""
    csv = Path(csv)
    if not csv.is_file():
        raise InputError(
            f"{csv}: prompts CSV not found (one prompt per row, column {text_column!r})."
        )
    frame = pd.read_csv(csv, keep_default_na=False)
    if text_column not in frame.columns:
        raise InputError(
            f"{csv}: no column {text_column!r} (found {list(frame.columns)}); "
            "name the prompt column 'text' or pass --text-column."
        )
    if frame.empty:
        raise InputError(f"{csv}: no prompts.")
    if "memorized" in frame.columns:
        frame["memorized"] = frame["memorized"].astype(str).str.lower().isin(["true", "1", "yes"])
    return frame.rename(columns={text_column: "text"})


def score_prompts(
    model: TextToImageModel,
    prompts: pd.DataFrame,
    out: str | Path,
    *,
    n_per_prompt: int = 4,
    seed: int = 0,
    steps: int | None = None,
    tokens: bool = True,
    flag_fraction: float = 0.1,
    batch_size: int = 32,
    quiet: bool = False,
) -> dict[str, Any]:
    """Score every prompt, rank them, attribute the flagged ones to tokens; write ``out``.

    Writes ``prompts-ranked.csv`` (ranked by first-step d_t, with ``flagged`` = top
    ``flag_fraction``), ``scores.safetensors`` (d_t and entropy per prompt, generation,
    step), ``tokens-per-prompt.csv`` and ``tokens-pooled.csv`` (flagged prompts, or the
    ``memorized`` ones when that column is given), ``d-first.png``, ``top-tokens.png``,
    ``report.html`` and ``summary.json`` (with detection AUROC/TPR when ``memorized`` is
    given).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = prompts["text"].astype(str).tolist()
    cond = model.encode_prompts(texts)
    gen = generate(
        model,
        cond,
        n_per_prompt=n_per_prompt,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        quiet=quiet,
    )
    scores = gen.scores()
    extra = {k: prompts[k].tolist() for k in prompts.columns if k != "text"}
    ranked = rank_prompts(texts, scores, **extra)
    n_flag = max(1, int(round(flag_fraction * len(texts))))
    ranked["flagged"] = ranked["rank"] <= n_flag
    write_table(ranked, out / "prompts-ranked.csv")
    save_tensors(
        out / "scores.safetensors",
        {"d": gen.d.contiguous(), "entropy": gen.entropy.contiguous()},
        {"timesteps": gen.timesteps, "n_per_prompt": n_per_prompt, "seed": seed},
    )
    summary: dict[str, Any] = {
        "n_prompts": len(texts),
        "n_per_prompt": n_per_prompt,
        "steps": len(gen.timesteps),
        "seed": seed,
        "n_flagged": n_flag,
        "scores": list(SCORES),
    }
    if "memorized" in prompts.columns:
        mem = prompts["memorized"].to_numpy(bool)
        if mem.any() and (~mem).any():
            summary["detection"] = {s: detection(scores[s][mem], scores[s][~mem]) for s in SCORES}
        groups = {"memorized": scores["d_first"][mem], "other": scores["d_first"][~mem]}
    else:
        groups = {"all prompts": scores["d_first"]}
    plot_score_histogram(groups, out / "d-first.png")
    pooled = None
    if tokens:
        if "memorized" in prompts.columns and prompts["memorized"].any():
            sel = np.flatnonzero(prompts["memorized"].to_numpy(bool))
        else:
            sel = ranked.loc[ranked["flagged"], "prompt_id"].to_numpy()
        sub = model.encode_prompts([texts[i] for i in sel])
        g1 = generate(
            model,
            sub,
            n_per_prompt=1,
            seed=seed,
            steps=steps,
            keep_latents=True,
            batch_size=batch_size,
            quiet=quiet,
        )
        sig = token_significance(model, g1, sub, quiet=quiet)
        table = token_table(model.encoder, sub, sig, prompt_ids=list(sel))
        write_table(table, out / "tokens-per-prompt.csv")
        pooled = pool_tokens(table, min_prompts=1 if len(sel) < 4 else 2)
        write_table(pooled, out / "tokens-pooled.csv")
        top = pooled.head(15)
        if len(top):
            plot_bars(
                [str(w) for w in top["word"]],
                top["mean_share"].to_numpy(),
                out / "top-tokens.png",
                xlabel="mean share of d_t-gradient significance",
            )
    write_html(ranked, pooled, out / "report.html")
    atomic_write_json(out / "summary.json", summary)
    return summary


def compare_mitigations(
    model: TextToImageModel,
    prompts: pd.DataFrame,
    out: str | Path,
    *,
    kinds: Sequence[str] = MITIGATIONS,
    strength: dict[str, float] | None = None,
    n_per_prompt: int = 4,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 32,
    quiet: bool = False,
) -> pd.DataFrame:
    """d_t of the prompts under each mitigation (same initial noises), and how far the
    images move from the unmitigated ones; writes ``mitigations.csv``.

    Image copies, FID and faithfulness need the training images and a detector: see
    :func:`audit_mitigations`.
    """
    return _mitigation_table(
        model, prompts, out, None, kinds, strength, n_per_prompt, seed, steps, batch_size, quiet
    )


def audit_mitigations(
    model: TextToImageModel,
    prompts: pd.DataFrame,
    train: Any,
    val: Any,
    detector: Any,
    out: str | Path,
    *,
    captions: pd.DataFrame | None = None,
    kinds: Sequence[str] = MITIGATIONS,
    strength: dict[str, float] | None = None,
    n_per_prompt: int = 4,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 32,
    percentile: float = 95.0,
    n_bootstrap: int = 200,
    n_controls: int = 50,
    cache_dir: str | Path | None = None,
    fid: bool = True,
    quiet: bool = False,
) -> pd.DataFrame:
    """:func:`compare_mitigations` plus the image copy audit of every mitigation's images.

    Each mitigation's generations are audited against ``train`` (``medmem.audit``, tau
    calibrated on ``val``, the copy ``detector``): per prompt group (``group`` column, else
    ``memorized``), the share of images that copy a training image (``copies_*``) and their
    own paired image (``own_copies_*``, from a ``path`` column), FID in the detector's
    features, and with ``captions`` (``path``, ``text``, ``finding``) prompt faithfulness.
    Writes ``mitigations.csv`` (after every mitigation) and the unmitigated images
    (``mitigation-none-images.safetensors``).

    Example:
        >>> audit_mitigations(model, prompts, train, val, det, "runs/mit")  # doctest: +SKIP
    """
    size = tuple(model.first_stage.image_size)
    if tuple(train.image_size) != size:
        raise InputError(
            f"the model generates {size} images but the training images are loaded at "
            f"{tuple(train.image_size)}: load train and val with image_size={size} "
            "(and a detector trained at that size)."
        )
    judge = CopyJudge(
        train,
        val,
        detector,
        prompts,
        captions=captions,
        encoder=model.encoder,
        percentile=percentile,
        seed=seed,
        n_bootstrap=n_bootstrap,
        n_controls=n_controls,
        cache_dir=cache_dir,
        fid=fid,
    )
    return _mitigation_table(
        model, prompts, out, judge, kinds, strength, n_per_prompt, seed, steps, batch_size, quiet
    )


def _mitigation_table(
    model: TextToImageModel,
    prompts: pd.DataFrame,
    out: str | Path,
    judge: CopyJudge | None,
    kinds: Sequence[str],
    strength: dict[str, float] | None,
    n_per_prompt: int,
    seed: int,
    steps: int | None,
    batch_size: int,
    quiet: bool,
) -> pd.DataFrame:
    """One row per mitigation ("none" first); with ``judge``, its copy columns too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = prompts["text"].astype(str).tolist()
    kinds = ["none", *[k for k in kinds if k != "none"]]
    rows, base = [], None
    for kind in kinds:
        t0 = time.perf_counter()
        m = Mitigation(kind, (strength or {}).get(kind), seed=seed)
        gen = mitigated_generate(
            model,
            texts,
            m,
            n_per_prompt=n_per_prompt,
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            quiet=quiet,
        )
        seconds = time.perf_counter() - t0
        sc = gen.scores()
        if base is None:
            base = (gen, sc)
        change = (gen.images - base[0].images).abs().mean().item()
        row = {
            "mitigation": m.label,
            "d_first": float(sc["d_first"].mean()),
            "d_mean": float(sc["d_mean"].mean()),
            "entropy_first": float(sc["entropy_first"].mean()),
            "relative_change_d_first": float(
                (sc["d_first"].mean() - base[1]["d_first"].mean()) / base[1]["d_first"].mean()
            ),
            "mean_abs_pixel_change": change,
        }
        if "memorized" in prompts.columns:
            mem = prompts["memorized"].to_numpy(bool)
            if mem.any():
                row["d_first_memorized"] = float(sc["d_first"][mem].mean())
        if judge is not None:
            row |= judge.row(gen.images, sc)
            row["seconds"] = round(seconds, 1)
            if kind == "none":
                save_tensors(
                    out / "mitigation-none-images.safetensors",
                    {"images": gen.images.contiguous()},
                    {"texts": texts},
                )
        rows.append(row)
        write_table(pd.DataFrame(rows), out / "mitigations.csv")
    return pd.DataFrame(rows)


__all__ = ["audit_mitigations", "compare_mitigations", "read_prompts", "score_prompts"]
