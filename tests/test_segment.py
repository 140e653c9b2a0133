"""Tests for deblend.segment: detect() over windows, seams, masks; instances_to_labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from deblend.models.mask_rcnn import _paste_masks, build_mask_rcnn, paste_mask_crops, set_test_proposals
from deblend.segment import (
    ROI_BUCKET,
    Instances,
    _bucketed,
    _centre_detections,
    crowded_limit,
    detect,
    instances_to_labels,
)
from deblend.tiling import make_windows


class ThresholdModel(nn.Module):
    """A translation-equivariant stand-in for Mask R-CNN.

    Each connected group of >= ``min_pixels`` pixels above ``threshold`` is one
    galaxy (label 2, score 0.9) whose mask is the group and box its bounding box.
    Records the batches it sees.
    """

    def __init__(self, threshold=2.0, min_pixels=4):
        super().__init__()
        self.threshold = threshold
        self.min_pixels = min_pixels
        self.batches = []

    def forward(self, images):
        assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 1
        self.batches.append(images.clone())
        out = []
        for image in images:
            data = image[0].numpy()
            groups, _ = ndimage.label(data > self.threshold)
            masks, boxes = [], []
            for k, (ys, xs) in enumerate(ndimage.find_objects(groups), start=1):
                component = groups == k
                if component.sum() >= self.min_pixels:
                    masks.append(component)
                    boxes.append([xs.start, ys.start, xs.stop, ys.stop])
            n = len(masks)
            out.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                "labels": torch.full((n,), 2, dtype=torch.int64),
                "scores": torch.full((n,), 0.9),
                "masks": torch.from_numpy(np.array(masks, dtype=np.float32).reshape(
                    n, 1, *data.shape)),
            })
        return out

    @property
    def n_calls(self):
        return len(self.batches)


def _scene(shape, sources, *, noise=1.0, seed=0):
    """asinh(S/N) image of Gaussian sources (x, y, peak S/N, sigma) on unit noise."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    snr = np.zeros(shape)
    for x0, y0, peak, sigma in sources:
        snr += peak * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
    snr += np.random.default_rng(seed).normal(0.0, noise, shape)
    return np.arcsinh(snr).astype(np.float32)


def _assert_same(a, b):
    assert len(a) == len(b)
    np.testing.assert_allclose(a.centers, b.centers, atol=1e-9)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.class_prob, b.class_prob)
    np.testing.assert_array_equal(a.det_score, b.det_score)
    for ma, mb in zip(a.masks, b.masks, strict=True):
        np.testing.assert_array_equal(ma, mb)


def _check_well_formed(instances, shape):
    n = len(instances)
    assert instances.boxes.shape == (n, 4) and instances.boxes.dtype == np.float32
    assert instances.centers.shape == (n, 2)
    assert instances.offsets.shape == (n, 2)
    assert instances.labels.shape == instances.class_prob.shape == instances.det_score.shape == (n,)
    assert set(instances.labels.tolist()) <= {1, 2}
    assert len(instances.masks) == n
    for i, crop in enumerate(instances.masks):
        assert crop.dtype == np.float16 and crop.ndim == 2 and crop.size > 0
        assert crop.min() >= 0 and crop.max() <= 1
        region = instances.mask_slices(i)
        assert region[0].start >= 0 and region[1].start >= 0
        assert region[0].stop <= shape[0] and region[1].stop <= shape[1]
    assert (instances.boxes[:, 2:] >= instances.boxes[:, :2]).all()
    assert (instances.boxes >= 0).all()
    assert (instances.boxes[:, 2] <= shape[1]).all() and (instances.boxes[:, 3] <= shape[0]).all()
    # sorted by y, then x
    order = np.lexsort((instances.centers[:, 0], instances.centers[:, 1]))
    assert np.array_equal(order, np.arange(n))


# A 200x200 image in 128-px windows overlapping by 48: starts 0 and 72 on both axes,
# cores meeting at 100 (pixel boundary 99.5); every core keeps 28 px from its window's edges.
SEAM_SHAPE = (200, 200)
SEAM_SOURCES = [
    (99.8, 99.3, 40.0, 3.0),  # straddles both seams: seen by all four windows
    (100.4, 30.0, 30.0, 2.5),  # straddles the vertical seam
    (40.0, 99.6, 30.0, 2.0),  # straddles the horizontal seam
    (160.0, 160.0, 25.0, 1.5),
    (30.0, 170.0, 20.0, 2.0),
]


def test_seam_source_found_once_with_same_mask():
    image = _scene(SEAM_SHAPE, SEAM_SOURCES)
    whole = detect(image, model=ThresholdModel(), window_size=256, overlap=48)
    stub = ThresholdModel()
    tiled = detect(image, model=stub, window_size=128, overlap=48, batch_size=4)
    assert len(make_windows(SEAM_SHAPE, size=128, overlap=48)) == 4
    assert stub.n_calls == 1
    assert len(whole) == len(SEAM_SOURCES)
    _assert_same(tiled, whole)
    _check_well_formed(tiled, SEAM_SHAPE)
    # the source on both seams: once, whole
    near = np.hypot(tiled.centers[:, 0] - 99.8, tiled.centers[:, 1] - 99.3) < 1.0
    assert near.sum() == 1
    crop = tiled.masks[int(np.flatnonzero(near)[0])]
    assert crop.sum() > 50


def test_seam_random_scenes_match_single_window():
    rng = np.random.default_rng(7)
    shape = (70, 300)
    sources = [(rng.uniform(3, shape[1] - 3), rng.uniform(3, shape[0] - 3),
                rng.uniform(15, 40), rng.uniform(0.8, 1.6)) for _ in range(25)]
    image = _scene(shape, sources, seed=3)
    whole = detect(image, model=ThresholdModel(), window_size=512, overlap=0)
    tiled = detect(image, model=ThresholdModel(), window_size=64, overlap=24)
    assert len(whole) > 10
    _assert_same(tiled, whole)
    _check_well_formed(tiled, shape)


def test_empty_sky_gives_nothing():
    image = _scene((150, 150), [], seed=1)
    stub = ThresholdModel(threshold=3.0)
    instances = detect(image, model=stub, window_size=64, overlap=16, skip_empty=False)
    assert len(instances) == 0 and isinstance(instances, Instances)
    assert stub.n_calls > 0
    labels, keep = instances_to_labels(instances, image.shape)
    assert labels.dtype == np.int32 and not labels.any() and keep.shape == (0,)


def test_masked_and_nan_regions_give_nothing_inside():
    shape = (120, 160)
    sources = [(30.0, 30.0, 40.0, 2.0), (100.0, 40.0, 40.0, 2.0), (60.0, 90.0, 40.0, 2.0),
               (130.0, 95.0, 40.0, 2.0)]
    image = _scene(shape, sources)
    mask = np.zeros(shape, bool)
    mask[20:45, 85:115] = True  # covers source 2
    image[75:105, 45:75] = np.nan  # covers source 3
    image[0, 0] = np.inf
    stub = ThresholdModel()
    instances = detect(image, model=stub, mask=mask, window_size=64, overlap=16)
    seen = torch.cat(stub.batches)
    assert torch.isfinite(seen).all()
    bad = mask | ~np.isfinite(image)
    ix = np.floor(instances.centers + 0.5).astype(int)
    assert not bad[ix[:, 1], ix[:, 0]].any()
    found = {(round(x), round(y)) for x, y in instances.centers}
    assert found == {(30, 30), (130, 95)}


def test_detection_centred_on_masked_pixel_is_dropped():
    class Fixed(nn.Module):
        """Always one detection: a square at rows/columns 10-19 of the window."""

        def forward(self, images):
            masks = torch.zeros(len(images), 1, 1, *images.shape[-2:])
            masks[..., 10:20, 10:20] = 1.0
            return [{"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]),
                     "labels": torch.tensor([1]), "scores": torch.tensor([0.8]), "masks": m}
                    for m in masks]

    image = np.zeros((64, 64), np.float32)
    found = detect(image, model=Fixed(), window_size=64, overlap=16, skip_empty=False)
    assert len(found) == 1 and tuple(found.centers[0]) == (14.5, 14.5)
    assert list(found.class_names) == ["star"]
    mask = np.zeros(image.shape, bool)
    mask[15, 15] = True  # the pixel holding the centre (x = y = 14.5 round up)
    assert len(detect(image, model=Fixed(), mask=mask, window_size=64, overlap=16,
                      skip_empty=False)) == 0


def test_partly_masked_source_is_kept_when_its_centre_is_not():
    shape = (64, 64)
    image = _scene(shape, [(32.0, 32.0, 40.0, 3.0)])
    mask = np.zeros(shape, bool)
    mask[:, 34:] = True
    instances = detect(image, model=ThresholdModel(), mask=mask, window_size=64, overlap=16)
    assert len(instances) == 1
    assert instances.centers[0, 0] < 33.5


@pytest.mark.parametrize("shape", [(40, 50), (70, 300), (1, 1), (3, 200)])
def test_small_and_odd_shapes(shape):
    sources = [(shape[1] / 2, shape[0] / 2, 30.0, 1.2)]
    image = _scene(shape, sources)
    instances = detect(image, model=ThresholdModel(min_pixels=1), window_size=64, overlap=16)
    _check_well_formed(instances, shape)
    labels, keep = instances_to_labels(instances, shape)
    assert labels.shape == shape
    if shape[0] >= 40:
        assert len(instances) == 1 and len(keep) == 1


def test_batch_size_does_not_change_results():
    image = _scene(SEAM_SHAPE, SEAM_SOURCES)
    stub1, stub4 = ThresholdModel(), ThresholdModel()
    one = detect(image, model=stub1, window_size=64, overlap=16, batch_size=1)
    four = detect(image, model=stub4, window_size=64, overlap=16, batch_size=4)
    n_windows = len(make_windows(SEAM_SHAPE, size=64, overlap=16))
    assert [len(b) for b in stub1.batches] == [1] * stub1.n_calls
    assert max(len(b) for b in stub4.batches) == 4
    assert sum(len(b) for b in stub1.batches) == sum(len(b) for b in stub4.batches) <= n_windows
    _assert_same(one, four)


def test_skip_empty_skips_windows():
    shape = (64, 640)
    image = np.zeros(shape, np.float32)  # blank (e.g. masked) apart from one source
    image[:, :100] = _scene((64, 100), [(40.0, 30.0, 40.0, 2.0)])
    n_windows = len(make_windows(shape, size=64, overlap=16))
    skipping, running = ThresholdModel(), ThresholdModel()
    skipped = detect(image, model=skipping, window_size=64, overlap=16, batch_size=1)
    full = detect(image, model=running, window_size=64, overlap=16, batch_size=1,
                  skip_empty=False)
    assert running.n_calls == n_windows == 13
    assert 1 <= skipping.n_calls <= 3
    assert len(full) == 1
    _assert_same(skipped, full)


def test_score_threshold_and_det_scores():
    class Scored(ThresholdModel):
        def forward(self, images):
            out = super().forward(images)
            for result in out:
                n = len(result["scores"])
                result["scores"] = torch.full((n,), 0.4)
                result["det_scores"] = torch.full((n,), 0.7)
            return out

    image = _scene((64, 64), [(20.0, 20.0, 40.0, 2.0), (45.0, 40.0, 40.0, 2.0)])
    instances = detect(image, model=Scored(), window_size=64, overlap=16)
    assert len(instances) == 2
    np.testing.assert_allclose(instances.class_prob, 0.4)
    np.testing.assert_allclose(instances.det_score, 0.7)
    assert list(instances.class_names) == ["galaxy", "galaxy"]
    assert len(detect(image, model=Scored(), window_size=64, overlap=16,
                      score_threshold=0.8)) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_size": 0}, "window_size must be a positive integer, got 0"),
        ({"overlap": 32}, r"overlap must be an integer in \[0, window_size/2\)"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"score_threshold": 1.5}, r"score_threshold must be a number in \[0, 1\], got 1.5"),
        ({"mask": np.zeros((3, 3), bool)}, "mask shape"),
        ({"device": "meta"}, "model is on cpu but device='meta'"),
        ({"device": "nonsense"}, "device must be e.g."),
        ({"half": True}, "half=True needs a CUDA device, got device='cpu'"),
        ({"half": 1}, "half must be True or False"),
    ],
)
def test_detect_validation(kwargs, match):
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    options = {"window_size": 64, "overlap": 16}
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        detect(np.zeros((32, 32), np.float32), model=model, **options)
    with pytest.raises(ValueError, match="2-D image"):
        detect(np.zeros((2, 32, 32), np.float32), model=model)


def _instances(masks, offsets, det_score):
    n = len(masks)
    centers = []
    for (y0, x0), m in zip(offsets, masks, strict=True):
        yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
        centers.append(((m * xx).sum() / m.sum() + x0, (m * yy).sum() / m.sum() + y0))
    return Instances(boxes=np.zeros((n, 4), np.float32), labels=np.full(n, 2),
                     class_prob=np.asarray(det_score, np.float32),
                     det_score=np.asarray(det_score, np.float32),
                     centers=np.array(centers), masks=[np.asarray(m, np.float16) for m in masks],
                     offsets=np.array(offsets, np.int64))


def test_instances_to_labels_resolves_overlaps():
    a = np.full((4, 4), 0.9)
    b = np.full((4, 4), 0.7)
    b[0, 0] = 0.95  # b wins where it is higher
    c = np.full((2, 2), 0.9)  # same value as a where they overlap: higher det_score (c) wins
    d = np.full((2, 2), 0.6)  # everywhere below a: no pixel left, dropped
    e = np.full((2, 2), 0.4)  # below mask_threshold: dropped
    f = np.full((3, 3), 0.8)  # on its own
    instances = _instances([a, b, c, d, e, f], [(0, 0), (2, 2), (0, 0), (1, 1), (10, 10),
                                                (7, 0)], [0.5, 0.6, 0.7, 0.9, 0.9, 0.3])
    labels, keep = instances_to_labels(instances, (12, 12))
    assert labels.dtype == np.int32
    assert keep.tolist() == [0, 1, 2, 5]
    # label i + 1 <-> instance keep[i]
    expected = np.zeros((12, 12), np.int32)
    expected[0:4, 0:4] = 1
    expected[2:6, 2:6] = 2
    expected[2:4, 2:4] = 1  # a (0.9) beats b (0.7)
    expected[2, 2] = 2  # b's 0.95
    expected[0:2, 0:2] = 3  # c ties a at 0.9, higher score
    expected[7:10, 0:3] = 4
    np.testing.assert_array_equal(labels, expected)
    # consecutive
    assert set(np.unique(labels)) == set(range(len(keep) + 1))
    # a mask leaves pixels at 0; an instance wholly masked is dropped
    mask = np.zeros((12, 12), bool)
    mask[7:10, 0:3] = True
    mask[5, 5] = True
    labels, keep = instances_to_labels(instances, (12, 12), mask=mask)
    assert keep.tolist() == [0, 1, 2] and labels[5, 5] == 0 and labels.max() == 3
    with pytest.raises(ValueError, match="mask_threshold must be a number in"):
        instances_to_labels(instances, (12, 12), mask_threshold=0)
    with pytest.raises(ValueError, match="shape must be two positive integers"):
        instances_to_labels(instances, (12,))


def test_instances_to_labels_many_instances_is_fast():
    import time

    rng = np.random.default_rng(0)
    n = 3000
    shape = (2000, 2000)
    masks = [rng.uniform(0.3, 1.0, (s, s)) for s in rng.integers(3, 25, n)]
    offsets = [(rng.integers(0, shape[0] - m.shape[0]), rng.integers(0, shape[1] - m.shape[1]))
               for m in masks]
    instances = _instances(masks, offsets, rng.uniform(0.5, 1.0, n))
    start = time.perf_counter()
    labels, keep = instances_to_labels(instances, shape)
    assert time.perf_counter() - start < 5.0
    assert labels.max() == len(keep) and len(np.unique(labels)) == len(keep) + 1
    # every labelled pixel lies inside its instance's crop, at a value >= 0.5
    for label in rng.choice(np.arange(1, len(keep) + 1), 20, replace=False):
        i = keep[label - 1]
        inside = np.zeros(shape, bool)
        inside[instances.mask_slices(i)] = True
        assert inside[labels == label].all()


def test_instances_select_and_empty():
    empty = Instances.empty()
    assert len(empty) == 0 and empty.class_names.shape == (0,)
    instances = _instances([np.ones((2, 2)), np.ones((3, 3))], [(0, 0), (5, 5)], [0.6, 0.8])
    sub = instances.select([1])
    assert len(sub) == 1 and sub.masks[0].shape == (3, 3) and sub.det_score[0] == 0.8
    assert len(instances.select(np.array([True, False]))) == 1
    with pytest.raises(ValueError, match="one entry per instance"):
        Instances(boxes=np.zeros((2, 4)), labels=np.zeros(1), class_prob=np.zeros(1),
                  det_score=np.zeros(1), centers=np.zeros((1, 2)), masks=[np.ones((1, 1))],
                  offsets=np.zeros((1, 2), np.int64))


def _paste_reference(mask, box, shape):
    """The pasting rule of `paste_mask_crops`, written out pixel by pixel in numpy."""
    m = mask.shape[0]
    x0, y0, x1, y1 = box
    sx, sy = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    py, px = np.mgrid[: shape[0], : shape[1]].astype(float)
    u = np.clip((px - x0) * m / sx - 0.5, 0, m - 1)  # cell coordinates, outer cells extended
    v = np.clip((py - y0) * m / sy - 0.5, 0, m - 1)
    iu, iv = np.minimum(np.floor(u).astype(int), m - 2), np.minimum(np.floor(v).astype(int), m - 2)
    fu, fv = u - iu, v - iv
    value = ((1 - fv) * ((1 - fu) * mask[iv, iu] + fu * mask[iv, iu + 1])
             + fv * ((1 - fu) * mask[iv + 1, iu] + fu * mask[iv + 1, iu + 1]))
    fade_x = np.clip(1 - np.maximum(np.maximum(x0 - px, px - (x0 + sx)), 0), 0, 1)
    fade_y = np.clip(1 - np.maximum(np.maximum(y0 - py, py - (y0 + sy)), 0), 0, 1)
    return value * fade_x * fade_y


def test_paste_crops_follow_the_pasting_rule_in_every_size_group():
    """Masks pasted together (grouped by crop size) equal the rule applied to each alone."""
    torch.manual_seed(0)
    boxes = torch.tensor([[3.2, 4.1, 20.7, 15.3], [0.0, 0.0, 5.0, 5.0], [50.5, 40.2, 64.0, 48.0],
                          [-3.0, 10.0, 4.0, 70.0], [10.0, 10.0, 10.4, 10.3], [1.0, 2.0, 63.0, 47.0],
                          [30.0, 20.0, 37.5, 26.0], [70.0, 5.0, 80.0, 9.0]])  # the last misses the window
    probs = torch.rand(len(boxes), 1, 28, 28)
    shape = (48, 64)
    crops = paste_mask_crops(probs, boxes, shape)
    assert len({max(c.shape) // 8 for c, _, _ in crops}) >= 3  # several size groups were used
    full = _paste_masks(probs, boxes, shape)[:, 0].numpy()
    for i, (crop, y0, x0) in enumerate(crops):
        expected = _paste_reference(probs[i, 0].double().numpy(), boxes[i].tolist(), shape)
        np.testing.assert_allclose(full[i], expected, atol=1e-5)
        h, w = crop.shape
        outside = expected.copy()
        outside[y0 : y0 + h, x0 : x0 + w] = 0
        assert not outside.any()  # the crop holds every pixel the mask reaches
    assert crops[-1][0].numel() == 0
    # a group in which every box misses the window
    (alone,) = paste_mask_crops(probs[-1:], boxes[-1:], shape)
    assert alone[0].numel() == 0 and alone[2] == shape[1]
    assert paste_mask_crops(probs[:0], boxes[:0], shape) == []


def test_real_mask_rcnn_end_to_end():
    torch.manual_seed(0)
    model = build_mask_rcnn(seed=0)  # untrained, in training mode
    shape = (96, 96)
    image = _scene(shape, [(30.0, 40.0, 30.0, 2.0), (70.0, 60.0, 20.0, 3.0)], seed=5)
    instances = detect(image, model=model, window_size=64, overlap=16, batch_size=4,
                       skip_empty=False)
    assert model.training  # mode restored
    _check_well_formed(instances, shape)
    # one detection per proposal: the most probable class; det_score = P(star) + P(galaxy)
    assert (instances.det_score >= 0.5).all()
    assert (instances.det_score + 1e-6 >= instances.class_prob).all()
    assert (instances.class_prob + 1e-6 >= instances.det_score / 2).all()
    assert set(instances.class_names) <= {"star", "galaxy"}
    # each kept centre is owned by exactly one window
    windows = make_windows(shape, size=64, overlap=16)
    owners = np.sum([w.owns(instances.centers[:, 0], instances.centers[:, 1])
                     for w in windows], axis=0)
    assert (owners == 1).all()
    labels, keep = instances_to_labels(instances, shape)
    assert labels.dtype == np.int32 and labels.shape == shape
    assert labels.max() == len(keep)
    assert set(np.unique(labels)) == set(range(len(keep) + 1))
    assert np.all(np.diff(keep) > 0) and (keep < len(instances)).all()
    for label in range(1, len(keep) + 1):
        inside = np.zeros(shape, bool)
        inside[instances.mask_slices(keep[label - 1])] = True
        assert inside[labels == label].all()
    # nothing above the threshold: the mask head is skipped, the result is empty
    none = detect(image, model=model, window_size=64, overlap=16, score_threshold=1.0,
                  skip_empty=False)
    assert len(none) == 0


def test_suppress_duplicates_drops_a_second_detection_of_one_source():
    from deblend.segment import suppress_duplicates

    blob = np.zeros((10, 10), np.float32)
    blob[2:8, 2:8] = 0.9
    twin = blob.copy()
    twin[2:8, 7:9] = 0.9  # same source, slightly wider box
    companion = np.zeros((10, 10), np.float32)
    companion[2:8, 8:10] = 0.9  # a neighbour touching it
    inst = _instances([blob, twin, companion], [(0, 0), (0, 0), (0, 0)], [0.9, 0.8, 0.7])
    kept = suppress_duplicates(inst, (10, 10), max_overlap=0.5)
    assert len(kept) == 2 and np.allclose(kept.det_score, [0.9, 0.7])
    # max_overlap=1 keeps everything; invalid values are refused
    assert len(suppress_duplicates(inst, (10, 10), max_overlap=1.0)) == 3
    with pytest.raises(ValueError, match="max_overlap"):
        suppress_duplicates(inst, (10, 10), max_overlap=0.0)


def _wing_and_companion(companion_score):
    """A bright source's wide mask (det_score 0.95) and a faint source inside it, 5 px from its centre."""
    wing = np.zeros((20, 20), np.float32)
    wing[2:18, 2:18] = 0.9  # centre (9.5, 9.5)
    companion = np.zeros((20, 20), np.float32)
    companion[8:12, 13:17] = 0.9  # centre (14.5, 9.5): 5 px away, wholly on the wing's mask
    duplicate = np.zeros((20, 20), np.float32)
    duplicate[3:17, 3:17] = 0.9  # centre (9.5, 9.5): the bright source again
    return _instances([wing, companion, duplicate], [(0, 0)] * 3, [0.95, companion_score, 0.9])


def test_suppress_duplicates_keeps_a_far_confident_companion_only():
    from deblend.segment import suppress_duplicates

    inst = _wing_and_companion(0.85)
    # off by default: the companion lies wholly on the wing's pixels, so it goes
    assert np.allclose(suppress_duplicates(inst, (20, 20)).det_score, [0.95])
    # kept when 5 px >= companion_distance and its score >= companion_score; the duplicate never is
    kept = suppress_duplicates(inst, (20, 20), companion_distance=3.0, companion_score=0.8)
    assert np.allclose(kept.det_score, [0.95, 0.85])
    assert len(suppress_duplicates(inst, (20, 20), companion_distance=5.5, companion_score=0.8)) == 1
    assert len(suppress_duplicates(inst, (20, 20), companion_distance=3.0, companion_score=0.9)) == 1
    assert len(suppress_duplicates(_wing_and_companion(0.79), (20, 20), companion_distance=3.0,
                                   companion_score=0.8)) == 1
    # the companion then owns the pixels where its soft mask is the higher one
    brighter = _wing_and_companion(0.85)
    brighter.masks[1][8:12, 13:17] = 0.95
    labels, keep = instances_to_labels(suppress_duplicates(brighter, (20, 20), companion_distance=3.0), (20, 20))
    assert labels.max() == 2 and (labels[8:12, 13:17] == 2).all()


def test_companion_needs_a_bump_of_its_own_in_the_image_when_given():
    from deblend.segment import local_contrast, suppress_duplicates

    yy, xx = np.mgrid[0:20, 0:20]
    wing = np.exp(-((xx - 9.5) ** 2 + (yy - 9.5) ** 2) / 40.0) * 5  # the bright source, smooth
    noise = np.random.default_rng(3).normal(0, 0.05, (20, 20))
    bump = 1.5 * np.exp(-((xx - 14.5) ** 2 + (yy - 9.5) ** 2) / 2.0)  # a companion where the instance says
    inst = _wing_and_companion(0.85)
    assert local_contrast(wing + noise + bump)[9:11, 14:16].max() >= 2.0
    kept = suppress_duplicates(inst, (20, 20), companion_distance=3.0, image=wing + noise + bump)
    assert np.allclose(kept.det_score, [0.95, 0.85])
    # on the smooth wing alone the same instance is a duplicate
    assert local_contrast(wing + noise)[9:11, 14:16].max() < 2.0
    assert len(suppress_duplicates(inst, (20, 20), companion_distance=3.0, image=wing + noise)) == 1
    with pytest.raises(ValueError, match="shape"):
        suppress_duplicates(inst, (20, 20), companion_distance=3.0, image=wing[:10])


def test_local_contrast_ignores_gradients_and_is_in_robust_sigma():
    from deblend.segment import local_contrast

    noise = np.random.default_rng(0).normal(0, 7.0, (200, 200))
    out = local_contrast(noise)
    assert out.dtype == np.float32 and out.shape == noise.shape
    assert 1.4826 * np.median(np.abs(out - np.median(out))) == pytest.approx(1.0, abs=1e-6)
    yy, xx = np.mgrid[0:200, 0:200]
    ramp = local_contrast(noise + 0.5 * xx + 0.2 * yy + 3)  # a sky gradient adds no bumps
    np.testing.assert_allclose(ramp[3:-3, 3:-3], out[3:-3, 3:-3], rtol=2e-3, atol=1e-3)
    noise[5, 5] = np.nan  # non-finite pixels count as 0
    assert np.isfinite(local_contrast(noise)).all()
    noise[:, :80] = np.nan  # and the robust sigma is over the finite ones only
    out = local_contrast(noise)[:, 80:]
    assert 1.4826 * np.median(np.abs(out - np.median(out))) == pytest.approx(1.0, abs=1e-6)
    assert (local_contrast(np.zeros((8, 8))) == 0).all()
    with pytest.raises(ValueError, match="2-D"):
        local_contrast(np.zeros((2, 8, 8)))


@pytest.mark.parametrize("sample_pixels", [1_000_000, 3000])  # the whole image; slabs of rows
def test_contrast_at_a_few_pixels_equals_the_full_map(monkeypatch, sample_pixels):
    from deblend import segment

    monkeypatch.setattr(segment, "CONTRAST_SAMPLE_PIXELS", sample_pixels)
    image = np.random.default_rng(2).normal(0, 1, (300, 120))
    image[40:60, :30] = np.nan
    full = segment.local_contrast(image)
    lazy = segment._LazyContrast(image)
    for x, y in [(0, 0), (119, 299), (5, 50), (60, 150), (119, 0), (-1, 5), (120, 5)]:
        near = full[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
        expected = near.max() if near.size else -np.inf
        assert lazy.near_max(x, y) == pytest.approx(expected, abs=1e-5)
    assert lazy.near_max(500, 500) == -np.inf  # off the image: no bump
    # slabs of rows: the robust sigma is still about the whole image's
    values = full[np.isfinite(image)]
    assert 1.4826 * np.median(np.abs(values - np.median(values))) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(("distance", "score", "match"), [
    (-1.0, 0.8, "companion_distance"), (np.inf, 0.8, "companion_distance"), (True, 0.8, "companion_distance"),
    ("3", 0.8, "companion_distance"), (3.0, 1.5, "companion_score"), (3.0, None, "companion_score")])
def test_suppress_duplicates_refuses_bad_companion_options(distance, score, match):
    from deblend.segment import suppress_duplicates

    with pytest.raises(ValueError, match=match):
        suppress_duplicates(_wing_and_companion(0.85), (20, 20), companion_distance=distance, companion_score=score)


def test_bucketed_heads_see_padded_batches_and_give_unpadded_results():
    """Box and mask heads run on region counts rounded up to ROI_BUCKET; the padding never shows."""
    torch.manual_seed(0)
    seen = []
    linear = nn.Linear(5, 3)

    def head(x):
        seen.append(x.shape[0])
        return linear(x)

    for n in (1, ROI_BUCKET - 1, ROI_BUCKET, ROI_BUCKET + 1, 3 * ROI_BUCKET + 5):
        rois = torch.randn(n, 5)
        out = _bucketed(head, rois)
        assert out.shape == (n, 3)
        torch.testing.assert_close(out, linear(rois))
    assert all(size % ROI_BUCKET == 0 for size in seen)
    pair = _bucketed(lambda x: (x[:, :2], x[:, 2:]), torch.randn(7, 5))  # heads giving tuples
    assert [t.shape for t in pair] == [(7, 2), (7, 3)]


def test_mask_rcnn_heads_only_see_bucketed_region_counts():
    model = build_mask_rcnn(seed=0).eval()
    sizes = []
    for head in (model.roi_heads.box_head, model.roi_heads.mask_head):
        head.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    image = _scene((96, 96), [(30.0, 40.0, 30.0, 2.0), (70.0, 60.0, 20.0, 3.0)], seed=5)
    found = detect(image, model=model, window_size=64, overlap=16, score_threshold=0.0, skip_empty=False)
    assert len(found) > 0 and len(sizes) >= 2
    assert all(size % ROI_BUCKET == 0 for size in sizes), sizes


def test_masks_are_not_computed_for_detections_no_core_can_own(monkeypatch):
    """Detections that lie outside their window's core skip the mask head; the result is unchanged."""
    import deblend.segment

    model = build_mask_rcnn(seed=0).eval()
    sources = [(float(x), float(y), 25.0, 2.5) for x, y in [(20, 30), (62, 70), (100, 40), (140, 120), (60, 150)]]
    image = _scene((176, 176), sources, seed=3)
    kwargs = {"model": model, "window_size": 64, "overlap": 24, "score_threshold": 0.0, "skip_empty": False}
    masked = []
    model.roi_heads.mask_head.register_forward_pre_hook(lambda m, args: masked.append(args[0].shape[0]))
    trimmed = detect(image, **kwargs)
    n_trimmed = sum(masked)
    masked.clear()
    monkeypatch.setattr(deblend.segment, "_may_be_owned", lambda boxes, core: torch.ones(len(boxes), dtype=bool))
    full = detect(image, **kwargs)
    assert sum(masked) > n_trimmed  # fewer masks computed ...
    assert len(trimmed) == len(full) > 0  # ... for the same instances
    # Equal up to float rounding: matrix products round differently for different numbers of rows.
    np.testing.assert_array_equal(trimmed.labels, full.labels)
    for name in ("boxes", "class_prob", "det_score", "centers"):
        np.testing.assert_allclose(getattr(trimmed, name), getattr(full, name), rtol=1e-6, atol=1e-6)
    for a, b in zip(trimmed.masks, full.masks, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def _window_sizes(model):
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen


def test_crowded_window_is_run_again_as_smaller_windows():
    """A window that uses up its proposals is re-run as half-size windows over its core."""
    model = build_mask_rcnn(seed=0).eval()
    set_test_proposals(model, 60, 12)  # an untrained model at threshold 0 fills any budget
    assert crowded_limit(model) == 6
    sources = [(float(x), float(y), 25.0, 2.5) for x, y in [(40, 50), (120, 90), (200, 160), (90, 200)]]
    image = _scene((240, 256), sources, seed=4)
    kwargs = {"model": model, "overlap": 48, "score_threshold": 0.0, "skip_empty": False}
    seen = _window_sizes(model)
    split = detect(image, window_size=256, **kwargs)
    assert seen[0] == (256, 256) and set(seen[1:]) == {(128, 128)}  # one window, then its pieces
    # One window covers the image, so its pieces are the 128-pixel tiling: the same instances.
    _assert_same(split, detect(image, window_size=128, split_crowded=False, **kwargs))
    _check_well_formed(split, image.shape)
    seen.clear()
    whole = detect(image, window_size=256, split_crowded=False, **kwargs)
    assert set(seen) == {(256, 256)}
    assert len(whole) <= 12 < len(split)  # the one window's budget caps it; the pieces each have theirs


def test_crowded_score_sets_which_detections_count_for_the_crowded_test():
    """Detections kept down to a low score need not make a window crowded (as test-time augmentation keeps them)."""
    model = build_mask_rcnn(seed=0).eval()
    set_test_proposals(model, 60, 12)
    image = _scene((240, 256), [(60.0, 60.0, 25.0, 2.5)], seed=4)
    kwargs = {"model": model, "window_size": 256, "overlap": 48, "score_threshold": 0.0, "skip_empty": False}
    seen = _window_sizes(model)
    counted_from_zero = detect(image, crowded_score=0.0, **kwargs)
    assert set(seen[1:]) == {(128, 128)}  # as by default: every kept detection counts, the window is split
    _assert_same(counted_from_zero, detect(image, **kwargs))
    seen.clear()
    none_count = detect(image, crowded_score=1.0, **kwargs)  # an untrained model scores below 1
    assert set(seen) == {(256, 256)}
    _assert_same(none_count, detect(image, split_crowded=False, **kwargs))  # kept detections are unchanged
    with pytest.raises(ValueError, match=r"crowded_score must be None or a number in \[0, 1\], got 2"):
        detect(image, crowded_score=2, **kwargs)


def test_uncrowded_and_small_windows_are_not_split():
    model = build_mask_rcnn(seed=0).eval()
    image = _scene((240, 256), [(60.0, 60.0, 25.0, 2.5)], seed=4)
    seen = _window_sizes(model)
    detect(image, model=model, window_size=256, overlap=48, score_threshold=0.9, skip_empty=False)
    assert set(seen) == {(256, 256)}  # few detections: not crowded
    set_test_proposals(model, 60, 12)
    n_images = []
    model.backbone.register_forward_pre_hook(lambda m, args: n_images.append(args[0].shape[0]))
    detect(image, model=model, window_size=96, overlap=16, score_threshold=0.0, skip_empty=False)
    # crowded, but 48-pixel pieces would be too small: each window is run once
    assert sum(n_images) == len(make_windows(image.shape, size=96, overlap=16))


def test_mask_rcnn_in_float16_keeps_boxes_scores_and_masks_in_float32():
    """Under float16 autocast (as --half on a GPU) the heads run in float16, the geometry in float32.

    Run here with CPU autocast, which exercises the same code path (slowly), with the shipped
    weights on a corner of the sample tile: the same confident sources come out (those near the
    threshold may flip), boxes a fraction of a pixel from float32's (a tenth at the median),
    masks equal up to rounding.
    """
    from deblend.io import read_image
    from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn
    from deblend.preprocess import prepare
    from deblend.segment import _mask_rcnn_forward

    model = load_mask_rcnn(DEFAULT_MASK_RCNN)
    image = prepare(read_image("data/sample_0000.fits")).normalized()[:96, :96]
    x = torch.from_numpy(np.nan_to_num(image).astype(np.float32))[None, None]
    with torch.inference_mode():
        full = _mask_rcnn_forward(model, x, 0.5)[0]
        with torch.autocast("cpu", dtype=torch.float16):
            half = _mask_rcnn_forward(model, x, 0.5)[0]
    assert len(full.boxes) >= 5
    assert half.boxes.dtype == np.float32 and half.det_score.dtype == np.float32
    assert all(c.dtype == np.float32 for c, _, _ in half.crops)
    gap = np.abs(full.boxes[:, None, :] - half.boxes[None]).max(axis=2)  # box to box, pixels
    confident = full.det_score > 0.6  # not at the threshold, where rounding may flip a detection
    assert (gap.min(axis=1)[confident] < 1.0).all() and np.median(gap.min(axis=1)[confident]) < 0.1
    # rounding may flip detections at the 0.5 threshold, never confident ones
    assert abs(int(confident.sum()) - int((half.det_score > 0.6).sum())) <= 1
    assert abs(len(full.boxes) - len(half.boxes)) <= max(1, int((~confident).sum()))
    for i in np.flatnonzero(confident & (gap.min(axis=1) < 0.1)):  # masks over (nearly) the same box
        a, b = full.crops[i][0], half.crops[gap[i].argmin()][0]
        if a.shape == b.shape:
            assert np.abs(a - b).max() < 0.1  # float16 logits: soft values within 0.1


def _candidates_for_centres():
    """One image: two box-head candidates (kept, the first centred at (10, 10)) and two centres' proposals."""
    boxes = torch.tensor([
        [7.0, 7.0, 13.0, 13.0],    # 0: kept box-head detection, centre (10, 10)
        [30.0, 30.0, 36.0, 36.0],  # 1: kept, centre (33, 33), far from every centre
        [18.0, 18.0, 24.0, 24.0],  # 2: centre A's 6-px proposal, refined in place, centre (21, 21)
        [9.0, 9.0, 12.0, 12.0],    # 3: centre B's 6-px proposal, centre (10.5, 10.5)
        [17.0, 17.0, 25.0, 25.0],  # 4: centre A's 12-px proposal, refined
        [5.0, 5.0, 17.0, 17.0],    # 5: centre B's 12-px proposal
    ])
    labels = torch.tensor([2, 1, 1, 2, 2, 2])
    class_prob = torch.tensor([0.9, 0.5, 0.35, 0.3, 0.2, 0.3])
    det_score = torch.tensor([0.95, 0.6, 0.4, 0.3, 0.25, 0.3])
    proposals = torch.tensor([[18.0, 18.0, 24.0, 24.0], [7.5, 7.5, 13.5, 13.5],
                              [15.0, 15.0, 27.0, 27.0], [4.5, 4.5, 16.5, 16.5]])
    return ([(boxes, labels, class_prob, det_score)], [torch.tensor([0, 1])],
            [(proposals, torch.tensor([0.9, 0.7]))])


def test_centres_decide_and_take_the_box_heads_detection_of_their_source():
    candidates, kept, centres = _candidates_for_centres()
    ((boxes, labels, class_prob, det_score),) = _centre_detections(candidates, kept, centres, [2], threshold=0.5)
    # centre A (0.9) has no box-head detection near it: its better-scored proposal (index 2);
    # centre B (0.7) takes the kept detection 0, 0.7 px away; detection 1 has no centre and is dropped
    assert boxes.tolist() == [[18.0, 18.0, 24.0, 24.0], [7.0, 7.0, 13.0, 13.0]]
    assert labels.tolist() == [1, 2] and class_prob.tolist() == pytest.approx([0.35, 0.9])
    assert det_score.tolist() == pytest.approx([0.9, 0.7])  # the heatmap values
    ((boxes, *_),) = _centre_detections(candidates, kept, centres, [2], threshold=0.8)
    assert len(boxes) == 1
    ((boxes, *_),) = _centre_detections(candidates, kept, centres, [2], threshold=0.95)
    assert len(boxes) == 0


def test_centre_detection_uses_the_proposal_when_the_refined_box_moved_to_a_neighbour():
    candidates, kept, centres = _candidates_for_centres()
    boxes = candidates[0][0].clone()
    boxes[2] = torch.tensor([26.0, 26.0, 32.0, 32.0])  # refined onto something 8 px away
    candidates = [(boxes, *candidates[0][1:])]
    ((out, *_),) = _centre_detections(candidates, kept, centres, [2], threshold=0.5)
    assert out[0].tolist() == [18.0, 18.0, 24.0, 24.0]


def test_two_centres_do_not_share_one_box_head_detection():
    candidates, kept, _ = _candidates_for_centres()
    proposals = torch.tensor([[7.0, 7.0, 13.0, 13.0], [8.0, 7.0, 14.0, 13.0],
                              [4.0, 4.0, 16.0, 16.0], [5.0, 4.0, 17.0, 16.0]])  # centres 1 px apart, on box 0
    ((boxes, *_),) = _centre_detections(candidates, kept, [(proposals, torch.tensor([0.9, 0.8]))], [2],
                                        threshold=0.5)
    assert len(boxes) == 2 and boxes[0].tolist() == [7.0, 7.0, 13.0, 13.0]  # the higher centre gets it


class _FixedCentres(nn.Module):
    """A centre detector whose heatmap has confident maxima at (x, y) = (20, 20) and (45, 30)."""

    def forward(self, x):
        logits = torch.full_like(x, -6.0)
        logits[..., 20, 20] = logits[..., 30, 45] = 6.0
        return logits


def test_detect_with_centres_deciding():
    from deblend.models.centre_net import CentreNet
    from deblend.models.mask_rcnn import attach_centre_net

    torch.manual_seed(0)
    shape = (64, 64)
    image = _scene(shape, [(30.0, 40.0, 30.0, 2.0)], seed=5)
    model = attach_centre_net(build_mask_rcnn(seed=0), CentreNet(channels=(4, 8)), proposals=20, threshold=0.5)
    model.centre_net = _FixedCentres()
    kwargs = {"model": model, "window_size": 64, "overlap": 16, "skip_empty": False}
    box_head = detect(image, **kwargs)
    assert len(box_head) > 2  # the untrained box head decides: detections everywhere
    model.deblend_config["centre_detect"] = True
    found = detect(image, **kwargs)
    _check_well_formed(found, shape)
    assert len(found) == 2 and (found.det_score > 0.99).all()
    overridden = detect(image, centre_detect=False, **kwargs)  # the box head decides, as the coarse pass asks
    np.testing.assert_array_equal(overridden.boxes, box_head.boxes)
    np.testing.assert_array_equal(overridden.det_score, box_head.det_score)
    boxes = np.sort(0.5 * (found.boxes[:, :2] + found.boxes[:, 2:]), axis=0)
    np.testing.assert_allclose(boxes, [[20.5, 20.5], [45.5, 30.5]], atol=2.0)
