"""Where Mask R-CNN loses blended sources and mask IoU: a diagnosis on the quality benchmark's scenes.

For each blended truth source (deblend.simulate's convention) of the benchmark scenes
(benchmark_quality.py's conditions and seeds), this records whether the pipeline's Mask R-CNN
pass (no refinement) finds it, and, for those it misses, where it was lost:

- no detection: no instance of score >= the threshold has its centre within 0.5 FWHM;
- mask NMS: one had, but `deblend.segment.suppress_duplicates` removed it;
- label map: it survived the NMS, but `instances_to_labels` left it no pixel;
- matched elsewhere: it is in the label map, but the one-to-one matching gave it to a
  neighbouring truth source (the two were merged into one detection);
- other: anything else (e.g. its catalog centroid moved more than 1 FWHM).

It also bins blended recall by the source's S/N and by the flux ratio of its nearest
neighbour, and mean IoU of matched sources by S/N. Writes pipelines/results/diagnose_blends.md.

Usage (from the repository root):
    .venv/bin/python pipelines/diagnose_blends.py [--n 200] [--tta]
"""

import argparse
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from benchmark_quality import scene_config

from deblend.catalog import make_catalog
from deblend.evaluate import match_sources
from deblend.io import Image
from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn
from deblend.preprocess import prepare
from deblend.segment import detect, instances_to_labels, suppress_duplicates
from deblend.simulate import simulate_scene
from deblend.tta import TTA_SCORE_THRESHOLD, detect_tta

ROOT = Path(__file__).resolve().parents[1]
SNR_BINS = ((5, 10), (10, 20), (20, 50), (50, 200), (200, np.inf))
RATIO_BINS = ((0, 1), (1, 10), (10, np.inf))
FATES = ("no detection", "mask NMS", "label map", "matched elsewhere", "other")
log = logging.getLogger("diagnose_blends")


def _near(instances, xy, radius):
    if not len(instances):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.hypot(instances.centers[:, 0] - xy[0], instances.centers[:, 1] - xy[1]) < radius)


def diagnose_scene(scene, fwhm, model, *, tta=False, max_overlap=0.5):
    """Per truth source: (blended, matched, snr, neighbour flux ratio, fate or '', IoU or nan)."""
    prepared = prepare(Image.from_array(scene.image))
    shape = prepared.detection.shape
    normalized = prepared.normalized()
    if tta:
        found = detect_tta(normalized, model=model, mask=prepared.mask, score_threshold=TTA_SCORE_THRESHOLD)
    else:
        found = detect(normalized, model=model, mask=prepared.mask, score_threshold=0.5)
    kept = suppress_duplicates(found, shape, max_overlap=max_overlap)
    labels, keep = instances_to_labels(kept, shape, mask=prepared.mask)
    final = kept.select(keep)
    catalog = make_catalog(prepared.data, labels, detection=prepared.detection)
    truth = scene.truth
    txy = np.column_stack([truth["x"], truth["y"]])
    pxy = np.column_stack([catalog["x_centroid"], catalog["y_centroid"]])
    pred_idx, truth_idx = match_sources(pxy, txy, max_distance=fwhm)
    match = dict(zip(truth_idx.tolist(), pred_idx.tolist(), strict=True))
    owner = {p: t for t, p in match.items()}
    flux = np.asarray(truth["flux"], dtype=np.float64)
    distance = np.hypot(txy[:, None, 0] - txy[None, :, 0], txy[:, None, 1] - txy[None, :, 1])
    np.fill_diagonal(distance, np.inf)
    neighbour = distance.argmin(axis=1) if len(truth) > 1 else np.zeros(len(truth), dtype=np.int64)
    rows = []
    for k in range(len(truth)):
        fate, iou = "", np.nan
        if k in match:
            pred = labels == catalog["label"][match[k]]
            true = scene.truth_seg == truth["id"][k]
            iou = (pred & true).sum() / max((pred | true).sum(), 1)
        elif not len(_near(found, txy[k], 0.5 * fwhm)):
            fate = "no detection"
        elif not len(_near(kept, txy[k], 0.5 * fwhm)):
            fate = "mask NMS"
        elif not len(_near(final, txy[k], 0.5 * fwhm)):
            fate = "label map"
        elif any(owner.get(int(j), -1) >= 0 for j in _near(final, txy[k], 0.5 * fwhm)):
            fate = "matched elsewhere"
        else:
            fate = "other"
        ratio = flux[neighbour[k]] / flux[k] if len(truth) > 1 and flux[k] > 0 else np.nan
        rows.append((bool(truth["blended"][k]), k in match, float(truth["snr"][k]), ratio, fate, iou))
    return rows


def _rate(values):
    return f"{np.mean(values):.3f}" if len(values) else "n/a"


def report(rows, *, n_scenes, tta):
    blended = np.array([r[0] for r in rows])
    found = np.array([r[1] for r in rows])
    snr = np.array([r[2] for r in rows])
    ratio = np.array([r[3] for r in rows])
    fates = Counter(r[4] for r, b in zip(rows, blended, strict=True) if b and r[4])
    iou = np.array([r[5] for r in rows])
    n_missed = int((blended & ~found).sum())
    mode = "with test-time augmentation" if tta else "one pass"
    lines = [f"{n_scenes} scenes of benchmark_quality.py (seed 2000), Mask R-CNN {mode}, no refinement.", "",
             f"Blended truth sources: {int(blended.sum())}; found {int((blended & found).sum())} "
             f"(blended recall {_rate(found[blended])}); missed {n_missed}.", "",
             "Where the missed blended sources were lost:", "", "| stage | sources | share of missed |",
             "| --- | --- | --- |"]
    for fate in FATES:
        lines.append(f"| {fate} | {fates[fate]} | {fates[fate] / max(n_missed, 1):.2f} |")
    lines += ["", "By S/N (truth `snr`):", "",
              "| S/N | blended sources | blended recall | matched sources (all) | mean IoU (all matched) |",
              "| --- | --- | --- | --- | --- |"]
    for lo, hi in SNR_BINS:
        sel = (snr >= lo) & (snr < hi)
        matched = sel & found
        lines.append(f"| {lo}-{hi:g} | {int((sel & blended).sum())} | {_rate(found[sel & blended])} | "
                     f"{int(matched.sum())} | {_rate(iou[matched])} |")
    lines += ["", "By the flux of the nearest truth neighbour over the source's own:", "",
              "| neighbour / source flux | blended sources | blended recall |", "| --- | --- | --- |"]
    for lo, hi in RATIO_BINS:
        sel = blended & (ratio >= lo) & (ratio < hi)
        lines.append(f"| {lo}-{hi:g} | {int(sel.sum())} | {_rate(found[sel])} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="scenes (default 200, the quality benchmark's)")
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--tta", action="store_true", help="detect with test-time augmentation (deblend.tta)")
    p.add_argument("--out", default=None, help="default: pipelines/results/diagnose_blends[_tta].md")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = load_mask_rcnn(DEFAULT_MASK_RCNN)
    rows = []
    for i in range(args.n):
        config, sim_seed = scene_config(args.seed, i, (192, 256))
        scene = simulate_scene(config, seed=sim_seed, keep_sources=False)
        rows += diagnose_scene(scene, config.psf_fwhm / config.pixel_scale, model, tta=args.tta)
    lines = report(rows, n_scenes=args.n, tta=args.tta)
    out = Path(args.out or ROOT / "pipelines" / "results" / f"diagnose_blends{'_tta' if args.tta else ''}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
