"""Seeded anatomy-like phantoms: built-in data for ``medmem demo`` and the tests.

A *patient* (``patient_seed``) fixes the anatomy: body and lung outlines, heart, ribs, spine,
vessel tree, texture and findings (nodules, calcifications, sometimes a device). A
*follow-up* of that patient changes pose (shift of up to 3 pixels, rotation up to 3
degrees), breathing (lung size), exposure, noise and sometimes adds a small new finding.
Follow-ups are therefore not copies: a copy detector should score them below an exact or
slightly varied copy and above any other patient.

2D phantoms look like chest radiographs (H, W); 3D phantoms like chest CT volumes (D, H, W),
axial slices along D (the axis order ``read_image`` returns). Only NumPy is used.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmem._errors import InputError
from medmem._io import atomic_write_bytes, atomic_write_text
from medmem._validation import check_choice, check_positive_int

DEFAULT_PHANTOM_SIZE: dict[int, tuple[int, ...]] = {2: (128, 128), 3: (64, 64, 64)}

#: Formats ``write_phantoms`` can write, per ``spatial_dims``.
PHANTOM_FORMATS: dict[int, tuple[str, ...]] = {
    2: ("png", "dcm", "npy"),
    3: ("nii.gz", "dcm", "dcm-multiframe", "npy"),
}

_F = np.float32
_MAX_SHIFT = 0.016  # follow-up shift, as a fraction of the image side (2 pixels at 128)


def _soft(d: Any, width: float) -> Any:
    """Smooth step: 0 for d << 0, 1 for d >> 0, transition ~``width`` wide."""
    return 0.5 + 0.5 * np.tanh(d * (1.0 / width))


def _rngs(patient_seed: int, follow_up: int) -> tuple[np.random.Generator, np.random.Generator]:
    if isinstance(patient_seed, bool) or not isinstance(patient_seed, (int, np.integer)):
        raise InputError(f"patient_seed must be a non-negative int, got {patient_seed!r}.")
    if patient_seed < 0:
        raise InputError(f"patient_seed must be a non-negative int, got {patient_seed!r}.")
    if isinstance(follow_up, bool) or not isinstance(follow_up, (int, np.integer)) or follow_up < 0:
        raise InputError(f"follow_up must be a non-negative int, got {follow_up!r}.")
    anatomy = np.random.default_rng([int(patient_seed), 0x5EED])
    visit = np.random.default_rng([int(patient_seed), 0xF011, int(follow_up)])
    return anatomy, visit


def _check_size(size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...]:
    if size is None:
        return DEFAULT_PHANTOM_SIZE[spatial_dims]
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size),) * spatial_dims
    out = tuple(size)
    if len(out) != spatial_dims or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 16 for s in out
    ):
        raise InputError(f"size must be an int or {spatial_dims} ints, each >= 16, got {size!r}.")
    return tuple(int(s) for s in out)


def _waves(rng: np.random.Generator, n: int, dims: int, lo: float, hi: float) -> tuple:
    """Random plane waves (frequency vectors, phases, weights) for an analytic texture."""
    direction = rng.normal(size=(n, dims))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = direction * rng.uniform(lo, hi, size=(n, 1)) * np.pi
    return freq.astype(_F), rng.uniform(0, 2 * np.pi, n).astype(_F), rng.normal(size=n).astype(_F)


def _segment_dist2(coords: Sequence[Any], a: np.ndarray, b: np.ndarray) -> Any:
    """Squared distance from grid points to the segment a-b (coords broadcast, one per axis)."""
    d = b - a
    dd = float(d @ d) + 1e-12
    rel = [c - float(ai) for c, ai in zip(coords, a, strict=True)]
    t = sum(r * float(di) for r, di in zip(rel, d, strict=True)) * (1.0 / dd)
    t = np.clip(t, 0.0, 1.0)
    return sum((r - t * float(di)) ** 2 for r, di in zip(rel, d, strict=True))


def _wave_sum(waves: tuple, coords: Sequence[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Evaluate a random plane-wave texture (from ``_waves``) on the grid; unit variance."""
    freq, phase, weight = waves
    out = np.zeros(shape, _F)
    for f, ph, wt in zip(freq, phase, weight, strict=True):
        out += wt * np.cos(sum(fi * c for fi, c in zip(f, coords, strict=True)) + ph)
    return out * _F(1.0 / np.sqrt(len(weight)))


# ------------------------------------------------------------------------------------ 2D


def _anatomy_2d(rng: np.random.Generator) -> dict[str, Any]:
    """Patient-specific geometry and findings of a chest radiograph (y down, x right)."""
    p: dict[str, Any] = {}
    p["body_w"] = rng.uniform(0.72, 0.94)
    p["body_cx"] = rng.uniform(-0.05, 0.05)
    p["neck_w"] = rng.uniform(0.2, 0.3)
    p["shoulder_y"] = rng.uniform(-0.92, -0.78)
    p["waist"] = rng.uniform(0.0, 0.12)
    lungs = []
    for side in (-1, 1):  # image left (patient right), image right (patient left)
        top = rng.uniform(-0.8, -0.66)
        bottom = rng.uniform(0.3, 0.56) - (0.06 if side < 0 else 0.0)
        lungs.append(
            {
                "side": side,
                "top": top,
                "bottom": bottom,
                "medial": side * rng.uniform(0.1, 0.16),
                "lateral": side * rng.uniform(0.66, 0.82),
                "harm": rng.uniform(-0.05, 0.05, size=(4, 2)),
                "dome": rng.uniform(0.08, 0.18),
            }
        )
    p["lungs"] = lungs
    p["heart"] = {
        "cx": rng.uniform(0.06, 0.18),
        "cy": rng.uniform(0.08, 0.22),
        "a": rng.uniform(0.26, 0.38),
        "b": rng.uniform(0.2, 0.28),
        "angle": rng.uniform(-0.45, 0.05),
    }
    p["mediastinum_w"] = rng.uniform(0.1, 0.17)
    p["knob"] = (rng.uniform(0.08, 0.13), rng.uniform(-0.45, -0.3), rng.uniform(0.05, 0.07))
    p["spine_w"] = rng.uniform(0.05, 0.075)
    p["vert_period"] = rng.uniform(0.11, 0.15)
    p["vert_phase"] = rng.uniform(0, 1)
    n_ribs = 10
    spacing = rng.uniform(0.12, 0.155)
    top = rng.uniform(-0.86, -0.76)
    p["ribs"] = {
        "y0": (top + spacing * np.arange(n_ribs))[None, :] + rng.normal(0, 0.012, size=(2, n_ribs)),
        "c1": rng.uniform(-0.45, -0.25) + rng.normal(0, 0.04, size=(2, n_ribs)),
        "c2": rng.uniform(0.7, 1.1) + rng.normal(0, 0.08, size=(2, n_ribs)),
        "w": rng.uniform(0.017, 0.024),
    }
    p["clavicle"] = {
        "y": rng.uniform(-0.78, -0.66),
        "slope": rng.uniform(-0.4, -0.15),
        "len": rng.uniform(0.5, 0.65),
    }
    vessels = []  # branching from each hilum
    for lung in lungs:
        hilum = np.array([rng.uniform(-0.15, 0.0), lung["medial"] + lung["side"] * 0.12])
        for _ in range(int(rng.integers(8, 12))):
            ang = rng.uniform(-1.2, 1.2) + (0.0 if lung["side"] > 0 else np.pi)
            ang += rng.choice([-1, 1]) * rng.uniform(0.0, 0.6)
            length = rng.uniform(0.2, 0.45)
            end = hilum + length * np.array([np.sin(ang) * 1.5, np.cos(ang)])
            vessels.append((hilum, end, rng.uniform(0.008, 0.016)))
            mid = hilum + 0.6 * (end - hilum)
            twig = mid + rng.uniform(0.08, 0.16) * rng.normal(size=2)
            vessels.append((mid, twig, rng.uniform(0.005, 0.01)))
    p["vessels"] = vessels
    p["waves"] = _waves(rng, 24, 2, 6.0, 22.0)  # fine lung texture
    p["tissue_waves"] = _waves(rng, 6, 2, 0.8, 2.5)  # body habitus: soft-tissue thickness
    findings = []
    for _ in range(int(rng.integers(1, 5))):  # nodules, inside a lung
        lung = lungs[int(rng.integers(0, 2))]
        findings.append(
            (
                rng.uniform(lung["top"] + 0.25, lung["bottom"] - 0.15),
                rng.uniform(0.3, 0.8) * lung["lateral"] + 0.1 * lung["side"],
                rng.uniform(0.02, 0.05),
                rng.uniform(0.12, 0.28),
            )
        )
    for _ in range(int(rng.integers(0, 4))):  # calcifications: tiny and bright
        findings.append((rng.uniform(-0.5, 0.4), rng.uniform(-0.6, 0.6), 0.012, 0.45))
    p["findings"] = findings
    p["device"] = (
        (rng.uniform(-0.72, -0.55), rng.choice([-1, 1]) * rng.uniform(0.45, 0.65))
        if rng.random() < 0.25
        else None
    )
    p["tissue"] = rng.uniform(0.36, 0.48)
    return p


def _visit_2d(v: np.random.Generator, shape: tuple[int, ...]) -> dict[str, Any]:
    """What changes between follow-ups: pose, breathing, exposure, noise, a new finding."""
    h, w = shape
    return {
        "theta": np.deg2rad(v.uniform(-3.0, 3.0)),
        "dy": v.uniform(-1.0, 1.0) * 2.0 * _MAX_SHIFT,  # fraction of the side -> [-1, 1] units
        "dx": v.uniform(-1.0, 1.0) * 2.0 * _MAX_SHIFT,
        "breath": 1.0 + v.uniform(-0.03, 0.03),
        "gain": v.uniform(0.92, 1.08),
        "offset": v.uniform(-0.03, 0.03),
        "gamma": v.uniform(0.88, 1.12),
        "noise": v.uniform(0.006, 0.016),
        "new_finding": v.random() < 0.3,
        # (lung, height along it, lateral position, radius, intensity)
        "finding": (
            v.integers(0, 2),
            v.uniform(0.2, 0.8),
            v.uniform(0.3, 0.8),
            v.uniform(0.012, 0.022),
            v.uniform(0.08, 0.15),
        ),
        "rng": v,
    }


def _phantom_2d(p: dict[str, Any], vis: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    h, w = shape
    ys = np.linspace(-1, 1, h, dtype=_F)[:, None] - _F(vis["dy"])
    xs = np.linspace(-1, 1, w, dtype=_F)[None, :] - _F(vis["dx"])
    c, s = _F(np.cos(vis["theta"])), _F(np.sin(vis["theta"]))
    y = c * ys - s * xs  # (h, w) anatomy coordinates
    x = s * ys + c * xs

    xb = x - _F(p["body_cx"])
    ax = np.abs(xb)
    neck = _soft(p["shoulder_y"] - y, 0.05)
    shoulder = np.exp(-(((y - p["shoulder_y"] - 0.12) / 0.12) ** 2))  # flare at the shoulders
    waist = p["waist"] * _soft(y - 0.5, 0.15)
    body_w = (p["body_w"] + 0.1 * shoulder - waist) * (1 - (1 - p["neck_w"] / p["body_w"]) * neck)
    body = _soft(body_w - ax, 0.02)

    breath = vis["breath"]
    lungs = np.zeros_like(y)
    lung_bottom = []
    for lung in p["lungs"]:
        side = lung["side"]
        bottom = lung["top"] + (lung["bottom"] - lung["top"]) * breath
        lung_bottom.append(bottom)
        cy, hh = (lung["top"] + bottom) / 2, (bottom - lung["top"]) / 2
        cx, hw = (lung["medial"] + lung["lateral"]) / 2, abs(lung["lateral"] - lung["medial"]) / 2
        v_ = (y - _F(cy)) / _F(hh)  # -1 apex .. 1 base
        u = (x - _F(cx)) / _F(hw) * side  # -1 medial .. 1 lateral
        # lateral border: narrow apex, widest near the base; medial border straighter
        half = 0.55 + 0.45 * np.clip(1.3 * (v_ + 1) / 2, 0, 1) ** 0.5
        hc = lung["harm"].astype(_F)
        k = np.arange(1, 5, dtype=_F)[:, None, None]
        wob = hc[:, :1, None] * np.cos(k * np.pi * v_) + hc[:, 1:, None] * np.sin(k * np.pi * v_)
        wob = 1 + wob.sum(0)
        inside_x = _soft(half * wob - np.abs(u + 0.0), 0.08)
        apex = _soft(1 - np.sqrt(np.maximum(-v_, 0) ** 2 * 1.0 + (u * 0.6) ** 2 * (v_ < 0)), 0.08)
        dome = 1 - lung["dome"] * 4 * (1 - ((u + 1) / 2 - 0.45) ** 2) / 1.0
        base = _soft(dome - v_ + lung["dome"] * 2.5, 0.06)
        lungs = np.maximum(lungs, inside_x * apex * base * _soft(v_ + 1.05, 0.04))
    ht = p["heart"]
    ca, sa = np.cos(ht["angle"]), np.sin(ht["angle"])
    hy, hx = y - _F(ht["cy"]), x - _F(ht["cx"])
    hu, hv = ca * hx + sa * hy, -sa * hx + ca * hy
    heart = _soft(1 - np.sqrt((hu / ht["a"]) ** 2 + (hv / ht["b"]) ** 2), 0.08)
    kx, ky, kr = p["knob"]
    knob = _soft(1 - np.sqrt((x - kx) ** 2 + (y - ky) ** 2) / kr, 0.1)
    mediastinum = np.maximum(_soft(p["mediastinum_w"] - ax, 0.03) * _soft(ht["cy"] - y, 0.1), knob)
    lungs = lungs * (1 - np.maximum(heart, mediastinum) * 0.85)
    diaphragm = max(lung_bottom)
    abdomen = _soft(y - diaphragm + 0.05, 0.06)

    spine_band = _soft(p["spine_w"] - ax, 0.01)
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * (y / p["vert_period"] + p["vert_phase"]))
    spine = spine_band * vert

    rb = p["ribs"]
    t = np.maximum(ax - 0.06, 0)[None]  # (1, h, w) distance from the spine
    ribs = np.zeros_like(y)
    for side_i, side in enumerate((-1, 1)):
        y0 = rb["y0"][side_i].astype(_F)[:, None, None]
        c1 = rb["c1"][side_i].astype(_F)[:, None, None]
        c2 = rb["c2"][side_i].astype(_F)[:, None, None]
        yc = y0 + c1 * t + c2 * t * t
        d = (y[None] - yc) / rb["w"]
        band = (np.exp(-d * d) * (0.6 + 0.4 * np.exp(-((np.abs(d) - 0.9) ** 2) * 6))).max(0)
        ribs += band * _soft(side * xb, 0.02)
    ribs *= _soft(body_w - ax - 0.03, 0.03) * _soft(ax - 0.07, 0.02)
    ribs *= _soft(diaphragm + 0.2 - y, 0.08)

    cl = p["clavicle"]
    ycl = cl["y"] + cl["slope"] * ax
    clav = np.exp(-(((y - ycl) / 0.026) ** 2)) * _soft(cl["len"] - ax, 0.03)
    clav *= _soft(ax - 0.05, 0.02)

    vessels = np.zeros_like(y)
    for a, b, width in p["vessels"]:
        vessels = np.maximum(vessels, np.exp(-_segment_dist2((y, x), a, b) / (width * width)))
    texture = _wave_sum(p["waves"], (y, x), y.shape)
    habitus = _wave_sum(p["tissue_waves"], (y, x), y.shape)

    findings = np.zeros_like(y)
    extra = list(p["findings"])
    if vis["new_finding"]:  # a small new finding on this visit
        side_i, fy, fx, fr, fi = vis["finding"]
        lung = p["lungs"][int(side_i)]
        extra.append(
            (lung["top"] + fy * (lung["bottom"] - lung["top"]), fx * lung["lateral"], fr, fi)
        )
    for fy, fx, fr, fi in extra:
        findings += fi * np.exp(-((y - fy) ** 2 + (x - fx) ** 2) / (fr * fr))
    if p["device"] is not None:
        dy0, dx0 = p["device"]
        box = _soft(0.07 - np.abs(x - dx0), 0.006) * _soft(0.045 - np.abs(y - dy0), 0.006)
        lead = np.exp(-_segment_dist2((y, x), np.array([dy0, dx0]), np.array([0.25, 0.1])) / 1e-4)
        findings += 0.6 * box + 0.4 * lead

    tissue = p["tissue"] * (1 + 0.4 * habitus) + 0.12 * abdomen
    img = body * tissue
    img = img - 0.3 * lungs * (1 - 0.3 * vessels) + 0.2 * heart + 0.16 * mediastinum
    img = img + 0.24 * spine * body * (1 - 0.4 * heart) + (0.14 + 0.08 * lungs) * ribs + 0.2 * clav
    img = img + 0.03 * texture * lungs + findings * body
    # exposure of this visit: gain, offset, gamma; then quantum noise
    img = np.clip(img, 0, None) * vis["gain"] + vis["offset"]
    img = np.clip(img, 0, 1) ** vis["gamma"]
    img = img + vis["rng"].normal(0, vis["noise"], size=img.shape).astype(_F)
    return np.clip(img, 0, 1).astype(_F)


# ------------------------------------------------------------------------------------ 3D


def _anatomy_3d(rng: np.random.Generator) -> dict[str, Any]:
    """Patient-specific geometry and findings of a chest CT volume (z, y, x); y anterior->
    posterior, x patient right->left as in an axial slice."""
    p: dict[str, Any] = {}
    p["body"] = (rng.uniform(0.72, 0.92), rng.uniform(0.5, 0.66), rng.uniform(-0.08, 0.08))
    p["body_taper"] = rng.uniform(-0.12, 0.12)
    p["fat"] = rng.uniform(0.04, 0.12)
    lungs = []
    for side in (-1, 1):
        lungs.append(
            {
                "c": np.array(
                    [
                        rng.uniform(-0.12, 0.15),
                        rng.uniform(-0.05, 0.08),
                        side * rng.uniform(0.32, 0.46),
                    ]
                ),
                "r": np.array(
                    [rng.uniform(0.7, 0.95), rng.uniform(0.3, 0.42), rng.uniform(0.2, 0.3)]
                ),
                "harm": rng.uniform(-0.08, 0.08, size=(3, 2)),
            }
        )
    p["lungs"] = lungs
    p["heart"] = (
        np.array([rng.uniform(-0.55, -0.2), rng.uniform(-0.3, -0.1), rng.uniform(0.02, 0.18)]),
        np.array([rng.uniform(0.22, 0.36), rng.uniform(0.17, 0.27), rng.uniform(0.18, 0.3)]),
    )
    p["spine"] = (rng.uniform(0.3, 0.4), rng.uniform(0.08, 0.11), rng.uniform(0.2, 0.3))
    p["vert_phase"] = rng.uniform(0, 1)
    p["aorta"] = (rng.uniform(0.12, 0.22), rng.uniform(0.08, 0.16), rng.uniform(0.045, 0.065))
    p["ribs"] = (rng.uniform(0.25, 0.35), rng.uniform(0, 1), rng.uniform(0.15, 0.3))
    vessels = []
    for lung in lungs:
        hilum = np.array([lung["c"][0] * 0.5 - 0.1, lung["c"][1], lung["c"][2] * 0.5])
        for _ in range(int(rng.integers(4, 7))):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            end = hilum + d * lung["r"] * rng.uniform(0.5, 0.9)
            vessels.append((hilum, end, rng.uniform(0.02, 0.035)))
    p["vessels"] = vessels
    p["waves"] = _waves(rng, 10, 3, 4.0, 14.0)
    p["tissue_waves"] = _waves(rng, 4, 3, 0.8, 2.5)
    findings = []
    for _ in range(int(rng.integers(2, 5))):
        lung = lungs[int(rng.integers(0, 2))]
        pos = lung["c"] + rng.uniform(-0.55, 0.55, size=3) * lung["r"]
        findings.append((pos, rng.uniform(0.04, 0.09), rng.uniform(0.3, 0.55)))
    for _ in range(int(rng.integers(0, 3))):  # calcifications
        findings.append((rng.uniform(-0.5, 0.5, size=3), 0.03, 0.8))
    p["findings"] = findings
    return p


def _visit_3d(v: np.random.Generator, shape: tuple[int, ...]) -> dict[str, Any]:
    """What changes between follow-ups of a volume (see ``_visit_2d``)."""
    return {
        "theta": np.deg2rad(v.uniform(-3.0, 3.0)),  # in-plane rotation, about the z axis
        "shift": v.uniform(-1.0, 1.0, size=3) * 2.0 * _MAX_SHIFT,
        "breath": 1.0 + v.uniform(-0.03, 0.03),
        "gain": v.uniform(0.94, 1.06),
        "offset": v.uniform(-0.02, 0.02),
        "gamma": v.uniform(0.92, 1.08),
        "noise": v.uniform(0.006, 0.016),
        "new_finding": v.random() < 0.3,
        "finding": (  # (lung, position relative to it, radius, intensity)
            v.integers(0, 2),
            v.uniform(-0.5, 0.5, size=3),
            v.uniform(0.025, 0.04),
            v.uniform(0.2, 0.35),
        ),
        "rng": v,
    }


def _phantom_3d(p: dict[str, Any], vis: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    d, h, w = shape
    shift = vis["shift"]
    z = (np.linspace(-1, 1, d, dtype=_F) - _F(shift[0]))[:, None, None]  # (d, 1, 1)
    ys = np.linspace(-1, 1, h, dtype=_F)[:, None] - _F(shift[1])
    xs = np.linspace(-1, 1, w, dtype=_F)[None, :] - _F(shift[2])
    c, s = _F(np.cos(vis["theta"])), _F(np.sin(vis["theta"]))
    y = (c * ys - s * xs)[None]  # (1, h, w)
    x = (s * ys + c * xs)[None]

    bx, by, bcy = p["body"]
    scale = 1 + p["body_taper"] * z
    body_r = np.sqrt((x / (bx * scale)) ** 2 + ((y - bcy) / (by * scale)) ** 2)  # (d, h, w)
    body = _soft(1 - body_r, 0.03)
    muscle = _soft(1 - p["fat"] - body_r, 0.02)

    lungs = np.zeros(shape, _F)
    for lung in p["lungs"]:
        (cz, cy, cx), (rz, ry, rx) = lung["c"], lung["r"] * np.array([vis["breath"], 1.0, 1.0])
        lz, ly, lx = z - _F(cz), y - _F(cy), x - _F(cx)
        phi = np.arctan2(ly, lx)  # (1, h, w)
        hc = lung["harm"]
        wobble = 1 + sum(
            hc[i, 0] * np.cos((i + 2) * phi + hc[i, 1] * 20) * (1 + 0.5 * np.cos((i + 1) * lz))
            for i in range(3)
        )
        r = np.sqrt((lz / rz) ** 2 + (ly / ry) ** 2 + (lx / rx) ** 2)
        lungs = np.maximum(lungs, _soft(1 - r / wobble, 0.04))
    (hz, hy, hx), (hrz, hry, hrx) = p["heart"]
    hr = np.sqrt(((z - hz) / hrz) ** 2 + ((y - hy) / hry) ** 2 + ((x - hx) / hrx) ** 2)
    heart = _soft(1 - hr, 0.05)
    lungs = lungs * (1 - heart)
    sy, sr, period = p["spine"]
    vert = 0.65 + 0.35 * _soft(np.cos(2 * np.pi * (z / period + p["vert_phase"])) + 0.6, 0.1)
    spine = _soft(sr - np.sqrt(x**2 + (y - sy) ** 2), 0.01) * vert
    canal = _soft(sr * 0.35 - np.sqrt(x**2 + (y - sy - sr * 1.35) ** 2), 0.01)
    ay, ax_, ar = p["aorta"]
    aorta = _soft(ar - np.sqrt((x - ax_) ** 2 + (y - ay) ** 2), 0.01)

    rib_period, rib_phase, rib_tilt = p["ribs"]
    angle = np.arctan2(y - bcy, x)
    ring = np.exp(-(((body_r - 0.87) / 0.035) ** 2)) * _soft(np.cos(7 * angle) + 0.2, 0.3)
    rib_z = np.cos(2 * np.pi * ((z + rib_tilt * y) / rib_period + rib_phase))
    ribs = ring * _soft(rib_z - 0.5, 0.08) * _soft(y - bcy + 0.35, 0.1)

    coords = (z, y, x)
    vessels = np.zeros(shape, _F)
    for a, b, width in p["vessels"]:
        vessels = np.maximum(vessels, np.exp(-_segment_dist2(coords, a, b) / (width * width)))
    texture = _wave_sum(p["waves"], coords, shape)
    habitus = _wave_sum(p["tissue_waves"], coords, shape)

    findings = np.zeros(shape, _F)
    extra = list(p["findings"])
    if vis["new_finding"]:
        side_i, rel, fr, fi = vis["finding"]
        lung = p["lungs"][int(side_i)]
        extra.append((lung["c"] + rel * lung["r"], fr, fi))
    for (fz, fy, fx), fr, fi in extra:
        findings += fi * np.exp(-((z - fz) ** 2 + (y - fy) ** 2 + (x - fx) ** 2) / (fr * fr))

    img = (0.3 + 0.06 * habitus) * body + 0.1 * muscle
    img = img - 0.36 * lungs * (1 - 0.6 * vessels) + 0.12 * heart + 0.18 * aorta
    img = img + 0.5 * spine - 0.25 * canal + 0.45 * ribs + 0.03 * texture * body
    img = img + findings * lungs
    img = np.clip(img, 0, None) * vis["gain"] + vis["offset"]
    img = np.clip(img, 0, 1) ** vis["gamma"]
    img = img + vis["rng"].normal(0, vis["noise"], size=shape).astype(_F)
    return np.clip(img, 0, 1).astype(_F)


def make_phantom(
    patient_seed: int,
    follow_up: int = 0,
    *,
    spatial_dims: int = 2,
    size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """One phantom image of a patient at a follow-up visit, float32 in [0, 1].

    Args:
        patient_seed: fixes the patient's anatomy and findings (non-negative int).
        follow_up: visit number; each visit varies pose, breathing, exposure and noise.
        spatial_dims: 2 (chest-radiograph-like, (H, W)) or 3 (chest-CT-like, (D, H, W)).
        size: output shape (an int means square/cube, each side >= 16); default 128x128
            or 64^3. The anatomy scales with the image.

    Example:
        >>> a, b = make_phantom(7, 0), make_phantom(7, 1)  # same patient, two visits
        >>> a.shape, a.dtype
        ((128, 128), dtype('float32'))
    """
    check_choice(spatial_dims, "spatial_dims", (2, 3))
    shape = _check_size(size, spatial_dims)
    anatomy, visit = _rngs(patient_seed, follow_up)
    if spatial_dims == 2:
        return _phantom_2d(_anatomy_2d(anatomy), _visit_2d(visit, shape), shape)
    return _phantom_3d(_anatomy_3d(anatomy), _visit_3d(visit, shape), shape)


# ------------------------------------------------------------------------------ writing


def phantom_seed(seed: int, patient: int) -> int:
    """Anatomy seed of patient number ``patient`` in population ``seed`` (as write_phantoms).

    ``make_phantom(phantom_seed(seed, k), f)`` is the image ``write_phantoms(..., seed=seed)``
    writes for patient ``k`` at follow-up ``f``.
    """
    return int(np.random.SeedSequence([int(seed), int(patient)]).generate_state(1, np.uint64)[0])


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _npy_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, img.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def _nifti_gz_bytes(vol: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine=np.eye(4))
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)  # same seed, same bytes


def _dicom_bytes(
    pixels: np.ndarray,
    *,
    uid_seed: str,
    patient_id: str,
    series_uid: str,
    sop_class: str,
    modality: str,
    extra: dict[str, Any],
) -> bytes:
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, uid_seed.split("|")[0], "study"])
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = f"Phantom^{patient_id}"
    ds.Modality = modality
    ds.Manufacturer = "medmem phantom"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _write_one(
    out: Path,
    stem: str,
    img: np.ndarray,
    fmt: str,
    *,
    patient_id: str,
    uid_seed: str,
) -> str:
    """Write one phantom; return its manifest path (relative to ``out``)."""
    from pydicom.uid import (
        CTImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    series_uid = generate_uid(entropy_srcs=[uid_seed, "series"])
    if fmt == "png":
        atomic_write_bytes(out / f"{stem}.png", _png_bytes(img))
        return f"{stem}.png"
    if fmt == "npy":
        atomic_write_bytes(out / f"{stem}.npy", _npy_bytes(img))
        return f"{stem}.npy"
    if fmt == "nii.gz":
        atomic_write_bytes(out / f"{stem}.nii.gz", _nifti_gz_bytes(img))
        return f"{stem}.nii.gz"
    if fmt == "dcm" and img.ndim == 2:
        data = _dicom_bytes(
            np.round(img * 65535),
            uid_seed=uid_seed,
            patient_id=patient_id,
            series_uid=series_uid,
            sop_class=SecondaryCaptureImageStorage,
            modality="DX",
            extra={"ConversionType": "WSD", "PixelSpacing": [1.0, 1.0]},
        )
        atomic_write_bytes(out / f"{stem}.dcm", data)
        return f"{stem}.dcm"
    if fmt == "dcm-multiframe":
        data = _dicom_bytes(
            np.round(img * 65535),
            uid_seed=uid_seed,
            patient_id=patient_id,
            series_uid=series_uid,
            sop_class=MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
            modality="OT",
            extra={"NumberOfFrames": int(img.shape[0]), "ConversionType": "WSD"},
        )
        atomic_write_bytes(out / f"{stem}.dcm", data)
        return f"{stem}.dcm"
    # fmt == "dcm", 3D: a CT-like series folder, one file per axial slice
    folder = out / stem
    hu = np.round(img * 2000)  # stored values; HU = stored - 1000
    for k in range(img.shape[0]):
        data = _dicom_bytes(
            hu[k],
            uid_seed=f"{uid_seed}|slice{k}",
            patient_id=patient_id,
            series_uid=series_uid,
            sop_class=CTImageStorage,
            modality="CT",
            extra={
                "ImagePositionPatient": [0.0, 0.0, float(k)],
                "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                "PixelSpacing": [1.0, 1.0],
                "SliceThickness": 1.0,
                "InstanceNumber": k + 1,
                "RescaleIntercept": -1000,
                "RescaleSlope": 1,
                "RescaleType": "HU",
            },
        )
        atomic_write_bytes(folder / f"slice_{k:03d}.dcm", data)
    return stem


def write_phantoms(
    out_dir: str | os.PathLike,
    *,
    n_patients: int,
    follow_ups: int = 1,
    spatial_dims: int = 2,
    size: int | Sequence[int] | None = None,
    fmt: str = "png",
    seed: int = 0,
    first_patient: int = 0,
    id_prefix: str = "P",
) -> Path:
    """Write phantom images of ``n_patients`` patients x ``follow_ups`` visits, plus a manifest.

    Files are named ``{id_prefix}{patient:04d}_{follow_up:02d}`` (follow-ups count from 0).
    Formats: 2D "png" (16-bit), "dcm" (one DICOM file per image), "npy"; 3D "nii.gz",
    "dcm" (a folder of CT slices per volume), "dcm-multiframe", "npy". DICOM files carry the
    patient id as PatientID. The same ``seed`` writes the same bytes; patient ``k`` has the
    same anatomy whatever ``first_patient`` is, so ranges of patients can be written
    separately (train, validation, "novel" patients).

    Args:
        out_dir: folder to write into (created).
        n_patients: number of patients, numbered ``first_patient``, ``first_patient + 1``...
        follow_ups: images per patient.
        spatial_dims: 2 or 3.
        size: image shape; default 128x128 (2D) or 64^3 (3D).
        fmt: file format (see above).
        seed: the population; different seeds give different patients.
        first_patient: number of the first patient.
        id_prefix: patient ids are ``{id_prefix}{patient:04d}``.

    Returns:
        Path of ``manifest.csv`` (columns ``path,patient_id,follow_up``).

    Example:
        >>> manifest = write_phantoms("demo/train", n_patients=20, follow_ups=2)  # doctest: +SKIP
        >>> ds = load_dataset(manifest)  # doctest: +SKIP
    """
    check_choice(spatial_dims, "spatial_dims", (2, 3))
    fmt = check_choice(fmt, f"fmt (for {spatial_dims}D)", PHANTOM_FORMATS[spatial_dims])
    n_patients = check_positive_int(n_patients, "n_patients")
    follow_ups = check_positive_int(follow_ups, "follow_ups")
    first_patient = check_positive_int(first_patient, "first_patient", minimum=0)
    seed = check_positive_int(seed, "seed", minimum=0)
    shape = _check_size(size, spatial_dims)
    if not isinstance(id_prefix, str) or any(ch in id_prefix for ch in '/\\,"\n'):
        raise InputError(f"id_prefix must be a string without / \\ , or quotes, got {id_prefix!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["path,patient_id,follow_up"]
    for patient in range(first_patient, first_patient + n_patients):
        pid = f"{id_prefix}{patient:04d}"
        pseed = phantom_seed(seed, patient)
        for fu in range(follow_ups):
            img = make_phantom(pseed, fu, spatial_dims=spatial_dims, size=shape)
            stem = f"{pid}_{fu:02d}"
            rel = _write_one(out, stem, img, fmt, patient_id=pid, uid_seed=f"{seed}|{pid}|{fu}")
            rows.append(f"{rel},{pid},{fu}")
    manifest = out / "manifest.csv"
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    return manifest


__all__ = ["PHANTOM_FORMATS", "make_phantom", "phantom_seed", "write_phantoms"]
