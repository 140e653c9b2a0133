"""Tests of deblend.catalog: columns, exact fluxes, centroids, bands, sky positions, empty maps."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from deblend.catalog import FLUX_COLUMNS, empty_catalog, make_catalog
from deblend.io import CATALOG_FORMATS, read_catalog, write_catalog


@pytest.fixture
def label_map():
    """Three hand-made segments on a 40×48 map (labels 1..3)."""
    labels = np.zeros((40, 48), dtype=np.int32)
    labels[5:12, 4:9] = 1  # 7×5 box
    labels[20:31, 25:36] = 2  # 11×11 box, centred on (x, y) = (30, 25)
    labels[33:36, 40:46] = 3  # 3×6 box
    return labels


@pytest.fixture
def image(label_map, rng):
    """Noise plus a symmetric Gaussian blob centred on segment 2."""
    y, x = np.mgrid[0:40, 0:48]
    blob = 50.0 * np.exp(-((x - 30.0) ** 2 + (y - 25.0) ** 2) / (2 * 2.0**2))
    return (blob + rng.normal(0.0, 0.5, label_map.shape)).astype(np.float32)


def test_columns_labels_and_exact_fluxes(image, label_map):
    table = make_catalog(image, label_map)
    assert table.colnames[0] == "label"
    assert table["label"].dtype == np.int32
    np.testing.assert_array_equal(table["label"], [1, 2, 3])
    for name in ("x_centroid", "y_centroid", "area", "segment_flux", "segment_flux_err",
                 "kron_flux", "semimajor_axis", "bbox_xmin"):
        assert name in table.colnames
    for row in table:
        in_segment = label_map == row["label"]
        assert row["segment_flux"] == pytest.approx(float(image[in_segment].sum(dtype=np.float64)),
                                                    rel=1e-6)
        assert u.Quantity(row["area"]).value == in_segment.sum()
    np.testing.assert_array_equal(u.Quantity(table["area"]).value, [35, 121, 18])
    np.testing.assert_array_equal(table["bbox_xmin"], [4, 25, 40])
    np.testing.assert_array_equal(table["bbox_ymax"], [11, 30, 35])


def test_centroid_of_symmetric_blob(image, label_map):
    row = make_catalog(image, label_map)[1]
    assert float(np.asarray(row["x_centroid"])) == pytest.approx(30.0, abs=0.05)
    assert float(np.asarray(row["y_centroid"])) == pytest.approx(25.0, abs=0.05)


@pytest.mark.parametrize("with_wcs", [False, True])
def test_segment_without_positive_flux_keeps_a_position(image, label_map, make_header, with_wcs):
    # A network's mask can lie on a patch whose background-subtracted values sum to <= 0,
    # where the flux-weighted centroid is undefined: the row gets its pixels' mean position.
    image = image.copy()
    image[5:12, 4:9] = -1.0  # segment 1: a 7x5 box centred on (x, y) = (6, 8)
    wcs = WCS(make_header(label_map.shape)) if with_wcs else None
    table = make_catalog(image, label_map, wcs=wcs)
    assert float(np.asarray(table["x_centroid"][0])) == pytest.approx(6.0)
    assert float(np.asarray(table["y_centroid"][0])) == pytest.approx(8.0)
    assert float(np.asarray(table["x_centroid"][1])) == pytest.approx(30.0, abs=0.05)  # the others as before
    if with_wcs:
        expected = wcs.pixel_to_world(6.0, 8.0)
        assert table["sky_centroid"][0].separation(expected).arcsec < 1e-6
        assert np.isfinite(np.asarray(table["ra"], dtype=float)).all()


def test_mask_excludes_pixels(image, label_map):
    mask = np.zeros(label_map.shape, bool)
    mask[20:31, 25:30] = True
    table = make_catalog(image, label_map, mask=mask)
    seg = (label_map == 2) & ~mask
    assert table["segment_flux"][1] == pytest.approx(float(image[seg].sum(dtype=np.float64)),
                                                     rel=1e-6)


def test_errors_give_error_columns(image, label_map):
    table = make_catalog(image, label_map, error=np.full(image.shape, 2.0))
    np.testing.assert_allclose(table["segment_flux_err"], 2.0 * np.sqrt([35, 121, 18]), rtol=1e-6)


def test_multi_band_columns(image, label_map):
    cube = np.stack([image, 3.0 * image])
    error = np.ones_like(cube)
    table = make_catalog(cube, label_map, detection=image, error=error,
                         detection_error=np.ones_like(image), band_names=["g", "HSC-R"])
    for col in FLUX_COLUMNS:
        assert f"{col}_g" in table.colnames and f"{col}_HSC_R" in table.colnames
    for row in table:
        seg = label_map == row["label"]
        flux = float(image[seg].sum(dtype=np.float64))
        assert row["segment_flux_g"] == pytest.approx(flux, rel=1e-6)
        assert row["segment_flux_HSC_R"] == pytest.approx(3.0 * flux, rel=1e-6)
        assert row["segment_flux"] == pytest.approx(flux, rel=1e-6)  # the detection image
    assert table.meta["bands"] == "g,HSC-R"


def test_multi_band_needs_detection(image, label_map):
    with pytest.raises(ValueError, match="detection"):
        make_catalog(np.stack([image, image]), label_map)


def test_shape_and_band_validation(image, label_map):
    with pytest.raises(ValueError, match="labels shape"):
        make_catalog(image, label_map[:10])
    with pytest.raises(ValueError, match="band_names"):
        make_catalog(image, label_map, band_names=["g", "r"])


def test_wcs_gives_sky_positions(image, label_map, make_header):
    wcs = WCS(make_header(label_map.shape))
    table = make_catalog(image, label_map, wcs=wcs)
    assert {"sky_centroid", "ra", "dec"} <= set(table.colnames)
    expected = wcs.pixel_to_world(np.asarray(table["x_centroid"]), np.asarray(table["y_centroid"]))
    assert table["sky_centroid"].separation(expected).max().arcsec < 1e-6
    got = SkyCoord(u.Quantity(table["ra"], u.deg), u.Quantity(table["dec"], u.deg))
    assert got.separation(expected.icrs).max().arcsec < 1e-6


def test_meta_provenance(image, label_map):
    table = make_catalog(image, label_map, method="sep", weights_id="w123")
    assert table.meta["method"] == "sep" and table.meta["weights"] == "w123"
    assert table.meta["creator"].startswith("deblend ")
    assert "date" in table.meta


def test_label_gaps_keep_label_values(image):
    labels = np.zeros(image.shape, dtype=np.int32)
    labels[2:6, 2:6] = 2
    labels[20:24, 20:24] = 5
    np.testing.assert_array_equal(make_catalog(image, labels)["label"], [2, 5])


def test_empty_labels_same_columns(image, label_map):
    full = make_catalog(image, label_map)
    empty = make_catalog(image, np.zeros_like(label_map), method="sep")
    assert len(empty) == 0
    assert empty.colnames == full.colnames
    assert empty["label"].dtype == np.int32
    assert empty.meta["method"] == "sep"
    for name in full.colnames:
        assert getattr(empty[name], "unit", None) == getattr(full[name], "unit", None), name


def test_empty_labels_same_columns_with_wcs_and_bands(image, label_map, make_header):
    wcs = WCS(make_header(label_map.shape))
    cube = np.stack([image, image])
    kwargs = {"detection": image, "wcs": wcs, "band_names": ["g", "r"]}
    full = make_catalog(cube, label_map, **kwargs)
    empty = make_catalog(cube, np.zeros_like(label_map), **kwargs)
    assert len(empty) == 0 and empty.colnames == full.colnames
    assert empty_catalog(band_names=["g", "r"], wcs=wcs).colnames == full.colnames


@pytest.mark.parametrize("fmt", sorted(CATALOG_FORMATS))
def test_empty_catalog_with_wcs_writes(tmp_path, fmt, make_header):
    table = empty_catalog(wcs=WCS(make_header()))
    path = tmp_path / f"empty{CATALOG_FORMATS[fmt][1]}"
    write_catalog(table, path)
    back = read_catalog(path)
    assert len(back) == 0 and back.colnames[0] == "label"
    assert "ra" in back.colnames and "dec" in back.colnames
