"""Variations: shape, range, reproducibility, bounds of each kind."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medmem import InputError
from medmem.detector import (
    DEFAULT_VARIATION_KINDS,
    VARIATION_KINDS,
    VariationConfig,
    apply_variation,
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


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", VARIATION_KINDS)
def test_each_kind_keeps_shape_and_range(spatial_dims, kind):
    img = _image(spatial_dims, 16)
    for seed in range(3):
        out = vary(img, seed, kinds=(kind,))
        assert out.shape == img.shape
        assert out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_all_kinds_together_keep_shape_and_range(spatial_dims):
    img = _image(spatial_dims, 16)
    out = vary(img, 5, kinds=VARIATION_KINDS)
    assert out.shape == img.shape
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_default_kinds_are_the_papers():
    assert DEFAULT_VARIATION_KINDS == ("flip", "rotate", "contrast")
    assert sorted(sample_variation(2, 0)) == ["contrast", "flip", "rotate"]
    assert len(sample_variation(3, 0)["rotate"]) == 3  # about every axis in 3D


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_seed_same_variation_other_seed_differs(spatial_dims):
    img = _image(spatial_dims, 16)
    a = vary(img, 11, kinds=VARIATION_KINDS)
    b = vary(img, 11, kinds=VARIATION_KINDS)
    c = vary(img, 12, kinds=VARIATION_KINDS)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert torch.equal(vary(img, rng1), vary(img, rng2))


def test_parameters_do_not_depend_on_kind_order():
    a = sample_variation(2, 4, kinds=("rotate", "flip"))
    b = sample_variation(2, 4, kinds=("flip", "rotate"))
    assert a == b


def test_numpy_in_numpy_out():
    img = _image(2).numpy()
    out = vary(img, 1)
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
