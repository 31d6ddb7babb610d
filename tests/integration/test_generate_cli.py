"""`medmem generate train|sample` end to end on tiny phantom data, feeding `medmem audit`."""

from __future__ import annotations

from importlib.util import find_spec

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medmem import MedmemWarning, load_dataset
from medmem.cli import main
from medmem.data import write_phantoms

TINY_YAML = """
model: ldm
spatial_dims: 2
image_size: [16, 16]
data:
  source: files
  train: train/
  val: val/manifest.csv
autoencoder:
  channels: [8, 8]
  latent_channels: 2
  norm_num_groups: 4
  iterations: 3
  batch_size: 4
  adv_start: 1
  disc_channels: 8
  disc_layers: 2
diffusion:
  channels: [8, 8]
  num_head_channels: 8
  norm_num_groups: 4
  num_train_timesteps: 20
  iterations: 3
  batch_size: 4
sampling:
  sampler: ddim
  steps: 4
train:
  checkpoint_every: 2
  log_every: 1
"""


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(args: list[str]):
    return CliRunner().invoke(main, ["--quiet", *args], catch_exceptions=False)


@pytest.mark.skipif(
    find_spec("einops") is None,
    reason="the LDM's DiffusionModelUNet needs einops (pip install einops)",
)
def test_generate_train_sample_then_audit(tmp_path):
    write_phantoms(tmp_path / "train", n_patients=24, size=16, fmt="png")
    write_phantoms(tmp_path / "val", n_patients=24, size=16, fmt="png", first_patient=100)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    run = tmp_path / "run"
    r = _run(["generate", "train", "--config", str(tmp_path / "tiny.yaml"), "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "model" / "config.json").exists()
    assert (run / "checkpoint.safetensors").exists()
    # a second train into the same folder needs --resume; with it, nothing is left to do
    r = _run(["generate", "train", "--config", str(tmp_path / "tiny.yaml"), "--out", str(run)])
    assert r.exit_code == 2 and "--resume" in r.output
    r = _run(
        [
            "generate",
            "train",
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--out",
            str(run),
            "--resume",
        ]
    )
    assert r.exit_code == 0, r.output

    syn = tmp_path / "syn"
    r = _run(
        [
            "generate",
            "sample",
            "--model",
            str(run),
            "--n",
            "5",
            "--out",
            str(syn),
            "--seed",
            "1",
            "--steps",
            "3",
            "--sampler",
            "ddpm",
        ]
    )
    assert r.exit_code == 0, r.output
    manifest = pd.read_csv(syn / "manifest.csv")
    assert list(manifest.columns) == ["path"] and len(manifest) == 5
    ds = load_dataset(syn / "manifest.csv", image_size=(16, 16), quiet=True)
    assert len(ds) == 5 and float(ds[0].max()) <= 1.0

    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: the plumbing only
        r = _run(
            [
                "audit",
                "--train",
                str(tmp_path / "train"),
                "--val",
                str(tmp_path / "val" / "manifest.csv"),
                "--synthetic",
                str(syn / "manifest.csv"),
                "--out",
                str(tmp_path / "audit"),
                "--epochs",
                "1",
                "--image-size",
                "16,16",
                "--n-bootstrap",
                "0",
                "--no-controls",
            ]
        )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "audit" / "summary.json").exists()


def test_generate_config_errors_exit_2_with_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: ldm\nautoencoder:\n  chanels: [8, 8]\n")
    r = _run(
        [
            "generate",
            "train",
            "--config",
            str(tmp_path / "bad.yaml"),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert r.exit_code == 2
    assert "Did you mean 'channels'" in r.output
    r = _run(
        ["generate", "sample", "--model", str(tmp_path), "--n", "2", "--out", str(tmp_path / "s")]
    )
    assert r.exit_code == 2 and "not a saved generative model" in r.output
