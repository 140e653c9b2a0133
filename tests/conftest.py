"""Shared fixtures: small seeded scenes of Gaussian sources, a TAN WCS, FITS file factories."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.modeling.models import Gaussian2D
from astropy.wcs import WCS

#: Sky level and pixel noise σ of the standard scene.
SKY = 100.0
NOISE = 1.0

#: Well separated sources of the standard 64×64 scene: (x, y, amplitude, sigma).
SOURCES = [(16.0, 18.0, 60.0, 2.0), (46.0, 44.0, 50.0, 2.2), (44.0, 14.0, 40.0, 1.8)]


def gaussian_scene(shape=(64, 64), sources=SOURCES, *, sky=SKY, noise=NOISE, seed=0):
    """Noisy image of circular Gaussian sources on a flat sky, as float32."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    model = np.zeros(shape)
    for x0, y0, amp, sigma in sources:
        model += Gaussian2D(amp, x0, y0, sigma, sigma)(x, y)
    rng = np.random.default_rng(seed)
    return (model + sky + rng.normal(0.0, noise, shape)).astype(np.float32)


def tan_header(shape=(64, 64), *, ra=150.0, dec=2.0, scale_arcsec=0.2):
    """A simple celestial TAN header for an image of ``shape`` (ny, nx)."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    w.wcs.cdelt = [-scale_arcsec / 3600.0, scale_arcsec / 3600.0]
    w.wcs.cunit = ["deg", "deg"]
    return w.to_header()


@pytest.fixture
def rng():
    """A seeded generator (each test gets the same stream)."""
    return np.random.default_rng(12345)


@pytest.fixture
def scene():
    """The standard 64×64 scene: three well separated Gaussians, sky 100, σ 1."""
    return gaussian_scene()


@pytest.fixture
def header():
    """A TAN WCS header matching `scene`."""
    return tan_header()


@pytest.fixture
def write_fits(tmp_path):
    """Factory: ``write_fits(name, data_or_hdus, header=None)`` -> path in ``tmp_path``.

    ``data_or_hdus`` is an array (written as the primary HDU), an HDU, or a list
    of HDUs (a PrimaryHDU is prepended when the first is not one). Sub-directories
    in ``name`` are created. ``.gz`` names are gzip-compressed by astropy.
    """

    def _write(name, data_or_hdus, header=None):
        path = Path(tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data_or_hdus, fits.HDUList):
            hdul = data_or_hdus
        elif isinstance(data_or_hdus, (list, tuple)):
            hdus = list(data_or_hdus)
            if not isinstance(hdus[0], fits.PrimaryHDU):
                hdus.insert(0, fits.PrimaryHDU())
            hdul = fits.HDUList(hdus)
        elif isinstance(data_or_hdus, fits.PrimaryHDU):
            hdul = fits.HDUList([data_or_hdus])
        elif isinstance(data_or_hdus, (fits.ImageHDU, fits.CompImageHDU)):
            hdul = fits.HDUList([fits.PrimaryHDU(), data_or_hdus])
        else:
            hdul = fits.HDUList([fits.PrimaryHDU(data=data_or_hdus, header=header)])
        hdul.writeto(path)
        return path

    return _write


@pytest.fixture
def scene_file(write_fits, scene, header):
    """The standard scene written as a plain 2-D FITS file with a TAN WCS."""
    return write_fits("scene.fits", scene, header=header)


@pytest.fixture
def bad_files(tmp_path, write_fits, scene):
    """Bad inputs by name: not FITS, truncated header, truncated data, header only."""
    good = write_fits("good_template.fits", scene)
    raw = good.read_bytes()
    good.unlink()
    paths = {}
    paths["not_fits"] = tmp_path / "notfits.fits"
    paths["not_fits"].write_text("this is a text file, not FITS\n" * 20)
    paths["truncated_header"] = tmp_path / "trunc_header.fits"
    paths["truncated_header"].write_bytes(raw[:1000])
    paths["truncated_data"] = tmp_path / "trunc_data.fits"
    paths["truncated_data"].write_bytes(raw[: 2880 + 4000])
    paths["header_only"] = write_fits("header_only.fits", fits.PrimaryHDU())
    return paths


def list_files(directory):
    """Every file under ``directory`` (recursively), as paths relative to it."""
    directory = Path(directory)
    return sorted(p.relative_to(directory) for p in directory.rglob("*") if p.is_file())


def temp_files(directory):
    """Leftover temporary files of atomic writes under ``directory``."""
    return [p for p in list_files(directory) if p.name.startswith(".") or ".tmp" in p.name]


@pytest.fixture
def make_scene():
    """The `gaussian_scene` factory."""
    return gaussian_scene


@pytest.fixture
def make_header():
    """The `tan_header` factory."""
    return tan_header


@pytest.fixture
def files_under():
    """The `list_files` helper."""
    return list_files


@pytest.fixture
def temp_files_under():
    """The `temp_files` helper."""
    return temp_files


@pytest.fixture(autouse=True)
def restore_logging():
    """main() configures the root logger and captures warnings: undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.captureWarnings(False)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def load_pipeline_script(name):
    """Import ``pipelines/<name>.py`` as a module (scripts import their neighbours, e.g. benchmark_quality)."""
    pipelines = Path(__file__).resolve().parents[1] / "pipelines"
    sys.path.insert(0, str(pipelines))
    try:
        spec = importlib.util.spec_from_file_location(f"deblend_script_{name}", pipelines / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(pipelines))
    return module
