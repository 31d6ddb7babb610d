"""Quality and diversity of synthetic images: FID, MS-SSIM, precision/recall, density/coverage.

The paper (Dar et al., sections 2.4.2 and 4.3) reports FID (quality) and MS-SSIM (diversity)
beside memorization, and finds both can mislead: a model that copies its training data has
an excellent FID. Read these numbers beside N_mem and N_copies, never instead of them.

Every metric is a plain function (MONAI's style: ``get_fid_score`` under ``FIDMetric``):

* :func:`fid` and :func:`precision_recall` take feature arrays;
* :func:`extract_features` makes them from a dataset with a pluggable extractor (a medmem
  :class:`~medmem.detector.Detector`, a TorchScript file, or a ``torch.nn.Module``) whose
  name (:func:`extractor_name`) goes with every number, since an FID is only comparable to
  another FID from the same extractor;
* :func:`ms_ssim_diversity` works on the images themselves (2D or 3D);
* :func:`quality` bundles them all.

Images are streamed in batches: memory holds features, never the image set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medmem import __version__
from medmem._errors import InputError, MedmemWarning
from medmem._io import file_sha256
from medmem._progress import progress
from medmem._stats import auroc, wilson_interval
from medmem._validation import check_dataset, check_positive_int, check_seed

logger = logging.getLogger(__name__)

# MS-SSIM weights of Wang et al. (2003) for five scales, as in MONAI.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_MAX_KERNEL = 11  # MONAI's default kernel size (sigma 1.5)
_MIN_KERNEL = 5  # smaller Gaussian windows measure noise rather than structure


# ---------------------------------------------------------------------------- validation
def _check_features(x: Any, name: str) -> np.ndarray:
    """``x`` as a float64 (n, d) array with n >= 2, or raise naming ``name``."""
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-d array (n_images, n_features), got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name}: expected numbers, got dtype {arr.dtype}.")
    if arr.shape[0] < 2:
        raise InputError(f"{name}: need at least 2 feature vectors, got {arr.shape[0]}.")
    arr = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InputError(f"{name}: row {row} contains NaN or infinity.")
    return arr


def _check_pair(real: Any, synthetic: Any) -> tuple[np.ndarray, np.ndarray]:
    r = _check_features(real, "real_features")
    s = _check_features(synthetic, "synthetic_features")
    if r.shape[1] != s.shape[1]:
        raise InputError(
            f"real_features have {r.shape[1]} features but synthetic_features {s.shape[1]}: "
            "extract both with the same extractor."
        )
    return r, s


# ---------------------------------------------------------------------------- FID
def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. The trace of
    the square root is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``sigma1^(1/2) sigma2 sigma1^(1/2)`` (similar to sigma1 sigma2), so
    singular covariances (fewer images than features) and rounding never give complex
    values or NaN; tiny negative totals from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrtm_psd(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def fid(real_features: Any, synthetic_features: Any) -> float:
    """Fréchet distance between Gaussian fits of real and synthetic features (FID).

    Mean and covariance (ddof 1) of each set in float64, as MONAI's ``get_fid_score``, over
    the whole sets (the paper's 3D protocol; it averaged 2D FIDs over batches of 256, which
    is biased upwards). FID is biased upwards for small sets: compare values computed with
    the same extractor and the same numbers of images. Lower means closer to real.

    Args:
        real_features: (n_real, d) features of real images.
        synthetic_features: (n_synthetic, d) features of synthetic images.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(200, 4))
        >>> round(fid(x, x), 6)
        0.0
        >>> fid(x, x + 1.0) > 3.9
        True
    """
    r, s = _check_pair(real_features, synthetic_features)
    if min(len(r), len(s)) <= r.shape[1]:
        warnings.warn(
            f"FID from {len(r)} real and {len(s)} synthetic images with {r.shape[1]} features: "
            "with no more images than features the covariances are singular and FID is "
            "strongly biased. Compare only values from the same extractor and set sizes.",
            category=MedmemWarning,
            stacklevel=2,
        )
    return frechet_distance(r.mean(0), np.cov(r, rowvar=False), s.mean(0), np.cov(s, rowvar=False))


# ---------------------------------------------------------------------------- precision/recall
def _sq_dist(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clipped at 0."""
    d = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)  # (block, n_b)
    return np.maximum(d, 0.0, out=d)


def _blocks(n: int, block_size: int) -> Iterator[slice]:
    for start in range(0, n, block_size):
        yield slice(start, min(n, start + block_size))


def _knn_radii(x: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row (self excluded)."""
    x_sq = (x * x).sum(1)
    out = np.empty(len(x))
    for sl in _blocks(len(x), block_size):
        d = _sq_dist(x[sl], x, x_sq)  # (block, n)
        # position 0 holds the point itself (distance 0); position k its k-th neighbour
        out[sl] = np.partition(d, k, axis=1)[:, k]
    return out


def precision_recall(
    real_features: Any,
    synthetic_features: Any,
    *,
    k: int = 5,
    block_size: int = 1024,
) -> dict[str, float]:
    """k-NN manifold precision/recall (Kynkäänniemi et al. 2019) and density/coverage
    (Naeem et al. 2020), in one feature space with Euclidean distances.

    Each real (synthetic) feature vector gets a ball reaching its k-th nearest real
    (synthetic) neighbour; the union of balls estimates the manifold.

    * precision: share of synthetic images inside the real manifold (fidelity);
    * recall: share of real images inside the synthetic manifold (diversity);
    * density: mean number of real balls holding a synthetic image, divided by k (about 1
      when synthetic images are distributed like real ones; above 1 when they crowd where
      real images are dense, as copies do);
    * coverage: share of real images whose ball holds at least one synthetic image.

    Distances are computed in blocks of ``block_size`` rows, so memory grows with
    ``block_size x max(n_real, n_synthetic)``, never ``n_real x n_synthetic``.

    Args:
        real_features: (n_real, d).
        synthetic_features: (n_synthetic, d), from the same extractor.
        k: neighbours defining each ball (the papers use 3 and 5); needs k < both set sizes.
        block_size: rows per distance block (memory, not results).

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 3))
        >>> precision_recall(x, x, k=3)["precision"]
        1.0
    """
    r, s = _check_pair(real_features, synthetic_features)
    k = check_positive_int(k, "k")
    block_size = check_positive_int(block_size, "block_size")
    if k >= min(len(r), len(s)):
        raise InputError(
            f"k={k} needs more than k images in each set (got {len(r)} real, {len(s)} "
            f"synthetic). Lower k or add images."
        )
    r_radii = _knn_radii(r, k, block_size)
    s_radii = _knn_radii(s, k, block_size)
    r_sq = (r * r).sum(1)
    in_real = np.zeros(len(s), dtype=bool)  # synthetic inside some real ball
    n_real_balls = np.zeros(len(s))  # how many real balls hold each synthetic image
    real_covered = np.zeros(len(r), dtype=bool)  # real ball holds some synthetic image
    real_in_syn = np.zeros(len(r), dtype=bool)  # real inside some synthetic ball
    for sl in _blocks(len(s), block_size):
        d = _sq_dist(s[sl], r, r_sq)  # (block, n_real)
        inside = d <= r_radii[None, :]
        in_real[sl] = inside.any(1)
        n_real_balls[sl] = inside.sum(1)
        real_covered |= inside.any(0)
        real_in_syn |= (d <= s_radii[sl, None]).any(0)
    return {
        "precision": float(in_real.mean()),
        "recall": float(real_in_syn.mean()),
        "density": float(n_real_balls.sum() / (k * len(s))),
        "coverage": float(real_covered.mean()),
    }


# ---------------------------------------------------------------------------- extractors
@dataclass(frozen=True)
class FeatureExtractor:
    """A network mapping image batches (B, 1, *image_size) in [0, 1] to features (B, d).

    ``name`` identifies it in every reported number; ``module`` is run under ``no_grad``.
    Outputs with spatial axes (B, C, ...) are averaged over them (global average pooling).
    """

    name: str
    module: Any
    device: torch.device = torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.module(batch.to(self.device, dtype=torch.float32))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"extractor {self.name}: returned {type(out).__name__}, expected a tensor "
                "(B, d) or (B, C, *spatial)."
            )
        if out.ndim > 2:
            out = out.flatten(2).mean(2)  # (B, C)
        elif out.ndim == 1:
            out = out[:, None]
        return out


def _load_scripted(path: Path, device: torch.device) -> FeatureExtractor:
    if not path.is_file():
        raise InputError(
            f"{path}: extractor file not found. Give a TorchScript file (torch.jit.save) or a "
            "torch.export file (.pt2), or a trained medmem detector folder."
        )
    digest = file_sha256(path)[:12]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
            if path.suffix == ".pt2":
                module = torch.export.load(str(path)).module()
                name = f"export:{path.name}:{digest}"
            else:
                module = torch.jit.load(str(path), map_location=device)
                module.eval()
                name = f"torchscript:{path.name}:{digest}"
    except Exception as exc:
        raise InputError(
            f"{path}: cannot be loaded as a TorchScript model ({type(exc).__name__}: {exc}). "
            "Save one with torch.jit.save(torch.jit.script(model), path), or a .pt2 file with "
            "torch.export.save."
        ) from None
    return FeatureExtractor(name, module, device)


def as_extractor(extractor: Any, *, device: str | torch.device | None = None) -> FeatureExtractor:
    """Turn a Detector, a TorchScript/``.pt2`` file path or a ``torch.nn.Module`` into a
    :class:`FeatureExtractor` with a name.

    Names: ``detector:<fingerprint[:12]>`` (the copy detector's encoder: the audit's own
    feature space), ``torchscript:<file name>:<sha256[:12]>``, ``export:<file name>:<sha256[:12]>``,
    ``module:<class name>:<sha256 of weights[:12]>``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if isinstance(extractor, (str, os.PathLike)):
        path = Path(extractor)
        if path.is_dir():
            from medmem.detector import Detector

            extractor = Detector.load(path)
        else:
            return _load_scripted(path, dev)
    if hasattr(extractor, "embed") and hasattr(extractor, "fingerprint"):
        model = getattr(extractor, "model_", None)
        if model is None:
            raise InputError(
                "the detector given as extractor is not trained: call Detector.train or "
                "Detector.load first."
            )
        return FeatureExtractor(
            f"detector:{extractor.fingerprint[:12]}", model, getattr(extractor, "device", dev)
        )
    if isinstance(extractor, torch.nn.Module):
        h = hashlib.sha256()
        for key, t in sorted(extractor.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        extractor.eval()
        return FeatureExtractor(
            f"module:{type(extractor).__name__}:{h.hexdigest()[:12]}", extractor.to(dev), dev
        )
    raise InputError(
        f"extractor must be a medmem Detector, a detector folder, a TorchScript file path or a "
        f"torch.nn.Module, got {type(extractor).__name__}."
    )


def extractor_name(extractor: Any) -> str:
    """The name reported with every FID and precision/recall made with ``extractor``."""
    return as_extractor(extractor).name


def extract_features(
    dataset: Any,
    extractor: Any,
    *,
    batch_size: int = 32,
    quiet: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Features of every image of ``dataset``, in order: float64 (n, d).

    Images are read and passed through the extractor ``batch_size`` at a time (3D: whole
    volumes); only the features are kept.

    Args:
        dataset: a medmem dataset (items (1, *image_size) in [0, 1]), 2D or 3D.
        extractor: a trained ``Detector`` (its encoder; default in :func:`quality`), a
            detector folder, a TorchScript file (``torch.jit.save``), a ``.pt2`` file
            (``torch.export.save``) or a ``torch.nn.Module``. It receives float32 batches
            (B, 1, *image_size) and returns (B, d) or (B, C, *spatial) (averaged to (B, C)).
        batch_size: images per forward pass.
        quiet: no progress bar.
        device: where a file or module extractor runs (default CPU; a Detector uses its own).

    Example:
        >>> feats = extract_features(ds, "inception_like.pt")  # doctest: +SKIP
    """
    check_dataset(dataset, "dataset")
    batch_size = check_positive_int(batch_size, "batch_size")
    ext = as_extractor(extractor, device=device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks: list[np.ndarray] = []
    with torch.no_grad():
        for batch in progress(
            iter(loader), desc="extracting features", total=len(loader), quiet=quiet, unit="batch"
        ):
            try:
                out = ext(batch)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(
                    f"extractor {ext.name} failed on a batch of shape {tuple(batch.shape)} "
                    f"({type(exc).__name__}: {exc}). It must accept (B, 1, *image_size) float32 "
                    "images in [0, 1]; preprocess the images to the size it expects."
                ) from None
            chunks.append(out.detach().double().cpu().numpy())
    feats = np.concatenate(chunks, axis=0)
    if not np.isfinite(feats).all():
        raise InputError(f"extractor {ext.name} returned NaN or infinite features.")
    return feats


# ---------------------------------------------------------------------------- MS-SSIM
def ms_ssim_settings(image_size: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """MS-SSIM scales, Gaussian kernel and weights valid for images of ``image_size``.

    MONAI's ``compute_ms_ssim`` convolves without padding, halves the image between scales
    and requires ``side // (n_scales - 1)**2 > kernel_size - 1``. The standard setting (5
    scales, kernel 11, sigma 1.5, Wang et al.'s weights) fits sides >= 176. For smaller
    images we keep the most scales (at most 5) whose largest valid odd kernel is at least
    5 (kernel at most 11, and no larger than the smallest side at the coarsest scale),
    scale sigma with the kernel (1.5 * kernel / 11), and use the first ``n_scales`` of
    Wang et al.'s weights renormalised to sum 1. Examples: 256 -> 5 scales, kernel 11;
    128 -> 5, 7; 64 -> 4, 7; 32 -> 3, 7; 16 -> 2, 7; 8 -> 1 scale (plain SSIM), 7. Sides
    below 5 get plain SSIM with the largest odd kernel that fits.
    """
    side = int(min(image_size))
    if side < 1:
        raise InputError(f"image_size must be positive, got {tuple(image_size)}.")
    choice = (1, max(1, min(_MAX_KERNEL, side) - (1 - min(_MAX_KERNEL, side) % 2)))
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        div = max(1, scales - 1) ** 2
        kernel = min(_MAX_KERNEL, side // div, side // 2 ** (scales - 1))
        kernel -= 1 - kernel % 2  # odd; MONAI needs side // div > kernel - 1
        if kernel >= _MIN_KERNEL:
            choice = (scales, kernel)
            break
    scales, kernel = choice
    w = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
    return {
        "n_scales": scales,
        "kernel_size": kernel,
        "kernel_sigma": round(1.5 * kernel / _MAX_KERNEL, 6),
        "weights": [float(v) for v in w / w.sum()],
        "data_range": 1.0,
    }


def _ms_ssim_batch(x: torch.Tensor, y: torch.Tensor, spatial_dims: int, cfg: dict) -> np.ndarray:
    from monai.metrics.regression import compute_ms_ssim

    v = compute_ms_ssim(
        x,
        y,
        spatial_dims=spatial_dims,
        data_range=cfg["data_range"],
        kernel_size=cfg["kernel_size"],
        kernel_sigma=cfg["kernel_sigma"],
        weights=cfg["weights"],
    )  # (B, 1)
    return v.reshape(-1).double().cpu().numpy()


def ms_ssim_diversity(
    dataset: Any,
    *,
    n_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    quiet: bool = False,
) -> float:
    """Mean MS-SSIM between each image and a randomly chosen other image of the same set.

    The paper's diversity measure (section 4.3): lower means more diverse (1 = all images
    identical). It says nothing about quality: noise is very diverse. Pairs are read
    ``batch_size`` at a time; 2D and 3D (whole volumes) alike. Scales and kernel follow
    :func:`ms_ssim_settings` for the dataset's image size.

    Args:
        dataset: a medmem dataset of at least 2 images.
        n_pairs: number of pairs; default one per image (each image against a random other).
            With fewer pairs than images, the first images of the pairs are drawn without
            replacement.
        seed: seeds the choice of pairs.
        batch_size: pairs per MS-SSIM computation.
        quiet: no progress bar.

    Example:
        >>> ms_ssim_diversity(ArrayDataset(np.ones((4, 32, 32)) * 0.5))  # doctest: +SKIP
        1.0
    """
    check_dataset(dataset, "dataset")
    n = len(dataset)
    if n < 2:
        raise InputError(f"MS-SSIM diversity needs at least 2 images, got {n}.")
    rng = check_seed(seed)
    batch_size = check_positive_int(batch_size, "batch_size")
    if n_pairs is None:
        first = np.arange(n)
    else:
        n_pairs = check_positive_int(n_pairs, "n_pairs")
        first = rng.choice(n, size=n_pairs, replace=n_pairs > n)
    # a uniformly random other image: draw from n - 1 and skip over the first one
    second = rng.integers(0, n - 1, size=len(first))
    second = second + (second >= first)
    spatial_dims = int(dataset.spatial_dims)
    cfg = ms_ssim_settings(tuple(dataset.image_size))
    values = []
    bar = progress(None, desc="MS-SSIM", total=len(first), quiet=quiet, unit="pair")
    for sl in _blocks(len(first), batch_size):
        x = torch.stack([torch.as_tensor(dataset[int(i)]) for i in first[sl]])  # (B, 1, ...)
        y = torch.stack([torch.as_tensor(dataset[int(j)]) for j in second[sl]])
        values.append(_ms_ssim_batch(x.float(), y.float(), spatial_dims, cfg))
        bar.update(len(x))
    bar.close()
    return float(np.concatenate(values).mean())


# ---------------------------------------------------------------------------- bundle
def quality(
    real: Any,
    synthetic: Any,
    *,
    extractor: Any = None,
    k: int = 5,
    n_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    detector_overrides: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """FID, precision/recall, density/coverage and MS-SSIM diversity of a synthetic set.

    Args:
        real: real images (the paper compares with the validation set), a medmem dataset.
        synthetic: synthetic images of the same kind and size.
        extractor: feature extractor (see :func:`extract_features`); pass the audit's
            detector to measure in the audit's own feature space. None trains a detector on
            ``real`` first (``detector_overrides``, default 20 epochs) and records that in
            ``extractor_trained_on``.
        k: neighbours of the k-NN manifolds.
        n_pairs: MS-SSIM pairs per set (default: one per image).
        seed: seeds the MS-SSIM pairs (and a detector trained here).
        batch_size: images per forward pass / pairs per MS-SSIM batch.
        detector_overrides: DetectorConfig fields for a detector trained here.
        quiet: no progress bars.

    Returns:
        A JSON-ready dict: ``extractor`` (name), ``extractor_trained_on`` (None or
        "real"), ``spatial_dims``, ``image_size``, ``n_real``, ``n_synthetic``,
        ``feature_dim``, ``fid``, ``precision``, ``recall``, ``density``, ``coverage``,
        ``k``, ``ms_ssim_synthetic``, ``ms_ssim_real`` (the reference), ``ms_ssim_settings``,
        ``n_pairs``, ``seed``, ``medmem_version``.

    Example:
        >>> q = quality(val, synthetic, extractor=detector)  # doctest: +SKIP
        >>> q["fid"], q["extractor"]  # doctest: +SKIP
    """
    check_dataset(real, "real")
    check_dataset(synthetic, "synthetic")
    if int(real.spatial_dims) != int(synthetic.spatial_dims) or tuple(real.image_size) != tuple(
        synthetic.image_size
    ):
        raise InputError(
            f"the real images are {real.spatial_dims}D {tuple(real.image_size)} but the "
            f"synthetic images {synthetic.spatial_dims}D {tuple(synthetic.image_size)}: load "
            "both with the same image_size."
        )
    trained_on = None
    if extractor is None:
        from medmem.detector import Detector

        overrides = {"epochs": 20, "seed": seed, **(detector_overrides or {})}
        overrides.setdefault("spatial_dims", int(real.spatial_dims))
        overrides.setdefault("image_size", tuple(int(s) for s in real.image_size))
        logger.info(
            "no extractor given: training a detector on the %d real images (%s epochs)",
            len(real),
            overrides["epochs"],
        )
        extractor = Detector.train(real, quiet=quiet, **overrides)
        trained_on = "real"
    ext = as_extractor(extractor)
    f_real = extract_features(real, ext, batch_size=batch_size, quiet=quiet)
    f_syn = extract_features(synthetic, ext, batch_size=batch_size, quiet=quiet)
    fid_value = fid(f_real, f_syn)
    k_used = min(k, len(f_real) - 1, len(f_syn) - 1)
    if k_used < 1:
        raise InputError(
            f"precision/recall needs at least 2 images per set (got {len(f_real)} real, "
            f"{len(f_syn)} synthetic)."
        )
    if k_used != k:
        warnings.warn(
            f"k lowered from {k} to {k_used}: a set has only {k_used + 1} images.",
            category=MedmemWarning,
            stacklevel=2,
        )
    pr = precision_recall(f_real, f_syn, k=k_used)
    return {
        "extractor": ext.name,
        "extractor_trained_on": trained_on,
        "spatial_dims": int(real.spatial_dims),
        "image_size": [int(s) for s in real.image_size],
        "n_real": len(real),
        "n_synthetic": len(synthetic),
        "feature_dim": int(f_real.shape[1]),
        "fid": fid_value,
        **pr,
        "k": k_used,
        "ms_ssim_synthetic": ms_ssim_diversity(
            synthetic, n_pairs=n_pairs, seed=seed, batch_size=batch_size, quiet=quiet
        ),
        "ms_ssim_real": ms_ssim_diversity(
            real, n_pairs=n_pairs, seed=seed, batch_size=batch_size, quiet=quiet
        ),
        "ms_ssim_settings": ms_ssim_settings(tuple(real.image_size)),
        "n_pairs": n_pairs,
        "seed": seed,
        "medmem_version": __version__,
    }


def format_quality(q: dict[str, Any]) -> str:
    """A quality dict (from :func:`quality`) as a small plain-text table."""
    rows = [
        ("extractor", str(q["extractor"])),
        ("n_real / n_synthetic", f"{q['n_real']} / {q['n_synthetic']}"),
        ("FID", f"{q['fid']:.4g}  (lower = closer to the real images)"),
        ("precision / recall", f"{q['precision']:.3f} / {q['recall']:.3f}  (k={q['k']})"),
        ("density / coverage", f"{q['density']:.3f} / {q['coverage']:.3f}"),
        (
            "MS-SSIM synthetic",
            f"{q['ms_ssim_synthetic']:.4f}  (real: {q['ms_ssim_real']:.4f}; lower = more diverse)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = [
    "MS_SSIM_WEIGHTS",
    "FeatureExtractor",
    "as_extractor",
    "auroc",
    "extract_features",
    "extractor_name",
    "fid",
    "format_quality",
    "frechet_distance",
    "ms_ssim_diversity",
    "ms_ssim_settings",
    "precision_recall",
    "quality",
    "wilson_interval",
]
