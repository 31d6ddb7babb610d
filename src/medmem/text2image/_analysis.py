"""Tables, figures and the HTML page of a prompt study: ranked prompts, token tables."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medmem._io import atomic_save, atomic_write_text
from medmem.text2image._encoder import MARKER_RE, EncodedText, TextEncoder, is_marker, words_of
from medmem.text2image._scores import MID_WINDOW

MARKER_GROUP = "<de-identification marker>"


def rank_prompts(
    texts: Sequence[str], scores: dict[str, np.ndarray], **columns: Sequence[Any]
) -> pd.DataFrame:
    """Prompts ranked by first-step d_t (highest = most memorized first), with every score,
    ``has_marker``/``n_markers`` flags and any extra ``columns`` (e.g. ``duplicated``)."""
    frame = pd.DataFrame({"prompt_id": np.arange(len(texts)), "text": list(texts)})
    for k, v in scores.items():
        frame[k] = np.asarray(v, dtype=float)
    frame["n_markers"] = [len(MARKER_RE.findall(t)) for t in texts]
    frame["has_marker"] = frame["n_markers"] > 0
    for k, v in columns.items():
        frame[k] = list(v)
    frame = frame.sort_values("d_first", ascending=False, kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


def token_table(
    encoder: TextEncoder,
    cond: EncodedText,
    significance: np.ndarray,
    prompt_ids: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Per prompt, its words ranked by significance (WordPiece pieces summed into words;
    special tokens excluded); ``share`` = the word's share of the prompt's total."""
    special = set(encoder.tokenizer.all_special_tokens)
    rows = []
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(significance)))
    for p in range(len(significance)):
        toks = encoder.tokens(cond.ids[p])
        words = words_of(toks, list(significance[p]), special=special)
        total = sum(w[1] for w in words) or 1.0
        order = sorted(range(len(words)), key=lambda i: -words[i][1])
        for r, i in enumerate(order, start=1):
            w, s, _ = words[i]
            rows.append(
                {
                    "prompt_id": ids[p],
                    "rank": r,
                    "word": w,
                    "significance": s,
                    "share": s / total,
                    "is_marker": is_marker(w),
                    "n_words": len(words),
                }
            )
    return pd.DataFrame(rows)


def pool_tokens(table: pd.DataFrame, *, min_prompts: int = 2) -> pd.DataFrame:
    """Pool a :func:`token_table` per word over prompts; markers form one group.

    Columns: ``word``, ``n_prompts`` (prompts containing it), ``mean_share`` (mean share of
    the prompt's significance), ``mean_rank_pct`` (rank / words in prompt, 0 = top),
    ``top1`` (prompts where it ranks first). Sorted by ``mean_share``.
    """
    t = table.copy()
    t["word"] = np.where(t["is_marker"], MARKER_GROUP, t["word"])
    t["rank_pct"] = (t["rank"] - 1) / t["n_words"].clip(lower=1)
    per = t.groupby(["prompt_id", "word"], as_index=False).agg(
        share=("share", "sum"), rank_pct=("rank_pct", "min"), rank=("rank", "min")
    )
    pooled = per.groupby("word").agg(
        n_prompts=("prompt_id", "nunique"),
        mean_share=("share", "mean"),
        mean_rank_pct=("rank_pct", "mean"),
        top1=("rank", lambda r: int((r == 1).sum())),
    )
    pooled = pooled[pooled["n_prompts"] >= min_prompts]
    return pooled.sort_values("mean_share", ascending=False).reset_index()


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a CSV atomically."""
    path = Path(path)
    atomic_save(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def write_html(
    ranked: pd.DataFrame,
    tokens: pd.DataFrame | None,
    path: str | Path,
    *,
    title: str = "Prompt memorization",
    top: int = 50,
) -> Path:
    """A self-contained page of the top prompts and tokens; all data text is escaped."""

    def table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in frame.itertuples(index=False)
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:12px;vertical-align:top}table{border-collapse:collapse}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Prompts ranked by d_t at the first sampling step (Wen et al.): the norm of "
        "the text-conditional minus unconditional noise prediction. The page shows "
        "report texts: keep it as confidential as the data.</p>",
        f"<h2>Top {min(top, len(ranked))} prompts</h2>",
        table(ranked.head(top)),
    ]
    if tokens is not None and len(tokens):
        parts += ["<h2>Tokens pooled over the flagged prompts</h2>", table(tokens.head(top))]
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_score_histogram(
    groups: dict[str, np.ndarray], path: str | Path, *, xlabel: str = "d_t at the first step"
) -> Path:
    """Overlaid histograms of a score per prompt group."""
    from medmem._plots import subplots

    fig, ax = subplots(figsize=(6, 3.5))
    allv = np.concatenate([np.asarray(v, float) for v in groups.values()])
    bins = np.linspace(allv.min(), allv.max(), 30)
    for name, v in groups.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def plot_bars(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    *,
    xlabel: str,
    title: str = "",
) -> Path:
    """Horizontal bar chart (top tokens, mitigation effects)."""
    from medmem._plots import subplots

    fig, ax = subplots(figsize=(6, 0.3 * len(labels) + 1.2))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color="#4477aa")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def plot_score_per_step(
    d: Any, groups: Sequence[str] | np.ndarray, timesteps: Sequence[int], path: str | Path
) -> Path:
    """Mean d_t at each sampling step per prompt group; ``d`` is a ``Generation.d``
    (P, G, S) or (P, S) per prompt."""
    from medmem._plots import subplots

    d = np.asarray(d, dtype=float)
    d = d.mean(1) if d.ndim == 3 else d
    groups = np.asarray(groups)
    fig, ax = subplots(figsize=(6, 3.5))
    for g in dict.fromkeys(groups):
        mean = d[groups == g].mean(0)
        ax.plot(range(len(mean)), mean, label=f"{g} (n={int((groups == g).sum())})")
    ax.set_xlabel(f"sampling step (DDIM, t = {timesteps[0]} ... {timesteps[-1]})")
    ax.set_ylabel("mean d_t")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_step_auroc(
    per_step: dict[str, Any],
    path: str | Path,
    *,
    negatives: Sequence[str] | None = None,
    window: tuple[float, float] = MID_WINDOW,
    num_train_timesteps: int = 1000,
) -> Path:
    """AUROC of d_t at each sampling step, one panel per negative group, one line per model.

    ``per_step`` maps ``"timesteps"`` to the S timesteps and each model's name to
    :func:`auroc_per_step`'s dict; ``negatives`` orders the panels (None: as in that dict);
    the shaded band is ``window`` (d_mid's steps).
    """
    from medmem._plots import subplots

    t = np.array(per_step["timesteps"])
    models = [k for k in per_step if k != "timesteps"]
    if negatives is None:
        negatives = list(per_step[models[0]]) if models else []
    fig, axes = subplots(1, len(negatives), figsize=(5 * len(negatives), 3.6), sharey=True,
                         squeeze=False)  # fmt: skip
    axes = axes[0]
    lo, hi = (w * num_train_timesteps for w in window)
    for ax, neg in zip(axes, negatives, strict=True):
        for name in models:
            ax.plot(t, per_step[name][neg], marker=".", label=name)
        ax.axvspan(lo, hi, color="0.85", zorder=0)
        ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
        ax.axhline(0.9, color="0.5", lw=0.8, ls="--")
        ax.set_xlim(t.max() + 20, t.min() - 20)
        ax.set_xlabel("sampling timestep t (noisiest left)")
        ax.set_title(f"duplicated vs {neg} prompts")
    axes[0].set_ylabel("AUROC of d_t at that step")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


__all__ = [
    "MARKER_GROUP",
    "plot_bars",
    "plot_score_histogram",
    "plot_score_per_step",
    "plot_step_auroc",
    "pool_tokens",
    "rank_prompts",
    "token_table",
    "write_html",
    "write_table",
]
