"""Merge the catalogs of a batch run into one survey catalog, each source once.

Tiles of a survey overlap, so a source near a tile's edge is detected in two
(or four) tiles. `merge_catalogs` stacks the tile catalogs and treats
detections of *different* tiles that lie within ``match_radius`` of each other
on the sky as one source, kept from the tile where it lies farthest from the
edge: there it is least truncated and best deblended. Detections of the same
tile are never merged with each other, however close: the deblender already
decided they are distinct sources.

Catalogs without sky positions (their input had no WCS) cannot be matched
across tiles; they are left out with a `deblend.exceptions.WCSWarning` naming
the file, and listed in the merged catalog's ``meta['skipped']``.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import QTable, Table, vstack

from deblend._version import __version__
from deblend.exceptions import DeblendWarning, InputError, WCSWarning
from deblend.io import read_catalog, read_header

__all__ = ["merge_catalogs", "find_catalogs"]

log = logging.getLogger(__name__)

# catalog extensions written by deblend.io.write_catalog (see deblend.io.CATALOG_FORMATS)
_CATALOG_SUFFIXES = (".fits", ".ecsv", ".csv", ".parquet", ".xml")


def find_catalogs(outdir):
    """The tile catalogs ``<stem>_cat.<ext>`` under ``outdir`` (recursively), one per tile.

    When a tile has catalogs in several formats (a re-run with another
    ``--format``), the most recently modified one is used.

    Parameters
    ----------
    outdir : str or os.PathLike
        Output directory of `deblend.batch.run_batch`.

    Returns
    -------
    list of pathlib.Path
        Sorted by path.
    """
    newest = {}
    for path in sorted(Path(outdir).rglob("*_cat.*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in _CATALOG_SUFFIXES:
            continue  # temporary files of atomic writes start with '.'
        tile = path.with_suffix("")
        if tile in newest and newest[tile].stat().st_mtime >= path.stat().st_mtime:
            log.warning("%s: %s is newer and is used for this tile", path, newest[tile].name)
            continue
        if tile in newest:
            log.warning("%s: %s is newer and is used for this tile", newest[tile], path.name)
        newest[tile] = path
    return sorted(newest.values())


def merge_catalogs(outdir, *, match_radius=1.0):
    """Merge every tile catalog under ``outdir`` into one catalog, each source once.

    Parameters
    ----------
    outdir : str or os.PathLike
        Output directory of `deblend.batch.run_batch`, holding
        ``<stem>_cat.<ext>`` and ``<stem>_seg.fits`` (in sub-directories too).
    match_radius : float or astropy.units.Quantity, optional
        Detections of different tiles closer than this on the sky are one
        source. A float is in arcseconds. Default 1 arcsec.

    Returns
    -------
    astropy.table.QTable
        The tile catalogs' columns (an outer join: a column missing from a
        tile is masked there) plus ``source_file`` (name of the input image),
        ``tile`` (catalog stem, with its sub-directory under ``outdir``) and
        ``edge_distance`` (pixels from the centroid to the nearest edge of its
        image, the edges lying at -0.5 and n - 0.5; NaN when the tile's
        ``_seg.fits`` is missing, which makes its detections lose every
        tie). ``meta`` holds ``files`` (catalogs merged, relative to
        ``outdir``), ``skipped``, ``n_files``, ``n_before``, ``n_after``,
        ``radius`` (arcsec), ``date``, ``creator`` and ``version``.

    Raises
    ------
    FileNotFoundError
        If ``outdir`` is not a directory or holds no catalog.
    ValueError
        If ``match_radius`` is not a positive angle, or no catalog has sky positions.
    """
    radius = _radius(match_radius)
    root = Path(outdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; give the output directory of `deblend run`")
    paths = find_catalogs(root)
    if not paths:
        raise FileNotFoundError(f"no catalogs (<stem>_cat.<ext>) under {root}; run `deblend run INPUT... -o {root}` "
                                "first")
    tables, files, skipped = [], [], []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        table = _tile_table(path, rel)
        if table is None:
            skipped.append(rel)
            continue
        tables.append(table)
        files.append(rel)
    if not tables:
        raise ValueError(f"none of the {len(paths)} catalogs under {root} has sky positions (ra, dec), so "
                         "overlapping tiles cannot be matched; deblend inputs that carry a celestial WCS")
    stacked = vstack(tables, join_type="outer", metadata_conflicts="silent")
    tile_index = np.concatenate([np.full(len(t), i) for i, t in enumerate(tables)])
    keep = _keep_farthest_from_edge(stacked, tile_index, radius)
    merged = QTable(stacked[keep])
    merged.meta = {
        "creator": f"deblend {__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "version": __version__,
        "merged": True,
        "files": files,
        "skipped": skipped,
        "n_files": len(files),
        "n_before": len(stacked),
        "n_after": len(merged),
        "radius": float(radius.to_value(u.arcsec)),
    }
    log.info("merged %d catalogs: %d detections, %d sources", len(files), len(stacked), len(merged))
    return merged


def _radius(match_radius):
    """``match_radius`` as a positive scalar angle Quantity (a plain number is in arcsec)."""
    if isinstance(match_radius, u.Quantity):
        radius = match_radius
    elif isinstance(match_radius, (int, float, np.integer, np.floating)) and not isinstance(match_radius, bool):
        radius = float(match_radius) * u.arcsec
    else:
        radius = None
    if radius is None or not radius.isscalar or not radius.unit.is_equivalent(u.deg) or not radius.value > 0:
        raise ValueError(f"match_radius must be a positive angle (a number in arcsec, or an angle Quantity), "
                         f"got {match_radius!r}")
    return radius.to(u.arcsec)


def _tile_table(path, rel):
    """One tile's catalog with ra/dec in deg and the added columns, or None when it cannot be merged."""
    table = read_catalog(path)
    if any(str(k).lower() == "merged" and v for k, v in table.meta.items()):
        log.info("%s: a merged catalog, not a tile; left out", path)
        return None
    out = Table(table)  # plain columns with units: tiles from different formats stack together
    sky = _sky_positions(out)
    if sky is None:
        warnings.warn(f"{path}: no sky positions (ra, dec), its input has no WCS; left out of the merge, "
                      "which matches overlapping tiles by sky position", WCSWarning, stacklevel=3)
        return None
    stem = path.name[: -len("_cat" + path.suffix)]
    seg = path.with_name(f"{stem}_seg.fits")
    source_file, shape = stem, None
    try:
        header = read_header(seg)
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        source_file = str(header.get("DBINPUT", stem))
    except (InputError, KeyError) as exc:
        warnings.warn(f"{path}: no image shape from {seg.name} ({exc}); edge_distance is NaN, so its "
                      "detections lose every tie with another tile", DeblendWarning, stacklevel=3)
    if "sky_centroid" in out.colnames:
        out.remove_column("sky_centroid")
    out["ra"], out["dec"] = sky
    out["source_file"] = np.full(len(out), source_file, dtype=object).astype(str)
    out["tile"] = np.full(len(out), rel[: -len("_cat" + path.suffix)], dtype=object).astype(str)
    out["edge_distance"] = _edge_distance(out, shape)
    out.meta = {}
    return out


def _sky_positions(table):
    """``(ra, dec)`` in degrees from ``ra``/``dec`` or ``sky_centroid``, or None."""
    if "ra" in table.colnames and "dec" in table.colnames:
        return _degrees(table["ra"]), _degrees(table["dec"])
    if "sky_centroid" in table.colnames and isinstance(table["sky_centroid"], SkyCoord):
        icrs = table["sky_centroid"].icrs
        return icrs.ra.to(u.deg), icrs.dec.to(u.deg)
    return None


def _degrees(column):
    unit = getattr(column, "unit", None) or u.deg  # CSV keeps no units: deblend writes degrees
    return (_floats(column) * unit).to(u.deg)


def _floats(column):
    """A plain float array of a (masked) column, masked entries as NaN."""
    return np.ma.filled(np.ma.asarray(column, dtype=float), np.nan)


def _edge_distance(table, shape):
    """Distance in pixels from each centroid to the nearest edge of an image of ``shape``."""
    if shape is None or "x_centroid" not in table.colnames or "y_centroid" not in table.colnames:
        return np.full(len(table), np.nan)
    ny, nx = shape
    x, y = _floats(table["x_centroid"]), _floats(table["y_centroid"])
    return np.minimum.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y])


def _keep_farthest_from_edge(table, tile_index, radius):
    """Boolean mask of the rows kept: per group of cross-tile matches, the one farthest from its edge.

    Greedy, from the detection farthest from its edge inwards: a kept detection
    removes its matches in other tiles. Rows of one tile never remove each other.
    """
    n = len(table)
    keep = np.ones(n, dtype=bool)
    ra, dec = _floats(table["ra"]), _floats(table["dec"])  # degrees, set by _tile_table
    finite = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if len(finite) < 2 or len(np.unique(tile_index[finite])) < 2:
        return keep
    coords = SkyCoord(ra[finite] * u.deg, dec[finite] * u.deg)
    i, j, _, _ = coords.search_around_sky(coords, radius)
    i, j = finite[i], finite[j]
    cross = tile_index[i] != tile_index[j]
    i, j = i[cross], j[cross]
    if not len(i):
        return keep
    by_row = np.argsort(i, kind="stable")
    i, j = i[by_row], j[by_row]
    starts = np.searchsorted(i, np.arange(n + 1))
    edge = _floats(table["edge_distance"])
    edge = np.where(np.isfinite(edge), edge, -np.inf)
    removed = np.zeros(n, dtype=bool)
    for row in np.lexsort((np.arange(n), -edge)):  # farthest from the edge first; ties: table order
        if removed[row]:
            continue
        removed[j[starts[row]:starts[row + 1]]] = True
    keep &= ~removed
    return keep
