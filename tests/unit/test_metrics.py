"""medmem.metrics: FID, precision/recall, density/coverage, MS-SSIM, extractors, quality."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medmem import InputError, MedmemWarning
from medmem.cli import main
from medmem.data import ArrayDataset, make_phantom, write_phantoms
from medmem.detector import Detector
from medmem.metrics import (
    extract_features,
    extractor_name,
    fid,
    ms_ssim_diversity,
    ms_ssim_settings,
    precision_recall,
    quality,
)

TINY_DETECTOR = dict(resnet_channels=(8, 8, 16, 16), embed_dim=8, epochs=1, batch_size=8)


def phantoms(n: int, *, first: int = 0, spatial_dims: int = 2, size: int = 32) -> ArrayDataset:
    imgs = np.stack(
        [make_phantom(first + i, 0, spatial_dims=spatial_dims, size=size) for i in range(n)]
    )
    return ArrayDataset(imgs, ids=[f"p{first + i}" for i in range(n)])


class TinyNet(torch.nn.Module):
    """A feature extractor for 2D or 3D images: conv, ReLU, global average pool."""

    def __init__(self, spatial_dims: int = 2, pool: bool = True) -> None:
        super().__init__()
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        torch.manual_seed(0)
        self.conv = conv(1, 6, 3, stride=2)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return y.flatten(2).mean(2) if self.pool else y


def scripted(tmp_path, spatial_dims: int = 2, pool: bool = True, name: str = "tiny.pt"):
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`torch.jit.(script|save)` is deprecated", DeprecationWarning
        )
        torch.jit.save(torch.jit.script(TinyNet(spatial_dims, pool)), str(path))
    return path


# ---------------------------------------------------------------------------- FID
def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID via the eigenvalues of the (non-symmetric) product sigma_a sigma_b."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    tr = np.sqrt(np.clip(eig.real, 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    noise = rng.normal(size=x.shape)
    values = [fid(x, x + s * noise) for s in (0.05, 0.2, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    for s in (0.5, 2.0):
        assert fid(x, x + s * noise) == pytest.approx(_fid_reference(x, x + s * noise), rel=1e-6)


def test_fid_of_shifted_gaussians_is_the_squared_shift() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) + np.array([1.0, 2.0, 0.0])
    assert fid(a, b) == pytest.approx(5.0, abs=0.1)


def test_fid_with_singular_covariances_is_finite_and_warns() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(6, 16))
    with pytest.warns(MedmemWarning, match="strongly biased"):
        value = fid(a, b)
    assert np.isfinite(value) and value > 0
    with pytest.raises(InputError, match="same extractor"):
        fid(a, rng.normal(size=(6, 15)))
    with pytest.raises(InputError, match="2-d array"):
        fid(a[0], b)


# ---------------------------------------------------------------------------- precision/recall
def _prdc_reference(r: np.ndarray, s: np.ndarray, k: int) -> dict[str, float]:
    """Brute force with full distance matrices (Naeem et al.'s reference formulation)."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    rr, ss, sr = dist(r, r), dist(s, s), dist(s, r)
    r_rad = np.sort(rr, axis=1)[:, k]
    s_rad = np.sort(ss, axis=1)[:, k]
    return {
        "precision": float((sr <= r_rad[None, :]).any(1).mean()),
        "recall": float((sr.T <= s_rad[None, :]).any(1).mean()),
        "density": float((sr <= r_rad[None, :]).sum() / (k * len(s))),
        "coverage": float((sr.min(0) <= r_rad).mean()),
    }


def test_precision_recall_of_a_set_with_itself_is_one() -> None:
    x = np.random.default_rng(0).normal(size=(120, 6))
    pr = precision_recall(x, x, k=5)
    assert pr["precision"] == pr["recall"] == pr["coverage"] == 1.0
    assert 1.0 <= pr["density"] < 2.0


@pytest.mark.parametrize("block_size", [1, 7, 64, 4096])
def test_blocked_precision_recall_equals_brute_force(block_size: int) -> None:
    rng = np.random.default_rng(3)
    r = rng.normal(size=(90, 5))
    s = np.concatenate([rng.normal(size=(40, 5)) + 0.8, r[:10] + 0.01])
    got = precision_recall(r, s, k=3, block_size=block_size)
    want = _prdc_reference(r, s, k=3)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_mode_collapse_keeps_precision_and_loses_recall() -> None:
    rng = np.random.default_rng(4)
    r = rng.normal(size=(200, 4))
    collapsed = r[:1] + 0.01 * rng.normal(size=(50, 4))  # every sample near one real image
    pr = precision_recall(r, collapsed, k=5)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.1 and pr["coverage"] < 0.1
    far = precision_recall(r, r + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(InputError, match="k=5 needs more than k images"):
        precision_recall(r, collapsed[:5], k=5)


# ---------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_of_identical_images_is_one_and_lower_for_different_ones() -> None:
    same = ArrayDataset(np.repeat(make_phantom(3, 0, size=32)[None], 4, axis=0))
    assert ms_ssim_diversity(same, quiet=True) == pytest.approx(1.0, abs=1e-5)
    different = phantoms(8)
    value = ms_ssim_diversity(different, quiet=True)
    assert 0.0 < value < 0.99
    # follow-ups of one patient are more alike than different patients
    follow_ups = ArrayDataset(np.stack([make_phantom(3, f, size=32) for f in range(8)]))
    assert value < ms_ssim_diversity(follow_ups, quiet=True) < 1.0


def test_ms_ssim_pairs_are_never_an_image_with_itself_and_are_seeded() -> None:
    two = phantoms(2)
    pair_value = ms_ssim_diversity(two, n_pairs=1, quiet=True)
    assert pair_value < 0.99
    assert ms_ssim_diversity(two, n_pairs=9, quiet=True) == pytest.approx(pair_value, abs=1e-6)
    ds = phantoms(10)
    a = ms_ssim_diversity(ds, n_pairs=6, seed=5, quiet=True)
    assert a == ms_ssim_diversity(ds, n_pairs=6, seed=5, batch_size=4, quiet=True)
    with pytest.raises(InputError, match="at least 2 images"):
        ms_ssim_diversity(phantoms(1), quiet=True)


def test_ms_ssim_3d_runs_on_whole_volumes() -> None:
    vols = phantoms(4, spatial_dims=3, size=16)
    value = ms_ssim_diversity(vols, quiet=True)
    assert 0.0 < value < 1.0
    same = ArrayDataset(np.repeat(vols.array(0)[None], 3, axis=0))
    assert ms_ssim_diversity(same, quiet=True) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("side", [8, 16, 32, 64, 100, 176])
def test_ms_ssim_settings_are_valid_for_monai(side: int) -> None:
    from monai.metrics.regression import compute_ms_ssim

    cfg = ms_ssim_settings((side, side))
    assert cfg["kernel_size"] % 2 == 1 and abs(sum(cfg["weights"]) - 1) < 1e-12
    x = torch.rand(1, 1, side, side)
    v = compute_ms_ssim(
        x,
        x,
        spatial_dims=2,
        kernel_size=cfg["kernel_size"],
        kernel_sigma=cfg["kernel_sigma"],
        weights=cfg["weights"],
    )
    assert float(v) == pytest.approx(1.0, abs=1e-5)
    if side >= 176:
        assert (cfg["n_scales"], cfg["kernel_size"]) == (5, 11)


# ---------------------------------------------------------------------------- extractors
def test_detector_extractor_is_the_detector_embedding() -> None:
    ds = phantoms(16)
    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: any embedding will do
        det = Detector.train(ds, quiet=True, **TINY_DETECTOR)
    feats = extract_features(ds, det, batch_size=5, quiet=True)
    np.testing.assert_allclose(feats, det.embed(ds, quiet=True), rtol=1e-5, atol=1e-6)
    assert feats.dtype == np.float64 and feats.shape == (16, 8)
    assert extractor_name(det) == f"detector:{det.fingerprint[:12]}"


def test_torchscript_extractor_2d_and_3d(tmp_path) -> None:
    path = scripted(tmp_path)
    ds = phantoms(6)
    feats = extract_features(ds, path, batch_size=4, quiet=True)
    with torch.no_grad():
        want = TinyNet(2)(torch.stack([ds[i] for i in range(6)])).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert extractor_name(path) == f"torchscript:tiny.pt:{digest}"
    # a model returning feature maps is averaged over its spatial axes; 3D on whole volumes
    path3 = scripted(tmp_path, spatial_dims=3, pool=False, name="maps3d.pt")
    vols = phantoms(3, spatial_dims=3, size=16)
    assert extract_features(vols, path3, quiet=True).shape == (3, 6)


def test_extractor_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(InputError, match="not found"):
        extract_features(phantoms(2), tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot be loaded as a TorchScript model"):
        extract_features(phantoms(2), bad)
    path3 = scripted(tmp_path, spatial_dims=3, name="three.pt")
    with pytest.raises(InputError, match="failed on a batch"):
        extract_features(phantoms(2), path3, quiet=True)  # 2D images into a 3D model


# ---------------------------------------------------------------------------- quality
def test_quality_bundles_everything_with_the_extractor_name(tmp_path) -> None:
    path = scripted(tmp_path)
    real, syn = phantoms(12), phantoms(10, first=50)
    q = quality(real, syn, extractor=path, k=3, quiet=True)
    assert q["extractor"].startswith("torchscript:tiny.pt:")
    assert q["extractor_trained_on"] is None
    assert q["fid"] > 0 and 0 <= q["precision"] <= 1 and q["k"] == 3
    assert (q["n_real"], q["n_synthetic"], q["feature_dim"]) == (12, 10, 6)
    json.dumps(q)  # JSON-ready
    same = quality(real, real, extractor=path, k=3, quiet=True)
    assert same["fid"] == pytest.approx(0.0, abs=1e-8)
    assert same["precision"] == same["recall"] == 1.0
    assert same["ms_ssim_synthetic"] == same["ms_ssim_real"]


def test_quality_3d_and_detector_trained_when_no_extractor() -> None:
    real, syn = phantoms(6, spatial_dims=3, size=16), phantoms(6, first=20, spatial_dims=3, size=16)
    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: the plumbing only
        q = quality(
            real,
            syn,
            k=2,
            quiet=True,
            detector_overrides={"epochs": 1, "batch_size": 3, "embed_dim": 4, "conv_channels": 8},
        )
    assert q["extractor"].startswith("detector:") and q["extractor_trained_on"] == "real"
    assert q["spatial_dims"] == 3 and np.isfinite(q["fid"])
    with pytest.raises(InputError, match="same image_size"):
        quality(real, phantoms(6), extractor=TinyNet(3))


def test_quality_cli_prints_a_table_and_writes_json(tmp_path) -> None:
    write_phantoms(tmp_path / "real", n_patients=8, size=32, fmt="npy")
    write_phantoms(tmp_path / "syn", n_patients=8, size=32, fmt="npy", first_patient=50)
    model = scripted(tmp_path)
    out = tmp_path / "q.json"
    args = ["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn")]
    r = CliRunner().invoke(
        main,
        ["--quiet", "quality", *args, "--extractor", str(model), "--json", str(out), "--k", "3"],
    )
    assert r.exit_code == 0, r.output
    assert "FID" in r.output and "torchscript:tiny.pt:" in r.output
    saved = json.loads(out.read_text())
    assert saved["extractor"].startswith("torchscript:tiny.pt:") and saved["n_real"] == 8
    r2 = CliRunner().invoke(main, ["quality", *args, "--extractor", str(tmp_path / "no.pt")])
    assert r2.exit_code == 2 and "not found" in r2.output
