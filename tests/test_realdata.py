"""Run ``deblend run --method sep`` on every observed image in ../shared/realdata, if present.

One test per file, so a failure names the file. The images are public survey data of
many kinds (HST, HSC, DECaLS, KiDS/VIKING, SDSS, CTIO; gzipped and tile-compressed;
with and without WCS; cubes; PSF, sigma and mask images too - each is still an image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deblend.cli import main
from deblend.io import fits_stem, read_catalog, read_segmentation

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
PATTERNS = ("*.fits", "*.fits.gz", "*.fz")


def _fits_files():
    if not REALDATA.is_dir():
        return []
    return sorted({p for pattern in PATTERNS for p in REALDATA.rglob(pattern) if p.is_file()})


FILES = _fits_files()

pytestmark = pytest.mark.skipif(not REALDATA.is_dir(), reason=f"{REALDATA} is absent")


def test_realdata_found():
    assert len(FILES) > 0


def _run(method, path, outdir):
    """`deblend run` on one file; returns its label map, header and catalog, checked for agreement."""
    assert main(["-q", "run", "--method", method, str(path), "-o", str(outdir)]) == 0
    stem = fits_stem(path)
    labels, header = read_segmentation(outdir / f"{stem}_seg.fits")
    catalog = read_catalog(outdir / f"{stem}_cat.fits")
    assert labels.max() == len(catalog) == header["NSOURCES"]
    return stem, labels, header, catalog


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(REALDATA).as_posix() for p in FILES])
def test_sep_on_real_image(path, tmp_path):
    stem, labels, header, catalog = _run("sep", path, tmp_path)
    np.testing.assert_array_equal(np.asarray(catalog["label"]), np.arange(1, len(catalog) + 1))
    expected = [f"{stem}_cat.fits", f"{stem}_seg.fits", "manifest.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)


def test_decals_grz_as_bands(tmp_path):
    directory = REALDATA / "decals_dr7_a1689_astro_rcnn"
    paths = [directory / f"img_{band}.fits" for band in "grz"]
    if not all(p.exists() for p in paths):
        pytest.skip("DECaLS g, r, z cutouts are absent")
    argv = ["-q", "run", "--method", "sep", "--bands", *map(str, paths), "-o", str(tmp_path)]
    status = main(argv)
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["img_g_cat.fits", "img_g_seg.fits", "manifest.jsonl"])
    catalog = read_catalog(tmp_path / "img_g_cat.fits")
    assert len(catalog) > 10
    for band in "grz":  # no FILTER keyword: bands are named after the files
        assert f"segment_flux_img_{band}" in catalog.colnames
        assert np.isfinite(np.asarray(catalog[f"segment_flux_img_{band}"])).all()
    ra, dec = np.asarray(catalog["ra"]), np.asarray(catalog["dec"])
    # about 4' south of Abell 1689 (RA 197.87, Dec -1.34)
    assert np.all(np.abs(ra - 197.860) < 0.05) and np.all(np.abs(dec + 1.413) < 0.05)
    _, header = read_segmentation(tmp_path / "img_g_seg.fits")
    assert header["CTYPE1"] == "RA---TAN"


# The shipped Mask R-CNN on the small real images (the 2600x2600 KiDS mosaics are left to
# pipelines/realdata_check.py, which runs every image and method, to keep the suite fast).
_AUX = ("psfim", "segim", "mskim", "sigma", "_rms")  # PSF, segmentation, mask and noise images: sep covers them
SMALL = [p for p in FILES if p.stat().st_size < 1_200_000 and "MultiBand" not in p.as_posix()
         and not any(a in p.name for a in _AUX)]


@pytest.mark.parametrize("path", SMALL, ids=[p.relative_to(REALDATA).as_posix() for p in SMALL])
def test_mask_rcnn_on_small_real_image(path, tmp_path):
    _, _, header, catalog = _run("mask-rcnn", path, tmp_path)
    assert header["DBMETHOD"] == "mask-rcnn" and header["DBWEIGHT"] != "none"
    if len(catalog):
        assert set(np.asarray(catalog["class"])) <= {"star", "galaxy"}
