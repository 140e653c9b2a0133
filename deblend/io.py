"""All reading and writing of FITS images, segmentation maps and catalogs.

Nothing else in deblend opens files. Reading converts to native-endian
``float32`` and turns non-finite pixels into the mask; every write is atomic
(a temporary file in the destination directory, renamed into place), so a
crash or an interrupt never leaves a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import logging
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import QTable, Table
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from deblend._version import __version__
from deblend.exceptions import InputError, WCSWarning

__all__ = [
    "Image",
    "read_image",
    "read_header",
    "read_segmentation",
    "read_catalog",
    "write_image",
    "write_segmentation",
    "write_catalog",
    "atomic_path",
    "catalog_format",
    "CATALOG_FORMATS",
    "FITS_SUFFIXES",
    "fits_stem",
    "file_checksum",
    "ImageSections",
    "open_image_sections",
]

log = logging.getLogger(__name__)

#: File name endings recognised as FITS images (checked case-insensitively).
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fz")

#: Catalog formats: name -> (astropy format, file extension).
CATALOG_FORMATS = {
    "fits": ("fits", ".fits"),
    "ecsv": ("ascii.ecsv", ".ecsv"),
    "csv": ("ascii.csv", ".csv"),
    "parquet": ("parquet", ".parquet"),
    "votable": ("votable", ".xml"),
}

_EXTENSION_FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".ecsv": "ecsv",
    ".csv": "csv",
    ".parquet": "parquet",
    ".xml": "votable",
    ".vot": "votable",
    ".votable": "votable",
}

_VARIANCE_NAMES = ("VARIANCE", "VAR")
_WEIGHT_NAMES = ("WEIGHT", "WHT", "IVAR", "INVVAR")
_MASK_NAMES = ("MASK", "BADPIX", "FLAGS")
# WCS keywords whose unparsable value astropy replaces by a default (with only a warning)
_WCS_NUMBER_KEYS = re.compile(r"(CRPIX|CRVAL|CDELT|CROTA)\d|(CD|PC|PV)\d+_\d+")


@dataclass
class Image:
    """A survey image as deblend sees it.

    Attributes
    ----------
    data : ndarray of float32, shape (n_bands, ny, nx)
        Pixel values, native byte order. Masked pixels are set to 0, never NaN.
    mask : ndarray of bool, shape (ny, nx)
        True where a pixel is unusable in any band (non-finite, or flagged by a
        mask HDU).
    variance : ndarray of float32, shape (n_bands, ny, nx), or None
        Per-pixel variance when the file provides one (variance or weight HDU).
    header : astropy.io.fits.Header
        Header of the image HDU (of the first band for several files).
    wcs : astropy.wcs.WCS or None
        Two-dimensional celestial WCS, or None when there is none usable.
    paths : list of str
        The file(s) the bands came from.
    band_names : list of str
        One name per band (``FILTER`` keyword, file stem, or ``band<i>``).
    """

    data: np.ndarray
    mask: np.ndarray
    header: fits.Header = field(default_factory=fits.Header)
    wcs: WCS | None = None
    variance: np.ndarray | None = None
    paths: list = field(default_factory=list)
    band_names: list = field(default_factory=list)

    @property
    def n_bands(self):
        """Number of bands."""
        return self.data.shape[0]

    @property
    def shape(self):
        """Spatial shape ``(ny, nx)``."""
        return self.data.shape[1:]

    @property
    def path(self):
        """The first input file (a display name for messages)."""
        return self.paths[0] if self.paths else "<array>"

    @classmethod
    def from_array(cls, data, *, mask=None, variance=None, wcs=None, header=None, band_names=None):
        """Wrap an in-memory array as an `Image`, applying the same conventions as `read_image`.

        Parameters
        ----------
        data : array_like, shape (ny, nx) or (n_bands, ny, nx)
            Pixel values; converted to native float32.
        mask : array_like of bool, shape (ny, nx), optional
            Extra bad pixels (True = bad), combined with the non-finite ones.
        variance : array_like, optional
            Per-pixel variance, same shape as ``data``.
        wcs : astropy.wcs.WCS, optional
            Celestial WCS.
        header : astropy.io.fits.Header, optional
            Header to carry along.
        band_names : list of str, optional
            One name per band.

        Returns
        -------
        Image

        Raises
        ------
        ValueError
            If ``data`` is not 2-D or 3-D, has a zero-size axis, or has no finite pixel.
        """
        arr = np.asarray(data)
        if arr.ndim not in (2, 3):
            raise ValueError(f"data must be 2-D (ny, nx) or 3-D (n_bands, ny, nx), got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"data must not have a zero-size axis, got shape {arr.shape}")
        cube = _as_cube(arr)
        var = None if variance is None else _as_cube(np.asarray(variance))
        if var is not None and var.shape != cube.shape:
            raise ValueError(f"variance shape {var.shape} does not match data shape {cube.shape}")
        extra = None if mask is None else np.asarray(mask, dtype=bool)
        if extra is not None and extra.shape != cube.shape[1:]:
            raise ValueError(f"mask shape {extra.shape} does not match image shape {cube.shape[1:]}")
        cube, bad = _mask_nonfinite(cube, extra)
        if bad.all():
            raise ValueError("data has no finite, unmasked pixel")
        names = list(band_names) if band_names else [f"band{i}" for i in range(cube.shape[0])]
        return cls(
            data=cube,
            mask=bad,
            header=header if header is not None else fits.Header(),
            wcs=wcs,
            variance=var,
            paths=[],
            band_names=names,
        )


def _as_cube(arr):
    """Return a native float32 (n_bands, ny, nx) copy-or-view of a 2-D/3-D array."""
    cube = np.ascontiguousarray(arr, dtype=np.float32)
    return cube[np.newaxis] if cube.ndim == 2 else cube


def _mask_nonfinite(cube, extra_mask=None):
    """Zero the non-finite pixels of ``cube`` and return it with the combined 2-D mask."""
    finite = np.isfinite(cube)
    bad = ~finite.all(axis=0)
    if extra_mask is not None:
        bad |= extra_mask
    if bad.any():
        cube = cube.copy()  # never write into the caller's array (from_array may hold a view)
        cube[:, bad] = 0.0
    return cube, bad


def fits_stem(path):
    """Return the file name without its FITS suffix (``tile.fits.gz`` -> ``tile``).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    str
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def file_checksum(paths, *, chunk_size=1 << 20):
    """SHA-256 of the bytes of one file, or of several files read one after the other.

    The files are streamed in chunks, so memory use does not depend on their size.
    For one file the result equals ``sha256sum FILE``.

    Parameters
    ----------
    paths : str, os.PathLike, or sequence of them
    chunk_size : int, optional
        Bytes read at a time.

    Returns
    -------
    str
        Hexadecimal digest.

    Raises
    ------
    OSError
        If a file cannot be read.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(chunk_size), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _open_fits(path, *, memmap=False):
    """Open a FITS file, turning every low-level failure into an `InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a directory, not a FITS file")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=memmap, lazy_load_hdus=False)
    except OSError as exc:
        msg = str(exc)
        with open(path, "rb") as fh:
            starts_like_fits = fh.read(9) == b"SIMPLE  ="
        if starts_like_fits:
            raise InputError(path, f"truncated or corrupt FITS header ({msg})") from exc
        if _gzipped_fits(path):
            raise InputError(path, f"truncated or corrupt gzip-compressed FITS ({msg})") from exc
        if "SIMPLE" in msg or "Empty or corrupt" in msg or "not a FITS" in msg.lower():
            raise InputError(path, "not a FITS file (no valid primary header)") from exc
        if "gzip" in msg.lower() or "compressed" in msg.lower():
            raise InputError(path, f"corrupt compressed file ({msg})") from exc
        raise InputError(path, f"cannot be read as FITS ({msg})") from exc
    except Exception as exc:  # astropy raises assorted types on garbage headers
        raise InputError(path, f"cannot be read as FITS ({type(exc).__name__}: {exc})") from exc
    _raise_if_truncated(path, caught)
    _fix_unparsable_cards(path, hdul)
    return hdul


def _gzipped_fits(path):
    """Tell whether ``path`` is gzip-compressed and decompresses to the start of a FITS header."""
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read(9) == b"SIMPLE  ="
    except (OSError, EOFError):
        return False


def _raise_if_truncated(path, caught):
    for w in caught:
        text = str(w.message)
        if "truncated" in text.lower():
            raise InputError(path, f"truncated FITS file ({text})")


def _hdu_data(path, hdu, index):
    """Return an HDU's data, converting read failures (truncation) to `InputError`."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = hdu.data
    except (TypeError, ValueError, OSError, IndexError) as exc:
        raise InputError(path, f"HDU {index} data cannot be read, the file may be truncated ({exc})") from exc
    _raise_if_truncated(path, caught)
    return data


def _is_image_hdu(hdu):
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))


def _find_image_hdu(path, hdul, hdu):
    """Return ``(index, hdu)`` of the requested or first usable image HDU."""
    if hdu is not None:
        try:
            found = hdul[hdu]
        except (KeyError, IndexError) as exc:
            names = [h.name for h in hdul]
            raise InputError(path, f"has no HDU {hdu!r} (HDUs: {names})") from exc
        if not _is_image_hdu(found):
            raise InputError(path, f"HDU {hdu!r} is a {type(found).__name__}, not an image")
        return hdul.index_of(hdu), found
    seen = []
    for i, h in enumerate(hdul):
        if not _is_image_hdu(h):
            continue
        naxis = h.header.get("ZNAXIS", h.header.get("NAXIS", 0))
        if naxis == 0:
            continue
        seen.append((i, naxis))
        shape = _header_shape(h.header)
        if naxis in (2, 3) or (naxis > 3 and all(s == 1 for s in shape[:-3])):
            if h.name.upper() in _VARIANCE_NAMES + _WEIGHT_NAMES + _MASK_NAMES:
                continue
            return i, h
    if seen:
        desc = ", ".join(f"HDU {i} is {n}-D" for i, n in seen)
        raise InputError(path, f"wrong dimensionality: no 2-D or 3-D image HDU ({desc})")
    raise InputError(path, "no image HDU: the file holds no image data (header only or tables only)")


def _header_shape(header):
    """Data shape (numpy order) declared by an image header."""
    if "ZNAXIS" in header:
        n = header["ZNAXIS"]
        return tuple(header.get(f"ZNAXIS{i}", 0) for i in range(n, 0, -1))
    n = header.get("NAXIS", 0)
    return tuple(header.get(f"NAXIS{i}", 0) for i in range(n, 0, -1))


def _celestial_wcs(path, header):
    """Return the 2-D celestial WCS of a header, or None with a `WCSWarning`."""
    if not any(k in header for k in ("CTYPE1", "CD1_1", "PC1_1", "CDELT1")):
        return None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            naxis = header.get("ZNAXIS", header.get("NAXIS", 2))
            wcs = WCS(header, naxis=2) if naxis >= 2 else WCS(header)
    except Exception as exc:  # astropy raises many types for broken WCS keywords
        warnings.warn(f"{path}: broken WCS ignored ({exc}); pixel outputs are still written", WCSWarning,
                      stacklevel=2)
        return None
    # astropy replaces a non-numeric CRPIX/CDELT/... by a default (CDELT = 1 deg) with only a
    # warning: such a WCS would put every source at a wrong sky position
    texts = [str(w.message) for w in caught if issubclass(w.category, AstropyWarning)]
    unparsable = [t.split("=")[0].strip() for t in texts if "value was expected" in t]
    unparsable = [key for key in unparsable if _WCS_NUMBER_KEYS.match(key)]
    if unparsable:
        warnings.warn(f"{path}: broken WCS ignored (non-numeric {', '.join(unparsable)}); "
                      "pixel outputs are still written", WCSWarning, stacklevel=2)
        return None
    for w in caught:
        if not issubclass(w.category, AstropyWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not wcs.has_celestial:
        return None
    celestial = wcs.celestial
    # an infinite reference value (e.g. CRPIX2 = 1e999) passes wcslib but puts every source at a wrong position
    if not (np.isfinite(celestial.wcs.crpix).all() and np.isfinite(celestial.wcs.crval).all()
            and np.isfinite(celestial.pixel_scale_matrix).all()):
        warnings.warn(f"{path}: broken WCS ignored (non-finite reference pixel, value or scale); "
                      "pixel outputs are still written", WCSWarning, stacklevel=2)
        return None
    return celestial


def _fix_unparsable_cards(path, hdul):
    """Turn header values astropy cannot parse (``FILTER = NaN``, ``CRVAL1 = 1.0.0``) into strings, with a warning.

    Reading such a card raises `astropy.io.fits.VerifyError` wherever it is used (HDU names, band
    names, output headers), failing a file whose pixels are fine. As strings they are kept, and a
    WCS keyword among them makes a broken WCS (see `_celestial_wcs`); a card that cannot be fixed
    is removed. Only the in-memory headers change.
    """
    fixed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        for hdu in hdul:
            for index in reversed(range(len(hdu.header))):
                card = hdu.header.cards[index]
                try:
                    card.value  # noqa: B018 (parsing is the point)
                    continue
                except (fits.VerifyError, ValueError):
                    fixed.append(card.keyword)
                try:
                    card.verify("silentfix")
                    card.value  # noqa: B018
                except Exception:  # noqa: BLE001 (astropy's fixers raise assorted types)
                    del hdu.header[index]
    if fixed:
        log.warning("%s: unparsable header values read as text: %s", path, ", ".join(reversed(fixed)))


def _named_hdu(hdul, names):
    for h in hdul:
        if _is_image_hdu(h) and h.name.upper() in names:
            return h
    return None


def _aux_array(path, hdul, key, default_names, cube_shape, what):
    """Read an auxiliary plane (variance/weight/mask) matching the image shape."""
    if key is False:
        return None
    if key is None:
        h = _named_hdu(hdul, default_names)
        if h is None:
            return None
    else:
        try:
            h = hdul[key]
        except (KeyError, IndexError) as exc:
            raise InputError(path, f"has no {what} HDU {key!r}") from exc
    arr = _hdu_data(path, h, h.name)
    if arr is None:
        raise InputError(path, f"{what} HDU {h.name!r} holds no data")
    arr = np.asarray(arr)
    if arr.ndim == 2 and len(cube_shape) == 3 and arr.shape == tuple(cube_shape[1:]):
        arr = np.broadcast_to(arr, cube_shape)
    if arr.shape != tuple(cube_shape):
        raise InputError(path, f"{what} HDU {h.name!r} has shape {arr.shape}, image has {tuple(cube_shape)}")
    return arr


def _bad_from_mask(path, mask, mask_bits):
    """Bad pixels (2-D) from a mask plane: 0/1 masks as they are, bit masks by ``mask_bits``."""
    if mask_bits is not None:
        bad = (mask.astype(np.int64) & int(mask_bits)) != 0
    elif mask.dtype == bool or np.isin(mask, (0, 1)).all():
        bad = mask != 0
    else:
        log.warning("%s: mask HDU holds a bit mask; ignored (pass mask_bits= to choose the bad bits)", path)
        return None
    return bad.any(axis=0)


def _read_one(path, hdu, variance_hdu, weight_hdu, mask_hdu, mask_bits):
    """Read one file into ``(cube, extra_mask, variance, header, wcs, band_names)``."""
    with _open_fits(path) as hdul:
        index, h = _find_image_hdu(path, hdul, hdu)
        data = _hdu_data(path, h, index)
        if data is None:
            raise InputError(path, f"HDU {index} holds no data")
        arr = np.asarray(data)
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim not in (2, 3):
            raise InputError(path, f"wrong dimensionality: HDU {index} is {arr.ndim}-D with shape {arr.shape}; "
                             "deblend needs a 2-D image or a 3-D cube (bands, y, x)")
        if arr.size == 0:
            raise InputError(path, f"zero size: HDU {index} has shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError(path, f"HDU {index} holds non-numeric data of type {arr.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            cube = _as_cube(arr)
        header = h.header.copy()
        variance = _aux_array(path, hdul, variance_hdu, _VARIANCE_NAMES, cube.shape, "variance")
        if variance is None:
            weight = _aux_array(path, hdul, weight_hdu, _WEIGHT_NAMES, cube.shape, "weight")
            if weight is not None:
                weight = np.asarray(weight, dtype=np.float32)
                with np.errstate(divide="ignore"):
                    variance = np.where(weight > 0, 1.0 / weight, np.inf).astype(np.float32)
        else:
            variance = np.ascontiguousarray(variance, dtype=np.float32)
        mask = _aux_array(path, hdul, mask_hdu, _MASK_NAMES, cube.shape, "mask")
        extra = None if mask is None else _bad_from_mask(path, np.asarray(mask), mask_bits)
        if variance is not None:
            bad_var = ~np.isfinite(variance) | (variance <= 0)
            extra = bad_var.any(axis=0) if extra is None else extra | bad_var.any(axis=0)
            variance = np.where(bad_var, 0.0, variance).astype(np.float32)
    wcs = _celestial_wcs(path, header)
    if cube.shape[0] == 1:
        names = [str(header.get("FILTER", header.get("BAND", fits_stem(path)))).strip() or fits_stem(path)]
    else:
        names = [f"band{i}" for i in range(cube.shape[0])]
    return cube, extra, variance, header, wcs, names


def read_image(paths, *, hdu=None, variance_hdu=None, weight_hdu=None, mask_hdu=None, mask_bits=None,
               band_names=None):
    """Read a FITS image, a cube, or several single-band files of one field.

    Parameters
    ----------
    paths : str, os.PathLike, or sequence of them
        One file (2-D image or 3-D cube ``(n_bands, ny, nx)``) or several
        single-band files of the same field, stacked as bands in the order given.
        Plain, gzip (``.gz``) and tile-compressed (``.fz``) files are read.
    hdu : int or str, optional
        HDU holding the image (index or EXTNAME). Default: the first HDU with
        2-D or 3-D data.
    variance_hdu, weight_hdu, mask_hdu : int, str or False, optional
        HDUs with per-pixel variance, inverse-variance weight, or a mask
        (non-zero = bad). Default: found by EXTNAME (``VARIANCE``, ``WEIGHT``,
        ``MASK`` and common aliases) when present; ``False`` disables.
    mask_bits : int, optional
        For a bit mask (e.g. LSST/HSC mask planes): the bits that mark a bad
        pixel. Without it, a 0/1 mask is used as it is and a bit mask is
        ignored with a warning.
    band_names : sequence of str, optional
        Names for the bands; default from ``FILTER`` keywords or file names.

    Returns
    -------
    Image
        Native float32 data with non-finite pixels zeroed and flagged in ``mask``.

    Raises
    ------
    InputError
        If a file does not exist, is not FITS, is truncated, has no image HDU,
        has data of the wrong dimensionality or zero size, has no finite pixel,
        or the bands given together differ in shape.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths must name at least one FITS file, got an empty sequence")
    parts = [_read_one(p, hdu, variance_hdu, weight_hdu, mask_hdu, mask_bits) for p in paths]
    if len(parts) == 1:
        cube, extra, variance, header, wcs, names = parts[0]
    else:
        shapes = {str(p): part[0].shape for p, part in zip(paths, parts, strict=True)}
        if len({s for s in shapes.values()}) > 1 or any(s[0] != 1 for s in shapes.values()):
            raise InputError(paths[0], f"bands given together must be single-band images of one shape, got {shapes}")
        cube = np.concatenate([part[0] for part in parts])
        extras = [part[1] for part in parts if part[1] is not None]
        extra = np.logical_or.reduce(extras) if extras else None
        variances = [part[2] for part in parts]
        variance = np.concatenate(variances) if all(v is not None for v in variances) else None
        header, wcs = parts[0][3], parts[0][4]
        names = [part[5][0] for part in parts]
        if len(set(names)) < len(names):
            names = [fits_stem(p) for p in paths]
    cube, bad = _mask_nonfinite(cube, extra)
    if bad.all():
        raise InputError(paths[0], "all pixels are non-finite or masked; nothing to deblend")
    if band_names is not None:
        if len(band_names) != cube.shape[0]:
            raise ValueError(f"band_names has {len(band_names)} names for {cube.shape[0]} bands")
        names = list(band_names)
    n_bad = int(bad.sum())
    if n_bad:
        log.info("%s: %d pixels masked (non-finite or flagged)", paths[0], n_bad)
    return Image(
        data=cube,
        mask=bad,
        header=header,
        wcs=wcs,
        variance=variance,
        paths=[str(p) for p in paths],
        band_names=names,
    )


@contextlib.contextmanager
def atomic_path(path, *, overwrite=True):
    """Yield a temporary path next to ``path``; rename it into place on success.

    On any exception (including KeyboardInterrupt) the temporary file is
    removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination.
    overwrite : bool, optional
        If False and ``path`` exists, raise `FileExistsError` before writing.

    Yields
    ------
    pathlib.Path
        Where to write. Its name keeps the final suffix so writers that infer
        the format from the extension still work.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{''.join(path.suffixes[-1:])}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fits_text(text):
    """``text`` as printable ASCII for a FITS card: other characters as backslash escapes."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in str(text))


def provenance_cards(*, method=None, weights_id=None, input_path=None, extra=None):
    """Provenance FITS cards: package version, method, weights id, date, input.

    Parameters
    ----------
    method : str, optional
    weights_id : str, optional
    input_path : str, optional
    extra : dict, optional
        More ``keyword: value`` or ``keyword: (value, comment)`` pairs
        (keywords of at most 8 characters).

    Returns
    -------
    list of tuple
        ``(keyword, value, comment)`` triples.
    """
    cards = [
        ("CREATOR", f"deblend {__version__}", "software that wrote this file"),
        ("DBVERS", __version__, "deblend package version"),
        ("DATE", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "UTC date of writing"),
    ]
    if method is not None:
        cards.append(("DBMETHOD", str(method), "deblending method"))
    cards.append(("DBWEIGHT", str(weights_id) if weights_id else "none", "model weights id (sha256 prefix)"))
    if input_path is not None:
        cards.append(("DBINPUT", _fits_text(Path(input_path).name)[:68], "input file"))
    for key, value in (extra or {}).items():
        cards.append((key, *value) if isinstance(value, tuple) else (key, value, ""))
    return cards


def _base_header(header=None, wcs=None):
    out = fits.Header()
    if wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            out.update(wcs.to_header(relax=True))
    elif header is not None:
        for key in ("OBJECT", "FILTER", "TELESCOP", "INSTRUME"):
            if key in header:
                out[key] = header[key]
    return out


def write_image(path, data, *, header=None, wcs=None, extensions=None, overwrite=False):
    """Write an image (and optional named image extensions) atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (``.fits``; ``.fits.gz`` is gzip-compressed by astropy).
    data : ndarray
        Primary HDU data.
    header : astropy.io.fits.Header, optional
        Cards to copy into the primary header.
    wcs : astropy.wcs.WCS, optional
        WCS to write into the primary header.
    extensions : dict of str to ndarray, optional
        Extra image HDUs, by EXTNAME.
    overwrite : bool, optional
        Replace an existing file.
    """
    hdr = _base_header(None, wcs)
    if header is not None:
        for card in header.cards:
            structural = ("SIMPLE", "BITPIX", "EXTEND", "", "COMMENT", "HISTORY")
            if card.keyword in structural or card.keyword.startswith("NAXIS"):
                continue
            hdr[card.keyword] = (card.value, card.comment)
    hdus = [fits.PrimaryHDU(data=data, header=hdr)]
    for name, arr in (extensions or {}).items():
        hdus.append(fits.ImageHDU(data=arr, header=_base_header(None, wcs), name=name))
    with atomic_path(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def write_segmentation(path, labels, *, wcs=None, header=None, method=None, weights_id=None,
                       input_path=None, settings=None, extensions=None, overwrite=False):
    """Write a segmentation map: int32 labels, the input's WCS, provenance keywords.

    Parameters
    ----------
    path : str or os.PathLike
        Destination, conventionally ``<stem>_seg.fits``.
    labels : ndarray of int, shape (ny, nx)
        0 = background, 1..N = sources (the catalog's ``label`` column).
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the input image.
    header : astropy.io.fits.Header, optional
        Input header, from which a few descriptive keywords are kept when there is no WCS.
    method, weights_id, input_path : str, optional
        Provenance recorded in the header.
    settings : dict, optional
        The deblender's settings as ``keyword: (value, comment)`` header cards
        (`deblend.pipeline.Deblender.settings`).
    extensions : dict of str to ndarray, optional
        Extra image HDUs (e.g. ``UNCERTAINTY``).
    overwrite : bool, optional
        Replace an existing file.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (ny, nx), got shape {labels.shape}")
    hdr = _base_header(header, wcs)
    for key, value, comment in provenance_cards(method=method, weights_id=weights_id, input_path=input_path,
                                                extra=settings):
        hdr[key] = (value, comment)
    hdr["NSOURCES"] = (int(labels.max()) if labels.size else 0, "number of labelled sources")
    hdr["EXTNAME"] = "SEGMAP"
    hdus = [fits.PrimaryHDU(data=labels.astype(np.int32), header=hdr)]
    for name, arr in (extensions or {}).items():
        hdus.append(fits.ImageHDU(data=np.asarray(arr), header=_base_header(None, wcs), name=name))
    with atomic_path(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def read_segmentation(path):
    """Read a segmentation map written by deblend (or any int label image).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    labels : ndarray of int32, shape (ny, nx)
    header : astropy.io.fits.Header

    Raises
    ------
    InputError
        If the file cannot be read or holds no 2-D image.
    """
    with _open_fits(path) as hdul:
        index, h = _find_image_hdu(path, hdul, None)
        data = _hdu_data(path, h, index)
        arr = np.asarray(data)
        if arr.ndim != 2:
            raise InputError(path, f"segmentation map must be 2-D, got shape {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.int32), h.header.copy()


def catalog_format(path, format=None):
    """Resolve a catalog format name from ``format`` or the file extension.

    Parameters
    ----------
    path : str or os.PathLike
    format : str, optional
        One of ``CATALOG_FORMATS``.

    Returns
    -------
    str
        The format name (a key of ``CATALOG_FORMATS``).
    """
    if format is not None:
        if format not in CATALOG_FORMATS:
            raise ValueError(f"format must be one of {sorted(CATALOG_FORMATS)}, got {format!r}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSION_FORMATS:
        raise ValueError(f"cannot infer the catalog format of {path!s} from its extension {suffix!r}; "
                         f"use one of {sorted(_EXTENSION_FORMATS)} or pass format=")
    return _EXTENSION_FORMATS[suffix]


def _flatten_for_format(table, fmt):
    """Return a plain copy of ``table`` that ``fmt`` can store (no SkyCoord, simple meta)."""
    from astropy.coordinates import SkyCoord

    out = QTable(table, copy=True)
    for name in list(out.colnames):
        col = out[name]
        if isinstance(col, SkyCoord):
            if fmt == "ecsv":
                continue
            icrs = col.icrs
            if "ra" not in out.colnames:
                out["ra"] = icrs.ra.to("deg")
                out["dec"] = icrs.dec.to("deg")
            out.remove_column(name)
    if fmt in ("fits", "votable", "csv", "parquet"):
        meta = {}
        for key, value in table.meta.items():
            if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
                meta[str(key)[:8].upper() if fmt == "fits" else key] = value
            else:
                meta[str(key)[:8].upper() if fmt == "fits" else key] = str(value)
        out.meta = meta
    if fmt == "fits":  # FITS headers hold printable ASCII only (band names may come from file names)
        out.meta = {key: _fits_text(value) if isinstance(value, str) else value for key, value in out.meta.items()}
        for name in out.colnames:
            if _fits_text(name) != name:
                out.rename_column(name, _fits_text(name))
    if fmt in ("csv", "parquet", "votable"):
        out = Table(out)
    return out


def write_catalog(table, path, *, format=None, overwrite=False):
    """Write a catalog atomically in FITS, ECSV, CSV, Parquet or VOTable.

    Parameters
    ----------
    table : astropy.table.Table or QTable
        The catalog.
    path : str or os.PathLike
        Destination.
    format : {'fits', 'ecsv', 'csv', 'parquet', 'votable'}, optional
        Default: from the extension of ``path``.
    overwrite : bool, optional
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    fmt = catalog_format(path, format)
    astropy_format = CATALOG_FORMATS[fmt][0]
    out = _flatten_for_format(table, fmt)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            out.write(tmp, format=astropy_format)
    return Path(path)


def read_catalog(path, *, format=None):
    """Read a catalog written by `write_catalog`.

    Parameters
    ----------
    path : str or os.PathLike
    format : str, optional
        Default: from the extension.

    Returns
    -------
    astropy.table.QTable
    """
    fmt = catalog_format(path, format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        if fmt == "fits":  # strings as str, not bytes
            return QTable.read(path, format="fits", character_as_bytes=False)
        return QTable.read(path, format=CATALOG_FORMATS[fmt][0])


def read_header(path, *, hdu=None):
    """Read the header of an image HDU without reading its data.

    Parameters
    ----------
    path : str or os.PathLike
    hdu : int or str, optional
        Default: the first HDU with 2-D or 3-D data.

    Returns
    -------
    astropy.io.fits.Header

    Raises
    ------
    InputError
        If the file cannot be read or has no image HDU.
    """
    with _open_fits(path) as hdul:
        _, h = _find_image_hdu(path, hdul, hdu)
        return h.header.copy()


@dataclass
class ImageSections:
    """A FITS image left on disk: header, WCS and shape at once, pixels one window at a time.

    Made by `open_image_sections`; valid while its ``with`` block lasts.
    Each `read` touches only the file pages of its window (uncompressed
    files are memory-mapped; tile-compressed ones decompress only the tiles
    it needs), so memory does not grow with the image.

    Attributes
    ----------
    path : str
    header : astropy.io.fits.Header
    wcs : astropy.wcs.WCS or None
        Celestial WCS of the whole image.
    shape : tuple of int
        ``(n_bands, ny, nx)``.
    band_names : list of str
    """

    path: str
    header: fits.Header
    wcs: WCS | None
    shape: tuple
    band_names: list
    _planes: dict = field(default_factory=dict, repr=False)
    _mask_bits: int | None = None

    def read(self, y0, y1, x0, x1):
        """The window ``[y0:y1, x0:x1]`` as an `Image`, with `read_image`'s conventions.

        Native float32, non-finite and flagged pixels in ``mask`` (and zeroed),
        variance from a variance or weight HDU, ``wcs`` cut to the window. Unlike
        `Image.from_array`, a window may be entirely masked.

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Rows ``y0:y1`` and columns ``x0:x1`` (0-based, half-open).

        Returns
        -------
        Image
        """
        window = (slice(y0, y1), slice(x0, x1))
        cube = self._cube("data", window)
        extra = None
        if "mask" in self._planes:
            mask = self._cube("mask", window, dtype=None)
            extra = _bad_from_mask(self.path, mask, self._mask_bits)
        variance = None
        if "variance" in self._planes:
            variance = self._cube("variance", window)
        elif "weight" in self._planes:
            weight = self._cube("weight", window)
            with np.errstate(divide="ignore"):
                variance = np.where(weight > 0, 1.0 / weight, np.inf).astype(np.float32)
        if variance is not None:
            bad_var = ~np.isfinite(variance) | (variance <= 0)
            extra = bad_var.any(axis=0) if extra is None else extra | bad_var.any(axis=0)
            variance = np.where(bad_var, 0.0, variance).astype(np.float32)
        cube, bad = _mask_nonfinite(cube, extra)
        wcs = None if self.wcs is None else self.wcs.slice(window)
        return Image(data=cube, mask=bad, header=self.header, wcs=wcs, variance=variance, paths=[self.path],
                     band_names=list(self.band_names))

    def _cube(self, name, window, dtype=np.float32):
        section, lead = self._planes[name]
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = np.asarray(section[lead + window])
        except (TypeError, ValueError, OSError, IndexError) as exc:
            raise InputError(self.path, f"{name} cannot be read, the file may be truncated ({exc})") from exc
        if dtype is not None:
            arr = np.asarray(arr, dtype=dtype)
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        return np.ascontiguousarray(arr)


def _plane_section(path, hdu, what, cube_shape):
    """``(section, leading index)`` of an image HDU whose data is a 2-D/3-D plane of ``cube_shape``."""
    shape = _header_shape(hdu.header)
    lead = ()
    while len(shape) > 3 and shape[0] == 1:
        shape, lead = shape[1:], (*lead, 0)
    if len(shape) not in (2, 3):
        raise InputError(path, f"wrong dimensionality: {what} HDU {hdu.name!r} has shape {shape}; deblend needs a "
                         "2-D image or a 3-D cube (bands, y, x)")
    if any(n == 0 for n in shape):
        raise InputError(path, f"zero size: {what} HDU {hdu.name!r} has shape {shape}")
    if cube_shape is not None and tuple(shape[-2:]) != tuple(cube_shape[-2:]):
        raise InputError(path, f"{what} HDU {hdu.name!r} has shape {shape}, image has {tuple(cube_shape)}")
    return (hdu.section, lead), shape


@contextlib.contextmanager
def open_image_sections(path, *, hdu=None, mask_bits=None):
    """Open a FITS image for reading it one window at a time (memory-mapped), like `read_image` does whole.

    Parameters
    ----------
    path : str or os.PathLike
        One plain or tile-compressed (``.fz``) FITS file; gzip-compressed
        files cannot be read by window (use `read_image`).
    hdu : int or str, optional
        HDU holding the image; default: the first with 2-D or 3-D data.
    mask_bits : int, optional
        Bits of a mask HDU that flag bad pixels (see `read_image`).

    Yields
    ------
    ImageSections

    Raises
    ------
    InputError
        If the file cannot be read, has no image HDU, or its data has the
        wrong dimensionality or zero size.
    """
    with _open_fits(path, memmap=True) as hdul:
        index, h = _find_image_hdu(path, hdul, hdu)
        planes = {}
        planes["data"], shape = _plane_section(path, h, f"HDU {index}", None)
        cube_shape = (1, *shape) if len(shape) == 2 else tuple(shape)
        for name, names in (("variance", _VARIANCE_NAMES), ("weight", _WEIGHT_NAMES), ("mask", _MASK_NAMES)):
            aux = _named_hdu(hdul, names)
            if aux is not None and aux is not h:
                planes[name], _ = _plane_section(path, aux, name, cube_shape)
        header = h.header.copy()
        if cube_shape[0] == 1:
            names = [str(header.get("FILTER", header.get("BAND", fits_stem(path)))).strip() or fits_stem(path)]
        else:
            names = [f"band{i}" for i in range(cube_shape[0])]
        yield ImageSections(path=str(path), header=header, wcs=_celestial_wcs(path, header), shape=cube_shape,
                            band_names=names, _planes=planes, _mask_bits=mask_bits)
