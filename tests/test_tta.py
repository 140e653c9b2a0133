"""Tests for deblend.tta: flips, fusing the passes' detections, and detection with test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from test_coarse import _instances
from test_segment import ThresholdModel

from deblend.segment import Instances, detect
from deblend.tta import (
    CROWDED_SCORE,
    FLIPS,
    MEMBER_SCORE_THRESHOLD,
    TTA_SCORE_THRESHOLD,
    detect_tta,
    flip_image,
    flip_instances,
    fuse_detections,
)


def _sources_image(shape=(72, 90)):
    """Three separate blocks of different sizes, none symmetric about the image centre, one at an edge."""
    image = np.zeros(shape, dtype=np.float32)
    image[10:15, 20:28] = 5.0
    image[40:52, 60:66] = 5.0
    image[60:72, 3:9] = 5.0  # touches the bottom edge
    return image


def _sorted(instances):
    return instances.select(np.lexsort((instances.centers[:, 0], instances.centers[:, 1])))


def _full_mask(instances, index, shape):
    out = np.zeros(shape, dtype=np.float32)
    values, region = instances.clipped_mask(index, shape)
    out[region] = values
    return out


def _assert_same(a, b, shape):
    """Same boxes, centres and masks on the image (crops may differ by empty rows or columns)."""
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes)
    np.testing.assert_allclose(a.centers, b.centers, atol=1e-9)
    for i in range(len(a)):
        np.testing.assert_array_equal(_full_mask(a, i, shape), _full_mask(b, i, shape))


def test_flip_image_is_its_own_inverse():
    image = np.arange(12).reshape(3, 4)
    for flip_y, flip_x in FLIPS:
        once = flip_image(image, flip_y=flip_y, flip_x=flip_x)
        assert once.flags.c_contiguous
        np.testing.assert_array_equal(flip_image(once, flip_y=flip_y, flip_x=flip_x), image)
    np.testing.assert_array_equal(flip_image(image, flip_y=True, flip_x=True), np.rot90(image, 2))


@pytest.mark.parametrize("flip", FLIPS)
def test_flip_instances_maps_detections_on_a_flipped_image_back(flip):
    flip_y, flip_x = flip
    image = _sources_image()
    kwargs = dict(model=ThresholdModel(), window_size=64, overlap=16, score_threshold=0.0)
    direct = detect(image, **kwargs)
    assert len(direct) == 3
    flipped = detect(flip_image(image, flip_y=flip_y, flip_x=flip_x), **kwargs)
    _assert_same(_sorted(flip_instances(flipped, image.shape, flip_y=flip_y, flip_x=flip_x)), direct, image.shape)


def test_flip_instances_pixel_convention():
    one = _instances([[2, 1, 5, 3]], [np.ones((2, 3))], [(1, 2)])  # pixels y 1-2, x 2-4 of a 6x10 image
    out = flip_instances(one, (6, 10), flip_y=True, flip_x=True)
    np.testing.assert_array_equal(out.offsets, [[3, 5]])  # y 3-4, x 5-7
    np.testing.assert_array_equal(out.boxes, [[5, 3, 8, 5]])
    np.testing.assert_allclose(out.centers, [[10 - 1 - 3, 6 - 1 - 1.5]])


def _blob(y0, x0, h=4, w=4, value=1.0):
    return np.full((h, w), value), (y0, x0)


def _part(blobs, scores, labels=None, class_prob=None):
    masks = [m for m, _ in blobs]
    offsets = [o for _, o in blobs]
    boxes = [[x0, y0, x0 + m.shape[1], y0 + m.shape[0]] for m, (y0, x0) in blobs]
    inst = _instances(boxes, masks, offsets, scores=scores)
    if labels is not None:
        inst.labels[:] = labels
    if class_prob is not None:
        inst.class_prob[:] = class_prob
    return inst


def test_fuse_detections_averages_scores_over_all_passes():
    parts = [_part([_blob(10, 10)], [s]) for s in (0.9, 0.8, 0.7, 0.6)]
    fused = fuse_detections(parts, (40, 40))
    assert len(fused) == 1
    np.testing.assert_allclose(fused.det_score, [0.75], rtol=1e-6)
    np.testing.assert_allclose(fused.class_prob, [0.8], rtol=1e-6)  # each pass: class_prob 0.8
    np.testing.assert_allclose(fused.centers, [[11.5, 11.5]])
    np.testing.assert_array_equal(fused.offsets, [[10, 10]])


def test_fuse_detections_drops_what_few_passes_saw():
    lone = [_part([_blob(10, 10)], [0.9])] + [Instances.empty()] * 3
    assert len(fuse_detections(lone, (40, 40))) == 0  # 0.9 / 4 < 0.4
    kept = fuse_detections(lone, (40, 40), score_threshold=0.2)
    np.testing.assert_allclose(kept.det_score, [0.225], rtol=1e-6)


def test_fuse_detections_averages_masks_of_shifted_members():
    parts = [_part([_blob(10, 10)], [0.9]), _part([_blob(10, 11)], [0.9])]  # IoU 12/20 = 0.6
    fused = fuse_detections(parts, (40, 40))
    assert len(fused) == 1
    np.testing.assert_array_equal(fused.offsets, [[10, 10]])
    values = fused.masks[0].astype(np.float32)
    assert values.shape == (4, 5)
    np.testing.assert_allclose(values[:, 0], 0.5)
    np.testing.assert_allclose(values[:, 1:4], 1.0)
    np.testing.assert_allclose(values[:, 4], 0.5)
    np.testing.assert_allclose(fused.boxes, [[10.5, 10, 14.5, 14]])
    # below match_iou they stay two sources, each seen by one pass of two
    apart = fuse_detections(parts, (40, 40), match_iou=0.7, score_threshold=0.4)
    assert len(apart) == 2 and np.allclose(apart.det_score, 0.45)


def test_fuse_detections_keeps_neighbours_apart_and_takes_one_member_per_pass():
    pair = [_blob(10, 10), _blob(10, 14)]  # touching, not overlapping
    parts = [_part(pair, [0.9, 0.8]) for _ in range(4)]
    parts[0] = _part(pair + [_blob(10, 10, value=0.9)], [0.9, 0.8, 0.5])  # a duplicate within one pass
    fused = fuse_detections(parts, (40, 40), score_threshold=0.0)
    assert len(fused) == 3  # the duplicate cannot join a group that pass already gave a member to
    order = np.argsort(-fused.det_score)
    np.testing.assert_allclose(fused.det_score[order], [0.9, 0.8, 0.125], rtol=1e-6)
    np.testing.assert_allclose(fused.centers[order[:2], 0], [11.5, 15.5])


def test_fuse_detections_votes_the_class_with_its_probabilities():
    parts = [_part([_blob(5, 5)], [0.9], labels=[1], class_prob=[0.5]),
             _part([_blob(5, 5)], [0.9], labels=[2], class_prob=[0.8]),
             _part([_blob(5, 5)], [0.9], labels=[1], class_prob=[0.6])]
    fused = fuse_detections(parts, (20, 20))
    assert fused.labels.tolist() == [1]  # star: 0.5 + 0.6 > galaxy: 0.8
    np.testing.assert_allclose(fused.class_prob, [1.1 / 3], rtol=1e-6)
    assert fused.class_prob[0] <= fused.det_score[0]


def test_fuse_detections_edge_cases():
    assert len(fuse_detections([Instances.empty()] * 4, (10, 10))) == 0
    with pytest.raises(ValueError, match="at least one"):
        fuse_detections([], (10, 10))
    with pytest.raises(ValueError, match=r"score_threshold must be a number in \[0, 1\], got 1.5"):
        fuse_detections([Instances.empty()], (10, 10), score_threshold=1.5)
    with pytest.raises(ValueError, match="match_iou"):
        fuse_detections([Instances.empty()], (10, 10), match_iou=-0.1)


def test_detect_tta_on_a_flip_equivariant_model_equals_one_pass():
    image = _sources_image()
    model = ThresholdModel()
    kwargs = dict(window_size=64, overlap=16)
    once = detect(image, model=model, score_threshold=0.0, **kwargs)
    calls = model.n_calls
    fused = detect_tta(image, model=model, **kwargs)
    assert model.n_calls == 5 * calls  # four more passes, the same windows each
    _assert_same(fused, once, image.shape)
    np.testing.assert_allclose(fused.det_score, 0.9, rtol=1e-6)  # every pass found every block with 0.9


def test_detect_tta_respects_the_mask_and_checks_its_arguments():
    image = _sources_image()
    mask = np.zeros(image.shape, bool)
    mask[38:54, 58:68] = True  # covers the second block
    fused = detect_tta(image, model=ThresholdModel(), mask=mask, window_size=64, overlap=16)
    assert len(fused) == 2
    assert not any(mask[int(round(y)), int(round(x))] for x, y in fused.centers)
    with pytest.raises(ValueError, match="member_threshold"):
        detect_tta(image, model=ThresholdModel(), member_threshold=2)
    with pytest.raises(ValueError, match="mask shape"):
        detect_tta(image, model=ThresholdModel(), mask=mask[1:])
    with pytest.raises(ValueError, match="2-D"):
        detect_tta(image[None], model=ThresholdModel())


def test_defaults_are_ordered():
    assert 0 < MEMBER_SCORE_THRESHOLD < TTA_SCORE_THRESHOLD < 1


def test_detect_tta_counts_crowded_windows_from_the_single_pass_threshold(monkeypatch):
    import deblend.segment

    seen = []
    real = deblend.segment.detect
    monkeypatch.setattr(deblend.segment, "detect", lambda *a, **k: seen.append(k) or real(*a, **k))
    detect_tta(_sources_image(), model=ThresholdModel(), window_size=64, overlap=16)
    assert [k["crowded_score"] for k in seen] == [CROWDED_SCORE] * 4
    assert [k["score_threshold"] for k in seen] == [MEMBER_SCORE_THRESHOLD] * 4
    seen.clear()
    detect_tta(_sources_image(), model=ThresholdModel(), window_size=64, overlap=16, crowded_score=0.3)
    assert [k["crowded_score"] for k in seen] == [0.3] * 4
