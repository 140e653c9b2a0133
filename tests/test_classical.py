"""Tests of deblend.classical: SEP and photutils label maps behind one interface."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from deblend.classical import photutils_labels, relabel_consecutive, sep_labels
from deblend.io import Image
from deblend.preprocess import prepare

LABELLERS = [sep_labels, photutils_labels]


def prepared(data, mask=None):
    return prepare(Image.from_array(data, mask=mask), box_size=32)


def label_at(labels, x, y):
    return int(labels[int(round(y)), int(round(x))])


@pytest.fixture
def two_sources(make_scene):
    return make_scene(sources=[(18.0, 30.0, 50.0, 2.0), (46.0, 34.0, 40.0, 2.0)])


@pytest.fixture
def close_pair(make_scene):
    # two equal peaks 6 px apart (FWHM 3.5 px): one footprint, two peaks
    return make_scene(sources=[(29.0, 32.0, 50.0, 1.5), (35.0, 32.0, 50.0, 1.5)])


@pytest.mark.parametrize("labeller", LABELLERS)
def test_two_separated_sources(two_sources, labeller):
    p = prepared(two_sources)
    labels = labeller(p.detection, p.detection_rms, mask=p.mask)
    assert labels.dtype == np.int32 and labels.shape == (64, 64)
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])
    assert {label_at(labels, 18, 30), label_at(labels, 46, 34)} == {1, 2}
    assert labels[0, 0] == 0 and labels[63, 63] == 0


@pytest.mark.parametrize("labeller", LABELLERS)
def test_close_pair_is_deblended(close_pair, labeller):
    p = prepared(close_pair)
    labels = labeller(p.detection, p.detection_rms, mask=p.mask)
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])
    left, right = label_at(labels, 29, 32), label_at(labels, 35, 32)
    assert {left, right} == {1, 2}


def test_close_pair_merged_without_deblending(close_pair):
    p = prepared(close_pair)
    assert photutils_labels(p.detection, p.detection_rms, deblend=False).max() == 1
    assert sep_labels(p.detection, p.detection_rms, deblend_cont=1.0).max() == 1


@pytest.mark.parametrize("labeller", LABELLERS)
def test_masked_region_has_no_labels(scene, labeller):
    mask = np.zeros((64, 64), bool)
    mask[8:30, 6:28] = True  # covers the source at (16, 18)
    p = prepared(scene, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings for large masked regions
        labels = labeller(p.detection, p.detection_rms, mask=p.mask)
    assert not labels[mask].any()
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])


@pytest.mark.parametrize("labeller", LABELLERS)
def test_pure_noise_gives_no_sources(rng, labeller):
    noise = rng.normal(100.0, 1.0, (128, 128)).astype(np.float32)
    p = prepared(noise)
    labels = labeller(p.detection, p.detection_rms, mask=p.mask)
    assert labels.dtype == np.int32 and labels.shape == (128, 128)
    assert labels.max() <= 2  # at most a stray noise peak or two at 1.5 σ


def test_sep_default_threshold_is_sextractor_convention(rng):
    # thresh counts σ of the unfiltered image (SExtractor), not S/N of the filtered one
    noise = rng.normal(0.0, 1.0, (256, 256)).astype(np.float32)
    assert sep_labels(noise, np.ones_like(noise)).max() <= 2


@pytest.mark.parametrize("labeller", LABELLERS)
def test_zero_image(labeller):
    labels = labeller(np.zeros((32, 32), np.float32), np.ones((32, 32), np.float32))
    assert labels.dtype == np.int32 and not labels.any()


@pytest.mark.parametrize("labeller", LABELLERS)
def test_inputs_not_modified(scene, labeller):
    p = prepared(scene)
    det, rms = p.detection.copy(), p.detection_rms.copy()
    labeller(p.detection, p.detection_rms, mask=p.mask)
    np.testing.assert_array_equal(p.detection, det)
    np.testing.assert_array_equal(p.detection_rms, rms)


def test_sep_accepts_big_endian_and_scalar_rms(scene):
    p = prepared(scene)
    labels = sep_labels(p.detection.astype(">f8"), 1.0)
    assert labels.max() == 3


def test_photutils_without_smoothing(scene):
    p = prepared(scene)
    assert photutils_labels(p.detection, p.detection_rms, kernel_fwhm=None, nsigma=4.0).max() == 3


def test_options_change_results(scene):
    p = prepared(scene)
    many = sep_labels(p.detection, p.detection_rms, thresh=1.5)
    few = sep_labels(p.detection, p.detection_rms, thresh=30.0)
    assert few.max() < many.max()
    small = sep_labels(p.detection, p.detection_rms, minarea=1000)
    assert small.max() == 0


def test_relabel_consecutive():
    labels = np.array([[0, 7, 7], [3, 0, 12], [12, 12, 0]], dtype=np.int64)
    before = labels.copy()
    out = relabel_consecutive(labels)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 3], [3, 3, 0]])
    np.testing.assert_array_equal(labels, before)  # input untouched
    np.testing.assert_array_equal(relabel_consecutive(np.zeros((2, 2), int)), 0)
    already = np.array([[1, 2], [0, 3]])
    np.testing.assert_array_equal(relabel_consecutive(already), already)


@pytest.mark.parametrize(
    ("labeller", "kwargs", "name"),
    [
        (sep_labels, {"thresh": 0}, "thresh"),
        (sep_labels, {"thresh": -1.0}, "thresh"),
        (sep_labels, {"minarea": 0}, "minarea"),
        (sep_labels, {"minarea": 2.5}, "minarea"),
        (sep_labels, {"deblend_nthresh": 0}, "deblend_nthresh"),
        (sep_labels, {"deblend_cont": 1.5}, "deblend_cont"),
        (sep_labels, {"deblend_cont": -0.1}, "deblend_cont"),
        (photutils_labels, {"nsigma": 0}, "nsigma"),
        (photutils_labels, {"n_pixels": 0}, "n_pixels"),
        (photutils_labels, {"n_pixels": 3.5}, "n_pixels"),
        (photutils_labels, {"kernel_fwhm": -2.0}, "kernel_fwhm"),
    ],
)
def test_invalid_parameters(labeller, kwargs, name):
    data = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match=rf"{name} must be .*got"):
        labeller(data, np.ones_like(data), **kwargs)


def test_sep_never_labels_masked_pixels():
    """Regression (found by tests/test_fuzz.py): sep labelled masked pixels beside a faint source.

    The 18x23 image has two infinite columns; its noise σ is tiny, so the
    filtered light of a source reached the masked column above threshold.
    """
    import warnings
    from pathlib import Path

    from deblend.pipeline import Deblender

    array = np.load(Path(__file__).parent / "data" / "sep_labels_masked_column.npy")
    masked = ~np.isfinite(np.asarray(array, dtype=np.float32))
    assert masked.any() and not masked.all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the σ floor warning of a near-constant image
        result = Deblender("sep").run(array)
    assert result.labels.max() > 0 and not result.labels[masked].any()
