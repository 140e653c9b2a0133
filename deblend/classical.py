"""Classical deblenders: SEP (SExtractor) and photutils, behind one interface.

Both take the background-subtracted detection image and its noise σ map and
return a label map (int32, 0 = background, labels 1..N consecutive). They are
the baselines the neural methods are judged against, and ``--method sep`` /
``--method photutils`` in the CLI.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import sep
from astropy.utils.exceptions import AstropyWarning
from photutils.segmentation import deblend_sources, detect_sources, make_2dgaussian_kernel

__all__ = ["sep_labels", "photutils_labels", "relabel_consecutive", "check_options", "SEP_DEFAULT_KERNEL"]

log = logging.getLogger(__name__)

#: SExtractor's ``default.conv``: a 3×3 pyramid, the filter sep applies by default.
SEP_DEFAULT_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)


def relabel_consecutive(labels):
    """Renumber the non-zero labels of a map to 1..N, keeping their order.

    Parameters
    ----------
    labels : ndarray of int, shape (ny, nx)

    Returns
    -------
    ndarray of int32, shape (ny, nx)
        A new array; the input is not modified.
    """
    labels = np.asarray(labels)
    present = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
    return lut[np.clip(labels, 0, None)]


def _check_positive(name, value, integer=False):
    if integer and (int(value) != value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _check_sep(thresh, minarea, deblend_nthresh, deblend_cont):
    _check_positive("thresh", thresh)
    _check_positive("minarea", minarea, integer=True)
    _check_positive("deblend_nthresh", deblend_nthresh, integer=True)
    if not 0 <= deblend_cont <= 1:
        raise ValueError(f"deblend_cont must be in [0, 1], got {deblend_cont!r}")


def _check_photutils(nsigma, n_pixels, n_levels, contrast):
    _check_positive("nsigma", nsigma)
    _check_positive("n_pixels", n_pixels, integer=True)
    _check_positive("n_levels", n_levels, integer=True)
    if not 0 <= contrast <= 1:
        raise ValueError(f"contrast must be in [0, 1], got {contrast!r}")


def check_options(method, options):
    """Validate a method's options before any image is processed.

    Parameters
    ----------
    method : {'sep', 'photutils'}
    options : dict
        Keyword arguments for `sep_labels` or `photutils_labels`.

    Raises
    ------
    ValueError
        For an unknown option or an invalid value; the message names both.
    """
    import inspect

    func = {"sep": sep_labels, "photutils": photutils_labels}[method]
    params = inspect.signature(func).parameters
    known = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY and name != "mask"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {method} option(s) {unknown}; valid options are {known}")
    values = {name: options.get(name, params[name].default) for name in known}
    if method == "sep":
        _check_sep(values["thresh"], values["minarea"], values["deblend_nthresh"], values["deblend_cont"])
    else:
        _check_photutils(values["nsigma"], values["n_pixels"], values["n_levels"], values["contrast"])


def sep_labels(detection, rms, *, mask=None, thresh=1.5, minarea=5, filter_kernel=SEP_DEFAULT_KERNEL,
               deblend_nthresh=32, deblend_cont=0.005, clean=True, clean_param=1.0):
    """Detect and deblend with SEP, SExtractor's algorithm as a library.

    Parameter names and defaults are SExtractor's (``DETECT_THRESH``,
    ``DETECT_MINAREA``, ``DEBLEND_NTHRESH``, ``DEBLEND_MINCONT``, ``CLEAN``,
    ``CLEAN_PARAM``, the ``default.conv`` filter).

    Parameters
    ----------
    detection : ndarray of float32, shape (ny, nx)
        Background-subtracted detection image.
    rms : ndarray, shape (ny, nx)
        Its noise σ.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels to ignore.
    thresh : float, optional
        Detection threshold in units of ``rms``.
    minarea : int, optional
        Minimum number of pixels above threshold.
    filter_kernel : ndarray or None, optional
        Matched filter applied before thresholding; None for no filtering.
    deblend_nthresh : int, optional
        Number of deblending sub-thresholds.
    deblend_cont : float, optional
        Minimum contrast (fraction of total flux) for a branch to become a source.
    clean, clean_param : bool, float, optional
        SExtractor's cleaning of spurious detections near bright sources.

    Returns
    -------
    ndarray of int32, shape (ny, nx)
        Label map, labels 1..N.
    """
    _check_sep(thresh, minarea, deblend_nthresh, deblend_cont)
    # sep needs writable, C-contiguous, native float32 buffers
    data = np.array(detection, dtype=np.float32, order="C")
    err = np.array(np.broadcast_to(rms, data.shape), dtype=np.float32, order="C")
    mask = None if mask is None else np.array(mask, dtype=bool, order="C")
    # Big, crowded images overflow sep's default pixel stack and sub-object limits.
    sep.set_extract_pixstack(max(300_000, 2 * data.size))
    sep.set_sub_object_limit(4096)
    kernel = None if filter_kernel is None else np.asarray(filter_kernel, dtype=np.float32)
    try:
        # filter_type='conv' is SExtractor's convention (thresh in units of the unfiltered σ); sep's
        # default 'matched' filter with an error array thresholds the filtered S/N instead, which at
        # thresh=1.5 turns pure noise into dozens of detections.
        _, seg = sep.extract(data, thresh, err=err, mask=mask, minarea=int(minarea),
                             filter_kernel=kernel, filter_type="conv",
                             deblend_nthresh=int(deblend_nthresh),
                             deblend_cont=float(deblend_cont), clean=bool(clean),
                             clean_param=float(clean_param), segmentation_map=True)
    except Exception as exc:
        if "internal pixel buffer full" in str(exc) or "limit" in str(exc):
            raise RuntimeError(f"sep ran out of internal buffers on a {data.shape} image ({exc}); "
                               "raise thresh or process the image in tiles") from exc
        raise
    if mask is not None:  # sep can label masked pixels next to a source (its filter reaches them)
        seg[mask] = 0
    return relabel_consecutive(seg)


def photutils_labels(detection, rms, *, mask=None, nsigma=1.5, n_pixels=5, kernel_fwhm=2.0,
                     n_levels=32, contrast=0.001, mode="exponential", deblend=True):
    """Detect and deblend with photutils (``detect_sources`` + ``deblend_sources``).

    Parameters
    ----------
    detection : ndarray of float32, shape (ny, nx)
        Background-subtracted detection image.
    rms : ndarray, shape (ny, nx)
        Its noise σ.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels to ignore.
    nsigma : float, optional
        Threshold in units of ``rms`` (on the smoothed image).
    n_pixels : int, optional
        Minimum number of connected pixels.
    kernel_fwhm : float or None, optional
        FWHM in pixels of the Gaussian smoothing kernel; None for no smoothing.
    n_levels, contrast, mode : optional
        `photutils.segmentation.deblend_sources` options.
    deblend : bool, optional
        Deblend the detected footprints (photutils' default workflow).

    Returns
    -------
    ndarray of int32, shape (ny, nx)
        Label map, labels 1..N.
    """
    _check_photutils(nsigma, n_pixels, n_levels, contrast)
    data = np.asarray(detection, dtype=np.float32)
    if kernel_fwhm is not None:
        _check_positive("kernel_fwhm", kernel_fwhm)
        size = int(2 * round(1.5 * kernel_fwhm) + 1)
        kernel = make_2dgaussian_kernel(kernel_fwhm, size=max(3, size))
        from astropy.convolution import convolve

        with warnings.catch_warnings():
            # masked regions wider than the kernel stay NaN (zeroed next): not worth a warning
            warnings.simplefilter("ignore", AstropyWarning)
            convolved = convolve(data, kernel, mask=mask, normalize_kernel=True, boundary="extend")
        convolved = np.nan_to_num(convolved.astype(np.float32))
    else:
        convolved = data
    threshold = nsigma * np.asarray(rms, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        segm = detect_sources(convolved, threshold, int(n_pixels), mask=mask)
        if segm is None:
            return np.zeros(data.shape, dtype=np.int32)
        if deblend:
            segm = deblend_sources(convolved, segm, int(n_pixels), n_levels=int(n_levels),
                                   contrast=float(contrast), mode=mode, progress_bar=False)
    return relabel_consecutive(segm.data)
