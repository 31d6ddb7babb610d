"""report.html: self-contained, escaped, and read back from headless Chromium's DOM."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import medmem
from medmem import MedmemWarning, audit_embeddings
from medmem._browser import chromium_available, headless_command
from medmem.data import ArrayDataset, load_dataset, make_phantom, write_phantoms
from medmem.metrics import quality
from medmem.report import write_report

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# a synthetic file whose path is markup: folder '<script>alert("x")<' + file 'script> & co.npy'
EVIL_DIR, EVIL_FILE = '<script>alert("x")<', "script> & co.npy"
EVIL_ID = f"{EVIL_DIR}/{EVIL_FILE}"


class _Dom(HTMLParser):
    """Elements with an id (their data-value and text), tags seen, and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if "id" in a:
            assert a["id"] not in self.by_id, f"duplicate id {a['id']}"
            self.by_id[a["id"]] = {"value": a.get("data-value", ""), "text": ""}
            self._open.append(a["id"])
        elif tag == "span" or tag == "p" or tag == "code":
            self._open.append("")

    def handle_endtag(self, tag):
        if tag in ("span", "p", "code") and self._open:
            self._open.pop()

    def handle_data(self, data):
        self.text.append(data)
        for elem_id in self._open:
            if elem_id:
                self.by_id[elem_id]["text"] += data


def parse(html_text: str) -> _Dom:
    dom = _Dom()
    dom.feed(html_text)
    return dom


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, medmem.AuditResult, dict]:
    """A real audit (tiny detector, 32x32 phantoms) with quality metrics and a markup name."""
    root = tmp_path_factory.mktemp("report")
    train_manifest = write_phantoms(root / "train", n_patients=10, follow_ups=2, size=32)
    write_phantoms(root / "val", n_patients=20, size=32, first_patient=100)
    syn = root / "syn"
    write_phantoms(syn, n_patients=4, size=32, fmt="npy", first_patient=200)
    (syn / "manifest.csv").unlink()
    for name in ("P0000_00.png", "P0003_01.png"):
        shutil.copy(root / "train" / name, syn / f"copy_{name}")
    (syn / EVIL_DIR).mkdir()
    np.save(syn / EVIL_ID, make_phantom(777, 0, size=32))
    train = load_dataset(train_manifest, image_size=(32, 32), quiet=True)
    val = load_dataset(root / "val", image_size=(32, 32), quiet=True)
    synthetic = load_dataset(str(syn), image_size=(32, 32), quiet=True)
    assert EVIL_ID in synthetic.ids
    overrides = {"epochs": 1, "batch_size": 8, "resnet_channels": (8, 8, 16, 16), "embed_dim": 16}
    with pytest.warns(MedmemWarning, match="did not learn"):  # one epoch: the plumbing only
        detector = medmem.Detector.train(train, quiet=True, **overrides)
    result = medmem.audit(train, val, synthetic, detector=detector, n_bootstrap=100, quiet=True)
    with pytest.warns(MedmemWarning, match="FID from .* strongly biased"):  # 7 images; fine here
        q = quality(val, synthetic, extractor=detector, k=3, quiet=True)
    path = write_report(result, root / "out", quality=q)
    return path, result, q


def test_report_is_self_contained_and_escaped(report) -> None:
    path, result, _ = report
    text = path.read_text(encoding="utf-8")
    assert path.name == "report.html" and text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower()  # no script of ours, and the markup name escaped
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co.npy" in text
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", text)  # nothing fetched
    assert "http://" not in text and "https://" not in text
    assert "Content-Security-Policy" in text
    n_pairs = len(result.synthetic)
    assert text.count('<tr class="pair"') == min(8, n_pairs)
    dom = parse(text)
    s = result.summary
    for key in ("n_mem", "n_copies", "n_train", "n_synthetic", "percentile"):
        assert float(dom.by_id[key]["value"]) == s[key], key
    assert float(dom.by_id["tau"]["value"]) == s["tau"]
    lo, hi = s["intervals"]["n_copies"]
    assert float(dom.by_id["n_copies_ci_low"]["value"]) == lo
    assert float(dom.by_id["n_copies_ci_high"]["value"]) == hi
    assert {"q_fid", "q_precision", "q_ms_ssim_real", "q_extractor"} <= set(dom.by_id)


def test_report_renders_without_optional_fields_and_in_3d(tmp_path) -> None:
    rng = np.random.default_rng(0)
    vols = np.stack([make_phantom(i, 0, spatial_dims=3, size=16) for i in range(24)])
    train = ArrayDataset(vols, ids=[f"t{i}&<b>" for i in range(24)])
    near = np.clip(vols[:3] + 0.01 * rng.random(vols[:3].shape), 0, 1)
    syn = ArrayDataset(near, ids=["s0", "s1", "s2"])
    emb = vols.reshape(24, -1)
    val = emb[::-1] + rng.normal(size=emb.shape) * 0.5
    result = audit_embeddings(
        emb, val, near.reshape(3, -1), train_ids=train.ids, synthetic_ids=syn.ids, n_bootstrap=0
    )
    for key in ("chance", "patients", "controls"):
        result.summary.pop(key, None)
    result._images = {"train": train, "synthetic": syn}
    text = write_report(result, tmp_path / "r").read_text()
    dom = parse(text)
    assert "n_copies_ci_low" not in dom.by_id and "expected_chance_copies" not in dom.by_id
    assert "n_patients_mem" not in dom.by_id and "control_sensitivity" not in dom.by_id
    assert int(dom.by_id["n_copies"]["value"]) == result.summary["n_copies"] == 3
    row = text.split('<tr class="pair"')[1].split("</tr>")[0]
    assert row.count("<img") == 6  # three central slices of the synthetic and training volume
    assert "t0&amp;&lt;b&gt;" in text and "t0&<b>" not in text
    # without images attached the gallery says so
    result._images = {}
    assert "No images to show" in write_report(result, tmp_path / "r2").read_text()


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [
        *headless_command(tmp_path / "chromium-profile"),
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_report_in_headless_chromium(report, tmp_path) -> None:
    if not chromium_available():
        pytest.skip("chromium not installed: run make test, which installs it")
    path, result, q = report
    url = path.resolve().as_uri()
    run = _chromium(["--dump-dom", url], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    # every console message (errors, blocked loads, CSP violations) is logged as ...:CONSOLE
    console = [ln for ln in run.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    dom = parse(run.stdout)
    assert "script" not in dom.tags  # the markup in the file name stayed text
    assert EVIL_ID in "".join(dom.text)
    saved = json.loads(json.dumps(result.summary))  # as summary.json holds it
    for key in ("n_mem", "n_copies", "n_train", "n_synthetic", "n_val"):
        assert int(dom.by_id[key]["value"]) == saved[key], key
        assert dom.by_id[key]["text"] == str(saved[key])
    for key in ("tau", "pct_mem", "pct_copies", "percentile"):
        assert float(dom.by_id[key]["value"]) == pytest.approx(saved[key], rel=1e-12), key
    assert dom.by_id["tau"]["text"] == f"{saved['tau']:.4f}"
    assert float(dom.by_id["q_fid"]["value"]) == pytest.approx(q["fid"], rel=1e-12)
    assert dom.by_id["q_extractor"]["text"] == q["extractor"]
    assert dom.by_id["verdict"]["text"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", url], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_screenshot_of_a_page(tmp_path: Path) -> None:
    from medmem._errors import InputError
    from medmem.report import screenshot

    with pytest.raises(InputError, match="no such HTML page"):
        screenshot(tmp_path / "missing.html", tmp_path / "shot.png")
    if not chromium_available():
        pytest.skip("Chromium is not installed")
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><title>t</title><h1>medmem</h1>")
    png = screenshot(page, tmp_path / "out" / "shot.png", window_size=(320, 200))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
