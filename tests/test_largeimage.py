"""Tests of deblend.largeimage (window-by-window deblending) and deblend.io.open_image_sections."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from deblend.batch import read_manifest, run_batch
from deblend.exceptions import InputError
from deblend.io import open_image_sections, read_catalog, read_image, read_segmentation
from deblend.largeimage import run_windowed
from deblend.pipeline import Deblender
from deblend.tiling import make_windows

SHAPE = (200, 260)
WINDOW, MARGIN = 96, 16


def grid_sources(shape=SHAPE, *, window=WINDOW, margin=MARGIN, spacing=22, clearance=4):
    """Well separated sources on a grid, none within ``clearance`` px of a window core's boundary."""
    windows = make_windows(shape, size=window, overlap=2 * margin)
    cuts_x = {w.cx0 for w in windows} | {w.cx1 for w in windows}
    cuts_y = {w.cy0 for w in windows} | {w.cy1 for w in windows}
    sources = []
    for y in range(12, shape[0] - 10, spacing):
        for x in range(12, shape[1] - 10, spacing):
            if min(abs(x - c) for c in cuts_x) > clearance and min(abs(y - c) for c in cuts_y) > clearance:
                sources.append((x + 0.3, y - 0.2, 40.0, 1.6))
    return sources


@pytest.fixture
def large_file(write_fits, make_scene, make_header):
    data = make_scene(SHAPE, grid_sources())
    return write_fits("large.fits", data, header=make_header(SHAPE))


def test_windowed_equals_whole_image(large_file):
    deblender = Deblender("sep")
    whole = deblender.run(large_file)
    windowed = run_windowed(large_file, deblender, window_size=WINDOW, margin=MARGIN)
    n = len(grid_sources())
    assert len(whole.catalog) == len(windowed.catalog) == n
    labels = windowed.labels
    assert labels.shape == SHAPE and labels.dtype == np.int32
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), windowed.catalog["label"])
    np.testing.assert_array_equal(windowed.catalog["label"], np.arange(1, n + 1))
    # the same sources at the same image positions, whichever window measured them
    order_w = np.lexsort((np.round(windowed.catalog["x_centroid"]), np.round(windowed.catalog["y_centroid"])))
    order_f = np.lexsort((np.round(whole.catalog["x_centroid"]), np.round(whole.catalog["y_centroid"])))
    for name, atol in (("x_centroid", 0.05), ("y_centroid", 0.05), ("bbox_xmin", 1), ("bbox_ymax", 1)):
        np.testing.assert_allclose(np.asarray(windowed.catalog[name])[order_w],
                                   np.asarray(whole.catalog[name])[order_f], atol=atol)
    np.testing.assert_allclose(np.asarray(windowed.catalog["ra"])[order_w], np.asarray(whole.catalog["ra"])[order_f],
                               atol=1e-7)
    # each source's pixels: the same footprints (up to the background each window estimates)
    same = (labels > 0) == (whole.labels > 0)
    assert same.mean() > 0.99
    assert windowed.image.data.shape == (1, 0, 0) and windowed.image.wcs is not None
    assert "windows" in windowed.catalog.meta


def test_windowed_result_writes(large_file, tmp_path):
    result = run_windowed(large_file, Deblender("sep"), window_size=WINDOW, margin=MARGIN)
    paths = result.write(tmp_path / "out")
    labels, header = read_segmentation(paths["segmentation"])
    np.testing.assert_array_equal(labels, result.labels)
    assert header["DBINPUT"] == "large.fits" and "CTYPE1" in header
    assert header["DBREFINE"] is False  # the deblender's settings, as for one image
    assert len(read_catalog(paths["catalog"])) == len(result.catalog)


def test_windows_entirely_masked_are_skipped(write_fits, make_scene):
    data = make_scene(SHAPE, grid_sources())
    data[:, :120] = np.nan  # the left windows hold no usable pixel
    path = write_fits("half.fits", data)
    result = run_windowed(path, Deblender("sep"), window_size=WINDOW, margin=MARGIN)
    assert len(result.catalog) > 0 and (np.asarray(result.catalog["x_centroid"]) > 120).all()
    assert (result.labels[:, :120] == 0).all()
    all_nan = write_fits("nan.fits", np.full(SHAPE, np.nan, np.float32))
    with pytest.raises(InputError, match="nan.fits: all pixels are non-finite"):
        run_windowed(all_nan, Deblender("sep"), window_size=WINDOW, margin=MARGIN)


def test_empty_sky_gives_an_empty_catalog(write_fits, make_scene):
    path = write_fits("sky.fits", make_scene(SHAPE, []))
    with pytest.warns(UserWarning, match="no sources detected"):
        result = run_windowed(path, Deblender("sep"), window_size=WINDOW, margin=MARGIN)
    assert len(result.catalog) == 0 and not result.labels.any()


@pytest.mark.parametrize(("kwargs", "match"), [({"window_size": 32}, "window_size must be an integer >= 64"),
                                               ({"window_size": 96.0}, "window_size must be an integer"),
                                               ({"window_size": 96, "margin": 24},
                                                r"margin must be an integer in .* = \[0, 24\), got 24"),
                                               ({"margin": -1}, "margin must be")])
def test_option_errors(large_file, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_windowed(large_file, Deblender("sep"), **kwargs)


def test_sections_read_like_read_image(tmp_path, write_fits, make_scene, make_header):
    data = make_scene(SHAPE)
    data[5, 7] = np.nan
    variance = np.full(SHAPE, 2.0, np.float32)
    variance[50, 60] = 0.0
    mask = np.zeros(SHAPE, np.int32)
    mask[100:110, 30:40] = 4
    mask[0, 0] = 1
    hdus = [fits.ImageHDU(data.astype(">f4"), header=make_header(SHAPE), name="SCI"),
            fits.ImageHDU(variance, name="VARIANCE"), fits.ImageHDU(mask, name="MASK")]
    path = write_fits("mef.fits", hdus)
    whole = read_image(path, mask_bits=0x4)
    with open_image_sections(path, mask_bits=0x4) as sections:
        assert sections.shape == (1, *SHAPE) and sections.band_names == whole.band_names
        for y0, y1, x0, x1 in [(0, 120, 0, 96), (80, 200, 164, 260)]:
            window = sections.read(y0, y1, x0, x1)
            np.testing.assert_array_equal(window.data, whole.data[:, y0:y1, x0:x1])
            np.testing.assert_array_equal(window.mask, whole.mask[y0:y1, x0:x1])
            np.testing.assert_array_equal(window.variance, whole.variance[:, y0:y1, x0:x1])
            assert window.data.dtype == np.float32 and window.data.dtype.isnative
            sky = window.wcs.pixel_to_world(3, 4)
            assert sky.separation(WCS(make_header(SHAPE)).pixel_to_world(x0 + 3, y0 + 4)).arcsec < 1e-6
    assert whole.mask[105, 35] and whole.mask[50, 60] and whole.mask[5, 7]


def test_sections_errors(bad_files, write_fits):
    with pytest.raises(InputError, match="not a FITS file"):
        with open_image_sections(bad_files["not_fits"]):
            pass
    with pytest.raises(InputError, match="no image HDU"):
        with open_image_sections(bad_files["header_only"]):
            pass
    cube4 = write_fits("cube4.fits", np.zeros((2, 2, 8, 8), np.float32))
    with pytest.raises(InputError, match="wrong dimensionality"):
        with open_image_sections(cube4):
            pass


def test_batch_deblends_large_images_by_window(large_file, tmp_path, monkeypatch, write_fits, make_scene):
    import deblend.largeimage

    monkeypatch.setattr(deblend.largeimage, "WINDOW_SIZE", WINDOW)
    monkeypatch.setattr(deblend.largeimage, "WINDOW_MARGIN", MARGIN)
    small = write_fits("small.fits", make_scene())
    outdir = tmp_path / "out"
    deblender = Deblender("sep")
    summary = run_batch([str(large_file), str(small)], outdir, deblender, progress=False,
                        large_image_pixels=100 * 100)
    large, little = summary.records
    assert large.status == little.status == "ok"
    assert large.n_sources == len(grid_sources()) and little.n_sources == 3
    assert large.config["windows"] == {"size": WINDOW, "margin": MARGIN}
    assert "windows" not in little.config
    labels = read_segmentation(outdir / "large_seg.fits")[0]
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), read_catalog(outdir / "large_cat.fits")["label"])
    again = run_batch([str(large_file), str(small)], outdir, deblender, progress=False, resume=True,
                      large_image_pixels=100 * 100)
    assert [r.status for r in again.records] == ["skipped", "skipped"]
    whole = run_batch([str(large_file), str(small)], outdir, deblender, progress=False, resume=True,
                      large_image_pixels=None)  # read whole: other outputs, so redone
    assert [r.status for r in whole.records] == ["ok", "skipped"]
    assert "windows" not in whole.records[0].config
    assert len(read_manifest(outdir)) == 6
