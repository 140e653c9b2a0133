"""Batch benchmark: peak memory of `deblend run` on one large image, and throughput over many tiles.

(a) Peak memory: writes one SIZE × SIZE float32 image (default 8192², with a
    TAN WCS: sky + Gaussian noise + many Gaussian and exponential-profile
    sources, close pairs among them), runs ``deblend run`` on it in a child
    process for each method (window by window from the memory-mapped file,
    as ``deblend run`` does for large images, and, for comparison, reading
    it whole), and reads the child's peak resident set size
    (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, measured in a fresh
    helper process per run so runs do not mask each other).
(b) Throughput: simulates N_TILES scenes with `deblend.simulate` (TILE_SIZE²
    each) and times ``deblend run`` over the directory in-process (no Dask)
    and with ``--workers`` 1 and 2, for each method, and once more with one worker
    under Dask's own ``MALLOC_TRIM_THRESHOLD_=65536`` (which deblend's local
    workers no longer get, `deblend.batch`). Wall time includes
    process start, model loading and, with workers, starting the local
    cluster; the per-file time is the mean of the manifest's ``duration``.

Results go to ``OUT.md`` and ``OUT.json`` (default ``pipelines/results/batch``),
with the machine's core count and load average at the start (timings taken on
a busy machine are not comparable).

Usage::

    python pipelines/benchmark_batch.py                                   # everything (about an hour on 2 cores)
    python pipelines/benchmark_batch.py --size 1024 --n-tiles 3 --tile-size 256 --out /tmp/bench   # smoke test
    python pipelines/benchmark_batch.py --skip-throughput --methods sep    # peak memory only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "pipelines" / "results" / "batch"


def make_large_image(path, size, *, seed=0, density=300.0):
    """Write a size × size float32 image of many sources (``density`` per Mpix) with a TAN WCS."""
    from astropy.io import fits
    from astropy.wcs import WCS

    rng = np.random.default_rng(seed)
    image = rng.standard_normal((size, size), dtype=np.float32)  # σ = 1
    image += np.float32(100.0)  # flat sky
    n_sources = int(density * size * size / 1e6)
    xs, ys = rng.uniform(8, size - 8, n_sources), rng.uniform(8, size - 8, n_sources)
    # a third of the sources get a companion 3-6 px away: blends
    n_pairs = n_sources // 3
    angle = rng.uniform(0, 2 * np.pi, n_pairs)
    sep = rng.uniform(3, 6, n_pairs)
    xs = np.concatenate([xs, np.clip(xs[:n_pairs] + sep * np.cos(angle), 8, size - 8)])
    ys = np.concatenate([ys, np.clip(ys[:n_pairs] + sep * np.sin(angle), 8, size - 8)])
    flux = 10 ** rng.uniform(1.7, 3.5, len(xs))  # S/N from ~10 to several hundred
    radius = rng.uniform(1.2, 3.5, len(xs))
    q = rng.uniform(0.4, 1.0, len(xs))
    pa = rng.uniform(0, np.pi, len(xs))
    exponential = rng.random(len(xs)) < 0.5
    half = 12
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    for x, y, f, r, e, t, expo in zip(xs, ys, flux, radius, q, pa, exponential, strict=True):
        ix, iy = int(round(x)), int(round(y))
        dx, dy = xx + ix - x, yy + iy - y
        u = dx * np.cos(t) + dy * np.sin(t)
        v = (-dx * np.sin(t) + dy * np.cos(t)) / e
        rr = np.hypot(u, v)
        profile = np.exp(-rr / r) if expo else np.exp(-0.5 * (rr / r) ** 2)
        profile *= f / profile.sum()
        y0, y1, x0, x1 = iy - half, iy + half + 1, ix - half, ix + half + 1
        cy0, cx0 = max(0, -y0), max(0, -x0)
        cy1 = profile.shape[0] - max(0, y1 - size)
        cx1 = profile.shape[1] - max(0, x1 - size)
        image[max(0, y0):min(size, y1), max(0, x0):min(size, x1)] += profile[cy0:cy1, cx0:cx1].astype(np.float32)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(image, header=wcs.to_header()).writeto(path, overwrite=True)
    return len(xs)


def measure(cmd, *, env=None):
    """Run ``cmd`` in a fresh helper process; return its exit status, wall time and the peak RSS of ``cmd``."""
    helper = [sys.executable, __file__, "_measure", "--", *cmd]
    out = subprocess.run(helper, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("MEASURE ")]
    if not lines:
        raise RuntimeError(f"measurement helper failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1][len("MEASURE "):])


def _measure_child(cmd):
    """Helper process: run ``cmd``, print its peak RSS (ru_maxrss of the children, KiB on Linux) as JSON."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    maxrss_kib = usage.ru_maxrss
    if sys.platform == "darwin":  # bytes there
        maxrss_kib //= 1024
    print("MEASURE " + json.dumps({"rc": proc.returncode, "wall_s": wall, "peak_rss_mib": maxrss_kib / 1024,
                                   "cpu_s": usage.ru_utime + usage.ru_stime, "stderr_tail": proc.stderr[-1500:]}))


def deblend_cmd(inputs, outdir, method, extra=()):
    return [sys.executable, "-m", "deblend.cli", "-q", "run", "--method", method, *map(str, inputs),
            "-o", str(outdir), "--overwrite", *extra]


def whole_image_cmd(inputs, outdir, method):
    """`deblend run` as the CLI does it, but reading every image whole (``large_image_pixels=None``)."""
    code = ("import sys; from deblend import Deblender, run_batch; "
            "s = run_batch(sys.argv[3:], sys.argv[2], Deblender(sys.argv[1]), overwrite=True, progress=False, "
            "large_image_pixels=None); sys.exit(1 if s.failed else 0)")
    return [sys.executable, "-c", code, method, str(outdir), *map(str, inputs)]


def run_memory(args, work):
    image = work / f"large_{args.size}.fits"
    if not image.exists():
        print(f"writing {image} ...", flush=True)
        n = make_large_image(image, args.size, seed=args.seed)
        print(f"  {n} sources", flush=True)
    rows = []
    for method in args.methods:
        for mode in args.memory_modes:
            outdir = work / f"large_out_{method}_{mode}"
            shutil.rmtree(outdir, ignore_errors=True)
            print(f"peak memory: {method} on {args.size}², {mode} ...", flush=True)
            make = deblend_cmd if mode == "windows" else whole_image_cmd
            result = measure(make([image], outdir, method))
            rows.append({"method": method, "mode": mode, "size": args.size, "image_mib": args.size ** 2 * 4 / 2 ** 20,
                         "peak_rss_mib": round(result["peak_rss_mib"], 1), "wall_s": round(result["wall_s"], 1),
                         "cpu_s": round(result["cpu_s"], 1), "rc": result["rc"],
                         "n_sources": _manifest_sources(outdir)})
            if result["rc"] != 0:
                rows[-1]["error"] = result["stderr_tail"]
            print(f"  {rows[-1]}", flush=True)
    return rows


def _manifest_sources(outdir):
    path = Path(outdir) / "manifest.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r.get("n_sources", 0) for r in records if r.get("status") == "ok")


def _manifest_durations(outdir):
    path = Path(outdir) / "manifest.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["duration"] for r in records if r.get("status") == "ok"]


def run_throughput(args, work):
    from dataclasses import replace

    from deblend.simulate import SceneConfig, simulate_directory

    tiles = work / f"tiles_{args.n_tiles}x{args.tile_size}"
    if not tiles.exists() or len(list(tiles.glob("tile_*[0-9].fits"))) < args.n_tiles:
        print(f"simulating {args.n_tiles} tiles of {args.tile_size}² into {tiles} ...", flush=True)
        config = replace(SceneConfig(), shape=(args.tile_size, args.tile_size))
        simulate_directory(tiles, args.n_tiles, config=config, seed=args.seed, prefix="tile", overwrite=True,
                           progress=False)
    modes = [("in-process", [], None)] + [(f"--workers {n}", ["--workers", str(n)], None) for n in args.workers]
    # what the workers ran like before deblend unset Dask's MALLOC_TRIM_THRESHOLD_ (see deblend.batch)
    modes.append(("--workers 1, MALLOC_TRIM_THRESHOLD_=65536 (Dask's default)", ["--workers", "1"],
                  {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}))
    rows = []
    for method in args.methods:
        for i, (name, extra, env) in enumerate(modes):
            outdir = work / f"tiles_out_{method}_{i}"
            shutil.rmtree(outdir, ignore_errors=True)
            print(f"throughput: {method}, {name} ...", flush=True)
            result = measure(deblend_cmd([tiles], outdir, method, extra), env=env)
            durations = _manifest_durations(outdir) if (outdir / "manifest.jsonl").exists() else []
            mpix = args.n_tiles * args.tile_size ** 2 / 1e6
            row = {"method": method, "mode": name, "n_tiles": args.n_tiles, "tile_size": args.tile_size,
                   "rc": result["rc"], "wall_s": round(result["wall_s"], 2),
                   "files_per_s": round(args.n_tiles / result["wall_s"], 3),
                   "mpix_per_s": round(mpix / result["wall_s"], 3),
                   "mean_file_s": round(float(np.mean(durations)), 3) if durations else None,
                   "cpu_s": round(result["cpu_s"], 1),
                   "n_ok": len(durations), "n_sources": _manifest_sources(outdir),
                   "largest_process_peak_rss_mib": round(result["peak_rss_mib"], 1)}
            if result["rc"] != 0:
                row["error"] = result["stderr_tail"]
            rows.append(row)
            print(f"  {row}", flush=True)
    return rows


def machine():
    import torch

    import deblend

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load] if load else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "deblend": deblend.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def write_results(out, results, argv):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = ["# Batch benchmark", "",
             f"Command: `python pipelines/benchmark_batch.py {' '.join(argv)}`", "",
             f"Machine: {m['cpu_count']} cores, load average {m['load_average_1_5_15']} at the start, "
             f"{m['platform']}, Python {m['python']}, torch {m['torch']}, deblend {m['deblend']}, {m['date']}.", ""]
    load = m["load_average_1_5_15"]
    if load and m["cpu_count"] and load[0] > 0.5 * m["cpu_count"]:
        lines += ["**The machine was busy when this ran (load average above half its cores): wall times and "
                  "throughput here are not representative; peak memory is.**", ""]
    if results.get("memory"):
        lines += ["## Peak memory of `deblend run` on one large image", "",
                  "Peak resident set size of the `deblend run` process (`ru_maxrss`), one float32 image with a "
                  "TAN WCS. *windows*: what `deblend run` does (memory-mapped, window by window, "
                  "`deblend.largeimage`); *whole*: the same run reading the image whole "
                  "(`run_batch(..., large_image_pixels=None)`).", "",
                  "| method | mode | image | image size | peak RSS | wall time | CPU time | sources | exit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["memory"]:
            lines.append(f"| {r['method']} | {r['mode']} | {r['size']}×{r['size']} | {r['image_mib']:.0f} MiB | "
                         f"{r['peak_rss_mib'] / 1024:.2f} GiB | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | "
                         f"{r['n_sources']} | {r['rc']} |")
        lines.append("")
    if results.get("throughput"):
        lines += ["## Throughput over many tiles", "",
                  "Wall time of the whole `deblend run` (process start, model loading, cluster start included); "
                  "mean per-file time from the manifest's `duration`.", "",
                  "| method | mode | tiles | wall time | files/s | Mpix/s | mean s/file | sources | exit |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["throughput"]:
            lines.append(f"| {r['method']} | {r['mode']} | {r['n_tiles']}×{r['tile_size']}² | {r['wall_s']:.1f} s | "
                         f"{r['files_per_s']:.3f} | {r['mpix_per_s']:.3f} | {r['mean_file_s']} | {r['n_sources']} | "
                         f"{r['rc']} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_measure"]:
        _measure_child(argv[argv.index("--") + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="side of the large image (default 8192)")
    parser.add_argument("--n-tiles", type=int, default=24, help="tiles for the throughput runs (default 24)")
    parser.add_argument("--tile-size", type=int, default=1024, help="side of each tile (default 1024)")
    parser.add_argument("--methods", nargs="+", default=["sep", "mask-rcnn"], help="methods (default sep mask-rcnn)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers values (default 1 2)")
    parser.add_argument("--memory-modes", nargs="+", default=["windows", "whole"], choices=["windows", "whole"],
                        help="peak memory of the windowed run (what deblend run does) and/or of a whole-image read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/deblend_benchmark_batch",
                        help="where images and outputs go (large; reused between runs)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results path without suffix (.md and .json)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "args": vars(args)}
    if not args.skip_memory:
        results["memory"] = run_memory(args, work)
    if not args.skip_throughput:
        results["throughput"] = run_throughput(args, work)
    write_results(Path(args.out), results, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
