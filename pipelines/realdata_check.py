"""Run deblend on every real survey image in ../shared/realdata and make quick-looks.

No simulator made these images, so this is where the pipeline meets real PSFs, noise,
artefacts and crowding. Records, per image and method, the number of sources, the time
and any failure, in pipelines/results/realdata.md; writes quick-look PNGs to docs/.

Usage (from the repository root):  .venv/bin/python pipelines/realdata_check.py [--methods mask-rcnn sep]
    [--coarse-pass] [--tta] [--out FILE] [--no-quicklooks]
"""

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from deblend import Deblender, read_image
from deblend.batch import is_fits_name
from deblend.viz import plot_comparison

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
QUICKLOOKS = {  # image -> PNG name in docs/
    "decals_dr7_a1689_astro_rcnn/img_r.fits": "realdata_decals_r.png",
    "xdf_hudf_pysep/detection_sci.fits.gz": "realdata_xdf.png",
}
log = logging.getLogger("realdata_check")


class CrowdedWindows(logging.Handler):
    """Counts the windows `deblend.segment.detect` re-ran at half size (its INFO record)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        if record.name == "deblend.segment" and record.msg.startswith("detect: %d crowded windows"):
            self.count += record.args[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["mask-rcnn", "sep", "photutils"])
    p.add_argument("--coarse-pass", action="store_true",
                   help="add a column for Mask R-CNN with the coarse pass for large sources (deblend.coarse)")
    p.add_argument("--tta", action="store_true",
                   help="add a column for Mask R-CNN with test-time augmentation (deblend.tta)")
    p.add_argument("--realdata", default=str(REALDATA))
    p.add_argument("--out", default=str(ROOT / "pipelines" / "results" / "realdata.md"), help="results table")
    p.add_argument("--no-quicklooks", dest="quicklooks", action="store_false",
                   help="do not (re)write the README's quick-look PNGs in docs/")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    crowded = CrowdedWindows()
    segment_log = logging.getLogger("deblend.segment")
    segment_log.setLevel(logging.INFO)  # INFO reaches the counter only; the console shows warnings
    segment_log.addHandler(crowded)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    root = Path(args.realdata)
    files = sorted(f for f in root.rglob("*") if f.is_file() and is_fits_name(f))
    deblenders = {m: Deblender(m) for m in args.methods}
    if args.coarse_pass:
        deblenders["mask-rcnn --coarse-pass"] = Deblender("mask-rcnn", coarse_pass=True)
    if args.tta:
        deblenders["mask-rcnn --tta"] = Deblender("mask-rcnn", tta=True)
    methods = list(deblenders)
    rows, maps = [], {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        image = read_image(f)
        row = {"file": rel, "shape": "x".join(map(str, image.data.shape))}
        for method, deblender in deblenders.items():
            t0 = time.perf_counter()
            crowded.count = 0
            try:
                result = deblender.run(image)
                row[method] = f"{result.n_sources} ({time.perf_counter() - t0:.1f} s)"
                if crowded.count:
                    row[method] += f", {crowded.count} crowded windows split"
                if args.quicklooks and rel in QUICKLOOKS:
                    maps.setdefault(rel, {})[method] = result.labels
            except Exception as exc:  # report every failure, keep going
                row[method] = f"FAILED: {type(exc).__name__}: {exc}"
        rows.append(row)
        print(row, flush=True)
    lines = ["| image | shape | " + " | ".join(f"{m}: sources (time)" for m in methods) + " |",
             "| --- | --- |" + " --- |" * len(methods)]
    lines += [f"| {r['file']} | {r['shape']} | " + " | ".join(r[m] for m in methods) + " |" for r in rows]
    n_failed = sum("FAILED" in r[m] for r in rows for m in methods)
    n_split = sum(any("crowded windows split" in r[m] for m in methods) for r in rows)
    lines += ["", f"{len(rows)} images, {n_failed} failures; crowded windows were split "
              f"(run again at half size) in {n_split} of them."]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    for rel, png in QUICKLOOKS.items():
        if rel in maps:
            image = read_image(root / rel).data[0]
            fig = plot_comparison(np.asarray(image), maps[rel], title=f"{rel} (real data)", panel_size=4.5)
            fig.savefig(ROOT / "docs" / png, dpi=60)
    print(f"wrote {out}; {n_failed} failures")


if __name__ == "__main__":
    main()
