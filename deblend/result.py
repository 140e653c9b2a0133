"""`DeblendResult`: what deblending one image produces, how it is looked at, and how it is written."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import QTable

from deblend.io import CATALOG_FORMATS, Image, atomic_path, fits_stem, write_catalog, write_segmentation

__all__ = ["DeblendResult", "Cutout", "output_paths"]

log = logging.getLogger(__name__)

#: Width of a quick-look image in inches (its height follows the image's aspect) and its resolution.
_QUICKLOOK_INCHES = 7.0
_QUICKLOOK_DPI = 100


def output_paths(outdir, stem, *, format="fits", quicklook=False):
    """The output files of one input: ``<stem>_seg.fits``, ``<stem>_cat.<ext>`` (and ``<stem>_quicklook.png``).

    Parameters
    ----------
    outdir : str or os.PathLike
    stem : str
        Input file name without its FITS suffix.
    format : str, optional
        Catalog format (a key of `deblend.io.CATALOG_FORMATS`).
    quicklook : bool, optional
        Include the quick-look PNG.

    Returns
    -------
    dict
        ``{'segmentation': Path, 'catalog': Path}``, plus ``'quicklook': Path``
        when ``quicklook`` is true.
    """
    if format not in CATALOG_FORMATS:
        raise ValueError(f"format must be one of {sorted(CATALOG_FORMATS)}, got {format!r}")
    outdir = Path(outdir)
    paths = {
        "segmentation": outdir / f"{stem}_seg.fits",
        "catalog": outdir / f"{stem}_cat{CATALOG_FORMATS[format][1]}",
    }
    if quicklook:
        paths["quicklook"] = outdir / f"{stem}_quicklook.png"
    return paths


@dataclass
class Cutout:
    """A small window of a `DeblendResult` around one source (see `DeblendResult.cutout`).

    Attributes
    ----------
    label : int
        The source it is centred on.
    data : ndarray of float32, shape (n_bands, h, w)
        Pixel values (masked pixels are NaN here, for display).
    labels : ndarray of int32, shape (h, w)
        The label map in the window, with the full map's labels (neighbours
        included), so they still equal the catalog's ``label``.
    mask : ndarray of bool, shape (h, w)
        Unusable pixels.
    offset : tuple of int
        ``(y0, x0)``: ``data[:, i, j]`` is pixel ``(x0 + j, y0 + i)`` of the image.
    extensions : dict of str to ndarray
        The result's extra planes (e.g. an uncertainty map) cut to the same
        window; planes that do not have the image's shape are left out.
    """

    label: int
    data: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    offset: tuple
    extensions: dict = field(default_factory=dict)

    @property
    def image(self):
        """The 2-D image to look at: the single band, or the mean of the bands (ndarray, shape (h, w))."""
        return self.data[0] if self.data.shape[0] == 1 else self.data.mean(axis=0)

    @property
    def slices(self):
        """``(slice, slice)`` of the full image covered by the cut-out."""
        y0, x0 = self.offset
        h, w = self.labels.shape
        return (slice(y0, y0 + h), slice(x0, x0 + w))

    @property
    def source_mask(self):
        """True on the pixels of ``label`` (ndarray of bool, shape (h, w))."""
        return self.labels == self.label


@dataclass
class DeblendResult:
    """The segmentation and catalog of one image.

    Attributes
    ----------
    labels : ndarray of int32, shape (ny, nx)
        0 = background, 1..N = sources; equal to ``catalog['label']``.
    catalog : astropy.table.QTable
        One row per source (see `deblend.catalog.make_catalog`).
    image : Image
        The input.
    method : str
        Method that produced the labels.
    weights_id : str or None
        Identifier of the model weights (None for classical methods).
    extensions : dict of str to ndarray
        Extra planes written as image HDUs of the segmentation file.
    settings : dict
        The settings that shaped the result, as FITS cards ``keyword: (value,
        comment)`` (`deblend.pipeline.Deblender.settings`), written into the
        segmentation file's header.
    """

    labels: np.ndarray
    catalog: QTable
    image: Image
    method: str
    weights_id: str | None = None
    extensions: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def n_sources(self):
        """Number of sources found."""
        return len(self.catalog)

    # ------------------------------------------------------------------ looking at it

    def __repr__(self):
        shape = "x".join(str(n) for n in self.image.data.shape)
        return (f"DeblendResult(file={self.image.path!r}, method={self.method!r}, shape={shape}, "
                f"n_sources={self.n_sources})")

    @property
    def _n_blended(self):
        """Sources in a blend group of two or more (needs an ``n_blend`` column), else None."""
        if "n_blend" not in self.catalog.colnames:
            return None
        return int(np.sum(np.asarray(self.catalog["n_blend"]) > 1))

    def _repr_html_(self):
        rows = [("file", self.image.path),
                ("method", self.method + (f" (weights {self.weights_id})" if self.weights_id else "")),
                ("shape", " × ".join(str(n) for n in self.image.data.shape) + " (bands, ny, nx)"),
                ("sources", str(self.n_sources))]
        if self._n_blended is not None:
            rows.append(("blended", f"{self._n_blended} (in a blend group of 2 or more)"))
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                        f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f"<table><caption style='text-align:left'><b>DeblendResult</b></caption>{cells}</table>"

    def display_image(self, band=None):
        """The 2-D image to look at, with masked pixels as NaN.

        Parameters
        ----------
        band : int or str, optional
            Band index or name (default: the single band, or the mean of the bands).

        Returns
        -------
        ndarray of float32, shape (ny, nx)

        Raises
        ------
        ValueError
            If ``band`` is not one of the image's bands.
        """
        data = self.image.data
        if band is None:
            image = data[0] if data.shape[0] == 1 else data.mean(axis=0)
        else:
            names = list(self.image.band_names)
            if isinstance(band, str):
                if band not in names:
                    raise ValueError(f"band {band!r} is not one of the image's bands {names}")
                band = names.index(band)
            if not -data.shape[0] <= int(band) < data.shape[0]:
                raise ValueError(f"band must be a band index below {data.shape[0]} or a name in {names}, "
                                 f"got {band!r}")
            image = data[int(band)]
        image = np.array(image, dtype=np.float32)
        image[self.image.mask] = np.nan
        return image

    def cutout(self, label, *, pad=10):
        """The image and label map in a small window around one source.

        The window is the source's bounding box grown by ``pad`` pixels on
        every side, clipped to the image.

        Parameters
        ----------
        label : int
            A label of ``labels`` (= the catalog's ``label``).
        pad : int, optional
            Margin in pixels.

        Returns
        -------
        Cutout

        Raises
        ------
        ValueError
            If ``label`` is not in the label map, or ``pad`` is negative.
        """
        if int(pad) != pad or pad < 0:
            raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
        try:
            label = int(label)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"label must be an integer label of the map, got {label!r}") from exc
        ys, xs = np.nonzero(self.labels == label) if label > 0 else ((), ())
        if len(ys) == 0:
            have = f"1..{int(self.labels.max())}" if self.labels.any() else "none (no sources)"
            raise ValueError(f"label {label} is not in the label map; labels present: {have}")
        ny, nx = self.labels.shape
        pad = int(pad)
        y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, ny)
        x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, nx)
        window = (slice(y0, y1), slice(x0, x1))
        data = np.array(self.image.data[(slice(None), *window)], dtype=np.float32)
        mask = self.image.mask[window].copy()
        data[:, mask] = np.nan
        extensions = {name: np.array(plane[window]) for name, plane in self.extensions.items()
                      if np.shape(plane) == self.labels.shape}
        return Cutout(label=label, data=data, labels=self.labels[window].copy(), mask=mask, offset=(y0, x0),
                      extensions=extensions)

    def plot(self, ax=None, *, band=None, stretch="asinh", boxes=False, thickness=None, title=None, seed=0):
        """The image with every source's outline (and optionally its box, class and score).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Draw into it; default: a new figure sized to the image.
        band : int or str, optional
            Band to show (default: the single band, or the mean of the bands).
        stretch : str, optional
            See `deblend.viz.show_image`.
        boxes : bool, optional
            Also draw the catalog's boxes with class and score (`deblend.viz.draw_boxes`).
        thickness : int, optional
            Outline width in image pixels (default: wide enough to stay visible).
        title : str, optional
            Default: file name, method and number of sources.
        seed : int, optional
            Palette (see `deblend.viz.label_colors`).

        Returns
        -------
        matplotlib.figure.Figure
            The new figure, or the one holding ``ax``.
        """
        from matplotlib.figure import Figure

        from deblend.viz import draw_boxes, overlay_segmentation, show_image

        image = self.display_image(band)
        if ax is None:
            ny, nx = image.shape
            width = _QUICKLOOK_INCHES
            height = min(max(width * ny / nx, 2.5), 2.5 * width) + 0.5
            fig = Figure(figsize=(width, height), dpi=_QUICKLOOK_DPI, layout="constrained")
            ax = fig.add_subplot()
        show_image(ax, image, stretch=stretch)
        overlay_segmentation(ax, self.labels, thickness=thickness, seed=seed)
        if boxes and self.n_sources:
            draw_boxes(ax, self.catalog, seed=seed)
        ax.set_xlabel("x [pix]")
        ax.set_ylabel("y [pix]")
        if title is None:
            name = Path(self.image.path).name
            title = f"{name}: {self.n_sources} source{'s' if self.n_sources != 1 else ''} ({self.method})"
        ax.set_title(title, fontsize=10)
        return ax.figure

    # ------------------------------------------------------------------ blend groups

    @property
    def blends(self):
        """The blend groups, most ambiguous first, as a `~astropy.table.Table`.

        One row per group of two or more touching sources (`deblend.refine`):
        ``blend_id``, ``n_blend``, ``labels`` (its members, comma-separated),
        ``segment_flux`` (summed over the members), ``max_rel_seg_err``
        (largest ``segment_flux_seg_err / |segment_flux|`` of a member) and
        ``x_centroid``, ``y_centroid`` (mean of the members'). Sorted by
        ``max_rel_seg_err``, descending. Empty when the result was not refined
        (no ``blend_id`` column).
        """
        from astropy.table import Table

        names = ["blend_id", "n_blend", "labels", "segment_flux", "max_rel_seg_err", "x_centroid", "y_centroid"]
        cat = self.catalog
        if "blend_id" not in cat.colnames or not len(cat):
            return Table(names=names, dtype=[np.int32, np.int32, str, float, float, float, float])
        ids = np.asarray(cat["blend_id"])
        flux = np.asarray(cat["segment_flux"], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.asarray(cat["segment_flux_seg_err"], dtype=float) / np.abs(flux)
        rows = []
        for gid in np.unique(ids[ids > 0]):
            members = ids == gid
            rows.append((int(gid), int(members.sum()), ",".join(str(v) for v in np.asarray(cat["label"])[members]),
                         float(np.nansum(flux[members])), float(np.nanmax(rel[members], initial=0.0)),
                         float(np.mean(np.asarray(cat["x_centroid"])[members])),
                         float(np.mean(np.asarray(cat["y_centroid"])[members]))))
        rows.sort(key=lambda r: -r[4])
        if not rows:
            return Table(names=names, dtype=[np.int32, np.int32, str, float, float, float, float])
        return Table(rows=rows, names=names)

    # ------------------------------------------------------------------ writing

    def write(self, outdir, *, stem=None, format="fits", overwrite=False, quicklook=False):
        """Write ``<stem>_seg.fits`` and ``<stem>_cat.<ext>`` into ``outdir``, atomically.

        Both files appear together or not at all: each is written to a
        temporary name and renamed only when both were written. With
        ``quicklook``, ``<stem>_quicklook.png`` (the image with the outlines,
        see `plot`) is written after them, atomically too; a quick-look that
        cannot be made is logged as a warning and never fails the write.

        Parameters
        ----------
        outdir : str or os.PathLike
        stem : str, optional
            Default: the input file's stem.
        format : {'fits', 'ecsv', 'csv', 'parquet', 'votable'}, optional
            Catalog format.
        overwrite : bool, optional
            Replace existing outputs; otherwise `FileExistsError` is raised
            before anything is written.
        quicklook : bool, optional
            Also write ``<stem>_quicklook.png``.

        Returns
        -------
        dict
            ``{'segmentation': Path, 'catalog': Path}``, plus ``'quicklook': Path``
            when the quick-look was written.
        """
        if stem is None:
            stem = fits_stem(self.image.path)
        paths = output_paths(outdir, stem, format=format, quicklook=quicklook)
        if not overwrite:
            for path in paths.values():
                if path.exists():
                    raise FileExistsError(f"{path} exists; use --overwrite (overwrite=True) to replace it")
        with atomic_path(paths["segmentation"]) as seg_tmp, atomic_path(paths["catalog"]) as cat_tmp:
            write_segmentation(seg_tmp, self.labels, wcs=self.image.wcs, header=self.image.header,
                               method=self.method, weights_id=self.weights_id,
                               input_path=self.image.path, settings=self.settings, extensions=self.extensions,
                               overwrite=True)
            write_catalog(self.catalog, cat_tmp, format=format, overwrite=True)
        log.info("%s: wrote %d sources to %s", self.image.path, self.n_sources, paths["catalog"])
        if quicklook and not self._write_quicklook(paths["quicklook"]):
            del paths["quicklook"]
        return paths

    def _write_quicklook(self, path):
        """Write the quick-look PNG atomically; True when written, False (with a warning) when it failed."""
        try:
            with atomic_path(path) as tmp:
                self.plot().savefig(tmp, format="png", dpi=_QUICKLOOK_DPI)
        except Exception as exc:  # a figure must never cost the outputs or the batch
            log.warning("%s: quick-look %s not written (%s: %s)", self.image.path, path, type(exc).__name__, exc)
            return False
        return True
