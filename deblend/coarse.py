"""A coarse pass for sources too large for the network: detect them on a binned copy of the image.

`deblend.segment.detect` sees a source whole only when its mask reaches at most
``overlap // 2`` pixels from its centre (24 px by default), and the network was
trained on galaxies of at most a few tens of pixels. Larger sources (nearby
galaxies, bright stars, anything at space-telescope pixel scales) come out
shredded into pieces or are missed. Binning the detection image by ``factor``
shrinks them into the range the network knows:

1. `bin_image` averages ``factor x factor`` blocks of the background-subtracted
   detection image (its good pixels only) and propagates the noise σ;
2. `detect_coarse` runs `detect` on the normalised binned image and keeps the
   *large* detections, those whose box is at least ``min_size`` full-resolution
   pixels on its longer side, scaled back to full resolution
   (`upsample_instances`);
3. `merge_coarse` lets them replace the full-resolution instances they cover.

A fine instance is replaced when more than ``max_overlap`` of its mask lies on
a large coarse instance's mask. A genuine small companion on top of a large
galaxy survives when the coarse pass saw it too: the network gives each pixel
one owner, so the galaxy's coarse mask leaves the companion out.

Arguments and results are numpy; torch is used inside.
"""

from __future__ import annotations

import logging
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F

from deblend import segment
from deblend import tta as tta_module
from deblend.preprocess import normalize
from deblend.segment import Instances, suppress_duplicates

__all__ = ["bin_image", "upsample_instances", "detect_coarse", "merge_coarse"]

log = logging.getLogger(__name__)


def _check_factor(factor):
    if isinstance(factor, bool) or not isinstance(factor, Integral) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}; e.g. factor=2")
    return int(factor)


def bin_image(image, sigma, *, factor=2, mask=None):
    """Average ``factor x factor`` blocks of an image, over their good pixels.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image (`deblend.preprocess.Prepared.detection`).
        Non-finite pixels count as masked.
    sigma : float or ndarray, shape (ny, nx)
        Noise σ of ``image`` (> 0 where good).
    factor : int, optional
        Block side, >= 2. Images whose sides are not multiples of it get a
        last, partial block.
    mask : ndarray of bool, shape (ny, nx), optional
        True where pixels are bad.

    Returns
    -------
    binned : ndarray of float32, shape (ceil(ny / factor), ceil(nx / factor))
        Mean of each block's good pixels; 0 where a block has none.
    binned_sigma : ndarray of float32, same shape
        σ of that mean for independent pixel noise, ``sqrt(sum σ²) / n_good``;
        1 where a block has no good pixel.
    binned_mask : ndarray of bool, same shape
        True where a block has no good pixel.
    """
    factor = _check_factor(factor)
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array (ny, nx), got shape {image.shape}")
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), image.shape)
    bad = ~np.isfinite(image) | ~np.isfinite(sigma)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} must equal the image shape {image.shape}")
        bad |= mask
    ny, nx = image.shape
    by, bx = -(-ny // factor), -(-nx // factor)
    pad = ((0, by * factor - ny), (0, bx * factor - nx))
    good = np.pad(~bad, pad, constant_values=False)
    values = np.pad(np.where(bad, 0.0, image), pad)
    variance = np.pad(np.where(bad, 0.0, sigma ** 2), pad)

    def block_sum(a):
        return a.reshape(by, factor, bx, factor).sum(axis=(1, 3))

    n_good = block_sum(good.astype(np.float64))
    empty = n_good == 0
    n = np.where(empty, 1.0, n_good)
    binned = np.where(empty, 0.0, block_sum(values) / n)
    binned_sigma = np.where(empty, 1.0, np.sqrt(block_sum(variance)) / n)
    binned_sigma = np.where(binned_sigma > 0, binned_sigma, 1.0)
    return binned.astype(np.float32), binned_sigma.astype(np.float32), empty


def upsample_instances(instances, factor, shape):
    """Instances found on an image binned by ``factor``, in the full-resolution image's pixels.

    Boxes and crop offsets scale by ``factor``; soft masks are upsampled
    bilinearly (coarse pixel ``i`` covers fine pixels ``factor*i`` to
    ``factor*(i+1) - 1``, its centre at ``factor*i + (factor-1)/2``) and cut to
    the image.

    Parameters
    ----------
    instances : deblend.segment.Instances
        In the binned image's pixels.
    factor : int
    shape : tuple of int
        ``(ny, nx)`` of the full-resolution image.

    Returns
    -------
    deblend.segment.Instances
    """
    factor = _check_factor(factor)
    ny, nx = (int(n) for n in shape)
    masks, offsets = [], []
    for crop, (y0, x0) in zip(instances.masks, instances.offsets, strict=True):
        tensor = torch.from_numpy(np.asarray(crop, dtype=np.float32))[None, None]
        up = F.interpolate(tensor, scale_factor=factor, mode="bilinear", align_corners=False)[0, 0].numpy()
        fy0, fx0 = int(y0) * factor, int(x0) * factor
        ya, xa = max(-fy0, 0), max(-fx0, 0)
        up = up[ya:max(ny - fy0, ya), xa:max(nx - fx0, xa)]
        masks.append(up.astype(np.float16))
        offsets.append((fy0 + ya, fx0 + xa))
    boxes = np.asarray(instances.boxes, dtype=np.float32) * factor
    boxes = np.clip(boxes, 0, np.array([nx, ny, nx, ny], dtype=np.float32))
    return Instances(boxes=boxes, labels=instances.labels.copy(), class_prob=instances.class_prob.copy(),
                     det_score=instances.det_score.copy(),
                     centers=np.asarray(instances.centers, dtype=np.float64) * factor + (factor - 1) / 2,
                     masks=masks, offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2))


def detect_coarse(detection, sigma, *, model, mask=None, factor=2, min_size=48, window_size=256,
                  overlap=64, max_overlap=0.5, tta=False, **detect_options):
    """Large sources, found on the detection image binned by ``factor``.

    Parameters
    ----------
    detection : ndarray, shape (ny, nx)
        Background-subtracted detection image (`deblend.preprocess.Prepared.detection`).
    sigma : float or ndarray, shape (ny, nx)
        Its noise σ (``Prepared.detection_rms``).
    model : torch.nn.Module
        The instance segmenter, as for `deblend.segment.detect`.
    mask : ndarray of bool, shape (ny, nx), optional
        True where pixels are bad.
    factor : int, optional
        Binning factor, >= 2.
    min_size : float, optional
        Keep coarse detections whose box is at least this many full-resolution
        pixels on its longer side. The default, 48, is the full-resolution
        pass's default window overlap: larger sources can be cut at its
        window edges.
    window_size, overlap : int, optional
        Windows of the binned image (`deblend.segment.detect`); the larger
        overlap lets a window see sources up to ``overlap // 2`` binned pixels
        in radius whole.
    max_overlap : float, optional
        Mask NMS among the coarse detections (`deblend.segment.suppress_duplicates`).
    tta : bool, optional
        Detect with test-time augmentation (`deblend.tta.detect_tta`);
        ``score_threshold`` is then the fused score's.
    **detect_options
        Passed to `deblend.segment.detect` (``batch_size``, ``device``,
        ``score_threshold``, ``half``, ``split_crowded``, ...).
        ``centre_detect`` defaults to False: with weights whose centre
        detector decides what is a source (the shipped ones), the box head
        decides in the coarse pass. The centre detector was trained on
        galaxies a few tens of pixels across and finds no centre for a
        larger one (the XDF spiral, README *Real images*), binned or not;
        its centres still add proposals. ``split_crowded`` is always False
        here: crowded windows are re-run at half size to find small sources
        the proposal budget missed, and the coarse pass keeps only large ones.

    Returns
    -------
    deblend.segment.Instances
        The large coarse instances, in full-resolution pixels.
    """
    factor = _check_factor(factor)
    if isinstance(min_size, bool) or not np.isfinite(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a number of pixels >= 0, got {min_size!r}; e.g. 48")
    detection = np.asarray(detection)
    binned, binned_sigma, binned_mask = bin_image(detection, sigma, factor=factor, mask=mask)
    if min(binned.shape) < 8:
        return Instances.empty()
    normalized = normalize(binned, binned_sigma, mask=binned_mask)
    find = tta_module.detect_tta if tta else segment.detect
    detect_options.setdefault("centre_detect", False)
    detect_options["split_crowded"] = False
    found = find(normalized, model=model, mask=binned_mask, window_size=window_size,
                 overlap=min(overlap, (window_size - 1) // 2), **detect_options)
    found = suppress_duplicates(found, binned.shape, max_overlap=max_overlap)
    extent = np.maximum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1]) * factor
    large = upsample_instances(found.select(np.flatnonzero(extent >= min_size)), factor, detection.shape)
    log.info("detect_coarse: %d of %d detections on the %dx-binned image are >= %g px", len(large),
             len(found), factor, min_size)
    return large


def merge_coarse(fine, coarse, shape, *, max_overlap=0.5, mask_threshold=0.5):
    """Full-resolution instances with the large coarse ones in place of those they cover.

    A fine instance is dropped when more than ``max_overlap`` of its mask
    (soft value >= ``mask_threshold``) lies on the masks of ``coarse``.

    Parameters
    ----------
    fine : deblend.segment.Instances
        From `deblend.segment.detect` on the full-resolution image.
    coarse : deblend.segment.Instances
        From `detect_coarse`.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    max_overlap : float, optional
        In (0, 1].
    mask_threshold : float, optional

    Returns
    -------
    deblend.segment.Instances
        Sorted by centre, ``y`` then ``x``, as `deblend.segment.detect` sorts.
    """
    if not 0 < max_overlap <= 1:
        raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap!r}; e.g. 0.5")
    if len(coarse) == 0:
        return fine
    dims = tuple(int(n) for n in shape)
    claimed = np.zeros(dims, dtype=bool)
    for i in range(len(coarse)):
        values, region = coarse.clipped_mask(i, dims)
        claimed[region] |= values >= mask_threshold
    keep = []
    for i in range(len(fine)):
        values, region = fine.clipped_mask(i, dims)
        own = values >= mask_threshold
        if (claimed[region] & own).sum() > max_overlap * own.sum():
            continue
        keep.append(i)
    log.info("merge_coarse: %d large coarse instances replace %d of %d fine ones", len(coarse),
             len(fine) - len(keep), len(fine))
    merged = Instances.concatenate([fine.select(np.asarray(keep, dtype=np.int64)), coarse])
    return merged.select(np.lexsort((merged.centers[:, 0], merged.centers[:, 1])))
