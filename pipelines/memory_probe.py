"""Where does a long run's memory go? Deblend many small tiles in one process, tracking RSS and Python allocations.

The soak test (pipelines/soak.py) shows each Dask worker's RSS creeping up
with the files done. This probe separates the candidates: it deblends N small
simulated tiles in-process (no Dask) with the default pipeline and records,
every ``--every`` files, the process RSS and the Python heap traced by
``tracemalloc`` (what Python objects hold), and finally the source lines whose
allocations grew most between the first checkpoint after warm-up and the end.
Growth of RSS with a flat Python heap points below Python (allocator,
torch/oneDNN caches); growth of the Python heap names the lines that hold it.

Usage (from the repository root)::

    .venv/bin/python pipelines/memory_probe.py --n 300 --every 25   # writes pipelines/results/memory_probe.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


def rss_mib():
    """Resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=600, help="tiles (default 600)")
    p.add_argument("--every", type=int, default=50, help="files between checkpoints (default 50)")
    p.add_argument("--shape", type=int, nargs=2, default=(128, 128))
    p.add_argument("--results-dir", type=Path, default=ROOT / "pipelines" / "results")
    p.add_argument("--no-trim", action="store_true",
                   help="do not hand freed heap memory back after each file (deblend run does; for A/B runs)")
    p.add_argument("--tag", default="", help="suffix of the result files (memory_probe_TAG.md), for A/B runs")
    args = p.parse_args(argv)

    from soak import make_tiles

    from deblend.batch import _release_memory
    from deblend.io import read_image
    from deblend.pipeline import Deblender

    work = Path(tempfile.mkdtemp(prefix="deblend-memprobe-"))
    tiles = sorted(Path(make_tiles(work / "tiles", args.n, shape=tuple(args.shape), seed=0)).glob("*.fits"))
    deblender = Deblender()
    tracemalloc.start(1)  # one frame per allocation: the line; more frames make every file several times slower
    rows, base_snapshot = [], None
    start = time.perf_counter()
    for i, path in enumerate(tiles, start=1):
        result = deblender.run(read_image(path))
        result.write(work / "out", stem=Path(path).stem, overwrite=True)
        del result
        if not args.no_trim:
            _release_memory()  # as deblend run does after each input
        if i % args.every == 0 or i == len(tiles):
            gc.collect()
            traced, _ = tracemalloc.get_traced_memory()
            rows.append({"files": i, "rss_mib": round(rss_mib(), 1), "python_heap_mib": round(traced / 2**20, 2),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(rows[-1], flush=True)
            if base_snapshot is None and i >= 2 * args.every:
                base_snapshot = tracemalloc.take_snapshot()
    top = []
    if base_snapshot is not None:
        diff = tracemalloc.take_snapshot().compare_to(base_snapshot, "lineno")
        top = [{"where": str(d.traceback[0]), "size_diff_kib": round(d.size_diff / 1024, 1),
                "count_diff": d.count_diff} for d in diff[:10]]
    after = [r for r in rows if r["files"] >= 2 * args.every]
    span = after[-1]["files"] - after[0]["files"] if len(after) > 1 else 0
    growth = {k: round((after[-1][k] - after[0][k]) / span * 100, 2) if span else None
              for k in ("rss_mib", "python_heap_mib")}
    result = {"n_files": len(tiles), "shape": list(args.shape), "checkpoints": rows,
              "growth_per_100_files_after_warmup": growth, "top_python_growth": top,
              "command": "pipelines/memory_probe.py " + " ".join(argv or sys.argv[1:]),
              "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "ONEDNN_", "DNNL_"))}}
    name = "memory_probe" + (f"_{args.tag}" if args.tag else "")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    env = ", ".join(f"{k}={v}" for k, v in result["environment"].items()) or "none"
    lines = ["# Memory probe", "", f"Command: `{result['command']}`; {len(tiles)} tiles of "
             f"{args.shape[0]}×{args.shape[1]}, default pipeline, in one process (no Dask), "
             f"{'without' if args.no_trim else 'with'} malloc_trim after each file as `deblend run` does. "
             f"Allocator/oneDNN environment variables: {env}.", "",
             "| files done | RSS (MiB) | Python heap traced (MiB) | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['files']} | {r['rss_mib']} | {r['python_heap_mib']} | {r['seconds']} |" for r in rows]
    lines += ["", f"Growth per 100 files from file {after[0]['files'] if after else '-'} on: RSS "
              f"{growth['rss_mib']} MiB, Python heap {growth['python_heap_mib']} MiB.", "",
              "Largest growth of Python allocations over that span (tracemalloc, by line):", "",
              "| where | size change (KiB) | blocks |", "| --- | --- | --- |"]
    lines += [f"| `{t['where']}` | {t['size_diff_kib']} | {t['count_diff']} |" for t in top]
    (args.results_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results_dir / name}.md")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
