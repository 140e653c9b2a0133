"""Matching of detections to simulated truth, and the metrics that score a deblender.

Matching
--------
Predicted sources are matched one-to-one to truth sources on centroid
distance, and only pairs at most one PSF FWHM apart (in pixels) may match.
The assignment is the optimal one (Hungarian algorithm,
`scipy.optimize.linear_sum_assignment`): it matches as many sources as
possible and, among those assignments, minimises the summed distance. It is
solved separately on each connected group of candidate pairs, so crowded
full-size scenes stay cheap.

Predicted centroids are the catalog's ``x_centroid`` / ``y_centroid``;
where those are missing or non-finite, the unweighted centroid of the
source's pixels in the label map is used. Truth positions are the truth
table's ``x`` / ``y`` (true centres, 0-based pixels).

Counts and metrics
------------------
With ``min_snr`` > 0 only truth rows with ``snr >= min_snr`` are *counted*,
but matching is done against all truth rows: a prediction matched to a
faint, uncounted source is neither a true nor a false positive (it is
reported as ``n_pred_ignored``).

tp
    Matched pairs whose truth source is counted.
fp
    Predictions matched to no truth source.
fn
    Counted truth sources matched to no prediction.
recall, precision, F1
    ``tp / (tp + fn)``, ``tp / (tp + fp)``, ``2 tp / (2 tp + fp + fn)``.
blended recall
    Recall over counted truth sources with ``blended == True``.
mean IoU
    Mean over true positives of ``|P ∩ T| / |P ∪ T|``, with ``P`` the
    predicted segment (``pred_labels == label``) and ``T`` the truth
    footprint (``truth_labels == id``).
median abs(Δflux)/flux
    Median over true positives of ``|segment_flux - flux| / flux`` (truth
    flux > 0 and both fluxes finite). ``flux_column`` scores another flux
    column of the catalog instead, e.g. ``kron_flux`` (a total-flux estimate;
    the segment flux misses the light outside the segment).
star/galaxy accuracy
    Fraction of true positives whose predicted ``class`` ('star' or
    'galaxy') agrees with the truth ``is_star``; only when the prediction
    catalog has a ``class`` column (otherwise None). Rows whose class is
    neither 'star' nor 'galaxy' are not scored.
recall by separation
    Recall over counted truth sources binned by the distance to their
    nearest truth neighbour (any row), in PSF FWHM: below 1, 1-2, 2-3 and
    3 or more (isolated sources fall in the last bin). Pairs closer than
    1 FWHM are barely resolved by any method; the bins show where a
    deblender's recall is lost. Keys ``recall_nn_0_1``, ``recall_nn_1_2``,
    ``recall_nn_2_3``, ``recall_nn_3_up`` (`SEPARATION_EDGES`).
blended recall by S/N
    Blended recall binned by the truth ``snr`` column: below 10, 10-20,
    20-50 and 50 or more (`SNR_EDGES`; sources without a finite ``snr`` are
    left out). Faint companions are where every deblender loses most
    blended sources. Keys ``blended_recall_snr_0_10`` ...
    ``blended_recall_snr_50_up``, with the counts per bin in
    ``n_blended_by_snr``.
merged
    Counted truth sources that are unmatched *and* whose true centre pixel
    lies inside a predicted segment that is matched to another truth
    source: the source was swallowed by a neighbour's segment. Every merged
    source is also a false negative (``merged <= fn``).
shredded
    Predicted segments that are unmatched *and* whose centroid pixel lies
    inside the truth footprint of a source that is matched to another
    prediction: a piece split off a real source. Every shredded segment is
    also a false positive (``shredded <= fp``).

Centre and centroid pixels are the nearest pixel, ``floor(x + 0.5)``.
Ratios that are 0/0 (no truth, no prediction, no match) are NaN.

Files
-----
`evaluate_directory` pairs each truth scene ``<name>.fits`` of a truth
directory (one with ``<name>_truth.fits`` and ``<name>_truth_seg.fits``
beside it, as `deblend.simulate` writes) with the predictions
``<name>_seg.fits`` and ``<name>_cat.<ext>`` of a prediction directory. The
FWHM in pixels is ``PSF_FWHM / PIXSCALE`` from the scene header (arcsec and
arcsec/pixel).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from deblend import io as dbio
from deblend.catalog import label_stats
from deblend.exceptions import InputError

__all__ = [
    "SEPARATION_EDGES",
    "SNR_EDGES",
    "match_sources",
    "evaluate_image",
    "summarize",
    "evaluate_directory",
    "compare_methods",
    "format_table",
    "write_json",
]

log = logging.getLogger(__name__)

#: Columns a truth table must have.
_TRUTH_REQUIRED = ("id", "x", "y")

#: Catalog extensions tried, in this order, when no format is given.
_CATALOG_SEARCH = ("fits", "ecsv", "csv", "parquet", "votable")

#: Bin edges, in PSF FWHM, of the nearest-neighbour separation of truth sources (recall by separation).
SEPARATION_EDGES = (0.0, 1.0, 2.0, 3.0, math.inf)


#: Bin edges of the truth S/N for blended recall by S/N.
SNR_EDGES = (0.0, 10.0, 20.0, 50.0, math.inf)


def _bin_names(edges):
    return [f"{int(lo)}_{int(hi)}" if math.isfinite(hi) else f"{int(lo)}_up"
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _separation_keys():
    return [f"recall_nn_{n}" for n in _bin_names(SEPARATION_EDGES)]


def _snr_keys():
    return [f"blended_recall_snr_{n}" for n in _bin_names(SNR_EDGES)]


#: Keys of `evaluate_image` results that `summarize` sums.
_COUNT_KEYS = (
    "n_truth",
    "n_pred",
    "n_pred_ignored",
    "tp",
    "fp",
    "fn",
    "n_blended",
    "tp_blended",
    "merged",
    "shredded",
)

#: Rows of `format_table`: (label, summary key, kind).
_TABLE_ROWS = (
    ("recall", "recall", "ratio"),
    ("precision", "precision", "ratio"),
    ("F1", "f1", "ratio"),
    ("blended recall", "blended_recall", "ratio"),
    ("mean IoU", "mean_iou", "ratio"),
    ("mean IoU, blended", "mean_iou_blended", "ratio"),
    ("median |Δflux|/flux", "median_abs_flux_error", "ratio"),
    ("  ... blended", "median_abs_flux_error_blended", "ratio"),
    ("star/galaxy acc", "star_galaxy_accuracy", "ratio"),
    *((f"recall, neighbour {lab}", key, "ratio") for lab, key in zip(
        ("< 1 FWHM", "1-2 FWHM", "2-3 FWHM", ">= 3 FWHM"), _separation_keys(), strict=True)),
    ("merged", "merged", "count"),
    ("shredded", "shredded", "count"),
    ("n_truth", "n_truth", "count"),
    ("n_pred", "n_pred", "count"),
    ("n_images", "n_images", "count"),
    ("missing", "n_missing", "count"),
)


# --------------------------------------------------------------------------- matching


def _as_xy(xy, name):
    """Return ``xy`` as a float (n, 2) array, validating its shape."""
    arr = np.asarray(xy, dtype=float)
    if arr.size == 0:
        return np.empty((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) holding (x, y) pixel positions, "
                         f"got shape {arr.shape}")
    return arr


def _check_positive(value, name):
    """Return ``value`` as a float, raising unless it is finite and > 0."""
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}") from exc
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a positive, finite number of pixels, got {value!r}")
    return out


def match_sources(pred_xy, truth_xy, *, max_distance):
    """Match predicted to true positions one-to-one within a distance.

    The assignment is optimal (Hungarian algorithm): it has as many pairs as
    possible among pairs at most ``max_distance`` apart, and among such
    assignments the smallest summed distance. Positions with a non-finite
    coordinate are never matched.

    Parameters
    ----------
    pred_xy : array_like, shape (n_pred, 2)
        Predicted ``(x, y)`` positions, 0-based pixels.
    truth_xy : array_like, shape (n_truth, 2)
        True ``(x, y)`` positions, 0-based pixels.
    max_distance : float
        Largest allowed distance of a matched pair, in pixels (inclusive);
        conventionally the PSF FWHM.

    Returns
    -------
    pred_idx : ndarray of int
        Row indices into ``pred_xy`` of the matched pairs, increasing.
    truth_idx : ndarray of int
        Row indices into ``truth_xy``; ``truth_idx[k]`` is matched to ``pred_idx[k]``.

    Raises
    ------
    ValueError
        If a position array is not of shape (n, 2) or ``max_distance`` is not
        a positive finite number.
    """
    pred_xy = _as_xy(pred_xy, "pred_xy")
    truth_xy = _as_xy(truth_xy, "truth_xy")
    max_distance = _check_positive(max_distance, "max_distance")
    empty = (np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp))
    p_ok = np.flatnonzero(np.isfinite(pred_xy).all(axis=1))
    t_ok = np.flatnonzero(np.isfinite(truth_xy).all(axis=1))
    if p_ok.size == 0 or t_ok.size == 0:
        return empty

    # Candidate pairs within max_distance.
    tree = cKDTree(truth_xy[t_ok])
    neighbours = tree.query_ball_point(pred_xy[p_ok], r=max_distance)
    n_per = np.fromiter((len(n) for n in neighbours), dtype=np.intp, count=len(neighbours))
    if n_per.sum() == 0:
        return empty
    rows = np.repeat(p_ok, n_per)
    cols = t_ok[np.concatenate([np.asarray(n, dtype=np.intp) for n in neighbours if n])]
    dist = np.hypot(*(pred_xy[rows] - truth_xy[cols]).T)
    keep = dist <= max_distance
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    if rows.size == 0:
        return empty

    # Solve each connected group of candidate pairs on its own.
    n_pred = pred_xy.shape[0]
    n_nodes = n_pred + truth_xy.shape[0]
    graph = coo_matrix((np.ones(rows.size), (rows, n_pred + cols)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    edge_comp = component[rows]
    order = np.argsort(edge_comp, kind="stable")
    rows, cols, dist, edge_comp = rows[order], cols[order], dist[order], edge_comp[order]
    starts = np.flatnonzero(np.r_[True, edge_comp[1:] != edge_comp[:-1]])
    ends = np.r_[starts[1:], edge_comp.size]

    out_p, out_t = [], []
    single = (ends - starts) == 1
    out_p.append(rows[starts[single]])
    out_t.append(cols[starts[single]])
    for s, e in zip(starts[~single], ends[~single], strict=True):
        r, c, d = rows[s:e], cols[s:e], dist[s:e]
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        # A forbidden pair costs more than any set of allowed pairs, so the
        # solution first maximises the number of allowed pairs.
        penalty = (min(ur.size, uc.size) + 1) * (max_distance + 1.0)
        cost = np.full((ur.size, uc.size), penalty)
        cost[ri, ci] = d
        allowed = np.zeros(cost.shape, dtype=bool)
        allowed[ri, ci] = True
        a, b = linear_sum_assignment(cost)
        ok = allowed[a, b]
        out_p.append(ur[a[ok]])
        out_t.append(uc[b[ok]])
    pred_idx = np.concatenate(out_p).astype(np.intp)
    truth_idx = np.concatenate(out_t).astype(np.intp)
    order = np.argsort(pred_idx, kind="stable")
    return pred_idx[order], truth_idx[order]


# --------------------------------------------------------------------------- table access


def _column_names(table):
    """Column names of an astropy table, a structured array, a DataFrame or a dict."""
    if table is None:
        return []
    names = getattr(table, "colnames", None)
    if names is None:
        dtype = getattr(table, "dtype", None)
        if dtype is not None and getattr(dtype, "names", None):
            names = dtype.names
        elif hasattr(table, "columns"):
            names = table.columns
        else:
            names = table.keys()
    return [str(n) for n in names]


def _column_mask(col):
    mask = getattr(col, "mask", None)
    if isinstance(mask, (np.ndarray, np.bool_, bool)):
        return np.asarray(mask, dtype=bool)
    return None


def _float_column(table, name):
    """Return a column as a float ndarray: units dropped, masked entries NaN."""
    col = table[name]
    mask = _column_mask(col)
    data = getattr(col, "unmasked", col)
    data = getattr(data, "value", data)
    arr = np.array(np.ma.getdata(data), dtype=float).reshape(-1)
    if mask is not None and mask.any():
        arr[np.broadcast_to(mask, arr.shape)] = np.nan
    return arr


def _bool_column(table, name):
    """Return a column as bool; strings 'true'/'t'/'1'/'yes' are True, masked False."""
    col = table[name]
    mask = _column_mask(col)
    data = np.ma.getdata(getattr(col, "value", col))
    data = np.asarray(data).reshape(-1)
    if data.dtype.kind in "USO":
        arr = np.array([_as_str(v) in ("true", "t", "1", "yes") for v in data], dtype=bool)
    else:
        arr = np.asarray(data, dtype=bool).copy()
    if mask is not None and mask.any():
        arr[np.broadcast_to(mask, arr.shape)] = False
    return arr


def _as_str(value):
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip().lower()


def _str_column(table, name):
    """Return a column as lower-case stripped strings; masked entries are ''."""
    col = table[name]
    mask = _column_mask(col)
    data = np.asarray(np.ma.getdata(col)).reshape(-1)
    arr = np.array([_as_str(v) for v in data], dtype=object)
    if mask is not None and mask.any():
        arr[np.broadcast_to(mask, arr.shape)] = ""
    return arr


def _int_ids(values, name):
    """Validate integer-valued, unique ids and return them as int64."""
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite integers, found a non-finite or masked value")
    ids = values.astype(np.int64)
    if np.any(ids != values):
        raise ValueError(f"{name} must hold integers, got non-integer values such as "
                         f"{values[ids != values][0]!r}")
    if np.unique(ids).size != ids.size:
        dup = np.unique(ids)[np.bincount(np.searchsorted(np.unique(ids), ids)) > 1]
        raise ValueError(f"{name} must be unique, got repeated values {dup[:5].tolist()}")
    return ids


# --------------------------------------------------------------------------- label maps


def _check_labels(labels, name):
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (ny, nx) label map, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}; "
                         "cast it with labels.astype(np.int32)")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (0 = background), got minimum {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _lookup(keys, values, query, default=0):
    """``values[keys == q]`` for each ``q`` of ``query`` (``keys`` sorted), else ``default``."""
    query = np.asarray(query)
    out = np.full(query.shape, default, dtype=np.result_type(values, type(default)))
    if keys.size == 0 or query.size == 0:
        return out
    pos = np.clip(np.searchsorted(keys, query), 0, keys.size - 1)
    hit = keys[pos] == query
    out[hit] = values[pos[hit]]
    return out


def _pixel_values(labels, x, y):
    """Label at the nearest pixel of each (x, y); 0 when outside the map or non-finite."""
    ny, nx = labels.shape
    out = np.zeros(np.shape(x), dtype=np.int64)
    ok = np.isfinite(x) & np.isfinite(y)
    ix = np.floor(np.where(ok, x, -1) + 0.5).astype(np.int64)
    iy = np.floor(np.where(ok, y, -1) + 0.5).astype(np.int64)
    ok &= (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    out[ok] = labels[iy[ok], ix[ok]]
    return out


def _pred_arrays(pred_labels, pred_catalog, flux_column="segment_flux"):
    """Predicted sources: labels, centroids, fluxes, classes and areas.

    Sources are the catalog rows, followed by any label of the map that has
    no catalog row (centroid from the map, flux NaN).
    """
    map_labels, map_counts, map_cx, map_cy = label_stats(pred_labels)
    names = _column_names(pred_catalog)
    if pred_catalog is not None:
        if "label" not in names:
            raise ValueError(f"pred_catalog lacks a 'label' column (it has {names}); rows are tied "
                             "to the segmentation map through it. Pass pred_catalog=None to take "
                             "centroids from the label map alone")
        labels = _int_ids(_float_column(pred_catalog, "label"), "pred_catalog['label']")
        n_rows = labels.size

        def column(name):
            if name in names:
                return _float_column(pred_catalog, name)
            return np.full(n_rows, np.nan)

        x, y, flux = column("x_centroid"), column("y_centroid"), column(flux_column)
        cls = _str_column(pred_catalog, "class") if "class" in names else None
    else:
        labels = np.empty(0, np.int64)
        x = y = flux = np.empty(0)
        cls = None

    extra = np.setdiff1d(map_labels, labels)
    if extra.size and pred_catalog is not None:
        log.warning("%d label(s) of the predicted map have no catalog row (e.g. %s); their "
                    "centroids are taken from the map", extra.size, extra[:5].tolist())
    labels = np.concatenate([labels, extra])
    x = np.concatenate([x, np.full(extra.size, np.nan)])
    y = np.concatenate([y, np.full(extra.size, np.nan)])
    flux = np.concatenate([flux, np.full(extra.size, np.nan)])
    if cls is not None:
        cls = np.concatenate([cls, np.full(extra.size, "", dtype=object)])

    # Fall back to the map centroid where the catalog has none.
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        x = x.copy()
        y = y.copy()
        x[bad] = _lookup(map_labels, map_cx, labels[bad], default=np.nan)
        y[bad] = _lookup(map_labels, map_cy, labels[bad], default=np.nan)
    area = _lookup(map_labels, map_counts, labels)
    return {"label": labels, "x": x, "y": y, "flux": flux, "class": cls, "area": area}


def _truth_arrays(truth_table, *, need_snr):
    names = _column_names(truth_table)
    missing = [c for c in _TRUTH_REQUIRED if c not in names]
    if need_snr and "snr" not in names:
        missing.append("snr")
    if missing:
        raise ValueError(f"truth_table lacks column(s) {missing} (it has {names}); a truth "
                         "table needs id (== truth label), x, y (0-based pixels), and snr when "
                         "min_snr > 0")
    ids = _int_ids(_float_column(truth_table, "id"), "truth_table['id']")
    n = ids.size

    def optional_float(name):
        return _float_column(truth_table, name) if name in names else np.full(n, np.nan)

    return {
        "id": ids,
        "x": _float_column(truth_table, "x"),
        "y": _float_column(truth_table, "y"),
        "flux": optional_float("flux"),
        "snr": optional_float("snr"),
        "blended": (_bool_column(truth_table, "blended") if "blended" in names
                    else np.zeros(n, dtype=bool)),
        "is_star": _bool_column(truth_table, "is_star") if "is_star" in names else None,
    }


def _intersections(pred_labels, truth_labels, pred_q, truth_q, base):
    """Pixel counts of ``(pred_labels == p) & (truth_labels == t)`` for the queried pairs."""
    both = (pred_labels > 0) & (truth_labels > 0)
    codes = pred_labels[both] * base + truth_labels[both]
    keys, counts = np.unique(codes, return_counts=True)
    return _lookup(keys, counts, pred_q.astype(np.int64) * base + truth_q.astype(np.int64))


# --------------------------------------------------------------------------- one image


def evaluate_image(pred_labels, pred_catalog, truth_labels, truth_table, *, fwhm_pixels,
                   min_snr=0.0, flux_column="segment_flux"):
    """Match one image's predictions to its truth and count what aggregates.

    Parameters
    ----------
    pred_labels : array_like of int, shape (ny, nx)
        Predicted segmentation map, 0 = background.
    pred_catalog : astropy.table.Table, dict of arrays, or None
        Predicted catalog with ``label`` and, optionally, ``x_centroid``,
        ``y_centroid``, ``segment_flux`` (or ``flux_column``) and ``class``
        ('star'/'galaxy').
        Missing or non-finite centroids are computed from ``pred_labels``;
        labels of the map without a catalog row are added the same way.
        None: every source and centroid comes from the map.
    truth_labels : array_like of int, shape (ny, nx)
        Truth segmentation map; label ``id`` is the footprint of truth row ``id``.
    truth_table : astropy.table.Table or dict of arrays
        Truth sources with ``id``, ``x``, ``y`` (0-based pixels) and, optionally,
        ``flux``, ``is_star``, ``blended`` and ``snr``.
    fwhm_pixels : float
        PSF FWHM in pixels: the largest distance of a matched pair.
    min_snr : float, optional
        Only truth rows with ``snr >= min_snr`` are counted (default 0: all
        rows, and ``snr`` is not needed). Matching still uses every row.
    flux_column : str, optional
        Catalog column whose flux is compared with the truth ``flux``
        (default ``segment_flux``; NaN, i.e. not scored, when absent).

    Returns
    -------
    dict
        Counts and sums that `summarize` aggregates: ``n_truth`` (counted truth),
        ``n_truth_total``, ``n_pred``, ``n_pred_ignored`` (matched to uncounted
        truth), ``tp``, ``fp``, ``fn``, ``n_blended``, ``tp_blended``,
        ``iou_sum``, ``flux_rel_errors`` (list of signed
        ``(segment_flux - flux) / flux`` over true positives), the same two
        over blended true positives (``iou_sum_blended``,
        ``flux_rel_errors_blended``), ``class_correct``
        and ``class_total`` (None without a ``class`` column), ``merged``,
        ``shredded``, ``n_by_separation`` and ``tp_by_separation`` (counted
        truth sources and true positives per bin of nearest-neighbour
        separation, `SEPARATION_EDGES`), ``fwhm_pixels`` and ``min_snr``. See
        the module docstring for the definitions.

    Raises
    ------
    ValueError
        If the maps differ in shape, are not non-negative integer 2-D arrays,
        a table lacks a required column or has repeated ids/labels, or
        ``fwhm_pixels`` / ``min_snr`` is invalid.
    """
    pred_labels = _check_labels(pred_labels, "pred_labels")
    truth_labels = _check_labels(truth_labels, "truth_labels")
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"pred_labels shape {pred_labels.shape} differs from truth_labels shape "
                         f"{truth_labels.shape}; both maps must cover the same pixels")
    fwhm = _check_positive(fwhm_pixels, "fwhm_pixels")
    try:
        min_snr = float(min_snr)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"min_snr must be a number, got {min_snr!r}") from exc
    if math.isnan(min_snr):
        raise ValueError("min_snr must be a number, got nan; use 0 to count every truth source")

    pred = _pred_arrays(pred_labels, pred_catalog, flux_column)
    truth = _truth_arrays(truth_table, need_snr=min_snr > 0)
    n_pred = pred["label"].size
    counted = truth["snr"] >= min_snr if min_snr > 0 else np.ones(truth["id"].size, dtype=bool)

    p_idx, t_idx = match_sources(np.column_stack([pred["x"], pred["y"]]),
                                 np.column_stack([truth["x"], truth["y"]]), max_distance=fwhm)
    keep = counted[t_idx]
    tp_p, tp_t = p_idx[keep], t_idx[keep]
    tp = int(keep.sum())
    matched_pred = np.zeros(n_pred, dtype=bool)
    matched_pred[p_idx] = True
    matched_truth = np.zeros(truth["id"].size, dtype=bool)
    matched_truth[t_idx] = True

    # IoU of true positives from one pass over the overlapping pixels.
    t_values, t_counts, _, _ = label_stats(truth_labels)
    base = int(max(truth_labels.max(initial=0), truth["id"].max(initial=0), 0)) + 1
    p_lab, t_id = pred["label"][tp_p], truth["id"][tp_t]
    inter = _intersections(pred_labels, truth_labels, p_lab, t_id, base).astype(float)
    union = pred["area"][tp_p] + _lookup(t_values, t_counts, t_id) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    pf, tf = pred["flux"][tp_p], truth["flux"][tp_t]
    ok = np.isfinite(pf) & np.isfinite(tf) & (tf > 0)
    flux_rel = (pf[ok] - tf[ok]) / tf[ok]
    tp_blended_mask = truth["blended"][tp_t]
    flux_rel_blended = flux_rel[tp_blended_mask[ok]]

    class_correct = class_total = None
    if pred["class"] is not None and truth["is_star"] is not None:
        cls = pred["class"][tp_p]
        scored = (cls == "star") | (cls == "galaxy")
        class_total = int(scored.sum())
        class_correct = int(((cls[scored] == "star") == truth["is_star"][tp_t][scored]).sum())
    elif pred["class"] is not None:
        log.debug("pred_catalog has a class column but truth_table has no is_star; "
                  "star/galaxy accuracy not scored")

    # Merged: unmatched counted truth whose centre is in a matched predicted segment.
    lost = np.flatnonzero(counted & ~matched_truth)
    under = _pixel_values(pred_labels, truth["x"][lost], truth["y"][lost])
    merged = int(np.isin(under, pred["label"][matched_pred]).sum()) if lost.size else 0
    # Shredded: unmatched prediction whose centroid is in a matched truth footprint.
    extra = np.flatnonzero(~matched_pred)
    under = _pixel_values(truth_labels, pred["x"][extra], pred["y"][extra])
    shredded = int(np.isin(under, truth["id"][matched_truth]).sum()) if extra.size else 0

    n_truth = int(counted.sum())
    blended = truth["blended"]
    bins = np.digitize(_neighbour_distance(truth["x"], truth["y"]) / fwhm, SEPARATION_EDGES[1:-1])
    n_sep = np.bincount(bins[counted], minlength=len(SEPARATION_EDGES) - 1)
    tp_sep = np.bincount(bins[tp_t], minlength=len(SEPARATION_EDGES) - 1)
    snr_bins = np.digitize(np.nan_to_num(truth["snr"], nan=-1.0), SNR_EDGES[1:-1])
    in_snr = blended & counted & np.isfinite(truth["snr"])
    n_snr = np.bincount(snr_bins[in_snr], minlength=len(SNR_EDGES) - 1)
    tp_snr = np.bincount(snr_bins[tp_t][in_snr[tp_t]], minlength=len(SNR_EDGES) - 1)
    return {
        "n_truth": n_truth,
        "n_truth_total": int(truth["id"].size),
        "n_pred": int(n_pred),
        "n_pred_ignored": int((~keep).sum()),
        "tp": tp,
        "fp": int(n_pred - p_idx.size),
        "fn": n_truth - tp,
        "n_blended": int((blended & counted).sum()),
        "tp_blended": int(blended[tp_t].sum()),
        "iou_sum": float(iou.sum()),
        "iou_sum_blended": float(iou[tp_blended_mask].sum()),
        "flux_rel_errors": [float(v) for v in flux_rel],
        "flux_rel_errors_blended": [float(v) for v in flux_rel_blended],
        "class_correct": class_correct,
        "class_total": class_total,
        "merged": merged,
        "shredded": shredded,
        "n_by_separation": [int(v) for v in n_sep],
        "tp_by_separation": [int(v) for v in tp_sep],
        "n_blended_by_snr": [int(v) for v in n_snr],
        "tp_blended_by_snr": [int(v) for v in tp_snr],
        "fwhm_pixels": fwhm,
        "min_snr": min_snr,
    }


def _neighbour_distance(x, y):
    """Distance from each position to its nearest other position (inf when alone or not finite)."""
    xy = np.column_stack([x, y]).astype(float)
    out = np.full(len(xy), np.inf)
    ok = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if ok.size > 1:
        out[ok] = cKDTree(xy[ok]).query(xy[ok], k=2)[0][:, 1]
    return out


def _ratio(num, den):
    return float(num) / float(den) if den else float("nan")


def summarize(per_image_results):
    """Aggregate per-image counts into the metrics of a whole data set.

    Ratios are computed from summed counts (not averaged per image).

    Parameters
    ----------
    per_image_results : sequence of dict
        Results of `evaluate_image` (or the ``per_image`` entries of
        `evaluate_directory`, whose ``missing`` flags are counted).

    Returns
    -------
    dict
        ``recall``, ``precision``, ``f1``, ``blended_recall``, ``mean_iou``,
        ``median_abs_flux_error``, ``median_flux_bias`` (median signed
        relative flux error), ``mean_iou_blended`` and
        ``median_abs_flux_error_blended`` (over blended true positives),
        ``star_galaxy_accuracy`` (None when no image
        was scored for class), the recall by nearest-neighbour separation
        (``recall_nn_0_1`` ... ``recall_nn_3_up``) with the counted truth
        sources per bin (``n_by_separation``), blended recall by truth S/N
        (``blended_recall_snr_0_10`` ... ``blended_recall_snr_50_up``, counts
        in ``n_blended_by_snr``), ``merged``, ``shredded``, ``n_images``,
        ``n_missing``, ``n_truth``, ``n_pred``, ``n_pred_ignored``, ``tp``,
        ``fp``, ``fn``, ``n_blended``, ``tp_blended``. Undefined ratios are NaN.

    Raises
    ------
    ValueError
        If an entry lacks one of the counts.
    """
    results = list(per_image_results)
    totals = dict.fromkeys(_COUNT_KEYS, 0)
    iou_sum = iou_sum_blended = 0.0
    flux, flux_blended = [], []
    class_correct = class_total = 0
    scored = False
    n_missing = 0
    n_sep = np.zeros(len(SEPARATION_EDGES) - 1, dtype=np.int64)
    tp_sep = np.zeros_like(n_sep)
    n_snr = np.zeros(len(SNR_EDGES) - 1, dtype=np.int64)
    tp_snr = np.zeros_like(n_snr)
    for i, res in enumerate(results):
        lacking = [k for k in (*_COUNT_KEYS, "iou_sum", "flux_rel_errors") if k not in res]
        if lacking:
            raise ValueError(f"per_image_results[{i}] lacks {lacking}; pass the dicts returned "
                             "by evaluate_image")
        for key in _COUNT_KEYS:
            totals[key] += int(res[key])
        iou_sum += float(res["iou_sum"])
        flux.extend(res["flux_rel_errors"])
        iou_sum_blended += float(res.get("iou_sum_blended", np.nan))
        flux_blended.extend(res.get("flux_rel_errors_blended", []))
        if res.get("class_total") is not None:
            scored = True
            class_correct += int(res["class_correct"])
            class_total += int(res["class_total"])
        n_missing += bool(res.get("missing", False))
        n_sep += np.asarray(res.get("n_by_separation", 0), dtype=np.int64)
        tp_sep += np.asarray(res.get("tp_by_separation", 0), dtype=np.int64)
        n_snr += np.asarray(res.get("n_blended_by_snr", 0), dtype=np.int64)
        tp_snr += np.asarray(res.get("tp_blended_by_snr", 0), dtype=np.int64)
    tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
    flux = np.asarray(flux, dtype=float)
    summary = {
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "blended_recall": _ratio(totals["tp_blended"], totals["n_blended"]),
        "mean_iou": _ratio(iou_sum, tp),
        "median_abs_flux_error": float(np.median(np.abs(flux))) if flux.size else float("nan"),
        "median_flux_bias": float(np.median(flux)) if flux.size else float("nan"),
        "mean_iou_blended": _ratio(iou_sum_blended, totals["tp_blended"]),
        "median_abs_flux_error_blended": (float(np.median(np.abs(flux_blended))) if flux_blended
                                          else float("nan")),
        "star_galaxy_accuracy": _ratio(class_correct, class_total) if scored else None,
        "merged": totals["merged"],
        "shredded": totals["shredded"],
        "n_images": len(results),
        "n_missing": n_missing,
        **{key: _ratio(t, n) for key, t, n in zip(_separation_keys(), tp_sep, n_sep, strict=True)},
        "n_by_separation": [int(v) for v in n_sep],
        **{key: _ratio(t, n) for key, t, n in zip(_snr_keys(), tp_snr, n_snr, strict=True)},
        "n_blended_by_snr": [int(v) for v in n_snr],
    }
    for key in ("n_truth", "n_pred", "n_pred_ignored", "tp", "fp", "fn", "n_blended",
                "tp_blended"):
        summary[key] = totals[key]
    return summary


# --------------------------------------------------------------------------- directories


def _scene_names(truth_dir):
    """Names of the truth scenes in a directory: ``<name>.fits`` with ``<name>_truth.fits``."""
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise InputError(truth_dir, "truth directory does not exist or is not a directory")
    names = []
    for path in sorted(truth_dir.iterdir()):
        if not path.is_file() or not path.name.lower().endswith(dbio.FITS_SUFFIXES):
            continue
        stem = dbio.fits_stem(path)
        if (truth_dir / f"{stem}_truth.fits").is_file():
            names.append((stem, path))
    if not names:
        raise InputError(truth_dir, "holds no truth scene (<name>.fits with <name>_truth.fits "
                         "beside it); write one with deblend.simulate or point --truth elsewhere")
    return names


def _fwhm_from(header, meta, path):
    """PSF FWHM in pixels from PSF_FWHM (arcsec) / PIXSCALE (arcsec/pixel)."""
    for source in (header, meta):
        if source is None:
            continue
        upper = {str(k).upper(): v for k, v in source.items()}
        if "PSF_FWHM" in upper and "PIXSCALE" in upper:
            try:
                return float(upper["PSF_FWHM"]) / float(upper["PIXSCALE"])
            except (TypeError, ValueError, ZeroDivisionError):
                break
    raise InputError(path, "header lacks usable PSF_FWHM (arcsec) and PIXSCALE (arcsec/pixel) "
                     "keywords, needed for the 1 FWHM match radius; pass fwhm_pixels= "
                     "(CLI: --fwhm-pixels) instead")


def _load_truth(truth_dir, name, image_path, fwhm_pixels):
    truth_dir = Path(truth_dir)
    seg_path = truth_dir / f"{name}_truth_seg.fits"
    if not seg_path.is_file():
        raise InputError(seg_path, f"truth segmentation map of scene {name!r} does not exist")
    labels, _ = dbio.read_segmentation(seg_path)
    table = dbio.read_catalog(truth_dir / f"{name}_truth.fits")
    if fwhm_pixels is None:
        header = dbio.read_header(image_path)  # only the header: PSF_FWHM, PIXSCALE
        fwhm = _fwhm_from(header, getattr(table, "meta", None), image_path)
    else:
        fwhm = fwhm_pixels
    return labels, table, fwhm


def _find_prediction(pred_dir, name, fmt):
    """Return ``(seg_path or None, catalog_path or None)`` of one scene's predictions."""
    seg = pred_dir / f"{name}_seg.fits"
    formats = (fmt,) if fmt is not None else _CATALOG_SEARCH
    cat = None
    for f in formats:
        candidate = pred_dir / f"{name}_cat{dbio.CATALOG_FORMATS[f][1]}"
        if candidate.is_file():
            cat = candidate
            break
    return (seg if seg.is_file() else None), cat


def _missing_result(truth_table, *, fwhm_pixels, min_snr):
    """Evaluate an image with no prediction: every counted truth source is missed."""
    empty = np.zeros((1, 1), dtype=np.int32)
    return evaluate_image(empty, None, empty, truth_table, fwhm_pixels=fwhm_pixels,
                          min_snr=min_snr)


def _method_name(methods, pred_dir):
    if not methods:
        return Path(pred_dir).name or Path(pred_dir).resolve().name
    unique = sorted(set(methods))
    if len(unique) > 1:
        log.warning("%s: images were made by different methods %s; reporting %r", pred_dir,
                    unique, methods[0])
    return methods[0]


def _evaluate_dirs(pred_dirs, truth_dir, *, min_snr=0.0, catalog_format=None, fwhm_pixels=None,
                   flux_column="segment_flux"):
    """Evaluate several prediction directories against one truth directory, reading truth once."""
    pred_dirs = [Path(p) for p in pred_dirs]
    for p in pred_dirs:
        if not p.is_dir():
            raise InputError(p, "prediction directory does not exist or is not a directory")
    if catalog_format is not None and catalog_format not in dbio.CATALOG_FORMATS:
        raise ValueError(f"catalog_format must be one of {sorted(dbio.CATALOG_FORMATS)} or None "
                         f"(search all), got {catalog_format!r}")
    if fwhm_pixels is not None:
        fwhm_pixels = _check_positive(fwhm_pixels, "fwhm_pixels")
    scenes = _scene_names(truth_dir)
    per_image = [[] for _ in pred_dirs]
    missing = [[] for _ in pred_dirs]
    methods = [[] for _ in pred_dirs]
    for name, image_path in scenes:
        truth_labels, truth_table, fwhm = _load_truth(truth_dir, name, image_path, fwhm_pixels)
        for k, pred_dir in enumerate(pred_dirs):
            seg_path, cat_path = _find_prediction(pred_dir, name, catalog_format)
            if seg_path is None:
                if cat_path is not None:
                    log.warning("%s: %s has a catalog but no %s_seg.fits; counted as missing",
                                pred_dir, name, name)
                else:
                    log.warning("%s: no prediction for %s; its sources count as missed",
                                pred_dir, name)
                res = _missing_result(truth_table, fwhm_pixels=fwhm, min_snr=min_snr)
                missing[k].append(name)
                per_image[k].append({"name": name, "missing": True, **res})
                continue
            pred_labels, header = dbio.read_segmentation(seg_path)
            if pred_labels.shape != truth_labels.shape:
                raise InputError(seg_path, f"shape {pred_labels.shape} differs from the truth "
                                 f"map's {truth_labels.shape}; was it made from {image_path}?")
            if "DBMETHOD" in header:
                methods[k].append(str(header["DBMETHOD"]))
            if cat_path is None:
                log.warning("%s: no catalog for %s; centroids come from the map and fluxes "
                            "are not scored", pred_dir, name)
                catalog = None
            else:
                catalog = dbio.read_catalog(cat_path)
                if flux_column not in catalog.colnames:
                    raise InputError(cat_path, f"has no column {flux_column!r} to score fluxes "
                                     f"(its columns: {catalog.colnames}); choose flux_column "
                                     "(--flux-column) among them, e.g. 'segment_flux'")
            res = evaluate_image(pred_labels, catalog, truth_labels, truth_table,
                                 fwhm_pixels=fwhm, min_snr=min_snr, flux_column=flux_column)
            per_image[k].append({"name": name, "missing": False, **res})
    results = []
    for k, pred_dir in enumerate(pred_dirs):
        summary = summarize(per_image[k])
        method = _method_name(methods[k], pred_dir)
        log.info("%s (%s): recall %.3f, precision %.3f, F1 %.3f over %d images (%d missing)",
                 method, pred_dir, summary["recall"], summary["precision"], summary["f1"],
                 summary["n_images"], summary["n_missing"])
        results.append({
            "method": method,
            "pred_dir": str(pred_dir),
            "truth_dir": str(truth_dir),
            "min_snr": float(min_snr),
            "flux_column": flux_column,
            "missing": missing[k],
            "summary": summary,
            "per_image": per_image[k],
        })
    return results


def evaluate_directory(pred_dir, truth_dir, *, min_snr=0.0, catalog_format=None,
                       fwhm_pixels=None, flux_column="segment_flux"):
    """Evaluate one directory of predictions against a directory of simulated truth.

    Parameters
    ----------
    pred_dir : str or os.PathLike
        Holds ``<name>_seg.fits`` and ``<name>_cat.<ext>`` per truth scene.
    truth_dir : str or os.PathLike
        Holds ``<name>.fits`` (header ``PSF_FWHM`` in arcsec, ``PIXSCALE`` in
        arcsec/pixel), ``<name>_truth_seg.fits`` and ``<name>_truth.fits``.
    min_snr : float, optional
        Count only truth sources with ``snr >= min_snr`` (default 0: all).
    catalog_format : str, optional
        Catalog format to read (a key of `deblend.io.CATALOG_FORMATS`).
        Default: the first of ``.fits``, ``.ecsv``, ``.csv``, ``.parquet``,
        ``.xml`` that exists.
    fwhm_pixels : float, optional
        Match radius in pixels for every scene, instead of the headers'
        ``PSF_FWHM / PIXSCALE``.
    flux_column : str, optional
        Catalog column whose flux errors are scored (default
        ``segment_flux``; ``kron_flux`` for total fluxes).

    Returns
    -------
    dict
        ``method`` (``DBMETHOD`` of the predicted maps, else the directory
        name), ``pred_dir``, ``truth_dir``, ``min_snr``, ``flux_column``, ``missing`` (scene
        names without a predicted map; their sources count as false
        negatives), ``summary`` (see `summarize`) and ``per_image`` (the
        `evaluate_image` result of each scene with its ``name`` and
        ``missing`` flag).

    Raises
    ------
    InputError
        If a directory does not exist, the truth directory holds no scene, a
        truth file is missing or unreadable, a predicted map differs in shape
        from the truth, or a scene header lacks ``PSF_FWHM`` / ``PIXSCALE``
        (and ``fwhm_pixels`` is not given).
    ValueError
        If ``catalog_format``, ``fwhm_pixels`` or ``min_snr`` is invalid.
    """
    return _evaluate_dirs([pred_dir], truth_dir, min_snr=min_snr, catalog_format=catalog_format,
                          fwhm_pixels=fwhm_pixels, flux_column=flux_column)[0]


def compare_methods(pred_dirs, truth_dir, **kwargs):
    """Evaluate several prediction directories against the same truth.

    Each truth scene is read once for all methods.

    Parameters
    ----------
    pred_dirs : sequence of str or os.PathLike
        One directory per method (a single path is accepted too).
    truth_dir : str or os.PathLike
        The truth directory.
    **kwargs
        Options of `evaluate_directory` (``min_snr``, ``catalog_format``,
        ``fwhm_pixels``, ``flux_column``).

    Returns
    -------
    list of dict
        One `evaluate_directory` result per directory, in the order given.

    Raises
    ------
    ValueError
        If ``pred_dirs`` is empty; see also `evaluate_directory`.
    """
    if isinstance(pred_dirs, (str, Path)):
        pred_dirs = [pred_dirs]
    pred_dirs = list(pred_dirs)
    if not pred_dirs:
        raise ValueError("pred_dirs must name at least one prediction directory, got none")
    return _evaluate_dirs(pred_dirs, truth_dir, **kwargs)


# --------------------------------------------------------------------------- reporting


def _format_value(value, kind):
    if value is None:
        return "n/a"
    if kind == "count":
        return str(int(value))
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_table(results):
    """Format evaluation results as a plain-text table, one column per method.

    Parameters
    ----------
    results : dict or sequence of dict
        Results of `evaluate_directory` / `compare_methods`.

    Returns
    -------
    str
        Rows of metrics (ratios with 3 decimals, counts as integers,
        undefined values as ``n/a``); columns headed by method names
        (with the directory name when two methods share a name).
    """
    if isinstance(results, dict):
        results = [results]
    results = list(results)
    methods = [str(r.get("method", f"method{i}")) for i, r in enumerate(results)]
    headers = [
        f"{m} ({Path(r.get('pred_dir', '')).name})" if methods.count(m) > 1 else m
        for m, r in zip(methods, results, strict=True)
    ]
    rows = _TABLE_ROWS
    flux_columns = {r.get("flux_column", "segment_flux") for r in results}
    if flux_columns != {"segment_flux"}:  # say which flux the flux rows score
        named = f"median |Δflux|/flux ({', '.join(sorted(flux_columns))})"
        rows = [(named if key == "median_abs_flux_error" else label, key, kind)
                for label, key, kind in rows]
    label_width = max(len("metric"), *(len(label) for label, _, _ in rows))
    cells = [[_format_value(r["summary"].get(key), kind) for r in results]
             for _, key, kind in rows]
    widths = [max(len(h), *(len(row[j]) for row in cells)) for j, h in enumerate(headers)]
    lines = ["  ".join(["metric".ljust(label_width)]
                       + [h.rjust(w) for h, w in zip(headers, widths, strict=True)])]
    lines.append("  ".join(["-" * label_width] + ["-" * w for w in widths]))
    for (label, _, _), row in zip(rows, cells, strict=True):
        lines.append("  ".join([label.ljust(label_width)]
                               + [c.rjust(w) for c, w in zip(row, widths, strict=True)]))
    return "\n".join(lines)


def _to_jsonable(obj):
    """Convert numpy scalars/arrays, paths and non-finite floats to plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if obj is None or isinstance(obj, (str, bool, np.bool_)):
        return bool(obj) if isinstance(obj, np.bool_) else obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} ({obj!r}) to JSON")


def write_json(results, path):
    """Write evaluation results to a JSON file atomically.

    Numpy scalars and arrays become plain numbers and lists; NaN and infinite
    values become ``null``.

    Parameters
    ----------
    results : dict or list of dict
        Results of `evaluate_directory` / `compare_methods`.
    path : str or os.PathLike
        Destination; replaced if it exists.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    text = json.dumps(_to_jsonable(results), indent=2, allow_nan=False)
    with dbio.atomic_path(path) as tmp:
        Path(tmp).write_text(text + "\n", encoding="utf-8")
    return Path(path)
