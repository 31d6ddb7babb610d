"""Verification: score candidate (query, training image) pairs by their best alignment.

The detector's embedding is good at *finding* the training image a synthetic image may copy
(it ranks the source among the first few candidates for almost every change), but its
correlation is a poor *score*: a shifted, zoomed or partly replaced copy can correlate less
with its source than a novel patient does with some training image. Verification re-scores
each candidate pair by the normalized cross-correlation (NCC) of the two images after the
best of a small set of alignments of the training image (flips, rotations, zooms, and every
shift up to ``max_shift`` of the side), computed per tile so that a replaced region costs
one tile, not the score. Copy detection systems do the same (retrieve by descriptor, verify
geometrically); the paper scores the embedding correlation alone, kept as
``score="embedding"``.

The aligned NCC of a pair is the mean, over the best ``2^d - 1`` of the ``2^d`` tiles (d = 2
or 3), of each tile's highest NCC over the alignments; each tile's NCC is the mean of the NCC
of the images and of their high-passed copies (image minus its Gaussian blur, ``highpass``),
since at the working size every chest radiograph or brain correlates highly with every other
and most of what sets a copy apart is in the detail. The score of a pair is its aligned NCC
minus ``background`` (beta, 0.5) times the query's *background*, the mean aligned NCC of its
2nd to 5th best training candidates: a novel image that resembles many training images
scores high against all of them, a copy stands out against one (the score normalization of
image copy detection systems, e.g. the DISC 2021 challenge's). An exact copy scores
``1 - beta * background``, well above a novel image's score. With
``highpass=0`` and ``background=0`` the score is the plain tiled aligned NCC in [-1, 1].
In 3D (``plain``) a pair's score is the larger of that and its *plain channel*, the aligned
NCC of the images alone, mapped onto the same scale by the training set's own null: a copy
whose detail is gone (down-sampled, blurred) keeps its anatomy but not its detail.
Scores are computed the same way for validation and synthetic images, so the audit's
calibration applies unchanged: tau is a conformal quantile of validation images' scores.

Cost: each training image is held as ``n_views`` views of ``size^d`` values, twice with the
high-passed copy (about 360 KB in 2D and 2.8 MB in 3D with the defaults); each query costs
a few matrix products per candidate. Pairs outside the candidates (the embedding's top
``n_candidates``, the pixels' top ``n_pixel_candidates`` and the coarse search's top
``coarse_candidates``) are taken as non-matches. The coarse search scores every pair at a
small grid (about 35 us per pair in 2D and 1.7 ms in 3D on one CPU core), so it runs only
up to ``coarse_max_pairs`` pairs (2 million in 2D: about 1,000 synthetic and validation
images against 2,000 training images; 50,000 in 3D); a shifted or cropped copy's source,
which neither the detector nor the pixels may rank first, is among its best five.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering

from medmem._errors import InputError
from medmem._section import ConfigSection
from medmem._validation import check_in_range, check_positive_int
from medmem.detector import resample
from medmem.search import nearest

#: The fewest training images on which the unaligned channel's null is estimated; below,
#: the aligned channel is used alone (the summary says so).
MIN_NULL = 10

#: Score names accepted by the audit: ``aligned`` (default) and ``embedding`` (the paper's).
SCORES = ("aligned", "embedding")


@dataclass(frozen=True)
class AlignConfig(ConfigSection):
    """How pairs are aligned and scored (defaults per dimensionality when None).

    Args:
        size: side of the working grid (None: 32 in 2D, 16 in 3D).
        max_shift: largest shift tried, as a fraction of the side (every whole-pixel shift
            up to it, on both sides, along every axis).
        rotations: rotation angles in degrees (about each axis in 3D; one axis at a time).
        scales: zoom-in factors as the fraction of the training image's side that the view
            covers (1 = whole image; 0.75 = a centred 75% box enlarged).
        flips: also try the training image mirrored along each axis in turn.
        n_candidates: training images per query taken from the embedding's nearest.
        n_pixel_candidates: training images per query taken from the pixels' nearest (and,
            with ``flips``, as many from the nearest of the query mirrored along each axis,
            so that a mirrored copy is found even by a detector that never saw flips).
        highpass: scale (Gaussian sigma, in working-grid pixels) of the high-pass copy
            of each image: a pair's NCC is the mean of the NCC of the images and of their
            high-passed copies (image minus its blur), which removes the anatomy every
            patient shares and keeps the detail a copy carries. None: 2.0 in 2D, 1.0 in
            3D; 0: the images alone.
        background: weight beta of the query's background, subtracted from each of its
            pair scores: score = aligned NCC - beta * (mean aligned NCC of the query's
            2nd to (1 + background_ranks)-th best candidates). A novel image that looks
            like many training images scores high against all of them; a copy stands out
            against one. 0: the aligned NCC alone.
        background_ranks: how many candidates after the best make the background.
        coarse_candidates: training images per query taken from a coarse search that
            scores *every* (query, training image) pair by its aligned NCC at a small grid
            (``coarse_size``, shifts up to ``coarse_max_shift``, zooms ``coarse_scales``, no
            rotation or flip): it finds the source of a shifted or cropped copy that neither
            the detector nor the pixels rank first. 0: off.
        coarse_size: side of the coarse search's grid (None: 24 in 2D, 16 in 3D).
        coarse_max_shift: largest shift the coarse search tries (fraction of the side).
        coarse_scales: zooms the coarse search tries (as ``scales``).
        coarse_highpass: as ``highpass``, for the coarse search (None: 0 in 2D, 1.0 in
            3D, where brains differ little at 16^3 but in their detail).
        coarse_max_pairs: the coarse search runs only when (training images) x (images of
            every other set) is at most this (None: 2,000,000 in 2D, about 35 us per pair
            on one CPU core; 50,000 in 3D, about 1.7 ms per pair); above it, it is skipped
            for every set alike, so that validation and synthetic images are still scored
            the same way, and the summary says so.
        plain: also score each pair by its *plain* aligned NCC: that of the images alone,
            without their high-passed copies, with the same alignments, the training
            images' views made from the images at the working size (as the coarse search's:
            a little smoother than the aligned channel's, made at twice the size, which a
            copy whose detail is gone matches better), minus ``background`` times the
            query's background in it, mapped onto the aligned channel's scale by matching
            the two channels' nulls (the best score of every training image against the
            others: medians and 95th percentiles), and keep the larger. It catches copies
            whose detail is gone (a heavy down-sampling or blur), which the high-passed
            channel scores like a novel image, also when they were moved, turned or warped.
            None: on in 3D (on real brains, down-sampled copies: AUROC 0.61 with the
            aligned channel alone, 0.960 with the unaligned one beside it, 0.999 with this
            one; copies changed three ways at once: 0.763, 0.795, 0.902;
            docs/results/detection-3d.md), off in 2D (the 2D targets are met without it).
        unaligned: also score each pair by the Pearson correlation of the two images at the
            working size, without alignment or high-pass, mapped and combined as ``plain``
            (the 3D default before ``plain``, which holds the unaligned pair among its
            alignments and replaced it; ``plain=False, unaligned=True`` reproduces a 3D
            audit made before). Default off.
    """

    size: int | None = None
    max_shift: float = 0.125
    rotations: tuple[float, ...] | None = None
    scales: tuple[float, ...] | None = None
    flips: bool = True
    n_candidates: int = 10
    n_pixel_candidates: int = 5
    highpass: float | None = None
    background: float = 0.5
    background_ranks: int = 4
    coarse_candidates: int = 5
    coarse_size: int | None = None
    coarse_max_shift: float = 0.15
    coarse_scales: tuple[float, ...] = (1.0, 0.8)
    coarse_highpass: float | None = None
    coarse_max_pairs: int | None = None
    plain: bool | None = None
    unaligned: bool = False

    def resolved(self, spatial_dims: int) -> AlignConfig:
        """A copy with the per-dimensionality defaults filled in, checked."""
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        size = self.size if self.size is not None else (32 if spatial_dims == 2 else 16)
        check_positive_int(size, "align.size", minimum=8)
        rot = self.rotations
        if rot is None:
            rot = (-8.0, -4.0, 0.0, 4.0, 8.0) if spatial_dims == 2 else (-6.0, 0.0, 6.0)
        scales = self.scales
        if scales is None:
            scales = (1.0, 0.87, 0.75)
        check_in_range(self.max_shift, "align.max_shift", 0.0, 0.4)
        for s in scales:
            check_in_range(s, "align.scales entry", 0.3, 1.5)
        check_positive_int(self.n_candidates, "align.n_candidates")
        check_positive_int(self.n_pixel_candidates, "align.n_pixel_candidates", minimum=0)
        highpass = self.highpass
        if highpass is None:
            highpass = 2.0 if spatial_dims == 2 else 1.0
        check_in_range(highpass, "align.highpass", 0.0, float(size) / 2)
        check_in_range(self.background, "align.background", 0.0, 1.0)
        check_positive_int(self.background_ranks, "align.background_ranks")
        check_positive_int(self.coarse_candidates, "align.coarse_candidates", minimum=0)
        two = spatial_dims == 2
        coarse_size = self.coarse_size if self.coarse_size is not None else (24 if two else 16)
        check_positive_int(coarse_size, "align.coarse_size", minimum=8)
        check_in_range(self.coarse_max_shift, "align.coarse_max_shift", 0.0, 0.4)
        for v in self.coarse_scales:
            check_in_range(v, "align.coarse_scales entry", 0.3, 1.5)
        coarse_hp = self.coarse_highpass
        if coarse_hp is None:
            coarse_hp = 0.0 if two else 1.0
        check_in_range(coarse_hp, "align.coarse_highpass", 0.0, float(coarse_size) / 2)
        max_pairs = self.coarse_max_pairs
        if max_pairs is None:
            max_pairs = 2_000_000 if two else 50_000
        check_positive_int(max_pairs, "align.coarse_max_pairs", minimum=0)
        return AlignConfig(
            size=int(size),
            max_shift=float(self.max_shift),
            rotations=tuple(float(r) for r in rot),
            scales=tuple(float(s) for s in scales),
            flips=bool(self.flips),
            n_candidates=int(self.n_candidates),
            n_pixel_candidates=int(self.n_pixel_candidates),
            highpass=float(highpass),
            background=float(self.background),
            background_ranks=int(self.background_ranks),
            coarse_candidates=int(self.coarse_candidates),
            coarse_size=int(coarse_size),
            coarse_max_shift=float(self.coarse_max_shift),
            coarse_scales=tuple(float(v) for v in self.coarse_scales),
            coarse_highpass=float(coarse_hp),
            coarse_max_pairs=int(max_pairs),
            plain=bool(self.plain if self.plain is not None else not two),
            unaligned=bool(self.unaligned),
        )

    def plain_channel(self) -> AlignConfig:
        """The settings of the plain channel (the aligned NCC of the images alone, same
        alignments); call it on a :meth:`resolved` config."""
        return self.replace(
            highpass=0.0, background=0.0, coarse_candidates=0, plain=False, unaligned=False
        )

    def coarse(self) -> AlignConfig:
        """The settings of the coarse search (aligned NCC at ``coarse_size``, no rotation
        or flip); call it on a :meth:`resolved` config."""
        return AlignConfig(
            size=self.coarse_size,
            max_shift=self.coarse_max_shift,
            rotations=(0.0,),
            scales=self.coarse_scales,
            flips=False,
            highpass=self.coarse_highpass,
            background=0.0,
            coarse_candidates=0,
            plain=False,
            unaligned=False,
        )


def _rotation(d: int, axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    r = np.eye(d)
    if d == 2:
        r[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
        return r
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    return r


def alignment_matrices(spatial_dims: int, config: AlignConfig) -> torch.Tensor:
    """The (T, d, d + 1) affine matrices (``F.affine_grid`` convention) of every view."""
    d = spatial_dims
    c = config.resolved(d)
    flips: list[np.ndarray] = [np.eye(d)]
    if c.flips:
        for ax in range(d):  # mirror along each axis in turn (axis 0: the last image axis)
            f = np.eye(d)
            f[ax, ax] = -1.0
            flips.append(f)
    rots: list[np.ndarray] = [np.eye(d)]
    for axis in range(d if d == 3 else 1):
        rots += [_rotation(d, axis, r) for r in c.rotations or () if r != 0.0]
    out = []
    for f, r, s in itertools.product(flips, rots, c.scales or (1.0,)):
        m = np.zeros((d, d + 1))
        m[:, :d] = s * (r @ f)
        out.append(m)
    return torch.tensor(np.array(out), dtype=torch.float32)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, *s) -> (n, C, size, ..., size) with the encoder's resampling (area when
    shrinking)."""
    return resample(x, (size,) * (x.ndim - 2))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm (constant rows stay zero)."""
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class AlignedScorer:
    """Aligned-NCC scores of query images against a fixed set of training images.

    Example:
        >>> train = torch.rand(5, 1, 32, 32)
        >>> scorer = AlignedScorer(train)
        >>> s = scorer.score_pairs(torch.flip(train[:2], dims=[-1]), [0, 1], [0, 1])
        >>> bool((s > 0.99).all())
        True
    """

    def __init__(self, train: torch.Tensor, config: AlignConfig | None = None) -> None:
        if not isinstance(train, torch.Tensor) or train.ndim not in (4, 5):
            raise InputError(
                "AlignedScorer needs the training images as a (n, C, H, W) or (n, C, D, H, W) "
                f"tensor, got {type(train).__name__} {getattr(train, 'shape', '')}."
            )
        self.spatial_dims = train.ndim - 2
        self.config = (config or AlignConfig()).resolved(self.spatial_dims)
        s = int(self.config.size or 32)
        self.margin = int(math.floor(self.config.max_shift * s))
        self.tile = (s - 2 * self.margin) // 2
        if self.tile < 2:
            raise InputError(
                f"align.max_shift={self.config.max_shift} leaves no template at size {s}; "
                "lower max_shift or raise size."
            )
        self.theta = alignment_matrices(self.spatial_dims, self.config)
        self.n_views = len(self.theta)
        self._views = self._make_views(train.float().mean(1, keepdim=True))

    # ---------------------------------------------------------------- views
    def _make_views(self, train: torch.Tensor) -> torch.Tensor:
        """(n, 2^d, T, tile^d) unit-normalized tiles of every view of every training image."""
        d, s = self.spatial_dims, int(self.config.size or 32)
        work = _resize(train, 2 * s)
        mode = "bilinear"
        out = []
        shape = (self.n_views, 1, *((2 * s,) * d))
        grid = F.affine_grid(self.theta, list(shape), align_corners=False)
        for i in range(len(work)):
            img = work[i : i + 1].expand(self.n_views, *work.shape[1:])
            v = F.grid_sample(img, grid, mode=mode, padding_mode="zeros", align_corners=False)
            v = _resize(v, s)[:, 0]  # (T, *s)
            out.append(self._split(v, self.margin))
        return torch.stack(out)

    def _highpass(self, v: torch.Tensor) -> torch.Tensor:
        """(n, *s) -> the same minus its Gaussian blur (sigma ``config.highpass``)."""
        sigma = float(self.config.highpass or 0.0)
        kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0, approx="sampled")
        blur = separable_filtering(v[:, None], [kernel] * self.spatial_dims, mode="replicate")
        return v - blur[:, 0]

    def _channels(self, v: torch.Tensor) -> list[torch.Tensor]:
        """The images compared: (n, *s) itself, and its high-passed copy when asked."""
        return [v, self._highpass(v)] if self.config.highpass else [v]

    def _unit_features(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Rows of each channel unit-normalized, concatenated and scaled so that the dot
        product of two feature rows is the mean NCC over the channels."""
        out = torch.cat([_unit_rows(p) for p in parts], dim=-1)
        return out / math.sqrt(len(parts))

    def _split(self, v: torch.Tensor, start: int) -> torch.Tensor:
        """(T, *s) -> (2^d, T, channels * tile^d): unit tiles of the box starting at
        ``start``."""
        d, t = self.spatial_dims, self.tile
        chans = self._channels(v)
        tiles = []
        for corner in itertools.product((0, 1), repeat=d):
            idx = tuple(slice(start + c * t, start + (c + 1) * t) for c in corner)
            parts = [c[(slice(None), *idx)].reshape(len(v), -1) for c in chans]
            tiles.append(self._unit_features(parts))
        return torch.stack(tiles)

    def _windows(self, q: torch.Tensor) -> torch.Tensor:
        """(*s) query -> (2^d, P, channels * tile^d): every shifted window of every tile."""
        d, t, m = self.spatial_dims, self.tile, self.margin
        span = 2 * m + 1
        unfolded = []
        for w in self._channels(q[None]):
            w = w[0]
            for axis in range(d):
                w = w.unfold(axis, t, 1)  # (..., L_axis, ..., t, ...)
            unfolded.append(w)  # (L_0, ..., L_{d-1}, t, ..., t)
        out = []
        for corner in itertools.product((0, 1), repeat=d):
            idx = tuple(slice(c * t, c * t + span) for c in corner)
            out.append(self._unit_features([w[idx].reshape(span**d, t**d) for w in unfolded]))
        return torch.stack(out)

    # ---------------------------------------------------------------- scores
    def small(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the working size (n, 1, *size), channels averaged."""
        return _resize(images.float().mean(1, keepdim=True), int(self.config.size or 32))

    def score_pairs(
        self, queries: torch.Tensor, query_index: Sequence[int], train_index: Sequence[int]
    ) -> np.ndarray:
        """Aligned score of each pair (queries[query_index[p]], train[train_index[p]]).

        ``queries`` are full images (n, C, *spatial) or already at the working size.
        """
        q_small = self.small(queries)
        qi = np.asarray(query_index, dtype=np.int64)
        ti = np.asarray(train_index, dtype=np.int64)
        if qi.shape != ti.shape:
            raise InputError("query_index and train_index must have the same length.")
        out = np.empty(len(qi), dtype=np.float64)
        keep = 2**self.spatial_dims - 1
        order = np.argsort(qi, kind="stable")
        bounds = np.flatnonzero(np.r_[True, qi[order][1:] != qi[order][:-1], True])
        with torch.no_grad():
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                rows = order[a:b]
                win = self._windows(q_small[int(qi[rows[0]]), 0])  # (2^d, P, t^d)
                views = self._views[torch.from_numpy(ti[rows])]  # (k, 2^d, T, t^d)
                k = len(rows)
                best = torch.einsum("gpe,kgte->kgpt", win, views).reshape(k, win.shape[0], -1)
                tile_best = best.max(dim=-1).values  # (k, 2^d)
                top = tile_best.sort(dim=1, descending=True).values[:, :keep]
                out[rows] = top.mean(dim=1).double().numpy()
        return out


def _ranked(
    rows: np.ndarray, cand: np.ndarray, sc: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs sorted by row, then score descending, then lower candidate index; and each
    pair's rank within its row (0 = best)."""
    order = np.lexsort((cand, -sc, rows))
    rows, cand, sc = rows[order], cand[order], sc[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(n_rows))[rows]
    return rows, cand, sc, rank


def _rank_mean(
    rows: np.ndarray, sc: np.ndarray, rank: np.ndarray, n_rows: int, last: int
) -> np.ndarray:
    """Each row's mean score over its ranks 1 to ``last`` (its 2nd to (1 + last)-th best;
    0 for a row with none), from :func:`_ranked` pairs."""
    keep = (rank >= 1) & (rank <= last)
    total = np.bincount(rows[keep], weights=sc[keep], minlength=n_rows)
    count = np.bincount(rows[keep], minlength=n_rows)
    return np.divide(total, count, out=np.zeros(n_rows), where=count > 0)


class AlignedSearch:
    """``nearest`` over aligned scores for named sets of images (the audit's search).

    Candidates of each row come from the embeddings (and the pixels); each candidate pair
    is scored by the aligned NCC with the non-training image as the query, so a pair has
    one score whichever direction it is searched in. ``small`` holds each set's images at
    the scorer's working size (:meth:`AlignedScorer.small`), ``emb`` their embeddings; one
    set must be named ``train``, the scorer's training images.

    Every scored pair is cached, so a pair searched again (from the other side, or with a
    larger k) is not scored twice. ``ids`` names each set's rows (default: the set name and
    row number); searches that share ``cache`` and name their rows by the same ids reuse
    each other's scores (subsets of one pool, as in a benchmark); ``coarse_cache`` likewise
    holds the coarse search's scores of each query against every training image (searches
    that share it must share their training images).

    Example:
        >>> search = AlignedSearch(scorer, small, emb)  # doctest: +SKIP
        >>> scores, rows = search("synthetic", "train", 1)  # doctest: +SKIP
    """

    def __init__(
        self,
        scorer: AlignedScorer,
        small: dict[str, torch.Tensor],
        emb: dict[str, np.ndarray],
        *,
        ids: dict[str, Sequence[object]] | None = None,
        cache: dict[tuple[object, ...], float] | None = None,
        coarse_cache: dict[object, np.ndarray] | None = None,
        groups: Sequence[object] | None = None,
    ) -> None:
        self.scorer, self.small, self.emb = scorer, small, emb
        self.ids = ids
        n_tr = len(emb["train"])
        if groups is not None and len(groups) != n_tr:
            raise InputError(f"groups names {len(groups)} training images, but there are {n_tr}.")
        #: each training image's group (its patient; an image of unknown patient is its
        #: own group): the null leaves out pairs of one patient
        self.groups = None
        if groups is not None:
            named = [f"p:{g}" if g is not None else f"i:{i}" for i, g in enumerate(groups)]
            self.groups = np.unique(np.asarray(named), return_inverse=True)[1]
        self._null: dict[str, tuple[float, float]] | None = None
        self._pixel_background: dict[str, np.ndarray] = {}
        #: every scored pair's score, by (query id, training id), and its plain channel's
        #: by (query id, training id, "plain")
        self.cache: dict[tuple[object, ...], float] = {} if cache is None else cache
        #: each query's coarse scores against every training image, by the query's id
        self.coarse_cache: dict[object, np.ndarray] = {} if coarse_cache is None else coarse_cache
        self._background: dict[str, np.ndarray] = {}
        self._plain_background: dict[str, np.ndarray] = {}
        self._coarse_scorer: AlignedScorer | None = None
        self._plain_scorer: AlignedScorer | None = None
        self.n_pairs = 0
        cfg = scorer.config
        n_train = len(emb["train"])
        #: (training images) x (images of the other sets): the coarse search's size
        self.coarse_pairs = n_train * sum(len(e) for name, e in emb.items() if name != "train")
        #: whether the coarse search runs (for every set alike, or for none)
        self.coarse_used = cfg.coarse_candidates > 0 and self.coarse_pairs <= cfg.coarse_max_pairs
        #: whether the unaligned channel is used: asked for, and enough training images
        #: (``MIN_NULL``) to estimate its null
        self.unaligned_used = bool(cfg.unaligned) and n_train >= MIN_NULL
        #: whether the plain channel is used: asked for, a high-passed channel for it to
        #: differ from, and enough training images to estimate its null
        self.plain_used = bool(cfg.plain) and bool(cfg.highpass) and n_train >= MIN_NULL

    def _key(self, name: str, row: int) -> object:
        if self.ids is not None and name in self.ids:
            return self.ids[name][row]
        return (name, row)

    def _scores(
        self, q_set: str, q_rows: np.ndarray, t_rows: np.ndarray, plain: bool = False
    ) -> np.ndarray:
        """Aligned scores of pairs (q_set row, train row), or with ``plain`` their plain
        channel's, from the cache where known."""
        tag = ("plain",) if plain else ()
        keys = [
            (self._key(q_set, int(q)), self._key("train", int(t)), *tag)
            for q, t in zip(q_rows, t_rows, strict=True)
        ]
        out = np.array([self.cache.get(key, np.nan) for key in keys], dtype=np.float64)
        new = np.flatnonzero(np.isnan(out))
        if len(new):
            if plain:
                scorer = self._plain_scorer
                if scorer is None:
                    scorer = self._plain_scorer = AlignedScorer(
                        self.small["train"], self.scorer.config.plain_channel()
                    )
            else:
                scorer = self.scorer
            out[new] = scorer.score_pairs(self.small[q_set], q_rows[new], t_rows[new])
            if not plain:
                self.n_pairs += len(new)
            for j in new:
                self.cache[keys[j]] = float(out[j])
        return out

    def _coarse(self, q_set: str) -> np.ndarray:
        """(n_q, n_train) coarse aligned NCC of every row of ``q_set`` against every
        training image, from ``coarse_cache`` where known."""
        n_q, n_train = len(self.emb[q_set]), len(self.emb["train"])
        keys = [self._key(q_set, i) for i in range(n_q)]
        new = [i for i, key in enumerate(keys) if key not in self.coarse_cache]
        if new:
            if self._coarse_scorer is None:
                self._coarse_scorer = AlignedScorer(
                    self.small["train"], self.scorer.config.coarse()
                )
            rows = np.repeat(np.asarray(new, dtype=np.int64), n_train)
            cols = np.tile(np.arange(n_train, dtype=np.int64), len(new))
            sc = self._coarse_scorer.score_pairs(self.small[q_set], rows, cols)
            for i, row in zip(new, sc.reshape(len(new), n_train), strict=True):
                self.coarse_cache[keys[i]] = row.astype(np.float32)
        return np.stack([self.coarse_cache[key] for key in keys])

    def _coarse_candidates(self, a: str, b: str) -> np.ndarray | None:
        """(n_a, m) rows of ``b``: each row's best by the coarse search, ties to the lower
        index (None when the coarse search is off or over its budget)."""
        if not self.coarse_used:  # off (coarse_candidates=0) or over its budget
            return None
        sc = self._coarse(b).T if a == "train" else self._coarse(a)  # (n_a, n_b)
        m = min(self.scorer.config.coarse_candidates, sc.shape[1])
        return np.argsort(-sc, axis=1, kind="stable")[:, :m]

    def _pairs(
        self, a: str, b: str, k_emb: int, coarse: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pairs (row of ``a``, row of ``b``): each row's ``k_emb`` nearest by
        embedding and ``n_pixel_candidates`` nearest by pixels (with ``flips``, also by the
        pixels of the row mirrored along each axis), and its ``coarse_candidates`` best by
        the coarse search (unless ``coarse`` is False), without repeats."""
        cfg = self.scorer.config
        ea, eb = self.emb[a], self.emb[b]
        n_a, n_b = len(ea), len(eb)
        cols = [nearest(ea, eb, k=min(n_b, k_emb))[1]]
        if cfg.n_pixel_candidates > 0:
            k_pix = min(n_b, cfg.n_pixel_candidates)
            pb = self.small[b].flatten(1).numpy()
            views = [self.small[a]]
            if cfg.flips:  # a mirrored copy's source is found by the mirrored query's pixels
                d = self.scorer.spatial_dims
                views += [torch.flip(self.small[a], dims=[-1 - ax]) for ax in range(d)]
            for v in views:
                cols.append(nearest(v.flatten(1).numpy(), pb, k=k_pix)[1])
        best = self._coarse_candidates(a, b) if coarse else None
        if best is not None:
            cols.append(best)
        cand = np.concatenate(cols, axis=1)
        rows = np.repeat(np.arange(n_a), cand.shape[1])
        _, first = np.unique(rows * n_b + cand.ravel(), return_index=True)
        return rows[first], cand.ravel()[first]

    def background(self, q_set: str, plain: bool = False) -> np.ndarray:
        """Each row's background: the mean aligned NCC (with ``plain``, the plain channel's)
        of its 2nd to (1 + ``background_ranks``)-th best training candidates (0 with fewer
        than two), from a fixed candidate list so that it does not depend on the search's
        k."""
        store = self._plain_background if plain else self._background
        if q_set in store:
            return store[q_set]
        cfg = self.scorer.config
        n = len(self.emb[q_set])
        out = np.zeros(n, dtype=np.float64)
        if cfg.background:
            rows, cand = self._pairs(q_set, "train", cfg.n_candidates)
            sc = self._scores(q_set, rows, cand, plain=plain)
            rows, _, sc, rank = _ranked(rows, cand, sc, n)
            out = _rank_mean(rows, sc, rank, n, int(cfg.background_ranks))
        store[q_set] = out
        return out

    # ------------------------------------------------------- the unaligned channel
    def _pixel_scores(self, q_set: str, q_rows: np.ndarray, t_rows: np.ndarray) -> np.ndarray:
        """Pearson correlation of the pairs' images at the working size, unaligned."""
        q = _unit_rows(self.small[q_set][torch.from_numpy(q_rows)].flatten(1).float())
        t = _unit_rows(self.small["train"][torch.from_numpy(t_rows)].flatten(1).float())
        return (q * t).sum(1).double().numpy()

    def _pixel_top(self, q_set: str, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Each row's best ``1 + background_ranks + extra`` training images by the
        unaligned channel (exact, over every training image)."""
        cfg = self.scorer.config
        n_train = len(self.small["train"])
        k = min(n_train, 1 + int(cfg.background_ranks) + extra)
        q = self.small[q_set].flatten(1).numpy()
        return nearest(q, self.small["train"].flatten(1).numpy(), k=k)

    def pixel_background(self, q_set: str) -> np.ndarray:
        """Each row's background in the unaligned channel: the mean Pearson correlation of
        its 2nd to (1 + ``background_ranks``)-th best training images (of all of them)."""
        if q_set not in self._pixel_background:
            top, _ = self._pixel_top(q_set)
            out = top[:, 1:].mean(axis=1) if top.shape[1] > 1 else np.zeros(len(top))
            self._pixel_background[q_set] = out
        return self._pixel_background[q_set]

    def null(self) -> dict[str, tuple[float, float]] | None:
        """Median and scale (95th percentile minus median) of each channel's best score of
        every training image against the *other* training images (of other patients when
        ``groups`` is given): the null by which the plain and unaligned channels are mapped
        onto the aligned channel's scale. None when neither is used."""
        if not (self.plain_used or self.unaligned_used):
            return None
        if self._null is not None:
            return self._null
        cfg = self.scorer.config
        beta = float(cfg.background or 0.0)
        n = len(self.emb["train"])
        grp = self.groups if self.groups is not None else np.arange(n)
        r_bg = int(cfg.background_ranks)
        # the aligned and plain channels: the candidates of each training image among the
        # others, each channel ranked on its own
        rows0, cand0 = self._pairs("train", "train", cfg.n_candidates + 1, coarse=False)
        keep = grp[rows0] != grp[cand0]
        rows0, cand0 = rows0[keep], cand0[keep]
        nulls = {}
        for name in ("aligned", "plain") if self.plain_used else ("aligned",):
            sc = self._scores("train", rows0, cand0, plain=name == "plain")
            rows, _, sc, rank = _ranked(rows0, cand0, sc, n)
            best = np.full(n, np.nan)
            best[rows[rank == 0]] = sc[rank == 0]
            nulls[name] = (best - beta * _rank_mean(rows, sc, rank, n, r_bg))[~np.isnan(best)]
        if self.unaligned_used:  # exact over the other training images
            extra = 1 + int(np.bincount(grp).max())
            top, idx = self._pixel_top("train", extra=extra)
            pixel = []
            for i in range(n):
                vals = top[i][grp[idx[i]] != grp[i]][: 1 + r_bg]
                if len(vals):
                    bg_i = vals[1:].mean() if len(vals) > 1 else 0.0
                    pixel.append(vals[0] - beta * bg_i)
            nulls["unaligned"] = np.asarray(pixel)
        out = {}
        for name, v in nulls.items():
            med = float(np.median(v))
            out[name] = (med, max(float(np.quantile(v, 0.95)) - med, 1e-6))
        self._null = out
        return out

    def _combined(
        self, q_set: str, q_rows: np.ndarray, t_rows: np.ndarray, aligned: np.ndarray
    ) -> np.ndarray:
        """The pair scores: the aligned channel alone, or the largest of it and the plain
        and unaligned channels (those used) mapped onto its scale (each null's median and
        95th percentile matched to the aligned channel's), so that scores keep the aligned
        NCC's scale and a pair whose other scores are not unusual keeps its aligned score."""
        null = self.null()
        if null is None:
            return aligned
        beta = float(self.scorer.config.background or 0.0)
        m_a, s_a = null["aligned"]
        out = aligned
        if self.plain_used:
            plain = self._scores(q_set, q_rows, t_rows, plain=True)
            plain = plain - beta * self.background(q_set, plain=True)[q_rows]
            m_p, s_p = null["plain"]
            out = np.maximum(out, m_a + s_a * (plain - m_p) / s_p)
        if self.unaligned_used:
            pixel = self._pixel_scores(q_set, q_rows, t_rows)
            pixel = pixel - beta * self.pixel_background(q_set)[q_rows]
            m_u, s_u = null["unaligned"]
            out = np.maximum(out, m_a + s_a * (pixel - m_u) / s_u)
        return out

    def __call__(self, a: str, b: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        if (a == "train") == (b == "train"):
            raise InputError(
                f"an aligned search needs the set 'train' on one side, got {a!r}, {b!r}."
            )
        cfg = self.scorer.config
        n_a, n_b = len(self.emb[a]), len(self.emb[b])
        k = min(k, n_b)
        rows, cand = self._pairs(a, b, max(k, cfg.n_candidates))
        beta = float(cfg.background or 0.0)
        if a == "train":
            sc = self._scores(b, cand, rows)
            if beta:
                sc = sc - beta * self.background(b)[cand]
            sc = self._combined(b, cand, rows, sc)
        else:
            sc = self._scores(a, rows, cand)
            if beta:
                sc = sc - beta * self.background(a)[rows]
            sc = self._combined(a, rows, cand, sc)
        rows, cand, sc, rank = _ranked(rows, cand, sc, n_a)
        keep = rank < k
        top = np.full((n_a, k), -np.inf)
        idx = np.zeros((n_a, k), dtype=np.int64)
        top[rows[keep], rank[keep]] = sc[keep]
        idx[rows[keep], rank[keep]] = cand[keep]
        return top, idx


def stack_images(dataset: object, size: int) -> torch.Tensor:
    """Every image of a medmem dataset, channels averaged, resized to ``size`` per side:
    (n, 1, *size). Read one at a time, so memory is that of the small images only."""
    n = len(dataset)  # type: ignore[arg-type]
    out: list[torch.Tensor] = []
    for i in range(n):
        img = torch.as_tensor(dataset[i]).float()  # type: ignore[index]
        out.append(_resize(img.mean(0, keepdim=True)[None], size)[0])
    if not out:
        raise InputError("the dataset is empty: nothing to verify.")
    return torch.stack(out)


__all__ = [
    "SCORES",
    "AlignConfig",
    "AlignedScorer",
    "AlignedSearch",
    "alignment_matrices",
    "stack_images",
]
