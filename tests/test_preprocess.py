"""Tests of deblend.preprocess: background and σ, detection image, normalisation."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from deblend.io import Image
from deblend.preprocess import (
    Background,
    Prepared,
    detection_image,
    estimate_background,
    normalize,
    prepare,
)


@pytest.mark.parametrize("shape", [(128, 128), (96, 200)])
def test_flat_sky_level_and_sigma(rng, shape):
    data = rng.normal(250.0, 3.0, shape).astype(np.float32)
    bkg = estimate_background(data, box_size=32)
    assert isinstance(bkg, Background)
    assert bkg.level.shape == (1, *shape) and bkg.rms.shape == (1, *shape)
    assert bkg.level.dtype == np.float32
    assert np.median(bkg.level) == pytest.approx(250.0, abs=0.05 * 3.0)
    assert bkg.global_rms[0] == pytest.approx(3.0, rel=0.05)
    assert np.median(bkg.rms) == pytest.approx(3.0, rel=0.05)


def test_sky_gradient_is_level_not_noise(rng):
    """A steep linear sky: the level follows it, and σ is the pixel noise, not the spread of the ramp in a box."""
    ny, nx = 192, 256
    x = np.arange(nx)[None, :] / (nx - 1)
    sky = 100.0 * (1.0 + 0.3 * (x - 0.5))  # 30 counts across the image: 7.5 per 64-pixel box, 15 sigma
    data = (sky + rng.normal(0.0, 0.5, (ny, nx))).astype(np.float32)
    bkg = estimate_background(data, box_size=64)
    assert np.median(np.abs(bkg.level[0] - sky)) < 0.1
    assert bkg.global_rms[0] == pytest.approx(0.5, rel=0.05)
    assert np.median(bkg.rms) == pytest.approx(0.5, rel=0.05)


def test_background_ignores_sources(make_scene):
    data = make_scene(shape=(128, 128), sources=[(40, 40, 500, 3), (90, 80, 800, 4)], sky=50.0,
                      noise=2.0)
    bkg = estimate_background(data, box_size=32)
    assert np.median(bkg.level) == pytest.approx(50.0, abs=0.2)
    assert bkg.global_rms[0] == pytest.approx(2.0, rel=0.08)


def test_background_per_band(rng):
    cube = np.stack([rng.normal(10.0, 1.0, (64, 64)), rng.normal(-5.0, 4.0, (64, 64))])
    bkg = estimate_background(cube, box_size=32)
    assert bkg.level.shape == (2, 64, 64)
    assert np.median(bkg.level[0]) == pytest.approx(10.0, abs=0.1)
    assert np.median(bkg.level[1]) == pytest.approx(-5.0, abs=0.4)
    np.testing.assert_allclose(bkg.global_rms, [1.0, 4.0], rtol=0.08)


def test_tiny_image_uses_global_estimate(rng):
    data = rng.normal(5.0, 1.0, (8, 8))
    bkg = estimate_background(data)
    assert bkg.level.shape == (1, 8, 8)
    assert np.all(bkg.level == bkg.level[0, 0, 0])  # a single level
    assert bkg.level[0, 0, 0] == pytest.approx(5.0, abs=0.5)
    assert 0.5 < bkg.global_rms[0] < 1.5
    assert np.all(bkg.rms > 0)


@pytest.mark.parametrize("shape", [(8, 8), (64, 64)])
def test_constant_image_gets_sigma_floor(shape, caplog):
    with caplog.at_level(logging.WARNING, logger="deblend.preprocess"):
        bkg = estimate_background(np.full(shape, 7.0))
    np.testing.assert_allclose(bkg.level, 7.0)
    assert bkg.global_rms[0] == 1.0
    assert np.all(bkg.rms == 1.0)
    assert "noise σ is 0" in caplog.text


def test_variance_plane_gives_sigma(rng):
    var = np.full((1, 64, 64), 4.0, dtype=np.float32)
    var[0, :, 32:] = 9.0
    image = Image.from_array(rng.normal(0.0, 1.0, (64, 64)), variance=var)
    bkg = estimate_background(image)
    np.testing.assert_allclose(bkg.rms[0, :, :32], 2.0)
    np.testing.assert_allclose(bkg.rms[0, :, 32:], 3.0)


def test_masked_pixels_do_not_bias_background(rng):
    data = rng.normal(10.0, 1.0, (64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[:, :20] = True
    data[:, :20] = 1e4  # garbage under the mask
    image = Image.from_array(data, mask=mask)
    bkg = estimate_background(image, box_size=32)
    assert np.median(bkg.level[0][~mask]) == pytest.approx(10.0, abs=0.2)
    assert bkg.global_rms[0] == pytest.approx(1.0, rel=0.1)


def test_extra_mask_covering_everything_falls_back(rng):
    data = rng.normal(3.0, 1.0, (32, 32))
    bkg = estimate_background(data, mask=np.ones((32, 32), bool))
    assert np.median(bkg.level) == pytest.approx(3.0, abs=0.3)


def test_detection_image_inverse_variance_weighting(rng):
    d1 = rng.normal(0.0, 1.0, (16, 16)).astype(np.float32)
    d2 = rng.normal(0.0, 2.0, (16, 16)).astype(np.float32)
    rms = np.stack([np.full((16, 16), 1.0), np.full((16, 16), 2.0)])
    det, det_rms = detection_image(np.stack([d1, d2]), rms)
    assert det.dtype == np.float32 and det_rms.dtype == np.float32 and det.shape == (16, 16)
    w1, w2 = 1.0, 1.0 / 4.0
    np.testing.assert_allclose(det, (w1 * d1 + w2 * d2) / (w1 + w2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det_rms, 1.0 / np.sqrt(w1 + w2), rtol=1e-6)
    # the combination has the predicted noise
    many = rng.normal(0.0, 1.0, (2, 256, 256)) * np.array([1.0, 2.0])[:, None, None]
    det, det_rms = detection_image(many, np.broadcast_to(rms[:, :1, :1], many.shape))
    assert np.std(det) == pytest.approx(float(det_rms[0, 0]), rel=0.03)


def test_detection_image_per_pixel_rms_and_mask():
    data = np.array([[[1.0, 2.0]], [[3.0, 4.0]]])
    rms = np.array([[[1.0, 2.0]], [[2.0, 1.0]]])
    mask = np.array([[False, True]])
    det, det_rms = detection_image(data, rms, mask=mask)
    np.testing.assert_allclose(det[0, 0], (1.0 + 3.0 / 4) / (1.0 + 1 / 4), rtol=1e-6)
    assert det[0, 1] == 0.0
    np.testing.assert_allclose(det_rms[0, 0], 1 / np.sqrt(1.25), rtol=1e-6)


def test_detection_image_single_band_is_identity(rng):
    data = rng.normal(size=(12, 12)).astype(np.float32)
    det, det_rms = detection_image(data, np.full((12, 12), 2.0))
    np.testing.assert_allclose(det, data, rtol=1e-6)
    np.testing.assert_allclose(det_rms, 2.0)


def test_detection_image_shape_mismatch():
    with pytest.raises(ValueError, match="rms shape"):
        detection_image(np.zeros((2, 4, 4)), np.ones((1, 4, 4)))


def test_normalize_is_asinh_of_snr(rng):
    image = rng.normal(0.0, 3.0, (20, 20)).astype(np.float32) * 10
    sigma = np.full((20, 20), 3.0)
    for softening in (1.0, 2.5):
        out = normalize(image, sigma, softening=softening)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, np.arcsinh(image / (softening * 3.0)), rtol=1e-5, atol=1e-6)
    mask = np.zeros((20, 20), bool)
    mask[2:5, 7] = True
    out = normalize(image, 3.0, mask=mask)
    assert (out[mask] == 0).all()
    np.testing.assert_allclose(out[~mask], np.arcsinh(image[~mask] / 3.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: estimate_background(np.zeros((32, 32)), box_size=0), "box_size"),
        (lambda: estimate_background(np.zeros((32, 32)), box_size=2.5), "box_size"),
        (lambda: estimate_background(np.zeros((32, 32)), filter_size=-1), "filter_size"),
        (lambda: estimate_background(np.zeros((32, 32)), filter_size=1.5), "filter_size"),
        (lambda: normalize(np.zeros((4, 4)), 1.0, softening=0), "softening"),
        (lambda: normalize(np.zeros((4, 4)), 1.0, softening=-2.0), "softening"),
        (lambda: normalize(np.zeros((4, 4)), np.zeros((4, 4))), "sigma"),
        (lambda: normalize(np.zeros((4, 4)), -1.0), "sigma"),
    ],
)
def test_invalid_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_prepare(make_scene):
    cube = np.stack([make_scene(seed=0), 2.0 * make_scene(seed=1)])
    cube[:, 0, 0] = np.nan
    image = Image.from_array(cube)
    prepared = prepare(image, box_size=32)
    assert isinstance(prepared, Prepared)
    assert prepared.data.shape == (2, 64, 64) and prepared.detection.shape == (64, 64)
    assert prepared.mask[0, 0] and prepared.mask.sum() == 1
    assert (prepared.data[:, 0, 0] == 0).all() and prepared.detection[0, 0] == 0
    # background removed: sky pixels centre on zero
    assert abs(np.median(prepared.data[0])) < 0.2 and abs(np.median(prepared.data[1])) < 0.4
    np.testing.assert_allclose(prepared.background.global_rms, [1.0, 2.0], rtol=0.1)
    rms = prepared.background.rms
    expected = 1.0 / np.sqrt(1.0 / rms[0] ** 2 + 1.0 / rms[1] ** 2)
    np.testing.assert_allclose(prepared.detection_rms, expected, rtol=1e-5)
    norm = prepared.normalized(softening=2.0)
    np.testing.assert_allclose(
        norm[~prepared.mask],
        np.arcsinh(prepared.detection / (2.0 * prepared.detection_rms))[~prepared.mask],
        rtol=1e-5, atol=1e-6,
    )
    assert np.isfinite(norm).all()


def test_prepare_does_not_modify_image(scene):
    image = Image.from_array(scene)
    before = image.data.copy()
    prepare(image)
    np.testing.assert_array_equal(image.data, before)
