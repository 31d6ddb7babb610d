"""medmem.generative on tiny configs: train, sample, save/load, exact resume, config errors."""

from __future__ import annotations

import glob
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from medmem import InputError, MedmemWarning, OutputExistsError, load_dataset
from medmem._seeds import batch_indices
from medmem.generative import (
    GenerativeConfig,
    GenerativeModel,
    augment,
    load_config,
    train,
    write_samples,
)

REPO = Path(__file__).resolve().parents[2]

# MONAI's DiffusionModelUNet always has an attention block, which MONAI builds with einops.
needs_einops = pytest.mark.skipif(
    find_spec("einops") is None,
    reason="the LDM's DiffusionModelUNet needs einops (pip install einops)",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run fastest on one thread (and do not fight over a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(model: str = "ldm", dims: int = 2, kind: str = "kl", **sections: Any) -> GenerativeConfig:
    """A config that trains in a second or two: 16^d phantoms, 8-channel networks."""
    data: dict[str, Any] = {
        "model": model,
        "spatial_dims": dims,
        "image_size": [16] * dims,
        "data": {"source": "phantoms", "n_patients": 10},
        "autoencoder": {
            "kind": kind,
            "channels": [8, 8],
            "latent_channels": 2,
            "norm_num_groups": 4,
            "iterations": 3,
            "batch_size": 2,
            "adv_start": 1,
            "disc_channels": 8,
            "disc_layers": 2,
        },
        "diffusion": {
            "channels": [8, 8],
            "num_head_channels": 8,
            "norm_num_groups": 4,
            "iterations": 3,
            "batch_size": 2,
            "num_train_timesteps": 20,
        },
        "gan": {
            "latent_dim": 8,
            "channels": 16,
            "disc_channels": 8,
            "disc_layers": 2,
            "iterations": 4,
            "batch_size": 2,
        },
        "sampling": {"steps": 4, "sampler": "ddim"},
        "train": {"checkpoint_every": 1, "log_every": 1, "timing_iterations": 1},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return GenerativeConfig.from_dict(data)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(str(run / "model" / "*.safetensors"))):
        out.update({f"{Path(f).name}:{k}": v for k, v in load_file(f).items()})
    return out


CASES = [
    pytest.param("ldm", 2, "kl", marks=needs_einops),
    pytest.param("ldm", 3, "kl", marks=needs_einops),
    pytest.param("ldm", 3, "vq", marks=needs_einops),
    pytest.param("ldm", 2, "vq", marks=needs_einops),
    ("vae", 2, "kl"),
    ("gan", 2, "kl"),
    ("gan", 3, "kl"),
]


@pytest.mark.parametrize(("model", "dims", "kind"), CASES)
def test_train_sample_shapes_range_and_reload(tmp_path, model, dims, kind):
    cfg = tiny(model, dims, kind)
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result.finished and result.model is not None
    images = result.model.sample(3, seed=1, quiet=True)
    assert images.shape == (3, 1, *([16] * dims))
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # saved model (safetensors + JSON) gives the same images; a run folder loads too
    again = GenerativeModel.load(tmp_path / "run").sample(3, seed=1, quiet=True)
    if torch.cuda.is_available():  # cuDNN's kernels are not bit-deterministic: 2.4e-4 seen
        torch.testing.assert_close(images, again, rtol=0, atol=1e-3)
    else:
        assert torch.equal(images, again)
    losses = pd.read_csv(tmp_path / "run" / "losses.csv")
    assert set(losses["stage"]) == set(cfg.stages)
    assert set(result.seconds_per_iteration) == set(cfg.stages)


@needs_einops
def test_sampling_is_reproducible_with_a_seed(tmp_path):
    model = train(tiny(), tmp_path / "run", quiet=True).model
    a = model.sample(2, seed=3, sampler="ddpm", steps=5, quiet=True)
    b = model.sample(2, seed=3, sampler="ddpm", steps=5, quiet=True)
    c = model.sample(2, seed=4, sampler="ddpm", steps=5, quiet=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d = model.sample(2, seed=3, sampler="ddim", steps=3, quiet=True)
    assert d.shape == a.shape
    with pytest.raises(InputError, match="exceeds the 20 timesteps"):
        model.sample(1, steps=50)
    with pytest.raises(InputError, match="sampler must be one of"):
        model.sample(1, sampler="ddmi")


@pytest.mark.parametrize(
    ("model", "kind", "stop"),
    [
        pytest.param("ldm", "kl", 4, marks=needs_einops),
        pytest.param("ldm", "kl", 2, marks=needs_einops),
        pytest.param("ldm", "vq", 3, marks=needs_einops),
        ("gan", "kl", 2),
    ],
)
def test_resume_after_interruption_gives_identical_weights(tmp_path, model, kind, stop):
    """N iterations straight == N' iterations, stop, resume the rest (across stages too)."""
    cfg = tiny(model, 2, kind, train={"augment": True})
    train(cfg, tmp_path / "straight", quiet=True)
    part = train(cfg, tmp_path / "resumed", quiet=True, stop_after=stop)
    assert not part.finished and part.model is None
    assert not (tmp_path / "resumed" / "model").exists()
    train(cfg, tmp_path / "resumed", quiet=True, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = pd.read_csv(tmp_path / "straight" / "losses.csv")
    lb = pd.read_csv(tmp_path / "resumed" / "losses.csv")
    pd.testing.assert_frame_equal(la, lb)


def test_run_folder_is_not_overwritten_and_resume_checks_settings(tmp_path):
    cfg = tiny("vae")
    train(cfg, tmp_path / "run", quiet=True, stop_after=1)
    with pytest.raises(OutputExistsError, match="--resume"):
        train(cfg, tmp_path / "run", quiet=True)
    other = tiny("vae", autoencoder={"lr": 1e-3})
    with pytest.raises(InputError, match=r"autoencoder\.lr"):
        train(other, tmp_path / "run", quiet=True, resume=True)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    cfg = tiny("gan")
    train(cfg, tmp_path / "a", quiet=True)
    train(cfg, tmp_path / "b", quiet=True)
    train(tiny("gan", train={"seed": 1}), tmp_path / "c", quiet=True)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batches_cover_every_image_once_per_epoch():
    seen = [i for it in range(5) for i in batch_indices(10, 2, it, seed=0, stage=0)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 2, 7, 0, 0) == batch_indices(10, 2, 7, 0, 0)


def test_augment_flip_rotation_keep_shape_and_range():
    x = torch.rand(1, 16, 16)
    cfg = tiny().train
    y = augment(x, np.random.default_rng(0), cfg)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    never = cfg.replace(augment_prob=0.0)
    assert torch.equal(augment(x, np.random.default_rng(0), never), x)
    always = cfg.replace(augment_prob=1.0, max_rotation=0.0)
    assert torch.equal(augment(x, np.random.default_rng(0), always), torch.flip(x, dims=[2]))
    v = torch.rand(1, 8, 8, 8)
    assert augment(v, np.random.default_rng(0), cfg).shape == v.shape


def test_tracking_writes_csv_and_plot(tmp_path):
    cfg = tiny(
        "vae",
        data={"n_patients": 12, "val_fraction": 0.5},
        autoencoder={"iterations": 4},
        tracking={"at": [2, 4], "n_synthetic": 4, "detector_epochs": 1, "percentile": 80},
    )
    # plumbing sizes, rightly warned about: a one-epoch detector does not learn, and FID from
    # 4 synthetic images is biased
    with (
        pytest.warns(MedmemWarning, match="the detector did not learn"),
        pytest.warns(MedmemWarning, match="FID from 6 real and 4 synthetic images"),
    ):
        result = train(cfg, tmp_path / "run", quiet=True)
    table = pd.read_csv(tmp_path / "run" / "tracking.csv")
    assert list(table["iteration"]) == [2, 4]
    for col in ("n_mem", "n_copies", "pct_mem", "pct_copies", "tau", "val_loss", "fid", "ms_ssim"):
        assert col in table.columns
    assert (table["n_synthetic"] == 4).all()
    assert np.isfinite(table["val_loss"]).all()
    assert (tmp_path / "run" / "tracking.png").stat().st_size > 0
    assert (tmp_path / "run" / "detector" / "config.json").exists()
    assert len(result.tracking) == 2


def test_write_samples_png_and_nifti_load_back(tmp_path):
    imgs2 = torch.rand(3, 1, 16, 16)
    write_samples(imgs2, tmp_path / "s2")
    ds = load_dataset(tmp_path / "s2" / "manifest.csv", image_size=(16, 16), quiet=True)
    assert len(ds) == 3 and ds.spatial_dims == 2
    # the reader rescales intensities, as it does for real images: the pattern is kept
    assert np.corrcoef(ds[0].numpy().ravel(), imgs2[0].numpy().ravel())[0, 1] > 0.999
    imgs3 = torch.rand(2, 1, 8, 16, 16)
    write_samples(imgs3, tmp_path / "s3")
    ds3 = load_dataset(tmp_path / "s3" / "manifest.csv", image_size=(8, 16, 16), quiet=True)
    assert len(ds3) == 2 and ds3.spatial_dims == 3
    assert np.corrcoef(ds3[1].numpy().ravel(), imgs3[1].numpy().ravel())[0, 1] > 0.999


# ---------------------------------------------------------------------------- config
def test_unknown_keys_fail_with_did_you_mean():
    with pytest.raises(InputError, match="Did you mean 'autoencoder'"):
        GenerativeConfig.from_dict({"autoencodr": {}})
    with pytest.raises(
        InputError,
        match=r"config\.diffusion: unknown setting 'iterationz'.*"
        r"Did you mean 'iterations'",
    ):
        GenerativeConfig.from_dict({"diffusion": {"iterationz": 3}}, "config")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "ldn"}, "Did you mean 'ldm'"),
        ({"image_size": [60, 60]}, "divisible by 2\\*\\*2"),
        ({"spatial_dims": 3, "image_size": [16, 16]}, "must have 3 sides"),
        ({"model": "vae", "autoencoder": {"kind": "vq"}}, "Gaussian prior"),
        ({"model": "gan", "image_size": [24, 24]}, "4 \\* 2\\*\\*k"),
        ({"sampling": {"steps": 2000}}, "exceeds diffusion.num_train_timesteps"),
        ({"autoencoder": {"channels": [30, 64, 64]}}, "multiples of norm_num_groups"),
        ({"data": {"source": "files"}}, "data.train is required"),
        ({"train": {"device": "gpu"}}, "train.device"),
        ({"tracking": {"n_synthetic": 1}}, "tracking.n_synthetic"),
    ],
)
def test_config_errors_are_clear(data, message):
    with pytest.raises(InputError, match=message):
        GenerativeConfig.from_dict(data)


def test_config_round_trips_and_yaml_paths_are_relative_to_the_file(tmp_path):
    cfg = tiny("ldm", 3, "vq")
    assert GenerativeConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.yaml").write_text(
        "model: vae\nimage_size: [16, 16]\ndata:\n  source: files\n  train: imgs/\n"
    )
    loaded = load_config(tmp_path / "c.yaml")
    assert Path(loaded.data.train) == tmp_path / "imgs"
    (tmp_path / "bad.yaml").write_text("model: vae\ntrian: {}\n")
    with pytest.raises(InputError, match=r"bad\.yaml.*Did you mean 'train'"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "generative").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    assert cfg.spatial_dims in (2, 3)


def test_load_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(InputError, match="not a saved generative model"):
        GenerativeModel.load(tmp_path)


def test_training_longer_continues_exactly(tmp_path):
    """Resuming a finished run with more iterations == training that long from the start."""
    short, long = tiny("gan"), tiny("gan", gan={"iterations": 6})
    train(short, tmp_path / "extended", quiet=True)
    train(long, tmp_path / "extended", quiet=True, resume=True)
    train(long, tmp_path / "straight", quiet=True)
    a, b = _weights(tmp_path / "extended"), _weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
