"""The copy detector: encoder, NT-Xent, config, training, resume, save/load, embedding cache."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from medmem import InputError, MedmemError, MedmemWarning, NotFittedError, OutputExistsError
from medmem.data import ArrayDataset
from medmem.detector import (
    DEFAULT_VARIATION_KINDS,
    PAPER_VARIATION_KINDS,
    ContrastiveEncoder,
    Detector,
    DetectorConfig,
    VariationConfig,
    _cache,
    _checkpoint,
    nt_xent,
    vary,
)

# Detectors trained here for a few epochs on a handful of images are for the plumbing and are
# not meant to learn; that they say so is checked by test_training_stuck_at_the_chance_loss_warns
# and where a test trains one that must not learn. Any other medmem warning fails a test.
pytestmark = pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning")

# A small, fast 2D setting for the tests (the defaults are sized for real data).
TINY = dict(
    resnet_channels=(8, 16, 16, 32),
    embed_dim=16,
    epochs=2,
    batch_size=4,
    lr=1e-3,
    seed=0,
)


def smooth_images(n: int, size: int, seed: int, spatial_dims: int = 2) -> np.ndarray:
    """Random smooth images in [0, 1]: bicubic upsampling of 6^d noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 1) + (6,) * spatial_dims, generator=g)
    mode = "bicubic" if spatial_dims == 2 else "trilinear"
    x = F.interpolate(low, size=(size,) * spatial_dims, mode=mode, align_corners=False)[:, 0]
    dims = tuple(range(1, spatial_dims + 1))
    x = x - x.amin(dim=dims, keepdim=True)
    return (x / x.amax(dim=dims, keepdim=True)).numpy()


@pytest.fixture(scope="module")
def train_set() -> ArrayDataset:
    return ArrayDataset(smooth_images(8, 32, seed=1))


@pytest.fixture(scope="module")
def detector(train_set) -> Detector:
    return Detector.train(train_set, quiet=True, **TINY)


def _weights(det: Detector) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in det.model_.state_dict().items()}


def _assert_same_weights(a: Detector, b: Detector) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------- encoder
ENCODER_CASES = [
    ({"spatial_dims": 2}, (2, 1, 32, 32), (2, 128)),
    ({"spatial_dims": 2, "embed_dim": 16, "norm": "batch"}, (3, 1, 48, 40), (3, 16)),
    ({"spatial_dims": 2, "in_channels": 3, "norm": "instance"}, (2, 3, 32, 32), (2, 128)),
    (
        {"spatial_dims": 2, "arch": "conv", "image_size": (16, 32), "embed_dim": 24},
        (2, 1, 16, 32),
        (2, 24),
    ),
    ({"spatial_dims": 3, "image_size": (16, 16, 16)}, (2, 1, 16, 16, 16), (2, 32)),
    (
        {"spatial_dims": 3, "image_size": (8, 16, 32), "conv_channels": 8, "norm": "batch"},
        (2, 1, 8, 16, 32),
        (2, 32),
    ),
    (
        {"spatial_dims": 3, "arch": "resnet", "resnet_channels": (8, 8, 16, 16)},
        (2, 1, 16, 16, 16),
        (2, 32),
    ),
]


@pytest.mark.parametrize("kwargs, in_shape, out_shape", ENCODER_CASES)
def test_encoder_shapes(kwargs, in_shape, out_shape):
    net = ContrastiveEncoder(**kwargs).eval()
    with torch.no_grad():
        out = net(torch.rand(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()


def test_encoder_defaults_follow_the_paper():
    assert ContrastiveEncoder(2).arch == "resnet" and ContrastiveEncoder(2).embed_dim == 128
    # 3D: a ResNet by default (the paper's conv encoder collapsed on real MRI), conv on request
    assert ContrastiveEncoder(3, image_size=(16, 16, 16)).arch == "resnet"
    enc3 = ContrastiveEncoder(3, arch="conv", image_size=(16, 16, 16))
    assert enc3.arch == "conv" and enc3.embed_dim == 32
    # the conv encoder's bottleneck: 8 channels at 4^3 -> flatten -> dense
    linear = [m for m in enc3.modules() if isinstance(m, torch.nn.Linear)]
    assert linear[0].in_features == 8 * 4**3 and linear[-1].out_features == 32


def test_encoder_errors():
    with pytest.raises(InputError, match=r"4 \* 2\*\*k"):
        ContrastiveEncoder(3, arch="conv", image_size=(48, 64, 64))
    with pytest.raises(InputError, match="needs image_size"):
        ContrastiveEncoder(3, arch="conv")
    net = ContrastiveEncoder(3, image_size=(16, 16, 16))
    with pytest.raises(InputError, match=r"expects input \(B, 1, 16, 16, 16\)"):
        net(torch.rand(2, 1, 16, 16, 8))


# ---------------------------------------------------------------- NT-Xent
def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The S1.1 formula written out anchor by anchor, in float64."""
    e = [v.double() for v in torch.cat([z1, z2])]
    k = len(z1)

    def s(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    total = 0.0
    for a in range(2 * k):
        p = a + k if a < k else a - k
        num = math.exp(s(e[a], e[p]) / t)
        den = sum(math.exp(s(e[a], e[j]) / t) for j in range(2 * k) if j != a)
        total += -math.log(num / den)
    return total / (2 * k)


@pytest.mark.parametrize("k, d, t", [(1, 4, 0.5), (2, 3, 0.07), (5, 8, 0.5), (8, 32, 1.0)])
def test_nt_xent_matches_the_per_anchor_formula(k, d, t):
    g = torch.Generator().manual_seed(k * 100 + d)
    z1, z2 = torch.randn(k, d, generator=g), torch.randn(k, d, generator=g)
    got = float(nt_xent(z1, z2, temperature=t))
    assert got == pytest.approx(_nt_xent_loop(z1, z2, t), abs=1e-5, rel=1e-5)


def test_nt_xent_is_lower_for_aligned_pairs():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 32, generator=g)
    aligned = z1 + 0.05 * torch.randn(16, 32, generator=g)
    random_ = torch.randn(16, 32, generator=g)
    assert float(nt_xent(z1, aligned)) < float(nt_xent(z1, random_)) - 1.0


def test_nt_xent_gradients_and_errors():
    z1 = torch.randn(4, 8, requires_grad=True)
    nt_xent(z1, torch.randn(4, 8)).backward()
    assert torch.isfinite(z1.grad).all()
    with pytest.raises(InputError, match="same shape"):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(InputError, match="temperature"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)


# ---------------------------------------------------------------- config
def test_config_defaults_per_dimension():
    c2, c3 = DetectorConfig.default(2), DetectorConfig.default(3)
    assert (c2.arch, c2.embed_dim, c2.batch_size) == ("resnet", 128, 64)
    assert (c3.arch, c3.embed_dim, c3.batch_size) == ("resnet", 32, 16)
    assert c2.temperature == 0.07 and c2.lr == 1e-3 and c2.epochs == 200 and c2.early_stopping
    assert c2.variations.kinds == DEFAULT_VARIATION_KINDS
    assert VariationConfig.paper().kinds == ("flip", "rotate", "contrast")
    assert c2.variations.max_rotation == 5.0
    # the network works at 64^2 / 32^3 at most; larger images are averaged down first
    assert c2.replace(image_size=(128, 96)).encoder_input_size == (64, 64)
    assert c2.replace(image_size=(48, 48)).encoder_input_size == (48, 48)
    assert c3.replace(image_size=(64, 64, 16)).encoder_input_size == (32, 32, 16)
    assert c2.replace(image_size=(128, 128), input_size=(96, 96)).encoder_input_size == (96, 96)
    assert DetectorConfig(spatial_dims=3) == c3
    # dimension-dependent defaults follow a change of spatial_dims; explicit values stay
    assert c2.replace(spatial_dims=3) == c3
    assert c2.replace(embed_dim=64).replace(spatial_dims=3).embed_dim == 64


def test_config_round_trips_through_json():
    c = DetectorConfig.default(
        3,
        image_size=(32, 64, 64),
        variations=VariationConfig(kinds=("flip", "noise"), flip_axes=(2,)),
    )
    again = DetectorConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 4}, r"spatial_dims must be one of \[2, 3\]"),
        ({"arch": "resnt"}, "Did you mean 'resnet'"),
        ({"image_size": (64, 64, 64)}, "must have 2 sides"),
        ({"spatial_dims": 3, "arch": "conv", "image_size": (24, 32, 32)}, r"4 \* 2\*\*k"),
        ({"temperature": 0.0}, r"temperature must be in \(0.0"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be in"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"resnet_layers": (1, 1, 1)}, "need 4 entries"),
        ({"resnet_channels": (12, 16, 32, 64)}, "multiples of 8"),
        ({"variations": {"kinds": ["flip"], "max_rotaton": 3}}, "Did you mean 'max_rotation'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        DetectorConfig(**kwargs)


def test_config_from_dict_unknown_key_suggests():
    with pytest.raises(InputError, match="unknown setting 'epoch'. Did you mean 'epochs'"):
        DetectorConfig.from_dict({"spatial_dims": 2, "epoch": 3})
    with pytest.raises(InputError, match="Did you mean 'batch_size'"):
        DetectorConfig().replace(batchsize=3)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DetectorConfig().epochs = 3  # type: ignore[misc]


# ---------------------------------------------------------------- detector basics
def test_untrained_detector_says_what_to_call(train_set):
    det = Detector(DetectorConfig())
    with pytest.raises(NotFittedError, match="call Detector.train or Detector.load"):
        det.embed(train_set)
    with pytest.raises(NotFittedError, match="call Detector.train or Detector.load"):
        det.fingerprint  # noqa: B018


def test_embed_shape_dtype_and_size_check(detector, train_set):
    emb = detector.embed(train_set, batch_size=3, quiet=True)
    assert emb.shape == (8, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    with pytest.raises(InputError, match=r"preprocess the images to image_size=\(32, 32\)"):
        detector.embed(ArrayDataset(smooth_images(2, 16, 0)), quiet=True)
    with pytest.raises(InputError, match="ArrayDataset"):
        detector.embed([torch.zeros(1, 32, 32)])


def test_train_input_errors(train_set):
    with pytest.raises(InputError, match="at least 2 images"):
        Detector.train(ArrayDataset(smooth_images(1, 32, 0)), quiet=True, **TINY)
    with pytest.raises(InputError, match="spatial_dims=3 but the dataset is 2D"):
        Detector.train(train_set, config=DetectorConfig.default(3), quiet=True)
    with pytest.raises(InputError, match=r"image_size=\(64, 64\) but the dataset"):
        Detector.train(train_set, image_size=(64, 64), quiet=True, **TINY)
    with pytest.raises(InputError, match="Did you mean 'epochs'"):
        Detector.train(train_set, epoch=1, quiet=True)


def test_training_records_history_and_leaves_global_rng_alone(train_set):
    state = torch.get_rng_state()
    det = Detector.train(train_set, quiet=True, **TINY)
    assert torch.equal(state, torch.get_rng_state())
    assert len(det.loss_history_) == 2 and all(np.isfinite(det.loss_history_))
    assert det.n_train_ == 8 and det.train_fingerprint_ == train_set.fingerprint()
    assert det.config.image_size == (32, 32)


# ---------------------------------------------------------------- reproducibility and resume
@pytest.mark.cpu_exact
def test_same_seed_same_weights_other_seed_differs(detector, train_set):
    again = Detector.train(train_set, quiet=True, **TINY)
    _assert_same_weights(detector, again)
    assert again.fingerprint == detector.fingerprint
    other = Detector.train(train_set, quiet=True, **{**TINY, "seed": 1})
    assert other.fingerprint != detector.fingerprint


@pytest.mark.cpu_exact
def test_data_loader_workers_do_not_change_the_result(detector, train_set):
    det = Detector.train(train_set, quiet=True, num_workers=2, **TINY)
    _assert_same_weights(detector, det)
    assert det.fingerprint == detector.fingerprint  # num_workers is not part of identity


TINY_3D = dict(
    conv_channels=8, conv_max_channels=16, epochs=3, batch_size=2, lr=1e-3, vary_both=True
)


@pytest.mark.cpu_exact
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_resume_after_interruption_equals_uninterrupted_run(
    spatial_dims, detector, train_set, tmp_path, monkeypatch
):
    if spatial_dims == 2:
        data, settings, straight = train_set, TINY, detector
    else:  # the 3D conv head has dropout: its randomness must resume exactly too
        data = ArrayDataset(smooth_images(4, 16, seed=5, spatial_dims=3))
        settings = TINY_3D
        straight = Detector.train(data, quiet=True, **settings)
    real_save = _checkpoint.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(_checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Detector.train(data, checkpoint_dir=tmp_path, quiet=True, **settings)
    monkeypatch.setattr(_checkpoint, "save_checkpoint", real_save)
    assert len(calls) == 1

    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["medmem"])
        assert meta["epoch"] == 1
        assert any(k.startswith("optimizer/") for k in fh.keys())

    resumed = Detector.train(data, checkpoint_dir=tmp_path, quiet=True, **settings)
    _assert_same_weights(straight, resumed)
    assert resumed.loss_history_ == straight.loss_history_
    assert resumed.fingerprint == straight.fingerprint

    # A finished run is returned as is.
    done = Detector.train(data, checkpoint_dir=tmp_path, quiet=True, **settings)
    _assert_same_weights(straight, done)


def test_resume_refuses_other_data_or_settings(train_set, tmp_path):
    Detector.train(train_set, checkpoint_dir=tmp_path, quiet=True, **{**TINY, "epochs": 1})
    other = ArrayDataset(smooth_images(8, 32, seed=99))
    with pytest.raises(InputError, match="other images"):
        Detector.train(other, checkpoint_dir=tmp_path, quiet=True, **{**TINY, "epochs": 1})
    with pytest.raises(InputError, match=r"other settings \(lr: 0.001 saved vs 0.002 now\)"):
        Detector.train(
            train_set, checkpoint_dir=tmp_path, quiet=True, **{**TINY, "epochs": 1, "lr": 2e-3}
        )


def test_corrupt_checkpoint_is_reported(train_set, tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="checkpoint.safetensors: not a readable"):
        Detector.train(train_set, checkpoint_dir=tmp_path, quiet=True, **TINY)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(detector, train_set, tmp_path, monkeypatch):
    detector.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    meta = json.loads((tmp_path / "det" / "config.json").read_text())
    assert meta["schema_version"] == 2 and meta["n_train"] == 8
    assert meta["train_fingerprint"] == train_set.fingerprint()
    assert meta["loss_history"] == detector.loss_history_
    assert "medmem_version" in meta and meta["config"]["embed_dim"] == 16

    def no_unpickling(*args, **kwargs):
        raise AssertionError("Detector.load must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    loaded = Detector.load(tmp_path / "det")
    monkeypatch.undo()

    assert loaded.fingerprint == detector.fingerprint
    assert loaded.config == detector.config
    np.testing.assert_array_equal(
        loaded.embed(train_set, quiet=True), detector.embed(train_set, quiet=True)
    )


def test_load_errors_name_the_file(detector, tmp_path):
    with pytest.raises(InputError, match="config.json not found"):
        Detector.load(tmp_path / "nothing")
    d = detector.save(tmp_path / "det")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        detector.save(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="model.safetensors: not a readable safetensors"):
        Detector.load(d)
    detector.save(d, overwrite=True)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(InputError, match="config.json: corrupt JSON"):
        Detector.load(d)
    detector.save(d, overwrite=True)
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["seed"] = 5  # config no longer matches the weights' fingerprint
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="does not match"):
        Detector.load(d)


# ---------------------------------------------------------------- embedding cache
def _count_images(det: Detector) -> list[int]:
    seen: list[int] = []
    det.model_.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    return seen


def test_embed_cache_hits_and_recomputes_changed_images(train_set, tmp_path):
    det = Detector.train(train_set, quiet=True, **{**TINY, "epochs": 1})
    seen = _count_images(det)
    first = det.embed(train_set, cache_dir=tmp_path, batch_size=3, quiet=True)
    assert sum(seen) == 8

    seen.clear()
    second = det.embed(train_set, cache_dir=tmp_path, quiet=True)
    assert sum(seen) == 0  # all read from the cache
    np.testing.assert_array_equal(first, second)

    images = np.stack([train_set.array(i) for i in range(8)])
    images[5] = images[5][::-1]  # image 5's content changes
    changed = ArrayDataset(images)
    seen.clear()
    third = det.embed(changed, cache_dir=tmp_path, quiet=True)
    assert sum(seen) == 1  # only image 5 is recomputed
    np.testing.assert_array_equal(third[:5], first[:5])
    fresh = det.embed(changed, quiet=True)
    np.testing.assert_allclose(third[5], fresh[5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(third[5], first[5])

    # one shard per call that computed something
    shards = list(tmp_path.rglob("shard-*.safetensors"))
    assert len(shards) == 2


def test_embed_cache_merges_shards(train_set, tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "MAX_SHARDS", 2)
    det = Detector.train(train_set, quiet=True, **{**TINY, "epochs": 1})
    full = det.embed(train_set, quiet=True)
    for i in range(4):  # four calls, two new images each
        det.embed(
            ArrayDataset(np.stack([train_set.array(j) for j in (2 * i, 2 * i + 1)])),
            cache_dir=tmp_path,
            quiet=True,
        )
    assert len(list(tmp_path.rglob("shard-*.safetensors"))) <= 2
    seen = _count_images(det)
    np.testing.assert_allclose(
        det.embed(train_set, cache_dir=tmp_path, quiet=True), full, rtol=1e-5, atol=1e-6
    )
    assert sum(seen) == 0


def test_cache_is_keyed_by_detector(train_set, tmp_path):
    a = Detector.train(train_set, quiet=True, **{**TINY, "epochs": 1})
    b = Detector.train(train_set, quiet=True, **{**TINY, "epochs": 1, "seed": 3})
    ea = a.embed(train_set, cache_dir=tmp_path, quiet=True)
    eb = b.embed(train_set, cache_dir=tmp_path, quiet=True)
    assert not np.allclose(ea, eb)


# ---------------------------------------------------------------- 3D and behaviour
def test_3d_training_and_embedding():
    vols = ArrayDataset(smooth_images(4, 16, seed=2, spatial_dims=3))
    det = Detector.train(vols, epochs=1, batch_size=2, resnet_channels=(8, 8, 16, 16), quiet=True)
    assert det.config.arch == "resnet"
    emb = det.embed(vols, quiet=True)
    assert emb.shape == (4, 32) and np.isfinite(emb).all()
    conv = Detector.train(
        vols,
        epochs=1,
        batch_size=2,
        arch="conv",
        conv_channels=8,
        conv_max_channels=16,
        quiet=True,
    )
    assert conv.embed(vols, quiet=True).shape == (4, 32)


def test_trained_detector_matches_varied_copies_to_their_originals():
    """A varied copy (flip, rotation, contrast) of image i must correlate more with image i
    than with any other training image, for most i. Pixel correlation fails at this
    (flips), and so does the untrained encoder; training is what makes it work."""
    n = 16
    images = smooth_images(n, 32, seed=0)
    train = ArrayDataset(images)
    varied = np.stack(
        [vary(images[i][None], 1000 + i, kinds=PAPER_VARIATION_KINDS)[0] for i in range(n)]
    )
    copies = ArrayDataset(varied)

    def hits(emb_copies: np.ndarray, emb_train: np.ndarray) -> float:
        def standardise(a):
            a = a - a.mean(axis=1, keepdims=True)
            return a / np.linalg.norm(a, axis=1, keepdims=True)

        corr = standardise(emb_copies) @ standardise(emb_train).T  # Pearson, (copy, train)
        return float((corr.argmax(axis=1) == np.arange(n)).mean())

    settings = dict(epochs=30, batch_size=16, lr=1e-3, seed=0, variations=VariationConfig.paper())
    det = Detector.train(train, quiet=True, **settings)
    trained = hits(det.embed(copies, quiet=True), det.embed(train, quiet=True))
    with pytest.warns(MedmemWarning, match="did not learn"):
        untrained = Detector.train(train, quiet=True, **{**settings, "epochs": 1, "lr": 1e-9})
    before = hits(untrained.embed(copies, quiet=True), untrained.embed(train, quiet=True))
    pixels = hits(varied.reshape(n, -1), images.reshape(n, -1))
    assert trained >= 0.75, (trained, before, pixels)
    assert trained > before + 0.25 and trained > pixels + 0.25


def test_training_divergence_is_reported(train_set, monkeypatch):
    from medmem.detector import _detector

    monkeypatch.setattr(_detector, "nt_xent", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(MedmemError, match="diverged"):
        Detector.train(train_set, quiet=True, **TINY)


def test_training_stuck_at_the_chance_loss_warns() -> None:
    import warnings

    from medmem.detector._detector import chance_loss, warn_if_not_learned

    cfg = DetectorConfig.default(3)
    assert chance_loss(10) == pytest.approx(math.log(19))
    with pytest.warns(MedmemWarning, match="did not learn"):
        assert warn_if_not_learned([4.8, 3.1, 2.93], 10, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_not_learned([4.8, 1.2, 0.4], 10, cfg)
        assert not warn_if_not_learned([], 10, cfg)
