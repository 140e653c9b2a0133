"""Where the mean IoU of matched masks is lost: the footprints' outer edge, or the split between sources?

Runs the default pipeline (Mask R-CNN, then the probabilistic U-Net refinement of blends) on the
quality benchmark's scenes (benchmark_quality.py's conditions and seeds) and scores its label map
with `deblend.evaluate.evaluate_image`, as it is and with its outer edge replaced by the truth's:

- ``as is``: the pipeline's label map;
- ``truth foreground, cut``: its pixels outside the truth foreground (``truth_seg > 0``, the
  pixels some source lifts to 1 sigma or more) set to background;
- ``truth foreground, grown N``: each label first grown by up to N pixels into unlabelled pixels
  (each to the nearest label, `skimage.segmentation.expand_labels`), then cut the same way.

The detections, and which source owns a pixel inside the foreground, are the pipeline's in every
row, so the difference between the rows is what a perfect outer edge would give: an upper bound
for any footprint-edge refinement. The report also bins the mean IoU and the ratio of predicted to
true footprint area of matched sources by the source's S/N. Writes
pipelines/results/diagnose_footprints.md.

Usage (from the repository root):
    .venv/bin/python pipelines/diagnose_footprints.py [--n 100] [--weights FILE]
"""

import argparse
import logging
from pathlib import Path

import numpy as np
from benchmark_quality import scene_config
from skimage.segmentation import expand_labels

from deblend.evaluate import evaluate_image, match_sources
from deblend.pipeline import Deblender
from deblend.simulate import simulate_scene

ROOT = Path(__file__).resolve().parents[1]
SNR_BINS = ((5, 10), (10, 20), (20, 50), (50, np.inf))
GROW = (1, 2)


def edge_variants(labels, truth_seg):
    """``{name: label map}``: the pipeline's and its outer edge replaced by the truth foreground's."""
    foreground = truth_seg > 0
    variants = {"as is": labels, "truth foreground, cut": np.where(foreground, labels, 0)}
    for grow in GROW:
        variants[f"truth foreground, grown {grow}"] = np.where(foreground, expand_labels(labels, grow), 0)
    return variants


def matched_sources(labels, catalog, truth_seg, truth, fwhm):
    """Per matched truth source: ``(snr, IoU, predicted area / true area)``, as `evaluate_image` matches."""
    pred_xy = np.column_stack([np.asarray(catalog["x_centroid"], float), np.asarray(catalog["y_centroid"], float)])
    truth_xy = np.column_stack([np.asarray(truth["x"], float), np.asarray(truth["y"], float)])
    p_idx, t_idx = match_sources(pred_xy, truth_xy, max_distance=fwhm)
    pred_labels = np.asarray(catalog["label"], int)[p_idx]
    truth_ids = np.asarray(truth["id"], int)[t_idx]
    n = max(int(labels.max(initial=0)), int(pred_labels.max(initial=0))) + 1
    m = max(int(truth_seg.max(initial=0)), int(truth_ids.max(initial=0))) + 1
    pairs = np.bincount(labels.ravel().astype(np.int64) * m + truth_seg.ravel(), minlength=n * m)
    inter = pairs[pred_labels * m + truth_ids].astype(float)
    pred_area = np.bincount(labels.ravel(), minlength=n)[pred_labels].astype(float)
    true_area = np.bincount(truth_seg.ravel(), minlength=m)[truth_ids].astype(float)
    union = pred_area + true_area - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return np.column_stack([np.asarray(truth["snr"], float)[t_idx], iou,
                            np.divide(pred_area, true_area, out=np.full_like(inter, np.nan), where=true_area > 0)])


def report(totals, per_source, *, n_scenes, seed, weights):
    """Markdown lines of the diagnosis."""
    lines = [f"{n_scenes} quality-benchmark scenes (seed {seed}), the default pipeline with "
             f"{weights or 'the shipped weights'}; `pipelines/diagnose_footprints.py`.", "",
             "| label map | mean IoU | mean IoU, blended |", "| --- | --- | --- |"]
    for name, t in totals.items():
        lines.append(f"| {name} | {t['iou_sum'] / t['tp']:.3f} | {t['iou_sum_blended'] / t['tp_blended']:.3f} |")
    lines += ["", "Matched sources by S/N (the pipeline's label map as is, and with the truth foreground grown "
                  f"{GROW[-1]}):", "",
              "| S/N | sources | mean IoU | mean IoU, truth edge | median area predicted / true |",
              "| --- | --- | --- | --- | --- |"]
    as_is, best = per_source["as is"], per_source[f"truth foreground, grown {GROW[-1]}"]
    for low, high in SNR_BINS:
        sel = (as_is[:, 0] >= low) & (as_is[:, 0] < high)
        sel_best = (best[:, 0] >= low) & (best[:, 0] < high)
        label = f"{low:g}-{high:g}" if np.isfinite(high) else f">= {low:g}"
        lines.append(f"| {label} | {int(sel.sum())} | {as_is[sel, 1].mean():.3f} | {best[sel_best, 1].mean():.3f} | "
                     f"{np.nanmedian(as_is[sel, 2]):.2f} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="scenes (default 100: the first of the quality benchmark's)")
    p.add_argument("--seed", type=int, default=2000, help="scene seed (default 2000, the quality benchmark's)")
    p.add_argument("--weights", default=None, help="Mask R-CNN weights (default: the shipped ones)")
    p.add_argument("--out", default=str(ROOT / "pipelines" / "results" / "diagnose_footprints.md"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    deblender = Deblender("mask-rcnn", weights=args.weights)
    totals, per_source = {}, {}
    for i in range(args.n):
        config, sim_seed = scene_config(args.seed, i, (192, 256))
        scene = simulate_scene(config, seed=sim_seed, keep_sources=False)
        result = deblender.run(scene.image)
        fwhm = config.psf_fwhm / config.pixel_scale
        for name, labels in edge_variants(result.labels, scene.truth_seg).items():
            counts = evaluate_image(labels, result.catalog, scene.truth_seg, scene.truth, fwhm_pixels=fwhm)
            total = totals.setdefault(name, dict.fromkeys(("iou_sum", "tp", "iou_sum_blended", "tp_blended"), 0.0))
            for key in total:
                total[key] += counts[key]
            per_source.setdefault(name, []).append(
                matched_sources(labels, result.catalog, scene.truth_seg, scene.truth, fwhm))
    per_source = {name: np.concatenate(rows) for name, rows in per_source.items()}
    lines = report(totals, per_source, n_scenes=args.n, seed=args.seed, weights=args.weights)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
