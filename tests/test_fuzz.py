"""Property-based fuzzing: random arrays through the deblenders, random header cards through the reader.

Only documented failures are allowed: `InputError` naming the file (files) or
`ValueError` saying there is no finite pixel (arrays); a failed input leaves no
output. Examples are derandomized (the same on every run, so CI is
deterministic) and few for Mask R-CNN, which is slower.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deblend.batch import MANIFEST_NAME, read_manifest, run_batch
from deblend.exceptions import InputError
from deblend.io import read_catalog, read_image, read_segmentation
from deblend.pipeline import Deblender

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# byte orders and the integer types FITS stores natively or through BZERO (uint16, uint32)
DTYPES = [">f4", "<f4", ">f8", "<f8", ">i2", "<i2", ">i4", "<u2", "u1", ">u4", "<i8"]


def _elements(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if dtype.itemsize == 4 else 64)
    return None  # hypothesis' default: the full integer range


@st.composite
def raw_arrays(draw, max_side=24):
    """Arbitrary values of any dtype and shape (2-D, or 3-D with 1-3 bands), tiny shapes included."""
    dtype = draw(st.sampled_from(DTYPES))
    ny, nx = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    shape = (ny, nx) if draw(st.booleans()) else (draw(st.integers(1, 3)), ny, nx)
    return draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))


@st.composite
def scenes(draw, max_side=48):
    """Noisy sky with Gaussian sources and NaN/inf in pixels, rows, columns or blocks: realistic but broken."""
    ny, nx = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    sky = draw(st.sampled_from([0.0, 100.0, -50.0, 1e6]))
    noise = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    data = rng.normal(sky, noise, (ny, nx))
    y, x = np.mgrid[0:ny, 0:nx]
    for _ in range(draw(st.integers(0, 4))):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        data += noise * rng.uniform(5, 500) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * rng.uniform(0.7, 3) ** 2))
    for _ in range(draw(st.integers(0, 3))):
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        kind = draw(st.sampled_from(["pixel", "row", "column", "block"]))
        i, j = rng.integers(ny), rng.integers(nx)
        if kind == "pixel":
            data[i, j] = value
        elif kind == "row":
            data[i] = value
        elif kind == "column":
            data[:, j] = value
        else:
            data[i:i + rng.integers(1, ny + 1), j:j + rng.integers(1, nx + 1)] = value
    return data.astype(draw(st.sampled_from([">f4", "<f4", ">f8", "<f8"])))


def _bad_pixels(array):
    """Pixels deblend must mask: non-finite in any band once converted to float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(as32)
    return ~(finite.all(axis=0) if as32.ndim == 3 else finite)


def check_result(result, array):
    """A result is consistent: int32 map of the image shape, labels 1..N = catalog, nothing in masked pixels."""
    bad = _bad_pixels(array)
    labels = result.labels
    assert labels.shape == bad.shape and labels.dtype == np.int32
    n = len(result.catalog)
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.arange(1, n + 1))
    np.testing.assert_array_equal(np.asarray(result.catalog["label"]), np.arange(1, n + 1))
    assert not labels[bad].any(), "a masked (non-finite) pixel was labelled"
    if n:
        for column in ("x_centroid", "y_centroid"):
            values = np.asarray(result.catalog[column], dtype=float)
            assert np.isfinite(values).all(), column


def deblend_array(deblender, array):
    """Run ``deblender`` on ``array``: a consistent result, or the documented ValueError when nothing is finite."""
    bad = _bad_pixels(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NoSourcesWarning and numpy's overflow notes on extreme values
        if bad.all():
            with pytest.raises(ValueError, match="no finite"):
                deblender.run(array)
            return
        result = deblender.run(array)
    check_result(result, array)


def deblend_file(deblender, array, directory):
    """Write ``array`` as FITS and run a batch on it: outputs and an ok record, or an InputError and no output."""
    directory = Path(directory)
    path = directory / "in" / "fuzz.fits"
    path.parent.mkdir()
    fits.PrimaryHDU(array).writeto(path)
    outdir = directory / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_batch([path], outdir, deblender, progress=False)
    (record,) = summary.records
    left = sorted(p.name for p in outdir.iterdir())
    if record.status == "failed":
        assert record.error_type == "InputError", record.error
        assert record.error.startswith(f"{path}:"), record.error
        assert left == [MANIFEST_NAME]
        assert _bad_pixels(array).all(), f"a file with finite pixels failed: {record.error}"
    else:
        assert record.status == "ok", record
        assert left == sorted([MANIFEST_NAME, "fuzz_cat.fits", "fuzz_seg.fits"])
        labels, _ = read_segmentation(outdir / "fuzz_seg.fits")
        catalog = read_catalog(outdir / "fuzz_cat.fits")
        assert labels.shape == _bad_pixels(array).shape and len(catalog) == labels.max()


@pytest.fixture(scope="module")
def sep_deblender():
    return Deblender("sep")


@pytest.fixture(scope="module")
def mask_rcnn_deblender():
    return Deblender("mask-rcnn")


@settings(FUZZ, max_examples=60)
@given(array=raw_arrays())
def test_sep_on_arbitrary_arrays(sep_deblender, array):
    deblend_array(sep_deblender, array)


@settings(FUZZ, max_examples=40)
@given(array=scenes())
def test_sep_on_broken_scenes(sep_deblender, array):
    deblend_array(sep_deblender, array)


@settings(FUZZ, max_examples=25)
@given(array=st.one_of(raw_arrays(max_side=12), scenes(max_side=24)))
def test_sep_on_arbitrary_files(sep_deblender, array):
    with tempfile.TemporaryDirectory() as directory:
        deblend_file(sep_deblender, array, directory)


@settings(FUZZ, max_examples=6)
@given(array=st.one_of(raw_arrays(max_side=16), scenes(max_side=40)))
def test_mask_rcnn_on_arbitrary_arrays(mask_rcnn_deblender, array):
    deblend_array(mask_rcnn_deblender, array)


# --------------------------------------------------------------------------- random header cards

_KEYWORDS = ["BSCALE", "BZERO", "BLANK", "BUNIT", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
             "CDELT1", "CDELT2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "PC1_1", "PC2_2", "CUNIT1", "CUNIT2",
             "CROTA2", "RADESYS", "EQUINOX", "LONPOLE", "LATPOLE", "PV2_1", "A_ORDER", "WCSAXES", "FILTER",
             "EXTNAME", "EXTEND", "MJD-OBS", "DATE-OBS", "NAXIS3", "GCOUNT", "PCOUNT", "BITPIX", "NAXIS",
             "NAXIS1", "END", "SIMPLE", "XTENSION", "ZIMAGE", "COMMENT", "HISTORY", "HIERARCH"]
_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
_VALUES = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["T", "F", "NaN", "nan", "inf", "-inf", "1e999", "-0", "0", "1.0D5", "'RA---TAN'",
                     "'DEC--TAN'", "'RA---TAN-SIP'", "'deg'", "'ICRS'", "''", "'", "' unterminated"]),
    _PRINTABLE.map(lambda s: "'" + s.replace("'", "''") + "'"),
    _PRINTABLE,
)
_TAN = [("CTYPE1", "'RA---TAN'", True), ("CTYPE2", "'DEC--TAN'", True), ("CRVAL1", "150.0", True),
        ("CRVAL2", "2.0", True), ("CRPIX1", "8.5", True), ("CRPIX2", "6.5", True),
        ("CDELT1", "-5.5E-05", True), ("CDELT2", "5.5E-05", True), ("CUNIT1", "'deg'", True),
        ("CUNIT2", "'deg'", True)]
# random cards, half the time after a valid TAN WCS that they then break (or not)
_CARDS = st.tuples(st.booleans(), st.lists(st.tuples(st.sampled_from(_KEYWORDS), _VALUES, st.booleans()),
                                           max_size=12)).map(lambda t: (_TAN if t[0] else []) + t[1])


def _card(keyword, value, with_equals=True):
    text = f"{keyword:<8}= {value:>20}" if with_equals else f"{keyword:<8}{value}"
    return text[:80].ljust(80)


def fits_bytes(cards, data):
    """A primary HDU whose header holds the mandatory cards and then ``cards``, written byte by byte."""
    ny, nx = data.shape
    header = [_card("SIMPLE", "T"), _card("BITPIX", "-32"), _card("NAXIS", "2"), _card("NAXIS1", str(nx)),
              _card("NAXIS2", str(ny))]
    header += [_card(keyword, value, equals) for keyword, value, equals in cards]
    header.append("END".ljust(80))
    text = "".join(header)
    text += " " * (-len(text) % 2880)
    raw = data.astype(">f4").tobytes()
    return text.encode("ascii") + raw + b"\0" * (-len(raw) % 2880)


def _field():
    y, x = np.mgrid[0:12, 0:16]
    rng = np.random.default_rng(7)
    return (100 + rng.normal(0, 1, (12, 16)) + 80 * np.exp(-((x - 7.5) ** 2 + (y - 5.5) ** 2) / 4)).astype(">f4")


@settings(FUZZ, max_examples=80)
@given(cards=_CARDS)
def test_random_header_cards(sep_deblender, cards):
    data = _field()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "in" / "cards.fits"
        path.parent.mkdir()
        path.write_bytes(fits_bytes(cards, data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                image = read_image(path)
            except InputError as exc:
                assert str(exc).startswith(f"{path}:") and exc.reason, exc
                image = None
        if image is not None:
            assert image.data.dtype == np.float32 and np.isfinite(image.data).all()
            assert image.data.ndim == 3 and not image.mask.all()
        outdir = Path(directory) / "out"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = run_batch([path], outdir, sep_deblender, progress=False)
        (record,) = summary.records
        left = sorted(p.name for p in outdir.iterdir())
        if image is None:  # what the reader refused, the batch refuses the same way, leaving nothing
            assert record.status == "failed" and record.error_type == "InputError", record
            assert left == [MANIFEST_NAME]
        else:
            assert record.status == "ok", record.error
            assert left == sorted([MANIFEST_NAME, "cards_cat.fits", "cards_seg.fits"])
            labels, _ = read_segmentation(outdir / "cards_seg.fits")
            assert labels.shape == image.shape and len(read_catalog(outdir / "cards_cat.fits")) == labels.max()
        assert read_manifest(outdir)[-1].path == str(path)


def test_fits_bytes_builder_makes_valid_files(tmp_path):
    """The header fuzzer's builder writes what astropy reads back as the intended image."""
    path = tmp_path / "plain.fits"
    path.write_bytes(fits_bytes([("FILTER", "'r'", True), ("CRPIX1", "8.0", True)], _field()))
    image = read_image(path)
    np.testing.assert_array_equal(image.data[0], _field().astype(np.float32))
    assert image.band_names == ["r"] and image.header["CRPIX1"] == 8.0
    assert re.fullmatch(r"[ -~]*", path.read_bytes()[:2880].decode("ascii"))
