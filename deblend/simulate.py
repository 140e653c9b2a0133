"""Seeded GalSim scenes of blended galaxies and stars, with exact ground truth.

A scene is a noisy image (sky with a gentle gradient, Gaussian pixel noise)
of PSF-convolved bulge+disk galaxies, knotty irregular galaxies and stars,
part of them placed as close pairs, together with the truth the rest of
deblend trains and evaluates on:

* ``truth_seg``: the truth convention of DESIGN.md. Each source's noiseless,
  PSF-convolved image is drawn on its own; a pixel belongs to the source that
  contributes most to it, if that contribution is at least 1 sigma of the
  pixel noise (``noise_sigma``), otherwise it is background (0). A source is
  *blended* when its >=1 sigma footprint (the pixels where its own image is
  >= ``noise_sigma``) shares at least one pixel with another source's.
* ``truth``: one row per source, ``id`` 1..N equal to its label in
  ``truth_seg``.

Which sources are in a scene
----------------------------
Source parameters are drawn first (positions, types, fluxes from a power law,
sizes, shapes, companions). A drawn source is then kept only if

1. its SNR is at least ``SceneConfig.min_snr``, and
2. it owns at least one pixel under the truth convention.

The others are removed *before* the image is summed: they are neither drawn
nor listed. So the image holds exactly the truth sources (image = sky + sum of
truth sources + noise), ids are consecutive, and every truth row has a
non-empty footprint in ``truth_seg``. Removing a source that owns no pixel
never changes which pixels the others own, so one pass suffices.

SNR is the matched-filter SNR of the noiseless source over the image,
``sqrt(sum(model**2)) / noise_sigma``. Evaluations that want a stricter cut
select truth rows on the ``snr`` column.

Multi-band scenes (``n_bands > 1``) share each source's morphology across
bands and give it a random colour (per-band flux factors with mean 1). The
*detection band* used for ``source_images``, ``truth_seg``, ``snr`` and the
``flux`` column is the band mean, thresholded (conservatively) at the
per-band ``noise_sigma``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import astropy.units as u
import galsim
import numpy as np
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS
from scipy.optimize import brentq
from scipy.special import gammainc

from deblend._version import __version__
from deblend.exceptions import InputError
from deblend.io import (
    read_catalog,
    read_image,
    read_segmentation,
    write_catalog,
    write_image,
    write_segmentation,
)

__all__ = [
    "SceneConfig",
    "Scene",
    "simulate_scene",
    "truth_segmentation",
    "scene_seed",
    "write_scene",
    "read_truth",
    "simulate_directory",
]

log = logging.getLogger(__name__)

#: Sky position of the image centre in the header's TAN WCS (deg; the COSMOS field).
WCS_CENTER = (150.1, 2.2)

# Loosened from GalSim's defaults (5e-3, 1e-3): ~2x faster, flux errors well below 1%.
_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=2e-3)
# The de Vaucouleurs bulge is truncated at this many half-light radii (its flux is kept).
_BULGE_TRUNC = 8.0
_SIMULATOR = "deblend.simulate"


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_seed(seed, name="seed"):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}; pass e.g. {name}=0")
    return int(seed)


@dataclass
class SceneConfig:
    """What a simulated scene looks like.

    Parameters
    ----------
    shape : tuple of int, optional
        Image shape ``(ny, nx)`` in pixels, each at least 8.
    pixel_scale : float, optional
        Arcseconds per pixel.
    psf_fwhm : float, optional
        FWHM of the Moffat PSF, in arcseconds.
    psf_beta : float, optional
        Moffat ``beta`` (> 1.1).
    noise_sigma : float, optional
        Standard deviation of the Gaussian pixel noise, in image units
        (counts); constant over the image. Also the 1 sigma threshold of the
        truth convention.
    noise_correlation : float, optional
        Gaussian sigma, in pixels, of the noise's correlation between
        neighbouring pixels, as in co-added, resampled or PSF-matched images
        (the white noise is smoothed by this Gaussian, then rescaled so each
        pixel keeps ``noise_sigma``). 0 (the default) gives white noise. The
        truth convention and ``snr`` still use the per-pixel ``noise_sigma``.
    sky_level : float, optional
        Mean sky added to the image (counts per pixel), so that background
        subtraction matters.
    sky_gradient : float, optional
        Total fractional change of the sky across the image, as a linear
        gradient in a random direction (0 to 1): the sky runs from
        ``sky_level * (1 - sky_gradient / 2)`` to ``sky_level * (1 + sky_gradient / 2)``.
    density : float, optional
        Expected number of drawn sources (primaries and companions, before the
        ``min_snr`` cut) per square arcminute. The default gives about 27
        drawn and 19 kept (13-26) sources in a 128 x 128 scene at 0.2 arcsec/pixel.
    star_fraction : float, optional
        Fraction of sources that are stars (PSF only).
    blend_fraction : float, optional
        Fraction of primaries that get a close companion, at a separation
        uniform in 0.3-3 times the primary's apparent size
        ``sqrt(psf_fwhm**2 + (1.5 * r_half)**2)`` and with a flux 0.1-1 times
        the primary's.
    min_snr : float, optional
        Sources with a truth SNR below this are not part of the scene at all
        (neither drawn nor listed); see the module docstring.
    irregular_fraction : float, optional
        Fraction of galaxies that are irregular (an exponential disk plus
        ``galsim.RandomKnots`` star-forming knots) instead of bulge+disk.
    n_bands : int, optional
        Number of bands. With more than one, the image is
        ``(n_bands, ny, nx)`` and each source has a random colour.
    flux_min, flux_max : float, optional
        Range of the primaries' total fluxes (image units).
    flux_slope : float, optional
        Power-law slope ``alpha`` of the cumulative flux distribution of the
        primaries, ``N(>F) ~ F**-alpha`` (many faint, few bright).
    r_half_range : tuple of float, optional
        Range of the disk half-light radius, in arcseconds (log-uniform).

    Raises
    ------
    ValueError
        If a parameter is out of range; the message names it and a fix.
    """

    shape: tuple = (128, 128)
    pixel_scale: float = 0.2
    psf_fwhm: float = 0.7
    psf_beta: float = 3.5
    noise_sigma: float = 1.0
    noise_correlation: float = 0.0
    sky_level: float = 100.0
    sky_gradient: float = 0.05
    density: float = 150.0
    star_fraction: float = 0.15
    blend_fraction: float = 0.4
    min_snr: float = 5.0
    irregular_fraction: float = 0.15
    n_bands: int = 1
    flux_min: float = 40.0
    flux_max: float = 3.0e4
    flux_slope: float = 0.8
    r_half_range: tuple = (0.15, 1.5)

    def __post_init__(self):
        shape = self.shape
        integers = all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape) \
            if isinstance(shape, (tuple, list)) else False
        if not integers or len(shape) != 2 or min(shape) < 8:
            raise ValueError(f"SceneConfig.shape must be two integers (ny, nx), each >= 8, "
                             f"got {shape!r}; use e.g. shape=(128, 128)")
        self.shape = (int(shape[0]), int(shape[1]))
        positive = {
            "pixel_scale": "arcsec per pixel, e.g. 0.2",
            "psf_fwhm": "arcsec, e.g. 0.7",
            "noise_sigma": "image units, e.g. 1.0",
            "flux_min": "image units, e.g. 40",
            "flux_slope": "e.g. 0.8",
        }
        for name, hint in positive.items():
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"SceneConfig.{name} must be a positive finite number, "
                                 f"got {value!r}; use {hint}")
        if not _is_number(self.psf_beta) or self.psf_beta <= 1.1:
            raise ValueError(f"SceneConfig.psf_beta must be a number > 1.1 (Moffat), "
                             f"got {self.psf_beta!r}; use e.g. 3.5")
        for name in ("sky_level", "density", "min_snr", "noise_correlation"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"SceneConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("sky_gradient", "star_fraction", "blend_fraction", "irregular_fraction"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"SceneConfig.{name} must be a fraction between 0 and 1, "
                                 f"got {value!r}")
        if isinstance(self.n_bands, bool) or not isinstance(self.n_bands, numbers.Integral) \
                or self.n_bands < 1:
            raise ValueError(f"SceneConfig.n_bands must be an integer >= 1, got {self.n_bands!r}; "
                             "use 1 for a single band")
        self.n_bands = int(self.n_bands)
        if not _is_number(self.flux_max) or self.flux_max <= self.flux_min:
            raise ValueError(f"SceneConfig.flux_max must be a finite number > flux_min "
                             f"({self.flux_min!r}), got {self.flux_max!r}")
        rr = self.r_half_range
        if (not isinstance(rr, (tuple, list)) or len(rr) != 2 or not all(_is_number(r) for r in rr)
                or not 0 < rr[0] <= rr[1]):
            raise ValueError(f"SceneConfig.r_half_range must be (min, max) in arcsec with "
                             f"0 < min <= max, got {rr!r}; use e.g. (0.15, 1.5)")
        self.r_half_range = (float(rr[0]), float(rr[1]))

    @property
    def band_names(self):
        """Names of the bands: ``('band0', 'band1', ...)``."""
        return tuple(f"band{i}" for i in range(self.n_bands))

    @property
    def area_arcmin2(self):
        """Sky area of the image in square arcminutes."""
        return self.shape[0] * self.shape[1] * (self.pixel_scale / 60.0) ** 2


@dataclass
class Scene:
    """A simulated image and its ground truth.

    Attributes
    ----------
    image : ndarray of float32, shape (ny, nx) or (n_bands, ny, nx)
        Sky + sources + noise.
    truth_seg : ndarray of int32, shape (ny, nx)
        Truth labels: 0 background, label = ``truth['id']``.
    truth : astropy.table.QTable
        One row per source. Columns: ``id``; ``x``, ``y`` (0-based pixel
        centre of the profile); ``flux`` (total noiseless drawn flux in the
        detection band, sky excluded, including any part off the image);
        ``flux_in_image``; ``flux_band<i>`` per band when ``n_bands > 1``;
        ``snr``; ``is_star``; ``blended``; ``kind`` (``'star'``,
        ``'bulge+disk'``, ``'irregular'``); ``r_half`` (intrinsic circularised
        half-light radius, arcsec, 0 for stars; the disk's for irregulars);
        ``q`` (axis ratio); ``pa`` (position angle of the major axis,
        counter-clockwise from +x, deg); ``bulge_fraction``;
        ``companion_of`` (id of the primary a companion was placed next to,
        0 otherwise); ``n_pixels`` (pixels owned in ``truth_seg``); ``ra``,
        ``dec`` (deg, from the header's WCS).
    source_images : ndarray of float32, shape (n_sources, ny, nx), or None
        Noiseless PSF-convolved image of each source in the detection band
        (row ``i`` is id ``i + 1``); None when not kept.
    config : SceneConfig
        The configuration the scene was drawn from.
    seed : int
        The seed; ``simulate_scene(config, seed=seed)`` reproduces the scene.
    header : astropy.io.fits.Header
        PIXSCALE, PSF_FWHM, PSF_BETA, NOISE, SKYLEVEL, SKYGRAD, SKYPA, SEED,
        NSOURCE, NBANDS, SIMULATR and a TAN WCS centred on `WCS_CENTER`.
    sky : ndarray of float32, shape (ny, nx), or None
        The noiseless sky model (the same in every band).
    """

    image: np.ndarray
    truth_seg: np.ndarray
    truth: QTable
    source_images: np.ndarray | None
    config: SceneConfig
    seed: int
    header: fits.Header = field(default_factory=fits.Header)
    sky: np.ndarray | None = None

    @property
    def n_sources(self):
        """Number of sources in the scene."""
        return len(self.truth)


def scene_seed(seed, index):
    """Seed of scene ``index`` of a set generated from ``seed``.

    Derived with `numpy.random.SeedSequence` from ``(seed, index)``, so that
    the scenes of a set are reproducible and statistically independent.

    Parameters
    ----------
    seed : int
        Seed of the whole set (>= 0).
    index : int
        Index of the scene in the set (>= 0).

    Returns
    -------
    int
        A non-negative seed below 2**63 (it fits a FITS header).
    """
    seed = _check_seed(seed)
    index = _check_seed(index, "index")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def truth_segmentation(source_images, noise_sigma):
    """Label pixels by the truth convention from per-source noiseless images.

    A pixel belongs to the source that contributes most to it (the first
    one on a tie), if that contribution is at least ``noise_sigma``;
    otherwise it is 0. A source is blended when the pixels where its own
    image is ``>= noise_sigma`` include one where another source's image is
    ``>= noise_sigma`` too.

    Parameters
    ----------
    source_images : array_like, shape (n_sources, ny, nx)
        Noiseless PSF-convolved image of each source.
    noise_sigma : float
        1 sigma of the pixel noise (> 0).

    Returns
    -------
    truth_seg : ndarray of int32, shape (ny, nx)
        Label ``i + 1`` for source ``i``. A source that owns no pixel is
        absent (`simulate_scene` removes such sources from its scenes).
    blended : ndarray of bool, shape (n_sources,)

    Raises
    ------
    ValueError
        If ``source_images`` is not 3-D or ``noise_sigma`` is not positive.
    """
    images = np.asarray(source_images)
    if images.ndim != 3:
        raise ValueError(f"source_images must be 3-D (n_sources, ny, nx), got shape "
                         f"{images.shape}; stack single images with np.stack")
    if not _is_number(noise_sigma) or noise_sigma <= 0:
        raise ValueError(f"noise_sigma must be a positive finite number, got {noise_sigma!r}")
    stamps = [(img, 0, 0) for img in images]
    seg, _ = _owners(stamps, images.shape[1:], noise_sigma)
    return seg, _blended(stamps, images.shape[1:], noise_sigma)


def _owners(stamps, shape, noise_sigma):
    """Truth labels (1-based stamp index) and each stamp's count of owned pixels."""
    best = np.zeros(shape, dtype=np.float32)
    owner = np.zeros(shape, dtype=np.int32)
    for label, (arr, y0, x0) in enumerate(stamps, start=1):
        sl = (slice(y0, y0 + arr.shape[0]), slice(x0, x0 + arr.shape[1]))
        b = best[sl]
        better = arr > b  # strict: the first source wins a tie, as np.argmax would
        b[better] = arr[better]
        owner[sl][better] = label
    seg = np.where(best >= np.float32(noise_sigma), owner, 0).astype(np.int32)
    n_owned = np.bincount(seg.ravel(), minlength=len(stamps) + 1)[1:]
    return seg, n_owned


def _blended(stamps, shape, noise_sigma):
    """Whether each stamp's >=1 sigma footprint shares a pixel with another's."""
    thresh = np.float32(noise_sigma)
    count = np.zeros(shape, dtype=np.int32)
    for arr, y0, x0 in stamps:
        count[y0:y0 + arr.shape[0], x0:x0 + arr.shape[1]] += arr >= thresh
    out = np.zeros(len(stamps), dtype=bool)
    for i, (arr, y0, x0) in enumerate(stamps):
        foot = arr >= thresh
        out[i] = bool((count[y0:y0 + arr.shape[0], x0:x0 + arr.shape[1]][foot] >= 2).any())
    return out


def _power_law(rng, lo, hi, alpha):
    """One draw from N(>F) ~ F**-alpha truncated to [lo, hi]."""
    ratio = (hi / lo) ** -alpha
    return lo * (1.0 - rng.random() * (1.0 - ratio)) ** (-1.0 / alpha)


def _source_params(rng, cfg, flux):
    """Draw type, size, shape and colour of one source of the given flux."""
    p = {"flux": flux, "r_half": 0.0, "r_disk": 0.0, "r_bulge": 0.0, "q": 1.0, "pa": 0.0,
         "bulge_fraction": 0.0, "knot_fraction": 0.0, "n_knots": 0, "knot_seed": 0}
    if rng.random() < cfg.star_fraction:
        p["kind"] = "star"
    else:
        lo, hi = cfg.r_half_range
        p["r_disk"] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        p["q"] = float(rng.uniform(0.25, 1.0))
        p["pa"] = float(rng.uniform(0.0, 180.0))
        if rng.random() < cfg.irregular_fraction:
            p["kind"] = "irregular"
            p["knot_fraction"] = float(rng.uniform(0.2, 0.6))
            p["n_knots"] = int(rng.integers(5, 31))
            p["knot_seed"] = int(rng.integers(1, 2**31 - 1))
            p["r_half"] = p["r_disk"]
        else:
            p["kind"] = "bulge+disk"
            p["bulge_fraction"] = float(rng.beta(1.0, 3.0))
            p["r_bulge"] = p["r_disk"] * float(rng.uniform(0.2, 0.6))
    if cfg.n_bands > 1:
        slope = rng.normal(0.0, 0.3)
        colour = np.exp(slope * (np.arange(cfg.n_bands) - (cfg.n_bands - 1) / 2)
                        + rng.normal(0.0, 0.1, cfg.n_bands))
        p["colour"] = colour / colour.mean()
    else:
        p["colour"] = np.ones(1)
    return p


def _draw_catalog(rng, cfg):
    """Draw the parameters of all candidate sources (primaries, then each one's companion)."""
    ny, nx = cfg.shape
    n_primary = rng.poisson(cfg.density * cfg.area_arcmin2 / (1.0 + cfg.blend_fraction))
    sources = []
    for _ in range(n_primary):
        x, y = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        flux = _power_law(rng, cfg.flux_min, cfg.flux_max, cfg.flux_slope)
        p = _source_params(rng, cfg, flux)
        index = len(sources)
        p.update(x=x, y=y, index=index, primary=-1)
        sources.append(p)
        if rng.random() >= cfg.blend_fraction:
            continue
        # apparent size: PSF and (roughly, flux-weighted) half-light radius in quadrature
        r_approx = (1 - p["bulge_fraction"]) * p["r_disk"] + p["bulge_fraction"] * p["r_bulge"]
        size = math.hypot(cfg.psf_fwhm, 1.5 * r_approx)
        sep = rng.uniform(0.3, 3.0) * size / cfg.pixel_scale
        angle = rng.uniform(0, 2 * np.pi)
        companion = _source_params(rng, cfg, flux * rng.uniform(0.1, 1.0))
        # Keep the companion's centre inside the image: try the opposite side, then new angles.
        for attempt in range(8):
            cx, cy = x + sep * np.cos(angle), y + sep * np.sin(angle)
            if 0 <= cx <= nx - 1 and 0 <= cy <= ny - 1:
                companion.update(x=cx, y=cy, index=len(sources), primary=index)
                sources.append(companion)
                break
            angle = angle + np.pi if attempt == 0 else rng.uniform(0, 2 * np.pi)
    return sources


def _enclosed(n, r0, trunc, r):
    """Fraction of a (truncated) Sersic profile's flux within radius ``r``."""
    total = 1.0 if trunc is None else gammainc(2 * n, (trunc / r0) ** (1.0 / n))
    rr = r if trunc is None else min(r, trunc)
    return gammainc(2 * n, (rr / r0) ** (1.0 / n)) / total


def _profile(p, psf):
    """Build the PSF-convolved GalSim profile of one source (total flux ``p['flux']``)."""
    if p["kind"] == "star":
        return psf.withFlux(p["flux"]), None
    disk = galsim.Exponential(half_light_radius=p["r_disk"], gsparams=_GSPARAMS)
    if p["kind"] == "irregular":
        knots = galsim.RandomKnots(p["n_knots"], half_light_radius=p["r_disk"], flux=1.0,
                                   rng=galsim.BaseDeviate(p["knot_seed"]), gsparams=_GSPARAMS)
        gal = galsim.Add([(1 - p["knot_fraction"]) * disk, p["knot_fraction"] * knots])
        r_half = p["r_disk"]
    else:
        bf = p["bulge_fraction"]
        bulge = galsim.DeVaucouleurs(half_light_radius=p["r_bulge"],
                                     trunc=_BULGE_TRUNC * p["r_bulge"], gsparams=_GSPARAMS)
        gal = galsim.Add([(1 - bf) * disk, bf * bulge])

        def excess(r):
            return ((1 - bf) * _enclosed(1, disk.scale_radius, None, r)
                    + bf * _enclosed(4, bulge.scale_radius, bulge.trunc, r) - 0.5)

        r_half = brentq(excess, 1e-4 * p["r_bulge"], 10 * p["r_disk"], xtol=1e-5)
    gal = gal.shear(q=p["q"], beta=p["pa"] * galsim.degrees).withFlux(p["flux"])
    return galsim.Convolve(gal, psf, gsparams=_GSPARAMS), float(r_half)


def _stamp_half_width(p, cfg):
    """Half-width (pixels) of a stamp holding all but a fraction of a percent of the flux."""
    psf_r = 3.0 * cfg.psf_fwhm
    stretch = 1.0 / math.sqrt(p["q"])  # semi-major axis / circularised radius
    r_gal = stretch * max(5.0 * p["r_disk"], _BULGE_TRUNC * p["r_bulge"])
    r = math.hypot(r_gal, psf_r)
    return int(math.ceil(r / cfg.pixel_scale))


def _draw_stamp(p, psf, cfg):
    """Draw one source; return its full stamp, the part inside the image and its offset."""
    ny, nx = cfg.shape
    obj, r_half = _profile(p, psf)
    if r_half is not None:
        p["r_half"] = r_half
    h = _stamp_half_width(p, cfg)
    ix, iy = int(round(p["x"])), int(round(p["y"]))
    stamp = galsim.ImageF(galsim.BoundsI(ix - h, ix + h, iy - h, iy + h), scale=cfg.pixel_scale)
    obj.drawImage(image=stamp, center=galsim.PositionD(p["x"], p["y"]), method="auto")
    full = stamp.array
    x0, y0 = max(ix - h, 0), max(iy - h, 0)
    x1, y1 = min(ix + h, nx - 1), min(iy + h, ny - 1)
    inside = full[y0 - (iy - h):y1 - (iy - h) + 1, x0 - (ix - h):x1 - (ix - h) + 1]
    return full, np.ascontiguousarray(inside), y0, x0


def _header(cfg, seed, n_sources, sky_angle):
    ny, nx = cfg.shape
    hdr = fits.Header()
    hdr["WCSAXES"] = 2
    hdr["CTYPE1"] = ("RA---TAN", "simple TAN projection")
    hdr["CTYPE2"] = "DEC--TAN"
    hdr["CRPIX1"] = ((nx + 1) / 2.0, "image centre (1-based)")
    hdr["CRPIX2"] = (ny + 1) / 2.0
    hdr["CRVAL1"] = WCS_CENTER[0]
    hdr["CRVAL2"] = WCS_CENTER[1]
    hdr["CDELT1"] = -cfg.pixel_scale / 3600.0
    hdr["CDELT2"] = cfg.pixel_scale / 3600.0
    hdr["CUNIT1"] = "deg"
    hdr["CUNIT2"] = "deg"
    hdr["RADESYS"] = "ICRS"
    hdr["PIXSCALE"] = (cfg.pixel_scale, "arcsec / pixel")
    hdr["PSF_FWHM"] = (cfg.psf_fwhm, "Moffat PSF FWHM (arcsec)")
    hdr["PSF_BETA"] = (cfg.psf_beta, "Moffat PSF beta")
    hdr["NOISE"] = (cfg.noise_sigma, "Gaussian pixel noise sigma (image units)")
    if cfg.noise_correlation > 0:
        hdr["NOISECOR"] = (cfg.noise_correlation, "noise correlation: Gaussian sigma (pixels)")
    hdr["SKYLEVEL"] = (cfg.sky_level, "mean sky (image units)")
    hdr["SKYGRAD"] = (cfg.sky_gradient, "fractional sky change across the image")
    hdr["SKYPA"] = (round(math.degrees(sky_angle), 6), "sky gradient direction (deg from +x)")
    hdr["MINSNR"] = (cfg.min_snr, "sources below this truth SNR are not drawn")
    hdr["SEED"] = (seed, "simulate_scene seed")
    hdr["NSOURCE"] = (n_sources, "number of truth sources")
    hdr["NBANDS"] = (cfg.n_bands, "number of bands")
    if cfg.n_bands > 1:
        for i, name in enumerate(cfg.band_names):
            hdr[f"BAND{i}"] = (name, f"name of band {i}")
    hdr["SIMULATR"] = (_SIMULATOR, "software that simulated this scene")
    hdr["DBVERS"] = (__version__, "deblend package version")
    return hdr


def simulate_scene(config=None, *, seed, keep_sources=True):
    """Simulate one seeded scene of blended galaxies and stars with its truth.

    Parameters
    ----------
    config : SceneConfig, optional
        What to simulate; default ``SceneConfig()``.
    seed : int
        Seed (>= 0). The same config and seed give byte-identical outputs.
    keep_sources : bool, optional
        Keep the per-source noiseless images in ``Scene.source_images``
        (``n_sources * ny * nx`` float32 values).

    Returns
    -------
    Scene

    Raises
    ------
    TypeError
        If ``config`` is not a `SceneConfig`.
    ValueError
        If ``seed`` is not a non-negative integer.

    Notes
    -----
    Drawing order from ``np.random.default_rng(seed)``: source parameters
    (GalSim's knot positions are seeded from it too), sky gradient direction,
    pixel noise. Each source is drawn by GalSim (PSF-convolved, pixel
    response included) into its own stamp of a few half-light radii plus
    3 PSF FWHM, then pasted into the image.
    """
    cfg = SceneConfig() if config is None else config
    if not isinstance(cfg, SceneConfig):
        raise TypeError(f"config must be a SceneConfig, got {type(cfg).__name__}; "
                        "build one with deblend.simulate.SceneConfig(...)")
    seed = _check_seed(seed)
    t0 = time.perf_counter()
    ny, nx = cfg.shape
    rng = np.random.default_rng(seed)
    psf = galsim.Moffat(beta=cfg.psf_beta, fwhm=cfg.psf_fwhm, gsparams=_GSPARAMS)

    candidates = _draw_catalog(rng, cfg)
    sky_angle = float(rng.uniform(0, 2 * np.pi))
    noise = rng.standard_normal((cfg.n_bands, ny, nx), dtype=np.float32)

    drawn = []
    for p in candidates:
        full, inside, y0, x0 = _draw_stamp(p, psf, cfg)
        snr = float(np.sqrt(np.sum(inside.astype(np.float64) ** 2)) / cfg.noise_sigma)
        if snr >= cfg.min_snr:
            p.update(snr=snr, flux_drawn=float(full.sum(dtype=np.float64)),
                     flux_in_image=float(inside.sum(dtype=np.float64)))
            drawn.append((p, (inside, y0, x0)))
    _, n_owned = _owners([s for _, s in drawn], cfg.shape, cfg.noise_sigma)
    kept = [d for d, n in zip(drawn, n_owned, strict=True) if n > 0]
    stamps = [s for _, s in kept]
    truth_seg, _ = _owners(stamps, cfg.shape, cfg.noise_sigma)
    blended = _blended(stamps, cfg.shape, cfg.noise_sigma)

    model = np.zeros((cfg.n_bands, ny, nx), dtype=np.float64)
    for p, (arr, y0, x0) in kept:
        sl = (slice(y0, y0 + arr.shape[0]), slice(x0, x0 + arr.shape[1]))
        model[(slice(None),) + sl] += p["colour"][:, None, None] * arr[None]
    yy, xx = np.mgrid[0:ny, 0:nx]
    ca, sa = math.cos(sky_angle), math.sin(sky_angle)
    span = (nx - 1) * abs(ca) + (ny - 1) * abs(sa)
    proj = ((xx - (nx - 1) / 2.0) * ca + (yy - (ny - 1) / 2.0) * sa) / span
    sky = cfg.sky_level * (1.0 + cfg.sky_gradient * proj)
    if cfg.noise_correlation > 0:
        noise = _correlate(noise, cfg.noise_correlation)
    image = (model + sky[None] + cfg.noise_sigma * noise.astype(np.float64)).astype(np.float32)
    if cfg.n_bands == 1:
        image = image[0]

    source_images = None
    if keep_sources:
        source_images = np.zeros((len(kept), ny, nx), dtype=np.float32)
        for i, (arr, y0, x0) in enumerate(stamps):
            source_images[i, y0:y0 + arr.shape[0], x0:x0 + arr.shape[1]] = arr

    header = _header(cfg, seed, len(kept), sky_angle)
    truth = _truth_table(kept, blended, truth_seg, cfg, header, seed)
    log.debug("scene seed=%d: %d candidates, %d sources (%d blended) in %.3f s", seed,
              len(candidates), len(kept), int(blended.sum()), time.perf_counter() - t0)
    return Scene(image=image, truth_seg=truth_seg, truth=truth, source_images=source_images,
                 config=cfg, seed=seed, header=header, sky=sky.astype(np.float32))


def _correlate(noise, sigma):
    """Smooth unit white noise ``(n_bands, ny, nx)`` by a Gaussian of ``sigma`` pixels, back to unit variance."""
    from scipy import ndimage

    # The variance of smoothed unit white noise is the sum of the squared kernel weights: take it from
    # the same filter applied to a unit impulse (periodic borders keep it stationary).
    size = 2 * int(math.ceil(4 * sigma)) + 1
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    kernel = ndimage.gaussian_filter(impulse, sigma, mode="wrap")
    scale = 1.0 / math.sqrt(float(np.sum(kernel ** 2)))
    smoothed = [ndimage.gaussian_filter(band.astype(np.float64), sigma, mode="wrap") * scale for band in noise]
    return np.stack(smoothed).astype(np.float32)


def _truth_table(kept, blended, truth_seg, cfg, header, seed):
    n = len(kept)
    params = [p for p, _ in kept]
    new_id = {p["index"]: i for i, p in enumerate(params, start=1)}

    def col(key, dtype=np.float64):
        return np.array([p[key] for p in params], dtype=dtype)

    t = QTable()
    t["id"] = np.arange(1, n + 1, dtype=np.int32)
    t["x"] = col("x")
    t["y"] = col("y")
    t["flux"] = col("flux_drawn")
    t["flux_in_image"] = col("flux_in_image")
    if cfg.n_bands > 1:
        for b, name in enumerate(cfg.band_names):
            t[f"flux_{name}"] = np.array([p["flux_drawn"] * p["colour"][b] for p in params])
    t["snr"] = col("snr")
    t["is_star"] = np.array([p["kind"] == "star" for p in params], dtype=bool)
    t["blended"] = np.asarray(blended, dtype=bool)
    t["kind"] = np.array([p["kind"] for p in params], dtype="U10")
    t["r_half"] = col("r_half") * u.arcsec
    t["q"] = col("q")
    t["pa"] = col("pa") * u.deg
    t["bulge_fraction"] = col("bulge_fraction")
    t["companion_of"] = np.array([new_id.get(p["primary"], 0) for p in params], dtype=np.int32)
    t["n_pixels"] = np.bincount(truth_seg.ravel(), minlength=n + 1)[1:].astype(np.int64)
    if n:
        ra, dec = WCS(header).pixel_to_world_values(t["x"], t["y"])
    else:
        ra = dec = np.zeros(0)
    t["ra"] = np.asarray(ra, dtype=np.float64) * u.deg
    t["dec"] = np.asarray(dec, dtype=np.float64) * u.deg
    t.meta.update({"SIMULATR": _SIMULATOR, "SEED": seed, "PIXSCALE": cfg.pixel_scale,
                   "PSF_FWHM": cfg.psf_fwhm, "NOISE": cfg.noise_sigma, "MINSNR": cfg.min_snr,
                   "NBANDS": cfg.n_bands, "NSOURCE": n})
    return t



def _scene_paths(outdir, name):
    outdir = Path(outdir)
    return {
        "image": outdir / f"{name}.fits",
        "truth_seg": outdir / f"{name}_truth_seg.fits",
        "truth": outdir / f"{name}_truth.fits",
    }


def write_scene(scene, outdir, name, *, overwrite=False):
    """Write a scene's image, truth labels and truth table (each atomically).

    Parameters
    ----------
    scene : Scene
        From `simulate_scene`.
    outdir : str or os.PathLike
        Directory (created if missing).
    name : str
        File stem: writes ``<name>.fits`` (image and header, with WCS),
        ``<name>_truth_seg.fits`` (int32 truth labels) and
        ``<name>_truth.fits`` (truth table, FITS binary table).
    overwrite : bool, optional
        Replace existing files. Without it, nothing is written if any of
        the three exists.

    Returns
    -------
    dict of str to pathlib.Path
        Keys ``'image'``, ``'truth_seg'``, ``'truth'``.

    Raises
    ------
    FileExistsError
        If a file exists and ``overwrite`` is False.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene from simulate_scene, got {type(scene).__name__}")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise ValueError(f"name must be a non-empty file stem without directory separators, "
                         f"got {name!r}")
    paths = _scene_paths(outdir, name)
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist(s); pass overwrite=True "
                                  "(CLI: --overwrite) to replace them")
    write_image(paths["image"], scene.image, header=scene.header, overwrite=overwrite)
    write_segmentation(paths["truth_seg"], scene.truth_seg, wcs=WCS(scene.header), method="truth",
                       input_path=paths["image"], overwrite=overwrite)
    write_catalog(scene.truth, paths["truth"], format="fits", overwrite=overwrite)
    log.debug("wrote scene %s to %s", name, paths["image"].parent)
    return paths


def read_truth(directory, name):
    """Read the truth of a scene written by `write_scene`.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the scene was written.
    name : str
        Its file stem.

    Returns
    -------
    truth_seg : ndarray of int32, shape (ny, nx)
    truth : astropy.table.QTable
        The truth table (string columns as ``str``).
    header : astropy.io.fits.Header
        Header of the image (PIXSCALE, PSF_FWHM, NOISE, SEED, WCS, ...).

    Raises
    ------
    InputError
        If one of the files is missing or unreadable.
    """
    paths = _scene_paths(directory, name)
    for path in paths.values():
        if not path.exists():
            raise InputError(path, f"missing; write the scene with write_scene(scene, "
                                   f"{str(directory)!r}, {name!r}) first")
    truth_seg, _ = read_segmentation(paths["truth_seg"])
    truth = read_catalog(paths["truth"], format="fits")
    for colname in truth.colnames:
        if truth[colname].dtype.kind == "S":
            truth[colname] = np.char.decode(np.asarray(truth[colname]), "ascii")
    header = read_image(paths["image"]).header
    return truth_seg, truth, header


def simulate_directory(outdir, n, *, config=None, seed=0, prefix="scene", overwrite=False,
                       progress=False):
    """Simulate and write ``n`` reproducible, independent scenes.

    Scene ``i`` uses ``scene_seed(seed, i)`` and is written by `write_scene`
    as ``<prefix>_<i>`` (zero-padded to at least 4 digits).

    Parameters
    ----------
    outdir : str or os.PathLike
        Output directory (created if missing).
    n : int
        Number of scenes (>= 0).
    config : SceneConfig, optional
        Configuration of every scene; default ``SceneConfig()``.
    seed : int, optional
        Seed of the set.
    prefix : str, optional
        File stem prefix.
    overwrite : bool, optional
        Replace existing files.
    progress : bool, optional
        Show a tqdm progress bar.

    Returns
    -------
    list of str
        The scene names, in order.

    Raises
    ------
    ValueError
        If ``n`` or ``seed`` is not a non-negative integer.
    FileExistsError
        If a scene's file exists and ``overwrite`` is False.
    """
    from tqdm.auto import tqdm

    n = _check_seed(n, "n")
    seed = _check_seed(seed)
    cfg = SceneConfig() if config is None else config
    if not isinstance(cfg, SceneConfig):
        raise TypeError(f"config must be a SceneConfig, got {type(cfg).__name__}")
    width = max(4, len(str(max(n - 1, 0))))
    names = []
    t0 = time.perf_counter()
    n_sources = 0
    for i in tqdm(range(n), disable=not progress, desc="simulate", unit="scene"):
        name = f"{prefix}_{i:0{width}d}"
        scene = simulate_scene(cfg, seed=scene_seed(seed, i), keep_sources=False)
        write_scene(scene, outdir, name, overwrite=overwrite)
        n_sources += scene.n_sources
        names.append(name)
    log.info("simulated %d scenes (%d sources) into %s in %.1f s (config %s)", n, n_sources,
             outdir, time.perf_counter() - t0, asdict(cfg))
    return names
