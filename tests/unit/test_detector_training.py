"""Detector training: the early-stopping rule, the encoder's input size, the audit's detector
folder and fingerprints, and 3D preprocessing that keeps the field of view."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medmem
from medmem import MedmemWarning, make_controls
from medmem.data import ArrayDataset, Preprocess
from medmem.detector import ContrastiveEncoder, Detector, DetectorConfig, VariationConfig
from medmem.detector._detector import _EarlyStopping

FAST = dict(
    resnet_channels=(8, 16, 16, 32),
    embed_dim=16,
    batch_size=8,
    lr=1e-3,
    seed=0,
    variations=VariationConfig.paper(),
)


def _smooth(n: int, size: int, seed: int, spatial_dims: int = 2) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 1) + (5,) * spatial_dims, generator=g)
    mode = "bicubic" if spatial_dims == 2 else "trilinear"
    x = F.interpolate(low, size=(size,) * spatial_dims, mode=mode, align_corners=False)[:, 0]
    dims = tuple(range(1, spatial_dims + 1))
    x = x - x.amin(dim=dims, keepdim=True)
    return (x / x.amax(dim=dims, keepdim=True)).numpy()


# ---------------------------------------------------------------- the stopping rule
def _stopper(**kw) -> _EarlyStopping:
    kw = {"patience": 2, "min_delta": 0.01, "min_epochs": 3, **kw}
    cfg = DetectorConfig(spatial_dims=2, **kw)
    return _EarlyStopping(cfg, steps_per_epoch=1)


def test_stopping_rule_waits_for_patience_checks_without_improvement():
    s = _stopper()
    scores = [0.2, 0.8, 0.8, 0.8, 0.8, 0.8]
    stops = [s.update(e + 1, {"retrieval": m}) for e, m in enumerate(scores)]
    # the mean of the last three checks: 0.2, 0.5, 0.6, 0.8 (improving), 0.8, 0.8 (not)
    smoothed = [h["retrieval_smoothed"] for h in s.history]
    assert smoothed == pytest.approx([0.2, 0.5, 0.6, 0.8, 0.8, 0.8])
    assert stops == [False, False, False, False, False, True]
    assert s.best == pytest.approx(0.8)
    assert [h["epoch"] for h in s.history] == [1, 2, 3, 4, 5, 6]


def test_stopping_rule_respects_min_epochs_and_one_noisy_check_does_not_reset_it():
    s = _stopper(min_epochs=4)
    assert not s.update(1, {"retrieval": 0.5})
    assert not s.update(2, {"retrieval": 0.5})
    assert not s.update(3, {"retrieval": 0.5})  # patience reached, but epoch 3 < min_epochs 4
    assert s.update(4, {"retrieval": 0.5})
    t = _stopper()
    for e, m in enumerate([0.5, 0.5, 0.5]):
        t.update(e + 1, {"retrieval": m})
    # a single lucky check moves the three-check mean by a third only
    assert t.update(4, {"retrieval": 0.52})


def test_stopping_rule_state_round_trips_through_json():
    s = _stopper()
    s.update(1, {"retrieval": 0.2})
    s.update(2, {"retrieval": 0.2})
    t = _stopper()
    t.restore(json.loads(json.dumps(s.state())))
    assert (t.best, t.wait, t.history) == (s.best, s.wait, s.history)
    empty = _stopper()
    empty.restore(json.loads(json.dumps(_stopper().state())))
    assert empty.best == -math.inf


def test_eval_interval_and_min_epochs_follow_steps_per_epoch():
    cfg = DetectorConfig(spatial_dims=2)
    s = _EarlyStopping(cfg, steps_per_epoch=2)
    assert s.eval_every == 5 and s.min_epochs == 75  # about every 10 steps, >= 150 steps
    assert _EarlyStopping(cfg, steps_per_epoch=40).eval_every == 1


# stopped at min_epochs = 4 by construction: too soon to learn, and the detector says so
@pytest.mark.cpu_exact
@pytest.mark.filterwarnings("ignore:the detector did not learn:medmem.MedmemWarning")
def test_training_stops_early_records_why_and_resumes_to_the_same_weights(tmp_path):
    train = ArrayDataset(_smooth(16, 32, seed=3))
    settings = dict(FAST, epochs=60, eval_every=1, patience=2, min_epochs=4, min_delta=1.0)
    det = Detector.train(train, quiet=True, **settings)
    # no later check can beat the first by 1.0: training ends at min_epochs
    assert det.stopped_early_ and det.epochs_trained == 4 < 60
    assert [h["epoch"] for h in det.probe_history_] == [1, 2, 3, 4]
    assert {"margin", "retrieval", "pos_q05", "novel_q95"} <= set(det.probe_history_[-1])
    # resumable: the stop decision is part of the checkpoint
    ckpt = tmp_path / "ckpt"
    Detector.train(train, quiet=True, checkpoint_dir=ckpt, **{**settings, "epochs": 60})
    again = Detector.train(train, quiet=True, checkpoint_dir=ckpt, **settings)
    assert again.epochs_trained == 4 and again.stopped_early_
    for k, v in det.model_.state_dict().items():
        assert torch.equal(v, again.model_.state_dict()[k]), k
    # saved and loaded with the record of how it trained
    det.save(tmp_path / "det")
    loaded = Detector.load(tmp_path / "det")
    assert loaded.epochs_trained == 4 and loaded.stopped_early_
    assert loaded.probe_history_ == det.probe_history_


def test_without_early_stopping_every_epoch_is_trained():
    train = ArrayDataset(_smooth(8, 32, seed=4))
    det = Detector.train(train, quiet=True, **dict(FAST, epochs=3, early_stopping=False))
    assert det.epochs_trained == 3 and not det.stopped_early_ and det.probe_history_ == []


def test_probe_scores_retrieval_and_margin_by_hand():
    """The stopping signal measures what the audit needs: each varied copy matched to its
    own source rather than to another image."""
    from medmem.detector._detector import _Probe

    imgs = ArrayDataset(_smooth(12, 16, seed=5))
    same = DetectorConfig(
        spatial_dims=2,
        image_size=(16, 16),
        probe_size=8,
        variations=VariationConfig(kinds=("brightness",), max_brightness=0.0),
    )
    probe = _Probe(imgs, same)  # views equal their sources
    assert probe.originals.shape == (8, 1, 16, 16) and torch.equal(probe.views, probe.originals)

    class Pixels(torch.nn.Module):  # the probe calls the encoder's network (at input size)
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Flatten()

    got = probe.evaluate(Pixels(), torch.device("cpu"))
    assert got["retrieval"] == 1.0 and got["pos_q05"] == pytest.approx(1.0)
    # novel_q95 is the 95th percentile of each source's best correlation with another source
    e = probe.originals.flatten(1).double()
    e = e - e.mean(1, keepdim=True)
    e = e / e.norm(dim=1, keepdim=True)
    g = e @ e.T
    g.fill_diagonal_(-2.0)
    assert got["novel_q95"] == pytest.approx(float(torch.quantile(g.max(1).values, 0.95)))
    assert got["margin"] == pytest.approx(got["pos_q05"] - got["novel_q95"])

    class Noise(torch.nn.Module):
        g = torch.Generator().manual_seed(0)  # advances: originals and views differ

        def forward(self, x):
            return torch.randn(len(x), 4, generator=self.g)

    class Blind(torch.nn.Module):  # embeddings unrelated to the image: retrieval at chance
        def __init__(self):
            super().__init__()
            self.net = Noise()

    assert probe.evaluate(Blind(), torch.device("cpu"))["retrieval"] <= 0.5


# ---------------------------------------------------------------- input size
def test_encoder_works_at_its_input_size():
    enc = ContrastiveEncoder(2, image_size=(64, 64), input_size=(32, 32), embed_dim=8)
    assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 8)
    with pytest.raises(medmem.InputError, match="expects input"):
        enc(torch.rand(2, 1, 32, 32))  # inputs are of image_size, not input_size
    # area resampling is the exact 2x2 mean for a factor of two
    from medmem.detector._encoder import resample

    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(resample(x, (4, 4)), F.avg_pool2d(x, 2))
    conv = ContrastiveEncoder(
        3, arch="conv", image_size=(32, 32, 32), input_size=(16, 16, 16), embed_dim=8
    )
    assert conv(torch.rand(1, 1, 32, 32, 32)).shape == (1, 8)


def test_detector_input_size_is_in_its_identity():
    cfg = DetectorConfig(spatial_dims=2, image_size=(128, 128))
    assert cfg.encoder_input_size == (64, 64)
    assert cfg.identity_dict()["input_size"] is None  # auto, derived from image_size
    assert cfg.replace(input_size=(128, 128)).identity_dict()["input_size"] == [128, 128]
    with pytest.raises(medmem.InputError, match="input_size must have 2 sides"):
        DetectorConfig(spatial_dims=2, input_size=(32, 32, 32))


# ---------------------------------------------------------------- 3D field of view
def _corner_volume() -> np.ndarray:
    vol = np.zeros((40, 60, 80), dtype=np.float32)
    vol[5:15, 5:20, 10:30] = 1.0  # anatomy near a corner, outside a central 16^3 crop
    vol[20, 30, 40] = 0.5
    return vol


def test_3d_default_preprocessing_keeps_the_field_of_view():
    vol = _corner_volume()
    out = Preprocess(3, image_size=16)(vol)
    assert out.shape == (1, 16, 16, 16)
    # the corner block is still there, at the same relative place and of the same share
    assert float(out[0, 2:6, 1:5, 2:6].mean()) > 0.8
    share = float((out > 0.5).float().mean())
    assert share == pytest.approx((10 * 15 * 20) / vol.size, rel=0.35)
    assert "whole field of view kept" in Preprocess(3, image_size=16).describe()


def test_crop_mode_keeps_the_voxel_size_and_says_it_discards():
    pre = Preprocess(3, image_size=16, spatial_mode="crop")
    out = pre(_corner_volume())
    assert float(out.max()) == 0.5  # only the central voxel is left: the block is cropped
    assert "discarded" in pre.describe() and pre.key() != Preprocess(3, image_size=16).key()
    with pytest.raises(medmem.InputError, match="spatial_mode must be one of"):
        Preprocess(3, spatial_mode="stretch")


def test_load_dataset_passes_the_spatial_mode(tmp_path):
    np.save(tmp_path / "a.npy", _corner_volume())
    ds = medmem.load_dataset(tmp_path, image_size=16, quiet=True)
    assert ds.preprocess.spatial_mode == "resample" and float(ds[0].max()) > 0.9
    crop = medmem.load_dataset(tmp_path, image_size=16, spatial_mode="crop", quiet=True)
    assert float(crop[0].max()) == 0.5
    with pytest.raises(medmem.InputError, match="spatial_mode"):
        medmem.load_dataset(tmp_path, spatial_mode="nope", quiet=True)


# ---------------------------------------------------------------- the audit's detector
def test_audit_saves_its_detector_and_the_training_set_fingerprint(tmp_path):
    imgs = _smooth(40, 32, seed=6)
    train, val = ArrayDataset(imgs[:20]), ArrayDataset(imgs[20:])
    syn = ArrayDataset(np.concatenate([imgs[:3], _smooth(5, 32, seed=7)]))
    result = medmem.audit(
        train,
        val,
        syn,
        n_bootstrap=0,
        n_controls=6,
        quiet=True,
        detector_overrides=dict(FAST, epochs=2, early_stopping=False),
    )
    s = result.summary
    assert s["fingerprints"]["detector_training_set"] == train.fingerprint()
    assert s["detector"]["trained_here"] and s["detector"]["epochs_trained"] == 2
    assert s["detector"]["input_size"] == [32, 32]
    result.save(tmp_path / "audit")
    det = Detector.load(tmp_path / "audit" / "detector")
    assert det.fingerprint == s["fingerprints"]["detector"]
    assert det.train_fingerprint_ == train.fingerprint()
    # the saved detector reproduces the verdict
    again = medmem.audit(train, val, syn, detector=det, n_bootstrap=0, n_controls=0, quiet=True)
    assert again.summary["tau"] == s["tau"] and again.summary["n_copies"] == s["n_copies"]
    assert not again.summary["detector"]["trained_here"] and again.detector is None
    assert not (tmp_path / "audit2").exists()
    again.save(tmp_path / "audit2")
    assert not (tmp_path / "audit2" / "detector").exists()


def test_controls_are_changes_the_detector_did_not_train_on():
    imgs = _smooth(24, 32, seed=8)
    train = ArrayDataset(imgs)
    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: the plumbing only
        det = Detector.train(train, quiet=True, **dict(FAST, epochs=1, early_stopping=False))
    emb, sources, info = make_controls(train, det, n_controls=9, seed=1)
    assert emb.shape == (9, 16) and len(set(sources.tolist())) == 9
    assert set(info["held_out_kinds"]) == {"elastic", "sharpen", "patch"}
    assert not set(info["held_out_kinds"]) & set(det.config.variations.kinds)
    assert sorted(info["control_kinds"]) == sorted(["elastic", "sharpen", "patch"] * 3)
    with pytest.raises(medmem.InputError, match="not a variation kind"):
        make_controls(train, det, n_controls=3, kinds=["warp"])
