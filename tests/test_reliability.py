"""Reliability: hostile and broken inputs end to end, output safety, safe weights, determinism.

Each bad input either works correctly through ``deblend run`` or fails with an
`InputError` that names the file and the cause, leaving nothing but the
manifest in OUTDIR. The unit tests of the reader are in test_io.py; these run
the whole command (SEP everywhere, the shipped Mask R-CNN on a few small inputs).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from deblend.batch import MANIFEST_NAME, read_manifest
from deblend.cli import build_parser, main
from deblend.exceptions import InputError, NoSourcesWarning, WCSWarning
from deblend.io import Image, read_catalog, read_image, read_segmentation
from deblend.models.registry import WEIGHTS_DIR, load_mask_rcnn
from deblend.pipeline import Deblender
from deblend.preprocess import prepare

SHIPPED = "mask_rcnn_small"


# --------------------------------------------------------------------------- helpers


def run_cli(inputs, outdir, *options, method="sep"):
    """``deblend -q run --method METHOD -o OUTDIR OPTIONS -- INPUTS``; returns the exit status."""
    return main(["-q", "run", "--method", method, "-o", str(outdir), *options, "--", *map(str, inputs)])


def all_files(directory):
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def assert_failed_cleanly(outdir, path, cause):
    """The run recorded an InputError naming ``path`` and ``cause`` and left only the manifest."""
    (record,) = read_manifest(outdir)
    assert record.status == "failed" and record.error_type == "InputError", record
    assert re.search(re.escape(str(path)) + ".*" + cause, record.error), record.error
    assert all_files(outdir) == [MANIFEST_NAME]  # no output, no temporary file


def check_outputs(outdir, stem, *, shape, mask=None, manifest=True):
    """Both outputs exist and agree: int32 map of ``shape``, labels 1..N equal to the catalog's."""
    expected = [f"{stem}_cat.fits", f"{stem}_seg.fits"] + ([MANIFEST_NAME] if manifest else [])
    assert all_files(outdir) == sorted(expected)
    labels, header = read_segmentation(Path(outdir) / f"{stem}_seg.fits")
    catalog = read_catalog(Path(outdir) / f"{stem}_cat.fits")
    assert labels.shape == shape and labels.dtype == np.int32
    n = len(catalog)
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.arange(1, n + 1))
    np.testing.assert_array_equal(np.asarray(catalog["label"]), np.arange(1, n + 1))
    assert header["NSOURCES"] == n
    if mask is not None:
        assert not labels[mask].any(), "a masked pixel was labelled"
    return labels, header, catalog


def write(path, hdus):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus if isinstance(hdus, list) else [hdus]).writeto(path)
    return path


@pytest.fixture(scope="module")
def deblenders():
    """One Deblender per method, shared by the tests of this module (the model loads once)."""
    return {"sep": Deblender("sep"), "mask-rcnn": Deblender("mask-rcnn")}


# --------------------------------------------------------------------------- inputs that must fail


def _truncated(tmp_path, scene, cut):
    raw = write(tmp_path / "full.fits", fits.PrimaryHDU(scene)).read_bytes()
    (tmp_path / "full.fits").unlink()
    path = tmp_path / "in" / "cut.fits"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw[:cut])
    return path


def _table():
    return fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))])


BAD_INPUTS = {
    "empty file": (lambda tmp, s: _text(tmp, ""), "empty"),
    "not FITS": (lambda tmp, s: _text(tmp, "SIMPLE is what this is not\n" * 200), "not a FITS file"),
    "truncated header": (lambda tmp, s: _truncated(tmp, s, 1000), "truncated"),
    "truncated data": (lambda tmp, s: _truncated(tmp, s, 2880 + 5000), "truncated"),
    "header only": (lambda tmp, s: write(tmp / "in" / "x.fits", fits.PrimaryHDU()), "no image HDU"),
    "empty primary, table only": (lambda tmp, s: write(tmp / "in" / "x.fits", [fits.PrimaryHDU(), _table()]),
                                  "no image HDU"),
    "1-D": (lambda tmp, s: write(tmp / "in" / "x.fits", fits.PrimaryHDU(s[0])), "wrong dimensionality.*1-D"),
    "4-D": (lambda tmp, s: write(tmp / "in" / "x.fits", fits.PrimaryHDU(np.stack([s[None], s[None]]))),
            "wrong dimensionality.*4-D"),
    "zero-size axis": (lambda tmp, s: write(tmp / "in" / "x.fits", fits.PrimaryHDU(np.zeros((0, 16), "f4"))),
                       "zero size"),
    "all NaN": (lambda tmp, s: write(tmp / "in" / "x.fits", fits.PrimaryHDU(np.full_like(s, np.nan))),
                "non-finite"),
    "all inf": (lambda tmp, s: write(tmp / "in" / "x.fits", fits.PrimaryHDU(np.where(s > 0, np.inf, -np.inf))),
                "non-finite"),
    "mask covers everything": (lambda tmp, s: write(tmp / "in" / "x.fits", [
        fits.PrimaryHDU(s), fits.ImageHDU(np.ones(s.shape, np.uint8), name="MASK")]), "masked"),
}


def _text(tmp_path, text):
    path = tmp_path / "in" / "x.fits"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_fails_cleanly_through_the_command(kind, tmp_path, scene):
    make, cause = BAD_INPUTS[kind]
    path = make(tmp_path, scene)
    outdir = tmp_path / "out"
    assert run_cli([path], outdir) == 1
    assert_failed_cleanly(outdir, path, cause)
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*" + cause):
        Deblender("sep").run(path)


@pytest.mark.parametrize("kind", ["not FITS", "truncated data", "all NaN"])
def test_bad_input_fails_cleanly_with_mask_rcnn(kind, tmp_path, scene):
    make, cause = BAD_INPUTS[kind]
    path = make(tmp_path, scene)
    outdir = tmp_path / "out"
    assert run_cli([path], outdir, method="mask-rcnn") == 1
    assert_failed_cleanly(outdir, path, cause)


def test_bands_of_different_shapes(tmp_path, scene):
    first = write(tmp_path / "in" / "g.fits", fits.PrimaryHDU(scene))
    second = write(tmp_path / "in" / "r.fits", fits.PrimaryHDU(scene[:, :40]))
    outdir = tmp_path / "out"
    assert run_cli([first, second], outdir, "--bands") == 1
    (record,) = read_manifest(outdir)
    assert record.error_type == "InputError"
    assert record.error.startswith(f"{first}:") and "one shape" in record.error
    assert "64, 64)" in record.error and "64, 40)" in record.error  # says which shapes
    assert all_files(outdir) == [MANIFEST_NAME]


def test_bad_file_among_good_ones_leaves_only_the_good_outputs(tmp_path, scene):
    good = write(tmp_path / "in" / "good.fits", fits.PrimaryHDU(scene))
    bad = _truncated(tmp_path, scene, 2880 + 5000)
    outdir = tmp_path / "out"
    assert run_cli([tmp_path / "in"], outdir) == 1
    by_name = {Path(r.path).name: r for r in read_manifest(outdir)}
    assert by_name[good.name].status == "ok" and by_name[bad.name].status == "failed"
    assert all_files(outdir) == sorted([MANIFEST_NAME, "good_cat.fits", "good_seg.fits"])


# --------------------------------------------------------------------------- inputs that must work


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_one_pixel_image(tmp_path, method):
    path = write(tmp_path / "in" / "one.fits", fits.PrimaryHDU(np.array([[5.0]], np.float32)))
    outdir = tmp_path / "out"
    assert run_cli([path], outdir, method=method) == 0
    labels, _, catalog = check_outputs(outdir, "one", shape=(1, 1))
    assert len(catalog) == 0 and not labels.any()


def test_ten_by_hundred_thousand(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(100.0, 1.0, size=(10, 100_000))
    y, x = np.mgrid[0:10, 0:100_000]
    centres = (500, 50_000, 99_500)
    for x0 in centres:
        data += 60 * np.exp(-((x - x0) ** 2 + (y - 4.5) ** 2) / (2 * 1.5**2))
    path = write(tmp_path / "in" / "long.fits", fits.PrimaryHDU(data.astype(np.float32)))
    outdir = tmp_path / "out"
    assert run_cli([path], outdir) == 0
    _, _, catalog = check_outputs(outdir, "long", shape=(10, 100_000))
    np.testing.assert_allclose(np.sort(catalog["x_centroid"]), centres, atol=1.0)


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
@pytest.mark.parametrize("value", [0.0, 7.0, -3e5])
def test_constant_image_gives_empty_outputs(tmp_path, deblenders, method, value):
    data = np.full((48, 40), value, np.float32)
    with pytest.warns(NoSourcesWarning):
        result = deblenders[method].run(data)
    assert result.n_sources == 0 and result.labels.shape == (48, 40) and not result.labels.any()
    path = write(tmp_path / "in" / "flat.fits", fits.PrimaryHDU(data))
    assert run_cli([path], tmp_path / "out", method=method) == 0
    check_outputs(tmp_path / "out", "flat", shape=(48, 40))


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_huge_and_tiny_values_give_the_same_segmentation(deblenders, method, scale, scene):
    deblender = deblenders[method]
    reference = deblender.run(scene).labels
    scaled = (scene.astype(np.float64) * scale).astype(np.float32)
    labels = deblender.run(scaled).labels
    if method == "sep":
        np.testing.assert_array_equal(labels, reference)
    else:
        # The scaled image rounds differently in float32, which moves the network's scores by ~1e-4:
        # the same sources, but a mask-edge pixel near probability 0.5 may flip.
        assert set(np.unique(labels)) == set(np.unique(reference)) and len(np.unique(reference)) == 4
        assert (labels != reference).mean() <= 0.001


def test_values_near_the_float32_limit_never_reach_the_model_as_inf(deblenders):
    data = np.full((32, 32), 3e38, np.float32)
    data[::2] = -3e38  # subtracting any background overflows float32 in half the rows
    image = Image.from_array(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow leaks out of numpy either
        prepared = prepare(image)
        assert np.isfinite(prepared.data).all() and np.isfinite(prepared.detection).all()
        assert np.isfinite(prepared.normalized()).all()
        assert prepared.mask.any() and not image.mask.any()  # the overflowing pixels are masked
        for method in ("sep", "mask-rcnn"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoSourcesWarning)
                result = deblenders[method].run(image)
            assert result.labels.shape == (32, 32) and not result.labels[prepared.mask].any()


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_infinite_and_nan_pixels_are_masked(tmp_path, scene, method):
    data = scene.copy()
    data[30:36, 2:8] = np.inf
    data[0, :] = -np.inf
    data[60:, 20:30] = np.nan
    bad = ~np.isfinite(data)
    path = write(tmp_path / "in" / "holes.fits", fits.PrimaryHDU(data))
    outdir = tmp_path / "out"
    assert run_cli([path], outdir, method=method) == 0
    _, _, catalog = check_outputs(outdir, "holes", shape=scene.shape, mask=bad)
    assert len(catalog) == 3
    assert np.isfinite(np.asarray(catalog["segment_flux"])).all()


def _labels_of(tmp_path, name, hdu, method="sep"):
    path = write(tmp_path / "in" / f"{name}.fits", hdu)
    outdir = tmp_path / f"out_{name}"
    assert run_cli([path], outdir, method=method) == 0
    return read_segmentation(outdir / f"{name}_seg.fits")[0]


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_stored_integer_types_read_as_physical_values(tmp_path, scene, method):
    """int16 with BSCALE/BZERO, uint16 (int16 + BZERO 32768), uint8: the maps of float32 of the same values."""
    physical = np.round((scene.astype(np.float64) - 100) / 0.01) * 0.01 + 100
    scaled = fits.PrimaryHDU(physical)
    scaled.scale("int16", bscale=0.01, bzero=100.0)
    counts = np.round(scene.astype(np.float64) * 100)
    uint16 = fits.PrimaryHDU(counts.astype(np.uint16))
    small = np.clip(np.round(scene.astype(np.float64) - 60), 0, 255)
    cases = {
        "int16_scaled": (scaled, physical),
        "uint16": (uint16, counts),
        "uint8": (fits.PrimaryHDU(small.astype(np.uint8)), small),
    }
    for name, (hdu, values) in cases.items():
        labels = _labels_of(tmp_path, name, hdu, method)
        reference = _labels_of(tmp_path, f"{name}_float", fits.PrimaryHDU(values.astype(np.float32)), method)
        assert labels.max() == 3, name
        np.testing.assert_array_equal(labels, reference, err_msg=name)
    with fits.open(tmp_path / "in" / "uint16.fits") as hdul:  # really stored the FITS way
        assert hdul[0].header["BITPIX"] == 16 and hdul[0].header["BZERO"] == 32768
    with fits.open(tmp_path / "in" / "int16_scaled.fits") as hdul:
        assert hdul[0].header["BITPIX"] == 16 and hdul[0].header["BSCALE"] == 0.01


@pytest.mark.parametrize(("method", "dtype"), [("sep", d) for d in (">f4", "<f4", ">f8", "<f8", ">i4", "<i4", ">i2")]
                         + [("mask-rcnn", d) for d in (">f4", "<f8", ">i2")])
def test_big_and_little_endian_arrays_agree(scene, deblenders, method, dtype):
    values = np.round(scene) if dtype[1] == "i" else scene
    reference = deblenders[method].run(values.astype(np.float32)).labels
    np.testing.assert_array_equal(deblenders[method].run(values.astype(dtype)).labels, reference)


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_mask_covering_most_of_the_image(tmp_path, scene, deblenders, method):
    """A MASK HDU leaving a strip: the sources in the strip are found, nothing else, nothing in the mask.

    Regression: SEP's background mesh has no usable box when most pixels are masked and returned a
    background of 0 with σ 1, so the whole strip was one source (SEP) or many spurious ones (Mask R-CNN).
    """
    mask = np.ones(scene.shape, np.uint8)
    mask[:, 40:] = 0  # 37 % of the image left; holds the sources at x = 46 and 44
    path = write(tmp_path / "in" / "strip.fits", [fits.PrimaryHDU(scene), fits.ImageHDU(mask, name="MASK")])
    outdir = tmp_path / "out"
    assert run_cli([path], outdir, method=method) == 0
    _, _, catalog = check_outputs(outdir, "strip", shape=scene.shape, mask=mask.astype(bool))
    assert len(catalog) == 2
    np.testing.assert_allclose(sorted(catalog["x_centroid"]), [44.0, 46.0], atol=1.0)
    # only sky left: no source at all
    sky = np.ones(scene.shape, bool)
    sky[:, 58:] = False
    with pytest.warns(NoSourcesWarning):
        assert deblenders[method].run(Image.from_array(scene, mask=sky)).n_sources == 0


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_missing_wcs_writes_pixel_outputs(tmp_path, scene, method):
    path = write(tmp_path / "in" / "nowcs.fits", fits.PrimaryHDU(scene))
    outdir = tmp_path / "out"
    assert run_cli([path], outdir, method=method) == 0
    _, header, catalog = check_outputs(outdir, "nowcs", shape=scene.shape)
    assert len(catalog) == 3 and "ra" not in catalog.colnames and "CTYPE1" not in header


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
@pytest.mark.parametrize("changes", [{"CRVAL1": "garbage"}, {"CTYPE1": "RA---XXX"}, {"CRVAL2": 95.0},
                                     {"CDELT1": 0.0}])
def test_broken_wcs_warns_and_writes_pixel_outputs(tmp_path, scene, make_header, deblenders, method, changes):
    header = make_header()
    for key, value in changes.items():
        header[key] = value
    path = write(tmp_path / "in" / "broken.fits", fits.PrimaryHDU(scene, header=header))
    expected = "(?s)" + re.escape(str(path)) + ".*broken WCS.*pixel outputs are still written"
    with pytest.warns(WCSWarning, match=expected):
        result = deblenders[method].run(path)
    outdir = tmp_path / "out"
    result.write(outdir)
    _, header_out, catalog = check_outputs(outdir, "broken", shape=scene.shape, manifest=False)
    assert len(catalog) == 3 and "ra" not in catalog.colnames and "CTYPE1" not in header_out


def set_raw_card(path, keyword, raw_value):
    """Overwrite the card ``keyword`` of the primary header with a value astropy would never write."""
    raw = bytearray(Path(path).read_bytes())
    for start in range(0, 2880 * 4, 80):
        if raw[start:start + 8] == keyword.ljust(8).encode():
            raw[start:start + 80] = f"{keyword:<8}= {raw_value:>20}".ljust(80).encode()
            Path(path).write_bytes(bytes(raw))
            return
    raise AssertionError(f"no {keyword} card")


@pytest.mark.parametrize("with_wcs", [False, True])
@pytest.mark.parametrize(("keyword", "raw_value", "text"), [("FILTER", "NaN", "NaN"), ("EXTNAME", "1.0.0", "1.0.0"),
                                                            ("BUNIT", "'abc", "'abc")])
def test_unparsable_card_outside_the_wcs_is_read_as_text(tmp_path, scene, header, keyword, raw_value, text,
                                                         with_wcs, caplog):
    """Regression (found by test_fuzz.py): ``FILTER = NaN`` or ``EXTNAME = 1.0.0`` raised astropy's VerifyError."""
    hdu = fits.PrimaryHDU(scene, header=header if with_wcs else None)
    hdu.header[keyword] = "placeholder"
    path = write(tmp_path / "in" / "card.fits", hdu)
    set_raw_card(path, keyword, raw_value)
    image = read_image(path)
    assert image.header[keyword] == text and (image.wcs is not None) == with_wcs
    assert image.band_names == [text if keyword == "FILTER" else "card"]
    assert f"unparsable header values read as text: {keyword}" in caplog.text and str(path) in caplog.text
    outdir = tmp_path / "out"
    assert run_cli([path], outdir) == 0
    _, _, catalog = check_outputs(outdir, "card", shape=scene.shape)
    assert len(catalog) == 3 and ("ra" in catalog.colnames) == with_wcs


@pytest.mark.parametrize(("keyword", "raw_value"), [("CRVAL1", "1.0.0"), ("CRPIX2", "1e999"), ("CDELT1", "NaN"),
                                                    ("CRVAL2", "-1E400")])
def test_unparsable_or_infinite_wcs_value_is_a_broken_wcs(tmp_path, scene, header, keyword, raw_value):
    """Regression: ``CRPIX2 = 1e999`` was read as inf and gave every source a wrong (finite) sky position."""
    path = write(tmp_path / "in" / "wcs.fits", fits.PrimaryHDU(scene, header=header))
    set_raw_card(path, keyword, raw_value)
    with pytest.warns(WCSWarning, match="(?s)" + re.escape(str(path)) + ".*broken WCS"):
        image = read_image(path)
    assert image.wcs is None
    outdir = tmp_path / "out"
    assert run_cli([path], outdir) == 0
    _, header_out, catalog = check_outputs(outdir, "wcs", shape=scene.shape)
    assert len(catalog) == 3 and "ra" not in catalog.colnames and "CTYPE1" not in header_out


def test_image_in_hdu_3_of_a_multi_extension_file(tmp_path, make_scene):
    science = make_scene(shape=(48, 40), sources=[(10.0, 12.0, 50.0, 2.0), (30.0, 36.0, 40.0, 2.0)])
    hdus = [fits.PrimaryHDU(), _table(), fits.ImageHDU(name="EMPTY"), fits.ImageHDU(science, name="SCI"),
            fits.ImageHDU(np.zeros((8, 8), np.float32), name="OTHER")]
    path = write(tmp_path / "in" / "mef.fits", hdus)
    for options in ([], ["--hdu", "3"], ["--hdu", "SCI"]):
        outdir = tmp_path / f"out{len(options)}{options[-1] if options else ''}"
        assert run_cli([path], outdir, *options) == 0
        labels, header, catalog = check_outputs(outdir, "mef", shape=(48, 40))
        assert len(catalog) == 2 and header["DBINPUT"] == "mef.fits"


# --------------------------------------------------------------------------- output safety


ODD_NAMES = ["with space.fits", "unicodé_星.fits", "quote'single.fits", 'quote"double.fits', "-leading.fits",
             "semi;colon.fits", "back\\slash.fits", "tab\t.fits", "new\nline.fits", "..fits", "$(echo x).fits"]


def test_odd_input_names_write_inside_outdir(tmp_path, scene, header):
    indir = tmp_path / "in"
    for name in ODD_NAMES:
        write(indir / name, fits.PrimaryHDU(scene, header=header))
    outdir = tmp_path / "out"
    assert run_cli([indir / name for name in ODD_NAMES], outdir) == 0
    records = read_manifest(outdir)
    assert [r.status for r in records] == ["ok"] * len(ODD_NAMES)
    for name in ODD_NAMES:
        stem = name[: -len(".fits")]
        labels, header, catalog = check_outputs_named(outdir, stem)
        assert len(catalog) == 3
        assert header["DBINPUT"].isascii()  # FITS cards hold printable ASCII: other characters escaped
    assert {p.split("/")[0] for p in all_files(tmp_path)} == {"in", "out"}  # nothing written elsewhere
    assert len(all_files(tmp_path / "out")) == 2 * len(ODD_NAMES) + 1


def test_leading_dash_name_after_double_dash(tmp_path, scene, monkeypatch):
    write(tmp_path / "in" / "-o.fits", fits.PrimaryHDU(scene))
    monkeypatch.chdir(tmp_path / "in")
    assert main(["-q", "run", "--method", "sep", "-o", str(tmp_path / "out"), "--", "-o.fits"]) == 0
    assert all_files(tmp_path / "out") == sorted([MANIFEST_NAME, "-o_cat.fits", "-o_seg.fits"])
    assert all_files(tmp_path / "in") == ["-o.fits"]


def check_outputs_named(outdir, stem):
    labels, header = read_segmentation(Path(outdir) / f"{stem}_seg.fits")
    catalog = read_catalog(Path(outdir) / f"{stem}_cat.fits")
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), catalog["label"])
    return labels, header, catalog


def test_non_ascii_band_names_in_fits_catalogs(tmp_path, make_scene):
    """Bands named after files (no FILTER keyword): FITS column names and metadata must stay ASCII."""
    first = write(tmp_path / "in" / "gälaxy_星.fits", fits.PrimaryHDU(make_scene(seed=0)))
    second = write(tmp_path / "in" / "r.fits", fits.PrimaryHDU(make_scene(seed=1)))
    for fmt in ("fits", "ecsv"):
        outdir = tmp_path / f"out_{fmt}"
        assert run_cli([first, second], outdir, "--bands", "--format", fmt) == 0
        catalog = read_catalog(outdir / f"gälaxy_星_cat.{fmt}")
        assert len(catalog) == 3 and any(name.endswith("_r") for name in catalog.colnames)


@pytest.mark.parametrize("spelling", ["{d}/sub/../a.fits", "{d}/./a.fits", "{d}/sub/.."])
def test_dot_dot_components_never_escape_outdir(tmp_path, scene, spelling):
    indir = tmp_path / "in"
    write(indir / "a.fits", fits.PrimaryHDU(scene))
    (indir / "sub").mkdir()
    outdir = tmp_path / "deep" / "out"
    assert run_cli([spelling.format(d=indir)], outdir) == 0
    assert all_files(tmp_path / "deep") == sorted(["out", f"out/{MANIFEST_NAME}", "out/a_cat.fits", "out/a_seg.fits"])


def test_symlinks_never_lead_outside_outdir(tmp_path, scene):
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "far.fits", fits.PrimaryHDU(scene))
    indir = tmp_path / "in"
    write(indir / "sub" / "near.fits", fits.PrimaryHDU(scene))
    (indir / "link").symlink_to(elsewhere, target_is_directory=True)  # an input directory elsewhere
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "sub").symlink_to(elsewhere, target_is_directory=True)  # a trap where in/sub's outputs go
    assert run_cli([indir], outdir) == 0
    assert all_files(elsewhere) == ["far.fits"]  # nothing written through either link
    assert (outdir / "near_seg.fits").exists() and (outdir / "near_cat.fits").exists()
    assert {p.split("/")[0] for p in all_files(tmp_path)} == {"elsewhere", "in", "out"}


def test_existing_outputs_need_overwrite_or_resume(tmp_path, scene):
    path = write(tmp_path / "in" / "a.fits", fits.PrimaryHDU(scene))
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "a_cat.fits").write_bytes(b"precious")  # only one of the two outputs exists
    assert run_cli([path], outdir) == 1
    assert (outdir / "a_cat.fits").read_bytes() == b"precious" and not (outdir / "a_seg.fits").exists()
    (record,) = read_manifest(outdir)
    assert record.error_type == "OutputExists" and "--overwrite" in record.error and "--resume" in record.error
    with pytest.raises(SystemExit) as usage:
        main(["-q", "run", "--method", "sep", "-o", str(outdir), "--overwrite", "--resume", str(path)])
    assert usage.value.code == 2
    assert run_cli([path], outdir, "--resume") == 0  # no ok record for it: redone, replacing the stale file
    assert (outdir / "a_cat.fits").read_bytes() != b"precious"
    before = {p: (outdir / p).read_bytes() for p in ("a_cat.fits", "a_seg.fits")}
    assert run_cli([path], outdir, "--resume") == 0  # up to date: skipped, untouched
    assert read_manifest(outdir)[-1].status == "skipped"
    assert before == {p: (outdir / p).read_bytes() for p in before}


# --------------------------------------------------------------------------- weights


@pytest.fixture
def weights_copy(tmp_path):
    """A copy of the shipped weights and model card in tmp_path (the shipped files are never touched)."""
    target = tmp_path / "weights"
    target.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(WEIGHTS_DIR / f"{SHIPPED}{suffix}", target / f"{SHIPPED}{suffix}")
    return target / f"{SHIPPED}.pt"


def test_weights_are_loaded_with_weights_only(monkeypatch, weights_copy):
    import torch

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_mask_rcnn(weights_copy)
    assert calls == [True]


class _Payload:
    """Unpickling this runs code: what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_that_would_run_code_are_refused(tmp_path):
    import torch

    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_mask_rcnn(path)
    assert not marker.exists()
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--weights", str(path), "-o", str(outdir), str(tmp_path / "none.fits")]) == 2
    assert not marker.exists() and not outdir.exists()


def test_shipped_weights_match_their_card():
    card = json.loads((WEIGHTS_DIR / f"{SHIPPED}.json").read_text())
    model = load_mask_rcnn(SHIPPED)
    assert model.deblend_sha256 == card["sha256"]


def test_tampered_weights_are_refused(weights_copy, tmp_path, scene, caplog):
    model = load_mask_rcnn(weights_copy)  # the untouched copy loads, its card's checksum verified
    card = json.loads(weights_copy.with_suffix(".json").read_text())
    assert model.deblend_sha256 == card["sha256"]
    raw = bytearray(weights_copy.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    weights_copy.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"sha256 mismatch for {re.escape(str(weights_copy))}.*{card['sha256']}"):
        load_mask_rcnn(weights_copy)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        Deblender("mask-rcnn", weights=str(weights_copy))
    scene_path = write(tmp_path / "in" / "a.fits", fits.PrimaryHDU(scene))
    outdir = tmp_path / "out"
    assert main(["run", "--weights", str(weights_copy), "-o", str(outdir), str(scene_path)]) == 2
    assert "sha256 mismatch" in caplog.text and not outdir.exists()


def test_card_with_another_checksum_is_refused(weights_copy):
    card_path = weights_copy.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="sha256 mismatch.*corrupt or not the expected version"):
        load_mask_rcnn(weights_copy)


def test_corrupt_card_is_refused_with_its_name(weights_copy):
    card_path = weights_copy.with_suffix(".json")
    card_path.write_text(card_path.read_text()[:100])
    with pytest.raises(ValueError, match=f"model card {re.escape(str(card_path))} is not valid JSON"):
        load_mask_rcnn(weights_copy)


def test_missing_weights_say_what_to_do(tmp_path, scene, caplog):
    absent = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent)) + ".*re-install.*train_mask_rcnn.py"):
        Deblender("mask-rcnn", weights=str(absent))
    scene_path = write(tmp_path / "in" / "a.fits", fits.PrimaryHDU(scene))
    outdir = tmp_path / "out"
    assert main(["run", "--weights", str(absent), "-o", str(outdir), str(scene_path)]) == 2
    assert str(absent) in caplog.text and "train_mask_rcnn.py" in caplog.text
    assert not outdir.exists()


# --------------------------------------------------------------------------- determinism

_DATE_CARD = re.compile(rb"DATE    = '\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d'")


def without_date(raw):
    """File bytes with the value of the DATE card blanked (same length, so the layout is unchanged).

    DATE is the time of writing, a provenance card the design asks for: two runs a second
    apart differ there and nowhere else. Blanking exactly that card, and comparing every
    other byte, proves it.
    """
    blanked, n = _DATE_CARD.subn(b"DATE    = '0000-00-00T00:00:00'", raw)
    assert n >= 1, "no DATE card found"
    return blanked


def outputs_without_date(outdir):
    return {p.name: without_date(p.read_bytes()) for p in sorted(Path(outdir).glob("*_[sc][ea][gt].fits"))}


def test_each_fits_output_has_exactly_one_date_card(tmp_path, scene, header):
    path = write(tmp_path / "in" / "a.fits", fits.PrimaryHDU(scene, header=header))
    run_cli([path], tmp_path / "out")
    raw = (tmp_path / "out" / "a_seg.fits").read_bytes()
    assert len(_DATE_CARD.findall(raw)) == 1
    assert len(_DATE_CARD.findall((tmp_path / "out" / "a_cat.fits").read_bytes())) == 1


@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_same_input_weights_and_seed_give_identical_files(tmp_path, make_scene, make_header, method):
    for i in range(2):
        write(tmp_path / "in" / f"t{i}.fits", fits.PrimaryHDU(make_scene(seed=i), header=make_header()))
    assert run_cli([tmp_path / "in"], tmp_path / "one", method=method) == 0
    # the second run in a fresh interpreter (another hash seed, fresh torch state)
    cmd = [sys.executable, "-m", "deblend.cli", "-q", "run", "--method", method, "-o", str(tmp_path / "two"),
           str(tmp_path / "in")]
    subprocess.run(cmd, check=True, env={**_env(), "PYTHONHASHSEED": "12345"})
    one, two = outputs_without_date(tmp_path / "one"), outputs_without_date(tmp_path / "two")
    assert sorted(one) == ["t0_cat.fits", "t0_seg.fits", "t1_cat.fits", "t1_seg.fits"]
    for name in one:
        assert one[name] == two[name], f"{name} differs between two runs beyond its DATE card"


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _has_workers_option():
    """Whether ``deblend run`` accepts ``--workers`` (what ``deblend run --help`` would list)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args(["run", "-o", "out", "--workers", "2", "in.fits"])
        except SystemExit:
            return False
    return True


@pytest.mark.skipif(not _has_workers_option(), reason="`deblend run --workers` is not available yet (Dask "
                    "execution is being added to deblend/batch.py); serial vs parallel determinism is tested "
                    "once it is")
@pytest.mark.parametrize("method", ["sep", "mask-rcnn"])
def test_serial_and_two_workers_give_identical_files(tmp_path, make_scene, make_header, method):
    for i in range(4):
        write(tmp_path / "in" / f"t{i}.fits", fits.PrimaryHDU(make_scene(seed=i), header=make_header()))
    assert run_cli([tmp_path / "in"], tmp_path / "serial", method=method) == 0
    assert run_cli([tmp_path / "in"], tmp_path / "parallel", "--workers", "2", method=method) == 0
    serial, parallel = outputs_without_date(tmp_path / "serial"), outputs_without_date(tmp_path / "parallel")
    assert len(serial) == 8 and sorted(serial) == sorted(parallel)
    for name in serial:
        assert serial[name] == parallel[name], f"{name}: serial and --workers 2 differ beyond the DATE card"
    statuses = {Path(r.path).name: r.status for r in read_manifest(tmp_path / "parallel")}
    assert statuses == {f"t{i}.fits": "ok" for i in range(4)}


def test_reading_does_not_depend_on_previous_reads(tmp_path, scene, header):
    """No state carried between files: reading a broken file first changes nothing for the next."""
    good = write(tmp_path / "good.fits", fits.PrimaryHDU(scene, header=header))
    reference = read_image(good)
    with pytest.raises(InputError):
        read_image(_truncated(tmp_path, scene, 2880 + 5000))
    again = read_image(good)
    np.testing.assert_array_equal(again.data, reference.data)
    assert again.wcs.to_header_string() == reference.wcs.to_header_string()
