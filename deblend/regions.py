"""DS9 region files: one ellipse per catalog source, for overlays in DS9 or Aladin.

The ellipse of a source comes from its catalog row: centre ``x_centroid``,
``y_centroid``; semi-axes ``scale × semimajor_axis`` and ``scale ×
semiminor_axis``; position angle ``orientation``. photutils'
``semimajor_axis``/``semiminor_axis`` are the second-moment σ of the source's
light along its principal axes (SExtractor's ``A_IMAGE``/``B_IMAGE``), so the
default ``scale = 2`` draws the 2σ ellipse, which holds 1 − e⁻² ≈ 86 % of the
flux of a Gaussian source: about the aperture a Kron radius (2.5 × the first
moment radius, ≈ 2.2σ for a Gaussian) gives, and close to what the eye calls
the source's outline.

The region file is in sky coordinates (the WCS's frame, ICRS for most
surveys; degrees and arcseconds) when a celestial WCS is given, in image pixels otherwise. The `regions` package
writes DS9's 1-based pixel convention; catalog positions are 0-based.
"""

from __future__ import annotations

import logging
from pathlib import Path

import astropy.units as u
import numpy as np
from regions import EllipsePixelRegion, PixCoord, Regions

from deblend.io import atomic_path

__all__ = ["catalog_regions", "write_regions", "DEFAULT_SCALE", "MIN_SEMI_AXIS"]

log = logging.getLogger(__name__)

#: Default factor from the second-moment σ to the drawn semi-axes (the 2σ ellipse).
DEFAULT_SCALE = 2.0
#: Smallest drawn semi-axis in pixels: sources of one pixel, or without a measured shape, still get a region.
MIN_SEMI_AXIS = 0.5

_COLORS = {"star": "cyan", "galaxy": "green"}


def _values(column, unit=None):
    """A catalog column as a float ndarray (in ``unit`` when it carries one)."""
    if hasattr(column, "unit") and column.unit is not None and unit is not None:
        return np.asarray(u.Quantity(column).to_value(unit), dtype=float)
    return np.asarray(column, dtype=float)


def catalog_regions(catalog, *, wcs=None, scale=DEFAULT_SCALE):
    """One DS9 ellipse per catalog row.

    Parameters
    ----------
    catalog : astropy.table.Table or QTable
        A deblend catalog: ``label``, ``x_centroid``, ``y_centroid`` (0-based
        pixels), ``semimajor_axis``, ``semiminor_axis`` (pixels), and
        ``orientation`` (degrees counter-clockwise from the +x axis); an
        optional ``class`` column is added to each region's text.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the image: the regions are then sky regions.
    scale : float, optional
        Drawn semi-axes = ``scale`` × the second-moment σ (default 2: the 2σ
        ellipse, 86 % of a Gaussian's flux). Semi-axes that are not finite or
        below `MIN_SEMI_AXIS` pixels are drawn at `MIN_SEMI_AXIS`.

    Returns
    -------
    regions.Regions
        In row order; each region's ``meta['text']`` is ``"<label>"`` or
        ``"<label> <class>"``, and its ``meta['label']`` the label. Rows
        without a finite centroid get no region (logged).

    Raises
    ------
    ValueError
        If a required column is missing or ``scale`` is not a positive number.
    """
    required = ["label", "x_centroid", "y_centroid", "semimajor_axis", "semiminor_axis", "orientation"]
    missing = [name for name in required if name not in catalog.colnames]
    if missing:
        raise ValueError(f"catalog lacks the column(s) {missing} needed for regions; pass a catalog from "
                         "deblend.Deblender().run(...).catalog or deblend.read_catalog")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number (semi-axes in units of the second-moment sigma), "
                         f"got {scale!r}; e.g. 2")
    labels = np.asarray(catalog["label"])
    x = _values(catalog["x_centroid"], u.pix)
    y = _values(catalog["y_centroid"], u.pix)
    a = _values(catalog["semimajor_axis"], u.pix) * scale
    b = _values(catalog["semiminor_axis"], u.pix) * scale
    angle = _values(catalog["orientation"], u.deg)
    classes = np.asarray(catalog["class"]).astype(str) if "class" in catalog.colnames else None
    a = np.where(np.isfinite(a) & (a >= MIN_SEMI_AXIS), a, MIN_SEMI_AXIS)
    b = np.where(np.isfinite(b) & (b >= MIN_SEMI_AXIS), b, MIN_SEMI_AXIS)
    angle = np.where(np.isfinite(angle), angle, 0.0)
    out = []
    for i in range(len(labels)):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            log.warning("source %s has no finite centroid; no region drawn for it", labels[i])
            continue
        text = f"{labels[i]}" if classes is None else f"{labels[i]} {classes[i]}"
        visual = {"color": _COLORS[classes[i]]} if classes is not None and classes[i] in _COLORS else None
        region = EllipsePixelRegion(PixCoord(x[i], y[i]), width=2 * a[i], height=2 * b[i], angle=angle[i] * u.deg,
                                    meta={"text": text, "label": int(labels[i])}, visual=visual)
        out.append(region.to_sky(wcs) if wcs is not None else region)
    return Regions(out)


def write_regions(catalog, path, *, wcs=None, scale=DEFAULT_SCALE, overwrite=False):
    """Write a catalog's sources as a DS9 region file, atomically.

    Parameters
    ----------
    catalog : astropy.table.Table or QTable
        See `catalog_regions`.
    path : str or os.PathLike
        Destination, conventionally ``<stem>.reg`` next to the catalog.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS: regions in sky coordinates (the WCS's frame); pixels otherwise.
    scale : float, optional
        Drawn semi-axes in units of the second-moment σ (default 2).
    overwrite : bool, optional
        Replace an existing file; otherwise `FileExistsError` is raised.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    regions = catalog_regions(catalog, wcs=wcs, scale=scale)
    # DS9 can only write meta keys it knows: keep the text (label and class), drop our own 'label'
    for region in regions:
        region.meta.pop("label", None)
    text = regions.serialize(format="ds9") if len(regions) else "# Region file format: DS9 astropy/regions\n"
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.debug("wrote %d regions to %s", len(regions), path)
    return Path(path)
