"""`Deblender`: configuration and models in, a `DeblendResult` for one image out."""

from __future__ import annotations

import logging
import os
import warnings

from deblend.catalog import make_catalog
from deblend.classical import check_options, photutils_labels, sep_labels
from deblend.exceptions import NoSourcesWarning
from deblend.io import Image, read_image
from deblend.preprocess import prepare
from deblend.result import DeblendResult

__all__ = ["Deblender", "METHODS"]

log = logging.getLogger(__name__)

#: Methods `Deblender` knows, with the function that labels a prepared image.
METHODS = {
    "sep": sep_labels,
    "photutils": photutils_labels,
}

# Generic CLI option -> each method's own parameter name (SExtractor's for sep, photutils' for photutils).
_OPTION_NAMES = {
    "sep": {"thresh": "thresh", "minarea": "minarea", "deblend_nthresh": "deblend_nthresh",
            "deblend_cont": "deblend_cont"},
    "photutils": {"thresh": "nsigma", "minarea": "n_pixels", "deblend_nthresh": "n_levels",
                  "deblend_cont": "contrast"},
}


class Deblender:
    """Deblend images with one method and one configuration.

    Parameters
    ----------
    method : {'sep', 'photutils'}, optional
        Deblending method.
    thresh, minarea, deblend_nthresh, deblend_cont : optional
        Common detection options, translated to each method's own parameter
        (sep: ``thresh``, ``minarea``, ``deblend_nthresh``, ``deblend_cont``;
        photutils: ``nsigma``, ``n_pixels``, ``n_levels``, ``contrast``).
        None keeps the method's default.
    method_options : dict, optional
        Further keyword arguments for the method's labelling function
        (`deblend.classical.sep_labels` or `deblend.classical.photutils_labels`).
    box_size, filter_size : int, optional
        Background mesh (see `deblend.preprocess.estimate_background`).
    seed : int, optional
        Seed for any randomness (kept for the neural methods).
    device : str, optional
        ``'cpu'`` or ``'cuda'`` (used by the neural methods).
    """

    def __init__(self, method="sep", *, thresh=None, minarea=None, deblend_nthresh=None,
                 deblend_cont=None, method_options=None, box_size=64, filter_size=3, seed=0,
                 device="cpu"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        self.method = method
        options = dict(method_options or {})
        generic = {"thresh": thresh, "minarea": minarea, "deblend_nthresh": deblend_nthresh,
                   "deblend_cont": deblend_cont}
        for key, value in generic.items():
            if value is not None:
                options[_OPTION_NAMES[method][key]] = value
        check_options(method, options)
        self.options = options
        self.box_size = box_size
        self.filter_size = filter_size
        self.seed = seed
        self.device = device
        self.weights_id = None

    def __repr__(self):
        return f"Deblender(method={self.method!r}, options={self.options!r})"

    def config(self):
        """The configuration as a JSON-serialisable dict (for manifests and provenance)."""
        return {"method": self.method, "options": dict(self.options), "box_size": self.box_size,
                "filter_size": self.filter_size, "seed": self.seed, "weights": self.weights_id}

    def run(self, image, **read_options):
        """Deblend one image.

        Parameters
        ----------
        image : Image, ndarray, str, os.PathLike, or list of paths
            An `Image`, an array ``(ny, nx)`` / ``(n_bands, ny, nx)``, or FITS
            file(s) read with `deblend.io.read_image`.
        **read_options
            Passed to `deblend.io.read_image` when ``image`` names files.

        Returns
        -------
        DeblendResult

        Raises
        ------
        deblend.exceptions.InputError
            If a file cannot be read.
        """
        if isinstance(image, (str, os.PathLike, list, tuple)):
            image = read_image(image, **read_options)
        elif not isinstance(image, Image):
            image = Image.from_array(image)
        prepared = prepare(image, box_size=self.box_size, filter_size=self.filter_size)
        labels = METHODS[self.method](prepared.detection, prepared.detection_rms,
                                      mask=prepared.mask, **self.options)
        catalog = make_catalog(prepared.data, labels, detection=prepared.detection,
                               error=prepared.background.rms, detection_error=prepared.detection_rms,
                               mask=prepared.mask, wcs=image.wcs, band_names=image.band_names,
                               method=self.method, weights_id=self.weights_id)
        if len(catalog) == 0:
            warnings.warn(f"{image.path}: no sources detected", NoSourcesWarning, stacklevel=2)
        log.info("%s: %d sources (%s)", image.path, len(catalog), self.method)
        return DeblendResult(labels=labels, catalog=catalog, image=image, method=self.method,
                             weights_id=self.weights_id)
