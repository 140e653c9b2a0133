"""Tests of deblend.merge: stacking tile catalogs, edge distances, removing duplicates of overlapping tiles."""

from __future__ import annotations

import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS

from deblend.cli import main
from deblend.exceptions import DeblendWarning, WCSWarning
from deblend.io import read_catalog, write_catalog, write_segmentation
from deblend.merge import find_catalogs, merge_catalogs
from deblend.simulate import SceneConfig, simulate_scene

ARCSEC = 1 / 3600.0


def write_tile(outdir, stem, rows, *, shape=(50, 100), fmt="fits", sky=True, seg=True):
    """A tile's catalog from ``(x, y, ra, dec)`` rows, and its segmentation map of ``shape``."""
    table = QTable()
    table["label"] = np.arange(1, len(rows) + 1, dtype=np.int32)
    table["x_centroid"] = [r[0] for r in rows]
    table["y_centroid"] = [r[1] for r in rows]
    if sky:
        table["ra"] = [r[2] for r in rows] * u.deg
        table["dec"] = [r[3] for r in rows] * u.deg
    table["segment_flux"] = np.full(len(rows), 10.0)
    table.meta = {"method": "sep"}
    ext = {"fits": ".fits", "csv": ".csv", "ecsv": ".ecsv", "parquet": ".parquet"}[fmt]
    write_catalog(table, outdir / f"{stem}_cat{ext}")
    if seg:
        write_segmentation(outdir / f"{stem}_seg.fits", np.zeros(shape, np.int32), input_path=f"{stem}.fits")


@pytest.fixture
def two_tiles(tmp_path):
    """Tiles a and b (50 x 100 pixels) sharing one source; a also holds a close pair, b a lone source."""
    outdir = tmp_path / "out"
    ra0, dec0 = 150.0, 2.0
    write_tile(outdir, "a", [(95.0, 25.0, ra0, dec0),  # 4.5 px from a's right edge
                             (40.0, 20.0, ra0 + 20 * ARCSEC, dec0),
                             (42.0, 20.0, ra0 + 20.4 * ARCSEC, dec0)])  # 0.4": a pair deblended in a
    write_tile(outdir, "b", [(15.0, 25.0, ra0 + 0.3 * ARCSEC, dec0),  # the same source, 15.5 px inside b
                             (60.0, 10.0, ra0 - 30 * ARCSEC, dec0)])
    return outdir


def test_merge_keeps_the_detection_farthest_from_its_edge(two_tiles):
    merged = merge_catalogs(two_tiles)
    assert len(merged) == 4
    assert merged.meta["n_before"] == 5 and merged.meta["n_after"] == 4 and merged.meta["n_files"] == 2
    assert merged.meta["files"] == ["a_cat.fits", "b_cat.fits"] and merged.meta["skipped"] == []
    assert merged.meta["radius"] == 1.0 and merged.meta["merged"] is True
    assert {"date", "creator", "version"} <= set(merged.meta)
    rows = {(t, int(label)) for t, label in zip(merged["tile"], merged["label"], strict=True)}
    assert rows == {("a", 2), ("a", 3), ("b", 1), ("b", 2)}  # a's edge copy went, a's close pair stayed
    assert set(merged["source_file"]) == {"a.fits", "b.fits"}
    edge = dict(zip(zip(merged["tile"], merged["label"], strict=True), merged["edge_distance"], strict=True))
    assert edge[("b", 1)] == pytest.approx(15.5)  # x + 0.5
    assert edge[("a", 2)] == pytest.approx(20.5)  # y + 0.5
    assert edge[("b", 2)] == pytest.approx(10.5)
    assert merged.colnames[0] == "label" and merged["ra"].unit == u.deg


def test_merge_radius(two_tiles):
    assert len(merge_catalogs(two_tiles, match_radius=0.2)) == 5  # 0.3" apart: two sources now
    assert len(merge_catalogs(two_tiles, match_radius=0.5 * u.arcsec)) == 4
    for bad in (0, -1.0, 1 * u.m, "1"):
        with pytest.raises(ValueError, match="match_radius must be a positive angle"):
            merge_catalogs(two_tiles, match_radius=bad)


def test_merge_leaves_out_catalogs_without_sky_positions(two_tiles):
    write_tile(two_tiles, "nowcs", [(10.0, 10.0, 0.0, 0.0)], sky=False)
    with pytest.warns(WCSWarning, match="nowcs_cat.fits: no sky positions"):
        merged = merge_catalogs(two_tiles)
    assert len(merged) == 4 and merged.meta["skipped"] == ["nowcs_cat.fits"]
    assert "nowcs" not in set(merged["tile"])


def test_merge_without_segmentation_map(two_tiles):
    (two_tiles / "b_seg.fits").unlink()
    with pytest.warns(DeblendWarning, match="b_cat.fits: no image shape from b_seg.fits"):
        merged = merge_catalogs(two_tiles)
    # b's detections lose the tie now: the edge copy in a is kept
    rows = {(t, int(label)) for t, label in zip(merged["tile"], merged["label"], strict=True)}
    assert rows == {("a", 1), ("a", 2), ("a", 3), ("b", 2)}
    assert np.isnan(np.asarray(merged["edge_distance"])[np.asarray(merged["tile"]) == "b"]).all()
    assert set(merged["source_file"]) == {"a.fits", "b"}


def test_merge_mixed_formats_and_subdirectories(tmp_path):
    outdir = tmp_path / "out"
    (outdir / "night1").mkdir(parents=True)
    write_tile(outdir, "a", [(95.0, 25.0, 150.0, 2.0)], fmt="csv")
    write_tile(outdir / "night1", "a", [(15.0, 25.0, 150.0, 2.0)], fmt="ecsv")
    write_tile(outdir, "c", [(50.0, 25.0, 151.0, 2.0)], fmt="parquet")
    merged = merge_catalogs(outdir)
    assert sorted(merged["tile"]) == ["c", "night1/a"]


def test_merge_ignores_merged_catalogs_and_temporary_files(two_tiles):
    write_catalog(merge_catalogs(two_tiles), two_tiles / "survey_cat.fits")
    (two_tiles / ".b_cat.fits.1234abcd.tmp.fits").write_bytes(b"partial")
    assert find_catalogs(two_tiles) == [two_tiles / "a_cat.fits", two_tiles / "b_cat.fits",
                                        two_tiles / "survey_cat.fits"]
    merged = merge_catalogs(two_tiles)
    assert len(merged) == 4 and merged.meta["files"] == ["a_cat.fits", "b_cat.fits"]


def test_merge_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        merge_catalogs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no catalogs"):
        merge_catalogs(tmp_path / "empty")
    write_tile(tmp_path / "nowcs", "x", [(1.0, 1.0, 0.0, 0.0)], sky=False)
    with pytest.raises(ValueError, match="none of the 1 catalogs"), warnings.catch_warnings():
        warnings.simplefilter("ignore", WCSWarning)
        merge_catalogs(tmp_path / "nowcs")


def cut(path, image, wcs, xs):
    """Write the columns ``xs`` (a slice) of ``image`` with the matching WCS."""
    fits.PrimaryHDU(image[:, xs], header=wcs[:, xs].to_header()).writeto(path)
    return str(path)


def test_overlapping_tiles_of_one_scene(tmp_path):
    scene = simulate_scene(SceneConfig(shape=(128, 200)), seed=0, keep_sources=False)
    wcs = WCS(scene.header)
    full = cut(tmp_path / "full.fits", scene.image, wcs, slice(0, 200))
    left = cut(tmp_path / "left.fits", scene.image, wcs, slice(0, 130))
    right = cut(tmp_path / "right.fits", scene.image, wcs, slice(70, 200))  # 60 columns in common
    assert main(["-q", "run", "--method", "sep", full, "-o", str(tmp_path / "whole")]) == 0
    assert main(["-q", "run", "--method", "sep", left, right, "-o", str(tmp_path / "tiles")]) == 0
    survey = tmp_path / "survey.parquet"
    assert main(["-q", "merge", str(tmp_path / "tiles"), "-o", str(survey)]) == 0
    merged = read_catalog(survey)
    whole = read_catalog(tmp_path / "whole" / "full_cat.fits")
    n_left = len(read_catalog(tmp_path / "tiles" / "left_cat.fits"))
    n_right = len(read_catalog(tmp_path / "tiles" / "right_cat.fits"))
    assert len(merged) <= n_left + n_right - 3  # the overlap had duplicates
    assert abs(len(merged) - len(whole)) <= 2
    coords = SkyCoord(merged["ra"], merged["dec"])
    i, j, _, _ = coords.search_around_sky(coords, 1 * u.arcsec)
    tiles = np.asarray(merged["tile"])
    assert not (tiles[i] != tiles[j]).any()  # the invariant: no two tiles keep the same source
    _, separation, _ = coords.match_to_catalog_sky(coords, nthneighbor=2)
    assert separation.min() > 1 * u.arcsec  # and in this scene no deblended pair is that close either
    assert set(merged["source_file"]) == {"left.fits", "right.fits"}
    assert {"tile", "edge_distance"} <= set(merged.colnames)
    assert (np.asarray(merged["edge_distance"]) >= 0).all()
    assert merged.meta["n_before"] == n_left + n_right and merged.meta["n_after"] == len(merged)
    # every source of the whole image is in the merged catalog (within 1")
    whole_coords = SkyCoord(whole["ra"], whole["dec"])
    _, to_merged, _ = whole_coords.match_to_catalog_sky(coords)
    assert np.mean(to_merged < 1 * u.arcsec) >= 0.9
