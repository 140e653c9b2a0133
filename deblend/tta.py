"""Test-time augmentation: detect on flipped copies of the image and fuse what the passes agree on.

The network sees the sky in one orientation; the sky has none. `detect_tta`
runs `deblend.segment.detect` on the image as it is, flipped left-right,
flipped top-bottom and turned by 180° (`FLIPS`), maps each pass's instances
back (`flip_instances`), and fuses them (`fuse_detections`):

1. all instances of all passes, most confident first; each one not yet used
   starts a *group* and takes, from every other pass, the unused instance
   whose mask overlaps its own most, if their IoU is at least ``match_iou``;
2. a group's class probabilities are the passes' probabilities averaged over
   *all* passes, a pass that found nothing counting as background: its
   ``det_score`` is the sum of its members' scores over the number of
   passes, so a source must be found confidently in several orientations;
3. its soft mask is the mean of its members' masks, and its box the mean of
   their boxes;
4. groups with ``det_score >= score_threshold`` are kept.

Averaging over orientations removes the part of the network's errors that
depends on how a source sits on the pixel grid: on the simulated quality
benchmark it raised recall on blended sources and the masks' IoU at about
the same precision, for four times the detection time (twice the whole
pipeline's; see the README). The threshold on the fused
score, `TTA_SCORE_THRESHOLD`, was chosen on the tuning scenes of
pipelines/tune_postprocessing.py.

Arguments and results are numpy; torch is used inside `deblend.segment.detect`.
"""

from __future__ import annotations

import logging
from numbers import Real

import numpy as np
from scipy.spatial import cKDTree

from deblend import segment
from deblend.segment import Instances

__all__ = ["FLIPS", "TTA_SCORE_THRESHOLD", "MEMBER_SCORE_THRESHOLD", "CROWDED_SCORE", "flip_image", "flip_instances",
           "fuse_detections", "detect_tta"]

log = logging.getLogger(__name__)

#: The passes of `detect_tta`: ``(flip_y, flip_x)``; both flips together are a 180° turn.
FLIPS = ((False, False), (False, True), (True, False), (True, True))
#: Default minimum fused ``det_score`` (chosen on the tuning scenes, pipelines/tune_postprocessing.py --tta).
TTA_SCORE_THRESHOLD = 0.4
#: Default minimum ``det_score`` of an instance in one pass, before fusion.
MEMBER_SCORE_THRESHOLD = 0.2
#: Each pass counts a window's detections from this score for the crowded-window test
#: (`deblend.segment.detect`'s ``crowded_score``): the single-pass default threshold, at which
#: the test's limit was set. Counted from ``MEMBER_SCORE_THRESHOLD`` instead, windows of
#: ordinary density would pass as crowded and be run again at half size for nothing.
CROWDED_SCORE = segment.SCORE_THRESHOLD


def _check_fraction(name, value, example):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}; e.g. {example}")
    return float(value)


def flip_image(image, *, flip_y, flip_x):
    """``image`` (2-D) flipped top-bottom and/or left-right, as a contiguous copy."""
    image = np.asarray(image)
    if flip_y:
        image = image[::-1]
    if flip_x:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def flip_instances(instances, shape, *, flip_y, flip_x):
    """Instances found on a flipped image, in the pixels of the image before the flip.

    A flip is its own inverse, so this also flips instances of the original
    image onto the flipped one.

    Parameters
    ----------
    instances : deblend.segment.Instances
    shape : tuple of int
        ``(ny, nx)`` of the image (the same before and after a flip).
    flip_y, flip_x : bool
        The flips the image was given.

    Returns
    -------
    deblend.segment.Instances
        Same order; pixel ``x`` becomes ``nx - 1 - x`` under ``flip_x`` (box
        edges: ``x`` becomes ``nx - x``), and likewise for ``y``.
    """
    ny, nx = (int(n) for n in shape)
    boxes = np.array(instances.boxes, dtype=np.float32).reshape(-1, 4)
    centers = np.array(instances.centers, dtype=np.float64).reshape(-1, 2)
    offsets = np.array(instances.offsets, dtype=np.int64).reshape(-1, 2)
    heights = np.array([m.shape[0] for m in instances.masks], dtype=np.int64)
    widths = np.array([m.shape[1] for m in instances.masks], dtype=np.int64)
    if flip_x:
        boxes[:, [0, 2]] = nx - boxes[:, [2, 0]]
        centers[:, 0] = nx - 1 - centers[:, 0]
        offsets[:, 1] = nx - offsets[:, 1] - widths
    if flip_y:
        boxes[:, [1, 3]] = ny - boxes[:, [3, 1]]
        centers[:, 1] = ny - 1 - centers[:, 1]
        offsets[:, 0] = ny - offsets[:, 0] - heights
    masks = [flip_image(m, flip_y=flip_y, flip_x=flip_x) for m in instances.masks]
    return Instances(boxes=boxes, labels=instances.labels.copy(), class_prob=instances.class_prob.copy(),
                     det_score=instances.det_score.copy(), centers=centers, masks=masks, offsets=offsets)


def _binary_masks(instances, dims, mask_threshold):
    """Per instance: its thresholded mask cut to the image, its (y0, y1, x0, x1) there, and its area."""
    binary, bounds = [], np.zeros((len(instances), 4), dtype=np.int64)
    for i in range(len(instances)):
        values, (rows, cols) = instances.clipped_mask(i, dims)
        binary.append(values >= mask_threshold)
        bounds[i] = rows.start, rows.stop, cols.start, cols.stop
    area = np.array([b.sum() for b in binary], dtype=np.int64)
    return binary, bounds, area


def _mask_iou(i, j, binary, bounds, area):
    y0, x0 = max(bounds[i, 0], bounds[j, 0]), max(bounds[i, 2], bounds[j, 2])
    y1, x1 = min(bounds[i, 1], bounds[j, 1]), min(bounds[i, 3], bounds[j, 3])
    if y0 >= y1 or x0 >= x1:
        return 0.0
    a = binary[i][y0 - bounds[i, 0]:y1 - bounds[i, 0], x0 - bounds[i, 2]:x1 - bounds[i, 2]]
    b = binary[j][y0 - bounds[j, 0]:y1 - bounds[j, 0], x0 - bounds[j, 2]:x1 - bounds[j, 2]]
    inter = int(np.count_nonzero(a & b))
    union = int(area[i] + area[j]) - inter
    return inter / union if union > 0 else 0.0


def _mean_mask(instances, members, dims):
    """Mean soft mask of ``members`` over the union of their crops (cut to the image): (values, y0, x0)."""
    pieces = [instances.clipped_mask(i, dims) for i in members]
    y0 = min(r.start for _, (r, _) in pieces)
    y1 = max(r.stop for _, (r, _) in pieces)
    x0 = min(c.start for _, (_, c) in pieces)
    x1 = max(c.stop for _, (_, c) in pieces)
    total = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    for values, (rows, cols) in pieces:
        total[rows.start - y0:rows.stop - y0, cols.start - x0:cols.stop - x0] += values
    return total / len(members), y0, x0


def fuse_detections(parts, shape, *, score_threshold=TTA_SCORE_THRESHOLD, match_iou=0.5, mask_threshold=0.5):
    """Fuse the instances of several passes over one image into one set (see the module docstring).

    Parameters
    ----------
    parts : sequence of deblend.segment.Instances
        One per pass, all in the pixels of the same image.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    score_threshold : float, optional
        Minimum fused ``det_score``, in [0, 1].
    match_iou : float, optional
        Minimum IoU of two passes' masks (soft value >= ``mask_threshold``)
        for them to be one source, in [0, 1].
    mask_threshold : float, optional
        Soft-mask value above which a pixel counts for the IoU.

    Returns
    -------
    deblend.segment.Instances
        Sorted by centre, ``y`` then ``x``, as `deblend.segment.detect` sorts.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("parts must hold at least one Instances (one per pass), got none")
    score_threshold = _check_fraction("score_threshold", score_threshold, TTA_SCORE_THRESHOLD)
    match_iou = _check_fraction("match_iou", match_iou, 0.5)
    n_passes = len(parts)
    dims = tuple(int(n) for n in shape)
    found = Instances.concatenate(parts)
    if len(found) == 0:
        return Instances.empty()
    source = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])
    binary, bounds, area = _binary_masks(found, dims, mask_threshold)
    # Candidates: instances whose crops can overlap, from a tree of crop centres.
    half = 0.5 * np.hypot(bounds[:, 1] - bounds[:, 0], bounds[:, 3] - bounds[:, 2])
    middle = np.column_stack([bounds[:, 0] + bounds[:, 1], bounds[:, 2] + bounds[:, 3]]) / 2
    near = cKDTree(middle).query_ball_point(middle, r=half + half.max())
    used = np.zeros(len(found), dtype=bool)
    groups = []
    for i in np.argsort(-found.det_score.astype(np.float64), kind="stable"):
        if used[i]:
            continue
        used[i] = True
        members = [int(i)]
        best = {}
        for j in near[i]:
            if used[j] or source[j] == source[i]:
                continue
            iou = _mask_iou(i, j, binary, bounds, area)
            if iou >= match_iou and iou > best.get(source[j], (-1.0, -1))[0]:
                best[source[j]] = (iou, j)
        for _, j in best.values():
            used[j] = True
            members.append(int(j))
        groups.append(members)
    scores = np.array([found.det_score[g].sum(dtype=np.float64) / n_passes for g in groups])
    keep = [g for g, s in zip(groups, scores, strict=True) if s >= score_threshold]
    log.info("fuse_detections: %d instances from %d passes -> %d groups, %d with fused score >= %g",
             len(found), n_passes, len(groups), len(keep), score_threshold)
    if not keep:
        return Instances.empty()
    boxes, labels, class_prob, det_score, centers, masks, offsets = [], [], [], [], [], [], []
    for members in keep:
        evidence = {}
        for i in members:
            evidence[int(found.labels[i])] = evidence.get(int(found.labels[i]), 0.0) + float(found.class_prob[i])
        label = max(evidence, key=evidence.get)
        values, y0, x0 = _mean_mask(found, members, dims)
        weight = values.astype(np.float64)
        total = weight.sum()
        h, w = values.shape
        labels.append(label)
        class_prob.append(evidence[label] / n_passes)
        det_score.append(found.det_score[members].sum(dtype=np.float64) / n_passes)
        boxes.append(found.boxes[members].mean(axis=0))
        centers.append((weight.sum(axis=0) @ np.arange(w) / total + x0, weight.sum(axis=1) @ np.arange(h) / total + y0)
                       if total > 0 else found.centers[members].mean(axis=0))
        masks.append(values.astype(np.float16))
        offsets.append((y0, x0))
    fused = Instances(boxes=np.asarray(boxes, dtype=np.float32), labels=np.asarray(labels, dtype=np.int64),
                      class_prob=np.asarray(class_prob, dtype=np.float32),
                      det_score=np.asarray(det_score, dtype=np.float32),
                      centers=np.asarray(centers, dtype=np.float64), masks=masks,
                      offsets=np.asarray(offsets, dtype=np.int64))
    return fused.select(np.lexsort((fused.centers[:, 0], fused.centers[:, 1])))


def detect_tta(normalized, *, model, mask=None, score_threshold=TTA_SCORE_THRESHOLD,
               member_threshold=MEMBER_SCORE_THRESHOLD, match_iou=0.5, **detect_options):
    """`deblend.segment.detect` over the four flips of an image, fused (see the module docstring).

    Parameters
    ----------
    normalized : ndarray, shape (ny, nx)
        The normalised detection image, as for `deblend.segment.detect`.
    model : torch.nn.Module
        The instance segmenter.
    mask : ndarray of bool, shape (ny, nx), optional
        True where pixels are masked.
    score_threshold : float, optional
        Minimum fused ``det_score`` (the mean over the four passes).
    member_threshold : float, optional
        Minimum ``det_score`` of an instance within one pass. Below
        ``score_threshold``, so that a source a pass is unsure of still adds
        to its group's score.
    match_iou : float, optional
        Minimum mask IoU for instances of two passes to be one source.
    **detect_options
        Passed to `deblend.segment.detect` (``window_size``, ``overlap``,
        ``batch_size``, ``device``, ``half``, ``split_crowded``, ...);
        ``crowded_score`` defaults to `CROWDED_SCORE`.

    Returns
    -------
    deblend.segment.Instances
        Sorted by centre, ``y`` then ``x``.
    """
    score_threshold = _check_fraction("score_threshold", score_threshold, TTA_SCORE_THRESHOLD)
    member_threshold = _check_fraction("member_threshold", member_threshold, MEMBER_SCORE_THRESHOLD)
    normalized = np.asarray(normalized)
    if normalized.ndim != 2 or normalized.size == 0:
        raise ValueError(f"normalized must be a non-empty 2-D image (ny, nx), got shape "
                         f"{normalized.shape}; pass prepare(image).normalized()")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != normalized.shape:
            raise ValueError(f"mask shape {mask.shape} must equal the image shape {normalized.shape}")
    detect_options.setdefault("crowded_score", CROWDED_SCORE)
    parts = []
    for flip_y, flip_x in FLIPS:
        flipped = dict(flip_y=flip_y, flip_x=flip_x)
        found = segment.detect(flip_image(normalized, **flipped), model=model,
                               mask=None if mask is None else flip_image(mask, **flipped),
                               score_threshold=member_threshold, **detect_options)
        parts.append(flip_instances(found, normalized.shape, **flipped))
    return fuse_detections(parts, normalized.shape, score_threshold=score_threshold, match_iou=match_iou)
