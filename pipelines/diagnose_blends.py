"""Where Mask R-CNN loses blended sources and mask IoU: a diagnosis on the quality benchmark's scenes.

For each blended truth source (deblend.simulate's convention) of the benchmark scenes
(benchmark_quality.py's conditions and seeds), this records whether the pipeline's Mask R-CNN
pass (no refinement) finds it, and, for those it misses, where it was lost:

- no detection: no instance of score >= the threshold has its centre within 0.5 FWHM. For
  one pass (not ``--tta``) this is split by where the detector lost it:

  - box NMS: the box head scored a candidate there >= the threshold, but the box NMS
    (`_postprocess_detections`, IoU ``model.roi_heads.nms_thresh``) removed it;
  - no proposal: none of the RPN's proposals overlaps the source's truth box (the box of its
    pixels in ``truth_seg``, the training targets' convention) with IoU >= 0.5, the box
    head's training threshold for a positive;
  - box score: some proposal did, but the box head scored every candidate there below the
    threshold;

- mask NMS: one had, but `deblend.segment.suppress_duplicates` removed it (as the pipeline runs it,
  companions kept);
- label map: it survived the NMS, but `instances_to_labels` left it no pixel;
- matched elsewhere: it is in the label map, but the one-to-one matching gave it to a
  neighbouring truth source (the two were merged into one detection);
- other: anything else (e.g. its catalog centroid moved more than 1 FWHM).

It also bins blended recall by the source's S/N and by the flux ratio of its nearest
neighbour, and mean IoU of matched sources by S/N. And it gives the box head each truth box as a
proposal: the share of blended sources it then scores >= the threshold is what the detector
would find with perfect proposals and post-processing (its classifier's ceiling). The
proposals and truth-box scores come from one pass over the whole image, as the pipeline's
windows do for the benchmark's 192x256 scenes (one 256-pixel window). Writes
pipelines/results/diagnose_blends.md.

Usage (from the repository root):
    .venv/bin/python pipelines/diagnose_blends.py [--n 200] [--tta]
"""

import argparse
import logging
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from benchmark_quality import scene_config
from scipy import ndimage
from torchvision.ops import box_iou

from deblend.catalog import make_catalog
from deblend.evaluate import match_sources
from deblend.io import Image
from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn
from deblend.preprocess import prepare
from deblend.segment import COMPANION_DISTANCE, detect, instances_to_labels, suppress_duplicates
from deblend.simulate import simulate_scene
from deblend.tta import TTA_SCORE_THRESHOLD, detect_tta

ROOT = Path(__file__).resolve().parents[1]
SNR_BINS = ((5, 10), (10, 20), (20, 50), (50, 200), (200, np.inf))
RATIO_BINS = ((0, 1), (1, 10), (10, np.inf))
FATES = ("no detection", "no proposal", "box score", "box NMS", "mask NMS", "label map", "matched elsewhere",
         "other")
#: A proposal this close (box IoU) to a truth box is a positive in the box head's training.
PROPOSAL_IOU = 0.5
#: The fates "no detection" is split into (one pass only).
NO_DETECTION_SPLIT = ("no proposal", "box score", "box NMS")
#: The one-pass score threshold (the pipeline default), applied to the truth boxes' scores too.
SCORE_THRESHOLD = 0.5
log = logging.getLogger("diagnose_blends")


def _near(instances, xy, radius):
    if not len(instances):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.hypot(instances.centers[:, 0] - xy[0], instances.centers[:, 1] - xy[1]) < radius)


def truth_boxes(truth_seg, ids):
    """(n, 4) float32 boxes ``(x0, y0, x1, y1)`` of each id's pixels (first index to last + 1)."""
    slices = ndimage.find_objects(truth_seg, max_label=int(max(ids, default=0)))
    boxes = np.zeros((len(ids), 4), dtype=np.float32)
    for k, label in enumerate(ids):
        sl = slices[int(label) - 1]
        if sl is not None:
            boxes[k] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes


def proposals_and_truth_scores(model, normalized, boxes):
    """The RPN's proposals on the whole image, and the box head's score of each of ``boxes``.

    The score is `deblend.segment`'s ``det_score`` (1 - P(background)) with the box given
    to the box head as a proposal. NaN pixels are zeroed, as `deblend.segment.detect` does.
    """
    image = torch.from_numpy(np.nan_to_num(np.asarray(normalized, dtype=np.float32), nan=0.0))[None]
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        if not len(boxes):
            return proposals[0].numpy(), np.zeros(0)
        heads = model.roi_heads
        pooled = heads.box_roi_pool(features, [torch.from_numpy(boxes)], images.image_sizes)
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        scores = torch.softmax(logits.float(), -1)[:, 1:].sum(dim=1)
    return proposals[0].numpy(), scores.numpy()


@contextmanager
def _without_box_nms(model):
    """Switch off the box head's NMS and detection cap (to see every candidate it scores)."""
    heads = model.roi_heads
    saved = heads.nms_thresh, heads.detections_per_img
    heads.nms_thresh, heads.detections_per_img = 1.0, 100_000
    try:
        yield model
    finally:
        heads.nms_thresh, heads.detections_per_img = saved


def diagnose_scene(scene, fwhm, model, *, tta=False, max_overlap=0.5, companion_distance=COMPANION_DISTANCE):
    """Per truth source: (blended, matched, snr, neighbour flux ratio, fate or '', IoU or nan,
    box-head score of its truth box)."""
    prepared = prepare(Image.from_array(scene.image))
    shape = prepared.detection.shape
    normalized = prepared.normalized()
    truth = scene.truth
    boxes = truth_boxes(scene.truth_seg, np.asarray(truth["id"]))
    proposals, box_scores = proposals_and_truth_scores(model, normalized, boxes)
    if len(proposals) and len(boxes):
        proposal_iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(proposals)).max(dim=1).values.numpy()
    else:
        proposal_iou = np.zeros(len(boxes))
    if tta:
        found = detect_tta(normalized, model=model, mask=prepared.mask, score_threshold=TTA_SCORE_THRESHOLD)
    else:
        found = detect(normalized, model=model, mask=prepared.mask, score_threshold=SCORE_THRESHOLD)
        with _without_box_nms(model):
            candidates = detect(normalized, model=model, mask=prepared.mask,
                                score_threshold=SCORE_THRESHOLD)
    kept = suppress_duplicates(found, shape, max_overlap=max_overlap, companion_distance=companion_distance,
                               image=normalized)
    labels, keep = instances_to_labels(kept, shape, mask=prepared.mask)
    final = kept.select(keep)
    catalog = make_catalog(prepared.data, labels, detection=prepared.detection)
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
            if tta:
                fate = "no detection"
            elif len(_near(candidates, txy[k], 0.5 * fwhm)):
                fate = "box NMS"
            elif proposal_iou[k] < PROPOSAL_IOU:
                fate = "no proposal"
            else:
                fate = "box score"
        elif not len(_near(kept, txy[k], 0.5 * fwhm)):
            fate = "mask NMS"
        elif not len(_near(final, txy[k], 0.5 * fwhm)):
            fate = "label map"
        elif any(owner.get(int(j), -1) >= 0 for j in _near(final, txy[k], 0.5 * fwhm)):
            fate = "matched elsewhere"
        else:
            fate = "other"
        ratio = flux[neighbour[k]] / flux[k] if len(truth) > 1 and flux[k] > 0 else np.nan
        rows.append((bool(truth["blended"][k]), k in match, float(truth["snr"][k]), ratio, fate, iou,
                     float(box_scores[k])))
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
    box_score = np.array([r[6] for r in rows])
    n_missed = int((blended & ~found).sum())
    mode = "with test-time augmentation" if tta else "one pass"
    lines = [f"{n_scenes} scenes of benchmark_quality.py (seed 2000), Mask R-CNN {mode}, no refinement.", "",
             f"Blended truth sources: {int(blended.sum())}; found {int((blended & found).sum())} "
             f"(blended recall {_rate(found[blended])}); missed {n_missed}.", "",
             "Where the missed blended sources were lost:", "", "| stage | sources | share of missed |",
             "| --- | --- | --- |"]
    hidden = NO_DETECTION_SPLIT if tta else ("no detection",)
    for fate in FATES:
        if fate not in hidden:
            lines.append(f"| {fate} | {fates[fate]} | {fates[fate] / max(n_missed, 1):.2f} |")
    lines += ["", "By S/N (truth `snr`). *Truth box*: the share of the blended sources the box head scores >= "
                  f"{SCORE_THRESHOLD} when given the source's truth box as a proposal (one pass), i.e. "
                  "blended recall with perfect proposals and post-processing:", "",
              "| S/N | blended sources | blended recall | truth box | matched sources (all) | "
              "mean IoU (all matched) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for lo, hi in SNR_BINS:
        sel = (snr >= lo) & (snr < hi)
        matched = sel & found
        lines.append(f"| {lo}-{hi:g} | {int((sel & blended).sum())} | {_rate(found[sel & blended])} | "
                     f"{_rate(box_score[sel & blended] >= SCORE_THRESHOLD)} | "
                     f"{int(matched.sum())} | {_rate(iou[matched])} |")
    lines.append(f"| all | {int(blended.sum())} | {_rate(found[blended])} | "
                 f"{_rate(box_score[blended] >= SCORE_THRESHOLD)} | {int(found.sum())} | "
                 f"{_rate(iou[found])} |")
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
    p.add_argument("--companion-distance", type=float, default=COMPANION_DISTANCE, metavar="PIX",
                   help=f"the mask NMS's companion distance (default {COMPANION_DISTANCE}, the pipeline's; 0: off)")
    p.add_argument("--out", default=None, help="default: pipelines/results/diagnose_blends[_tta].md")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = load_mask_rcnn(DEFAULT_MASK_RCNN)
    rows = []
    for i in range(args.n):
        config, sim_seed = scene_config(args.seed, i, (192, 256))
        scene = simulate_scene(config, seed=sim_seed, keep_sources=False)
        rows += diagnose_scene(scene, config.psf_fwhm / config.pixel_scale, model, tta=args.tta,
                               companion_distance=args.companion_distance)
    lines = report(rows, n_scenes=args.n, tta=args.tta)
    out = Path(args.out or ROOT / "pipelines" / "results" / f"diagnose_blends{'_tta' if args.tta else ''}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
