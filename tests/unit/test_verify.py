"""Aligned verification (medmem.verify): changed copies score above unrelated images, in 2D
and 3D; the audit's aligned search is one score per pair, ranked like ``nearest``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medmem
from medmem import InputError
from medmem.data import ArrayDataset
from medmem.verify import AlignConfig, AlignedScorer, AlignedSearch, alignment_matrices


def smooth(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = torch.zeros(n, 1, *shape)
    for f in (4, 8):
        x = torch.rand(n, 1, *[max(2, s // f) for s in shape], generator=g)
        out += F.interpolate(x, size=shape, mode=mode, align_corners=False)
    return (out - out.amin()) / (out.amax() - out.amin())


def zero_shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """Shift by s pixels along every spatial axis, the uncovered border zero."""
    out = torch.zeros_like(x)
    src = (slice(None), slice(None), *[slice(0, n - s) for n in x.shape[2:]])
    dst = (slice(None), slice(None), *[slice(s, n) for n in x.shape[2:]])
    out[dst] = x[src]
    return out


def test_views_cover_flips_rotations_and_zooms() -> None:
    t2 = alignment_matrices(2, AlignConfig())
    assert t2.shape == (3 * 5 * 3, 2, 3)  # (none + 2 axis flips) x rotations x scales
    assert any(torch.allclose(m, torch.tensor([[1.0, 0, 0], [0, 1, 0]])) for m in t2)
    t3 = alignment_matrices(3, AlignConfig())
    assert t3.shape == (4 * 7 * 3, 3, 4)  # (none + 3 axis flips) x (0 + 2 per axis) x 3


@pytest.mark.parametrize("dims", [2, 3])
def test_changed_copies_outscore_unrelated_images(dims: int) -> None:
    shape = (64, 64) if dims == 2 else (32, 32, 32)
    train = smooth(8, shape, seed=1)
    other = smooth(8, shape, seed=2)
    scorer = AlignedScorer(train)
    idx = list(range(4))
    n = shape[0]
    changes = {
        "exact": train[:4],
        "flip": torch.flip(train[:4], dims=[-1]),
        "shift": zero_shift(train[:4], n // 12),
        "zoom": F.interpolate(
            train[(slice(0, 4), slice(None), *[slice(n // 10, n - n // 10)] * dims)],
            size=shape,
            mode="bilinear" if dims == 2 else "trilinear",
            align_corners=False,
        ),
        "contrast": train[:4] ** 1.5,
    }
    if dims == 2:
        patched = train[:4].clone()
        patched[..., 5:20, 40:58] = other[:4, :, 5:20, 40:58]
        changes["patch"] = patched
    unrelated = scorer.score_pairs(other[:4], idx, idx)
    assert unrelated.max() < 0.95
    for name, q in changes.items():
        s = scorer.score_pairs(q, idx, idx)
        assert s.min() > unrelated.max(), (name, s, unrelated)
    np.testing.assert_allclose(scorer.score_pairs(train[:4], idx, idx), 1.0, atol=1e-5)


def test_bad_settings_name_the_parameter() -> None:
    with pytest.raises(InputError, match="align.max_shift"):
        AlignConfig(max_shift=0.9).resolved(2)
    with pytest.raises(InputError, match="align.size"):
        AlignConfig(size=2).resolved(2)
    with pytest.raises(InputError, match="tensor"):
        AlignedScorer(np.zeros((3, 1, 8, 8)))  # type: ignore[arg-type]


def test_aligned_search_is_one_score_per_pair_ranked_like_nearest() -> None:
    train = smooth(10, (32, 32), seed=3)
    syn = torch.cat([torch.flip(train[:3], dims=[-1]), smooth(4, (32, 32), seed=4)])
    rng = np.random.default_rng(0)
    emb = {"train": rng.normal(size=(10, 6)), "synthetic": rng.normal(size=(7, 6))}
    scorer = AlignedScorer(train, AlignConfig(n_candidates=10))
    search = AlignedSearch(
        scorer, {"train": scorer.small(train), "synthetic": scorer.small(syn)}, emb
    )
    top, idx = search("synthetic", "train", 3)
    assert top.shape == idx.shape == (7, 3)
    assert (np.diff(top, axis=1) <= 0).all()
    np.testing.assert_array_equal(idx[:3, 0], [0, 1, 2])  # every training image a candidate
    n_scored = search.n_pairs
    search("synthetic", "train", 3)  # again: every pair from the cache
    assert search.n_pairs == n_scored
    back, back_idx = search("train", "synthetic", 1)
    # the same pair has the same score whichever direction it is searched in
    for t in range(3):
        assert back_idx[t, 0] == t
        assert back[t, 0] == pytest.approx(top[t, 0])


def test_audit_reports_the_score_and_catches_shifted_copies(pixel_detector) -> None:
    """Zero-padded shifted copies: the pixel 'detector' scores them like novel images, the
    aligned score calls them copies; summary.json says which score was used."""
    train = smooth(30, (32, 32), seed=5)
    val = smooth(30, (32, 32), seed=6)
    novel = smooth(10, (32, 32), seed=7)
    syn = torch.cat([zero_shift(train[:5], 3), novel])
    sets = [ArrayDataset(x[:, 0].numpy()) for x in (train, val, syn)]
    kw = {"detector": pixel_detector, "n_bootstrap": 0, "n_controls": 0, "quiet": True}
    aligned = medmem.audit(*sets, **kw)
    plain = medmem.audit(*sets, score="embedding", **kw)
    assert aligned.summary["score"]["method"] == "aligned"
    assert aligned.summary["score"]["n_pairs_scored"] > 0
    assert aligned.summary["score"]["background"] == 0.5
    assert aligned.summary["score"]["highpass"] == 2.0
    # the coarse search ran: 30 training x (30 validation + 15 synthetic) pairs, in budget
    assert aligned.summary["score"]["coarse_used"] is True
    assert aligned.summary["score"]["coarse_pairs"] == 30 * 45
    assert plain.summary["score"]["method"] == "embedding"
    flagged = aligned.synthetic["copy"].to_numpy()
    assert flagged[:5].all()
    assert plain.synthetic["copy"].to_numpy()[:5].sum() < 5
    assert aligned.training["memorized"].to_numpy()[:5].all()
    with pytest.raises(InputError, match="score"):
        medmem.audit(*sets, score="pixels", **kw)


def _search(background: float, n_candidates: int = 10, **kw: object) -> AlignedSearch:
    train = smooth(12, (32, 32), seed=8)
    syn = torch.cat([torch.flip(train[:3], dims=[-2]), smooth(5, (32, 32), seed=9)])
    rng = np.random.default_rng(1)
    emb = {"train": rng.normal(size=(12, 6)), "synthetic": rng.normal(size=(8, 6))}
    cfg = AlignConfig(n_candidates=n_candidates, background=background, **kw)  # type: ignore[arg-type]
    scorer = AlignedScorer(train, cfg)
    return AlignedSearch(
        scorer, {"train": scorer.small(train), "synthetic": scorer.small(syn)}, emb
    )


def test_background_is_the_mean_of_ranks_two_to_five_and_is_subtracted() -> None:
    """score = aligned NCC - beta * mean of the query's 2nd..5th best candidates, against a
    direct computation from the raw aligned scores of every pair."""
    raw, raw_idx = _search(0.0, n_candidates=12)("synthetic", "train", 12)  # every pair
    expected_bg = raw[:, 1:5].mean(axis=1)
    search = _search(0.5, n_candidates=12)
    np.testing.assert_allclose(search.background("synthetic"), expected_bg, atol=1e-9)
    top, idx = search("synthetic", "train", 3)
    np.testing.assert_array_equal(idx, raw_idx[:, :3])  # a per-query constant: same ranking
    np.testing.assert_allclose(top, raw[:, :3] - 0.5 * expected_bg[:, None], atol=1e-9)
    # from the training side, a pair keeps the synthetic image's background
    back, back_idx = search("train", "synthetic", 1)
    for t in range(3):
        assert back_idx[t, 0] == t
        assert back[t, 0] == pytest.approx(top[t, 0])
    # the copies stand out from their background; novel images do not
    assert top[:3, 0].min() > top[3:, 0].max()


def test_mirrored_query_pixels_find_a_flipped_copys_source() -> None:
    """With random embeddings and one embedding candidate, the pixels of the mirrored query
    still bring an up-down flipped copy's source into the candidates."""
    search = _search(0.0, n_candidates=1, n_pixel_candidates=1)
    _, idx = search("synthetic", "train", 1)
    np.testing.assert_array_equal(idx[:3, 0], [0, 1, 2])
    plain = _search(0.0, n_candidates=1, n_pixel_candidates=1, flips=False)
    _, idx_plain = plain("synthetic", "train", 1)
    assert (idx_plain[:3, 0] != [0, 1, 2]).any()  # without mirrors the flipped copies are lost


def test_highpass_channel_keeps_exact_copies_at_one() -> None:
    train = smooth(4, (64, 64), seed=10)
    for hp in (0.0, 2.0):
        scorer = AlignedScorer(train, AlignConfig(highpass=hp))
        np.testing.assert_allclose(scorer.score_pairs(train, range(4), range(4)), 1.0, atol=1e-5)
    with pytest.raises(InputError, match="align.highpass"):
        AlignConfig(highpass=-1.0).resolved(2)
    with pytest.raises(InputError, match="align.background"):
        AlignConfig(background=2.0).resolved(2)


def _shift_search(**kw: object) -> AlignedSearch:
    """40 smooth training images; queries: 4 of them shifted by 12% without wrap-around,
    then 4 novel images; random embeddings, one embedding candidate, no pixel candidates."""
    train = smooth(40, (64, 64), seed=21)
    syn = torch.cat([zero_shift(train[:4], 8), smooth(4, (64, 64), seed=22)])
    rng = np.random.default_rng(3)
    emb = {"train": rng.normal(size=(40, 6)), "synthetic": rng.normal(size=(8, 6))}
    cfg = AlignConfig(n_candidates=1, n_pixel_candidates=0, background=0.0, **kw)  # type: ignore[arg-type]
    scorer = AlignedScorer(train, cfg)
    small = {"train": scorer.small(train), "synthetic": scorer.small(syn)}
    return AlignedSearch(scorer, small, emb)


def test_coarse_search_finds_a_shifted_copys_source() -> None:
    """With random embeddings and no pixel candidates, the coarse search over every pair
    still brings each shifted copy's source into the candidates (from either side); off, the
    sources are lost."""
    search = _shift_search()
    assert search.coarse_used and search.coarse_pairs == 40 * 8
    top, idx = search("synthetic", "train", 1)
    np.testing.assert_array_equal(idx[:4, 0], [0, 1, 2, 3])
    assert top[:4, 0].min() > top[4:, 0].max()
    _, back = search("train", "synthetic", 1)
    np.testing.assert_array_equal(back[:4, 0], [0, 1, 2, 3])
    _, off = _shift_search(coarse_candidates=0)("synthetic", "train", 1)
    assert (off[:4, 0] != [0, 1, 2, 3]).sum() >= 3  # a random candidate is rarely the source


def test_coarse_search_is_skipped_for_every_set_above_its_budget() -> None:
    """Above coarse_max_pairs the coarse search runs for no set (validation and synthetic
    images keep the same form of score), and the audit's summary says so."""
    over = _shift_search(coarse_max_pairs=319)
    assert not over.coarse_used
    _, idx = over("synthetic", "train", 1)
    assert not over.coarse_cache
    two, three = AlignConfig().resolved(2), AlignConfig().resolved(3)
    assert (two.coarse_size, two.coarse_highpass, two.coarse_max_pairs) == (24, 0.0, 2_000_000)
    assert (three.coarse_size, three.coarse_highpass, three.coarse_max_pairs) == (16, 1.0, 50_000)
    with pytest.raises(InputError, match="align.coarse_candidates"):
        AlignConfig(coarse_candidates=-1).resolved(2)
    with pytest.raises(InputError, match="align.coarse_max_shift"):
        AlignConfig(coarse_max_shift=0.9).resolved(2)


def down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Area down-sampling by ``factor`` and trilinear (bilinear) back up: detail gone."""
    shape = tuple(x.shape[2:])
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    low = F.interpolate(x, size=tuple(s // factor for s in shape), mode="area")
    return F.interpolate(low, size=shape, mode=mode, align_corners=False)


def _unaligned_search(
    n_train: int = 16, groups: list | None = None, shift: int = 0, **kw: object
) -> tuple[AlignedSearch, torch.Tensor]:
    """3D: queries 0-3 down-sampled copies of training images 0-3 (moved by ``shift``
    voxels along every axis), 4-7 novel volumes."""
    train = smooth(n_train, (32, 32, 32), seed=31)
    if groups is not None:  # training image 1 a second image of image 0's patient
        train[1] = train[0]
    copies = down_up(train[:4], 6)
    copies = zero_shift(copies, shift) if shift else copies
    syn = torch.cat([copies, smooth(4, (32, 32, 32), seed=32)])
    rng = np.random.default_rng(5)
    emb = {"train": rng.normal(size=(n_train, 6)), "synthetic": rng.normal(size=(8, 6))}
    scorer = AlignedScorer(train, AlignConfig(**kw))  # type: ignore[arg-type]
    small = {"train": scorer.small(train), "synthetic": scorer.small(syn)}
    return AlignedSearch(scorer, small, emb, groups=groups), syn


def _channel_top(
    search: AlignedSearch, channel: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Each query's best score and training row, that score in units of the aligned null's
    scale (1: its 95th percentile), and the nulls, which must be the aligned channel's and
    ``channel``'s; the four copies' sources found."""
    null = search.null()
    assert null is not None and set(null) == {"aligned", channel}
    top, idx = search("synthetic", "train", 1)
    np.testing.assert_array_equal(idx[:4, 0], [0, 1, 2, 3])
    m_a, s_a = null["aligned"]
    return top, idx, (top[:, 0] - m_a) / s_a, null


def test_unaligned_channel_is_the_larger_standardized_channel() -> None:
    """With ``unaligned`` (the 3D default before ``plain``), a pair's score is the larger of
    the aligned channel and the unaligned one mapped onto its scale by the training set's
    null; a down-sampled copy is far above that null's 95th percentile, novel volumes are
    not."""
    assert AlignConfig().resolved(3).unaligned is False
    assert AlignConfig().resolved(2).unaligned is False
    search, syn = _unaligned_search(unaligned=True, plain=False)
    assert search.unaligned_used
    top, idx, z, null = _channel_top(search, "unaligned")
    (m_a, s_a), (m_p, s_p) = null["aligned"], null["unaligned"]
    assert z[:4].min() > 4.0 * max(z[4:].max(), 1.0)
    # by hand: the aligned channel alone (same candidates), and the plain Pearson correlation
    alone, _ = _unaligned_search(plain=False)
    assert not alone.unaligned_used and not alone.plain_used and alone.null() is None
    al_top, al_idx = alone("synthetic", "train", 16)
    rows = np.arange(8)
    aligned = al_top[rows, np.argmax(al_idx == idx[:, :1], axis=1)]
    small = search.small
    q = small["synthetic"].flatten(1)
    t = small["train"].flatten(1)
    corr = np.corrcoef(torch.cat([q, t]).double().numpy())[:8, 8:]
    srt = -np.sort(-corr, axis=1)
    pixel = corr[rows, idx[:, 0]] - 0.5 * srt[:, 1:5].mean(axis=1)
    expected = np.maximum(aligned, m_a + s_a * (pixel - m_p) / s_p)
    np.testing.assert_allclose(top[:, 0], expected, atol=1e-6)
    # the aligned channel alone separates the down-sampled copies by far less
    al_best = al_top[:, 0]
    assert top[:4, 0].min() - top[4:, 0].max() > 3.0 * (al_best[:4].min() - al_best[4:].max())
    # from the training side a pair has the same score
    back, back_idx = search("train", "synthetic", 1)
    for t_row in range(4):
        assert back_idx[t_row, 0] == t_row
        assert back[t_row, 0] == pytest.approx(top[t_row, 0])


def test_unaligned_null_leaves_out_the_same_patient_and_needs_ten_images() -> None:
    """Two images of one patient would be each other's perfect match in the null (a
    larger scale); grouped, they are not compared. Below MIN_NULL training images the
    aligned channel is used alone."""
    both = {"unaligned": True, "plain": True}
    ungrouped, _ = _unaligned_search(groups=None, **both)
    same = [None] * 16
    grouped, _ = _unaligned_search(groups=["a", "a", *same[2:]], **both)
    duplicated, _ = _unaligned_search(groups=[None] * 16, **both)  # patients unknown
    null_g, null_d = grouped.null(), duplicated.null()
    assert null_g is not None and null_d is not None and ungrouped.null() is not None
    assert set(null_g) == {"aligned", "plain", "unaligned"}
    for channel in ("plain", "unaligned"):
        assert null_d[channel][1] > null_g[channel][1]
    with pytest.raises(InputError, match="groups names 3 training images"):
        _unaligned_search(groups=["a", "b", "c"])
    few, _ = _unaligned_search(n_train=8, **both)
    assert not few.unaligned_used and not few.plain_used and few.null() is None


def test_plain_channel_is_the_images_aligned_ncc() -> None:
    """The plain channel's pair scores are the aligned NCC of the images alone (no
    high-passed copy), with the training views made at the working size, and are cached
    beside the aligned channel's (so that searches sharing a cache share both)."""
    search, _ = _unaligned_search(shift=2)
    cfg = search.scorer.config
    plain_cfg = cfg.plain_channel()
    assert plain_cfg.highpass == 0.0 and plain_cfg.rotations == cfg.rotations
    assert plain_cfg.scales == cfg.scales and plain_cfg.size == cfg.size
    rows, cols = np.repeat(np.arange(8), 3), np.tile(np.arange(3), 8)
    got = search._scores("synthetic", rows, cols, plain=True)
    by_hand = AlignedScorer(search.small["train"], plain_cfg).score_pairs(
        search.small["synthetic"], rows, cols
    )
    np.testing.assert_allclose(got, by_hand)
    aligned = search._scores("synthetic", rows, cols)
    assert not np.allclose(got, aligned)
    assert len(search.cache) == 48 and sum(len(key) == 3 for key in search.cache) == 24
    assert search.n_pairs == 24  # pairs of the aligned score; the plain channel's apart


def test_plain_channel_is_the_larger_standardized_channel() -> None:
    """The 3D default: a pair's score is the larger of the aligned channel and the plain
    one mapped onto its scale by the training set's null. Down-sampled copies that were also
    moved are called far above the null's 95th percentile, novel volumes are not. (That the
    plain channel catches such copies where the others do not is measured on real brains:
    docs/results/detection-3d.md, down-up and compound.)"""
    assert AlignConfig().resolved(3).plain is True
    assert AlignConfig().resolved(2).plain is False
    search, _ = _unaligned_search(shift=2)
    assert search.plain_used and not search.unaligned_used
    top, idx, z, null = _channel_top(search, "plain")
    (m_a, s_a), (m_p, s_p) = null["aligned"], null["plain"]
    assert z[:4].min() > 2.0 * max(z[4:].max(), 1.0)
    # by hand: the larger of the aligned score and the plain one on the aligned scale
    alone, _ = _unaligned_search(shift=2, plain=False)
    al_top, al_idx = alone("synthetic", "train", 16)
    rows = np.arange(8)
    aligned = al_top[rows, np.argmax(al_idx == idx[:, :1], axis=1)]
    pl = search._scores("synthetic", rows, idx[:, 0], plain=True)
    pl = pl - 0.5 * search.background("synthetic", plain=True)
    np.testing.assert_allclose(top[:, 0], np.maximum(aligned, m_a + s_a * (pl - m_p) / s_p))
    assert (top[:, 0] > aligned).any()  # the plain channel decided some pairs
    # from the training side a pair has the same score
    back, back_idx = search("train", "synthetic", 1)
    for t_row in range(4):
        assert back_idx[t_row, 0] == t_row
        assert back[t_row, 0] == pytest.approx(top[t_row, 0])


def test_audit_3d_summary_names_the_plain_channel(pixel_detector) -> None:
    """A 3D audit's summary says the plain channel ran, with its null; down-sampled
    copies are called copies, novel volumes not."""
    train = smooth(20, (32, 32, 32), seed=41)
    val = smooth(20, (32, 32, 32), seed=42)
    syn = torch.cat([down_up(train[:4], 6), smooth(6, (32, 32, 32), seed=43)])
    sets = [ArrayDataset(x[:, 0].numpy()) for x in (train, val, syn)]
    kw = {"detector": pixel_detector, "n_bootstrap": 0, "n_controls": 0, "quiet": True}
    result = medmem.audit(*sets, **kw)
    score = result.summary["score"]
    assert score["plain"] is True and score["plain_used"] is True
    assert score["unaligned"] is False and score["unaligned_used"] is False
    assert set(score["null"]) == {"aligned", "plain"}
    assert score["null"]["plain"]["scale"] > 0
    flagged = result.synthetic["copy"].to_numpy()
    assert flagged[:4].all() and not flagged[4:].any()
