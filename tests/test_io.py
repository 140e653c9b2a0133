"""Tests of deblend.io: reading FITS images (good and bad), writing maps and catalogs atomically."""

from __future__ import annotations

import logging
import re

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS

from deblend.exceptions import InputError, WCSWarning
from deblend.io import (
    CATALOG_FORMATS,
    Image,
    atomic_path,
    catalog_format,
    fits_stem,
    read_catalog,
    read_image,
    read_segmentation,
    write_catalog,
    write_image,
    write_segmentation,
)


def assert_input_error(path, cause, **kwargs):
    """read_image(path) raises InputError naming the file and matching ``cause``."""
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*" + cause) as info:
        read_image(path, **kwargs)
    assert info.value.path == str(path)
    return info.value


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("not_fits", "not a FITS file"),
        ("truncated_header", "truncated"),
        ("truncated_data", "truncated"),
        ("header_only", "no image HDU"),
    ],
)
def test_bad_file_raises_input_error(bad_files, kind, cause):
    assert_input_error(bad_files[kind], cause)


def test_one_dimensional_data(write_fits):
    path = write_fits("spectrum.fits", np.arange(50, dtype=np.float32))
    assert_input_error(path, "wrong dimensionality.*1-D")


def test_four_dimensional_data(write_fits, rng):
    path = write_fits("hyper.fits", rng.normal(size=(2, 3, 16, 16)).astype(np.float32))
    assert_input_error(path, "wrong dimensionality.*4-D")


def test_four_dimensional_degenerate_axes_read_as_2d(write_fits, rng):
    data = rng.normal(size=(1, 1, 16, 20)).astype(np.float32)
    image = read_image(write_fits("degenerate.fits", data))
    assert image.data.shape == (1, 16, 20)
    np.testing.assert_array_equal(image.data[0], data[0, 0])


def test_four_dimensional_leading_one_is_cube(write_fits, rng):
    data = rng.normal(size=(1, 3, 16, 20)).astype(np.float32)
    image = read_image(write_fits("degenerate_cube.fits", data))
    assert image.data.shape == (3, 16, 20)


def test_zero_size_axis(write_fits):
    path = write_fits("zero.fits", np.zeros((0, 16), dtype=np.float32))
    assert_input_error(path, "zero size")


def test_all_nan(write_fits):
    path = write_fits("allnan.fits", np.full((16, 16), np.nan, dtype=np.float32))
    assert_input_error(path, "non-finite")


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "missing.fits", "does not exist")


def test_directory(tmp_path):
    directory = tmp_path / "looks_like.fits"
    directory.mkdir()
    assert_input_error(directory, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    assert_input_error(path, "empty")


def test_truncated_gzip(tmp_path, write_fits, scene):
    raw = write_fits("full.fits.gz", scene).read_bytes()
    path = tmp_path / "cut.fits.gz"
    path.write_bytes(raw[: len(raw) // 2])
    assert_input_error(path, "truncated or corrupt gzip")


def test_gzipped_text_is_not_fits(tmp_path):
    import gzip

    path = tmp_path / "text.fits.gz"
    path.write_bytes(gzip.compress(b"not a FITS file at all\n" * 50))
    assert_input_error(path, "not a FITS file")


def test_input_error_is_value_error_and_picklable(tmp_path):
    import pickle

    err = assert_input_error(tmp_path / "missing.fits", "does not exist")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))


def test_unknown_hdu(write_fits, scene):
    path = write_fits("named.fits", [fits.ImageHDU(scene, name="SCI")])
    assert_input_error(path, "no HDU 'NOPE'.*SCI", hdu="NOPE")
    assert_input_error(path, "no HDU 7", hdu=7)


def test_hdu_that_is_a_table(write_fits, scene):
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))])
    path = write_fits("table.fits", [fits.PrimaryHDU(scene), table])
    assert_input_error(path, "not an image", hdu=1)


# --------------------------------------------------------------------------- good inputs


def test_read_2d(scene_file, scene):
    image = read_image(scene_file)
    assert image.data.shape == (1, 64, 64)
    assert image.shape == (64, 64) and image.n_bands == 1
    assert image.data.dtype == np.float32 and image.data.dtype.isnative
    assert image.data.flags.c_contiguous
    np.testing.assert_array_equal(image.data[0], scene)
    assert image.mask.shape == (64, 64) and image.mask.dtype == bool and not image.mask.any()
    assert image.paths == [str(scene_file)] and image.path == str(scene_file)
    assert image.band_names == ["scene"]
    assert image.variance is None


def test_read_cube(write_fits, make_scene):
    cube = np.stack([make_scene(seed=s) for s in range(3)])
    image = read_image(write_fits("cube.fits", cube))
    assert image.data.shape == (3, 64, 64)
    np.testing.assert_array_equal(image.data, cube)
    assert image.band_names == ["band0", "band1", "band2"]


def test_read_gzip(write_fits, scene):
    path = write_fits("scene.fits.gz", scene)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    image = read_image(path)
    np.testing.assert_array_equal(image.data[0], scene)
    assert image.band_names == ["scene"]


def test_read_tile_compressed_lossless(write_fits, scene):
    hdu = fits.CompImageHDU(scene, compression_type="GZIP_1", quantize_level=0.0)
    image = read_image(write_fits("lossless.fits.fz", hdu))
    np.testing.assert_array_equal(image.data[0], scene)
    assert image.band_names == ["lossless"]


def test_read_tile_compressed_int_rice(write_fits, rng):
    ints = rng.integers(-1000, 30000, size=(40, 48)).astype(np.int32)
    image = read_image(write_fits("ints.fz", fits.CompImageHDU(ints, compression_type="RICE_1")))
    np.testing.assert_array_equal(image.data[0], ints.astype(np.float32))


def test_read_tile_compressed_quantized_float(write_fits, scene):
    hdu = fits.CompImageHDU(scene, compression_type="RICE_1")
    image = read_image(write_fits("rice.fits.fz", hdu))
    # default quantisation keeps ~16 levels per noise σ (σ = 1 here)
    np.testing.assert_allclose(image.data[0], scene, atol=0.2)


def test_read_named_extension(write_fits, scene):
    path = write_fits("ext.fits", [fits.ImageHDU(scene, name="SCI")])
    for hdu in (None, "SCI", 1):
        np.testing.assert_array_equal(read_image(path, hdu=hdu).data[0], scene)


def test_read_hdu_3_of_multi_extension(write_fits, scene, rng):
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))])
    other = rng.normal(size=(10, 10)).astype(np.float32)
    hdus = [fits.PrimaryHDU(), table, fits.ImageHDU(name="EMPTY"), fits.ImageHDU(scene, name="SCI"),
            fits.ImageHDU(other, name="OTHER")]
    path = write_fits("mef.fits", hdus)
    np.testing.assert_array_equal(read_image(path).data[0], scene)  # first usable image HDU
    np.testing.assert_array_equal(read_image(path, hdu=3).data[0], scene)
    np.testing.assert_array_equal(read_image(path, hdu="SCI").data[0], scene)
    np.testing.assert_array_equal(read_image(path, hdu="OTHER").data[0], other)
    np.testing.assert_array_equal(read_image(path, hdu=4).data[0], other)


def test_read_scaled_int16(write_fits, rng):
    physical = 1000.0 + 0.5 * rng.integers(-2000, 2000, size=(32, 32))
    hdu = fits.PrimaryHDU(physical.astype(np.float64))
    hdu.scale("int16", bscale=0.5, bzero=1000.0)
    path = write_fits("scaled.fits", hdu)
    with fits.open(path) as hdul:
        assert hdul[0].header["BITPIX"] == 16 and hdul[0].header["BSCALE"] == 0.5
    image = read_image(path)
    assert image.data.dtype == np.float32 and image.data.dtype.isnative
    np.testing.assert_array_equal(image.data[0], physical.astype(np.float32))


@pytest.mark.parametrize("dtype", [">f4", "<f4", ">f8", "<f8", ">i2", "<i4", "uint8"])
def test_from_array_any_endianness_gives_native_float32(dtype):
    values = np.arange(12 * 10).reshape(12, 10) % 50
    image = Image.from_array(values.astype(dtype))
    assert image.data.dtype == np.dtype(np.float32) and image.data.dtype.isnative
    np.testing.assert_array_equal(image.data[0], values.astype(np.float32))


@pytest.mark.parametrize("dtype", [">f8", "<f8", ">i4", "<i2"])
def test_read_any_stored_dtype_gives_native_float32(write_fits, dtype):
    values = (np.arange(12 * 10).reshape(12, 10) % 50).astype(dtype)
    image = read_image(write_fits(f"arr_{dtype[-2:]}_{dtype[0] == '>'}.fits", values))
    assert image.data.dtype == np.dtype(np.float32) and image.data.dtype.isnative
    np.testing.assert_array_equal(image.data[0], values.astype(np.float32))


def test_nonfinite_pixels_become_mask(write_fits, scene):
    data = scene.copy()
    data[3, 4] = np.nan
    data[10, 20] = np.inf
    data[11, 21] = -np.inf
    image = read_image(write_fits("holes.fits", data))
    assert image.mask.sum() == 3
    assert image.mask[3, 4] and image.mask[10, 20] and image.mask[11, 21]
    assert np.isfinite(image.data).all()
    assert image.data[0, 3, 4] == 0 and image.data[0, 10, 20] == 0 and image.data[0, 11, 21] == 0
    np.testing.assert_array_equal(image.data[0][~image.mask], scene[~image.mask])


def test_nonfinite_in_one_band_masks_all_bands(write_fits, scene):
    cube = np.stack([scene, scene + 1])
    cube[1, 5, 6] = np.nan
    image = read_image(write_fits("cube_hole.fits", cube))
    assert image.mask[5, 6] and image.mask.sum() == 1
    assert (image.data[:, 5, 6] == 0).all()


def test_several_files_as_bands(write_fits, make_scene):
    paths = []
    for i, band in enumerate("gri"):
        hdu = fits.PrimaryHDU(make_scene(seed=i))
        hdu.header["FILTER"] = band
        paths.append(write_fits(f"field_{band}.fits", hdu))
    image = read_image(paths)
    assert image.data.shape == (3, 64, 64)
    assert image.band_names == ["g", "r", "i"]
    assert image.paths == [str(p) for p in paths]
    for i in range(3):
        np.testing.assert_array_equal(image.data[i], make_scene(seed=i))


def test_several_files_duplicate_filters_named_by_stem(write_fits, scene):
    paths = []
    for name in ("a", "b"):
        hdu = fits.PrimaryHDU(scene)
        hdu.header["FILTER"] = "r"
        paths.append(write_fits(f"{name}.fits", hdu))
    assert read_image(paths).band_names == ["a", "b"]


def test_band_names_argument(write_fits, scene):
    paths = [write_fits("x.fits", scene), write_fits("y.fits", scene)]
    assert read_image(paths, band_names=["u", "v"]).band_names == ["u", "v"]
    with pytest.raises(ValueError, match="band_names"):
        read_image(paths, band_names=["u"])


def test_several_files_different_shapes(write_fits, scene):
    paths = [write_fits("big.fits", scene), write_fits("small.fits", scene[:40, :50])]
    with pytest.raises(InputError, match=r"big\.fits.*one shape"):
        read_image(paths)


def test_several_files_one_bad_names_that_file(write_fits, bad_files, scene):
    good = write_fits("ok.fits", scene)
    bad = bad_files["not_fits"]
    with pytest.raises(InputError, match=re.escape(str(bad)) + ".*not a FITS"):
        read_image([good, bad])


def test_empty_path_list():
    with pytest.raises(ValueError, match="paths"):
        read_image([])


def test_variance_hdu(write_fits, scene, rng):
    var = rng.uniform(0.5, 2.0, size=scene.shape).astype(np.float32)
    hdus = [fits.PrimaryHDU(scene), fits.ImageHDU(var, name="VARIANCE")]
    image = read_image(write_fits("var.fits", hdus))
    assert image.variance.shape == (1, 64, 64) and image.variance.dtype == np.float32
    np.testing.assert_array_equal(image.variance[0], var)
    np.testing.assert_array_equal(image.data[0], scene)
    assert not image.mask.any()


def test_weight_hdu_is_inverse_variance(write_fits, scene, rng):
    weight = rng.uniform(0.5, 2.0, size=scene.shape).astype(np.float32)
    weight[7, 8] = 0.0  # no data there
    hdus = [fits.PrimaryHDU(scene), fits.ImageHDU(weight, name="WEIGHT")]
    image = read_image(write_fits("wht.fits", hdus))
    good = weight > 0
    np.testing.assert_allclose(image.variance[0][good], 1.0 / weight[good], rtol=1e-6)
    assert image.mask[7, 8] and image.mask.sum() == 1
    assert image.data[0, 7, 8] == 0 and image.variance[0, 7, 8] == 0


def test_aux_hdus_disabled(write_fits, scene):
    hdus = [fits.PrimaryHDU(scene), fits.ImageHDU(np.ones_like(scene), name="WEIGHT")]
    path = write_fits("wht2.fits", hdus)
    assert read_image(path, weight_hdu=False).variance is None


def test_aux_hdu_shape_mismatch(write_fits, scene):
    hdus = [fits.PrimaryHDU(scene), fits.ImageHDU(np.ones((5, 5)), name="VARIANCE")]
    path = write_fits("badvar.fits", hdus)
    assert_input_error(path, "variance HDU 'VARIANCE' has shape")


def test_zero_one_mask_hdu_applied(write_fits, scene):
    mask = np.zeros(scene.shape, dtype=np.uint8)
    mask[20:24, 30:35] = 1
    hdus = [fits.PrimaryHDU(scene), fits.ImageHDU(mask, name="MASK")]
    image = read_image(write_fits("mask01.fits", hdus))
    np.testing.assert_array_equal(image.mask, mask == 1)
    assert (image.data[0][mask == 1] == 0).all()
    np.testing.assert_array_equal(image.data[0][mask == 0], scene[mask == 0])


def test_bit_mask_ignored_unless_mask_bits(write_fits, scene, caplog):
    mask = np.zeros(scene.shape, dtype=np.int32)
    mask[5:8, 5:8] = 4  # bad bit
    mask[30:33, 30:33] = 32  # harmless bit (e.g. DETECTED)
    mask[40, 40] = 4 | 32
    path = write_fits("bits.fits", [fits.PrimaryHDU(scene), fits.ImageHDU(mask, name="MASK")])
    with caplog.at_level(logging.WARNING, logger="deblend.io"):
        image = read_image(path)
    assert not image.mask.any()
    assert "bit mask" in caplog.text and "mask_bits" in caplog.text
    image = read_image(path, mask_bits=4)
    np.testing.assert_array_equal(image.mask, (mask & 4) != 0)
    assert image.mask.sum() == 10


def test_explicit_mask_hdu_by_name(write_fits, scene):
    mask = np.zeros(scene.shape, dtype=np.int16)
    mask[0, :] = 1
    path = write_fits("dq.fits", [fits.PrimaryHDU(scene), fits.ImageHDU(mask, name="DQ")])
    assert not read_image(path).mask.any()  # DQ is not a default mask name
    assert read_image(path, mask_hdu="DQ").mask.sum() == 64


def test_wcs_read(scene_file, header):
    image = read_image(scene_file)
    assert image.wcs is not None and image.wcs.has_celestial and image.wcs.naxis == 2
    expected = WCS(header).pixel_to_world(10.0, 20.0)
    assert image.wcs.pixel_to_world(10.0, 20.0).separation(expected).arcsec < 1e-6


def test_wcs_from_cube_header(write_fits, make_scene, make_header):
    cube = np.stack([make_scene(seed=s) for s in range(3)])
    header = make_header()
    header["WCSAXES"] = 3
    header["CTYPE3"] = "WAVE"
    header["CRVAL3"] = 5.0e-7
    header["CDELT3"] = 1.0e-7
    header["CRPIX3"] = 1.0
    header["CUNIT3"] = "m"
    image = read_image(write_fits("cube_wcs.fits", cube, header=header))
    assert image.data.shape == (3, 64, 64)
    assert image.wcs is not None and image.wcs.naxis == 2 and image.wcs.has_celestial
    expected = WCS(make_header()).pixel_to_world(3.0, 40.0)
    assert image.wcs.pixel_to_world(3.0, 40.0).separation(expected).arcsec < 1e-6


def test_no_wcs(write_fits, scene):
    assert read_image(write_fits("plain.fits", scene)).wcs is None


@pytest.mark.parametrize(
    "changes",
    [
        {"CTYPE1": "RA---XYZ"},  # unknown projection
        {"CTYPE2": "RA---TAN"},  # two longitude axes
        {"CDELT1": "bad"},  # a number that is not one
        {"CRPIX2": "abc"},
    ],
)
def test_broken_wcs_warns_and_is_none(write_fits, scene, header, changes):
    for key, value in changes.items():
        header[key] = value
    path = write_fits("broken.fits", scene, header=header)
    with pytest.warns(WCSWarning, match=re.escape(str(path)) + ".*broken WCS"):
        image = read_image(path)
    assert image.wcs is None
    np.testing.assert_array_equal(image.data[0], scene)


@pytest.mark.parametrize(
    "changes", [{"EQUINOX": "J2000"}, {"MJD-OBS": 51544.0, "DATE-OBS": "2000-01-01"}]
)
def test_wcs_fixable_keywords_keep_wcs(write_fits, scene, header, changes, recwarn):
    for key, value in changes.items():
        header[key] = value
    image = read_image(write_fits("fixable.fits", scene, header=header))
    assert image.wcs is not None
    assert not [w for w in recwarn if issubclass(w.category, WCSWarning)]
    expected = WCS(header).pixel_to_world(5.0, 6.0)
    assert image.wcs.pixel_to_world(5.0, 6.0).separation(expected).arcsec < 1e-6


def test_band_name_from_filter(write_fits, scene):
    hdu = fits.PrimaryHDU(scene)
    hdu.header["FILTER"] = "HSC-R2  "
    assert read_image(write_fits("tile.fits", hdu)).band_names == ["HSC-R2"]


def test_from_array_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        Image.from_array(np.zeros(5))
    with pytest.raises(ValueError, match="zero-size"):
        Image.from_array(np.zeros((0, 5)))
    with pytest.raises(ValueError, match="finite"):
        Image.from_array(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="mask shape"):
        Image.from_array(np.zeros((4, 4)), mask=np.zeros((3, 3), bool))


def test_from_array_does_not_modify_input():
    data = np.ones((4, 4), dtype=np.float32)
    data[1, 1] = np.nan
    image = Image.from_array(data)
    assert np.isnan(data[1, 1]) and image.data[0, 1, 1] == 0 and image.mask[1, 1]


@pytest.mark.parametrize(
    ("name", "stem"),
    [("tile.fits", "tile"), ("tile.fits.gz", "tile"), ("tile.FITS", "tile"), ("a.b.fits.fz", "a.b"),
     ("x.fz", "x"), ("noext", "noext")],
)
def test_fits_stem(name, stem):
    assert fits_stem(name) == stem


# --------------------------------------------------------------------------- writing


def test_write_segmentation_round_trip(tmp_path, header):
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[10:20, 10:20] = 1
    labels[40:50, 30:35] = 2
    path = tmp_path / "out" / "tile_seg.fits"
    write_segmentation(path, labels, wcs=WCS(header), method="sep", weights_id="abc123",
                       input_path="/data/tile.fits")
    with fits.open(path) as hdul:
        assert hdul[0].data.dtype == np.dtype(">i4")
        hdr = hdul[0].header
    for key in ("DBVERS", "DBMETHOD", "DBWEIGHT", "DATE", "DBINPUT"):
        assert key in hdr, key
    assert hdr["DBMETHOD"] == "sep" and hdr["DBWEIGHT"] == "abc123"
    assert hdr["DBINPUT"] == "tile.fits"
    assert hdr["NSOURCES"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", hdr["DATE"])
    sky = WCS(hdr).pixel_to_world(12.5, 33.0)
    assert sky.separation(WCS(header).pixel_to_world(12.5, 33.0)).arcsec < 1e-6
    back, back_header = read_segmentation(path)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels)
    assert back_header["DBMETHOD"] == "sep"
    assert list(tmp_path.joinpath("out").iterdir()) == [path]


def test_write_segmentation_defaults(tmp_path):
    path = tmp_path / "seg.fits"
    write_segmentation(path, np.zeros((8, 8), dtype=np.int16))
    with fits.open(path) as hdul:
        assert hdul[0].header["DBWEIGHT"] == "none" and hdul[0].header["NSOURCES"] == 0
        assert "CTYPE1" not in hdul[0].header


def test_write_segmentation_extensions_and_validation(tmp_path):
    path = tmp_path / "seg.fits"
    unc = np.full((8, 8), 0.5, dtype=np.float32)
    write_segmentation(path, np.ones((8, 8), dtype=np.int32), extensions={"UNCERTAINTY": unc})
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(hdul["UNCERTAINTY"].data, unc)
    with pytest.raises(ValueError, match="2-D"):
        write_segmentation(tmp_path / "bad.fits", np.ones((2, 8, 8), dtype=np.int32))


def test_write_segmentation_refuses_existing(tmp_path):
    path = tmp_path / "seg.fits"
    write_segmentation(path, np.ones((8, 8), dtype=np.int32))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_segmentation(path, np.zeros((8, 8), dtype=np.int32))
    assert read_segmentation(path)[0].max() == 1
    write_segmentation(path, np.zeros((8, 8), dtype=np.int32), overwrite=True)
    assert read_segmentation(path)[0].max() == 0


def test_write_image_round_trip(tmp_path, scene, header):
    path = tmp_path / "img.fits.gz"
    hdr = fits.Header()
    hdr["FILTER"] = "r"
    write_image(path, scene, header=hdr, wcs=WCS(header),
                extensions={"VARIANCE": np.ones_like(scene)})
    image = read_image(path)
    np.testing.assert_array_equal(image.data[0], scene)
    np.testing.assert_array_equal(image.variance[0], 1.0)
    assert image.band_names == ["r"] and image.wcs is not None


def make_table(with_sky=True):
    table = QTable()
    table["label"] = np.arange(1, 5, dtype=np.int32)
    table["x_centroid"] = np.array([1.5, 10.25, 20.0, 33.125])
    table["segment_flux"] = np.array([100.0, 2.5, -3.0, 1e6])
    table["area"] = np.array([10.0, 20.0, 30.0, 40.0]) * u.pix**2
    if with_sky:
        table["sky_centroid"] = SkyCoord([150.0, 150.1, 150.2, 150.3] * u.deg,
                                         [2.0, 2.1, -2.2, 2.3] * u.deg)
    table.meta.update({"method": "sep", "bands": "g,r", "creator": "deblend test"})
    return table


@pytest.mark.parametrize("fmt", sorted(CATALOG_FORMATS))
def test_write_catalog_round_trip(tmp_path, fmt):
    table = make_table()
    path = tmp_path / f"cat{CATALOG_FORMATS[fmt][1]}"
    assert write_catalog(table, path, format=fmt) == path
    back = read_catalog(path, format=fmt)
    assert back.colnames[0] == "label"
    np.testing.assert_array_equal(np.asarray(back["label"]), [1, 2, 3, 4])
    np.testing.assert_allclose(np.asarray(back["x_centroid"]), table["x_centroid"])
    np.testing.assert_allclose(np.asarray(back["segment_flux"]), table["segment_flux"])
    np.testing.assert_allclose(u.Quantity(back["area"]).value, [10, 20, 30, 40])
    if fmt == "ecsv":
        assert isinstance(back["sky_centroid"], SkyCoord)
        assert back["sky_centroid"].separation(table["sky_centroid"]).max().arcsec < 1e-6
    else:
        assert "sky_centroid" not in back.colnames
        sky = table["sky_centroid"]
        np.testing.assert_allclose(u.Quantity(back["ra"], u.deg).value, sky.ra.deg)
        np.testing.assert_allclose(u.Quantity(back["dec"], u.deg).value, sky.dec.deg)
    # the caller's table is never modified
    assert "sky_centroid" in table.colnames and "ra" not in table.colnames
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("fmt", sorted(CATALOG_FORMATS))
def test_write_empty_catalog(tmp_path, fmt):
    table = make_table(with_sky=False)[:0]
    path = tmp_path / f"empty{CATALOG_FORMATS[fmt][1]}"
    write_catalog(table, path)
    back = read_catalog(path)
    assert len(back) == 0 and back.colnames[0] == "label"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("c.fits", "fits"), ("c.FIT", "fits"), ("c.ecsv", "ecsv"), ("c.csv", "csv"),
     ("c.parquet", "parquet"), ("c.xml", "votable"), ("c.vot", "votable")],
)
def test_catalog_format_from_extension(name, fmt):
    assert catalog_format(name) == fmt


def test_catalog_format_errors(tmp_path):
    with pytest.raises(ValueError, match=r"cannot infer.*cat\.txt.*'\.txt'"):
        write_catalog(make_table(), tmp_path / "cat.txt")
    with pytest.raises(ValueError, match="format must be one of.*'hdf5'"):
        catalog_format("cat.fits", "hdf5")
    assert list(tmp_path.iterdir()) == []


def test_write_catalog_refuses_existing(tmp_path):
    path = tmp_path / "cat.ecsv"
    write_catalog(make_table(), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_catalog(make_table()[:1], path)
    assert path.read_bytes() == before
    write_catalog(make_table()[:1], path, overwrite=True)
    assert len(read_catalog(path)) == 1


def test_atomic_path_success(tmp_path):
    final = tmp_path / "sub" / "file.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp != final and tmp.suffix == ".txt"
        tmp.write_text("done")
        assert not final.exists()
    assert final.read_text() == "done"
    assert [p.name for p in final.parent.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_exception_leaves_nothing(tmp_path, error):
    final = tmp_path / "file.fits"
    with pytest.raises(error):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise error("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_exception_keeps_old_file(tmp_path):
    final = tmp_path / "file.fits"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final, overwrite=True) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert final.read_text() == "old"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_path_refuses_existing(tmp_path):
    final = tmp_path / "file.fits"
    final.write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_path(final, overwrite=False):
            pass
    assert final.read_text() == "old"
