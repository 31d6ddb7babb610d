"""One save/load round trip for every object medmem saves: detector, generative model,
text-to-image model, audit result. Loaded == saved (weights, settings, tables)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from medmem import AuditResult, MedmemWarning, audit_embeddings
from medmem.data import ArrayDataset
from medmem.detector import Detector
from medmem.generative import DataConfig, GenerativeConfig, GenerativeModel
from medmem.generative._networks import networks_for_sampling
from medmem.text2image import Text2ImageConfig, TextToImageModel, load_t2i_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _detector(tmp: Path) -> tuple[Any, type]:
    images = np.random.default_rng(0).random((6, 1, 16, 16)).astype(np.float32)
    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: the plumbing only
        det = Detector.train(
            ArrayDataset(images),
            resnet_channels=(8, 8, 8, 8),
            embed_dim=8,
            epochs=1,
            batch_size=3,
            quiet=True,
        )
    return det, Detector


def _check_detector(a: Detector, b: Detector) -> None:
    assert a.config == b.config and a.fingerprint == b.fingerprint
    _same_state(a.model_, b.model_)


def _generative(tmp: Path) -> tuple[Any, type]:
    cfg = GenerativeConfig.from_dict(
        {
            "model": "vae",
            "image_size": [16, 16],
            "data": {"source": "phantoms"},
            "autoencoder": {"channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4},
        }
    )
    torch.manual_seed(0)
    return GenerativeModel(cfg, networks_for_sampling(cfg)), GenerativeModel


def _check_generative(a: GenerativeModel, b: GenerativeModel) -> None:
    assert a.config.to_dict() == b.config.to_dict() and a.networks.keys() == b.networks.keys()
    for name in a.networks:
        _same_state(a.networks[name], b.networks[name])


def _text2image(tmp: Path) -> tuple[Any, type]:
    from test_text2image import make_tiny_autoencoder, make_tiny_encoder

    cfg = Text2ImageConfig.from_dict(
        {
            "autoencoder": str(make_tiny_autoencoder(tmp / "ae")),
            "diffusion": {
                "channels": [8, 8],
                "attention_levels": [False, True],
                "num_head_channels": 8,
                "norm_num_groups": 4,
                "num_train_timesteps": 20,
            },
            "sampling": {"sampler": "ddim", "steps": 4},
            "text": {"encoder": str(make_tiny_encoder(tmp / "enc")), "max_length": 12},
        }
    )
    torch.manual_seed(0)
    model = TextToImageModel.create(cfg)
    model.scale_factor = 0.75
    return model, TextToImageModel


def _check_text2image(a: TextToImageModel, b: TextToImageModel) -> None:
    assert a.scale_factor == b.scale_factor
    _same_state(a.unet, b.unet)
    _same_state(a.autoencoder, b.autoencoder)
    assert torch.equal(a.encode_prompts(["no acute disease ."]).states,
                       b.encode_prompts(["no acute disease ."]).states)  # fmt: skip


def _audit(tmp: Path) -> tuple[Any, type]:
    rng = np.random.default_rng(3)
    result = audit_embeddings(
        rng.normal(size=(20, 8)),
        rng.normal(size=(20, 8)),
        rng.normal(size=(10, 8)),
        train_ids=[f"{i:03d}" for i in range(20)],
        synthetic_ids=[f"s{i}" for i in range(10)],
        train_patient_ids=[f"{i // 2:02d}" for i in range(20)],
        n_bootstrap=20,
    )
    return result, AuditResult


def _check_audit(a: AuditResult, b: AuditResult) -> None:
    import json

    assert b.summary == json.loads(json.dumps(a.summary))
    pd.testing.assert_frame_equal(a.training, b.training)
    pd.testing.assert_frame_equal(a.synthetic, b.synthetic)


CASES: dict[str, tuple[Callable[[Path], tuple[Any, type]], Callable[[Any, Any], None]]] = {
    "detector": (_detector, _check_detector),
    "generative_model": (_generative, _check_generative),
    "text_to_image_model": (_text2image, _check_text2image),
    "audit_result": (_audit, _check_audit),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_save_then_load_gives_the_same_object(kind: str, tmp_path: Path) -> None:
    make, check = CASES[kind]
    obj, cls = make(tmp_path)
    saved = obj.save(tmp_path / "saved")
    loaded = cls.load(saved if saved is not None else tmp_path / "saved")
    check(obj, loaded)
    with pytest.raises(Exception, match="already holds|exists"):  # no silent overwrite
        obj.save(tmp_path / "saved")


def test_one_resume_check_for_generative_and_text_to_image_training(tmp_path: Path) -> None:
    from medmem._checkpoint import check_resume
    from medmem._errors import InputError

    meta = {"n_train": 4, "train_fingerprint": "abc", "config": {"a": {"lr": 1, "iterations": 2}}}
    same = {"data": {"n_train": 4, "train_fingerprint": "abc"}, "elsewhere": "another folder"}
    check_resume(tmp_path, meta, saved_settings=meta["config"], settings=meta["config"], **same)
    with pytest.raises(InputError, match=r"other images \(n_train=4; now n_train=5\)"):
        check_resume(
            tmp_path,
            meta,
            data={"n_train": 5, "train_fingerprint": "abc"},
            saved_settings={},
            settings={},
            elsewhere="x",
        )
    now = {"a": {"lr": 2, "iterations": 3}}
    with pytest.raises(InputError, match=r"other settings \(a\.lr: 1 saved vs 2 now\)\."):
        check_resume(
            tmp_path,
            meta,
            saved_settings=meta["config"],
            settings=now,
            may_change=lambda d: d.startswith("a.iterations:"),
            **same,
        )


def _public_config_classes() -> dict[str, type]:
    """Every ``*Config`` dataclass reachable through a public medmem module's public names."""
    import dataclasses
    import importlib
    import pkgutil

    import medmem

    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(medmem.__path__, "medmem."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        for name in dir(module):
            obj = getattr(module, name)
            if (
                not name.startswith("_")
                and name.endswith("Config")
                and isinstance(obj, type)
                and obj.__module__.startswith("medmem")
                and dataclasses.is_dataclass(obj)
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def _study_config() -> Any:
    from medmem.study import load_study

    return load_study(CONFIGS / "study/tiny-phantoms.yaml")


# Configs without defaults for every field; the others are built with no arguments.
CONFIG_EXAMPLES: dict[str, Callable[[], Any]] = {
    "StudyConfig": _study_config,
    "DataConfig": lambda: DataConfig(source="phantoms"),
    "Text2ImageConfig": lambda: load_t2i_config(CONFIGS / "text2image/ldm-t2i-cpu.yaml"),
}


def test_the_config_walk_finds_the_known_configs() -> None:
    names = {cls.__name__ for cls in _public_config_classes().values()}
    assert {"DetectorConfig", "VariationConfig", "AlignConfig", "GenerativeConfig"} <= names


@pytest.mark.parametrize("path", sorted(_public_config_classes()))
def test_every_public_config_is_a_config_section_that_round_trips(path: str) -> None:
    import json

    from medmem._section import ConfigSection

    cls = _public_config_classes()[path]
    assert issubclass(cls, ConfigSection), f"{path} should derive from ConfigSection"
    config = CONFIG_EXAMPLES.get(cls.__name__, cls)()
    data = json.loads(json.dumps(config.to_dict()))  # plain JSON, as saved
    assert cls.from_dict(data) == config
    assert config.replace() == config and config.merge({}) == config


def test_merge_changes_nested_settings_only() -> None:
    from medmem._errors import InputError

    base = load_t2i_config(CONFIGS / "text2image/ldm-t2i-cpu.yaml")
    changed = base.merge({"train": {"seed": 7}, "text": {"caption_replacement": 0.4}}, "seed7")
    assert changed.train == base.train.replace(seed=7)
    assert changed.text == base.text.replace(caption_replacement=0.4)
    assert changed.diffusion == base.diffusion and changed.data == base.data
    with pytest.raises(InputError, match=r"seed7.train: unknown setting 'sed'"):
        base.merge({"train": {"sed": 1}}, "seed7")
