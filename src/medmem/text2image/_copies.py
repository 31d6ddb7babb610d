"""Image copies among text-to-image generations: ``medmem.audit`` on each set of images.

Behind ``medmem prompts mitigate --train --val --detector``: for every mitigation, how many
generations copy a training image (and their own paired image), FID in the detector's
feature space, and whether the copied image fits the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medmem._errors import InputError
from medmem.text2image._scores import detection


def _key(path: Any) -> str:
    return str(Path(path).resolve()) if str(path) else ""


@dataclass(frozen=True)
class CopyFlags:
    """Per generated image (prompt-major): copy, own copy, nearest training file."""

    copy: np.ndarray
    own_copy: np.ndarray
    nearest: np.ndarray
    tau: float
    synthetic: Any  # the generations as a medmem ArrayDataset


class CopyJudge:
    """Copies, own copies, FID and prompt faithfulness of generations for fixed prompts.

    Args:
        train: the training images (a medmem dataset with files, e.g. ``load_dataset``).
        val: validation images of other patients (calibrate tau).
        detector: a trained ``medmem.Detector`` (or a stand-in with ``embed``).
        prompts: the prompts; ``text``, optional ``path`` (the prompt's own training image:
            own copies), ``finding``, ``group`` (rows per group) and boolean ``memorized``.
        captions: optional training captions, columns ``path``, ``text``, optional
            ``finding`` (paths as in ``train``): caption cosine and finding agreement.
        encoder: the model's ``TextEncoder`` (caption cosine).
        percentile, seed, n_bootstrap, n_controls, cache_dir: as in ``medmem.audit``.
        fid: compute FID in the detector's encoder features.
    """

    def __init__(
        self,
        train: Any,
        val: Any,
        detector: Any,
        prompts: pd.DataFrame,
        *,
        captions: pd.DataFrame | None = None,
        encoder: Any = None,
        percentile: float = 95.0,
        seed: int = 0,
        n_bootstrap: int = 200,
        n_controls: int = 50,
        cache_dir: str | Path | None = None,
        fid: bool = True,
        score: str = "aligned",
    ) -> None:
        files = getattr(train, "files", None)
        if files is None:
            raise InputError("train must be a medmem dataset of image files (load_dataset).")
        self.train, self.val, self.detector = train, val, detector
        self.prompts = prompts.reset_index(drop=True)
        self.file_of = {i: _key(f[0]) for i, f in zip(train.ids, files, strict=True)}
        self.seed, self.n_bootstrap, self.n_controls = seed, n_bootstrap, n_controls
        self.percentile = percentile
        self.cache_dir = cache_dir
        self.score = score  # the audit's score (medmem.verify): "aligned" or "embedding"
        self.captions = None
        if captions is not None:
            self.captions = captions.assign(path=[_key(p) for p in captions["path"]])
            self.captions = self.captions.drop_duplicates("path").set_index("path")
        self.encoder = encoder
        self._train_feat = None
        self._fid = fid
        self._prompt_emb = None
        if encoder is not None and self.captions is not None:
            self._prompt_emb = encoder.sentence_embedding(self.prompts["text"].tolist())

    def flags(self, images: torch.Tensor, own: list[str] | None = None) -> CopyFlags:
        """Audit ``images`` (P, G, C, *size); ``own``: each prompt's own training file."""
        from medmem._audit import audit
        from medmem.data import ArrayDataset

        P, G = images.shape[:2]
        syn = ArrayDataset(
            images.reshape(P * G, *images.shape[2:]),
            ids=[f"p{p:03d}_g{g}" for p in range(P) for g in range(G)],
        )
        res = audit(
            self.train,
            self.val,
            syn,
            detector=self.detector,
            percentile=self.percentile,
            n_bootstrap=self.n_bootstrap,
            n_controls=self.n_controls,
            seed=self.seed,
            cache_dir=self.cache_dir,
            quiet=True,
            score=self.score,
        )
        s = res.synthetic.set_index("synthetic_id").loc[syn.ids]
        near = np.array([self.file_of[i] for i in s["nearest_train_id"]])
        copy = s["copy"].to_numpy().astype(bool)
        own_of = np.array([_key(p) for p in own] if own is not None else [""] * P)
        own_copy = copy & (near == np.repeat(own_of, G))
        return CopyFlags(copy, own_copy, near, float(res.summary["tau"]), syn)

    def _groups(self) -> dict[str, np.ndarray]:
        p = self.prompts
        if "group" in p.columns:
            g = p["group"].astype(str).to_numpy()
            return {name: g == name for name in dict.fromkeys(g)}
        if "memorized" in p.columns:
            m = p["memorized"].to_numpy(bool)
            return {"memorized": m, "other": ~m}
        return {"all": np.ones(len(p), bool)}

    def row(self, images: torch.Tensor, scores: dict[str, np.ndarray]) -> dict[str, Any]:
        """One table row for ``images`` (P, G, ...) of the prompts and their ``scores``."""
        p = self.prompts
        P, G = images.shape[:2]
        if P != len(p):
            raise InputError(f"{P} prompts of images but {len(p)} prompts given.")
        own = p["path"].astype(str).tolist() if "path" in p.columns else None
        flags = self.flags(images, own)
        row: dict[str, Any] = {}
        for name, sel in self._groups().items():
            img = np.repeat(sel, G)
            row[f"d_first_{name}"] = float(scores["d_first"][sel].mean())
            row[f"d_mean_{name}"] = float(scores["d_mean"][sel].mean())
            row[f"copies_{name}"] = float(flags.copy[img].mean())
            if own is not None:
                row[f"own_copies_{name}"] = float(flags.own_copy[img].mean())
        if "memorized" in p.columns:
            m = p["memorized"].to_numpy(bool)
            if m.any() and (~m).any():
                d = scores["d_first"]
                row["auroc_d_first"] = detection(d[m], d[~m])["auroc"]
        if self._fid:
            row["fid_detector"] = self._fid_of(flags.synthetic)
        idx = np.repeat(np.arange(P), G)
        if self.captions is not None:
            known = np.array([n in self.captions.index for n in flags.nearest])
            if "finding" in p.columns and "finding" in self.captions.columns and known.all():
                found = self.captions.loc[flags.nearest, "finding"].to_numpy()
                row["finding_agreement"] = float((found == p["finding"].to_numpy()[idx]).mean())
            if self._prompt_emb is not None and known.all():
                cap = self.encoder.sentence_embedding(
                    self.captions.loc[flags.nearest, "text"].tolist()
                )
                row["caption_cosine"] = float((cap * self._prompt_emb[idx]).sum(1).mean())
        row["tau"] = flags.tau
        row["n_images"] = int(P * G)
        return row

    def _fid_of(self, synthetic: Any) -> float:
        from medmem import metrics

        if self._train_feat is None:
            self._train_feat = metrics.extract_features(self.train, self.detector, quiet=True)
        feats = metrics.extract_features(synthetic, self.detector, quiet=True)
        return float(metrics.fid(self._train_feat, feats))


__all__ = ["CopyFlags", "CopyJudge"]
