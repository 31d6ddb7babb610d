"""Benchmark medmem.search.nearest (torch and FAISS backends) against a dense matrix.

The paper's Algorithm 1 computes the dense (N_train x N_syn) correlation matrix, then takes
row maxima. ``nearest`` computes the same exact result block by block. This script measures,
in one run on this machine:

- the machine's matrix-multiply rate (torch.mm of 2048^3 float32, and of the block shape),
  at the start and at the end of the run (the larger is used);
- ``nearest`` (k=1) with the torch and the FAISS backend, and the dense method, at growing
  sizes, d = 128: time, GFLOP/s (2*N*M*d flops), the rate as a share of the matmul rate,
  and the peak extra memory of each run (peak RSS above the RSS with the inputs loaded;
  each run in its own process). Rates use CPU time as well as wall time, because this
  machine is shared: CPU time is what the run got of the cores.
- the audit case: N_syn synthetic x 10^5 training embeddings (random, plus planted
  near-copies of training rows), time, peak memory, and whether every planted copy is
  found; when N_syn < 10^6 the time for 10^6 is extrapolated (the cost is linear in N_syn).

Dense runs are skipped where the N x M float32 matrix would not fit in 60% of RAM.

Usage: OMP_NUM_THREADS=1 python benchmarks/search.py [--sizes 1000,10000,30000]
       [--audit-synthetic 100000] [--out docs/benchmarks]
       python -m benchmarks.search --device cuda   # the audit case on a GPU (search-gpu.*)
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


N_PLANTED = 100  # planted near-copies in the audit case


def _inputs(n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random queries (n, D) and base (m, D); the first N_PLANTED queries (when n is large)
    are near-copies of base rows 7, 7 + 997, ... (noise 0.1 per coordinate)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, D), dtype=np.float32)
    b = rng.standard_normal((m, D), dtype=np.float32)
    if n >= 10 * N_PLANTED and m >= 997 * N_PLANTED:
        q[:N_PLANTED] = b[_planted_rows()] + 0.1 * rng.standard_normal((N_PLANTED, D))
    return q, b


def _planted_rows() -> np.ndarray:
    return 7 + 997 * np.arange(N_PLANTED)


def _planted_found(indices: np.ndarray) -> int:
    """How many planted near-copies (the first N_PLANTED queries) found their base row."""
    return int((np.asarray(indices)[:N_PLANTED, 0] == _planted_rows()).sum())


def _worker(method: str, n: int, m: int, block: int) -> dict:
    """Run one measurement in this (fresh) process and return its figures.

    ``method``: "nearest" (torch backend), "faiss" or "dense". Under torchrun every rank
    runs this and ``nearest`` splits the queries; rank 0's figures are returned."""
    from medmem import distributed
    from medmem.search import nearest, standardize

    distributed.init_from_env()

    q, b = _inputs(n, m)
    qs, bs = standardize(q), standardize(b)  # both methods get standardised inputs
    backend = "faiss" if method == "faiss" else "torch"
    if method != "dense":
        nearest(qs[:64], bs[:256], k=1, standardized=True, block_size=block, backend=backend)
    before = _square_rate()
    distributed.barrier()
    _reset_peak()
    base = _peak_rss_mb()
    t = time.perf_counter()
    c = time.process_time()
    if method != "dense":
        v, i = nearest(qs, bs, k=1, standardized=True, block_size=block, backend=backend)
    else:
        with torch.no_grad():
            dense = torch.from_numpy(qs) @ torch.from_numpy(bs).T  # (n, m)
            vt, it = dense.max(dim=1)
            v, i = vt.numpy(), it.numpy()
            del dense
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    peak = _peak_rss_mb() - base
    world = distributed.world_size()
    after = _square_rate()
    found = None
    if n >= 10 * N_PLANTED and m >= 997 * N_PLANTED:
        found = _planted_found(i)
    # checksum of the result to compare the methods
    return {
        "method": method,
        "n": n,
        "m": m,
        "block_size": block,
        "seconds": dt,
        "cpu_seconds": cpu,
        "gflops": 2 * n * m * D / dt / 1e9,
        "cpu_gflops": 2 * n * m * D / world / cpu / 1e9,  # this rank's share of the work
        "peak_extra_mb": peak,
        "planted_found": found,
        # the 2048^3 matmul rate in this process just before and after (mean): the load
        # of a shared machine changes over a run, so each share uses its own neighbours
        "matmul_gflops": (before[0] + after[0]) / 2 * world,  # all processes together
        "matmul_cpu_gflops": (before[1] + after[1]) / 2,
        "checksum": float(np.asarray(v, dtype=np.float64).sum()),
        "argmax_checksum": int(np.asarray(i).astype(np.int64).sum()),
    }


def _square_rate() -> tuple[float, float]:
    """Float32 2048^3 matmul rate (GFLOP/s by wall time, by CPU time), best of 3 x 2."""
    x, y = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    torch.mm(x, y, out=out)
    wall = cpu = float("inf")
    for _ in range(3):
        t, p = time.perf_counter(), time.process_time()
        for _ in range(2):
            torch.mm(x, y, out=out)
        wall = min(wall, (time.perf_counter() - t) / 2)
        cpu = min(cpu, (time.process_time() - p) / 2)
    flops = 2 * 2048**3
    return flops / wall / 1e9, flops / cpu / 1e9


def _run(method: str, n: int, m: int, block: int, processes: int = 1) -> dict:
    """One measurement in fresh processes (``processes`` > 1: under torchrun, gloo)."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        launch += [str(processes)]
    out = subprocess.run(
        [*launch, __file__, "--worker", method, str(n), str(m), str(block)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"processes": processes}


def matmul_rate() -> dict:
    """Float32 GEMM rate (2048^3) and the rate of the search's own block shape, by wall
    time and by CPU time (best of three runs of about a second each)."""
    res = {}
    for name, (a, b, c) in {
        "square_2048": (2048, 2048, 2048),
        "block_1024x128x256": (1024, D, 256),  # the default block on the CPU
    }.items():
        x, y = torch.randn(a, b), torch.randn(b, c)
        out = torch.empty(a, c)
        torch.mm(x, y, out=out)
        reps = max(3, int(4e10 / (2 * a * b * c)))
        wall = cpu = float("inf")
        for _ in range(3):
            t, p = time.perf_counter(), time.process_time()
            for _ in range(reps):
                torch.mm(x, y, out=out)
            wall = min(wall, (time.perf_counter() - t) / reps)
            cpu = min(cpu, (time.process_time() - p) / reps)
        res[name] = 2 * a * b * c / wall / 1e9
        res[name + "_cpu"] = 2 * a * b * c / cpu / 1e9
    # NumPy's BLAS, for comparison: on some CPUs (AMD with torch's MKL) it is faster
    x = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    out = np.empty_like(x)
    cpu = float("inf")
    for _ in range(3):
        p = time.process_time()
        np.matmul(x, x, out=out)
        cpu = min(cpu, time.process_time() - p)
    res["square_2048_numpy_cpu"] = 2 * 2048**3 / cpu / 1e9
    return res


def _cuda_mm_rate(a: int, b: int, c: int) -> float:
    """Float32 (no TF32) GEMM rate on the current GPU, TFLOP/s: mean of 10 after 3 warm-ups."""
    x = torch.randn(a, b, device="cuda")
    y = torch.randn(b, c, device="cuda")
    out = torch.empty(a, c, device="cuda")
    for _ in range(3):
        torch.mm(x, y, out=out)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(x, y, out=out)
    torch.cuda.synchronize()
    return 2 * a * b * c / ((time.perf_counter() - t) / 10) / 1e12


def gpu(out: Path, n: int, m: int, blocks: list[int], check_rows: int) -> dict:
    """The audit case (``n`` synthetic x ``m`` training, k = 1) searched on the GPU.

    Float32 throughout: TF32 is switched off, since a rounded product could change which
    training image is the nearest. Each block size is timed on standardised CUDA tensors,
    from the call to its NumPy results; then the whole call from raw CUDA tensors at the
    default block size (standardised on the GPU); the first ``check_rows`` queries are
    checked against the CPU search (same indices).
    """
    from medmem.search import DEFAULT_GPU_BLOCK_SIZE, nearest, standardize

    assert torch.cuda.is_available(), "--device cuda needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    q, b = _inputs(n, m)
    qs, bs = standardize(q), standardize(b)
    rate = {
        "square_8192_tflops": _cuda_mm_rate(8192, 8192, 8192),
        **{f"block_{k}x{D}x{k}_tflops": _cuda_mm_rate(k, D, k) for k in blocks},
    }
    qg, bg = torch.from_numpy(qs).cuda(), torch.from_numpy(bs).cuda()
    nearest(qg[:1024], bg[:4096], k=1, standardized=True, block_size=blocks[0])  # warm-up
    runs = []
    for block in blocks:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        t = time.perf_counter()
        v, i = nearest(qg, bg, k=1, standardized=True, block_size=block)
        dt = time.perf_counter() - t
        runs.append(
            {
                "block_size": block,
                "seconds": dt,
                "tflops": 2 * n * m * D / dt / 1e12,
                "share_of_square_matmul": 2 * n * m * D / dt / 1e12 / rate["square_8192_tflops"],
                "peak_extra_gpu_mb": (torch.cuda.max_memory_allocated() - base_mem) / 2**20,
                "planted_found": _planted_found(i),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    best = min(runs, key=lambda r: r["seconds"])
    t = time.perf_counter()  # the default block size on a GPU
    v_all, i_all = nearest(torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda(), k=1)
    whole = time.perf_counter() - t
    t = time.perf_counter()
    v_cpu, i_cpu = nearest(qs[:check_rows], bs, k=1, standardized=True)
    cpu_seconds = time.perf_counter() - t
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "n_synthetic": n,
        "n_train": m,
        "d": D,
        "tf32": False,
        "matmul": rate,
        "runs": runs,
        "best_block_size": best["block_size"],
        "whole_call_seconds": whole,
        "whole_call_block_size": DEFAULT_GPU_BLOCK_SIZE,
        "whole_call_planted_found": _planted_found(i_all),
        "cpu_check_rows": check_rows,
        "cpu_check_seconds": cpu_seconds,
        "cpu_check_threads": torch.get_num_threads(),
        "cpu_check_same_indices": int((i_all[:check_rows] == i_cpu).sum()),
        "cpu_check_max_abs_diff": float(np.abs(v_all[:check_rows] - v_cpu).max()),
        "seconds_total": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "command": "python -m benchmarks.search --device cuda",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "search-gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "search-gpu.md").write_text(render_gpu(report))
    print(render_gpu(report))
    return report


def render_gpu(r: dict) -> str:
    """docs/benchmarks/search-gpu.md from its JSON."""
    mm = r["matmul"]
    lines = [
        "# Exact nearest-neighbour search on a GPU: the audit case",
        "",
        f"Generated by `{r['command']}` (do not edit by hand); numbers in search-gpu.json.",
        "",
        f"- Device: {r['device']} (torch {r['torch']}, CUDA {r['cuda']}); host "
        f"{r['machine']}. Float32, TF32 off (a rounded product could change which training "
        "image is the nearest).",
        f"- Matrix-multiply rate measured in the same run: {mm['square_8192_tflops']:.1f} "
        "TFLOP/s (float32 8192^3); at the search's block shapes: "
        + ", ".join(f"{k.split('_')[1]} {v:.1f}" for k, v in mm.items() if k.startswith("block_"))
        + " TFLOP/s.",
        f"- Embeddings: {r['n_synthetic']:,} synthetic x {r['n_train']:,} training, d = "
        f"{r['d']}, random plus {N_PLANTED} planted near-copies (as "
        "docs/benchmarks/search.md's audit case); k = 1. Search times: `nearest` on CUDA "
        "tensors already standardised (checked on the GPU, never copied to the host), until "
        "its NumPy results are back.",
        "",
        "| block size | time (s) | TFLOP/s | share of matmul rate | peak extra GPU memory "
        "| planted copies found |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["runs"]:
        lines.append(
            f"| {x['block_size']} | {x['seconds']:.2f} | {x['tflops']:.1f} | "
            f"{x['share_of_square_matmul']:.0%} | {x['peak_extra_gpu_mb']:.0f} MB | "
            f"{x['planted_found']} / {N_PLANTED} |"
        )
    lines += [
        "",
        "- The whole call from raw (unstandardised) CUDA tensors, checked and standardised on "
        f"the GPU, at the default block size then ({r['whole_call_block_size']:,}): "
        f"{r['whole_call_seconds']:.2f} s ({r['whole_call_planted_found']} / {N_PLANTED} "
        "planted copies found)"
        + (
            "; a block that small spends the time in Python between blocks, so the default "
            "on a GPU is now 16,384 (DEFAULT_GPU_BLOCK_SIZE, the fastest row above), not "
            "re-measured as a whole call."
            if r["whole_call_block_size"] < 8192
            else "."
        ),
        f"- Against the CPU search ({r['cpu_check_threads']} threads, first "
        f"{r['cpu_check_rows']:,} queries, {r['cpu_check_seconds']:.1f} s): "
        f"{r['cpu_check_same_indices']:,} of {r['cpu_check_rows']:,} nearest indices equal, "
        f"largest difference in correlation {r['cpu_check_max_abs_diff']:.1e}.",
        f"- Whole run {r['seconds_total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return str(faiss.__version__)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _line(r: dict, mm: dict) -> str:
    return (
        f"{r['method']:<8} x{r.get('processes', 1)} {r['n']:>7} x {r['m']:<7} "
        f"{r['seconds']:8.2f} s "
        f"{r['gflops']:6.1f} GFLOP/s ({r['gflops'] / r['matmul_gflops']:4.0%} of matmul; "
        f"CPU time {r['cpu_gflops'] / r['matmul_cpu_gflops']:4.0%})  "
        f"peak +{r['peak_extra_mb']:.0f} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,30000")
    ap.add_argument("--blocks", default="256,512,1024,2048")
    ap.add_argument("--audit-synthetic", type=int, default=100_000)
    ap.add_argument("--audit-train", type=int, default=100_000)
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="repetitions of the default search at the audit case, each in its own process "
        "between its own matmul measurements: the share's median and range (0: skip)",
    )
    ap.add_argument(
        "--full-audit",
        action="store_true",
        help="only measure the default search (torch, one process) at 10^6 synthetic x "
        "--audit-train rows and add it to the audit case of the existing search.json",
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: only the audit case (10^6 synthetic x --audit-train) on the GPU, written "
        "to search-gpu.{json,md}",
    )
    args = ap.parse_args()
    if args.device == "cuda":
        gpu(Path(args.out), 1_000_000, args.audit_train, [8192, 16384, 32768], 20_000)
        return
    if args.full_audit:
        full_audit(Path(args.out), args.audit_train)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    blocks = [int(s) for s in args.blocks.split(",")]
    from medmem.search import CPU_BASE_DIVISOR, DEFAULT_BLOCK_SIZE

    faiss_version = _faiss_version()
    methods = ["nearest", "faiss"] if faiss_version else ["nearest"]
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    t0 = time.perf_counter()
    load_start = _load()
    mm = matmul_rate()
    print(f"matmul rate: {mm}; load {load_start}", flush=True)
    rows = []
    for n in sizes:
        ref = None
        for method in methods:
            r = _run(method, n, n, DEFAULT_BLOCK_SIZE)
            rows.append(r)
            print(_line(r, mm), flush=True)
            ref = ref or r
        dense_mb = n * n * 4 / 2**20
        if dense_mb < 0.6 * ram_mb:
            rows.append(_run("dense", n, n, 0))
            print(_line(rows[-1], mm), flush=True)
        same = [
            abs(r["checksum"] - ref["checksum"]) < 1e-3 * n
            and r["argmax_checksum"] == ref["argmax_checksum"]
            for r in rows
            if r["n"] == n
        ]
        print(f"  same result for every method: {all(same)}", flush=True)
    sweep = []
    n_sweep = min(20000, max(sizes))
    for bs in blocks:
        r = _run("nearest", n_sweep, n_sweep, bs)
        sweep.append(r)
        print(f"block {bs:>5}: " + _line(r, mm), flush=True)
    audit = []
    for method, procs in [(m, 1) for m in methods] + [("nearest", 2)]:
        r = _run(method, args.audit_synthetic, args.audit_train, DEFAULT_BLOCK_SIZE, procs)
        audit.append(r)
        print("audit case: " + _line(r, mm) + f"  planted found {r['planted_found']}", flush=True)
    repeats = []
    for j in range(args.repeats):
        r = _run("nearest", args.audit_synthetic, args.audit_train, DEFAULT_BLOCK_SIZE)
        repeats.append(r)
        print(f"repeat {j + 1}/{args.repeats}: " + _line(r, mm), flush=True)
    mm_end = matmul_rate()
    # the larger of the two measurements: shares are not flattered by a slow moment
    for key, value in mm_end.items():
        mm[key] = max(mm[key], value)
    info = {
        "machine": f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{ram_mb / 1024:.0f} GiB RAM",
        "torch": torch.__version__,
        "faiss": faiss_version,
        "threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": _load(),
        "matmul_gflops": mm,
        "d": D,
        "default_block_size": DEFAULT_BLOCK_SIZE,
        "cpu_base_divisor": CPU_BASE_DIVISOR,
        "results": rows,
        "block_sweep": sweep,
        "audit_case": audit,
        "repeats": repeats,
        "n_planted": N_PLANTED,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "search.md").write_text(render_markdown(info, _gpu_report(out)))
    print(f"wrote {out / 'search.json'} and search.md ({info['wall_seconds']:.0f} s)")


def full_audit(out: Path, n_train: int) -> None:
    """Measure the default search at 10^6 synthetic rows (a separate run: its load and
    matmul rate are its own) and add it to ``out/search.json``'s audit case."""
    from medmem.search import DEFAULT_BLOCK_SIZE

    path = out / "search.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `python -m benchmarks.search` first.")
    info = json.loads(path.read_text())
    load = _load()
    t0 = time.perf_counter()
    r = _run("nearest", 1_000_000, n_train, DEFAULT_BLOCK_SIZE)
    r["separate_run"] = {
        "load_average_start": load,
        "load_average_end": _load(),
        "wall_seconds": time.perf_counter() - t0,
        "block_size": DEFAULT_BLOCK_SIZE,
    }
    print("audit case: " + _line(r, info["matmul_gflops"]) + f"  planted {r['planted_found']}")
    keep = [a for a in info["audit_case"] if a["n"] != r["n"] or a.get("processes", 1) != 1]
    info["audit_case"] = keep + [r]
    path.write_text(json.dumps(info, indent=2) + "\n")
    (out / "search.md").write_text(render_markdown(info, _gpu_report(out)))
    print(f"added to {path} and search.md")


_NAMES = {"nearest": "nearest (torch)", "faiss": "nearest (FAISS)", "dense": "dense"}


def _name(r: dict) -> str:
    procs = r.get("processes", 1)
    return _NAMES[r["method"]] + (f", {procs} processes" if procs > 1 else "")


def _row(r: dict, mm: dict) -> str:
    return (
        f"| {r['n']:,} x {r['m']:,} | {_name(r)} | {r['seconds']:.2f} | "
        f"{r['gflops']:.1f} | {r['gflops'] / r['matmul_gflops']:.0%} | "
        f"{r['cpu_gflops'] / r['matmul_cpu_gflops']:.0%} | {r['peak_extra_mb']:.0f} MB |"
    )


def _repeats_lines(repeats: list[dict]) -> list[str]:
    """The default search repeated at the audit case: the share's median and range."""
    if not repeats:
        return []
    wall = np.array([r["gflops"] / r["matmul_gflops"] for r in repeats])
    cpu = np.array([r["cpu_gflops"] / r["matmul_cpu_gflops"] for r in repeats])
    r0 = repeats[0]
    return [
        f"Repeated: the default search (torch, one process) at {r0['n']:,} x {r0['m']:,}, "
        f"{len(repeats)} times one after another, each in its own process and divided by "
        "the matmul rate measured in that process just before and after it (one ratio per "
        "repetition, so that a slow or fast moment of the shared machine moves both):",
        "",
        "| | median | lowest | highest | each |",
        "|---|---:|---:|---:|---|",
        f"| share of matmul rate | {np.median(wall):.0%} | {wall.min():.0%} | "
        f"{wall.max():.0%} | {', '.join(f'{v:.0%}' for v in wall)} |",
        f"| share, CPU time | {np.median(cpu):.0%} | {cpu.min():.0%} | {cpu.max():.0%} | "
        f"{', '.join(f'{v:.0%}' for v in cpu)} |",
        "",
    ]


def _gpu_report(out: Path) -> dict | None:
    """``out/search-gpu.json`` (written by ``--device cuda``), or None where it is absent."""
    path = out / "search-gpu.json"
    return json.loads(path.read_text()) if path.exists() else None


def _gpu_sentence(gpu_report: dict | None) -> str:
    """What search-gpu.json measured, for the audit case's paragraph."""
    if gpu_report is None:
        return "not measured (no search-gpu.json: `python -m benchmarks.search --device cuda`)."
    best = min(gpu_report["runs"], key=lambda r: r["seconds"])
    square = gpu_report["matmul"]["square_8192_tflops"]
    return (
        f"measured on one {gpu_report['device']} in {best['seconds']:.2f} s at block size "
        f"{best['block_size']:,} (float32, TF32 {'on' if gpu_report['tf32'] else 'off'}: "
        f"{best['tflops']:.0f} TFLOP/s, {best['tflops'] / square:.0%} of its {square:.0f} "
        f"TFLOP/s float32 GEMM rate), {best['planted_found']} of {N_PLANTED} planted copies "
        f"found, indices equal to the CPU search's for {gpu_report['cpu_check_same_indices']:,} "
        f"of {gpu_report['cpu_check_rows']:,} queries checked ([search-gpu.md](search-gpu.md), "
        "`python -m benchmarks.search --device cuda`; measured before the k = 1 search kept "
        "its block maxima in a table and grouped its second pass over all queries, and not "
        "rerun since for want of a GPU). Eight GPUs under torchrun (not measured: one GPU "
        "was lent) each search an eighth of the queries: about an eighth of that, plus "
        "gathering the results."
    )


def render_markdown(info: dict, gpu_report: dict | None = None) -> str:
    """The results as the Markdown page docs/benchmarks/search.md (``gpu_report``: the
    contents of search-gpu.json, quoted in the audit case)."""
    mm = info["matmul_gflops"]
    head = (
        "| N x M | method | time (s) | GFLOP/s | share of matmul rate | share, CPU time "
        "| peak extra memory |"
    )
    lines = [
        "# Exact nearest-neighbour search: torch and FAISS backends, blocked vs dense",
        "",
        "Generated by `OMP_NUM_THREADS=1 python benchmarks/search.py` (`make bench`); do not "
        "edit by hand.",
        "",
        f"- Machine: {info['machine']}; torch {info['torch']} with {info['threads']} "
        f"thread(s); FAISS {info['faiss'] or 'not installed'}.",
        f"- Load average (1, 5, 15 min) at the start {info['load_average_start']}, at the end "
        f"{info['load_average_end']}: the machine is shared, so wall-clock rates vary from run "
        "to run; the CPU-time share (rate per second of CPU the run actually got) is the "
        "steadier figure.",
        f"- Whole run: {info['wall_seconds']:.0f} s.",
        f"- Matrix-multiply rate measured in the same run (best of the start and the end): "
        f"{mm['square_2048']:.1f} GFLOP/s wall, {mm['square_2048_cpu']:.1f} GFLOP/s per CPU "
        f"second (float32 2048^3); "
        + "; ".join(
            f"{v:.1f} GFLOP/s for the block shape {k[6:].replace('x', ' x ')}"
            for k, v in mm.items()
            if k.startswith("block_") and not k.endswith("_cpu")
        )
        + ". Each share below divides a run's "
        "rate by torch's 2048^3 matmul rate measured in the same process just before and "
        "just after it (their mean), so that both see the same load; a share can pass 100% "
        "where the search's own block shape multiplies faster than 2048^3 (above)."
        + (
            f" NumPy's BLAS ran 2048^3 at {mm['square_2048_numpy_cpu']:.1f} GFLOP/s per CPU "
            "second in the same run."
            if "square_2048_numpy_cpu" in mm
            else ""
        ),
        f"- Embeddings: d = {info['d']}, float32, standardised; k = 1; `nearest` block size "
        f"{info['default_block_size']} ({info['default_block_size']} queries x "
        f"{info['default_block_size'] // info.get('cpu_base_divisor', 1)} base rows per "
        "product). Rate = 2 N M d / time. Peak memory = peak RSS above "
        "the RSS with the inputs loaded, each run in a fresh process.",
        "",
        head,
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(r, mm) for r in info["results"]]
    sizes = {r["n"] for r in info["results"] if r["method"] == "dense"}
    for n in sorted({r["n"] for r in info["results"]} - sizes):
        lines.append(
            f"| {n:,} x {n:,} | dense | not run: the matrix alone needs "
            f"{n * n * 4 / 2**30:.0f} GiB | | | | |"
        )
    lines += [
        "",
        "Every method returns the same maxima and the same indices wherever they ran (checked "
        "in the run; `tests/unit/test_search.py` checks equality with a NumPy brute force, "
        "and FAISS against torch including ties).",
        "",
    ]
    audit = info["audit_case"]
    if audit:
        n_syn, n_tr = audit[0]["n"], audit[0]["m"]
        flops = 2 * 1_000_000 * n_tr * info["d"]
        full = [r for r in audit if r["n"] >= 1_000_000]
        lines += [
            f"## Audit case: 10^6 synthetic x {n_tr:,} training embeddings",
            "",
            f"Random embeddings plus {info['n_planted']} synthetic rows planted as near-copies "
            "of training rows (noise 0.1 per coordinate); k = 1, synthetic rows as queries "
            "(the copy search of `medmem audit`; the audit also searches training against "
            "synthetic, the same cost again). With 2 processes (torchrun, gloo, one thread "
            "each) each searches half of the queries; its shares are of both processes' "
            "matmul rate (wall) and of one process's (CPU time, per rank); peak memory is "
            f"rank 0's. Measured with {n_syn:,} synthetic rows"
            + (
                f"; the 10^6 time of those rows is extrapolated x {1_000_000 / n_syn:.0f} (the "
                "cost is linear in the number of synthetic rows, and memory does not grow "
                "with it)."
                if n_syn < 1_000_000
                else "."
            )
            + (
                " The default (torch, one process) was also measured at 10^6 synthetic rows, "
                "in a separate run (`python -m benchmarks.search --full-audit`; load average "
                f"at its start {full[0]['separate_run']['load_average_start']}), its shares "
                "against the matmul rate measured in its own process."
                if full and "separate_run" in full[0]
                else ""
            ),
            "",
            "| backend | synthetic x training | time (s) | GFLOP/s | share of matmul "
            "rate | share, CPU time | peak extra memory | planted copies found | 10^6 x "
            f"{n_tr:,}: time |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in audit:
            factor = 1_000_000 / r["n"]
            est = r["seconds"] * factor
            lines.append(
                f"| {_name(r)} | {r['n']:,} x {r['m']:,} | {r['seconds']:.1f} | "
                f"{r['gflops']:.1f} | {r['gflops'] / r['matmul_gflops']:.0%} | "
                f"{r['cpu_gflops'] / r['matmul_cpu_gflops']:.0%} | {r['peak_extra_mb']:.0f} MB "
                f"| {r['planted_found']} / {info['n_planted']} | "
                + (f"{est:.0f} s (extrapolated)" if factor > 1 else f"{est:.0f} s")
                + " |"
            )
        lines += [
            "",
            f"On a GPU: one 10^6 x {n_tr:,} x {info['d']} search is {flops / 1e12:.1f} "
            "TFLOP; " + _gpu_sentence(gpu_report),
            "",
        ]
    lines += _repeats_lines(info.get("repeats") or [])
    if info["block_sweep"]:
        lines += [
            f"Block-size sweep, torch backend (N = M = {info['block_sweep'][0]['n']:,}"
            + (
                f"; base rows per product: block size / {info['cpu_base_divisor']}"
                if info.get("cpu_base_divisor", 1) > 1
                else ""
            )
            + "):",
            "",
            "| block size | GFLOP/s | share of matmul rate | share, CPU time | peak extra memory |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in info["block_sweep"]:
            lines.append(
                f"| {r['block_size']} | {r['gflops']:.1f} | "
                f"{r['gflops'] / r['matmul_gflops']:.0%} | "
                f"{r['cpu_gflops'] / r['matmul_cpu_gflops']:.0%} | {r['peak_extra_mb']:.0f} MB |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, method, n, m, block = sys.argv
        figures = _worker(method, int(n), int(m), int(block))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(figures))
    else:
        main()
