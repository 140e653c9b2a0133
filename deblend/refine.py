"""Blend refinement: the probabilistic U-Net re-segments every blend group.

Mask R-CNN gives one answer per source; in a blend several are plausible.
For each *blend group* (detections whose footprints touch), the
probabilistic U-Net (`deblend.models.prob_unet`) is run once per member on a
cutout of the group, with the member marked by a heat map at its position
and the other detections marked in a second heat map, and draws
``n_samples`` masks per member. Per sample, each pixel goes to the member
that claims it most (if any claims it with probability > 0.5): a joint
assignment. The final labels come from the mean probabilities in the same
way. Outputs: the refined label map, a per-pixel uncertainty (fraction of
samples whose label differs from the final one), and each member's flux in
every sample, whose spread is the segmentation-induced flux error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["CUTOUT", "HEATMAP_SIGMA", "heatmap", "refine_input", "source_positions", "find_blend_groups",
           "Refinement", "refine_blends"]

log = logging.getLogger(__name__)

#: Side of the square cutouts the U-Net is trained on (pixels, multiple of 8).
CUTOUT = 64
#: Gaussian sigma (pixels) of the heat maps marking sources.
HEATMAP_SIGMA = 1.5


def heatmap(shape, positions, *, sigma=HEATMAP_SIGMA):
    """Maximum of unit-height Gaussians at ``positions``.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    positions : array_like, shape (n, 2)
        ``(x, y)`` pixel positions (0-based; may lie outside the image).
    sigma : float, optional

    Returns
    -------
    ndarray of float32, shape ``shape``
    """
    out = np.zeros(shape, dtype=np.float32)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if not len(positions):
        return out
    yy, xx = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
    reach = 4 * sigma
    for x, y in positions:
        if x < -reach or y < -reach or x > shape[1] + reach or y > shape[0] + reach:
            continue
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
        np.maximum(out, g, out=out)
    return out


def refine_input(normalized, target, others):
    """The U-Net's input for one source: image, its heat map, the others' heat map.

    Parameters
    ----------
    normalized : ndarray, shape (ny, nx)
        Cutout of the normalised detection image (`deblend.preprocess.Prepared.normalized`).
    target : array_like, shape (2,)
        ``(x, y)`` of the source to segment, in cutout pixels.
    others : array_like, shape (n, 2)
        ``(x, y)`` of the other detected sources, in cutout pixels.

    Returns
    -------
    ndarray of float32, shape (3, ny, nx)
    """
    normalized = np.asarray(normalized, dtype=np.float32)
    return np.stack([normalized, heatmap(normalized.shape, np.asarray(target).reshape(1, 2)),
                     heatmap(normalized.shape, others)])


def source_positions(normalized, labels, *, smooth=1.0):
    """Position ``(x, y)`` of each label's source: the peak of the smoothed image inside its segment.

    Parameters
    ----------
    normalized : ndarray, shape (ny, nx)
    labels : ndarray of int, shape (ny, nx)
        Labels 1..N.
    smooth : float, optional
        Gaussian sigma (pixels) of the smoothing against noise peaks.

    Returns
    -------
    ndarray of float64, shape (N, 2)
    """
    from scipy import ndimage

    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros((0, 2))
    image = ndimage.gaussian_filter(np.nan_to_num(np.asarray(normalized, np.float32)), smooth)
    peaks = ndimage.maximum_position(image, labels, index=np.arange(1, n + 1))
    return np.array([(x, y) for y, x in peaks], dtype=np.float64)


def find_blend_groups(labels):
    """Blend groups: sets of segments that touch (8-connectivity).

    Parameters
    ----------
    labels : ndarray of int, shape (ny, nx)
        Labels 1..N, 0 = background.

    Returns
    -------
    blend_id : ndarray of int32, shape (N,)
        1..G for members of a group of two or more sources (numbered by their
        smallest label), 0 for isolated sources.
    n_blend : ndarray of int32, shape (N,)
        Number of sources in each source's group (1 when isolated).
    """
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    parent = np.arange(n + 1)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ny, nx = labels.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = labels[0:ny - dy, max(0, -dx):nx - max(0, dx)]  # pixel (y, x)
        b = labels[dy:ny, max(0, dx):nx - max(0, -dx)]  # its neighbour (y + dy, x + dx)
        touch = (a > 0) & (b > 0) & (a != b)
        for p, q in set(zip(a[touch].tolist(), b[touch].tolist(), strict=True)):
            rp, rq = root(p), root(q)
            if rp != rq:
                parent[max(rp, rq)] = min(rp, rq)
    roots = np.array([root(i) for i in range(n + 1)])[1:]
    sizes = np.bincount(roots, minlength=n + 1)
    n_blend = sizes[roots].astype(np.int32)
    blend_id = np.zeros(n, dtype=np.int32)
    grouped = np.unique(roots[n_blend > 1])
    for gid, r in enumerate(grouped, start=1):
        blend_id[roots == r] = gid
    return blend_id, n_blend


@dataclass
class Refinement:
    """What refining the blend groups of one image produces.

    Attributes
    ----------
    labels : ndarray of int32, shape (ny, nx)
        Refined label map (same labels as the input map; every label keeps at
        least one pixel: a group whose refinement would leave a member without
        pixels keeps the input labels and is not counted as refined).
    uncertainty : ndarray of float32, shape (ny, nx)
        Fraction of samples in which a pixel's label differs from the final
        one (0 outside refined groups).
    blend_id, n_blend : ndarray of int32, shape (N,)
        See `find_blend_groups`.
    flux_samples : ndarray of float64, shape (N, n_bands, n_samples)
        Each source's flux (sum of the background-subtracted data over its
        pixels) in every sample; NaN for sources not refined.
    refined : ndarray of bool, shape (N,)
        Sources whose group was refined.
    samples : ndarray of int32, shape (n_samples, ny, nx), or None
        The sampled label maps (only when asked for).
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    blend_id: np.ndarray
    n_blend: np.ndarray
    flux_samples: np.ndarray
    refined: np.ndarray
    samples: np.ndarray | None = None

    def flux_spread(self):
        """Standard deviation of each source's flux over the samples, ``(N, n_bands)``; 0 when not refined."""
        if self.flux_samples.shape[-1] < 2:
            return np.zeros(self.flux_samples.shape[:2])
        return np.nan_to_num(np.std(self.flux_samples, axis=-1, ddof=1), nan=0.0)


def _canvas(members, labels, *, pad, multiple):
    """Square-ish slice pair around the members' pixels, at least CUTOUT wide and a multiple of ``multiple``."""
    ys, xs = np.nonzero(np.isin(labels, members))
    y0, y1, x0, x1 = ys.min() - pad, ys.max() + 1 + pad, xs.min() - pad, xs.max() + 1 + pad
    size_y = max(CUTOUT, -(-(y1 - y0) // multiple) * multiple)
    size_x = max(CUTOUT, -(-(x1 - x0) // multiple) * multiple)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    return cy - size_y // 2, cx - size_x // 2, size_y, size_x


def _crop(array, y0, x0, h, w):
    """``array[..., y0:y0+h, x0:x0+w]`` with zero padding outside the image."""
    ny, nx = array.shape[-2:]
    out = np.zeros((*array.shape[:-2], h, w), dtype=array.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    if ya < yb and xa < xb:
        out[..., ya - y0:yb - y0, xa - x0:xb - x0] = array[..., ya:yb, xa:xb]
    return out


def refine_blends(normalized, labels, data, *, model, positions=None, mask=None, n_samples=16, seed=0,
                  device="cpu", pad=8, max_size=256, save_samples=False):
    """Re-segment every blend group with the probabilistic U-Net.

    Parameters
    ----------
    normalized : ndarray, shape (ny, nx)
        Normalised detection image (`deblend.preprocess.Prepared.normalized`).
    labels : ndarray of int, shape (ny, nx)
        Label map 1..N (e.g. Mask R-CNN's); isolated sources are left as they are.
    data : ndarray, shape (n_bands, ny, nx) or (ny, nx)
        Background-subtracted data, for the per-sample fluxes.
    model : deblend.models.prob_unet.ProbUNet
    positions : ndarray, shape (N, 2), optional
        ``(x, y)`` of each source; default `source_positions`.
    mask : ndarray of bool, shape (ny, nx), optional
        Bad pixels: never assigned to a source.
    n_samples : int, optional
        Samples per group.
    seed : int, optional
        Seed of the latent draws (group ``g`` uses ``seed + g``): the same
        inputs and seed give the same outputs.
    device : str, optional
    pad : int, optional
        Pixels around a group's segments that the refined masks may grow into.
    max_size : int, optional
        Groups whose cutout would exceed this many pixels on a side are left
        as they are (logged).
    save_samples : bool, optional
        Keep the sampled label maps (``n_samples`` full-size int32 maps).

    Returns
    -------
    Refinement
    """
    import torch

    labels = np.asarray(labels, dtype=np.int32)
    normalized = np.asarray(normalized, dtype=np.float32)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[np.newaxis]
    if normalized.shape != labels.shape or data.shape[1:] != labels.shape:
        raise ValueError(f"normalized {normalized.shape}, labels {labels.shape} and data {data.shape[1:]} "
                         "must have the same (ny, nx)")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    n = int(labels.max()) if labels.size else 0
    if positions is None:
        positions = source_positions(normalized, labels)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if len(positions) != n:
        raise ValueError(f"positions has {len(positions)} rows for {n} labels")
    bad = np.zeros(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    blend_id, n_blend = find_blend_groups(labels)
    out = labels.copy()
    uncertainty = np.zeros(labels.shape, np.float32)
    flux = np.full((n, data.shape[0], n_samples), np.nan)
    refined = np.zeros(n, bool)
    samples = np.repeat(labels[None], n_samples, axis=0) if save_samples else None
    multiple = 2 ** (model.depth - 1)
    model.eval().to(device)
    for gid in range(1, int(blend_id.max(initial=0)) + 1):
        members = np.flatnonzero(blend_id == gid) + 1
        y0, x0, h, w = _canvas(members, labels, pad=pad, multiple=multiple)
        if max(h, w) > max_size:
            log.info("blend group %d (%d sources) spans %dx%d px > max_size=%d; not refined",
                     gid, len(members), w, h, max_size)
            continue
        lab = _crop(out, y0, x0, h, w)  # earlier groups may have grown into this cutout
        inside = _crop(np.ones(labels.shape, bool), y0, x0, h, w)
        allowed = inside & ~_crop(bad, y0, x0, h, w) & ((lab == 0) | np.isin(lab, members))
        img = _crop(normalized, y0, x0, h, w)
        local = positions - (x0, y0)
        near = np.flatnonzero((local[:, 0] > -8) & (local[:, 0] < w + 8) & (local[:, 1] > -8) & (local[:, 1] < h + 8))
        x = np.stack([refine_input(img, local[k - 1], local[[j for j in near if j != k - 1]]) for k in members])
        probs = model.sample(torch.from_numpy(x).to(device), n_samples=n_samples, seed=seed + gid)
        probs = probs.cpu().numpy() * allowed  # (K, S, h, w)
        best = probs.argmax(axis=0)
        owner = np.where(probs.max(axis=0) > 0.5, members[best], 0)  # (S, h, w)
        mean = probs.mean(axis=1)
        final = np.where(mean.max(axis=0) > 0.5, members[mean.argmax(axis=0)], 0)
        if not np.isin(members, final).all():  # never lose a source: keep the detector's masks
            log.debug("blend group %d: the U-Net gives a member no pixel; its detector masks are kept", gid)
            continue
        region = (slice(max(y0, 0), y0 + h), slice(max(x0, 0), x0 + w))
        crop_region = (slice(max(y0, 0) - y0, max(y0, 0) - y0 + out[region].shape[0]),
                       slice(max(x0, 0) - x0, max(x0, 0) - x0 + out[region].shape[1]))
        sub_allowed = allowed[crop_region]
        out[region][sub_allowed] = final[crop_region][sub_allowed]
        unc = (owner != final[None]).mean(axis=0).astype(np.float32)
        np.maximum(uncertainty[region], np.where(sub_allowed, unc[crop_region], 0), out=uncertainty[region])
        d = _crop(data, y0, x0, h, w)
        for k in members:
            sel = owner == k  # (S, h, w)
            flux[k - 1] = np.einsum("bhw,shw->bs", d.astype(np.float64), sel.astype(np.float64))
        refined[members - 1] = True
        if samples is not None:
            for s in range(n_samples):
                samples[s][region][sub_allowed] = owner[s][crop_region][sub_allowed]
    log.debug("refined %d of %d sources in %d groups", int(refined.sum()), n, int(blend_id.max(initial=0)))
    return Refinement(labels=out, uncertainty=uncertainty, blend_id=blend_id, n_blend=n_blend,
                      flux_samples=flux, refined=refined, samples=samples)
