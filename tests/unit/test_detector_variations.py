"""Variations: shape, range, reproducibility, bounds and effect of each kind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medmem import InputError
from medmem.detector import (
    CONTROL_VARIATION_KINDS,
    DEFAULT_VARIATION_KINDS,
    MANY_KINDS_PROB,
    PAPER_VARIATION_KINDS,
    VARIATION_KINDS,
    VariationConfig,
    apply_variation,
    needs_partner,
    sample_variation,
    vary,
)


def _image(spatial_dims: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1,) + (size,) * spatial_dims, generator=g)


def _blob(spatial_dims: int, size: int, centre: tuple[float, ...], sigma: float = 1.5):
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * spatial_dims, indexing="ij")
    d2 = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
    return torch.exp(-d2 / (2 * sigma**2)).float()[None]


def _centre_of_mass(x: torch.Tensor) -> np.ndarray:
    x = x[0].double()
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in x.shape], indexing="ij")
    return np.array([float((g * x).sum() / x.sum()) for g in grids])


def _smooth(spatial_dims: int, size: int = 32, seed: int = 0, sigma: float = 2.0):
    """A smooth random image around 0.5 (no clipping), for effects that noise would hide."""
    from medmem.detector._variations import _gaussian_blur

    x = _gaussian_blur(_image(spatial_dims, size, seed), sigma)
    return (0.5 + (x - x.mean()) * (0.25 / x.std())).clamp(0.0, 1.0)


def _second_moment(x: torch.Tensor) -> float:
    """Mean squared distance from the centre of mass (pixels^2): the blob's spread."""
    com = _centre_of_mass(x)
    x = x[0].double()
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in x.shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, com, strict=True))
    return float((d2 * x).sum() / x.sum())


def _high_freq_energy(x: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels along every spatial axis."""
    return float(sum((torch.diff(x, dim=a) ** 2).mean() for a in range(1, x.ndim)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", VARIATION_KINDS)
def test_each_kind_keeps_shape_and_range(spatial_dims, kind):
    img = _image(spatial_dims, 16)
    partner = _image(spatial_dims, 16, seed=1)
    changed = False
    for seed in range(3):
        out = vary(img, seed, kinds=(kind,), partner=partner)
        assert out.shape == img.shape
        assert out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        changed |= not torch.equal(out, img)
    assert changed  # every kind does something


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_all_kinds_together_keep_shape_and_range(spatial_dims):
    img = _image(spatial_dims, 16)
    partner = _image(spatial_dims, 16, seed=1)
    settings = VariationConfig(kinds=VARIATION_KINDS, kind_prob=1.0)
    params = sample_variation(spatial_dims, 5, settings)
    out = apply_variation(img, params, partner=partner)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert json.loads(json.dumps(params)) == params  # JSON-able, and survives the trip


def test_paper_default_and_control_kinds():
    assert PAPER_VARIATION_KINDS == ("flip", "rotate", "contrast")
    assert set(CONTROL_VARIATION_KINDS) == {"elastic", "sharpen", "patch"}
    assert not set(DEFAULT_VARIATION_KINDS) & set(CONTROL_VARIATION_KINDS)
    assert DEFAULT_VARIATION_KINDS == tuple(
        k for k in VARIATION_KINDS if k not in CONTROL_VARIATION_KINDS
    )
    default = VariationConfig()
    assert default.kinds == DEFAULT_VARIATION_KINDS and default.kind_prob == MANY_KINDS_PROB
    paper = VariationConfig.paper()
    assert paper.kinds == PAPER_VARIATION_KINDS and paper.kind_prob == 1.0
    assert sorted(sample_variation(2, 0, paper)) == ["contrast", "flip", "rotate"]
    assert len(sample_variation(3, 0, paper)["rotate"]) == 3  # about every axis in 3D


def test_paper_kinds_draw_as_before():
    # Values recorded before the library grew: the paper's seeds must still reproduce.
    p = sample_variation(2, 0, VariationConfig.paper())
    g = np.random.default_rng(0)
    flips = [a for a, u in enumerate(g.random(2)) if u < 0.5]
    angle = g.uniform(-5.0, 5.0, 1).tolist()
    gamma = float(g.uniform(0.7, 1.5))
    assert p == {"flip": flips, "rotate": angle, "contrast": gamma}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_seed_same_variation_other_seed_differs(spatial_dims):
    img = _image(spatial_dims, 16)
    partner = _image(spatial_dims, 16, seed=1)
    a = vary(img, 11, kinds=VARIATION_KINDS, partner=partner)
    b = vary(img, 11, kinds=VARIATION_KINDS, partner=partner)
    c = vary(img, 12, kinds=VARIATION_KINDS, partner=partner)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert torch.equal(vary(img, rng1, partner=partner), vary(img, rng2, partner=partner))


def test_parameters_do_not_depend_on_kind_order():
    a = sample_variation(2, 4, kinds=("rotate", "flip"))
    b = sample_variation(2, 4, kinds=("flip", "rotate"))
    assert a == b
    kinds = ("jpeg", "zoom", "blend", "curve", "shift")
    assert sample_variation(3, 4, kinds=kinds) == sample_variation(3, 4, kinds=kinds[::-1])


def test_numpy_in_numpy_out():
    img = _image(2).numpy()
    out = vary(img, 1, partner=_image(2, seed=1).numpy())
    assert isinstance(out, np.ndarray) and out.shape == img.shape and out.dtype == np.float32


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rotation_parameters_are_bounded(spatial_dims):
    settings = VariationConfig(kinds=("rotate",), max_rotation=5.0)
    angles = np.concatenate(
        [sample_variation(spatial_dims, s, settings)["rotate"] for s in range(200)]
    )
    assert np.abs(angles).max() <= 5.0
    assert np.abs(angles).max() > 4.0  # the range is used


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rotation_moves_a_point_by_at_most_the_angle(spatial_dims):
    size, r = 33, 10.0
    centre = [16.0] * spatial_dims
    centre[-1] += r  # a blob r pixels from the image centre
    blob = _blob(spatial_dims, size, tuple(centre))
    before = _centre_of_mass(blob)
    bound = 2 * r * math.sin(math.radians(5.0) * (1 if spatial_dims == 2 else math.sqrt(3)) / 2)
    moved = []
    for seed in range(10):
        out = vary(blob, seed, kinds=("rotate",))
        moved.append(np.linalg.norm(_centre_of_mass(out) - before))
    assert max(moved) <= bound + 0.25
    assert max(moved) > 0.2  # it does rotate


def test_rotation_turns_a_non_square_image_correctly():
    # 90 degrees on a (20, 40) image maps the blob at +8 pixels along the last axis to
    # +-8 pixels along the first axis (pixel units, not normalised coordinates).
    blob = _blob(2, 40, (20.0, 28.0))[:, 10:30, :]  # centre (10, 28) in a (20, 40) image
    out = apply_variation(blob, {"rotate": [90.0]})
    com = _centre_of_mass(out)
    assert abs(abs(com[0] - 9.5) - 8.5) < 0.6 and abs(com[1] - 19.5) < 0.6


def test_flip_contrast_brightness_do_what_they_say():
    img = _image(2)
    assert torch.equal(apply_variation(img, {"flip": [1]}), torch.flip(img, dims=[2]))
    assert torch.equal(apply_variation(img, {"flip": [0, 1]}), torch.flip(img, dims=[1, 2]))
    torch.testing.assert_close(apply_variation(img, {"contrast": 1.3}), img**1.3)
    torch.testing.assert_close(apply_variation(img, {"brightness": 0.1}), (img + 0.1).clamp(0, 1))
    gammas = [sample_variation(2, s, kinds=("contrast",))["contrast"] for s in range(100)]
    assert 0.7 <= min(gammas) and max(gammas) <= 1.5


def test_blur_keeps_a_constant_image_and_smooths_noise():
    const = torch.full((1, 16, 16), 0.4)
    torch.testing.assert_close(apply_variation(const, {"blur": 1.0}), const)
    img = _image(2)
    assert apply_variation(img, {"blur": 1.0}).std() < img.std()


def test_shift_moves_content():
    blob = _blob(2, 32, (16.0, 16.0))
    out = apply_variation(blob, {"shift_fraction": [0.0, 0.125]})  # 4 pixels along W
    com = _centre_of_mass(out)
    assert abs(com[1] - 20.0) < 0.3 and abs(com[0] - 16.0) < 0.3


def test_flip_axes_restrict_flips():
    settings = VariationConfig(kinds=("flip",), flip_prob=1.0, flip_axes=(1,))
    assert sample_variation(2, 0, settings)["flip"] == [1]


def test_bad_kind_and_bad_image_fail_clearly():
    with pytest.raises(InputError, match="Did you mean 'rotate'"):
        vary(_image(2), 0, kinds=("rotation",))
    with pytest.raises(InputError, match=r"\(C, H, W\) or \(C, D, H, W\)"):
        vary(torch.rand(16, 16), 0)
    with pytest.raises(InputError, match="gamma_range"):
        VariationConfig(gamma_range=(1.5, 0.7))
    with pytest.raises(InputError, match="list of names"):
        VariationConfig(kinds="flip")


# --- the kinds added for realistic copies -------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blend_is_the_weighted_mean_with_the_partner(spatial_dims):
    img, partner = _image(spatial_dims, 12), _image(spatial_dims, 12, seed=1)
    out = apply_variation(img, {"blend": 0.2}, partner=partner)
    torch.testing.assert_close(out, 0.8 * img + 0.2 * partner, rtol=0, atol=1e-6)
    weights = [sample_variation(2, s, kinds=("blend",))["blend"] for s in range(100)]
    assert 0.05 <= min(weights) and max(weights) <= 0.3


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_replaces_only_a_box_with_the_partners(spatial_dims):
    img, partner = _image(spatial_dims, 20), _image(spatial_dims, 20, seed=1)
    fills = set()
    for seed in range(20):
        params = sample_variation(spatial_dims, seed, kinds=("patch",))
        patch = params["patch"]
        fills.add(patch["fill"])
        out = apply_variation(img, params, partner=partner)
        changed = out != img
        idx = changed[0].nonzero()
        box = tuple(
            slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0)[0], idx.max(0)[0], strict=True)
        )
        assert changed[(0, *box)].all()  # the changed pixels fill a box exactly
        sides = np.array([b.stop - b.start for b in box]) / 20
        assert np.all(sides >= 0.15 - 0.05) and np.all(sides <= 0.4 + 0.05)
        if patch["fill"] == "partner":
            assert torch.equal(out[(0, *box)], partner[(0, *box)])
        else:
            assert torch.all(out[(0, *box)] == torch.tensor(patch["value"]))
            assert not needs_partner(params)
            assert torch.equal(apply_variation(img, params), out)  # no partner needed
    assert fills == {"partner", "constant"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_zoom_in_enlarges_and_zoom_out_shrinks_a_centred_blob(spatial_dims):
    size = 33 if spatial_dims == 2 else 25
    blob = _blob(spatial_dims, size, (size // 2,) * spatial_dims, sigma=3.0)
    spread = _second_moment(blob)
    offset = [0.0] * spatial_dims
    bigger = apply_variation(blob, {"zoom": {"scale": 1.2, "offset": offset}})
    smaller = apply_variation(blob, {"zoom": {"scale": 0.8, "offset": offset}})
    # The spread scales with scale**2 (to within interpolation error).
    assert _second_moment(bigger) == pytest.approx(1.44 * spread, rel=0.08)
    assert _second_moment(smaller) == pytest.approx(0.64 * spread, rel=0.08)
    ones = torch.ones((1,) + (size,) * spatial_dims)
    out = apply_variation(ones, {"zoom": {"scale": 0.8, "offset": offset}})
    assert float(out[(0,) + (0,) * spatial_dims]) == 0.0  # uncovered border is 0
    assert float(out[(0,) + (size // 2,) * spatial_dims]) == 1.0
    scales = [sample_variation(spatial_dims, s, kinds=("zoom",))["zoom"] for s in range(200)]
    assert 0.8 <= min(z["scale"] for z in scales) and max(z["scale"] for z in scales) <= 1.25
    assert max(abs(o) for z in scales for o in z["offset"]) <= 0.05


def test_zoom_about_an_offset_centre_keeps_that_point():
    blob = _blob(2, 40, (28.0, 20.0))  # a blob at the zoom centre: +8 px along axis 0
    out = apply_variation(blob, {"zoom": {"scale": 1.25, "offset": [0.2, 0.0]}})
    assert np.abs(_centre_of_mass(out) - [28.0, 20.0]).max() < 0.3
    assert _second_moment(out) > 1.3 * _second_moment(blob)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shift_pads_with_zeros_or_the_edge(spatial_dims):
    ones = torch.ones((1,) + (16,) * spatial_dims)
    shift = [0.0] * (spatial_dims - 1) + [0.25]  # 4 pixels along the last axis
    zeros = apply_variation(ones, {"shift_fraction": shift, "pad": "zeros"})
    assert torch.all(zeros[..., :4] == 0) and torch.all(zeros[..., 4:] == 1)
    border = apply_variation(ones, {"shift_fraction": shift, "pad": "border"})
    assert torch.equal(border, ones)
    assert torch.equal(apply_variation(ones, {"shift_fraction": shift}), ones)  # old params
    drawn = [sample_variation(spatial_dims, s, kinds=("shift",)) for s in range(200)]
    pads = [p["pad"] for p in drawn]
    assert 60 < pads.count("zeros") < 140 and set(pads) == {"zeros", "border"}
    largest = max(abs(t) for p in drawn for t in p["shift_fraction"])
    assert 0.09 < largest <= 0.1  # default: up to 10% of the side


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_elastic_keeps_a_constant_and_bends_a_smooth_image(spatial_dims):
    params = sample_variation(spatial_dims, 0, kinds=("elastic",))
    assert set(params["elastic"]) == {"std", "grid", "seed"}
    const = torch.full((1,) + (16,) * spatial_dims, 0.4)
    torch.testing.assert_close(apply_variation(const, params), const)
    img = _smooth(spatial_dims, 32 if spatial_dims == 2 else 16)
    out = apply_variation(img, params)
    corr = np.corrcoef(img.flatten().numpy(), out.flatten().numpy())[0, 1]
    assert 0.9 < corr < 0.9999
    stronger = {"elastic": {**params["elastic"], "std": 0.06}}
    corr_strong = np.corrcoef(img.flatten(), apply_variation(img, stronger).flatten())[0, 1]
    assert corr_strong < corr  # the magnitude is what it says


def test_geometry_is_one_resampling():
    # Rotation, zoom, shift and elastic deformation share one grid_sample: composing them
    # equals applying them together, not one after another (which would blur twice).
    img = _smooth(2, 32)
    params = sample_variation(
        2, 1, VariationConfig(kinds=("rotate", "zoom", "elastic"), kind_prob=1)
    )
    together = apply_variation(img, params)
    apart = apply_variation(
        apply_variation(img, {"rotate": params["rotate"]}), {"elastic": params["elastic"]}
    )
    assert not torch.allclose(together, apart)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_equalize_flattens_the_histogram(spatial_dims):
    size = 64 if spatial_dims == 2 else 24
    # A triangular distribution on [0, 0.5]: crowded, and peaked at 0.25.
    img = 0.25 * (_image(spatial_dims, size) + _image(spatial_dims, size, seed=1))
    before = np.histogram(img.numpy(), bins=10, range=(0.0, 1.0))[0] / img.numel()
    assert before[5:].sum() == 0 and before[2] > 0.3
    out = apply_variation(img, {"equalize": 1.0})
    hist = np.histogram(out.numpy(), bins=10, range=(0.0, 1.0))[0] / out.numel()
    assert np.abs(hist - 0.1).max() < 0.015
    half = apply_variation(img, {"equalize": 0.5})
    torch.testing.assert_close(half, 0.5 * img + 0.5 * out, rtol=0, atol=1e-6)
    # monotone: the order of intensities is kept
    order = torch.argsort(img.flatten())
    assert torch.all(torch.diff(out.flatten()[order]) >= -1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sharpen_adds_and_downsample_removes_high_frequencies(spatial_dims):
    img = _smooth(spatial_dims, 32 if spatial_dims == 2 else 16, sigma=1.0)
    energy = _high_freq_energy(img)
    sharp = apply_variation(img, {"sharpen": {"amount": 1.0, "sigma": 1.0}})
    assert _high_freq_energy(sharp) > 1.5 * energy
    low = apply_variation(img, {"downsample": 3.0})
    assert _high_freq_energy(low) < 0.7 * energy
    const = torch.full(img.shape, 0.3)
    torch.testing.assert_close(apply_variation(const, {"downsample": 2.5}), const)
    torch.testing.assert_close(
        apply_variation(const, {"sharpen": {"amount": 2.0, "sigma": 1.5}}), const
    )


def test_jpeg_loses_a_little_and_works_slice_by_slice_in_3d():
    img = _smooth(2, 40)
    low = apply_variation(img, {"jpeg": 10})
    high = apply_variation(img, {"jpeg": 80})
    err_low, err_high = float((low - img).abs().mean()), float((high - img).abs().mean())
    assert 0.001 < err_low < 0.1 and err_high < err_low
    vol = _smooth(3, 20)  # 20 rows: not a multiple of JPEG's 8x8 blocks
    out = apply_variation(vol, {"jpeg": 20})
    assert out.shape == vol.shape and not torch.equal(out, vol)
    for d in (0, 7, 19):  # each slice is compressed on its own
        assert torch.equal(out[:, d], apply_variation(vol[:, d], {"jpeg": 20}))
    qualities = [sample_variation(3, s, kinds=("jpeg",))["jpeg"] for s in range(300)]
    assert min(qualities) == 10 and max(qualities) == 80
    assert all(isinstance(q, int) for q in qualities)


def test_curve_is_monotone_and_close_to_the_identity():
    ramp = torch.linspace(0.0, 1.0, 1001).reshape(1, 1, 1001)
    for seed in range(20):
        params = sample_variation(2, seed, kinds=("curve",))
        knots = np.array(params["curve"])
        assert len(knots) == 5 and np.all(np.diff(knots) >= 0)
        assert np.abs(knots - np.arange(1, 6) / 6).max() <= 0.1 + 1e-12
        out = apply_variation(ramp, params)[0, 0]
        assert torch.all(torch.diff(out) >= 0)  # sorted inputs stay sorted
        assert float(out[0]) == 0.0 and float(out[-1]) == pytest.approx(1.0)
        assert float((out - ramp[0, 0]).abs().max()) <= 0.1 + 1e-6
        at_knots = torch.arange(1, 6, dtype=torch.float32).reshape(1, 1, 5) / 6
        np.testing.assert_allclose(apply_variation(at_knots, params)[0, 0], knots, atol=1e-6)


# --- inclusion, partners, presets, configuration -----------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_kind_prob_zero_is_the_identity_and_one_applies_all(spatial_dims):
    img = _image(spatial_dims, 12)
    none = VariationConfig(kinds=VARIATION_KINDS, kind_prob=0.0)
    for seed in range(3):
        assert sample_variation(spatial_dims, seed, none) == {}
        assert torch.equal(vary(img, seed, settings=none), img)
    every = VariationConfig(kinds=VARIATION_KINDS, kind_prob=1.0)
    params = sample_variation(spatial_dims, 0, every)
    keys = {"shift_fraction" if k == "shift" else k for k in VARIATION_KINDS} | {"pad"}
    assert set(params) == keys


def test_included_kinds_keep_the_parameters_they_would_have_had():
    full = VariationConfig(kinds=VARIATION_KINDS, kind_prob=1.0)
    half = VariationConfig(kinds=VARIATION_KINDS, kind_prob=0.5)
    sizes = []
    for seed in range(50):
        a, b = sample_variation(3, seed, full), sample_variation(3, seed, half)
        assert b == {k: a[k] for k in b}  # a subset with the same values
        sizes.append(len({k for k in b if k != "pad"}))
    assert 5 < np.mean(sizes) < 11  # about half of the 16 kinds


def test_single_kind_applies_exactly_one():
    settings = VariationConfig.preset("controls")
    assert settings.kinds == CONTROL_VARIATION_KINDS and settings.single_kind
    seen = set()
    for seed in range(40):
        params = sample_variation(2, seed, settings)
        assert len(params) == 1
        seen |= set(params)
    assert seen == set(CONTROL_VARIATION_KINDS)


def test_missing_partner_fails_clearly():
    img = _image(2)
    for params in (
        {"blend": 0.1},
        {"patch": {"start": [0, 0], "size": [0.2, 0.2], "fill": "partner"}},
    ):
        assert needs_partner(params)
        with pytest.raises(InputError, match="partner="):
            apply_variation(img, params)
    assert not needs_partner({"rotate": [2.0], "contrast": 1.1})
    settings = VariationConfig(kinds=("blend",))
    with pytest.raises(InputError, match="another training image"):
        vary(img, 0, settings=settings)
    with pytest.raises(InputError, match="partner must have the image's shape"):
        vary(img, 0, settings=settings, partner=_image(2, size=12))


def test_presets():
    assert VariationConfig.preset("default") == VariationConfig()
    assert VariationConfig.preset("paper") == VariationConfig.paper()
    all_ = VariationConfig.preset("all")
    assert all_.kinds == VARIATION_KINDS and all_.kind_prob == MANY_KINDS_PROB
    few = VariationConfig.preset("rotate, zoom,jpeg")
    assert few.kinds == ("rotate", "zoom", "jpeg") and few.kind_prob == 1.0
    many = VariationConfig.preset("rotate,zoom,jpeg,noise")
    assert many.kind_prob == MANY_KINDS_PROB
    with pytest.raises(InputError, match="Did you mean 'rotate'"):
        VariationConfig.preset("flip,rotat")
    with pytest.raises(InputError, match="Did you mean 'paper'"):
        VariationConfig.preset("papr")
    with pytest.raises(InputError, match="cannot be combined"):
        VariationConfig.preset("paper,flip")


def test_config_round_trips_and_old_dicts_load():
    c = VariationConfig(kinds=("zoom", "jpeg"), kind_prob=0.3, jpeg_quality_range=(20, 40))
    assert VariationConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    # A dict saved before the library grew: no kind_prob, zero_pad_prob, zoom_range, ...
    old = {
        "kinds": ["flip", "rotate", "shift", "contrast"],
        "flip_prob": 0.5,
        "flip_axes": None,
        "max_rotation": 5.0,
        "gamma_range": [0.7, 1.5],
        "max_brightness": 0.1,
        "max_noise_std": 0.03,
        "blur_sigma_range": [0.3, 1.0],
        "max_shift": 0.03,
    }
    loaded = VariationConfig.from_dict(old)
    assert loaded.kind_prob == 1.0 and loaded.zero_pad_prob == 0.0 and loaded.max_shift == 0.03
    for seed in range(10):  # every listed kind applied, shifts repeat the edge, as before
        params = sample_variation(2, seed, loaded)
        assert {"flip", "rotate", "shift_fraction", "contrast"} <= set(params)
        assert params["pad"] == "border"
    # Without kinds a partial dict means the new defaults.
    assert VariationConfig.from_dict({"max_rotation": 10.0}).kind_prob == MANY_KINDS_PROB


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind_prob": 1.5}, "kind_prob"),
        ({"zoom_range": (0.0, 1.2)}, "zoom_range"),
        ({"blend_range": (0.1, 1.5)}, "blend_range"),
        ({"downsample_range": (0.5, 2.0)}, "downsample_range"),
        ({"jpeg_quality_range": (10.5, 20)}, "jpeg_quality_range must be integers"),
        ({"jpeg_quality_range": (0, 20)}, "jpeg_quality_range"),
        ({"elastic_grid": 1}, "elastic_grid must be >= 2"),
        ({"curve_knots": 2.5}, "curve_knots must be an integer"),
        ({"single_kind": "yes"}, "single_kind"),
    ],
)
def test_bad_new_settings_fail_clearly(kwargs, match):
    with pytest.raises(InputError, match=match):
        VariationConfig(**kwargs)
