"""Source catalogs from a label map, measured with photutils' SourceCatalog.

Positions and shapes are measured once, on the detection image; fluxes are
measured in every band. Column names follow photutils (``x_centroid``,
``segment_flux``, ...); with several bands, each flux column also appears as
``<column>_<band>``.
"""

from __future__ import annotations

import datetime
import logging
import warnings

import astropy.units as u
import numpy as np
from astropy.utils.exceptions import AstropyWarning
from photutils.segmentation import SegmentationImage, SourceCatalog

from deblend._version import __version__

__all__ = ["make_catalog", "SHAPE_COLUMNS", "FLUX_COLUMNS", "empty_catalog", "add_blend_columns", "label_stats"]

log = logging.getLogger(__name__)

#: Columns measured on the detection image.
SHAPE_COLUMNS = ["label", "x_centroid", "y_centroid", "sky_centroid", "bbox_xmin", "bbox_xmax",
                 "bbox_ymin", "bbox_ymax", "area", "semimajor_axis", "semiminor_axis",
                 "orientation", "ellipticity", "max_value"]
#: Columns measured in every band.
FLUX_COLUMNS = ["segment_flux", "segment_flux_err", "kron_flux", "kron_flux_err"]


def _band_suffix(name):
    return "".join(c if c.isalnum() else "_" for c in str(name)).strip("_") or "band"


def _meta(method, weights_id, band_names):
    return {
        "creator": f"deblend {__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "method": method or "unknown",
        "weights": weights_id or "none",
        "bands": ",".join(band_names),
    }


def empty_catalog(*, band_names=("band0",), wcs=None, method=None, weights_id=None):
    """A zero-row catalog with the same columns `make_catalog` returns.

    Parameters
    ----------
    band_names : sequence of str, optional
    wcs : astropy.wcs.WCS, optional
        When given, the sky columns are included.
    method, weights_id : str, optional
        Provenance for ``meta``.

    Returns
    -------
    astropy.table.QTable
    """
    band_names = list(band_names)
    # measure one dummy pixel and keep no row: the columns, their order, dtypes and units are
    # then exactly those of a non-empty catalog (sky_centroid included when there is a WCS)
    labels = np.zeros((3, 3), dtype=np.int32)
    labels[1, 1] = 1
    data = np.ones((len(band_names), 3, 3), dtype=np.float32)
    table = make_catalog(data, labels, detection=data[0], wcs=wcs, band_names=band_names,
                         method=method, weights_id=weights_id)
    return table[:0]


def make_catalog(data, labels, *, detection=None, error=None, detection_error=None, mask=None,
                 wcs=None, band_names=None, method=None, weights_id=None):
    """Measure every labelled source.

    Parameters
    ----------
    data : ndarray, shape (n_bands, ny, nx) or (ny, nx)
        Background-subtracted image(s).
    labels : ndarray of int, shape (ny, nx)
        0 = background, 1..N = sources.
    detection : ndarray, shape (ny, nx), optional
        Image on which positions and shapes are measured (and the
        ``segment_flux`` column without band suffix). Default: the single band.
    error : ndarray, same shape as ``data``, optional
        Noise σ per pixel and band, for the ``*_err`` columns.
    detection_error : ndarray, shape (ny, nx), optional
        Noise σ of ``detection``.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels excluded from all measurements.
    wcs : astropy.wcs.WCS, optional
        Adds ``sky_centroid``, ``ra`` and ``dec``.
    band_names : sequence of str, optional
        Band names for the per-band columns.
    method, weights_id : str, optional
        Provenance recorded in ``meta``.

    Returns
    -------
    astropy.table.QTable
        One row per label, ``label`` first, in label order. Empty (zero rows,
        same columns) when ``labels`` has no source.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[np.newaxis]
        error = None if error is None else np.asarray(error)[np.newaxis]
    n_bands = data.shape[0]
    labels = np.asarray(labels)
    if labels.shape != data.shape[1:]:
        raise ValueError(f"labels shape {labels.shape} must equal the image shape {data.shape[1:]}")
    band_names = list(band_names) if band_names is not None else [f"band{i}" for i in range(n_bands)]
    if len(band_names) != n_bands:
        raise ValueError(f"band_names has {len(band_names)} names for {n_bands} bands")
    if detection is None:
        if n_bands != 1:
            raise ValueError("detection is required for multi-band data; build it with "
                             "deblend.preprocess.detection_image")
        detection = data[0]
        detection_error = None if error is None else error[0]
    if not labels.any():
        return empty_catalog(band_names=band_names, wcs=wcs, method=method, weights_id=weights_id)

    segm = SegmentationImage(labels.astype(np.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        det_cat = SourceCatalog(detection, segm, error=detection_error, mask=mask, wcs=wcs)
        columns = [c for c in SHAPE_COLUMNS if wcs is not None or c != "sky_centroid"]
        table = det_cat.to_table(columns=columns + FLUX_COLUMNS)
        if n_bands > 1:
            for b, band in enumerate(band_names):
                band_err = None if error is None else error[b]
                cat = SourceCatalog(data[b], segm, error=band_err, mask=mask, wcs=wcs,
                                    detection_catalog=det_cat)
                band_table = cat.to_table(columns=FLUX_COLUMNS)
                for col in FLUX_COLUMNS:
                    table[f"{col}_{_band_suffix(band)}"] = band_table[col]
    _fill_centroids(table, labels, wcs)
    if wcs is not None:
        sky = table["sky_centroid"]
        table["ra"] = sky.icrs.ra.to(u.deg)
        table["dec"] = sky.icrs.dec.to(u.deg)
    # plain floats for fluxes (photutils returns unitless for unitless data) and no masked rows
    for name in table.colnames:
        col = table[name]
        if name != "sky_centroid" and hasattr(col, "filled") and np.asarray(col.mask).any():
            table[name] = col.filled(np.nan)
    table["label"] = np.asarray(table["label"], dtype=np.int32)
    table.meta = _meta(method, weights_id, band_names)
    log.debug("catalog: %d sources, %d bands", len(table), n_bands)
    return table


def label_stats(labels):
    """Labels > 0 present in a map, their pixel counts and unweighted centroids."""
    fg = np.flatnonzero(labels.ravel() > 0)
    if fg.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty(0)
    values, inverse, counts = np.unique(labels.ravel()[fg], return_inverse=True,
                                        return_counts=True)
    y, x = np.divmod(fg, labels.shape[1])
    cx = np.bincount(inverse, weights=x, minlength=values.size) / counts
    cy = np.bincount(inverse, weights=y, minlength=values.size) / counts
    return values, counts, cx, cy



def _fill_centroids(table, labels, wcs):
    """Give segments without a flux-weighted centroid the mean position of their pixels, in place.

    photutils' centroid weights pixels by the background-subtracted detection
    image, and is undefined (NaN) where a segment's values sum to zero or
    less, as a network's mask on a faint or negative patch can. Every row
    keeps a position: such rows get the unweighted mean of their pixels.
    """
    x = np.asarray(table["x_centroid"], dtype=np.float64)
    y = np.asarray(table["y_centroid"], dtype=np.float64)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if not bad.any():
        return
    values, _, mean_x, mean_y = label_stats(labels)
    rows = np.searchsorted(values, np.asarray(table["label"])[bad])  # every row's label is in the map
    x[bad], y[bad] = mean_x[rows], mean_y[rows]
    table["x_centroid"], table["y_centroid"] = x, y
    if wcs is not None:
        table["sky_centroid"] = wcs.pixel_to_world(x, y)
    log.debug("catalog: %d segments without a flux-weighted centroid placed at their pixels' mean",
              int(bad.sum()))


def add_blend_columns(table, refinement, *, band_names, seg_err_scale=1.0):
    """Add the blend and segmentation-uncertainty columns of a refinement to a catalog, in place.

    Columns: ``blend_id`` (0 = isolated), ``n_blend`` (sources in the group, 1
    when isolated), ``segment_flux_seg_err`` (standard deviation of the
    source's ``segment_flux`` over the probabilistic U-Net's samples, times
    ``seg_err_scale``: the error due to where the boundary between blended
    sources is drawn; 0 for sources not refined) and ``segment_flux_err_total`` (``segment_flux_err``,
    the noise error, and ``segment_flux_seg_err`` added in quadrature). With
    several bands the last two appear per band too (``<column>_<band>``).

    Parameters
    ----------
    table : astropy.table.QTable
        From `make_catalog`, one row per label of the refined map.
    refinement : deblend.refine.Refinement
        Its ``flux_samples`` hold the detection image first and then each band
        when there are several bands, or the single band.
    band_names : sequence of str
    seg_err_scale : float, optional
        Factor on the samples' spread (a recalibration fitted on simulations,
        see the probabilistic U-Net's model card); 1 reports the raw spread.
    """
    if not (np.isfinite(seg_err_scale) and seg_err_scale > 0):
        raise ValueError(f"seg_err_scale must be a positive number, got {seg_err_scale!r}")
    if len(table) != len(refinement.blend_id):
        raise ValueError(f"catalog has {len(table)} rows, refinement {len(refinement.blend_id)} sources")
    spread = seg_err_scale * refinement.flux_spread()
    table["blend_id"] = refinement.blend_id.astype(np.int32)
    table["n_blend"] = refinement.n_blend.astype(np.int32)
    suffixes = [""] + ([f"_{_band_suffix(b)}" for b in band_names] if len(band_names) > 1 else [])
    if spread.shape[1] != len(suffixes):
        raise ValueError(f"refinement has fluxes in {spread.shape[1]} images, expected {len(suffixes)}")
    for i, suffix in enumerate(suffixes):
        seg_err = spread[:, i]
        table[f"segment_flux_seg_err{suffix}"] = seg_err
        noise = table[f"segment_flux_err{suffix}"] if f"segment_flux_err{suffix}" in table.colnames else 0.0
        table[f"segment_flux_err_total{suffix}"] = np.hypot(np.asarray(noise, dtype=np.float64), seg_err)
