"""The labelling page in a real headless browser: keys, buttons, save, reload, validate.

Chromium is driven over the Chrome DevTools Protocol (CDP) with a minimal websocket client
written here (the standard library has none): real key and mouse events
(``Input.dispatchKeyEvent``, ``Input.dispatchMouseEvent``), and the download of
labels.csv captured with ``Browser.setDownloadBehavior``. Nothing leaves the machine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest

from medmem import audit_embeddings, load_dataset
from medmem._browser import chromium_available, headless_command
from medmem.data import write_phantoms
from medmem.label import make_labeling_page, validate

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
MALICIOUS = "<script>alert(1)</script>.png"


class WebSocket:
    """A minimal RFC 6455 client: masked text frames out, text frames in."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv_some()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.split(b"\r\n")[0].split()[1] == b"101", head

    def _recv_some(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv_some()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        """The next text message (pings answered, fragments joined)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        finally:
            self.sock.close()


class CDP:
    """Commands and events over one browser-level DevTools connection."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                params = ev.get("params", {})
                if ev.get("method") == method and all(params.get(k) == v for k, v in match.items()):
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} event {match or ''} within {timeout} s")
            self.events.append(json.loads(self.ws.recv()))


class Page:
    """One tab: evaluate JavaScript, press keys, click elements."""

    ARROWS = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}

    def __init__(self, cdp: CDP, session: str) -> None:
        self.cdp, self.session = cdp, session

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.cdp.call(method, self.session, **params)

    def js(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def press(self, key: str) -> None:
        if key in self.ARROWS:
            down = {"type": "rawKeyDown", "key": key, "code": key}
            down["windowsVirtualKeyCode"] = self.ARROWS[key]
        else:
            down = {"type": "keyDown", "key": key, "code": f"Key{key.upper()}", "text": key}
            down["windowsVirtualKeyCode"] = ord(key.upper())
        self.call("Input.dispatchKeyEvent", **down)
        up = {k: v for k, v in down.items() if k != "text"}
        self.call("Input.dispatchKeyEvent", **{**up, "type": "keyUp"})

    def click(self, selector: str) -> None:
        box = self.js(
            f"(function(){{var r=document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect();return [r.x + r.width / 2, r.y + r.height / 2];})()"
        )
        x, y = box
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def load(self, url: str | None = None) -> None:
        if url is None:
            self.call("Page.reload")
        else:
            self.call("Page.navigate", url=url)
        self.cdp.wait_event("Page.loadEventFired")
        deadline = time.monotonic() + 10
        while self.js("document.body && document.body.dataset.ready") != "1":
            assert time.monotonic() < deadline, "the page's script did not start"
            time.sleep(0.05)

    def text(self, element_id: str) -> str:
        return self.js(f"document.getElementById({json.dumps(element_id)}).textContent")


@pytest.fixture
def browser(tmp_path):
    """A headless chromium with a fresh profile, its CDP connection, and a download folder."""
    if not chromium_available():
        pytest.skip("chromium not installed: run make test, which installs it")
    profile, downloads = tmp_path / "profile", tmp_path / "downloads"
    downloads.mkdir()
    log = open(tmp_path / "chromium.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *headless_command(profile),
            "--disable-dev-shm-usage",
            "--window-size=1100,900",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=log,
        stderr=log,
    )
    ws = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start: {(tmp_path / 'chromium.log').read_text()}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        ws = WebSocket(f"ws://127.0.0.1:{port}{path}")
        cdp = CDP(ws)
        cdp.call(
            "Browser.setDownloadBehavior",
            behavior="allow",
            downloadPath=str(downloads),
            eventsEnabled=True,
        )
        target = next(
            t for t in cdp.call("Target.getTargets")["targetInfos"] if t["type"] == "page"
        )
        session = cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = Page(cdp, session["sessionId"])
        for domain in ("Page.enable", "Runtime.enable", "Network.enable"):
            page.call(domain)
        yield page, downloads
    finally:
        if ws is not None:
            try:
                ws.close()
            except OSError:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _make_audit(root: Path) -> Path:
    """20 training images (one with a hostile name), 12 synthetic; 8 near copies."""
    write_phantoms(root / "train", n_patients=19, size=32)
    (root / "train" / MALICIOUS).parent.mkdir()
    shutil.copy(root / "train" / "P0003_00.png", root / "train" / MALICIOUS)
    write_phantoms(root / "syn", n_patients=12, size=32, first_patient=200)
    tr = load_dataset(root / "train", image_size=(32, 32), quiet=True)
    sy = load_dataset(root / "syn", image_size=(32, 32), quiet=True)
    rng = np.random.default_rng(1)
    e_tr, e_sy = rng.normal(size=(len(tr), 16)), rng.normal(size=(len(sy), 16))
    e_sy[:8] = e_tr[-8:] + 0.1 * rng.normal(size=(8, 16))
    r = audit_embeddings(
        e_tr, rng.normal(size=(25, 16)), e_sy, train_ids=tr.ids, synthetic_ids=sy.ids, n_bootstrap=0
    )
    r.summary.update(
        sources={
            "training": str(root / "train"),
            "validation": None,
            "synthetic": str(root / "syn"),
        },
        image_size=[32, 32],
        spatial_dims=2,
    )
    return r.save(root / "audit", figures=False)


def test_label_page_round_trip_in_a_real_browser(browser, tmp_path) -> None:
    page, downloads = browser
    audit = _make_audit(tmp_path / "data")
    html = make_labeling_page(audit, audit / "labels.html", n=20, seed=0, quiet=True)
    pairs = pd.read_csv(audit / "pairs.csv", keep_default_na=False)
    n = len(pairs)
    assert n == 20 and MALICIOUS in set(pairs["train_id"])

    page.load(html.as_uri())
    assert page.text("pair-number") == f"Pair 1 of {n}"
    assert page.text("progress-text").startswith(f"0 of {n} labelled")
    assert page.js("document.getElementById('train-0').naturalWidth") == 32

    # keys: c/n/u label and move on; arrows and j/k move
    expected: dict[int, str] = {}
    for pair_id, key, label in [(1, "c", "copy"), (2, "n", "novel"), (3, "u", "unsure")]:
        page.press(key)
        expected[pair_id] = label
    assert page.text("pair-number") == f"Pair 4 of {n}"
    page.press("ArrowLeft")  # back to 3: relabel it
    assert page.text("current-label") == "unsure"
    page.press("n")
    expected[3] = "novel"
    page.press("j")  # 4 -> 5
    page.press("k")  # 5 -> 4
    page.press("ArrowRight")  # 4 -> 5
    page.press("ArrowDown")  # 5 -> 6
    page.press("ArrowUp")  # 6 -> 5
    assert page.text("pair-number") == f"Pair 5 of {n}"
    page.press("C")  # shift: same key
    expected[5] = "copy"
    # buttons
    page.click("#btn-novel")
    expected[6] = "novel"
    page.click("#next")  # 7 -> 8, 7 left unlabelled
    page.click("#btn-copy")
    expected[8] = "copy"
    page.press("u")
    expected[9] = "unsure"
    # everything labelled by the audit's own verdict from here on, to exercise all counts
    corr = dict(zip(pairs["pair_id"], pairs["nearest_synthetic_corr"], strict=True))
    tau = json.loads((audit / "summary.json").read_text())["tau"]
    for pair_id in range(10, n + 1):
        label = "copy" if corr[pair_id] >= tau else "novel"
        page.press(label[0])
        expected[pair_id] = label
    c = {v: sum(1 for x in expected.values() if x == v) for v in ("copy", "novel", "unsure")}
    assert page.text("progress-text") == (
        f"{len(expected)} of {n} labelled ({c['copy']} copy, {c['novel']} novel, "
        f"{c['unsure']} unsure)"
    )

    ARTIFACTS.mkdir(exist_ok=True)
    shot = page.call("Page.captureScreenshot", format="png")
    (ARTIFACTS / "label-page.png").write_bytes(base64.b64decode(shot["data"]))

    # reload: localStorage keeps the work
    page.load()
    assert page.text("progress-text").startswith(f"{len(expected)} of {n} labelled")

    # save: a real click, a real download
    page.click("#save")
    page.cdp.wait_event("Browser.downloadProgress", timeout=20, state="completed")
    saved = downloads / "labels.csv"
    assert saved.is_file()
    labels = pd.read_csv(saved, keep_default_na=False)
    assert list(labels.columns) == ["pair_id", "train_id", "synthetic_id", "label"]
    pd.testing.assert_frame_equal(
        labels[["pair_id", "train_id", "synthetic_id"]],
        pairs[["pair_id", "train_id", "synthetic_id"]],
    )
    got = {int(p): lab for p, lab in zip(labels["pair_id"], labels["label"], strict=True) if lab}
    assert got == expected

    # offline and inert: no network request, the hostile id never ran
    urls = [e["params"]["request"]["url"] for e in page.cdp.events
            if e.get("method") == "Network.requestWillBeSent"]  # fmt: skip
    assert all(u.split(":", 1)[0] in ("file", "data", "blob") for u in urls), urls
    assert not [e for e in page.cdp.events if e.get("method") == "Page.javascriptDialogOpening"]

    # and validate it, against counts computed here
    v = validate(audit, saved)
    definite = {p: lab for p, lab in expected.items() if lab != "unsure"}
    said = {p: corr[p] >= tau for p in definite}
    tp = sum(1 for p, lab in definite.items() if lab == "copy" and said[p])
    fn = sum(1 for p, lab in definite.items() if lab == "copy" and not said[p])
    fp = sum(1 for p, lab in definite.items() if lab == "novel" and said[p])
    tn = sum(1 for p, lab in definite.items() if lab == "novel" and not said[p])
    assert v["counts"] == {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unsure": c["unsure"],
        "unlabelled": n - len(expected),
    }
    assert v["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert v["specificity"] == pytest.approx(tn / (tn + fp))
    assert (audit / "validation.json").is_file()
