"""Summaries of a prompt study by prompt group: detection of the memorized group by each
score, per sampling step, and what the de-identification markers do.

A study's prompt table has a ``group`` column (e.g. ``duplicated`` training prompts,
``single`` ones, ``unseen`` prompts) and the score columns of ``Generation.scores``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from medmem.text2image._scores import SCORES, detection


def _groups_in(frame: pd.DataFrame, groups: Sequence[str] | None) -> list[str]:
    return list(groups) if groups is not None else list(dict.fromkeys(frame["group"]))


def detection_table(
    prompts: pd.DataFrame,
    *,
    positive: str = "duplicated",
    negatives: Sequence[str] = ("single", "unseen", "single+unseen"),
) -> dict[str, dict[str, Any]]:
    """:func:`detection` of the ``positive`` group against each negative group, by every
    score column present; ``"a+b"`` pools groups a and b. Keys ``"<score> | <positive> vs
    <negative>"``.

    Example:
        >>> detection_table(prompts)["d_first | duplicated vs unseen"]["auroc"]  # doctest: +SKIP
    """
    pos = prompts["group"] == positive
    out: dict[str, dict[str, Any]] = {}
    for neg_name in negatives:
        neg = prompts["group"].isin(neg_name.split("+"))
        for score in [s for s in SCORES if s in prompts.columns]:
            out[f"{score} | {positive} vs {neg_name}"] = detection(
                prompts.loc[pos, score].to_numpy(), prompts.loc[neg, score].to_numpy()
            )
    return out


def auroc_per_step(
    d: torch.Tensor | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    positive: str = "duplicated",
    negatives: Sequence[str] = ("single", "unseen"),
) -> dict[str, list[float]]:
    """AUROC of d_t at each sampling step, ``positive`` prompts against each negative group.

    ``d`` is (P, S) per prompt and step, or a ``Generation.d`` (P, G, S), averaged over the
    G generations first.
    """
    if isinstance(d, torch.Tensor):
        d = (d.mean(1) if d.ndim == 3 else d).numpy()
    d = np.asarray(d)
    if d.ndim == 3:
        d = d.mean(1)
    groups = np.asarray(groups)
    pos = groups == positive
    return {
        neg: [detection(d[pos, k], d[groups == neg, k])["auroc"] for k in range(d.shape[1])]
        for neg in negatives
    }


def marker_attribution(
    tokens: pd.DataFrame, groups: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per prompt group, over its prompts that contain a marker: the mean share of the
    prompt's significance that falls on markers, the mean share of its words that are
    markers, and how many prompts rank a marker first.

    ``tokens`` is a :func:`token_table` with a ``group`` column.
    """
    out: dict[str, dict[str, Any]] = {}
    for g in _groups_in(tokens, groups):
        t = tokens[tokens["group"] == g]
        with_m = t.groupby("prompt_id")["is_marker"].any()
        ids = with_m[with_m].index
        per = (
            t[t["prompt_id"].isin(ids)]
            .groupby("prompt_id")
            .apply(
                lambda x: pd.Series(
                    {
                        "marker_share": x.loc[x["is_marker"], "share"].sum(),
                        "marker_word_share": x["is_marker"].mean(),
                        "marker_top1": bool(x.loc[x["rank"] == 1, "is_marker"].any()),
                    }
                ),
                include_groups=False,
            )
        )
        some = len(per) > 0
        out[g] = {
            "n_prompts_with_markers": int(len(ids)),
            "mean_significance_share_of_markers": float(per["marker_share"].mean())
            if some
            else None,
            "mean_share_of_words_that_are_markers": float(per["marker_word_share"].mean())
            if some
            else None,
            "prompts_with_a_marker_ranked_first": int(per["marker_top1"].sum()) if some else 0,
        }
    return out


def marker_with_vs_without(
    prompts: pd.DataFrame, *, score: str = "d_first", groups: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per prompt group, ``score`` of the prompts with markers (``n_markers`` > 0) against
    those without: counts, means and the AUROC of with vs without (None when a side is
    empty)."""
    out: dict[str, dict[str, Any]] = {}
    for g in _groups_in(prompts, groups):
        sub = prompts[prompts["group"] == g]
        wm, wo = sub[sub["n_markers"] > 0], sub[sub["n_markers"] == 0]
        both = len(wm) > 0 and len(wo) > 0
        out[g] = {
            "n_with": int(len(wm)),
            "n_without": int(len(wo)),
            f"{score}_with": float(wm[score].mean()) if len(wm) else None,
            f"{score}_without": float(wo[score].mean()) if len(wo) else None,
            f"auroc_with_vs_without_{score}": float(
                detection(wm[score].to_numpy(), wo[score].to_numpy())["auroc"]
            )
            if both
            else None,
        }
    return out


def marker_ablation(
    ablations: pd.DataFrame, *, baseline: str = "keep", score: str = "d_first"
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Summaries of a marker ablation table (columns ``prompt``, ``group``, ``ablation``
    and the scores; one row per prompt and ablation, ``baseline`` = the text as written).

    Returns ``(means, paired)``: the mean scores per group and ablation (records), and per
    ``"<ablation> | <group>"`` the mean relative change of ``score`` against the baseline
    of the same prompts.
    """
    cols = [c for c in ("d_first", "d_mean", "entropy_first") if c in ablations.columns]
    means = ablations.groupby(["group", "ablation"])[cols].mean().reset_index()
    base = ablations[ablations["ablation"] == baseline].set_index("prompt")[score]
    paired: dict[str, dict[str, Any]] = {}
    for mode in [m for m in dict.fromkeys(ablations["ablation"]) if m != baseline]:
        m = ablations[ablations["ablation"] == mode].set_index("prompt")
        for g in dict.fromkeys(ablations["group"]):
            idx = m.index[m["group"] == g]
            if len(idx):
                rel = (m.loc[idx, score] - base.loc[idx]) / base.loc[idx]
                paired[f"{mode} | {g}"] = {
                    "n": int(len(idx)),
                    f"mean_relative_change_{score}": float(rel.mean()),
                }
    return means.to_dict("records"), paired


def label_summary(labels: pd.DataFrame) -> dict[str, Any]:
    """Audit-judged memorization labels of training prompts (columns ``group``,
    ``own_copies``, ``n_generations`` and scores): a prompt is memorized when at least one
    of its generations copies its own paired training image. Counts, rates per group, and
    :func:`detection` of the memorized prompts by every score (None without both kinds)."""
    mem = labels["own_copies"].to_numpy() > 0
    by_group = labels.groupby("group")
    return {
        "definition": "training prompt with >= 1 own copy among its generations",
        "n_memorized": int(mem.sum()),
        "n_not_memorized": int((~mem).sum()),
        "memorized_by_group": labels.assign(m=mem).groupby("group")["m"].mean().to_dict(),
        "own_copy_rate_by_group": (
            by_group["own_copies"].sum() / by_group["n_generations"].sum()
        ).to_dict(),
        "detection": {
            sc: detection(labels.loc[mem, sc].to_numpy(), labels.loc[~mem, sc].to_numpy())
            for sc in SCORES
            if sc in labels.columns
        }
        if mem.any() and (~mem).any()
        else None,
    }


__all__ = [
    "auroc_per_step",
    "detection_table",
    "label_summary",
    "marker_ablation",
    "marker_attribution",
    "marker_with_vs_without",
]
