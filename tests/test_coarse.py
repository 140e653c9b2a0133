"""Tests for deblend.coarse: binning, upsampling instances, the coarse pass and its merge."""

from __future__ import annotations

import numpy as np
import pytest
from test_segment import ThresholdModel

from deblend.coarse import bin_image, detect_coarse, merge_coarse, upsample_instances
from deblend.segment import Instances, detect, instances_to_labels


def _instances(boxes, masks, offsets, scores=None):
    """Instances from boxes (x1, y1, x2, y2), mask crops and their (y0, x0) offsets."""
    n = len(boxes)
    masks = [np.asarray(m, dtype=np.float16) for m in masks]
    centers = []
    for m, (y0, x0) in zip(masks, offsets, strict=True):
        yy, xx = np.nonzero(m.astype(np.float32) >= 0.5)
        centers.append((x0 + xx.mean(), y0 + yy.mean()))
    return Instances(boxes=np.asarray(boxes, np.float32).reshape(n, 4), labels=np.full(n, 2, np.int64),
                     class_prob=np.full(n, 0.8, np.float32),
                     det_score=np.asarray(scores if scores is not None else [0.9] * n, np.float32),
                     centers=np.asarray(centers, np.float64).reshape(n, 2), masks=masks,
                     offsets=np.asarray(offsets, np.int64).reshape(n, 2))


def test_bin_image_block_means_and_sigma():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    binned, sigma, empty = bin_image(image, 2.0, factor=2)
    np.testing.assert_allclose(binned, [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_allclose(sigma, 1.0)  # sqrt(4 * 2**2) / 4: the mean of 4 pixels halves sigma
    assert not empty.any() and binned.dtype == np.float32


def test_bin_image_masked_and_partial_blocks():
    image = np.ones((5, 3), dtype=np.float32)
    image[0, 0] = 100.0  # masked below: must not leak into its block's mean
    image[4, 2] = np.nan  # the last partial block (1 pixel) has nothing good left
    mask = np.zeros((5, 3), bool)
    mask[0, 0] = True
    binned, sigma, empty = bin_image(image, np.ones((5, 3)), factor=2, mask=mask)
    assert binned.shape == (3, 2)
    np.testing.assert_allclose(binned[0, 0], 1.0)
    np.testing.assert_allclose(sigma[0, 0], np.sqrt(3) / 3)  # three good pixels
    np.testing.assert_allclose(sigma[2, 0], np.sqrt(2) / 2)  # a partial block of two pixels
    assert empty.tolist() == [[False, False], [False, False], [False, True]]
    assert binned[2, 1] == 0 and sigma[2, 1] == 1


@pytest.mark.parametrize("factor", [1, 0, 2.0, True])
def test_bin_image_rejects_bad_factor(factor):
    with pytest.raises(ValueError, match="factor must be an integer >= 2"):
        bin_image(np.zeros((4, 4)), 1.0, factor=factor)


def test_bin_image_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        bin_image(np.zeros((2, 4, 4)), 1.0)
    with pytest.raises(ValueError, match="mask shape"):
        bin_image(np.zeros((4, 4)), 1.0, mask=np.zeros((3, 4), bool))


def test_upsample_instances_geometry():
    coarse = _instances([[5, 2, 9, 5]], [np.ones((3, 4))], [(2, 5)])
    fine = upsample_instances(coarse, 2, (40, 40))
    np.testing.assert_array_equal(fine.offsets, [[4, 10]])
    np.testing.assert_array_equal(fine.boxes, [[10, 4, 18, 10]])
    assert fine.masks[0].shape == (6, 8)
    np.testing.assert_allclose(fine.masks[0].astype(np.float32), 1.0)
    # the centre of coarse pixel i is fine coordinate 2 i + 0.5
    np.testing.assert_allclose(fine.centers, coarse.centers * 2 + 0.5)
    np.testing.assert_allclose(fine.centers, [[13.5, 6.5]])  # the fine mask's own centroid


def test_upsample_instances_cut_to_the_image():
    coarse = _instances([[0, 0, 3, 3]], [np.ones((3, 3))], [(0, 0)])
    fine = upsample_instances(coarse, 2, (5, 4))  # the crop would cover 6x6
    values, region = fine.clipped_mask(0, (5, 4))
    assert fine.masks[0].shape == (5, 4) and values.shape == (5, 4)
    assert (fine.boxes <= [4, 5, 4, 5]).all()


def test_merge_coarse_replaces_the_pieces_it_covers():
    shape = (40, 40)
    big = _instances([[0, 0, 30, 30]], [np.ones((30, 30))], [(0, 0)], scores=[0.6])
    pieces = _instances([[2, 2, 8, 8], [20, 20, 26, 26], [32, 32, 38, 38], [27, 27, 33, 33]],
                        [np.ones((6, 6))] * 4, [(2, 2), (20, 20), (32, 32), (27, 27)])
    merged = merge_coarse(pieces, big, shape)
    # two pieces lie inside the large source, one outside it; the last has 9 of 36 pixels on it
    assert len(merged) == 3
    kept = {tuple(np.round(c).astype(int)) for c in merged.centers}
    assert kept == {(14, 14), (34, 34), (30, 30)}  # (x, y), rounded half to even
    assert np.all(np.diff(merged.centers[:, 1]) >= 0)  # sorted by centre y, as detect sorts
    assert merge_coarse(pieces, Instances.empty(), shape) is pieces
    with pytest.raises(ValueError, match="max_overlap"):
        merge_coarse(pieces, big, shape, max_overlap=0)


def _galaxies(shape, sources, seed=0):
    """Background-subtracted image (unit noise) of Gaussian sources (x, y, peak, sigma)."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.random.default_rng(seed).normal(0.0, 1.0, shape)
    for x0, y0, peak, sigma in sources:
        image += peak * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma ** 2))
    return image.astype(np.float32)


def test_detect_coarse_keeps_large_sources_at_full_resolution():
    shape = (160, 192)
    image = _galaxies(shape, [(90, 80, 20.0, 14.0), (20, 20, 40.0, 1.5), (170, 140, 40.0, 1.5)])
    large = detect_coarse(image, 1.0, model=ThresholdModel(threshold=2.0), factor=2, min_size=48,
                          window_size=64, overlap=16)
    assert len(large) == 1
    np.testing.assert_allclose(large.centers[0], (90, 80), atol=1.5)
    x1, y1, x2, y2 = large.boxes[0]
    assert x2 - x1 >= 48 and x1 < 90 < x2 and y1 < 80 < y2
    values, region = large.clipped_mask(0, shape)
    assert region[0].stop <= shape[0] and region[1].stop <= shape[1]
    # everything, small sources included, when min_size is 0
    assert len(detect_coarse(image, 1.0, model=ThresholdModel(threshold=2.0), min_size=0,
                             window_size=64, overlap=16)) == 3
    with pytest.raises(ValueError, match="min_size"):
        detect_coarse(image, 1.0, model=ThresholdModel(), min_size=-1)


def test_coarse_pass_gives_a_large_faint_source_one_label():
    # A broad source at S/N 3 per pixel: at full resolution the stand-in (threshold S/N 4.5)
    # sees only noise peaks on it; binned 2x2 (S/N 6 per pixel) it is one large source.
    shape = (128, 128)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    disk = np.hypot(x - 64, y - 60) < 30
    image = _galaxies(shape, [], seed=3) + 3.0 * disk
    model = ThresholdModel(threshold=np.arcsinh(4.5))
    fine = detect(np.arcsinh(image), model=model, window_size=128, overlap=32)
    large = detect_coarse(image, 1.0, model=model, window_size=64, overlap=16)
    assert len(large) == 1
    fine_labels, _ = instances_to_labels(fine, shape)
    assert np.bincount(fine_labels[disk])[1:].max(initial=0) < 0.2 * disk.sum()
    labels, _ = instances_to_labels(merge_coarse(fine, large, shape), shape)
    assert np.bincount(labels[disk])[1:].max() > 0.8 * disk.sum()  # the stand-in leaves holes


def test_detect_coarse_lets_the_box_head_decide_and_splits_no_window(monkeypatch):
    from deblend import segment

    seen = []
    monkeypatch.setattr(segment, "detect", lambda *a, **k: seen.append((k.get("centre_detect"), k["split_crowded"]))
                        or Instances.empty())
    detection = np.zeros((64, 64), np.float32)
    detect_coarse(detection, 1.0, model=None, split_crowded=True)
    detect_coarse(detection, 1.0, model=None, centre_detect=True)
    assert seen == [(False, False), (True, False)]  # and crowded windows are never split there
