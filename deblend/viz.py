"""Matplotlib figures for notebooks, quick-looks and the README.

Two kinds of function:

- ``show_image``, ``overlay_segmentation`` and ``draw_boxes`` draw into an
  `~matplotlib.axes.Axes` you pass and return what they added;
- ``plot_*`` functions build a new `~matplotlib.figure.Figure` and return it.

Nothing here calls ``plt.show()`` or touches pyplot's global state: figures are
``matplotlib.figure.Figure`` objects, shown by Jupyter when they are a cell's
last value and written with ``fig.savefig``. Images are shown with
``origin='lower'`` so pixel (x, y) = ``image[y, x]`` appears where DS9 shows
it; axes are in pixels of the full image, also for cut-outs (``offset``).

Colours are stable: label ``k`` gets the same colour in every figure (for the
same ``seed``), whatever the number of labels, so a source keeps its colour in
a zoom, a cut-out or a gallery of samples.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.ticker import LogFormatter

__all__ = [
    "label_colors",
    "show_image",
    "overlay_segmentation",
    "draw_boxes",
    "plot_comparison",
    "plot_blend",
    "plot_samples",
    "plot_catalog",
]

_GOLDEN = 0.618033988749895
#: Colours of the star and galaxy classes in catalog plots (other classes cycle through the default colours).
_CLASS_COLORS = {"star": "tab:orange", "galaxy": "tab:blue"}


def label_colors(n_labels, *, seed=0):
    """Stable, distinguishable RGBA colours for labels 0..n (row 0, the background, is transparent).

    The colour of label ``k`` depends only on ``k`` and ``seed`` (hues spaced
    by the golden ratio), so it is the same in every figure whatever
    ``n_labels`` is; consecutive labels get clearly different hues. Colours
    are light (saturation 0.75, value 1) so they stand out on a dark sky.

    Parameters
    ----------
    n_labels : int
        Largest label.
    seed : int, optional
        Shifts every hue (another palette).

    Returns
    -------
    ndarray of float, shape (n_labels + 1, 4)
        Row ``k`` is the colour of label ``k``.
    """
    from matplotlib.colors import hsv_to_rgb

    n = max(int(n_labels), 0)
    offset = np.random.default_rng(seed).random()
    k = np.arange(1, n + 1)
    hsv = np.stack([(offset + k * _GOLDEN) % 1.0, np.full(n, 0.75), np.ones(n)], axis=-1)
    colors = np.zeros((n + 1, 4))
    colors[1:, :3] = hsv_to_rgb(hsv) if n else np.zeros((0, 3))
    colors[1:, 3] = 1.0
    return colors


def _as_image(image, name="image"):
    image = np.asarray(image, dtype=float)
    if image.ndim != 2:
        raise ValueError(f"{name} must be 2-D (ny, nx), got shape {image.shape}; "
                         "for several bands pass one band or their mean")
    return image


def _as_labels(labels, shape=None, name="labels"):
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"{name} must be a 2-D integer label map, got {labels.dtype} of shape {labels.shape}")
    if shape is not None and labels.shape != tuple(shape):
        raise ValueError(f"{name} shape {labels.shape} differs from the image shape {tuple(shape)}")
    return labels.astype(np.int64, copy=False)


def _extent(shape, offset):
    """The imshow extent that puts pixel (i, j) of an array at (x0 + j, y0 + i) with centres on integers."""
    y0, x0 = offset
    ny, nx = shape
    return (x0 - 0.5, x0 + nx - 0.5, y0 - 0.5, y0 + ny - 0.5)


def _norm(image, stretch, percent):
    from astropy.visualization import ImageNormalize, LinearStretch, ZScaleInterval, simple_norm
    from matplotlib.colors import Normalize

    finite = image[np.isfinite(image)]
    if finite.size == 0 or finite.min() == finite.max():  # nothing to stretch: a flat grey image
        level = float(finite[0]) if finite.size else 0.0
        return Normalize(vmin=level - 1.0, vmax=level + 1.0)
    if stretch == "zscale":
        return ImageNormalize(finite, interval=ZScaleInterval(), stretch=LinearStretch())
    return simple_norm(finite, stretch, percent=percent)


def show_image(ax, image, *, stretch="asinh", percent=99.5, cmap="gray", offset=(0, 0)):
    """Draw a 2-D image with an astropy stretch.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    image : ndarray, shape (ny, nx)
        Non-finite pixels are left blank.
    stretch : {'asinh', 'linear', 'log', 'sqrt', 'zscale'}, optional
        ``'zscale'`` is IRAF's zscale interval with a linear stretch; the
        others use the ``percent`` interval.
    percent : float, optional
        Percentile interval for the limits (ignored for ``'zscale'``).
    cmap : str, optional
    offset : tuple of int, optional
        ``(y0, x0)`` of ``image[0, 0]`` in the full image (axes in full-image pixels).

    Returns
    -------
    matplotlib.image.AxesImage
    """
    image = _as_image(image)
    norm = _norm(image, stretch, percent)
    return ax.imshow(image, origin="lower", norm=norm, cmap=cmap, interpolation="nearest",
                     extent=_extent(image.shape, offset))


def _auto_thickness(ax, shape):
    """Outline width in image pixels so that outlines stay at least one screen pixel wide."""
    fig = ax.figure
    width_px = ax.get_position().width * fig.get_size_inches()[0] * fig.dpi
    height_px = ax.get_position().height * fig.get_size_inches()[1] * fig.dpi
    zoom = min(width_px / max(shape[1], 1), height_px / max(shape[0], 1))
    return max(1, math.ceil(1.0 / zoom)) if zoom > 0 else 1


def overlay_segmentation(ax, labels, *, alpha=0.9, fill_alpha=0.0, thickness=1, highlight=None, seed=0,
                         offset=(0, 0)):
    """Draw a label map over an image: each source's outline (and optionally its area) in its own colour.

    Outlines are the pixels of each source that touch another label or the
    background (`skimage.segmentation.find_boundaries`, ``mode='inner'``), so
    they lie on the source's own pixels and two touching sources both show
    their edge.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    labels : ndarray of int, shape (ny, nx)
        0 = background.
    alpha : float, optional
        Opacity of the outlines.
    fill_alpha : float, optional
        Opacity of each source's area (0: outlines only).
    thickness : int or None, optional
        Outline width in image pixels (grown inwards). None picks the width at
        which outlines stay visible at the axes' size on screen (large images
        in small figures).
    highlight : sequence of int, optional
        Labels drawn at full opacity; the others at a third of it.
    seed : int, optional
        Palette (see `label_colors`).
    offset : tuple of int, optional
        ``(y0, x0)`` of ``labels[0, 0]`` in the full image.

    Returns
    -------
    matplotlib.image.AxesImage
    """
    from scipy.ndimage import binary_dilation
    from skimage.segmentation import find_boundaries

    labels = _as_labels(labels)
    if thickness is None:
        thickness = _auto_thickness(ax, labels.shape)
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"thickness must be a positive integer or None, got {thickness!r}")
    source = labels > 0
    edges = find_boundaries(labels, mode="inner") & source
    if thickness > 1:
        edges = binary_dilation(edges, iterations=int(thickness) - 1) & source
    colors = label_colors(int(labels.max()) if labels.size else 0, seed=seed)
    rgba = colors[labels].copy()
    rgba[..., 3] = np.where(edges, alpha, np.where(source, fill_alpha, 0.0))
    if highlight is not None:
        faint = source & ~np.isin(labels, np.asarray(list(highlight), dtype=np.int64))
        rgba[faint, 3] /= 3.0
    return ax.imshow(rgba, origin="lower", interpolation="nearest", extent=_extent(labels.shape, offset))


def _column(table, name):
    """A table column as a float ndarray (units dropped, masked entries NaN)."""
    col = table[name]
    values = getattr(col, "value", col)
    if np.ma.isMaskedArray(values):
        values = values.filled(np.nan)
    return np.asarray(values, dtype=float)


def _str_column(table, name):
    col = table[name]
    values = col.filled("") if np.ma.isMaskedArray(col) else col
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=str)


def _outlined_text(ax, x, y, text, *, color="white", fontsize=7, **kwargs):
    import matplotlib.patheffects as pe

    return ax.text(x, y, text, color=color, fontsize=fontsize, clip_on=True,
                   path_effects=[pe.withStroke(linewidth=2, foreground="black")], **kwargs)


def draw_boxes(ax, catalog, *, labels=None, annotate=True, score_column=None, linewidth=1.0, linestyle="-",
               fontsize=7, seed=0):
    """Draw each source's bounding box from a catalog, with its class and score.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    catalog : astropy.table.Table
        With ``label``, ``bbox_xmin``, ``bbox_xmax``, ``bbox_ymin``,
        ``bbox_ymax`` (inclusive pixel indices, photutils' convention) and,
        optionally, ``class`` and a score column.
    labels : sequence of int, optional
        Only these sources (default: every row).
    annotate : bool, optional
        Write ``<class> <score>`` above each box (the label number when the
        catalog has neither).
    score_column : str, optional
        Score to print. Default: ``det_score`` (the detection score, see
        `deblend.segment.Instances`) when present, else ``class_prob``, else none.
    linewidth : float, optional
    linestyle : str, optional
    fontsize : float, optional
    seed : int, optional
        Palette (see `label_colors`): boxes take their source's outline colour.

    Returns
    -------
    list of matplotlib.patches.Rectangle

    Raises
    ------
    ValueError
        If a bbox column is missing, or ``score_column`` is not in the catalog.
    """
    from matplotlib.patches import Rectangle

    needed = ["label", "bbox_xmin", "bbox_xmax", "bbox_ymin", "bbox_ymax"]
    missing = [c for c in needed if c not in catalog.colnames]
    if missing:
        raise ValueError(f"catalog lacks the columns {missing}; draw_boxes needs {needed} "
                         "(as written by deblend.catalog.make_catalog)")
    if score_column is None:
        score_column = next((c for c in ("det_score", "class_prob") if c in catalog.colnames), None)
    elif score_column not in catalog.colnames:
        raise ValueError(f"score_column {score_column!r} is not a catalog column; columns: {catalog.colnames}")
    ids = np.asarray(catalog["label"], dtype=np.int64)
    rows = np.arange(len(catalog)) if labels is None else np.flatnonzero(np.isin(ids, list(labels)))
    x0, x1 = _column(catalog, "bbox_xmin"), _column(catalog, "bbox_xmax")
    y0, y1 = _column(catalog, "bbox_ymin"), _column(catalog, "bbox_ymax")
    classes = _str_column(catalog, "class") if "class" in catalog.colnames else None
    scores = _column(catalog, score_column) if score_column else None
    colors = label_colors(int(ids.max()) if ids.size else 0, seed=seed)
    patches = []
    for i in rows:
        color = colors[ids[i]]
        rect = Rectangle((x0[i] - 0.5, y0[i] - 0.5), x1[i] - x0[i] + 1, y1[i] - y0[i] + 1, fill=False,
                         edgecolor=color, linewidth=linewidth,
                         linestyle=linestyle)
        ax.add_patch(rect)
        patches.append(rect)
        if annotate:
            parts = [classes[i]] if classes is not None else []
            if scores is not None and np.isfinite(scores[i]):
                parts.append(f"{scores[i]:.2f}")
            _outlined_text(ax, x0[i] - 0.5, y1[i] + 0.5, " ".join(parts) or str(ids[i]), color=color,
                           fontsize=fontsize, va="bottom", ha="left")
    return patches


def _annotate_labels(ax, labels, which, *, offset=(0, 0), fontsize=8, seed=0):
    """Write each label's number at the centre of its pixels."""
    from scipy.ndimage import center_of_mass

    which = [int(v) for v in which]
    if not which:
        return []
    centres = center_of_mass(np.ones(labels.shape), labels, which)
    colors = label_colors(max(which), seed=seed)
    return [_outlined_text(ax, offset[1] + cx, offset[0] + cy, str(k), color=colors[k], fontsize=fontsize,
                           ha="center", va="center", fontweight="bold")
            for k, (cy, cx) in zip(which, centres, strict=True)]


def _n_sources(labels):
    """``'N sources'`` (``'1 source'``) for a label map."""
    n = int(np.unique(labels[labels > 0]).size)
    return f"{n} source{'' if n == 1 else 's'}"


def plot_comparison(image, label_maps, *, stretch="asinh", panel_size=4.0, title=None, offset=(0, 0), seed=0):
    """Side-by-side panels: the image, then each label map's outlines over it.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    label_maps : dict of str to ndarray
        Panel title -> label map (e.g. ``{'truth': ..., 'sep': ..., 'photutils': ...}``).
    stretch : str, optional
        See `show_image`.
    panel_size : float, optional
        Inches per panel.
    title : str, optional
    offset : tuple of int, optional
        ``(y0, x0)`` of ``image[0, 0]`` in the full image, when comparing cut-outs.
    seed : int, optional
        Palette (see `label_colors`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    image = _as_image(image)
    maps = {name: _as_labels(labels, image.shape, name=f"label_maps[{name!r}]")
            for name, labels in label_maps.items()}
    n = 1 + len(maps)
    # room for the panel titles, the x labels and the title: a shorter figure makes them overlap
    fig = Figure(figsize=(panel_size * n, panel_size + (0.9 if title else 0.6)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharex=True, sharey=True))
    show_image(axes[0], image, stretch=stretch, offset=offset)
    axes[0].set_title("image")
    for ax, (name, labels) in zip(axes[1:], maps.items(), strict=True):
        show_image(ax, image, stretch=stretch, offset=offset)
        overlay_segmentation(ax, labels, thickness=None, seed=seed, offset=offset)
        ax.set_title(f"{name} ({_n_sources(labels)})")
    for ax in axes:
        ax.set_xlabel("x [pix]")
    axes[0].set_ylabel("y [pix]")
    if title:
        fig.suptitle(title)
    return fig


def _crop_box(labels, group, pad):
    """(y0, y1, x0, x1) of the union bbox of ``group`` grown by ``pad`` and clipped to the map."""
    ys, xs = np.nonzero(np.isin(labels, group))
    ny, nx = labels.shape
    return (max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, ny),
            max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, nx))


def plot_blend(image, labels, group_labels, *, pad=8, catalog=None, stretch="asinh", panel_size=3.5,
               title=None, seed=0):
    """Zoom on a blend group: the image, the label map and the outlines, cropped around the group.

    The crop is the union of the group's bounding boxes grown by ``pad``
    pixels (clipped to the image). Neighbours that reach into the crop are
    drawn faint; the group's sources at full strength with their label
    numbers. Axes are in pixels of the full image.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    labels : ndarray of int, shape (ny, nx)
    group_labels : sequence of int
        The labels of the blend group (one label zooms on one source).
    pad : int, optional
        Margin around the group in pixels.
    catalog : astropy.table.Table, optional
        When given (with bbox columns), the group's boxes with class and
        score are drawn on the last panel (see `draw_boxes`).
    stretch : str, optional
        See `show_image`.
    panel_size : float, optional
        Inches per panel.
    title : str, optional
        Default: ``'blend of labels ...'``.
    seed : int, optional
        Palette (see `label_colors`).

    Returns
    -------
    matplotlib.figure.Figure
        Three panels: image, label map, outlines over the image.

    Raises
    ------
    ValueError
        If ``group_labels`` is empty or none of them is in ``labels``, or
        ``pad`` is negative.
    """
    from matplotlib.figure import Figure

    image = _as_image(image)
    labels = _as_labels(labels, image.shape)
    group = np.unique(np.asarray(list(group_labels), dtype=np.int64))
    if group.size == 0:
        raise ValueError("group_labels must name at least one label, got none")
    if int(pad) != pad or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    present = group[np.isin(group, labels)]
    if present.size == 0:
        raise ValueError(f"none of group_labels {group.tolist()} is in the label map "
                         f"(labels present: 1..{int(labels.max())})" if labels.any() else
                         f"none of group_labels {group.tolist()} is in the label map: it has no source")
    y0, y1, x0, x1 = _crop_box(labels, present, int(pad))
    crop, crop_labels, offset = image[y0:y1, x0:x1], labels[y0:y1, x0:x1], (y0, x0)

    ny, nx = crop.shape
    height = panel_size * min(max(ny / nx, 0.4), 2.5)
    fig = Figure(figsize=(3 * panel_size, height + 0.8), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    show_image(axes[0], crop, stretch=stretch, offset=offset)
    axes[0].set_title("image")
    axes[1].set_facecolor("black")
    overlay_segmentation(axes[1], crop_labels, alpha=1.0, fill_alpha=1.0, highlight=present, seed=seed,
                         offset=offset)
    axes[1].set_title("label map")
    show_image(axes[2], crop, stretch=stretch, offset=offset)
    overlay_segmentation(axes[2], crop_labels, thickness=1, highlight=present, seed=seed, offset=offset)
    _annotate_labels(axes[2], crop_labels, present, offset=offset, seed=seed)
    if catalog is not None:
        draw_boxes(axes[2], catalog, labels=present, linewidth=0.8, linestyle="--", fontsize=8, seed=seed)
    axes[2].set_title("outlines")
    axes[0].set_xlim(x0 - 0.5, x1 - 0.5)
    axes[0].set_ylim(y0 - 0.5, y1 - 0.5)
    for ax in axes:
        ax.set_xlabel("x [pix]")
    axes[0].set_ylabel("y [pix]")
    fig.suptitle(title if title is not None else f"blend of label{'s' if present.size > 1 else ''} "
                 + ", ".join(str(v) for v in present))
    return fig


def plot_samples(cutout, samples, uncertainty=None, *, n_show=8, n_cols=5, stretch="asinh", panel_size=2.5,
                 offset=(0, 0), title=None, seed=0):
    """A gallery of sampled label maps of one cut-out, and its uncertainty map.

    Panels: the cut-out image, up to ``n_show`` samples (each label's area
    and outline over the image, a label keeping its colour in every sample),
    and, when given, the uncertainty map with a colour bar.

    Parameters
    ----------
    cutout : ndarray, shape (ny, nx)
        The image around a blend.
    samples : ndarray of int, shape (n_samples, ny, nx)
        Label maps drawn for the cut-out (0 = background).
    uncertainty : ndarray, shape (ny, nx), optional
        A per-pixel uncertainty (e.g. 1 - the probability of the most likely
        owner), shown on its own panel.
    n_show : int, optional
        Largest number of samples shown (the first ones).
    n_cols : int, optional
        Panels per row.
    stretch : str, optional
        See `show_image`.
    panel_size : float, optional
        Inches per panel.
    offset : tuple of int, optional
        ``(y0, x0)`` of the cut-out in the full image.
    title : str, optional
    seed : int, optional
        Palette (see `label_colors`).

    Returns
    -------
    matplotlib.figure.Figure
        ``1 + min(n_samples, n_show)`` panels, plus the uncertainty map and
        its colour bar (two more axes) when ``uncertainty`` is given.

    Raises
    ------
    ValueError
        If the shapes disagree, ``samples`` is not 3-D or empty, or
        ``n_show`` / ``n_cols`` is not a positive integer.
    """
    from matplotlib.figure import Figure

    cutout = _as_image(cutout, "cutout")
    samples = np.asarray(samples)
    if samples.ndim != 3 or samples.shape[0] == 0 or not np.issubdtype(samples.dtype, np.integer):
        raise ValueError(f"samples must be integer label maps of shape (n_samples, ny, nx) with n_samples >= 1, "
                         f"got {samples.dtype} of shape {samples.shape}")
    if samples.shape[1:] != cutout.shape:
        raise ValueError(f"samples shape {samples.shape} does not match the cutout shape {cutout.shape}")
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, dtype=float)
        if uncertainty.shape != cutout.shape:
            raise ValueError(f"uncertainty shape {uncertainty.shape} does not match the cutout shape "
                             f"{cutout.shape}")
    for name, value in (("n_show", n_show), ("n_cols", n_cols)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    shown = samples[: int(n_show)]
    n_panels = 1 + len(shown) + (uncertainty is not None)
    n_cols = min(int(n_cols), n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    ny, nx = cutout.shape
    aspect = min(max(ny / nx, 0.4), 2.5)
    # the uncertainty map takes the last column of the last row (always free), its colour bar a narrow
    # extra column beside it, so the panels keep one size and stay aligned
    slots = [(i // n_cols, i % n_cols) for i in range(1 + len(shown))]
    if uncertainty is not None:
        slots.append((n_rows - 1, n_cols - 1))
    extra = 0.08 if uncertainty is not None else 0.0
    fig = Figure(figsize=(panel_size * (n_cols + extra), panel_size * aspect * n_rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(n_rows, n_cols + (uncertainty is not None),
                            width_ratios=[1.0] * n_cols + ([extra] if uncertainty is not None else []))
    axes = []
    for row, col in slots:
        ax = fig.add_subplot(grid[row, col], sharex=axes[0] if axes else None, sharey=axes[0] if axes else None)
        if col > 0:
            ax.tick_params(labelleft=False)
        axes.append(ax)
    show_image(axes[0], cutout, stretch=stretch, offset=offset)
    axes[0].set_title("image")
    for i, (ax, sample) in enumerate(zip(axes[1:], shown, strict=False)):
        show_image(ax, cutout, stretch=stretch, offset=offset)
        overlay_segmentation(ax, sample, fill_alpha=0.35, seed=seed, offset=offset)
        ax.set_title(f"sample {i} ({_n_sources(sample)})", fontsize=9)
    if uncertainty is not None:
        ax = axes[-1]
        finite = uncertainty[np.isfinite(uncertainty)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        im = ax.imshow(uncertainty, origin="lower", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest",
                       extent=_extent(uncertainty.shape, offset))
        fig.colorbar(im, cax=fig.add_subplot(grid[slots[-1][0], n_cols]))
        ax.set_title("uncertainty", fontsize=9)
    fig.suptitle(title if title is not None else
                 f"{len(shown)} of {samples.shape[0]} sample{'s' if samples.shape[0] > 1 else ''}")
    return fig


def _no_data(ax, text="no sources"):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_catalog(catalog, *, flux_column="segment_flux", error_column=None, size_column="semimajor_axis",
                 zeropoint=None, panel_size=3.5, title=None):
    """Catalog overview: flux against flux error, size against magnitude, and class counts.

    Points are coloured by class when the catalog has a ``class`` column
    (stars orange, galaxies blue), and a third panel then counts the classes.
    Sources with a non-positive or non-finite flux have no magnitude and are
    left out of the log-scale panels (the panel title says how many).

    Parameters
    ----------
    catalog : astropy.table.Table
        A deblend catalog (see `deblend.catalog.make_catalog`).
    flux_column : str, optional
        Flux to plot (e.g. ``'kron_flux'``, or a per-band ``'segment_flux_r'``).
    error_column : str, optional
        Its error; default ``<flux_column>_err`` (``segment_flux_err`` for
        ``segment_flux``, and so on), or ``<flux>_err_<band>`` for per-band
        columns.
    size_column : str, optional
        Size in pixels (e.g. ``'semimajor_axis'``, or ``'area'`` in pixels²).
    zeropoint : float, optional
        Magnitude zero point: ``mag = zeropoint - 2.5 log10(flux)``. Default:
        instrumental magnitudes (zero point 0).
    panel_size : float, optional
        Inches per panel.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Two panels, three with a ``class`` column.

    Raises
    ------
    ValueError
        If a column is missing (the message lists the catalog's columns).
    """
    from matplotlib.figure import Figure

    if error_column is None:
        error_column = _error_column_name(flux_column)
    for name in (flux_column, error_column, size_column):
        if name not in catalog.colnames:
            raise ValueError(f"catalog has no column {name!r}; columns: {catalog.colnames}")
    flux, err, size = (_column(catalog, c) for c in (flux_column, error_column, size_column))
    classes = _str_column(catalog, "class") if "class" in catalog.colnames else None
    n_panels = 3 if classes is not None else 2
    fig = Figure(figsize=(panel_size * n_panels + 0.3, panel_size + 0.5), layout="constrained")
    axes = fig.subplots(1, n_panels)
    good = np.isfinite(flux) & (flux > 0)
    mag = np.full(flux.shape, np.nan)
    mag[good] = (zeropoint or 0.0) - 2.5 * np.log10(flux[good])
    groups = ([(name, classes == name) for name in _class_order(classes)] if classes is not None
              else [("sources", np.ones(len(flux), bool))])

    ax_flux, ax_size = axes[0], axes[1]
    shown_flux = good & np.isfinite(err) & (err > 0)
    for name, sel in groups:
        s = sel & shown_flux
        ax_flux.scatter(flux[s], err[s], s=8, alpha=0.7, color=_CLASS_COLORS.get(name), label=f"{name} ({s.sum()})")
        s = sel & good & np.isfinite(size)
        ax_size.scatter(mag[s], size[s], s=8, alpha=0.7, color=_CLASS_COLORS.get(name), label=f"{name} ({s.sum()})")
    if shown_flux.any():
        lo, hi = flux[shown_flux].min(), flux[shown_flux].max()
        xs = np.geomspace(lo, hi, 20)
        for snr, style in ((5, ":"), (20, "--")):
            ax_flux.plot(xs, xs / snr, style, color="0.5", linewidth=0.8, label=f"S/N = {snr}")
        ax_flux.set_xscale("log")
        ax_flux.set_yscale("log")
        ax_flux.legend(fontsize=7)
    else:
        _no_data(ax_flux, "no source with a positive flux and error" if len(flux) else "no sources")
    ax_flux.set_xlabel(flux_column)
    ax_flux.set_ylabel(error_column)
    left_out = int(len(flux) - good.sum())
    ax_flux.set_title("flux vs error" + (f" ({left_out} with flux ≤ 0 not shown)" if left_out else ""), fontsize=9)
    if (good & np.isfinite(size)).any():
        ax_size.invert_xaxis()  # bright to the right
        ax_size.legend(fontsize=7)
        if np.nanmin(size[good]) > 0:
            ax_size.set_yscale("log")
            ax_size.yaxis.set_major_formatter(_PlainLogFormatter(minor_thresholds=(2, 0.5)))
            ax_size.yaxis.set_minor_formatter(_PlainLogFormatter(minor_thresholds=(2, 0.5)))
    else:
        _no_data(ax_size)
    ax_size.set_xlabel("magnitude" if zeropoint is not None else "instrumental magnitude")
    unit = getattr(catalog[size_column], "unit", None)
    ax_size.set_ylabel(f"{size_column} [{unit}]" if unit else size_column)
    ax_size.set_title("size vs magnitude", fontsize=9)
    if classes is not None:
        ax = axes[2]
        names = _class_order(classes)
        counts = [int((classes == name).sum()) for name in names]
        bars = ax.bar(names, counts, color=[_CLASS_COLORS.get(n, "0.5") for n in names])
        ax.bar_label(bars)
        if not names:
            _no_data(ax)
        ax.set_ylabel("sources")
        ax.set_title("classes", fontsize=9)
    fig.suptitle(title if title is not None else f"{len(catalog)} sources")
    return fig


class _PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers (0.6, 2, 30) on the ticks matplotlib would label."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _class_order(classes):
    present = sorted(set(classes.tolist()) - {""})
    return [c for c in ("star", "galaxy") if c in present] + [c for c in present if c not in ("star", "galaxy")]


def _error_column_name(flux_column):
    """``segment_flux`` -> ``segment_flux_err``; ``segment_flux_r`` (per band) -> ``segment_flux_err_r``."""
    for base in ("segment_flux", "kron_flux"):
        if flux_column.startswith(base + "_") and not flux_column.startswith(base + "_err"):
            return f"{base}_err{flux_column[len(base):]}"
    return f"{flux_column}_err"
