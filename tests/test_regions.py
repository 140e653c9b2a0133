"""Tests of deblend.regions: one DS9 ellipse per catalog row, pixel or sky, parsed back by `regions`."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import QTable
from astropy.wcs import WCS
from regions import EllipsePixelRegion, EllipseSkyRegion, Regions

from deblend import Deblender, Image
from deblend.regions import DEFAULT_SCALE, MIN_SEMI_AXIS, catalog_regions, write_regions


@pytest.fixture
def result(scene, header):
    return Deblender("sep").run(Image.from_array(scene, wcs=WCS(header)))


def small_catalog(with_class=True):
    table = QTable()
    table["label"] = np.array([1, 2, 3], dtype=np.int32)
    table["x_centroid"] = [10.0, 20.5, 30.0]
    table["y_centroid"] = [5.0, 15.0, 25.25]
    table["semimajor_axis"] = [3.0, 0.1, np.nan] * u.pix
    table["semiminor_axis"] = [1.5, 0.1, np.nan] * u.pix
    table["orientation"] = [30.0, 0.0, np.nan] * u.deg
    if with_class:
        table["class"] = ["galaxy", "star", "galaxy"]
    return table


def test_pixel_regions_follow_the_catalog():
    regions = catalog_regions(small_catalog())
    assert len(regions) == 3 and all(isinstance(r, EllipsePixelRegion) for r in regions)
    first = regions[0]
    assert (first.center.x, first.center.y) == (10.0, 5.0)  # 0-based, as in the catalog
    assert first.width == pytest.approx(2 * DEFAULT_SCALE * 3.0)  # full axis = 2 × scale × sigma
    assert first.height == pytest.approx(2 * DEFAULT_SCALE * 1.5)
    assert first.angle.to_value(u.deg) == pytest.approx(30.0)
    assert [r.meta["text"] for r in regions] == ["1 galaxy", "2 star", "3 galaxy"]
    # too small or unmeasured shapes still get a (minimal) region
    assert regions[1].width == pytest.approx(2 * MIN_SEMI_AXIS)
    assert regions[2].height == pytest.approx(2 * MIN_SEMI_AXIS)
    assert regions[2].angle.to_value(u.deg) == 0.0
    half = catalog_regions(small_catalog(), scale=1.0)
    assert half[0].width == pytest.approx(6.0)


def test_text_without_class_column():
    regions = catalog_regions(small_catalog(with_class=False))
    assert [r.meta["text"] for r in regions] == ["1", "2", "3"]


def test_sky_regions_match_the_catalog(result):
    catalog, wcs = result.catalog, result.image.wcs
    regions = catalog_regions(catalog, wcs=wcs)
    assert len(regions) == len(catalog) == 3
    assert all(isinstance(r, EllipseSkyRegion) for r in regions)
    centers = SkyCoord([r.center for r in regions])
    separation = centers.separation(SkyCoord(catalog["ra"], catalog["dec"]))
    assert separation.max() < 1 * u.mas
    scale = 0.2 * u.arcsec  # pixel scale of the conftest header
    expected = 2 * DEFAULT_SCALE * u.Quantity(catalog["semimajor_axis"]).to_value(u.pix) * scale
    np.testing.assert_allclose([r.width.to_value(u.arcsec) for r in regions], expected.to_value(u.arcsec),
                               rtol=1e-3)


@pytest.mark.parametrize("sky", [False, True])
def test_written_file_parses_back(result, tmp_path, sky, temp_files_under):
    path = tmp_path / "scene.reg"
    wcs = result.image.wcs if sky else None
    assert write_regions(result.catalog, path, wcs=wcs) == path
    assert temp_files_under(tmp_path) == []
    back = Regions.read(str(path), format="ds9")
    assert len(back) == len(result.catalog)
    assert [str(r.meta["text"]) for r in back] == [str(label) for label in result.catalog["label"]]
    text = path.read_text()
    assert ("icrs" in text) is sky and ("image" in text) is (not sky)
    if not sky:  # DS9 image coordinates are 1-based: the file holds x + 1, reading gives x back
        x0 = float(result.catalog["x_centroid"][0])
        assert f"ellipse({x0 + 1:.8f}" in text
        assert back[0].center.x == pytest.approx(x0, abs=1e-6)
    else:
        pixel = back[0].to_pixel(result.image.wcs)
        assert pixel.center.x == pytest.approx(float(result.catalog["x_centroid"][0]), abs=1e-3)


def test_empty_catalog_gives_an_empty_file(result, tmp_path):
    path = write_regions(result.catalog[:0], tmp_path / "empty.reg")
    assert len(Regions.read(str(path), format="ds9")) == 0


def test_overwrite(result, tmp_path):
    path = tmp_path / "scene.reg"
    write_regions(result.catalog, path)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_regions(result.catalog[:1], path)
    assert len(Regions.read(str(path), format="ds9")) == 3
    write_regions(result.catalog[:1], path, overwrite=True)
    assert len(Regions.read(str(path), format="ds9")) == 1


def test_errors():
    catalog = small_catalog()
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['orientation'\]"):
        catalog_regions(catalog[[c for c in catalog.colnames if c != "orientation"]])
    for scale in (0, -1.0, np.nan):
        with pytest.raises(ValueError, match="scale must be a positive number"):
            catalog_regions(catalog, scale=scale)


def test_rows_without_centroid_are_logged(caplog):
    catalog = small_catalog()
    catalog["x_centroid"][1] = np.nan
    regions = catalog_regions(catalog)
    assert [r.meta["text"] for r in regions] == ["1 galaxy", "3 galaxy"]
    assert "source 2 has no finite centroid" in caplog.text
