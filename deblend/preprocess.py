"""Background and noise estimation, the detection image, and normalisation.

The networks see the detection image in units of its noise σ, compressed by
an asinh stretch (`normalize`); the classical methods see the
background-subtracted detection image and its σ map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import sep
from astropy.stats import sigma_clipped_stats

from deblend.io import Image

__all__ = ["Background", "Prepared", "estimate_background", "detection_image", "normalize", "prepare"]

log = logging.getLogger(__name__)

# Below this many pixels per axis a 2-D background mesh is meaningless: use one sigma-clipped level.
_MIN_MESH_PIXELS = 16


@dataclass
class Background:
    """Background level and noise σ maps, one plane per band.

    Attributes
    ----------
    level : ndarray of float32, shape (n_bands, ny, nx)
    rms : ndarray of float32, shape (n_bands, ny, nx)
        Per-pixel noise σ (from the variance plane when the input has one).
    global_rms : ndarray of float, shape (n_bands,)
        One representative σ per band.
    """

    level: np.ndarray
    rms: np.ndarray
    global_rms: np.ndarray


@dataclass
class Prepared:
    """An image ready for detection.

    Attributes
    ----------
    data : ndarray of float32, shape (n_bands, ny, nx)
        Background-subtracted pixels (masked pixels are 0).
    background : Background
    detection : ndarray of float32, shape (ny, nx)
        Inverse-variance weighted mean of the background-subtracted bands.
    detection_rms : ndarray of float32, shape (ny, nx)
        Noise σ of ``detection``.
    mask : ndarray of bool, shape (ny, nx)
    """

    data: np.ndarray
    background: Background
    detection: np.ndarray
    detection_rms: np.ndarray
    mask: np.ndarray

    def normalized(self, *, softening=1.0):
        """The detection image as the networks see it (see `normalize`)."""
        return normalize(self.detection, self.detection_rms, mask=self.mask, softening=softening)


def _global_background(band, mask):
    good = band[~mask]
    mean, median, std = sigma_clipped_stats(good, sigma=3.0, maxiters=5)
    if not np.isfinite(std) or std <= 0:
        std = float(np.std(good)) if good.size > 1 else 0.0
    return float(median), float(std)


def _mesh_usable(bad, bw, bh):
    """Whether any SEP mesh box has at least half of its pixels unmasked.

    When none has, SEP silently returns a background of 0 and a σ of 1 everywhere.
    """
    ny, nx = bad.shape
    return any((~bad[y:y + bh, x:x + bw]).mean() >= 0.5 for y in range(0, ny, bh) for x in range(0, nx, bw))


def estimate_background(image, *, box_size=64, filter_size=3, mask=None):
    """Estimate background level and noise σ maps for every band.

    SEP's SExtractor-style mesh estimator (sigma-clipped mode in boxes,
    median-filtered and spline-interpolated); a single sigma-clipped level for
    images too small for a mesh. σ is measured the same way on the image
    minus that level, so that a sky gradient does not count as noise (one of
    0.3 of the sky across a 256-pixel image spreads each 64-pixel box by
    several σ). When the image carries a variance plane, its square root is
    used as σ.

    Parameters
    ----------
    image : Image or ndarray of shape (ny, nx) or (n_bands, ny, nx)
        The image. Arrays are wrapped with `Image.from_array`.
    box_size : int, optional
        Mesh box size in pixels (``BACK_SIZE``); clipped to the image size.
    filter_size : int, optional
        Median filter size in boxes (``BACK_FILTERSIZE``).
    mask : ndarray of bool, shape (ny, nx), optional
        Extra pixels to ignore (True = ignore), e.g. detected sources.

    Returns
    -------
    Background

    Raises
    ------
    ValueError
        If ``box_size`` or ``filter_size`` is not a positive integer.
    """
    if int(box_size) != box_size or box_size < 1:
        raise ValueError(f"box_size must be a positive integer, got {box_size!r}")
    if int(filter_size) != filter_size or filter_size < 1:
        raise ValueError(f"filter_size must be a positive integer, got {filter_size!r}")
    if not isinstance(image, Image):
        image = Image.from_array(image)
    bad = image.mask if mask is None else (image.mask | np.asarray(mask, dtype=bool))
    if bad.all():  # an extra mask may cover everything: fall back to the image's own
        bad = image.mask
    ny, nx = image.shape
    level = np.empty_like(image.data)
    rms = np.empty_like(image.data)
    global_rms = np.empty(image.n_bands)
    bw, bh = min(int(box_size), nx), min(int(box_size), ny)
    use_mesh = (min(ny, nx) >= _MIN_MESH_PIXELS and (~bad).sum() >= 4 * _MIN_MESH_PIXELS
                and _mesh_usable(bad, bw, bh))  # e.g. a mask over most of the image leaves no usable box
    for b in range(image.n_bands):
        band = image.data[b]
        if not use_mesh:
            med, std = _global_background(band, bad)
            level[b], rms[b] = med, std
        else:
            mesh = {"bw": bw, "bh": bh, "fw": int(filter_size), "fh": int(filter_size)}
            first = sep.Background(band, mask=bad, **mesh)
            level[b] = first.back()
            # σ from what the level leaves: a sky gradient across a box would add to its scatter
            with np.errstate(over="ignore", invalid="ignore"):
                residual = np.ascontiguousarray(band - level[b], dtype=np.float32)
            skip = bad | ~np.isfinite(residual)  # values near the float32 limit overflow
            residual[skip] = 0.0
            rms[b] = (sep.Background(residual, mask=skip, **mesh).rms() if _mesh_usable(skip, bw, bh)
                      else first.rms())
        if image.variance is not None:
            rms[b] = np.sqrt(image.variance[b])
        good_rms = rms[b][~bad & (rms[b] > 0)]
        global_rms[b] = float(np.median(good_rms)) if good_rms.size else 0.0
        # a zero σ (constant image, masked pixels) would divide by zero downstream
        floor = global_rms[b] if global_rms[b] > 0 else 1.0
        rms[b] = np.where(rms[b] > 0, rms[b], floor)
        if global_rms[b] <= 0:
            global_rms[b] = floor
            log.warning("%s band %d: noise σ is 0 (constant image?); using σ = 1", image.path, b)
    return Background(level=level, rms=rms, global_rms=global_rms)


def detection_image(data, rms, *, mask=None):
    """Combine background-subtracted bands into one inverse-variance weighted image.

    Parameters
    ----------
    data : ndarray, shape (n_bands, ny, nx) or (ny, nx)
        Background-subtracted bands.
    rms : ndarray, same shape as ``data``
        Noise σ per pixel and band (> 0).
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels set to 0 in the output.

    Returns
    -------
    detection : ndarray of float32, shape (ny, nx)
        ``sum(w_b d_b) / sum(w_b)`` with ``w_b = 1 / σ_b²``.
    detection_rms : ndarray of float32, shape (ny, nx)
        ``1 / sqrt(sum(w_b))``.
    """
    data = np.asarray(data, dtype=np.float32)
    rms = np.asarray(rms, dtype=np.float32)
    if data.ndim == 2:
        data, rms = data[np.newaxis], rms[np.newaxis]
    if data.shape != rms.shape:
        raise ValueError(f"rms shape {rms.shape} must equal data shape {data.shape}")
    weight = 1.0 / np.square(rms, dtype=np.float64)
    total = weight.sum(axis=0)
    detection = ((weight * data).sum(axis=0) / total).astype(np.float32)
    detection_rms = (1.0 / np.sqrt(total)).astype(np.float32)
    if mask is not None:
        detection[mask] = 0.0
    return detection, detection_rms


def normalize(image, sigma, *, mask=None, softening=1.0):
    """Express an image in units of its noise and compress it with asinh.

    ``out = arcsinh(image / (softening * sigma))``: linear (≈ S/N) for faint
    pixels, logarithmic for bright cores, so one network sees sources from
    S/N 3 to 10⁵ on a similar scale, whatever the survey's units.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image.
    sigma : float or ndarray, shape (ny, nx)
        Noise σ (> 0).
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels set to 0.
    softening : float, optional
        Where the stretch turns from linear to logarithmic, in units of σ.

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    if softening <= 0:
        raise ValueError(f"softening must be positive, got {softening!r}")
    sigma = np.asarray(sigma, dtype=np.float32)
    if np.any(sigma <= 0):
        raise ValueError("sigma must be positive everywhere; estimate it with estimate_background")
    out = np.arcsinh(np.asarray(image, dtype=np.float32) / (softening * sigma)).astype(np.float32)
    if mask is not None:
        out[mask] = 0.0
    return out


def prepare(image, *, box_size=64, filter_size=3):
    """Subtract the background and build the detection image.

    Parameters
    ----------
    image : Image
        From `deblend.io.read_image` or `Image.from_array`.
    box_size, filter_size : int, optional
        Passed to `estimate_background`.

    Returns
    -------
    Prepared
    """
    background = estimate_background(image, box_size=box_size, filter_size=filter_size)
    with np.errstate(over="ignore", invalid="ignore"):
        data = image.data - background.level
    # values near the float32 limit (~3.4e38) can overflow here: mask them, never pass inf on
    overflow = ~np.isfinite(data).all(axis=0) & ~image.mask
    mask = image.mask
    if overflow.any():
        log.warning("%s: %d pixels overflow float32 after background subtraction; masked",
                    image.path, int(overflow.sum()))
        mask = image.mask | overflow
    data[:, mask] = 0.0
    detection, detection_rms = detection_image(data, background.rms, mask=mask)
    return Prepared(data=data, background=background, detection=detection,
                    detection_rms=detection_rms, mask=mask)
