"""Variations: the changes a patient-data copy may show and the detector learns to ignore.

The paper (section 4.2) counts a synthetic image as a copy of a training image when it
matches the image up to "minor variations such as rotation, flipping and slight changes in
contrast". Those three kinds are on by default; brightness, noise, blur and small shifts
can be switched on. Each kind has a name in :data:`VARIATION_KINDS`; adding one means a
sampler entry in :func:`sample_variation` and an apply step in :func:`apply_variation`.

A variation is drawn in two steps so that it can be recorded and replayed: sample the
parameters (a small JSON-able dict) from a NumPy Generator, then apply them. :func:`vary`
does both; the demo and benchmarks use it to fabricate known copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmem._errors import InputError
from medmem._validation import check_choice, check_in_range, check_seed

#: Every variation kind, in the order they are applied.
VARIATION_KINDS: tuple[str, ...] = (
    "flip",
    "rotate",
    "shift",
    "blur",
    "contrast",
    "brightness",
    "noise",
)

#: The paper's variations: flipping, rotation and slight changes in contrast.
DEFAULT_VARIATION_KINDS: tuple[str, ...] = ("flip", "rotate", "contrast")


@dataclass(frozen=True)
class VariationConfig:
    """Which variations to draw, and how strong they may be.

    Args:
        kinds: names from :data:`VARIATION_KINDS` that are applied.
        flip_prob: probability of flipping each spatial axis (independently).
        flip_axes: spatial axes (0-based, 0 = first spatial axis) that may flip; None = all.
        max_rotation: rotations are uniform in [-max_rotation, max_rotation] degrees about
            every axis (one in-plane angle in 2D, three angles in 3D). Paper: 5.
        gamma_range: contrast change ``x ** gamma`` with gamma uniform in this range.
        max_brightness: brightness offset uniform in [-max_brightness, max_brightness].
        max_noise_std: Gaussian noise with a standard deviation uniform in [0, max_noise_std].
        blur_sigma_range: Gaussian blur with sigma (pixels) uniform in this range.
        max_shift: translation uniform in [-max_shift, max_shift] times the side, per axis.
    """

    kinds: tuple[str, ...] = DEFAULT_VARIATION_KINDS
    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] | None = None
    max_rotation: float = 5.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    max_brightness: float = 0.1
    max_noise_std: float = 0.03
    blur_sigma_range: tuple[float, float] = (0.3, 1.0)
    max_shift: float = 0.03

    def __post_init__(self) -> None:
        if isinstance(self.kinds, str):
            raise InputError(
                f"variations.kinds must be a list of names, got the string {self.kinds!r}; "
                f"write kinds=({self.kinds!r},)."
            )
        kinds = tuple(self.kinds)
        for k in kinds:
            check_choice(k, "variations.kinds entry", VARIATION_KINDS)
        if len(set(kinds)) != len(kinds):
            raise InputError(f"variations.kinds has repeated names: {list(kinds)}.")
        object.__setattr__(self, "kinds", kinds)
        check_in_range(self.flip_prob, "variations.flip_prob", 0.0, 1.0)
        if self.flip_axes is not None:
            axes = tuple(self.flip_axes)
            if not all(isinstance(a, (int, np.integer)) and 0 <= a <= 2 for a in axes):
                raise InputError(
                    f"variations.flip_axes must be spatial axes in 0..2 (or None for all), "
                    f"got {self.flip_axes!r}."
                )
            object.__setattr__(self, "flip_axes", tuple(int(a) for a in axes))
        check_in_range(self.max_rotation, "variations.max_rotation", 0.0, 180.0)
        object.__setattr__(
            self, "gamma_range", _check_range(self.gamma_range, "variations.gamma_range", 0.0)
        )
        check_in_range(self.max_brightness, "variations.max_brightness", 0.0, 1.0)
        check_in_range(self.max_noise_std, "variations.max_noise_std", 0.0, 1.0)
        object.__setattr__(
            self,
            "blur_sigma_range",
            _check_range(self.blur_sigma_range, "variations.blur_sigma_range", 0.0),
        )
        check_in_range(self.max_shift, "variations.max_shift", 0.0, 0.5)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariationConfig:
        """Inverse of :meth:`to_dict`; unknown keys fail with a did-you-mean."""
        from medmem._validation import check_keys

        check_keys(data, [f.name for f in fields(cls)], "variations")
        return cls(**{k: _tuple_or(v) for k, v in data.items()})


def _tuple_or(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _check_range(value: Any, name: str, low: float) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a pair (low, high), got {value!r}.") from None
    if not (low <= lo <= hi and math.isfinite(hi)):
        raise InputError(f"{name} must satisfy {low} <= low <= high, got {value!r}.")
    return (lo, hi)


def sample_variation(
    spatial_dims: int,
    rng: int | np.random.Generator | None = None,
    settings: VariationConfig | None = None,
    *,
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Draw the parameters of one variation.

    Args:
        spatial_dims: 2 or 3.
        rng: seed or NumPy Generator (consumed).
        settings: ranges; default :class:`VariationConfig()`.
        kinds: overrides ``settings.kinds``.

    Returns:
        A JSON-able dict with an entry per active kind, e.g.
        ``{"flip": [1], "rotate": [3.2], "contrast": 0.91}`` (rotate in degrees, shift in
        pixels per spatial axis, noise as ``[std, seed]``).

    Example:
        >>> p = sample_variation(2, 0)
        >>> sorted(p)
        ['contrast', 'flip', 'rotate']
    """
    gen = check_seed(rng)
    s = settings if settings is not None else VariationConfig()
    if kinds is not None:
        s = VariationConfig(**{**s.to_dict(), "kinds": tuple(kinds)})
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    params: dict[str, Any] = {}
    # Draw in the fixed order of VARIATION_KINDS so that a kind's parameters do not depend
    # on the order the caller listed the kinds in.
    for kind in VARIATION_KINDS:
        if kind not in s.kinds:
            continue
        if kind == "flip":
            axes = s.flip_axes if s.flip_axes is not None else tuple(range(spatial_dims))
            draws = gen.random(len(axes))
            flips = zip(axes, draws, strict=True)
            params["flip"] = [a for a, u in flips if u < s.flip_prob and a < spatial_dims]
        elif kind == "rotate":
            n_angles = 1 if spatial_dims == 2 else 3
            params["rotate"] = gen.uniform(-s.max_rotation, s.max_rotation, n_angles).tolist()
        elif kind == "shift":
            params["shift_fraction"] = gen.uniform(-s.max_shift, s.max_shift, spatial_dims).tolist()
        elif kind == "blur":
            params["blur"] = float(gen.uniform(*s.blur_sigma_range))
        elif kind == "contrast":
            params["contrast"] = float(gen.uniform(*s.gamma_range))
        elif kind == "brightness":
            params["brightness"] = float(gen.uniform(-s.max_brightness, s.max_brightness))
        elif kind == "noise":
            params["noise"] = [
                float(gen.uniform(0.0, s.max_noise_std)),
                int(gen.integers(0, 2**31 - 1)),
            ]
    return params


def apply_variation(image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Apply drawn parameters to one image (C, *spatial) in [0, 1]; returns a new tensor.

    Geometry (flip, rotation about the image centre, shift) comes first, then blur, then
    intensity (contrast as ``x ** gamma``, brightness, noise); the result is clipped to
    [0, 1]. Borders uncovered by rotation or shift repeat the edge values.
    """
    x = image.to(torch.float32)
    spatial_dims = x.ndim - 1
    if params.get("flip"):
        x = torch.flip(x, dims=[1 + a for a in params["flip"]])
    angles = params.get("rotate")
    shift = params.get("shift_fraction")
    if (angles and any(a != 0 for a in angles)) or (shift and any(t != 0 for t in shift)):
        x = _affine(x, angles or [0.0] * (1 if spatial_dims == 2 else 3), shift)
    if "blur" in params and params["blur"] > 0:
        x = _gaussian_blur(x, params["blur"])
    if "contrast" in params:
        x = x.clamp(0.0, 1.0) ** params["contrast"]
    if "brightness" in params:
        x = x + params["brightness"]
    if "noise" in params:
        std, seed = params["noise"]
        g = torch.Generator().manual_seed(int(seed))
        x = x + std * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x.clamp(0.0, 1.0)


def vary(
    image: torch.Tensor | np.ndarray,
    rng: int | np.random.Generator | None = None,
    *,
    kinds: Sequence[str] | None = None,
    settings: VariationConfig | None = None,
) -> torch.Tensor | np.ndarray:
    """Return a random variation of ``image`` (a copy the detector should still match).

    Args:
        image: (C, H, W) or (C, D, H, W) with values in [0, 1] (a dataset item); a NumPy
            array gives a NumPy array back.
        rng: seed or NumPy Generator; the same seed gives the same variation.
        kinds: which kinds to apply (default: ``settings.kinds``, i.e. flip, rotate,
            contrast).
        settings: ranges of each kind (default :class:`VariationConfig()`).

    Example:
        >>> import torch
        >>> img = torch.rand(1, 32, 32)
        >>> copy = vary(img, 7, kinds=("rotate", "contrast"))
        >>> copy.shape
        torch.Size([1, 32, 32])
    """
    as_numpy = isinstance(image, np.ndarray)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)) if as_numpy else image
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
        shape = getattr(image, "shape", None)
        raise InputError(
            f"vary expects one image of shape (C, H, W) or (C, D, H, W), got {shape}; "
            "add a channel axis with image[None]."
        )
    params = sample_variation(x.ndim - 1, rng, settings, kinds=kinds)
    out = apply_variation(x, params)
    return out.numpy() if as_numpy else out


def _rotation_matrix(angles_deg: Sequence[float]) -> torch.Tensor:
    """Rotation in grid coordinates (x = last axis): one angle in 2D, three in 3D."""
    a = [math.radians(v) for v in angles_deg]
    if len(a) == 1:
        c, s = math.cos(a[0]), math.sin(a[0])
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cx, sx = math.cos(a[0]), math.sin(a[0])
    cy, sy = math.cos(a[1]), math.sin(a[1])
    cz, sz = math.cos(a[2]), math.sin(a[2])
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def _affine(
    x: torch.Tensor, angles: Sequence[float], shift: Sequence[float] | None
) -> torch.Tensor:
    """Rotate about the centre and shift, in pixel units (correct for non-square images)."""
    spatial = x.shape[1:]
    # grid_sample's coordinates run (x, y[, z]) = reversed spatial axes, normalised so that
    # pixel offset p from the centre is u = p / (n / 2) (align_corners=False).
    half = torch.tensor([n / 2.0 for n in reversed(spatial)], dtype=torch.float64)
    rot = _rotation_matrix(angles)
    lin = torch.diag(1.0 / half) @ rot @ torch.diag(half)  # (sd, sd)
    trans = torch.zeros(len(spatial), dtype=torch.float64)
    if shift is not None:
        # shift_fraction is per spatial axis (array order); grid order is reversed.
        trans = -2.0 * torch.tensor(list(reversed(shift)), dtype=torch.float64)
    theta = torch.cat([lin, trans[:, None]], dim=1)[None].to(x.dtype)  # (1, sd, sd + 1)
    grid = F.affine_grid(theta, [1, x.shape[0], *spatial], align_corners=False)
    out = F.grid_sample(
        x[None], grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur along every spatial axis, edges replicated."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = x[None]  # (1, C, *spatial)
    spatial_dims = x.ndim - 1
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    c = x.shape[0]
    for axis in range(spatial_dims):
        shape = [1] * spatial_dims
        shape[axis] = k.numel()
        weight = k.reshape(1, 1, *shape).repeat(c, 1, *([1] * spatial_dims))
        pad = [0, 0] * spatial_dims
        # F.pad lists the last axis first.
        pad[2 * (spatial_dims - 1 - axis)] = radius
        pad[2 * (spatial_dims - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out[0]


__all__ = [
    "DEFAULT_VARIATION_KINDS",
    "VARIATION_KINDS",
    "VariationConfig",
    "apply_variation",
    "sample_variation",
    "vary",
]
