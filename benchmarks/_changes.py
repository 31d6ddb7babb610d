"""The changes a generator's copy may show, for the detection benchmarks (2D and 3D).

These are written independently of the detector's own training variations
(``medmem.detector.apply_variation``): other code paths (Pillow, MONAI transforms, NumPy)
and other, often stronger, ranges, so a detector is not tested on the exact function it was
trained with. Every change takes an image (1, *spatial) in [0, 1], a NumPy Generator and a
partner image (another training image, used by blends and patches) and returns a new image.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Change = Callable[[torch.Tensor, np.random.Generator, torch.Tensor], torch.Tensor]


def _clip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0).to(torch.float32).contiguous()


def exact(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    return x.clone()


def flip(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[x.ndim - 1])  # left-right


def rotate(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    from monai.transforms import Rotate

    sign = rng.choice([-1.0, 1.0])
    deg = sign * rng.uniform(3.0, 10.0)
    if x.ndim == 3:
        angle: float | tuple = float(np.deg2rad(deg))
    else:  # about one random axis
        angles = [0.0, 0.0, 0.0]
        angles[int(rng.integers(3))] = float(np.deg2rad(deg))
        angle = tuple(angles)
    out = Rotate(angle, keep_size=True, padding_mode="zeros", mode="bilinear")(x)
    return _clip(torch.as_tensor(out))


def shift(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Integer translation by up to 10% of each side, uncovered border zero (no wrap-around)."""
    out = torch.zeros_like(x)
    src, dst = [slice(None)], [slice(None)]
    for n in x.shape[1:]:
        s = int(round(rng.uniform(-0.1, 0.1) * n))
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = x[tuple(src)]
    return out


def crop_zoom(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Crop a random box of 75-92% of each side and resize it back (zoom in)."""
    size = x.shape[1:]
    frac = rng.uniform(0.75, 0.92)
    box = []
    for n in size:
        m = max(2, int(round(frac * n)))
        start = int(rng.integers(0, n - m + 1))
        box.append(slice(start, start + m))
    crop = x[(slice(None), *box)][None]
    mode = "bilinear" if x.ndim == 3 else "trilinear"
    return _clip(F.interpolate(crop, size=tuple(size), mode=mode, align_corners=False)[0])


def elastic(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Smooth random deformation (MONAI Rand2DElastic / Rand3DElastic)."""
    from monai.transforms import Rand2DElastic, Rand3DElastic

    n = min(x.shape[1:])
    if x.ndim == 3:
        t = Rand2DElastic(
            spacing=(n // 4, n // 4),
            magnitude_range=(1.0, 2.0),
            prob=1.0,
            padding_mode="border",
        )
    else:
        t = Rand3DElastic(
            sigma_range=(n / 8, n / 6),
            magnitude_range=(n / 2, n),
            prob=1.0,
            padding_mode="border",
        )
    t.set_random_state(int(rng.integers(2**31 - 1)))
    return _clip(torch.as_tensor(t(x)))


def contrast(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    return _clip(x.clamp(0, 1) ** gamma)


def equalize(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Full histogram equalisation (Pillow in 2D; the same CDF mapping in NumPy for 3D)."""
    arr = (x[0].numpy() * 255).round().astype(np.uint8)
    if x.ndim == 3:
        from PIL import Image, ImageOps

        out = np.asarray(ImageOps.equalize(Image.fromarray(arr)), dtype=np.float32) / 255
    else:
        hist = np.bincount(arr.ravel(), minlength=256)
        cdf = np.cumsum(hist) / arr.size
        out = cdf[arr].astype(np.float32)
    return _clip(torch.from_numpy(out)[None])


def sharpen(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Unsharp masking (Pillow's UnsharpMask in 2D; MONAI Gaussian smoothing in 3D)."""
    amount = rng.uniform(1.0, 2.5)
    radius = rng.uniform(1.0, 3.0)
    if x.ndim == 3:
        from PIL import Image, ImageFilter

        img = Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8))
        f = ImageFilter.UnsharpMask(radius=radius, percent=int(amount * 100), threshold=0)
        return _clip(torch.from_numpy(np.asarray(img.filter(f), dtype=np.float32) / 255)[None])
    from monai.transforms import GaussianSmooth

    smooth = torch.as_tensor(GaussianSmooth(sigma=radius)(x))
    return _clip(x + amount * (x - smooth))


def blur(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    from monai.transforms import GaussianSmooth

    return _clip(torch.as_tensor(GaussianSmooth(sigma=rng.uniform(1.0, 2.0))(x)))


def noise(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    std = rng.uniform(0.02, 0.06)
    return _clip(x + torch.from_numpy(rng.normal(0.0, std, x.shape).astype(np.float32)))


def down_up(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Heavy down-sampling (factor 3-6, area) and back up (bi/trilinear)."""
    factor = rng.uniform(3.0, 6.0)
    size = x.shape[1:]
    small = tuple(max(2, int(round(n / factor))) for n in size)
    mode = "bilinear" if x.ndim == 3 else "trilinear"
    lo = F.interpolate(x[None], size=small, mode="area")
    return _clip(F.interpolate(lo, size=tuple(size), mode=mode, align_corners=False)[0])


def jpeg(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Heavy JPEG compression (quality 5-25), slice by slice in 3D."""
    from PIL import Image

    q = int(rng.integers(5, 26))
    arr = (x[0].numpy() * 255).round().astype(np.uint8)
    slices = [arr] if x.ndim == 3 else list(arr)
    out = []
    for sl in slices:
        buf = io.BytesIO()
        Image.fromarray(sl).save(buf, format="JPEG", quality=q)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255)
    res = out[0] if x.ndim == 3 else np.stack(out)
    return _clip(torch.from_numpy(res)[None])


def blend(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """A 20% blend with another training image."""
    return _clip(0.8 * x + 0.2 * partner)


def patch(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """A box of 25-35% of each side replaced by the same box of another training image."""
    out = x.clone()
    box = [slice(None)]
    for n in x.shape[1:]:
        m = max(1, int(round(rng.uniform(0.25, 0.35) * n)))
        s = int(rng.integers(0, n - m + 1))
        box.append(slice(s, s + m))
    out[tuple(box)] = partner[tuple(box)]
    return out


#: Benchmark changes by name, in report order.
CHANGES: dict[str, Change] = {
    "exact": exact,
    "flip": flip,
    "rotate": rotate,
    "shift": shift,
    "crop-zoom": crop_zoom,
    "elastic": elastic,
    "contrast": contrast,
    "equalize": equalize,
    "sharpen": sharpen,
    "blur": blur,
    "noise": noise,
    "down-up": down_up,
    "jpeg": jpeg,
    "blend": blend,
    "patch": patch,
}

#: Kinds a compound change draws three of.
COMPOUND_POOL = (
    "rotate",
    "shift",
    "crop-zoom",
    "elastic",
    "contrast",
    "equalize",
    "sharpen",
    "blur",
    "noise",
    "down-up",
    "jpeg",
)


def compound(x: torch.Tensor, rng: np.random.Generator, partner: torch.Tensor) -> torch.Tensor:
    """Three different changes at once."""
    for name in rng.choice(COMPOUND_POOL, size=3, replace=False):
        x = CHANGES[str(name)](x, rng, partner)
    return x


CHANGES["compound"] = compound

#: The detector's training-variation group that covers each benchmark change: a change is
#: "held out" for a detector trained without that group.
GROUP_OF: dict[str, str | None] = {
    "exact": None,
    "flip": "geometry",
    "rotate": "geometry",
    "shift": "geometry",
    "crop-zoom": "geometry",
    "elastic": "controls",
    "contrast": "appearance",
    "equalize": "appearance",
    "sharpen": "controls",
    "blur": "appearance",
    "noise": "appearance",
    "down-up": "appearance",
    "jpeg": "appearance",
    "blend": "appearance",
    "patch": "controls",
    "autoencoder": "appearance",
    "compound": None,
}

#: Training-variation kinds (medmem.detector.VARIATION_KINDS) in each group.
GROUPS: dict[str, tuple[str, ...]] = {
    "geometry": ("flip", "rotate", "zoom", "shift"),
    "appearance": (
        "contrast",
        "curve",
        "equalize",
        "brightness",
        "blur",
        "downsample",
        "noise",
        "jpeg",
        "blend",
    ),
}
