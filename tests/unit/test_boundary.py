"""The package's edges: misuse refused in one line before any data is read (the Python API and
the CLI share the checks), and no process-wide side effects (matplotlib backend,
os.environ)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import medmem
from medmem import InputError
from medmem.cli import main


class Untouchable:
    """A stand-in dataset that fails the test if anything about it is read."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the dataset was read ({name}) before the arguments were checked")

    def __len__(self) -> int:
        raise AssertionError("the dataset was read (len) before the arguments were checked")


UNTOUCHED = (Untouchable(), Untouchable(), Untouchable())


def _embeddings() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(30, 8)), rng.normal(size=(30, 8)), rng.normal(size=(5, 8))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# --- the Python API ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["audit", "audit_embeddings"])
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"percentile": 0.95}, "percentile=0.95 looks like a fraction; use 95"),
        ({"percentile": 0.999}, "percentile=0.999 looks like a fraction; use 99.9"),
        ({"percentile": 101}, "percentile must be in (0, 100)"),
        ({"percentile": 0}, "percentile must be in (0, 100)"),
        ({"percentile": "high"}, "percentile must be a number on the 0-100 scale"),
        ({"seed": "a"}, "seed must be an integer >= 0 (e.g. seed=0), got 'a'"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 1.5}, "seed must be an integer >= 0"),
        ({"n_bootstrap": -5}, "n_bootstrap must be an integer >= 0"),
        ({"calibration": "conformall"}, "Did you mean 'conformal'"),
        ({"confidence": 95}, "confidence must be in (0.0, 1.0)"),
    ],
)
def test_misuse_is_one_line_naming_the_parameter_and_the_fix(entry, kwargs, expected) -> None:
    if entry == "audit":
        call = lambda: medmem.audit(*UNTOUCHED, **kwargs)  # noqa: E731
    else:
        call = lambda: medmem.audit_embeddings(*_embeddings(), **kwargs)  # noqa: E731
    with pytest.raises(InputError) as exc:
        call()
    assert expected in _one_line(exc)


def test_a_detector_path_says_how_to_load_it() -> None:
    with pytest.raises(InputError) as exc:
        medmem.audit(*UNTOUCHED, detector="det/")
    text = _one_line(exc)
    assert text.startswith("detector must be a trained detector object")
    assert 'medmem.Detector.load("det/")' in text


def test_a_detector_of_the_wrong_type_is_named() -> None:
    with pytest.raises(InputError) as exc:
        medmem.audit(*UNTOUCHED, detector=42)
    text = _one_line(exc)
    assert "detector must be a trained medmem.Detector or None" in text and "int" in text


def test_control_kinds_are_checked_before_the_data() -> None:
    with pytest.raises(InputError) as exc:
        medmem.audit(*UNTOUCHED, control_kinds=["blurr"])
    assert "control_kinds must be one of" in _one_line(exc)
    assert "Did you mean 'blur'" in str(exc.value)


def test_calibrate_and_min_size_share_the_percentile_check() -> None:
    scores = np.linspace(0, 1, 40)
    with pytest.raises(InputError, match=r"percentile=0\.95 looks like a fraction; use 95"):
        medmem.calibrate(scores, 0.95)
    with pytest.raises(InputError, match=r"percentile=0\.9 looks like a fraction; use 90"):
        medmem.min_calibration_size(0.9)
    # the paper's definition admits q = 0 (numpy.percentile's minimum)
    assert medmem.calibrate(scores, 0, "paper") == 0.0
    with pytest.raises(InputError, match=r"percentile must be in \(0, 100\)"):
        medmem.calibrate(scores, 0)


def test_good_arguments_still_audit() -> None:
    r = medmem.audit_embeddings(*_embeddings(), percentile=95, seed=np.int64(3), n_bootstrap=10)
    assert r.summary["percentile"] == 95.0


# --- the CLI ----------------------------------------------------------------------------


def _cli(tmp_path, *extra: str) -> object:
    missing = tmp_path / "no-such-folder"
    args = [
        "--quiet",
        "audit",
        "--train",
        str(missing / "train"),
        "--val",
        str(missing / "val"),
        "--synthetic",
        str(missing / "syn"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--percentile", "101"], "percentile must be in (0, 100)"),
        (["--percentile", "0.95"], "percentile=0.95 looks like a fraction; use 95"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--n-bootstrap", "-1"], "n_bootstrap must be an integer >= 0"),
        (["--n-controls", "-3"], "n_controls must be an integer >= 0"),
    ],
)
def test_cli_checks_arguments_before_reading_any_dataset(tmp_path, extra, expected) -> None:
    r = _cli(tmp_path, *extra)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("medmem: error: ") and expected in lines[0]
    assert "no-such-folder" not in r.output
    assert not (tmp_path / "out").exists()


def test_cli_reaches_the_data_when_the_arguments_are_good(tmp_path) -> None:
    r = _cli(tmp_path, "--percentile", "95")
    assert r.exit_code == 2 and "no-such-folder" in r.stderr, r.output


# --- no process-wide side effects -------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--quiet", "demo", "--help"],
        ["--quiet", "--version"],
        ["-q", "audit", "--train", "x", "--val", "y", "--synthetic", "z", "--percentile", "101"],
        ["validate", "--audit", "no-such-audit", "--labels", "no-such.csv"],
    ],
)
def test_the_cli_leaves_the_environment_as_it_found_it(args) -> None:
    before = dict(os.environ)
    CliRunner().invoke(main, args)
    assert dict(os.environ) == before


def test_the_quiet_flag_is_not_read_from_the_environment(monkeypatch, capsys) -> None:
    from medmem._progress import progress

    monkeypatch.setenv("MEDMEM_QUIET", "0")
    assert progress(range(3), desc="x", quiet=True).disable
    monkeypatch.setenv("MEDMEM_QUIET", "1")
    assert not progress(range(3), desc="x", quiet=False).disable


def test_importing_medmem_keeps_the_matplotlib_backend() -> None:
    code = textwrap.dedent(
        """
        import matplotlib
        matplotlib.use("svg")
        import medmem, medmem.cli, medmem.demo, medmem.generative, medmem.label
        import medmem.report, medmem.screen, medmem.study, medmem.text2image
        print(matplotlib.get_backend())
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    # (MONAI imports pyplot itself; what matters is that nobody sets the backend)
    assert out.stdout.split() == ["svg"], out.stderr


def test_figures_are_drawn_without_pyplot(tmp_path) -> None:
    import matplotlib

    from medmem._plots import plot_histogram

    backend = matplotlib.get_backend()
    rng = np.random.default_rng(0)
    path = tmp_path / "h.png"
    plot_histogram(rng.random(30), rng.random(30), 0.5, path)
    assert matplotlib.get_backend() == backend
    from PIL import Image

    with Image.open(path) as im:
        assert im.info.get("Software") == "medmem"


def test_one_dataset_check_for_the_audit_and_the_metrics() -> None:
    """``_validation.check_dataset`` serves medmem.audit and medmem.metrics alike."""
    import torch

    from medmem.data import ArrayDataset
    from medmem.metrics import extract_features, quality

    full = ArrayDataset(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"training set: expected a medmem dataset.*list"):
        medmem.audit([1, 2], full, full, detector=None)
    with pytest.raises(InputError, match=r"^dataset: expected a medmem dataset.*str"):
        extract_features("images/", torch.nn.Identity())
    with pytest.raises(InputError, match=r"^synthetic: expected a medmem dataset"):
        quality(full, np.zeros((2, 1, 8, 8)), extractor=torch.nn.Identity())
