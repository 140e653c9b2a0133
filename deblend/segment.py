"""Run an instance segmenter (Mask R-CNN) over a whole image: windows in, instances out.

`detect` cuts the normalised detection image into overlapping windows
(`deblend.tiling.make_windows`), runs the model on batches of them, and keeps
each detection from the one window whose *core* holds its centre, so a source
seen by several windows is kept once. A crowded window, one that has used
up the network's budget of region proposals, is run again as smaller windows
over its core (`crowded_limit`, `deblend.tiling.split_window`).
`instances_to_labels` resolves the overlapping soft masks into one label map.

Torch is used inside; arguments and results are numpy.

Stitching assumptions
---------------------
- Every core lies at least ``overlap // 2`` pixels inside its window (except
  along the image edges). A source whose mask reaches at most that far from
  its centre is seen whole by the window that owns its centre; a larger one is
  cut at that window's edge. The default ``overlap=48`` suits sources of
  radius up to 24 px; raise it (and ``window_size``) for larger galaxies.
- Ownership is decided on the centre each window measures. A model that is
  exactly translation-equivariant measures the same centre in every window,
  and each source is then kept exactly once. A CNN is only nearly so (zero
  padding at the window edges, stride alignment), so a source whose centre
  falls within a small fraction of a pixel of a core boundary can,
  rarely, be kept twice or not at all.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import boxes as box_ops
from tqdm.auto import tqdm

from deblend.models.mask_rcnn import CENTRE_MATCH_DISTANCE, CLASS_NAMES, centre_boxes, paste_mask_crops
from deblend.models.precision import autocast, check_half
from deblend.tiling import has_signal, iter_batches, make_windows, split_window

__all__ = ["Instances", "detect", "crowded_limit", "suppress_duplicates", "check_companion_options",
           "local_contrast", "instances_to_labels", "COMPANION_DISTANCE", "COMPANION_SCORE",
           "COMPANION_CONTRAST", "CONTRAST_SAMPLE_PIXELS"]

log = logging.getLogger(__name__)

#: A window is crowded when it returns this fraction of its RPN proposals as detections (`crowded_limit`).
CROWDED_FRACTION = 0.5
#: Crowded windows are split into windows of half their size, but not below this many pixels.
MIN_SPLIT_SIZE = 64
#: Default minimum ``det_score`` of a detection (one pass).
SCORE_THRESHOLD = 0.5
#: Default least centre distance (pixels) of a companion that the mask NMS keeps (`suppress_duplicates`).
COMPANION_DISTANCE = 3.0
#: Least ``det_score`` of such a companion...
COMPANION_SCORE = 0.8
#: ...and least `local_contrast` (robust sigma) within a pixel of its centre.
COMPANION_CONTRAST = 2.0
#: `local_contrast` measures its robust sigma on at least this many pixels (all of a smaller image).
CONTRAST_SAMPLE_PIXELS = 1_000_000
_CONTRAST_SLAB = 64  # rows per slab of that sample
_CONTRAST_REACH = 3  # pixels a contrast value depends on, each side (a 3x3 mean, then a 5x5 mean of it)


@dataclass
class Instances:
    """Detected sources of one image, in global pixel coordinates.

    Attributes
    ----------
    boxes : ndarray of float32, shape (N, 4)
        ``x1, y1, x2, y2`` (torchvision's convention: continuous coordinates,
        pixel ``i`` spans ``[i, i + 1)``).
    labels : ndarray of int64, shape (N,)
        Class index into `deblend.models.mask_rcnn.CLASS_NAMES`: 1 star, 2 galaxy.
    class_prob : ndarray of float32, shape (N,)
        Probability of the predicted class, ``P(label)`` (torchvision's
        ``scores``: the softmax over background, star and galaxy).
    det_score : ndarray of float32, shape (N,)
        How likely the detection is a source at all. With a centre detector
        that decides (``centre_detect``, the shipped weights) it is the
        value of its centre heatmap at the source's centre, shifted by the
        weights' operating point (`_centre_detections`). Otherwise it is the
        box head's ``1 - P(background) = P(star) + P(galaxy)``, so
        ``det_score >= class_prob`` and the class probability given a source
        is ``class_prob / det_score`` (>= 0.5). For models other than
        torchvision's Mask R-CNN it is the model's ``det_scores`` output if
        it gives one, else ``scores``.
    centers : ndarray of float64, shape (N, 2)
        ``x, y`` centroid of each soft mask (pixel centres at integers).
    masks : list of ndarray of float16
        Soft mask (0-1) of each instance, cropped to the region where it can
        be non-zero (its box grown by about a pixel).
    offsets : ndarray of int64, shape (N, 2)
        ``(y0, x0)`` of each mask crop in the image: mask ``i`` covers
        ``image[y0:y0 + h, x0:x0 + w]`` (see `mask_slices`).
    """

    boxes: np.ndarray
    labels: np.ndarray
    class_prob: np.ndarray
    det_score: np.ndarray
    centers: np.ndarray
    masks: list
    offsets: np.ndarray

    def __post_init__(self):
        n = len(self.labels)
        lengths = {len(self.boxes), len(self.class_prob), len(self.det_score),
                   len(self.centers), len(self.masks), len(self.offsets)}
        if lengths != {n}:
            raise ValueError("all Instances fields must have one entry per instance; got "
                             f"lengths {sorted(lengths | {n})}")

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        return f"Instances(n={len(self)})"

    @classmethod
    def empty(cls):
        """No instances."""
        return cls(boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                   class_prob=np.zeros(0, np.float32), det_score=np.zeros(0, np.float32),
                   centers=np.zeros((0, 2), np.float64), masks=[],
                   offsets=np.zeros((0, 2), np.int64))

    @classmethod
    def concatenate(cls, parts):
        """One `Instances` holding those of ``parts`` (a sequence; None entries are skipped), in order."""
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            return cls.empty()
        return cls(
            boxes=np.concatenate([p.boxes for p in parts]).astype(np.float32, copy=False),
            labels=np.concatenate([p.labels for p in parts]),
            class_prob=np.concatenate([p.class_prob for p in parts]),
            det_score=np.concatenate([p.det_score for p in parts]),
            centers=np.concatenate([p.centers for p in parts]),
            masks=[m for p in parts for m in p.masks],
            offsets=np.concatenate([p.offsets for p in parts]),
        )

    @property
    def class_names(self):
        """``'star'`` or ``'galaxy'`` for each instance (ndarray of str)."""
        return np.asarray(CLASS_NAMES, dtype=str)[self.labels]

    def mask_slices(self, index):
        """``(slice, slice)`` of the image covered by mask ``index``."""
        y0, x0 = (int(v) for v in self.offsets[index])
        h, w = self.masks[index].shape
        return (slice(y0, y0 + h), slice(x0, x0 + w))

    def clipped_mask(self, index, shape):
        """Soft mask ``index`` as float32 and the ``(slice, slice)`` it covers, both cut to an image of ``shape``."""
        dims = tuple(int(n) for n in shape)
        region = self.mask_slices(index)
        values = self.masks[index].astype(np.float32)
        y0, x0 = region[0].start, region[1].start
        values = values[max(-y0, 0):, max(-x0, 0):]
        region = (slice(max(y0, 0), min(region[0].stop, dims[0])),
                  slice(max(x0, 0), min(region[1].stop, dims[1])))
        values = values[: max(region[0].stop - region[0].start, 0), : max(region[1].stop - region[1].start, 0)]
        return values, region

    def select(self, index):
        """A new `Instances` with the instances ``index`` (int array or bool mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False)
        return Instances(boxes=self.boxes[index], labels=self.labels[index],
                         class_prob=self.class_prob[index], det_score=self.det_score[index],
                         centers=self.centers[index], masks=[self.masks[i] for i in index],
                         offsets=self.offsets[index])


@dataclass
class _WindowDetections:
    """Detections of one window, window coordinates, above the score threshold."""

    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n,) int64
    class_prob: np.ndarray  # (n,) float32
    det_score: np.ndarray  # (n,) float32
    crops: list  # n tuples (float32 2-D array, y0, x0)
    n_found: int = 0  # detections above the threshold before any were dropped as another window's


def _is_int(value):
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_mask_rcnn(model):
    """Whether ``model`` is a torchvision Mask R-CNN (a GeneralizedRCNN with a mask head)."""
    return isinstance(model, GeneralizedRCNN) and model.roi_heads.has_mask()


def _candidates(roi_heads, class_logits, box_regression, proposals, image_shapes):
    """Per image, every proposal as one candidate: ``(boxes, labels, class_prob, det_score)``.

    The candidate is the proposal's most probable non-background class, that
    class's refined box (clipped to the image), ``class_prob = P(class)`` and
    ``det_score = 1 - P(background)``.
    """
    boxes_per_image = [len(p) for p in proposals]
    # Geometry and scores in float32, whatever precision the heads ran in.
    pred_boxes = roi_heads.box_coder.decode(box_regression.float(), [p.float() for p in proposals])
    probs = F.softmax(class_logits.float(), -1)
    out = []
    for boxes, prob, shape in zip(pred_boxes.split(boxes_per_image, 0),
                                  probs.split(boxes_per_image, 0), image_shapes, strict=True):
        boxes = box_ops.clip_boxes_to_image(boxes, shape)
        foreground = prob[:, 1:]
        class_prob, best = foreground.max(dim=1)
        labels = best + 1
        det_score = foreground.sum(dim=1)  # 1 - P(background), without the cancellation
        boxes = boxes[torch.arange(len(boxes), device=boxes.device), labels]
        out.append((boxes, labels, class_prob, det_score))
    return out


def _postprocess_detections(roi_heads, candidates):
    """Do torchvision's ``RoIHeads.postprocess_detections`` with one detection per proposal.

    torchvision turns each proposal into one candidate *per class* and runs NMS
    per class, so one source can come out twice (as a star and as a galaxy),
    and a source the model is sure of but whose class is uncertain (P(star) ≈
    P(galaxy) ≈ 0.45) falls below a class-score threshold. Here each proposal
    gives one candidate (`_candidates`); candidates above the model's
    ``score_thresh`` (on ``det_score``) go through one class-agnostic NMS at
    the model's ``nms_thresh``, ordered by ``det_score``, and at most
    ``detections_per_img`` are kept. Returns the kept indices per image.
    """
    out = []
    for boxes, _, _, det_score in candidates:
        keep = torch.where(det_score > roi_heads.score_thresh)[0]
        keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
        keep = keep[box_ops.nms(boxes[keep], det_score[keep], roi_heads.nms_thresh)]
        out.append(keep[: roi_heads.detections_per_img])
    return out


def _centre_detections(candidates, kept, centres, first, *, threshold, distance=CENTRE_MATCH_DISTANCE):
    """Detections decided by the centre detector: one per heatmap maximum scoring ``threshold`` or more.

    Each centre (`deblend.models.mask_rcnn.centre_boxes`), highest first,
    takes its box, class and class probability from the highest-scoring kept
    box-head detection whose box centre lies within ``distance`` pixels and
    that no higher centre took; a centre with none takes them from its own
    two proposals (the one the box head scored higher, refined, or the
    proposal itself when the refinement moved it more than ``distance``,
    onto a neighbour). Its ``det_score`` is its heatmap value.

    Parameters
    ----------
    candidates : list of (boxes, labels, class_prob, det_score)
        `_candidates`, per image.
    kept : list of Tensor
        Indices of the candidates kept by `_postprocess_detections`, per image.
    centres : list of (boxes, values)
        `centre_boxes`, per image.
    first : list of int
        Index of each image's first centre proposal among its candidates.
    threshold : float
        Lowest heatmap value of a detected centre.
    distance : float, optional

    Returns
    -------
    list of (boxes, labels, class_prob, det_score)
    """
    out = []
    for (boxes, labels, class_prob, det_score), keep, (proposals, values), start in zip(
            candidates, kept, centres, first, strict=True):
        n = len(values)
        small = proposals[:n]
        centre_xy = 0.5 * (small[:, :2] + small[:, 2:])
        keep = keep[det_score[keep].argsort(descending=True)]
        near = torch.cdist(centre_xy, 0.5 * (boxes[keep, :2] + boxes[keep, 2:])) <= distance
        free = torch.ones(len(keep), dtype=torch.bool, device=boxes.device)
        chosen, chosen_boxes = [], []
        selected = torch.nonzero(values >= threshold).flatten().tolist()
        for k in selected:
            options = torch.nonzero(near[k] & free).flatten()
            if len(options):  # the box head's own detection of this source
                free[options[0]] = False
                best = keep[options[0]]
                box = boxes[best]
            else:
                pair = torch.tensor([start + k, start + n + k], device=boxes.device)
                best = pair[det_score[pair].argmax()]
                box = boxes[best]
                if float(torch.linalg.vector_norm(0.5 * (box[:2] + box[2:]) - centre_xy[k])) > distance:
                    box = small[k]
            chosen.append(best)
            chosen_boxes.append(box)
        if chosen:
            index = torch.stack(chosen)
            out.append((torch.stack(chosen_boxes), labels[index], class_prob[index],
                        values[selected].to(det_score.dtype)))
        else:
            out.append(tuple(t[:0] for t in (boxes, labels, class_prob, det_score)))
    return out


# Region counts are rounded up to a multiple of this before the box and mask heads (zero rows, dropped
# after). CPU backends keep per-shape state (oneDNN kernels, allocator blocks of that size) for every
# distinct batch size they see, and the number of proposals and detections differs from tile to tile,
# so without it a long run's memory grows with the tiles it has seen (pipelines/memory_probe.py).
ROI_BUCKET = 8


def _bucketed(head, rois):
    """``head(rois)``, evaluated on ``rois`` padded with zero rows to a multiple of `ROI_BUCKET`."""
    n, bucket = rois.shape[0], ROI_BUCKET
    padded = -(-n // bucket) * bucket
    if padded == n:
        return head(rois)
    out = head(torch.cat([rois, rois.new_zeros((padded - n, *rois.shape[1:]))]))
    return tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n]


def _may_be_owned(boxes, core):
    """Whether each box (window coordinates) could hold its detection's owning centre in ``core``.

    `detect` keeps a detection from the window whose core holds its
    mask-weighted centre. That centre lies in the mask's crop: the box grown
    by one pixel on each side and rounded out to whole pixels
    (`paste_mask_crops`). A box that misses the core by more than a quarter
    of its size plus two pixels can therefore never be kept, and its mask
    need not be computed. ``core`` is ``(cy0, cx0, cy1, cx1)``, window pixels.
    """
    cy0, cx0, cy1, cx1 = core
    x0, y0, x1, y1 = boxes.unbind(1)
    gx, gy = 0.25 * (x1 - x0) + 2.0, 0.25 * (y1 - y0) + 2.0
    return (x1 + gx >= cx0 - 0.5) & (x0 - gx < cx1 - 0.5) & (y1 + gy >= cy0 - 0.5) & (y0 - gy < cy1 - 0.5)


def _mask_rcnn_forward(model, images, score_threshold, cores=None, crowded_score=None, centre_detect=None):
    """Evaluate a torchvision Mask R-CNN on a (B, C, H, W) batch, one detection per proposal.

    The eval path of ``GeneralizedRCNN.forward`` and ``RoIHeads.forward``, with
    `_postprocess_detections` in place of torchvision's and masks pasted into
    crops (`paste_mask_crops`) rather than full windows. With ``cores`` (one
    ``(cy0, cx0, cy1, cx1)`` per image, window pixels), detections that no
    core could own (`_may_be_owned`) are dropped before the mask head. Each
    window's ``n_found`` counts its detections with ``det_score >=
    crowded_score`` (default: ``score_threshold``), for the crowded-window test.
    ``centre_detect`` overrides the model's own setting when not None.
    """
    sizes = [tuple(int(s) for s in images.shape[-2:])] * len(images)
    image_list, _ = model.transform(list(images))
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(image_list, features)
    config = getattr(model, "deblend_config", {})
    centres = None
    if getattr(model, "centre_net", None) is not None and config.get("centre_proposals"):
        centres = centre_boxes(model, image_list.tensors, image_list.image_sizes)
        first = [len(p) for p in proposals]
        proposals = [torch.cat([p, b.to(p.dtype)]) for p, (b, _) in zip(proposals, centres, strict=True)]
    heads = model.roi_heads
    class_logits, box_regression = _bucketed(lambda r: heads.box_predictor(heads.box_head(r)),
                                             heads.box_roi_pool(features, proposals, image_list.image_sizes))
    candidates = _candidates(heads, class_logits, box_regression, proposals, image_list.image_sizes)
    kept = _postprocess_detections(heads, candidates)
    if centre_detect is None:
        centre_detect = config.get("centre_detect", False)
    if centres is not None and centre_detect:  # the centres alone decide what is a source
        per_image = _centre_detections(candidates, kept, centres, first, threshold=score_threshold)
    else:
        per_image = [tuple(t[keep] for t in c) for c, keep in zip(candidates, kept, strict=True)]
    crowded_score = score_threshold if crowded_score is None else crowded_score
    n_found = [int((d >= crowded_score).sum()) for _, _, _, d in per_image]
    # Drop what the caller would drop before the (costlier) mask head.
    per_image = [tuple(t[d >= score_threshold] for t in (b, lab, c, d))
                 for b, lab, c, d in per_image]
    if cores is not None:  # and what another window will keep
        kept = []
        for found, core in zip(per_image, cores, strict=True):
            owned = _may_be_owned(found[0], core)
            kept.append(tuple(t[owned] for t in found))
        per_image = kept
    mask_boxes = [b for b, _, _, _ in per_image]
    labels = [lab for _, lab, _, _ in per_image]
    n_total = sum(len(b) for b in mask_boxes)
    if n_total:
        mask_logits = _bucketed(lambda r: heads.mask_predictor(heads.mask_head(r)),
                                heads.mask_roi_pool(features, mask_boxes, image_list.image_sizes))
        index = torch.arange(n_total, device=mask_logits.device)
        mask_probs = mask_logits[index, torch.cat(labels)].float().sigmoid()[:, None]
        mask_probs = mask_probs.split([len(b) for b in mask_boxes], 0)
    else:
        mask_probs = [None] * len(per_image)
    # Map boxes back to the input grid (the identity for deblend's no-resize transform).
    results = model.transform.postprocess([{"boxes": b} for b in mask_boxes],
                                          image_list.image_sizes, sizes)
    out = []
    for result, (_, lab, cls, det), probs, size, n in zip(results, per_image, mask_probs, sizes, n_found,
                                                          strict=True):
        boxes = result["boxes"]
        crops = [] if probs is None else paste_mask_crops(probs, boxes, size)
        out.append(_to_numpy(boxes, lab, cls, det, crops, n_found=n))
    return out


def _generic_forward(model, images, score_threshold, cores=None, crowded_score=None):
    """Call any model returning torchvision-style eval dicts; crop its full-window masks.

    ``cores`` and ``crowded_score`` are unused (only Mask R-CNN windows are tested for crowding).
    """
    outputs = model(images)
    if len(outputs) != len(images):
        raise ValueError(f"model returned {len(outputs)} results for a batch of {len(images)} "
                         "windows; it must return one dict per image")
    out = []
    height, width = images.shape[-2:]
    for result in outputs:
        scores = result["scores"]
        det = result.get("det_scores", scores)
        keep = det >= score_threshold
        boxes = result["boxes"][keep]
        masks = result["masks"][keep][:, 0]
        crops = []
        if len(boxes):
            # Crop to the box grown by 1 px, widened to wherever the mask is non-zero.
            nonzero = masks > 0
            rows, cols = nonzero.any(dim=2), nonzero.any(dim=1)
            grown = torch.cat([boxes[:, :2].floor() - 1, boxes[:, 2:].ceil() + 1], dim=1)
            for i, (bx0, by0, bx1, by1) in enumerate(grown.to(torch.int64).tolist()):
                ys = torch.nonzero(rows[i]).flatten().tolist()
                xs = torch.nonzero(cols[i]).flatten().tolist()
                ya = max(min([by0] + ys[:1]), 0)
                yb = min(max([by1] + ys[-1:]) + 1, height)
                xa = max(min([bx0] + xs[:1]), 0)
                xb = min(max([bx1] + xs[-1:]) + 1, width)
                crops.append((masks[i, ya:yb, xa:xb].float(), ya, xa))
        out.append(_to_numpy(boxes, result["labels"][keep], scores[keep], det[keep], crops,
                             n_found=len(boxes)))
    return out


def _to_numpy(boxes, labels, class_prob, det_score, crops, *, n_found):
    return _WindowDetections(
        n_found=int(n_found),
        boxes=boxes.detach().float().cpu().numpy().reshape(-1, 4),
        labels=labels.detach().cpu().numpy().astype(np.int64),
        class_prob=class_prob.detach().float().cpu().numpy(),
        det_score=det_score.detach().float().cpu().numpy(),
        crops=[(c.detach().float().cpu().numpy(), int(y0), int(x0)) for c, y0, x0 in crops],
    )


def _keep_owned(detections, window, bad):
    """Instance fields (global coordinates) of the detections whose centre the window owns.

    Dropped: detections with an all-zero mask, centres outside the window's
    core, and centres on a masked pixel.
    """
    ny, nx = bad.shape
    rows = []
    for i, (crop, y0, x0) in enumerate(detections.crops):
        total = float(crop.sum(dtype=np.float64))
        if not total > 0:
            continue
        h, w = crop.shape
        cx = float(crop.sum(axis=0, dtype=np.float64) @ np.arange(w)) / total + x0 + window.x0
        cy = float(crop.sum(axis=1, dtype=np.float64) @ np.arange(h)) / total + y0 + window.y0
        if not window.owns(cx, cy):
            continue
        iy = min(max(math.floor(cy + 0.5), 0), ny - 1)
        ix = min(max(math.floor(cx + 0.5), 0), nx - 1)
        if bad[iy, ix]:
            continue
        rows.append((i, cx, cy, crop.astype(np.float16), y0 + window.y0, x0 + window.x0))
    if not rows:
        return None
    index = np.array([r[0] for r in rows], dtype=np.int64)
    shift = np.array([window.x0, window.y0, window.x0, window.y0], dtype=np.float32)
    return Instances(
        boxes=detections.boxes[index] + shift,
        labels=detections.labels[index],
        class_prob=detections.class_prob[index],
        det_score=detections.det_score[index],
        centers=np.array([(r[1], r[2]) for r in rows], dtype=np.float64),
        masks=[r[3] for r in rows],
        offsets=np.array([(r[4], r[5]) for r in rows], dtype=np.int64),
    )


def _check_model_device(model, device):
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    parameter = next(iter(parameters), None)
    if parameter is not None and parameter.device != device and not (
            parameter.device.type == device.type and device.index is None):
        raise ValueError(f"model is on {parameter.device} but device={str(device)!r}; move it "
                         f"with model.to({str(device)!r}) or load it with "
                         f"load_weights(..., device={str(device)!r})")


def detect(normalized, *, model, mask=None, window_size=256, overlap=48, batch_size=4,
           device="cpu", score_threshold=SCORE_THRESHOLD, skip_empty=True, progress=False, half=False,
           split_crowded=True, crowded_score=None, centre_detect=None):
    """Detect and segment every source of an image with an instance segmenter.

    The image is cut into overlapping windows (`deblend.tiling.make_windows`);
    windows with no signal are skipped (`deblend.tiling.has_signal`); the rest
    go through the model in batches of ``(B, 1, H, W)`` float32 tensors under
    `torch.inference_mode`. Each detection is kept from the one window whose
    core holds its mask-weighted centre, unless that centre is a masked pixel;
    its soft mask is stored cropped (`Instances`). See the module docstring
    for the stitching assumptions.

    For a torchvision Mask R-CNN (`deblend.models.build_mask_rcnn`,
    `deblend.models.load_weights`) each region proposal gives at most one
    detection, its most probable class, and detections are suppressed across
    classes (torchvision's own post-processing gives one per class and
    suppresses per class, so one source could be kept as both a star and a
    galaxy); boxes and masks are otherwise torchvision's. Any other model is
    called as ``model(batch)`` and must return, per window, a dict with
    ``boxes`` (n, 4), ``labels`` (n,), ``scores`` (n,), ``masks`` (n, 1, H, W)
    and optionally ``det_scores`` (n,).

    Parameters
    ----------
    normalized : ndarray, shape (ny, nx)
        The normalised detection image, ``prepare(image).normalized()``.
        Non-finite pixels are treated as masked.
    model : torch.nn.Module
        The segmenter, already on ``device``; it is evaluated in eval mode
        (its mode is restored afterwards).
    mask : ndarray of bool, shape (ny, nx), optional
        True where pixels are masked: they are fed to the model as 0 and no
        detection centred on one is kept.
    window_size : int, optional
        Window side in pixels; multiples of 64 waste no padding.
    overlap : int, optional
        Pixels shared by neighbouring windows, < ``window_size / 2``. Sources
        whose mask reaches farther than ``overlap // 2`` from their centre
        may be cut at a window edge.
    batch_size : int, optional
        Windows per model call.
    device : str or torch.device, optional
        Where the model runs (``'cpu'``, ``'cuda'``).
    score_threshold : float, optional
        Keep detections with ``det_score >= score_threshold`` (see `Instances`).
    skip_empty : bool, optional
        Skip windows where `deblend.tiling.has_signal` finds nothing.
    progress : bool, optional
        Show a progress bar over the batches.
    half : bool, optional
        Run the network in float16 (`deblend.models.precision`); CUDA devices only.
    split_crowded : bool, optional
        Run crowded windows again as smaller windows (Mask R-CNN models
        only). A window gets a fixed budget of region proposals, about two
        per source; one that returns at least half as many detections
        (`crowded_limit`) has used it up and loses sources. Such a window is
        run again as windows of ``window_size // 2`` pixels over its core
        (`deblend.tiling.split_window`), each with the whole budget, and
        their detections replace its own. One level only; not below 64
        pixels.
    crowded_score : float, optional
        The detections a window is counted as returning, for the test above,
        are those with ``det_score >= crowded_score``. Default:
        ``score_threshold``. `deblend.tta` keeps detections down to a lower
        score and counts them from the single-pass default, 0.5, at which the
        limit was set.
    centre_detect : bool, optional
        For Mask R-CNN weights with a centre detector: whether its centres
        decide what is a source (``centre_detect`` of
        `deblend.models.build_mask_rcnn`). None (default) keeps the weights'
        setting; False lets the box head decide, the centres still adding
        proposals (the coarse pass, `deblend.coarse.detect_coarse`, does so
        for sources larger than any the centre detector was trained on).

    Returns
    -------
    Instances
        Sorted by centre, ``y`` then ``x``. Empty (length 0) when nothing is found.

    Raises
    ------
    ValueError
        If an argument is invalid or the model is not on ``device``.
    """
    image = np.array(normalized, dtype=np.float32)  # a copy: masked pixels are zeroed below
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"normalized must be a non-empty 2-D image (ny, nx), got shape "
                         f"{image.shape}; pass prepare(image).normalized()")
    bad = ~np.isfinite(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} must equal the image shape {image.shape}")
        bad |= mask
    image[bad] = 0.0
    if not _is_int(window_size) or window_size < 1:
        raise ValueError(f"window_size must be a positive integer, got {window_size!r}; e.g. 256")
    if not _is_int(overlap) or overlap < 0 or 2 * overlap >= window_size:
        raise ValueError(f"overlap must be an integer in [0, window_size/2) = "
                         f"[0, {window_size / 2:g}), got {overlap!r}; lower overlap or raise "
                         "window_size")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}; e.g. 4")
    if (not isinstance(score_threshold, Real) or isinstance(score_threshold, bool)
            or not 0 <= score_threshold <= 1):
        raise ValueError(f"score_threshold must be a number in [0, 1], got {score_threshold!r}; "
                         "e.g. 0.5")
    if crowded_score is not None and (not isinstance(crowded_score, Real) or isinstance(crowded_score, bool)
                                      or not 0 <= crowded_score <= 1):
        raise ValueError(f"crowded_score must be None or a number in [0, 1], got {crowded_score!r}; e.g. 0.5")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be e.g. 'cpu' or 'cuda', got {device!r}") from error
    _check_model_device(model, device)
    half = check_half(half, device)

    windows = make_windows(image.shape, size=window_size, overlap=overlap)
    if skip_empty:
        todo = [w for w in windows if has_signal(image[w.slices], bad[w.slices])]
    else:
        todo = windows
    log.debug("detect: %d windows of %s, %d with signal", len(windows), windows[0].shape,
              len(todo))
    mask_rcnn = _is_mask_rcnn(model)
    forward = partial(_mask_rcnn_forward, centre_detect=centre_detect) if mask_rcnn else _generic_forward
    run = partial(_run_windows, model=model, forward=forward,
                  image=image, bad=bad, batch_size=batch_size, device=device, half=half,
                  score_threshold=float(score_threshold), progress=progress,
                  crowded_score=None if crowded_score is None else float(crowded_score))
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            found = run(todo, desc="detect")
            limit = crowded_limit(model) if split_crowded and mask_rcnn else None
            crowded = [] if limit is None else [w for w, n, _ in found if n >= limit]
            if crowded and window_size // 2 >= MIN_SPLIT_SIZE:
                size = window_size // 2
                split = {w: split_window(w, image.shape, size=size, overlap=min(overlap, (size - 1) // 2))
                         for w in crowded}
                split = {w: pieces for w, pieces in split.items() if pieces != [w]}
                pieces = [p for ps in split.values() for p in ps
                          if not skip_empty or has_signal(image[p.slices], bad[p.slices])]
                log.info("detect: %d crowded windows (>= %d detections) run again as %d windows of %d pixels",
                         len(split), limit, len(pieces), size)
                found = [f for f in found if f[0] not in split] + run(pieces, desc="detect (crowded)")
    finally:
        model.train(was_training)
    instances = Instances.concatenate([part for _, _, part in found])
    order = np.lexsort((instances.centers[:, 0], instances.centers[:, 1]))
    log.info("detect: %d instances from %d of %d windows", len(instances), len(todo),
             len(windows))
    return instances.select(order)


def crowded_limit(model):
    """Detections at which a window of this Mask R-CNN counts as crowded: half its proposals.

    Each source takes about two of the region proposals the RPN keeps per
    window (``rpn_post_nms_top_n_test``); a window that returns half as many
    detections has used up its budget, and more sources there are lost.
    """
    return max(1, int(CROWDED_FRACTION * model.rpn._post_nms_top_n["testing"]))


def _run_windows(windows, *, model, forward, image, bad, batch_size, device, half, score_threshold, progress,
                 desc, crowded_score=None):
    """``(window, detections found, Instances it owns or None)`` for each window, in batches."""
    out = []
    batches = iter_batches(windows, batch_size)
    for batch in tqdm(batches, total=math.ceil(len(windows) / batch_size), unit="batch", desc=desc,
                      disable=not progress):
        tensor = torch.from_numpy(np.stack([image[w.slices] for w in batch]))
        tensor = tensor[:, np.newaxis].to(device)
        cores = [(w.cy0 - w.y0, w.cx0 - w.x0, w.cy1 - w.y0, w.cx1 - w.x0) for w in batch]
        with autocast(device, half):
            found_per_window = forward(model, tensor, score_threshold, cores, crowded_score)
        for window, found in zip(batch, found_per_window, strict=True):
            out.append((window, found.n_found, _keep_owned(found, window, bad)))
    return out


def suppress_duplicates(instances, shape, *, max_overlap=0.5, mask_threshold=0.5, companion_distance=0.0,
                        companion_score=COMPANION_SCORE, image=None, companion_contrast=COMPANION_CONTRAST):
    """Drop instances whose mask is mostly covered by higher-scoring instances (mask NMS).

    Box NMS keeps two detections of one source when their boxes differ
    enough; their masks still coincide. Going down in ``det_score``, an
    instance is dropped when more than ``max_overlap`` of its mask
    (soft value ≥ ``mask_threshold``) lies on pixels already claimed by the
    instances kept so far. Close companions mostly survive: the network's
    masks follow the truth convention, in which each pixel has one owner, so
    real neighbours overlap little.

    Not always: a faint companion on a bright neighbour's wing is often
    covered by the neighbour's mask. With ``companion_distance > 0`` such an
    instance is kept as a *companion* when its ``det_score`` is at least
    ``companion_score``, its centre is at least ``companion_distance``
    pixels from the centres of all the kept instances whose pixels it
    overlaps (a duplicate of one source sits on that source's centre), and,
    when the ``image`` is given, the image shows a bump of its own there: a
    `local_contrast` of at least ``companion_contrast`` within a pixel of
    its centre. A companion claims only the pixels no one claimed
    before it; which instance owns each pixel in the end is
    `instances_to_labels`' choice.

    Parameters
    ----------
    instances : Instances
    shape : tuple of int
        ``(ny, nx)`` of the image.
    max_overlap : float, optional
        In (0, 1]; 1 keeps everything.
    mask_threshold : float, optional
    companion_distance : float, optional
        Least centre distance (pixels) of a companion from the instances
        covering it; 0 (default) keeps no companions. `COMPANION_DISTANCE`
        is the pipeline's default.
    companion_score : float, optional
        Least ``det_score`` of a companion, in [0, 1].
    image : ndarray, shape (ny, nx), optional
        The normalised image the instances were found on, for the contrast
        condition; None: no contrast condition.
    companion_contrast : float, optional
        Least contrast near a companion's centre, in robust sigma.

    Returns
    -------
    Instances
        The kept instances, in their original order.
    """
    if not 0 < max_overlap <= 1:
        raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap!r}; e.g. 0.5")
    check_companion_options(companion_distance, companion_score)
    dims = tuple(int(n) for n in shape)
    if image is not None and np.shape(image) != dims:
        raise ValueError(f"image must have the shape {dims} given, got shape {np.shape(image)}")
    companion = {"distance": companion_distance, "score": companion_score, "least_contrast": companion_contrast,
                 "contrast": _LazyContrast(image)}
    owner = np.full(dims, -1, dtype=np.int32)  # the kept instance that claimed each pixel first
    order = np.argsort(-np.asarray(instances.det_score, dtype=np.float64), kind="stable")
    keep = np.zeros(len(instances), dtype=bool)
    for i in order:
        values, region = instances.clipped_mask(i, dims)
        own = values >= mask_threshold
        area = int(own.sum())
        if area == 0:
            continue
        sub = owner[region]
        taken = own & (sub >= 0)
        if taken.sum() > max_overlap * area and not _is_companion(instances, i, sub[taken], **companion):
            continue
        keep[i] = True
        sub[own & (sub < 0)] = i
    return instances.select(np.flatnonzero(keep))


def check_companion_options(companion_distance, companion_score=COMPANION_SCORE):
    """Validate `suppress_duplicates`' companion options; returns them as floats."""
    if isinstance(companion_distance, bool) or not isinstance(companion_distance, Real) \
            or not 0 <= companion_distance < np.inf:
        raise ValueError(f"companion_distance must be a finite number of pixels >= 0 (0: no companions), got "
                         f"{companion_distance!r}; e.g. {COMPANION_DISTANCE}")
    if isinstance(companion_score, bool) or not isinstance(companion_score, Real) or not 0 <= companion_score <= 1:
        raise ValueError(f"companion_score must be a detection score in [0, 1], got {companion_score!r}; "
                         f"e.g. {COMPANION_SCORE}")
    return float(companion_distance), float(companion_score)


def _is_companion(instances, index, covering, *, distance, score, contrast, least_contrast):
    """Whether instance ``index`` passes `suppress_duplicates`' companion test against the kept ``covering``."""
    if distance <= 0 or instances.det_score[index] < score:
        return False
    others = np.unique(covering)
    if np.hypot(*(instances.centers[others] - instances.centers[index]).T).min() < distance:
        return False
    if contrast.image is None:
        return True
    x, y = (int(np.floor(v + 0.5)) for v in instances.centers[index])
    return contrast.near_max(x, y) >= least_contrast


class _LazyContrast:
    """`local_contrast` of ``image`` at the few pixels asked for; its sigma measured once, when first needed."""

    def __init__(self, image):
        self.image = image
        self._sigma = None

    def near_max(self, x, y):
        """Largest `local_contrast` within a pixel of pixel ``(x, y)`` (-inf off the image)."""
        ny, nx = self.image.shape
        rows = slice(min(max(y - 1, 0), ny), min(max(y + 2, 0), ny))
        cols = slice(min(max(x - 1, 0), nx), min(max(x + 2, 0), nx))
        if rows.start == rows.stop or cols.start == cols.stop:
            return -np.inf
        if self._sigma is None:
            self._sigma = _contrast_sigma(self.image)
        if self._sigma <= 0:
            return 0.0
        return float(_bump(self.image, rows, cols).max() / self._sigma)


def local_contrast(normalized):
    """How much each pixel stands above its surroundings, in robust standard deviations.

    The image smoothed by a 3x3 mean, minus the 5x5 running mean of that,
    divided by the robust standard deviation (1.4826 MAD) of the result over
    the finite pixels: a faint companion on a brighter neighbour's slope is a
    positive bump, the smooth wing itself is about 0. The contrast-peak
    proposals of `deblend.models.peak_boxes` are built the same way, per
    window. On images of more than `CONTRAST_SAMPLE_PIXELS` pixels the robust
    standard deviation is measured on slabs of rows holding that many,
    spread evenly over the image (so `suppress_duplicates` needs neither a
    full map nor its median, and large images cost no extra memory).

    Parameters
    ----------
    normalized : ndarray, shape (ny, nx)
        The normalised detection image (`deblend.preprocess.Prepared.normalized`);
        non-finite pixels count as 0.

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    image = np.asarray(normalized)
    if image.ndim != 2:
        raise ValueError(f"normalized must be a 2-D image, got shape {image.shape}")
    sigma = _contrast_sigma(image)
    bump = _bump(image, slice(0, image.shape[0]), slice(0, image.shape[1]))
    return (bump / sigma if sigma > 0 else np.zeros_like(bump)).astype(np.float32)


def _bump(image, rows, cols):
    """The 3x3 mean minus its 5x5 running mean of ``image[rows, cols]`` (numerator of `local_contrast`).

    'Nearest' edges, non-finite pixels as 0; computed from that region grown by the filters' reach
    only, so a few pixels cost a few pixels' work.
    """
    ny, nx = image.shape
    r0, r1 = max(rows.start - _CONTRAST_REACH, 0), min(rows.stop + _CONTRAST_REACH, ny)
    c0, c1 = max(cols.start - _CONTRAST_REACH, 0), min(cols.stop + _CONTRAST_REACH, nx)
    part = np.asarray(image[r0:r1, c0:c1], dtype=np.float64)
    part = np.where(np.isfinite(part), part, 0.0)
    smooth = ndimage.uniform_filter(part, 3, mode="nearest")
    bump = smooth - ndimage.uniform_filter(smooth, 5, mode="nearest")
    return bump[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0]


def _contrast_sigma(image):
    """Robust standard deviation of `_bump` over the finite pixels (0 when none is).

    All rows of an image up to `CONTRAST_SAMPLE_PIXELS` pixels; on larger images, evenly spread
    slabs of rows holding that many.
    """
    ny, nx = image.shape
    wanted = math.ceil(CONTRAST_SAMPLE_PIXELS / max(nx, 1))
    if wanted >= ny - _CONTRAST_SLAB:
        starts, height = [0], ny
    else:
        height = _CONTRAST_SLAB
        starts = np.unique(np.linspace(0, ny - height, math.ceil(wanted / height)).round().astype(int))
    values = []
    for start in starts:
        rows = slice(int(start), int(start) + height)
        values.append(_bump(image, rows, slice(0, nx))[np.isfinite(image[rows])])
    values = np.concatenate(values)
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def instances_to_labels(instances, shape, *, mask_threshold=0.5, mask=None):
    """Resolve overlapping soft masks into one label map.

    Each pixel goes to the instance with the highest soft-mask value there,
    among those whose value is at least ``mask_threshold``; equal values go to
    the higher ``det_score``, then to the lower index. Instances left with no
    pixel are dropped; the others are labelled 1..N in their order in
    ``instances`` (`detect` sorts by centre, y then x), so catalog row ``i`` ↔
    label ``i + 1`` ↔ ``instances`` index ``keep[i]``. Works in each
    instance's crop: time and memory scale with the crops' area, not with
    the number of instances times the image.

    Parameters
    ----------
    instances : Instances
    shape : tuple of int
        ``(ny, nx)`` of the image.
    mask_threshold : float, optional
        Least soft-mask value for a pixel to belong to an instance, in (0, 1].
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels left at 0 (e.g. the image's masked pixels).

    Returns
    -------
    labels : ndarray of int32, shape (ny, nx)
        0 = background, 1..N.
    keep : ndarray of int64, shape (N,)
        Increasing indices into ``instances`` of the labelled instances:
        ``instances.select(keep)`` is row-aligned with the catalog.

    Raises
    ------
    ValueError
        If ``shape``, ``mask_threshold`` or ``mask`` is invalid.
    """
    try:
        dims = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"shape must be two positive integers (ny, nx), got {shape!r}")
    if (not isinstance(mask_threshold, Real) or isinstance(mask_threshold, bool)
            or not 0 < mask_threshold <= 1):
        raise ValueError(f"mask_threshold must be a number in (0, 1], got {mask_threshold!r}; "
                         "e.g. 0.5")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != dims:
            raise ValueError(f"mask shape {mask.shape} must equal shape {dims}")
    best = np.zeros(dims, dtype=np.float32)
    owner = np.full(dims, -1, dtype=np.int64)
    # Highest det_score first, strict '>' below: an equal value never takes a pixel from
    # an instance already processed, so ties go to the higher score, then the lower index.
    order = np.argsort(-np.asarray(instances.det_score, dtype=np.float64), kind="stable")
    threshold = np.float32(mask_threshold)
    for i in order:
        values, region = instances.clipped_mask(i, dims)  # crops may reach past the image when made by hand
        sub_best = best[region]
        wins = (values >= threshold) & (values > sub_best)
        sub_best[wins] = values[wins]
        owner[region][wins] = i
    if mask is not None:
        owner[mask] = -1
    counts = np.bincount(owner.ravel() + 1, minlength=len(instances) + 1)[1:]
    keep = np.flatnonzero(counts)
    lut = np.zeros(len(instances) + 1, dtype=np.int32)
    lut[keep + 1] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[owner + 1], keep.astype(np.int64)
