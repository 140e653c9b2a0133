"""Soak test: many small tiles through ``deblend run``, watching memory and open files of every process.

Writes N small simulated tiles (Gaussian sources on a noisy sky, TAN WCS), runs
``deblend run TILES -o OUT --workers W`` (serially when ``--workers`` is not
available or W is 0) and samples, every ``--interval`` seconds, the resident
memory (RSS) and open file descriptors of the command and of every process it
started (the Dask nanny and worker processes). Progress is read from
``OUT/manifest.jsonl``. Writes ``soak.json`` (every sample and the summary) and
``soak.md`` (per-process table: RSS and fds at start, middle and end) into
``--results-dir``.

A leak shows as RSS or fd counts that keep rising with the number of files
done after the warm-up; the summary gives, for each process, the growth from
the sample at 10 % of the files to the last one, per 100 files.

Usage (the numbers in pipelines/results/soak.* come from this)::

    .venv/bin/python pipelines/soak.py --n 500 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import psutil
except ImportError:  # fall back to /proc
    psutil = None

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tiles


def make_tiles(directory, n, *, shape=(128, 128), seed=0):
    """Write ``n`` tiles with 5-30 Gaussian sources each; returns their directory."""
    from astropy.io import fits
    from astropy.wcs import WCS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    rng = np.random.default_rng(seed)
    for i in range(n):
        data = rng.normal(100.0, 1.0, shape)
        for _ in range(rng.integers(5, 31)):
            x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
            sigma = rng.uniform(1.0, 3.0)
            data += rng.uniform(5, 200) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [150.0 + 0.01 * (i % 50), 2.0 + 0.01 * (i // 50)]
        wcs.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
        wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
        fits.PrimaryHDU(data.astype(np.float32), header=wcs.to_header()).writeto(directory / f"tile_{i:04d}.fits")
    return directory


# --------------------------------------------------------------------------- process sampling


def _proc_children(pid):
    """Child pids of ``pid`` from /proc (recursive)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _proc_sample(pid):
    """(rss bytes, open fds, command line) of ``pid`` from /proc, or None when it is gone."""
    try:
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, StopIteration):
        return None
    return rss_kb * 1024, fds, cmdline.strip()


def sample_tree(pid):
    """One sample of ``pid`` and all its descendants: ``{pid: {"rss", "fds", "cmd"}}``."""
    out = {}
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            processes = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for proc in processes:
            try:
                with proc.oneshot():
                    out[proc.pid] = {"rss": proc.memory_info().rss, "fds": proc.num_fds(),
                                     "cmd": " ".join(proc.cmdline())}
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out
    for each in [pid] + _proc_children(pid):
        got = _proc_sample(each)
        if got is not None:
            out[each] = {"rss": got[0], "fds": got[1], "cmd": got[2]}
    return out


def _count_done(manifest):
    try:
        with open(manifest, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def _role(pid, root_pid, cmd):
    if pid == root_pid:
        return "deblend run (main)"
    if "resource_tracker" in cmd:
        return "multiprocessing resource tracker"
    if "spawn_main" in cmd or "forkserver" in cmd:
        return "worker (spawned)"
    if "dask" in cmd or "distributed" in cmd:
        return "dask process"
    return "child"


def has_workers_option():
    """Whether this deblend's ``run`` command takes ``--workers``."""
    out = subprocess.run([sys.executable, "-m", "deblend.cli", "run", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    return "--workers" in out.stdout


# --------------------------------------------------------------------------- summary


def summarise(samples, n_files, root_pid):
    """Per-process start/middle/end RSS and fds, and growth after the warm-up, from the samples."""
    per_pid = {}
    for sample in samples:
        for pid, info in sample["procs"].items():
            per_pid.setdefault(int(pid), []).append((sample["t"], sample["done"], info))
    rows = []
    for pid, seen in sorted(per_pid.items()):
        if len(seen) < 2:
            continue  # short-lived helpers (e.g. a shell) say nothing about leaks
        cmd = seen[0][2]["cmd"]
        middle = min(seen, key=lambda s: abs(s[1] - n_files / 2))
        warm = next((s for s in seen if s[1] >= 0.1 * n_files), seen[0])
        last = seen[-1]
        files = last[1] - warm[1]
        growth = (last[2]["rss"] - warm[2]["rss"]) / files * 100 if files > 0 else None
        late_files = last[1] - middle[1]  # a cache that fills up grows early; a leak keeps growing
        late = (last[2]["rss"] - middle[2]["rss"]) / late_files * 100 if late_files > 0 else None
        rows.append({
            "pid": pid, "role": _role(pid, root_pid, cmd), "cmd": cmd[:160], "n_samples": len(seen),
            "start": {"t": seen[0][0], "done": seen[0][1], "rss_mib": seen[0][2]["rss"] / 2**20,
                      "fds": seen[0][2]["fds"]},
            "warm": {"t": warm[0], "done": warm[1], "rss_mib": warm[2]["rss"] / 2**20, "fds": warm[2]["fds"]},
            "middle": {"t": middle[0], "done": middle[1], "rss_mib": middle[2]["rss"] / 2**20,
                       "fds": middle[2]["fds"]},
            "end": {"t": last[0], "done": last[1], "rss_mib": last[2]["rss"] / 2**20, "fds": last[2]["fds"]},
            "max_rss_mib": max(s[2]["rss"] for s in seen) / 2**20,
            "max_fds": max(s[2]["fds"] for s in seen),
            "rss_growth_mib_per_100_files_after_warmup": None if growth is None else growth / 2**20,
            "rss_growth_mib_per_100_files_second_half": None if late is None else late / 2**20,
            "fds_growth_after_warmup": last[2]["fds"] - warm[2]["fds"],
        })
    return rows


def write_markdown(path, result):
    run = result["run"]
    lines = [
        "# Soak test",
        "",
        f"`{run['command']}` on {run['n_files']} tiles of {run['shape'][0]}×{run['shape'][1]} pixels "
        f"(method {run['method']}, {run['mode']}), {run['date']}, {run['machine']}.",
        "",
        f"Exit status {run['returncode']}; {run['n_ok']} ok, {run['n_failed']} failed; wall time "
        f"{run['wall_s']:.1f} s; {len(result['samples'])} samples every {run['interval_s']} s "
        f"({'psutil' if run['psutil'] else '/proc'}). Made by `{run['script']}`.",
        "",
        "RSS in MiB and open file descriptors (fds) of each process at its first sample (start), at the first "
        "sample with 10 % of the files done (warm), at the sample nearest to half the files done (middle) and "
        "at its last sample (end); growth is from warm to end, and from middle to end, per 100 files.",
        "",
        "| pid | process | RSS start | warm | middle | end | max | RSS growth / 100 files | same, second half | "
        "fds start | warm | middle | end | max | files done at start / warm / middle / end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["processes"]:
        growth = row["rss_growth_mib_per_100_files_after_warmup"]
        late = row.get("rss_growth_mib_per_100_files_second_half")
        lines.append(
            f"| {row['pid']} | {row['role']} | {row['start']['rss_mib']:.0f} | {row['warm']['rss_mib']:.0f} | "
            f"{row['middle']['rss_mib']:.0f} | {row['end']['rss_mib']:.0f} | {row['max_rss_mib']:.0f} | "
            f"{'n/a' if growth is None else f'{growth:+.1f}'} | {'n/a' if late is None else f'{late:+.1f}'} | "
            f"{row['start']['fds']} | {row['warm']['fds']} | "
            f"{row['middle']['fds']} | {row['end']['fds']} | {row['max_fds']} | {row['start']['done']} / "
            f"{row['warm']['done']} / {row['middle']['done']} / {row['end']['done']} |")
    lines += ["", "Command lines:", ""]
    lines += [f"- {row['pid']}: `{row['cmd']}`" for row in result["processes"]]
    if run["n_failed"]:
        lines += ["", "First failures:", ""] + [f"- {e}" for e in run["first_errors"]]
    path.write_text("\n".join(lines) + "\n")


def plot_rss(result, path):
    """RSS of every long-lived process against the number of files done."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in result["processes"]:
        pid = str(row["pid"])
        pts = [(smp["done"], smp["procs"][pid]["rss"] / 2**20) for smp in result["samples"] if pid in smp["procs"]]
        if row["max_rss_mib"] < 100:  # small helpers (resource tracker, shells) say nothing here
            continue
        ax.plot(*zip(*pts, strict=True), ".", ms=2, label=f"{row['role']} ({row['pid']})")
    ax.set_xlabel("files done")
    ax.set_ylabel("RSS (MiB)")
    run = result["run"]
    ax.set_title(f"{run['n_files']} tiles, {run['mode']}, method {run['method']}", fontsize=10)
    ax.legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="number of tiles (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers; 0 = serial (default 2)")
    parser.add_argument("--method", default="mask-rcnn", help="deblending method (default mask-rcnn)")
    parser.add_argument("--shape", type=int, nargs=2, default=(128, 128), metavar=("NY", "NX"))
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "pipelines" / "results")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "soak_rss.png",
                        help="RSS against files done, per process (default docs/soak_rss.png)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where tiles and outputs go (default: a temporary directory, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="deblend-soak-")) if args.workdir is None else args.workdir
    try:
        tiles = make_tiles(workdir / "tiles", args.n, shape=tuple(args.shape), seed=args.seed)
        outdir = workdir / "out"
        if outdir.exists():
            shutil.rmtree(outdir)
        workers = args.workers if args.workers and has_workers_option() else 0
        mode = f"--workers {workers}" if workers else "serial (in one process)"
        if args.workers and not workers:
            print("deblend run has no --workers option here: running serially", file=sys.stderr)
        cmd = [sys.executable, "-m", "deblend.cli", "-q", "run", str(tiles), "-o", str(outdir),
               "--method", args.method]
        if workers:
            cmd += ["--workers", str(workers)]
        manifest = outdir / "manifest.jsonl"
        samples = []
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT)
        while True:
            now = time.perf_counter() - start
            procs = sample_tree(proc.pid)
            if proc.poll() is not None:
                break
            samples.append({"t": round(now, 3), "done": _count_done(manifest),
                            "procs": {str(pid): info for pid, info in procs.items()}})
            time.sleep(args.interval)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()] \
            if manifest.exists() else []
        failed = [r for r in records if r.get("status") != "ok"]
        run = {
            "command": " ".join(["deblend", "run", "TILES", "-o", "OUT", "--method", args.method]
                                + (["--workers", str(workers)] if workers else [])),
            "argv": cmd, "n_files": args.n, "shape": list(args.shape), "method": args.method, "mode": mode,
            "workers": workers, "returncode": proc.returncode, "wall_s": wall, "interval_s": args.interval,
            "n_ok": sum(r.get("status") == "ok" for r in records), "n_failed": len(failed),
            "first_errors": [r.get("error", "")[:300] for r in failed[:5]],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "psutil": psutil is not None, "script": "pipelines/soak.py " + " ".join(argv or sys.argv[1:]),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        result = {"run": run, "processes": summarise(samples, args.n, proc.pid), "samples": samples}
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "soak.json").write_text(json.dumps(result, indent=1))
        write_markdown(args.results_dir / "soak.md", result)
        if args.figure is not None:
            plot_rss(result, args.figure)
        print(f"{run['n_ok']} of {args.n} ok, {run['n_failed']} failed, {wall:.1f} s; "
              f"wrote {args.results_dir / 'soak.md'} and soak.json")
        return 0 if proc.returncode == 0 else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
