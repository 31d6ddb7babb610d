"""`medmem prompts train|score|mitigate` end to end on a tiny model (random 1-layer BERT)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from medmem import MedmemWarning
from medmem.cli import main
from medmem.data import load_dataset
from medmem.detector import Detector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_text2image import (  # noqa: E402
    PROMPTS,
    make_pairs,
    make_tiny_autoencoder,
    make_tiny_encoder,
)


# the one-epoch detector and four images only exercise the plumbing of the copy audit
@pytest.mark.filterwarnings("ignore:tau = .*collapsed:medmem.MedmemWarning")
@pytest.mark.filterwarnings("ignore:FID from .* singular:medmem.MedmemWarning")
def test_prompts_train_score_mitigate(tmp_path: Path) -> None:
    config = {
        "data": str(make_pairs(tmp_path / "data")),
        "autoencoder": "ae",  # relative to the YAML's folder
        "diffusion": {
            "channels": [8, 8],
            "attention_levels": [False, True],
            "num_head_channels": 8,
            "norm_num_groups": 4,
            "num_train_timesteps": 20,
            "iterations": 2,
            "batch_size": 4,
        },
        "sampling": {"sampler": "ddim", "steps": 3},
        "text": {"encoder": "enc", "max_length": 12},
    }
    make_tiny_autoencoder(tmp_path / "ae")
    make_tiny_encoder(tmp_path / "enc")
    (tmp_path / "t2i.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "--quiet",
            "prompts",
            "train",
            "--config",
            str(tmp_path / "t2i.yaml"),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model" / "unet.safetensors").is_file()

    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"text": PROMPTS, "memorized": [True, False, True, False]}).to_csv(
        prompts, index=False
    )
    res = runner.invoke(
        main,
        [
            "--quiet",
            "prompts",
            "score",
            "--model",
            str(tmp_path / "run"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "scores"),
            "--n-per-prompt",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "d_first: AUROC" in res.output
    out = tmp_path / "scores"
    ranked = pd.read_csv(out / "prompts-ranked.csv")
    assert len(ranked) == 4 and {
        "d_first",
        "d_mean",
        "entropy_first",
        "has_marker",
        "memorized",
        "flagged",
    } <= set(ranked.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["detection"]) == {"d_first", "d_mean", "d_mid", "entropy_first"}
    tokens = pd.read_csv(out / "tokens-per-prompt.csv")
    assert set(tokens["prompt_id"]) == {0, 2}
    page = (out / "report.html").read_text()
    assert "<script" not in page and "heart size normal" in page
    for name in ("tokens-pooled.csv", "d-first.png", "scores.safetensors"):
        assert (out / name).is_file()

    res = runner.invoke(
        main,
        [
            "--quiet",
            "prompts",
            "mitigate",
            "--model",
            str(tmp_path / "run"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "mit"),
            "--mitigation",
            "random_tokens",
            "--mitigation",
            "attention_rescale",
            "--n-per-prompt",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    mit = pd.read_csv(tmp_path / "mit" / "mitigations.csv")
    assert list(mit["mitigation"]) == ["none", "random_tokens(4)", "attention_rescale(1.25)"]
    assert (mit["mean_abs_pixel_change"].iloc[1:] > 0).all()

    # the copy audit of each mitigation's images: training pairs, other patients, a detector
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for i in range(40):
        img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
        Image.fromarray(img).save(data / f"val{i}.png")
    train = load_dataset(sorted(data.glob("[0-9].png")), image_size=(16, 16), quiet=True)
    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: enough for the plumbing
        det = Detector.train(
            train, resnet_channels=(8, 8, 8, 8), embed_dim=8, epochs=1, batch_size=4, quiet=True
        )
    det.save(tmp_path / "det")
    pd.DataFrame({"path": [f"val{i}.png" for i in range(40)]}).to_csv(data / "val.csv")
    res = runner.invoke(
        main,
        [
            "--quiet",
            "prompts",
            "mitigate",
            "--model",
            str(tmp_path / "run"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "mit-audit"),
            "--mitigation",
            "random_tokens",
            "--n-per-prompt",
            "1",
            "--train",
            str(data / "pairs.csv"),
            "--val",
            str(data / "val.csv"),
            "--detector",
            str(tmp_path / "det"),
        ],
    )
    assert res.exit_code == 0, res.output
    mit = pd.read_csv(tmp_path / "mit-audit" / "mitigations.csv")
    assert {"copies_memorized", "copies_other", "fid_detector", "caption_cosine"} <= set(mit)
    assert "copies_memorized" in res.output
    res = runner.invoke(
        main,
        ["prompts", "mitigate", "--model", str(tmp_path / "run"), "--prompts", str(prompts)]
        + ["--out", str(tmp_path / "mit-bad"), "--train", str(data / "pairs.csv")],
    )
    assert res.exit_code == 2 and "needs all of --train, --val and --detector" in res.output

    bad = tmp_path / "bad.csv"
    pd.DataFrame({"prompt": ["x"]}).to_csv(bad, index=False)
    res = runner.invoke(
        main,
        [
            "prompts",
            "score",
            "--model",
            str(tmp_path / "run"),
            "--prompts",
            str(bad),
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert res.exit_code == 2 and "no column 'text'" in res.output
