"""The shipped Mask R-CNN weights on a bundled sample tile: loads offline, checksum verified, finds the sources."""

import numpy as np
import pytest

from deblend import Deblender, read_image
from deblend.evaluate import evaluate_image
from deblend.io import read_catalog, read_segmentation
from deblend.models.registry import DEFAULT_MASK_RCNN, model_card, weights_path


def test_shipped_weights_have_a_model_card():
    path = weights_path(DEFAULT_MASK_RCNN)
    assert path.exists(), f"{path} is missing: the package ships its weights"
    assert path.stat().st_size <= 25 * 2**20
    card = model_card(DEFAULT_MASK_RCNN)
    for key in ("sha256", "data", "recipe", "hardware", "n_parameters"):
        assert key in card


@pytest.fixture(scope="module")
def sample_result():
    image = read_image("data/sample_0000.fits")
    return Deblender("mask-rcnn").run(image)


def test_shipped_model_on_sample_tile(sample_result):
    truth_seg, _ = read_segmentation("data/sample_0000_truth_seg.fits")
    truth = read_catalog("data/sample_0000_truth.fits")
    header = read_image("data/sample_0000.fits").header
    fwhm = header["PSF_FWHM"] / header["PIXSCALE"]
    res = evaluate_image(sample_result.labels, sample_result.catalog, truth_seg, truth, fwhm_pixels=fwhm)
    recall = res["tp"] / res["n_truth"]
    precision = res["tp"] / max(1, res["tp"] + res["fp"])
    # a trained model finds most of the sources and invents few; an untrained one scores ~0
    assert recall > 0.5 and precision > 0.8, res


def test_shipped_model_outputs_are_consistent(sample_result):
    cat = sample_result.catalog
    np.testing.assert_array_equal(np.unique(sample_result.labels[sample_result.labels > 0]),
                                  np.asarray(cat["label"]))
    assert set(np.asarray(cat["class"])) <= {"star", "galaxy"}
    assert np.all((np.asarray(cat["class_prob"]) > 0) & (np.asarray(cat["det_score"]) <= 1))
    assert sample_result.weights_id == model_card(DEFAULT_MASK_RCNN)["sha256"][:16]


def test_same_input_same_output():
    image = read_image("data/sample_3band_0000.fits")
    a, b = Deblender("mask-rcnn").run(image), Deblender("mask-rcnn").run(image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(np.asarray(a.catalog["det_score"]), np.asarray(b.catalog["det_score"]))
