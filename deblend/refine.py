"""Blend refinement: the probabilistic U-Net re-segments every blend group.

Mask R-CNN gives one answer per source; in a blend several are plausible.
For each *blend group* (detections whose footprints touch), the
probabilistic U-Net (`deblend.models.prob_unet`) is run once per member on a
window centred on it (`CUTOUT` pixels, as in training), with the member
marked by a heat map at its position and the other detections marked in a
second heat map, and draws ``n_samples`` masks per member; the windows of
all groups are batched. Per sample, each pixel goes to the member
that claims it most (if any claims it with probability above
``claim_threshold``, default 0.5): a joint assignment. The final labels come
from the mean probabilities in the same way. The pipeline takes the threshold
from the network's model card (``calibration.claim_threshold``: an operating
point chosen on simulated calibration scenes by pipelines/benchmark_refine.py).
Outputs: the refined label map, a per-pixel uncertainty (fraction of samples
whose label differs from the final one), and each member's flux in every
sample, whose spread is the segmentation-induced flux error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["CUTOUT", "HEATMAP_SIGMA", "CLAIM_THRESHOLD", "check_claim_threshold", "heatmap", "refine_input",
           "source_positions", "find_blend_groups", "Refinement", "refine_blends"]

log = logging.getLogger(__name__)

#: Side of the square cutouts the U-Net is trained on (pixels, multiple of 8).
CUTOUT = 64
#: Gaussian sigma (pixels) of the heat maps marking sources.
HEATMAP_SIGMA = 1.5
#: Default claim a pixel needs to be a member's (in a sample, or in the final map from the mean).
CLAIM_THRESHOLD = 0.5


def check_claim_threshold(value):
    """Return ``value`` as a float in [0, 1), or raise ValueError naming ``claim_threshold``."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0 <= threshold < 1:
        raise ValueError(f"claim_threshold must be a number in [0, 1) (the default is {CLAIM_THRESHOLD}, or the "
                         f"model card's calibration.claim_threshold), got {value!r}")
    return threshold


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
    reach = int(np.ceil(4 * sigma))
    for x, y in positions:  # each Gaussian only where it exceeds exp(-8): a small box around it
        ya, yb = max(int(np.floor(y)) - reach, 0), min(int(np.ceil(y)) + reach + 1, shape[0])
        xa, xb = max(int(np.floor(x)) - reach, 0), min(int(np.ceil(x)) + reach + 1, shape[1])
        if ya >= yb or xa >= xb:
            continue
        gy = np.exp(-((np.arange(ya, yb) - y) ** 2) / (2 * sigma**2))
        gx = np.exp(-((np.arange(xa, xb) - x) ** 2) / (2 * sigma**2))
        np.maximum(out[ya:yb, xa:xb], np.outer(gy, gx).astype(np.float32), out=out[ya:yb, xa:xb])
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

    On a plateau the first pixel in C order is the peak; a label without pixels gets ``(0, 0)``.

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
    # ndimage.maximum_position, label by label inside each segment's box (it sorts every pixel
    # of the image instead); ties go to the first pixel in C order.
    out = np.zeros((n, 2))
    for k, box in enumerate(ndimage.find_objects(labels, max_label=n)):
        if box is None:  # no pixel: (0, 0)
            continue
        values = np.where(labels[box] == k + 1, image[box], -np.inf)
        y, x = np.unravel_index(np.argmax(values), values.shape)
        out[k] = (x + box[1].start, y + box[0].start)
    return out


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


def _crop(array, y0, x0, h, w):
    """``array[..., y0:y0+h, x0:x0+w]`` with zero padding outside the image."""
    ny, nx = array.shape[-2:]
    out = np.zeros((*array.shape[:-2], h, w), dtype=array.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    if ya < yb and xa < xb:
        out[..., ya - y0:yb - y0, xa - x0:xb - x0] = array[..., ya:yb, xa:xb]
    return out


def _windows(positions, boxes, *, pad, multiple):
    """Square window ``(y0, x0, size)`` per source: CUTOUT wide, wider if its segment reaches further.

    Centred on the source's position, so the U-Net sees it as in training; a segment
    reaching more than ``CUTOUT / 2 - pad`` pixels from the position gets a window that
    holds it and ``pad`` more pixels, rounded up to ``multiple``.
    """
    out = []
    for (x, y), box in zip(positions, boxes, strict=True):
        cy, cx = int(round(y)), int(round(x))
        reach = max(cy - box[0].start, box[0].stop - 1 - cy, cx - box[1].start, box[1].stop - 1 - cx) + pad
        size = max(CUTOUT, -(-(2 * reach + 2) // multiple) * multiple)
        out.append((cy - size // 2, cx - size // 2, size))
    return out


@dataclass
class _Group:
    gid: int
    members: np.ndarray  # labels 1..N
    windows: list  # (y0, x0, size) per member
    inputs: list | None = None  # (3, size, size) per member
    where: list | None = None  # (size, size) bool per member: pixels the member may get
    probs: list | None = None  # (n_samples, size, size) per member


# Windows per U-Net call are padded (with empty windows) to 1, 2, 4 or a multiple of this.
BATCH_BUCKET = 8


def _padded_batch(n):
    """How many windows a call with ``n`` windows is padded to: at most 7 per call, at most 2x for small calls."""
    if n <= BATCH_BUCKET:
        return 1 << (n - 1).bit_length()
    return -(-n // BATCH_BUCKET) * BATCH_BUCKET


def _run_model(model, groups, *, n_samples, seed, device, batch_size, half=False):
    """Draw every pending member's samples, batching windows of equal size across groups."""
    import torch

    from deblend.models.precision import autocast

    items = [(g, j) for g in groups for j in range(len(g.members))]
    latent = int(getattr(model, "latent_dim", 0))
    noise = {}
    for g in groups:  # one generator per group: the draws do not depend on the batching
        gen = torch.Generator().manual_seed(int(seed) + g.gid)
        noise[g.gid] = torch.randn((n_samples, len(g.members), latent), generator=gen)
        g.probs = [None] * len(g.members)
    by_size = {}
    for g, j in items:
        by_size.setdefault(g.windows[j][2], []).append((g, j))
    for size_items in by_size.values():
        for start in range(0, len(size_items), batch_size):
            chunk = size_items[start:start + batch_size]
            # Padded with empty windows (`_padded_batch`): fewer distinct shapes for the CPU backends to
            # keep state for (see deblend.segment.ROI_BUCKET). They cost no head pixels.
            n_pad = _padded_batch(len(chunk)) - len(chunk)
            inputs = [g.inputs[j] for g, j in chunk]
            x = torch.from_numpy(np.stack(inputs + [np.zeros_like(inputs[0])] * n_pad)).to(device)
            x = x.contiguous(memory_format=torch.channels_last)  # as the weights (deblend.pipeline)
            eps = torch.stack([noise[g.gid][:, j] for g, j in chunk], dim=1)
            eps = torch.cat([eps, eps.new_zeros((eps.shape[0], n_pad, eps.shape[2]))], dim=1)
            where = np.stack([g.where[j] for g, j in chunk])
            where = np.concatenate([where, np.zeros((n_pad, *where.shape[1:]), bool)])
            with autocast(device, half):
                probs = model.sample(x, n_samples=n_samples, seed=seed, noise=eps,
                                     where=torch.from_numpy(where).to(device))
            probs = probs.float().cpu().numpy()[:len(chunk)]
            probs *= where[:len(chunk), None]  # whatever the model returns elsewhere
            for (g, j), p in zip(chunk, probs, strict=True):
                g.probs[j] = p


def refine_blends(normalized, labels, data, *, model, positions=None, mask=None, n_samples=16, seed=0,
                  device="cpu", pad=8, max_size=2 * CUTOUT, batch_size=32, save_samples=False,
                  claim_threshold=CLAIM_THRESHOLD, half=False):
    """Re-segment every blend group with the probabilistic U-Net.

    Each member is seen through its own window (`CUTOUT` pixels, centred on it, as
    in training; wider for a segment that reaches further); windows of equal size
    from all groups go through the network together.

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
        inputs and seed give the same outputs, whatever ``batch_size``.
    device : str, optional
    pad : int, optional
        Pixels around a member's segment that its refined mask may grow into.
    max_size : int, optional
        Groups with a member whose window would exceed this many pixels on a
        side are left as they are (logged). The default, twice the training
        cutouts' side, keeps large galaxies (from `deblend.coarse`) away from
        a network that never saw one: it cuts them into pieces.
    batch_size : int, optional
        Windows per forward pass.
    save_samples : bool, optional
        Keep the sampled label maps (``n_samples`` full-size int32 maps).
    claim_threshold : float, optional
        A pixel goes to the member claiming it most only if that claim (the
        sample's probability, or the mean over samples for the final map)
        exceeds this; in [0, 1).
    half : bool, optional
        Run the U-Net in float16 (`deblend.models.precision`); CUDA devices only.

    Returns
    -------
    Refinement
    """
    from scipy import ndimage

    from deblend.models.precision import check_half

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
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    threshold = check_claim_threshold(claim_threshold)
    half = check_half(half, device)
    n = int(labels.max()) if labels.size else 0
    if positions is None:
        positions = source_positions(normalized, labels)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if len(positions) != n:
        raise ValueError(f"positions has {len(positions)} rows for {n} labels")
    bad = np.zeros(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    blend_id, n_blend = find_blend_groups(labels)
    state = _State(labels, bad, data, n_samples, save_samples, threshold)
    n_groups = int(blend_id.max(initial=0))
    if n_groups:
        model.eval().to(device)
        multiple = 2 ** (model.depth - 1)
        boxes = ndimage.find_objects(labels, max_label=n)
        windows = _windows(positions, boxes, pad=pad, multiple=multiple)
        order = np.argsort(blend_id, kind="stable")  # labels of each group, without a pass per group
        starts = np.searchsorted(blend_id[order], np.arange(1, n_groups + 2))

        def flush(pending):
            _run_model(model, pending, n_samples=n_samples, seed=seed, device=device, batch_size=batch_size,
                       half=half)
            for g in pending:  # in group order: a group may only take pixels earlier ones left free
                state.assign(g)

        pending = []
        for gid in range(1, n_groups + 1):
            members = order[starts[gid - 1]:starts[gid]] + 1
            group = _Group(gid, members, [windows[k - 1] for k in members])
            widest = max(size for _, _, size in group.windows)
            if widest > max_size:
                log.info("blend group %d (%d sources) has a member needing a %d px window > max_size=%d; "
                         "not refined", gid, len(members), widest, max_size)
                continue
            group.inputs = [_member_input(normalized, positions, k, group.windows[j])
                            for j, k in enumerate(members)]
            group.where = [_member_pixels(labels, bad, members, k, window, pad=pad)
                           for k, window in zip(members, group.windows, strict=True)]
            pending.append(group)
            if sum(len(g.members) for g in pending) >= batch_size:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
    log.debug("refined %d of %d sources in %d groups", int(state.refined.sum()), n, n_groups)
    return Refinement(labels=state.out, uncertainty=state.uncertainty, blend_id=blend_id, n_blend=n_blend,
                      flux_samples=state.flux, refined=state.refined, samples=state.samples)


def _member_input(normalized, positions, k, window):
    """The U-Net input for source ``k`` (1-based) in its window: image, its heat map, the others' heat map."""
    y0, x0, size = window
    local = positions - (x0, y0)
    near = (local[:, 0] > -8) & (local[:, 0] < size + 8) & (local[:, 1] > -8) & (local[:, 1] < size + 8)
    near[k - 1] = False
    return refine_input(_crop(normalized, y0, x0, size, size), local[k - 1], local[near])


def _member_pixels(labels, bad, members, k, window, *, pad):
    """Pixels of member ``k``'s window it may be given.

    Those within ``pad`` pixels (a square) of its detector segment, in the image,
    not flagged, and not another group's: the network's answer is only needed there.
    """
    from scipy import ndimage

    y0, x0, size = window
    lab = _crop(labels, y0, x0, size, size)
    ny, nx = labels.shape
    yy, xx = np.arange(y0, y0 + size)[:, None], np.arange(x0, x0 + size)[None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    own = lab == k
    near = ndimage.maximum_filter(own, size=2 * pad + 1) if pad > 0 else own
    return near & inside & ~_crop(bad, y0, x0, size, size) & ((lab == 0) | np.isin(lab, members))


class _State:
    """The refined maps, filled group by group."""

    def __init__(self, labels, bad, data, n_samples, save_samples, claim_threshold):
        n = int(labels.max()) if labels.size else 0
        self.claim_threshold = claim_threshold
        self.labels, self.bad, self.data, self.n_samples = labels, bad, data, n_samples
        self.out = labels.copy()
        self.uncertainty = np.zeros(labels.shape, np.float32)
        self.flux = np.full((n, data.shape[0], n_samples), np.nan)
        self.refined = np.zeros(n, bool)
        self.samples = np.repeat(labels[None], n_samples, axis=0) if save_samples else None

    def assign(self, group):
        """Joint assignment of one group's samples and mean; written unless a member would lose every pixel."""
        members, windows = group.members, group.windows
        y0 = min(w[0] for w in windows)
        x0 = min(w[1] for w in windows)
        h = max(w[0] + w[2] for w in windows) - y0
        w_ = max(w[1] + w[2] for w in windows) - x0
        lab = _crop(self.out, y0, x0, h, w_)  # earlier groups may have grown into this region
        ny, nx = self.labels.shape
        yy, xx = np.arange(y0, y0 + h)[:, None], np.arange(x0, x0 + w_)[None, :]
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        allowed = inside & ~_crop(self.bad, y0, x0, h, w_) & ((lab == 0) | np.isin(lab, members))
        best = np.zeros((self.n_samples, h, w_), np.float32)  # highest claim per sample and pixel
        owner = np.zeros((self.n_samples, h, w_), np.int32)
        best_mean = np.zeros((h, w_), np.float32)
        final = np.zeros((h, w_), np.int32)
        for k, (wy, wx, size), p in zip(members, windows, group.probs, strict=True):
            sl = (slice(wy - y0, wy - y0 + size), slice(wx - x0, wx - x0 + size))
            p = p * allowed[sl]
            wins = p > best[(slice(None), *sl)]
            best[(slice(None), *sl)][wins] = p[wins]
            owner[(slice(None), *sl)][wins] = k
            m = p.mean(axis=0)
            wins = m > best_mean[sl]
            best_mean[sl][wins] = m[wins]
            final[sl][wins] = k
        owner[best <= self.claim_threshold] = 0
        final[best_mean <= self.claim_threshold] = 0
        if not np.isin(members, final).all():  # never lose a source: keep the detector's masks
            log.debug("blend group %d: the U-Net gives a member no pixel; its detector masks are kept", group.gid)
            return
        region = (slice(max(y0, 0), min(y0 + h, ny)), slice(max(x0, 0), min(x0 + w_, nx)))
        local = (slice(region[0].start - y0, region[0].stop - y0), slice(region[1].start - x0, region[1].stop - x0))
        sub_allowed = allowed[local]
        self.out[region][sub_allowed] = final[local][sub_allowed]
        unc = (owner != final[None]).mean(axis=0).astype(np.float32)
        np.maximum(self.uncertainty[region], np.where(sub_allowed, unc[local], 0), out=self.uncertainty[region])
        d = self.data[(slice(None), *region)].astype(np.float64)
        for k in members:
            sel = (owner[(slice(None), *local)] == k).astype(np.float64)  # (S, h, w)
            self.flux[k - 1] = np.einsum("bhw,shw->bs", d, sel)
        self.refined[members - 1] = True
        if self.samples is not None:
            for s in range(self.n_samples):
                self.samples[s][region][sub_allowed] = owner[s][local][sub_allowed]
        group.probs = None  # free the samples
