"""`DeblendResult`: what deblending one image produces, and how it is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import QTable

from deblend.io import CATALOG_FORMATS, Image, atomic_path, fits_stem, write_catalog, write_segmentation

__all__ = ["DeblendResult", "output_paths"]

log = logging.getLogger(__name__)


def output_paths(outdir, stem, *, format="fits"):
    """The output files of one input: ``<stem>_seg.fits`` and ``<stem>_cat.<ext>``.

    Parameters
    ----------
    outdir : str or os.PathLike
    stem : str
        Input file name without its FITS suffix.
    format : str, optional
        Catalog format (a key of `deblend.io.CATALOG_FORMATS`).

    Returns
    -------
    dict
        ``{'segmentation': Path, 'catalog': Path}``.
    """
    if format not in CATALOG_FORMATS:
        raise ValueError(f"format must be one of {sorted(CATALOG_FORMATS)}, got {format!r}")
    outdir = Path(outdir)
    return {
        "segmentation": outdir / f"{stem}_seg.fits",
        "catalog": outdir / f"{stem}_cat{CATALOG_FORMATS[format][1]}",
    }


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
    """

    labels: np.ndarray
    catalog: QTable
    image: Image
    method: str
    weights_id: str | None = None
    extensions: dict = field(default_factory=dict)

    @property
    def n_sources(self):
        """Number of sources found."""
        return len(self.catalog)

    def write(self, outdir, *, stem=None, format="fits", overwrite=False):
        """Write ``<stem>_seg.fits`` and ``<stem>_cat.<ext>`` into ``outdir``, atomically.

        Both files appear together or not at all: each is written to a
        temporary name and renamed only when both were written.

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

        Returns
        -------
        dict
            ``{'segmentation': Path, 'catalog': Path}``.
        """
        if stem is None:
            stem = fits_stem(self.image.path)
        paths = output_paths(outdir, stem, format=format)
        if not overwrite:
            for path in paths.values():
                if path.exists():
                    raise FileExistsError(f"{path} exists; use --overwrite (overwrite=True) to replace it")
        with atomic_path(paths["segmentation"]) as seg_tmp, atomic_path(paths["catalog"]) as cat_tmp:
            write_segmentation(seg_tmp, self.labels, wcs=self.image.wcs, header=self.image.header,
                               method=self.method, weights_id=self.weights_id,
                               input_path=self.image.path, extensions=self.extensions, overwrite=True)
            write_catalog(self.catalog, cat_tmp, format=format, overwrite=True)
        log.info("%s: wrote %d sources to %s", self.image.path, self.n_sources, paths["catalog"])
        return paths
