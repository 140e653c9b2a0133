"""Images too large to hold comfortably: deblended window by window from a memory-mapped file.

`run_windowed` reads a large FITS image one window at a time
(`deblend.io.open_image_sections`), deblends each window with the
`Deblender` as if it were a small image (its own background, noise and
detections), and keeps each source from the one window whose *core* holds
its centroid (`deblend.tiling.make_windows`: cores tile the image exactly, and
every core lies at least ``margin`` pixels inside its window, except along
the image's edges). Peak memory is then that of one window, plus the int32
label map of the whole image and the catalog rows.

Seams: a source whose footprint reaches no farther than ``margin`` pixels
from its centroid is seen whole by the window that keeps it. Windows measure
their own background, so a source lying within a pixel or so of a core
boundary can, rarely, be kept by both windows (it then appears twice in the
catalog, the second copy holding only the pixels the first did not claim) or
by neither. Pixels claimed by sources of two windows go to the window
processed first (row-major order). Blend groups (``blend_id``) are numbered
uniquely over the image; a group whose members are kept by different windows
gets one number in each.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from astropy.table import vstack

from deblend.catalog import empty_catalog
from deblend.exceptions import NoSourcesWarning
from deblend.io import Image, open_image_sections
from deblend.result import DeblendResult
from deblend.tiling import make_windows

__all__ = ["run_windowed", "LARGE_IMAGE_PIXELS", "WINDOW_SIZE", "WINDOW_MARGIN", "PIXEL_COLUMNS"]

log = logging.getLogger(__name__)

#: Images with more pixels than this (4096 × 4096) are deblended window by window in batch runs.
LARGE_IMAGE_PIXELS = 4096 * 4096
#: Side of the windows, in pixels.
WINDOW_SIZE = 2048
#: Least distance from a window's core to its edge (half the overlap of neighbouring windows), in pixels.
WINDOW_MARGIN = 128
#: Catalog columns holding x or y pixel positions, shifted from window to image coordinates.
PIXEL_COLUMNS = {"x": ("x_centroid", "bbox_xmin", "bbox_xmax"), "y": ("y_centroid", "bbox_ymin", "bbox_ymax")}


def run_windowed(path, deblender, *, window_size=WINDOW_SIZE, margin=WINDOW_MARGIN, hdu=None, mask_bits=None):
    """Deblend a large FITS image window by window, reading it memory-mapped.

    Parameters
    ----------
    path : str or os.PathLike
        A plain or tile-compressed (``.fz``) FITS image (not gzip).
    deblender : deblend.pipeline.Deblender
        Applied to each window.
    window_size : int, optional
        Side of the windows in pixels (default 2048).
    margin : int, optional
        Least distance from each window's core to its edge (default 128):
        sources reaching farther than this from their centroid may be cut.
        Must be below ``window_size / 4``.
    hdu : int or str, optional
        HDU holding the image (see `deblend.io.read_image`).
    mask_bits : int, optional
        Bits of a mask HDU that flag bad pixels.

    Returns
    -------
    DeblendResult
        Labels of the whole image (int32, 1..N equal to the catalog's
        ``label``); the catalog's pixel columns (`PIXEL_COLUMNS`) are in image
        coordinates and its sky columns come from each window's cut of the
        WCS. Extra planes (``extensions``) of the window's shape are stitched
        core by core. ``result.image`` carries the header, WCS, path and band
        names but no pixels (they stay in the file): its ``data`` has shape
        ``(n_bands, 0, 0)``.

    Raises
    ------
    deblend.exceptions.InputError
        If the file cannot be read, or all its pixels are masked.
    ValueError
        If ``window_size`` or ``margin`` is invalid.
    """
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 64:
        raise ValueError(f"window_size must be an integer >= 64 (pixels), got {window_size!r}; e.g. 2048")
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= 4 * margin < window_size:
        raise ValueError(f"margin must be an integer in [0, window_size/4) = [0, {window_size / 4:g}), got "
                         f"{margin!r}; e.g. 128")
    from deblend.exceptions import InputError

    with open_image_sections(path, hdu=hdu, mask_bits=mask_bits) as sections:
        n_bands, ny, nx = sections.shape
        windows = make_windows((ny, nx), size=window_size, overlap=2 * margin)
        labels = np.zeros((ny, nx), dtype=np.int32)
        tables, extensions, left_out = [], {}, set()
        n_labels, n_groups, any_pixel = 0, 0, False
        method, weights_id, settings = deblender.method, None, {}
        for number, window in enumerate(windows, start=1):
            image = sections.read(window.y0, window.y1, window.x0, window.x1)
            if image.mask.all():
                continue
            any_pixel = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoSourcesWarning)  # one empty window says nothing of the image
                result = deblender.run(image)
            weights_id, settings = result.weights_id, result.settings
            table, n_labels = _keep_owned(result, window, labels, n_labels)
            if len(table) and "blend_id" in table.colnames:  # blend groups numbered per window: make them unique
                ids = np.asarray(table["blend_id"])
                table["blend_id"] = np.where(ids > 0, ids + n_groups, 0).astype(ids.dtype)
                n_groups = max(n_groups, int(table["blend_id"].max()))
            if len(table):
                tables.append(table)
            _stitch_extensions(result.extensions, window, extensions, (ny, nx), left_out)
            log.debug("%s: window %d of %d, %d sources kept", path, number, len(windows), len(table))
        if not any_pixel:
            raise InputError(path, "all pixels are non-finite or masked; nothing to deblend")
        if tables:
            catalog = vstack(tables, metadata_conflicts="silent")
            catalog.meta = dict(tables[0].meta)
        else:
            catalog = empty_catalog(band_names=sections.band_names, wcs=sections.wcs, method=method,
                                    weights_id=weights_id)
            warnings.warn(f"{path}: no sources detected", NoSourcesWarning, stacklevel=2)
        catalog.meta["windows"] = f"{len(windows)} windows of {window_size} px, margin {margin} px"
        placeholder = Image(data=np.zeros((n_bands, 0, 0), np.float32), mask=np.zeros((0, 0), bool),
                            header=sections.header, wcs=sections.wcs, paths=[str(path)],
                            band_names=list(sections.band_names))
    log.info("%s: %d sources from %d windows (%s)", path, len(catalog), len(windows), method)
    return DeblendResult(labels=labels, catalog=catalog, image=placeholder, method=method, weights_id=weights_id,
                         extensions=extensions, settings=settings)


def _keep_owned(result, window, labels, n_labels):
    """Paint the sources owned by ``window`` into ``labels``; return their catalog rows and the new label count."""
    catalog = result.catalog
    if len(catalog) == 0:
        return catalog, n_labels
    x = np.asarray(catalog["x_centroid"], dtype=float) + window.x0
    y = np.asarray(catalog["y_centroid"], dtype=float) + window.y0
    owned = window.owns(x, y)
    local = result.labels
    region = labels[window.slices]
    free = region == 0
    # pixels each owned source can still claim (a source seen by two windows is kept by one)
    lut = np.zeros(int(local.max()) + 1, dtype=np.int32)
    lut[np.asarray(catalog["label"])[owned]] = 1
    claimable = np.bincount(local[free & (lut[local] > 0)], minlength=lut.size)
    keep = owned & (claimable[np.asarray(catalog["label"])] > 0)
    kept = catalog[keep]
    new = np.arange(n_labels + 1, n_labels + len(kept) + 1, dtype=np.int32)
    lut[:] = 0
    lut[np.asarray(kept["label"])] = new
    painted = lut[local]
    np.copyto(region, painted, where=free & (painted > 0))
    kept["label"] = new
    for axis, offset in (("x", window.x0), ("y", window.y0)):
        for name in PIXEL_COLUMNS[axis]:
            if name in kept.colnames:
                kept[name] = kept[name] + offset * (getattr(kept[name], "unit", None) or 1)
    return kept, n_labels + len(kept)


def _stitch_extensions(planes, window, out, shape, left_out):
    """Copy each extra plane's core into a full-image plane (planes not of the window's shape are left out)."""
    for name, plane in planes.items():
        plane = np.asarray(plane)
        if plane.shape != window.shape or name in left_out:
            if name not in left_out:
                log.warning("extension %s of shape %s is not a plane of the window; left out of the windowed "
                            "result", name, plane.shape)
                left_out.add(name)
                out.pop(name, None)
            continue
        if name not in out:
            out[name] = np.zeros(shape, dtype=plane.dtype)
        out[name][window.core_slices] = plane[window.core_in_window]
