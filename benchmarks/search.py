"""Benchmark medmem.search.nearest against a dense correlation matrix.

The paper's Algorithm 1 computes the dense (N_train x N_syn) correlation matrix, then takes
row maxima. ``nearest`` computes the same exact result block by block. This script measures,
in one run on this machine:

- the machine's matrix-multiply rate (torch.mm of 2048^3 float32, and of the block shape);
- ``nearest`` (k=1) and the dense method at growing sizes, d = 128: time, GFLOP/s
  (2*N*M*d flops), the rate as a fraction of the matmul rate, and the peak extra memory
  of each run (peak RSS above the RSS with the inputs loaded; each run in its own process).

Dense runs are skipped where the N x M float32 matrix would not fit in 60% of RAM.

Usage: python benchmarks/search.py [--sizes 1000,10000,30000,100000] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

D = 128


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    # Return freed heap pages to the OS first (else new allocations reuse resident pages
    # and go unseen), then reset VmHWM to the current RSS (Linux: 5 > clear_refs).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _inputs(n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, D), dtype=np.float32)
    b = rng.standard_normal((m, D), dtype=np.float32)
    return q, b


def _worker(method: str, n: int, m: int, block: int) -> dict:
    """Run one measurement in this (fresh) process and return its figures."""
    from medmem.search import nearest, standardize

    q, b = _inputs(n, m)
    qs, bs = standardize(q), standardize(b)  # both methods get standardised inputs
    if method == "nearest":
        nearest(qs[:64], bs[:256], k=1, standardized=True, block_size=block)  # warm-up
    _reset_peak()
    base = _peak_rss_mb()
    t = time.perf_counter()
    if method == "nearest":
        v, i = nearest(qs, bs, k=1, standardized=True, block_size=block)
    else:
        with torch.no_grad():
            dense = torch.from_numpy(qs) @ torch.from_numpy(bs).T  # (n, m)
            vt, it = dense.max(dim=1)
            v, i = vt.numpy(), it.numpy()
            del dense
    dt = time.perf_counter() - t
    peak = _peak_rss_mb() - base
    # checksum of the result to compare the methods
    return {
        "method": method,
        "n": n,
        "m": m,
        "block_size": block,
        "seconds": dt,
        "gflops": 2 * n * m * D / dt / 1e9,
        "peak_extra_mb": peak,
        "checksum": float(np.asarray(v, dtype=np.float64).sum()),
        "argmax_checksum": int(np.asarray(i).astype(np.int64).sum()),
    }


def _run(method: str, n: int, m: int, block: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(n), str(m), str(block)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_rate() -> dict:
    """Peak float32 GEMM rate (2048^3) and the rate of the search's own block shape."""
    res = {}
    for name, (a, b, c) in {
        "square_2048": (2048, 2048, 2048),
        "block_1024x128x1024": (1024, D, 1024),
    }.items():
        x, y = torch.randn(a, b), torch.randn(b, c)
        out = torch.empty(a, c)
        torch.mm(x, y, out=out)
        reps = max(3, int(2e10 / (2 * a * b * c)))
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(x, y, out=out)
        dt = (time.perf_counter() - t) / reps
        res[name] = 2 * a * b * c / dt / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,30000,100000")
    ap.add_argument("--blocks", default="256,512,1024,2048,4096")
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    blocks = [int(s) for s in args.blocks.split(",")]
    from medmem.search import DEFAULT_BLOCK_SIZE

    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    t0 = time.perf_counter()
    mm = matmul_rate()
    print(
        f"matmul rate: {mm['square_2048']:.1f} GFLOP/s (2048^3), "
        f"{mm['block_1024x128x1024']:.1f} GFLOP/s (1024x128x1024)",
        flush=True,
    )
    rows = []
    for n in sizes:
        r = _run("nearest", n, n, DEFAULT_BLOCK_SIZE)
        rows.append(r)
        print(
            f"nearest  {n:>7} x {n:<7} {r['seconds']:8.2f} s {r['gflops']:7.1f} GFLOP/s "
            f"{r['gflops'] / mm['square_2048']:6.1%} of matmul  peak +{r['peak_extra_mb']:.0f} MB",
            flush=True,
        )
        dense_mb = n * n * 4 / 2**20
        if dense_mb < 0.6 * ram_mb:
            d = _run("dense", n, n, 0)
            rows.append(d)
            same = (
                abs(d["checksum"] - r["checksum"]) < 1e-3 * n
                and d["argmax_checksum"] == r["argmax_checksum"]
            )
            print(
                f"dense    {n:>7} x {n:<7} {d['seconds']:8.2f} s {d['gflops']:7.1f} GFLOP/s "
                f"{d['gflops'] / mm['square_2048']:6.1%} of matmul  "
                f"peak +{d['peak_extra_mb']:.0f} MB"
                f"  same result: {same}",
                flush=True,
            )
        else:
            print(
                f"dense    {n:>7} x {n:<7} skipped: the matrix needs {dense_mb / 1024:.0f} GiB",
                flush=True,
            )
    sweep = []
    n_sweep = min(20000, max(sizes))
    for bs in blocks:
        r = _run("nearest", n_sweep, n_sweep, bs)
        sweep.append(r)
        print(
            f"block {bs:>5} at {n_sweep}: {r['gflops']:.1f} GFLOP/s, "
            f"peak +{r['peak_extra_mb']:.0f} MB",
            flush=True,
        )
    info = {
        "machine": f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{ram_mb / 1024:.0f} GiB RAM",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_gflops": mm,
        "d": D,
        "default_block_size": DEFAULT_BLOCK_SIZE,
        "results": rows,
        "block_sweep": sweep,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "search.md").write_text(render_markdown(info))
    print(f"wrote {out / 'search.json'} and search.md ({info['wall_seconds']:.0f} s)")


def render_markdown(info: dict) -> str:
    """The results as the Markdown page docs/benchmarks/search.md."""
    mm = info["matmul_gflops"]["square_2048"]
    lines = [
        "# Exact nearest-neighbour search: blocked vs dense",
        "",
        "Generated by `python benchmarks/search.py` (`make bench`); do not edit by hand.",
        "",
        f"- Machine: {info['machine']}; torch {info['torch']} with {info['threads']} threads.",
        f"- Whole run: {info['wall_seconds']:.0f} s.",
        f"- Matrix-multiply rate measured in the same run: {mm:.1f} GFLOP/s (float32 "
        f"2048^3); {info['matmul_gflops']['block_1024x128x1024']:.1f} GFLOP/s for the "
        "search's own block shape (1024 x 128 x 1024).",
        f"- Embeddings: d = {info['d']}, float32, standardised; k = 1; `nearest` block size "
        f"{info['default_block_size']}. Rate = 2 N M d / time. Peak memory = peak RSS above "
        "the RSS with the inputs loaded, each run in a fresh process.",
        "",
        "| N x M | method | time (s) | GFLOP/s | share of matmul rate | peak extra memory |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in info["results"]:
        lines.append(
            f"| {r['n']:,} x {r['m']:,} | {r['method']} | {r['seconds']:.2f} | "
            f"{r['gflops']:.1f} | {r['gflops'] / mm:.0%} | {r['peak_extra_mb']:.0f} MB |"
        )
    sizes = {r["n"] for r in info["results"] if r["method"] == "dense"}
    for r in info["results"]:
        if r["method"] == "nearest" and r["n"] not in sizes:
            lines.append(
                f"| {r['n']:,} x {r['m']:,} | dense | not run: the matrix alone needs "
                f"{r['n'] * r['m'] * 4 / 2**30:.0f} GiB | | | |"
            )
    lines += [
        "",
        "Both methods return the same maxima and the same indices wherever both ran (checked "
        "in the run; `tests/unit/test_search.py` checks equality with a NumPy brute force).",
        "",
        f"Block-size sweep (N = M = {info['block_sweep'][0]['n']:,} if any):"
        if info["block_sweep"]
        else "",
        "",
        "| block size | GFLOP/s | share of matmul rate | peak extra memory |",
        "|---:|---:|---:|---:|",
    ]
    for r in info["block_sweep"]:
        lines.append(
            f"| {r['block_size']} | {r['gflops']:.1f} | {r['gflops'] / mm:.0%} | "
            f"{r['peak_extra_mb']:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, method, n, m, block = sys.argv
        print(json.dumps(_worker(method, int(n), int(m), int(block))))
    else:
        main()
