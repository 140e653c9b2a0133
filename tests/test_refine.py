"""Tests of deblend.refine: inputs, blend groups, joint assignment, uncertainty, flux samples."""

import numpy as np
import pytest
import torch

from deblend.models.prob_unet import build_prob_unet
from deblend.refine import (
    CUTOUT,
    find_blend_groups,
    heatmap,
    refine_blends,
    refine_input,
    source_positions,
)


class DiscModel:
    """Stand-in network: each sample claims a disc of radius ``r0 + s`` around the marked source.

    Sample ``s`` of a member uses radius ``radii[s]``, so the samples differ in a known way.
    """

    depth = 3

    def __init__(self, radii):
        self.radii = radii

    def eval(self):
        return self

    def to(self, device):
        return self

    def sample(self, x, *, n_samples, seed, noise=None, where=None):
        x = x.numpy()
        out = np.zeros((len(x), n_samples, *x.shape[2:]), np.float32)
        yy, xx = np.indices(x.shape[2:])
        for i, inp in enumerate(x):
            cy, cx = np.unravel_index(np.argmax(inp[1]), inp[1].shape)
            r = np.hypot(yy - cy, xx - cx)
            for s in range(n_samples):
                out[i, s] = np.clip(1.5 - r / self.radii[s % len(self.radii)], 0, 1)
        return torch.from_numpy(out)


def two_blobs(shape=(80, 80), sep=8):
    labels = np.zeros(shape, np.int32)
    cy, cx = shape[0] // 2, shape[1] // 2
    labels[cy - 4:cy + 4, cx - sep // 2 - 4:cx] = 1
    labels[cy - 4:cy + 4, cx:cx + sep // 2 + 4] = 2
    labels[5:9, 5:9] = 3  # isolated
    positions = np.array([[cx - sep // 2 - 1, cy], [cx + sep // 2, cy], [6.5, 6.5]])
    return labels, positions


def test_heatmap_peaks_at_positions():
    h = heatmap((20, 30), [[4, 7], [25, 12]])
    assert h.shape == (20, 30) and h.dtype == np.float32
    assert h[7, 4] == pytest.approx(1) and h[12, 25] == pytest.approx(1)
    assert heatmap((5, 5), np.zeros((0, 2))).max() == 0
    assert heatmap((5, 5), [[100, 100]]).max() == 0


def test_refine_input_channels():
    x = refine_input(np.ones((16, 16)), (3, 4), [(10, 12)])
    assert x.shape == (3, 16, 16)
    assert np.unravel_index(x[1].argmax(), (16, 16)) == (4, 3)
    assert np.unravel_index(x[2].argmax(), (16, 16)) == (12, 10)


def test_find_blend_groups_touching_and_isolated():
    labels = np.zeros((6, 8), int)
    labels[0, 0], labels[1, 1] = 1, 2  # diagonal touch
    labels[4, 4], labels[4, 5] = 3, 4
    labels[0, 7], labels[1, 6] = 5, 6  # anti-diagonal touch
    labels[3, 0] = 7
    labels[5, 5] = 4
    blend_id, n_blend = find_blend_groups(labels)
    np.testing.assert_array_equal(blend_id, [1, 1, 2, 2, 3, 3, 0])
    np.testing.assert_array_equal(n_blend, [2, 2, 2, 2, 2, 2, 1])
    chain = np.array([[1, 2, 3, 0, 4]])
    np.testing.assert_array_equal(find_blend_groups(chain)[1], [3, 3, 3, 1])
    assert find_blend_groups(np.zeros((3, 3), int))[0].size == 0


def test_source_positions_are_segment_peaks():
    image = np.zeros((20, 20), np.float32)
    image[5, 6] = 10
    image[14, 15] = 10
    labels = np.zeros((20, 20), np.int32)
    labels[2:9, 2:9] = 1
    labels[10:18, 10:18] = 2
    np.testing.assert_array_equal(source_positions(image, labels), [[6, 5], [15, 14]])


def test_source_positions_equal_scipy_maximum_position():
    """Label by label in each segment's box, as ndimage.maximum_position over the whole image.

    Interleaved, non-convex segments and a label without pixels (position (0, 0)); on a
    plateau the first pixel in C order wins (scipy's choice among equal values is its sort's).
    """
    from scipy import ndimage

    rng = np.random.default_rng(3)
    image = rng.normal(size=(40, 50)).astype(np.float32)
    labels = rng.integers(0, 6, size=(40, 50)).astype(np.int32)
    labels[labels == 4] = 0  # label 4 has no pixel
    labels[8:16, 8:16] = 2
    smoothed = ndimage.gaussian_filter(image, 1.0)
    expected = [(x, y) for y, x in ndimage.maximum_position(smoothed, labels, index=np.arange(1, 6))]
    np.testing.assert_array_equal(source_positions(image, labels), expected)
    plateau = np.zeros((10, 10), np.float32)
    plateau[3:6, 4:8] = 1.0
    np.testing.assert_array_equal(source_positions(plateau, np.ones((10, 10), np.int32), smooth=0.0), [[4, 3]])


def test_refine_joint_assignment_with_known_samples():
    labels, pos = two_blobs()
    data = np.ones((1, *labels.shape), np.float32)
    model = DiscModel(radii=[3.0, 5.0, 7.0, 9.0])
    r = refine_blends(np.zeros(labels.shape), labels, data, model=model, positions=pos, n_samples=4,
                      save_samples=True)
    assert set(np.unique(r.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(r.labels == 3, labels == 3)  # isolated source untouched
    np.testing.assert_array_equal(r.blend_id, [1, 1, 0])
    assert r.refined.tolist() == [True, True, False]
    # every pixel of a sample belongs to the member whose disc claims it most
    for s, radius in enumerate(model.radii):
        owned = r.samples[s] == 1
        ys, xs = np.nonzero(owned)
        assert np.all(np.hypot(ys - pos[0, 1], xs - pos[0, 0]) < 1.5 * radius)
        # flux = data (ones) summed over the sample's pixels of each member
        assert r.flux_samples[0, 0, s] == owned.sum()
    assert np.isnan(r.flux_samples[2]).all()
    spread = r.flux_spread()
    assert spread[0, 0] > 0 and spread[2, 0] == 0
    assert 0 <= r.uncertainty.min() and r.uncertainty.max() <= 1
    assert r.uncertainty[labels == 3].max() == 0
    assert r.uncertainty.max() > 0  # the growing discs disagree at their edges


def test_claim_threshold_sets_how_far_a_member_reaches():
    labels, pos = two_blobs()
    data = np.ones((1, *labels.shape), np.float32)
    model = DiscModel(radii=[3.0])  # claim 1.5 - r / 3: above t out to r = 3 * (1.5 - t)
    areas = {}
    for t in (0.2, 0.5, 0.8):
        r = refine_blends(np.zeros(labels.shape), labels, data, model=model, positions=pos, n_samples=2,
                          claim_threshold=t)
        ys, xs = np.nonzero(r.labels == 1)
        assert np.hypot(ys - pos[0, 1], xs - pos[0, 0]).max() < 3 * (1.5 - t)
        areas[t] = ys.size
        assert r.flux_samples[0, 0, 0] == areas[t]  # the samples use the same threshold
    assert areas[0.2] > areas[0.5] > areas[0.8]


def test_refine_never_assigns_masked_or_foreign_pixels():
    labels, pos = two_blobs()
    labels[40, 50:60] = 4  # a third source inside the group's cutout, not touching it
    pos = np.vstack([pos, [55, 40]])
    mask = np.zeros(labels.shape, bool)
    mask[30:34, :] = True
    r = refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([12.0, 14.0]),
                      positions=pos, mask=mask, n_samples=2)
    assert not r.labels[mask].any()
    assert (r.labels[40, 50:60] == 4).all()
    assert set(np.unique(r.labels)) == {0, 1, 2, 3, 4}


class EmptyModel(DiscModel):
    """Stand-in network that claims nothing."""

    def sample(self, x, *, n_samples, seed, noise=None, where=None):
        return torch.zeros((len(x), n_samples, *x.shape[2:]))


def test_source_without_pixels_keeps_its_detector_mask():
    labels, pos = two_blobs()
    r = refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=EmptyModel([1.0]),
                      positions=pos, n_samples=2)
    np.testing.assert_array_equal(r.labels, labels)


def test_refine_with_real_network_is_seeded_and_keeps_labels():
    torch.manual_seed(0)
    model = build_prob_unet(widths=(4, 8, 8, 8), head_width=8, latent_dim=2)
    labels, pos = two_blobs(shape=(70, 90))
    rng = np.random.default_rng(0)
    image = rng.normal(size=labels.shape).astype(np.float32)
    a = refine_blends(image, labels, image, model=model, n_samples=3, seed=5)
    b = refine_blends(image, labels, image, model=model, n_samples=3, seed=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.flux_samples, b.flux_samples)
    assert set(np.unique(a.labels)) == set(np.unique(labels))
    assert a.flux_samples.shape == (3, 1, 3)


def test_large_groups_are_left_alone():
    labels = np.zeros((300, 300), np.int32)
    labels[10:290, 10:150] = 1
    labels[10:290, 150:290] = 2
    r = refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([5.0]),
                      n_samples=2, max_size=CUTOUT * 2)
    np.testing.assert_array_equal(r.labels, labels)
    assert not r.refined.any()


def test_argument_checks():
    labels, _ = two_blobs()
    with pytest.raises(ValueError, match="same"):
        refine_blends(np.zeros((5, 5)), labels, np.ones(labels.shape), model=DiscModel([1.0]))
    with pytest.raises(ValueError, match="n_samples"):
        refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([1.0]), n_samples=0)
    with pytest.raises(ValueError, match="positions"):
        refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([1.0]),
                      positions=np.zeros((1, 2)))
    for bad in (1.0, -0.1, float("nan"), "half"):
        with pytest.raises(ValueError, match="claim_threshold"):
            refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([1.0]),
                          claim_threshold=bad)
    with pytest.raises(ValueError, match="half=True needs a CUDA device"):
        refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([1.0]), half=True)


class FirstClaimsAllModel(DiscModel):
    """Stand-in network: the first member claims a wide disc, the others nothing."""

    def sample(self, x, *, n_samples, seed, noise=None, where=None):
        out = torch.zeros((len(x), n_samples, *x.shape[2:]))
        out[0] = super().sample(x[:1], n_samples=n_samples, seed=seed)[0]
        return out


def test_group_that_would_lose_a_member_keeps_its_labels():
    """Regression (real KiDS image): a member left with no pixel must not vanish from the map."""
    labels, pos = two_blobs()
    r = refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=FirstClaimsAllModel([20.0]),
                      positions=pos, n_samples=2)
    np.testing.assert_array_equal(r.labels, labels)
    assert not r.refined.any() and np.all(r.flux_spread() == 0)


def test_windows_are_centred_and_grow_with_the_segment():
    from deblend.refine import _windows

    boxes = [(slice(40, 50), slice(40, 50)), (slice(0, 100), slice(45, 55))]
    (y0, x0, size), (_, _, wide) = _windows([[45, 45], [50, 50]], boxes, pad=8, multiple=8)
    assert size == CUTOUT and (y0 + size // 2, x0 + size // 2) == (45, 45)
    assert wide >= 2 * (50 + 8) and wide % 8 == 0


def test_large_member_keeps_its_far_pixels():
    """A segment reaching beyond CUTOUT / 2 from its peak gets a window that holds it."""
    labels = np.zeros((120, 120), np.int32)
    labels[10:110, 20:60] = 1  # 100 px tall
    labels[55:65, 60:70] = 2
    pos = np.array([[40, 60], [65, 60]], float)
    r = refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([80.0]),
                      positions=pos, n_samples=2)
    assert r.refined.all()
    assert (r.labels[10:110, 20:60] == 1).all()


def test_batching_does_not_change_the_result():
    torch.manual_seed(0)
    model = build_prob_unet(widths=(4, 8, 8, 8), head_width=8, latent_dim=2)
    labels, pos = two_blobs(shape=(80, 160))
    labels[40:48, 110:118], labels[40:48, 118:126] = 4, 5  # a second group
    pos = np.vstack([pos, [113, 44], [121, 44]])
    image = np.random.default_rng(1).normal(size=labels.shape).astype(np.float32)
    one = refine_blends(image, labels, image, model=model, positions=pos, n_samples=3, batch_size=1)
    many = refine_blends(image, labels, image, model=model, positions=pos, n_samples=3, batch_size=32)
    np.testing.assert_array_equal(one.labels, many.labels)
    np.testing.assert_allclose(one.flux_samples, many.flux_samples, rtol=1e-6)
    np.testing.assert_array_equal(one.blend_id, [1, 1, 0, 2, 2])


def test_unet_batches_are_padded_to_a_few_shapes_without_changing_the_result(monkeypatch):
    """U-Net calls see a few batch sizes only (bounded backend state in long runs), with the same results."""
    import deblend.refine

    torch.manual_seed(0)
    model = build_prob_unet(widths=(4, 8, 8, 8), head_width=8, latent_dim=2)
    labels, pos = two_blobs(shape=(80, 160))
    labels[40:48, 110:118], labels[40:48, 118:126], labels[60:66, 110:116] = 4, 5, 6  # a group of three
    pos = np.vstack([pos, [113, 44], [121, 44], [113, 63]])
    image = np.random.default_rng(1).normal(size=labels.shape).astype(np.float32)
    seen = []
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda x, **kw: seen.append(x.shape[0]) or sample(x, **kw))
    padded = refine_blends(image, labels, image, model=model, positions=pos, n_samples=3)
    assert seen and set(seen) <= {1, 2, 4} | set(range(8, 33, 8)), seen
    assert [deblend.refine._padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 24, 32]
    monkeypatch.setattr(deblend.refine, "BATCH_BUCKET", 1)
    plain = refine_blends(image, labels, image, model=model, positions=pos, n_samples=3)
    np.testing.assert_array_equal(padded.labels, plain.labels)
    np.testing.assert_allclose(padded.flux_samples, plain.flux_samples, rtol=1e-6)


def test_a_member_grows_at_most_pad_pixels_beyond_its_segment():
    from scipy import ndimage

    labels, pos = two_blobs()
    r = refine_blends(np.zeros(labels.shape), labels, np.ones(labels.shape), model=DiscModel([40.0]),
                      positions=pos, n_samples=2, pad=3)
    for k in (1, 2):
        reach = ndimage.maximum_filter(labels == k, size=7)
        assert (r.labels == k).any() and not ((r.labels == k) & ~reach).any()
    assert ((r.labels == 1) & ~(labels == 1)).any()  # and it does grow
