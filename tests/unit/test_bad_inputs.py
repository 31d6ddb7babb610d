"""The bad-input matrix (issue 14): each kind of bad input a careful user can produce,
through the CLI. Every one must exit with status 2 and one line that names the file or
flag at fault and says what to do, and leave nothing half-written beside --out."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from medmem.cli import main
from medmem.data import read_image, write_phantoms


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    write_phantoms(root / "train", n_patients=8, size=32)
    write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    write_phantoms(root / "syn", n_patients=4, size=32, fmt="npy", first_patient=200)
    write_phantoms(root / "dcm", n_patients=1, size=32, fmt="dcm", first_patient=300)
    for name in ("train", "val"):
        (root / name / "manifest.csv").unlink()
    return root


Case = Callable[[Path], tuple[list[str], list[str]]]  # root -> (extra args, needles)


def _args(root: Path, *, train: str = "train", val: str = "val", syn: str = "syn") -> list[str]:
    return [
        "audit",
        *("--train", str(root / train), "--val", str(root / val)),
        *("--synthetic", str(root / syn), "--out", str(root / "out")),
        *("--epochs", "1", "--image-size", "32,32", "--no-controls", "--n-bootstrap", "10"),
    ]


def _dicom(root: Path) -> Path:
    return next((root / "dcm").glob("*.dcm"))


def _bad_file(folder: str, name: str, data: bytes | np.ndarray) -> Case:
    def make(root: Path) -> tuple[list[str], list[str]]:
        p = root / folder / name
        if isinstance(data, np.ndarray):
            np.save(p, data)
        else:
            p.write_bytes(data)
        return _args(root), [str(p)]

    return make


def _png_bytes(root: Path) -> bytes:
    return next((root / "train").glob("*.png")).read_bytes()


def truncated_png(root):
    p = root / "train" / "cut.png"
    p.write_bytes(_png_bytes(root)[:200])
    return _args(root), [str(p)]


def dicom_without_pixels(root):
    ds = pydicom.dcmread(_dicom(root))
    del ds.PixelData
    p = root / "val" / "nopix.dcm"
    ds.save_as(p)
    return _args(root), [str(p), "without pixel data", "--skip-unreadable"]


def truncated_dicom(root):
    b = _dicom(root).read_bytes()
    p = root / "syn" / "cut.dcm"
    p.write_bytes(b[:-300])
    return _args(root), [str(p), "cut short", "no decoder will help"]


def mixed_2d_3d(root):
    np.save(root / "train" / "vol.npy", np.random.default_rng(0).random((8, 32, 32)))
    return _args(root), [str(root / "train"), "mixes 2D and 3D"]


def synthetic_3d(root):
    for p in (root / "syn").glob("*.npy"):
        np.save(p, np.random.default_rng(0).random((8, 32, 32)))
    return _args(root), ["--synthetic", "3D"]


def _manifest(text: bytes, needles: list[str]) -> Case:
    def make(root):
        m = root / "train" / "list.csv"
        m.write_bytes(text)
        args = _args(root)
        args[args.index("--train") + 1] = str(m)
        return args, ["list.csv", *needles]

    return make


def _out(make_out: Callable[[Path], Path], needles: list[str], *extra: str) -> Case:
    def make(root):
        out = make_out(root)
        args = _args(root)
        args[args.index("--out") + 1] = str(out)
        return [*args, *extra], ["--out", *needles]

    return make


def out_file(root):
    f = root / "afile"
    f.write_text("keep")
    return f


def _detector(setup: Callable[[Path], None], needles: list[str]) -> Case:
    def make(root):
        det = root / "det"
        det.mkdir()
        setup(det)
        return [*_args(root), "--detector", str(det)], needles

    return make


def _saved_detector(det: Path) -> None:
    from medmem.detector import Detector, DetectorConfig
    from medmem.detector._detector import build_encoder

    cfg = DetectorConfig(spatial_dims=2, image_size=(32, 32), arch="conv", embed_dim=8)
    d = Detector(cfg)
    d.model_ = build_encoder(cfg).eval()
    d.save(det, overwrite=True)


def pickled_weights(det: Path) -> None:
    _saved_detector(det)
    (det / "model.safetensors").write_bytes(pickle.dumps({"w": np.zeros(3)}))


def corrupt_json(det: Path) -> None:
    _saved_detector(det)
    (det / "config.json").write_text("{oops")


def no_fingerprint(det: Path) -> None:
    import json

    _saved_detector(det)
    meta = json.loads((det / "config.json").read_text())
    meta.pop("fingerprint")
    (det / "config.json").write_text(json.dumps(meta))


def detector_3d(det: Path) -> None:
    from medmem.detector import Detector, DetectorConfig
    from medmem.detector._detector import build_encoder

    cfg = DetectorConfig(spatial_dims=3, image_size=(16, 16, 16), arch="conv", embed_dim=8)
    d = Detector(cfg)
    d.model_ = build_encoder(cfg).eval()
    d.save(det, overwrite=True)


def same_file_in_val(root):
    src = next((root / "train").glob("*.png"))
    shutil.copy(src, root / "val" / "again.png")
    return _args(root), ["again.png", "--allow-patient-overlap"]


def re_encoded_in_val(root):
    src = next((root / "train").glob("*.png"))
    np.save(root / "val" / "again.npy", read_image(src))
    return _args(root), [str(src), "again.npy", "same pixels", "--allow-patient-overlap"]


def shared_patient(root):
    shutil.copy(root / "val" / "P0100_00.png", root / "train" / "P0100_05.png")
    np.save(root / "train" / "P0100_05.npy", np.random.default_rng(1).random((32, 32)))
    (root / "train" / "P0100_05.png").unlink()
    return [*_args(root), "--patient-id-pattern", r"^(P\d+)_"], ["P0100", "--allow-patient"]


def too_few_val(root):
    for p in sorted((root / "val").glob("*.png"))[3:]:
        p.unlink()
    return _args(root), ["validation", "images"]


def only_text_files(root):
    folder = root / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    return _args(root, train="notes"), [str(folder), "no images found"]


CASES: dict[str, Case] = {
    "train folder missing": lambda r: (_args(r, train="nope"), [str(r / "nope")]),
    "train folder of text files": only_text_files,
    "corrupt PNG": _bad_file("train", "bad.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),
    "zero-byte PNG": _bad_file("val", "empty.png", b""),
    "truncated PNG": truncated_png,
    "PNG bytes named .npy": _bad_file("syn", "fake.npy", b"\x89PNG\r\n\x1a\n1234"),
    "NaN image": _bad_file("syn", "nan.npy", np.full((32, 32), np.nan, np.float32)),
    "infinite pixel": _bad_file("val", "inf.npy", np.where(np.eye(32) > 0, np.inf, 1.0)),
    "constant image": _bad_file("val", "flat.npy", np.full((32, 32), 7.0, np.float32)),
    "4D array": _bad_file("train", "odd.npy", np.zeros((2, 2, 2, 2, 2), np.float32)),
    "not a DICOM file": _bad_file("train", "fake.dcm", b"hello world" * 20),
    "zero-byte DICOM": _bad_file("train", "empty.dcm", b""),
    "DICOM without pixel data": dicom_without_pixels,
    "truncated DICOM": truncated_dicom,
    "mixed 2D and 3D": mixed_2d_3d,
    "3D synthetic, 2D training": synthetic_3d,
    "manifest without path column": _manifest(b"file_name,pid\na.png,1\n", ["--path-column"]),
    "manifest row missing file": _manifest(b"path\nmissing.png\n", ["row 2", "missing.png"]),
    "manifest path traversal": _manifest(b"path\n../../../etc/passwd\n", ["row 2", "passwd"]),
    "manifest not UTF-8": _manifest(b"path\n\xe9t\xe9.png\n", ["line 2", "UTF-8"]),
    "--out is a file": _out(out_file, ["is a file"], "--overwrite"),
    "--out is the training folder": _out(lambda r: r / "train", ["input"], "--overwrite"),
    "--out inside the synthetic folder": _out(lambda r: r / "syn" / "audit", ["lies inside"]),
    "--out name too long": _out(lambda r: r / ("a" * 250), ["too long"]),
    "--detector missing": _detector(lambda d: None, ["config.json not found", "det"]),
    "--detector corrupt JSON": _detector(corrupt_json, ["config.json", "corrupt JSON"]),
    "--detector pickled weights": _detector(pickled_weights, ["model.safetensors", "Save"]),
    "--detector without fingerprint": _detector(no_fingerprint, ["fingerprint", "Save"]),
    "--detector for 3D images": _detector(detector_3d, ["det", "3D", "--detector"]),
    "same file in train and val": same_file_in_val,
    "re-encoded train image in val": re_encoded_in_val,
    "patient in train and val": shared_patient,
    "too few validation images": too_few_val,
    "bad --patient-id-pattern": lambda r: (
        [*_args(r), "--patient-id-pattern", "(unclosed"],
        ["--patient-id-pattern"],
    ),
    "bad --percentile": lambda r: ([*_args(r), "--percentile", "100"], ["percentile"]),
}

# how a message says what to do: one of these verbs (or a flag to pass)
FIX = (
    "Choose", "choose", "Remove", "remove", "Give", "give", "Save", "save", "Split", "pass",
    "Use", "use", "Fix", "fix", "Copy", "copy", "Re-export", "Convert", "Train", "Check",
    "Load", "Leave", "Rename", "Add", "add", "--",
)  # fmt: skip


def _leftovers(root: Path) -> list[str]:
    return [
        str(p)
        for p in root.rglob(".*")
        if any(t in p.name for t in ("medmem-partial-", "medmem-old-", ".lock", "medmem-resume"))
    ]


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_is_named_with_its_fix_and_nothing_is_half_written(base, tmp_path, kind) -> None:
    root = tmp_path / "root"
    shutil.copytree(base, root)
    args, needles = CASES[kind](root)
    out = Path(args[args.index("--out") + 1])
    existed = out.exists()
    r = CliRunner().invoke(main, ["--quiet", *args])
    assert r.exit_code == 2, f"{kind}: {r.output}"
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if "error" in line.lower()]
    assert errors, r.output
    msg = errors[-1] if r.output.startswith("medmem: error:") else r.output
    for needle in needles:
        assert needle in msg, f"{kind}: {needle!r} not in {msg!r}"
    assert any(f in msg for f in FIX), f"{kind}: no fix in {msg!r}"
    if r.output.startswith("medmem: error:"):
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert out.exists() == existed
    assert not _leftovers(root), _leftovers(root)


def test_the_matrix_has_at_least_25_kinds() -> None:
    assert len(CASES) >= 25
