"""Tests for deblend.tiling: windows, cores, batching, the empty-window test."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deblend.tiling import Window, has_signal, iter_batches, make_windows, split_window


def _core_counts(shape, windows):
    counts = np.zeros(shape, dtype=np.int32)
    for w in windows:
        counts[w.core_slices] += 1
    return counts


def _check_windows(shape, size, overlap):
    ny, nx = shape
    windows = make_windows(shape, size=size, overlap=overlap)
    assert windows
    # every pixel in exactly one core
    assert (_core_counts(shape, windows) == 1).all()
    expected = (min(size, ny), min(size, nx))
    image = np.arange(ny * nx).reshape(shape)
    for w in windows:
        assert isinstance(w, Window)
        assert 0 <= w.y0 < w.y1 <= ny and 0 <= w.x0 < w.x1 <= nx
        assert w.shape == expected  # shifted back, never shrunk
        assert w.y0 <= w.cy0 < w.cy1 <= w.y1 and w.x0 <= w.cx0 < w.cx1 <= w.x1
        # the core keeps overlap // 2 pixels from every window edge that is not an image edge
        margin = overlap // 2
        assert w.cy0 == 0 or w.cy0 - w.y0 >= margin
        assert w.cx0 == 0 or w.cx0 - w.x0 >= margin
        assert w.cy1 == ny or w.y1 - w.cy1 >= margin
        assert w.cx1 == nx or w.x1 - w.cx1 >= margin
        # core_in_window cuts the same pixels as core_slices
        assert np.array_equal(image[w.slices][w.core_in_window], image[w.core_slices])
    return windows


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (256, 256), (257, 513), (70, 300),
                                   (1000, 37), (512, 512), (10, 100_000)])
def test_cores_tile_image_exactly(shape):
    _check_windows(shape, 256, 48)


@settings(max_examples=100, deadline=None)
@given(ny=st.integers(1, 400), nx=st.integers(1, 400), size=st.integers(8, 300),
       data=st.data())
def test_cores_tile_any_shape(ny, nx, size, data):
    overlap = data.draw(st.integers(0, (size - 1) // 2))
    _check_windows((ny, nx), size, overlap)


@pytest.mark.parametrize(("size", "overlap"), [(1, 0), (2, 0), (3, 1), (5, 2)])
def test_tiny_windows(size, overlap):
    windows = _check_windows((9, 13), size, overlap)
    assert len(windows) > 1


def test_small_image_is_one_window():
    (w,) = make_windows((40, 50), size=256, overlap=48)
    assert (w.y0, w.x0, w.y1, w.x1) == (0, 0, 40, 50)
    assert (w.cy0, w.cx0, w.cy1, w.cx1) == (0, 0, 40, 50)


def test_windows_layout_and_order():
    windows = make_windows((300, 512), size=256, overlap=48)
    # y: 0 and 44 (shifted back); x: 0, 208, 256 (shifted back)
    assert [(w.y0, w.x0) for w in windows] == [(0, 0), (0, 208), (0, 256),
                                               (44, 0), (44, 208), (44, 256)]
    # cores meet at the middle of each overlap
    assert windows[0].cx1 == windows[1].cx0 == (208 + 256) // 2
    assert windows[1].cx1 == windows[2].cx0 == (256 + 464) // 2
    assert windows[0].cy1 == windows[3].cy0 == (44 + 256) // 2


def test_elongated_image():
    windows = make_windows((10, 100_000), size=256, overlap=48)
    assert len(windows) == int(np.ceil((100_000 - 256) / 208)) + 1
    assert all(w.shape == (10, 256) for w in windows)
    assert windows[-1].x1 == 100_000


def test_owns_points_exactly_once():
    shape = (300, 470)
    windows = make_windows(shape, size=128, overlap=40)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, shape[1] - 0.5, 5000)
    y = rng.uniform(-0.5, shape[0] - 0.5, 5000)
    # include the exact core boundaries
    bounds_x = np.array([w.cx0 - 0.5 for w in windows])
    bounds_y = np.array([w.cy0 - 0.5 for w in windows])
    x = np.concatenate([x, bounds_x, bounds_x])
    y = np.concatenate([y, bounds_y, np.full(bounds_y.shape, 10.0)])
    owners = np.sum([w.owns(x, y) for w in windows], axis=0)
    assert (owners == 1).all()
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    assert (np.sum([w.owns(xx, yy) for w in windows], axis=0) == 1).all()
    w = windows[0]
    assert w.owns(0.0, 0.0) is True
    assert w.owns(w.cx1 - 0.5, 0.0) is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (0, 10)}, "shape must be two positive integers"),
        ({"shape": (10,)}, "shape must be two positive integers"),
        ({"shape": (3, 4, 5)}, "shape must be two positive integers"),
        ({"shape": (10.5, 10)}, "shape must be two positive integers"),
        ({"shape": (10, 10), "size": 0}, "size must be a positive integer, got 0"),
        ({"shape": (10, 10), "size": 64.0}, "size must be a positive integer"),
        ({"shape": (10, 10), "size": 64, "overlap": 32}, r"overlap must be .*got 32"),
        ({"shape": (10, 10), "size": 64, "overlap": -1}, r"overlap must be .*got -1"),
    ],
)
def test_make_windows_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_windows(**kwargs)


def test_make_windows_accepts_numpy_ints():
    shape = np.zeros((np.int64(30), np.int32(40))).shape
    assert len(make_windows(shape, size=np.int64(16), overlap=np.int32(4))) > 1


@pytest.mark.parametrize(("shape", "size", "overlap"), [((300, 512), 256, 48), ((700, 260), 256, 48),
                                                     ((257, 999), 200, 30)])
def test_split_window_tiles_each_core_with_smaller_windows(shape, size, overlap):
    coarse = make_windows(shape, size=size, overlap=overlap)
    fine_size, fine_overlap = size // 2, min(overlap, (size // 2 - 1) // 2)
    fine_cores = {(f.y0, f.x0): f for f in make_windows(shape, size=fine_size, overlap=fine_overlap)}
    everything = []
    for w in coarse:
        pieces = split_window(w, shape, size=fine_size, overlap=fine_overlap)
        assert len(pieces) > 1
        counts = _core_counts(shape, pieces)
        inside = np.zeros(shape, bool)
        inside[w.core_slices] = True
        assert (counts[inside] == 1).all() and (counts[~inside] == 0).all()  # the core, once
        for p in pieces:
            f = fine_cores[(p.y0, p.x0)]  # a window of the finer tiling, its core cut down
            assert (p.y1, p.x1) == (f.y1, f.x1)
            assert f.cy0 <= p.cy0 < p.cy1 <= f.cy1 and f.cx0 <= p.cx0 < p.cx1 <= f.cx1
        everything += pieces
    assert (_core_counts(shape, everything) == 1).all()  # all windows split: the image, once


def test_split_window_of_a_small_image_is_the_window_itself():
    (w,) = make_windows((100, 120), size=256, overlap=48)
    assert split_window(w, (100, 120), size=128, overlap=48) == [w]


def test_iter_batches():
    assert [len(b) for b in iter_batches(range(10), 4)] == [4, 4, 2]
    assert list(iter_batches([], 3)) == []
    assert list(iter_batches("abc", 1)) == [["a"], ["b"], ["c"]]
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        list(iter_batches([1], 0))


def _gaussian(shape, x0, y0, peak, sigma):
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return peak * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def test_has_signal():
    shape = (128, 128)
    rng = np.random.default_rng(1)
    assert not has_signal(np.zeros(shape, np.float32))
    source = np.arcsinh(_gaussian(shape, 60, 70, 20.0, 2.0)).astype(np.float32)
    noisy = np.arcsinh(np.sinh(source) + rng.normal(0, 1, shape)).astype(np.float32)
    assert has_signal(source)
    assert has_signal(noisy)
    mask = np.zeros(shape, bool)
    mask[50:90, 40:80] = True
    assert not has_signal(source, mask)
    nan = source.copy()
    nan[mask] = np.nan
    assert not has_signal(nan)
    # a group smaller than min_pixels is not signal
    assert not has_signal(source, min_pixels=10_000)
    assert not has_signal(source, threshold=100.0)


def test_has_signal_skips_most_noise():
    rng = np.random.default_rng(2)
    n_kept = sum(has_signal(np.arcsinh(rng.normal(0, 1, (256, 256))).astype(np.float32))
                 for _ in range(20))
    assert n_kept <= 10


def test_has_signal_validation():
    with pytest.raises(ValueError, match="must be 2-D"):
        has_signal(np.zeros(5))
    with pytest.raises(ValueError, match="mask_window shape"):
        has_signal(np.zeros((4, 4)), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="min_pixels must be a positive integer"):
        has_signal(np.zeros((4, 4)), min_pixels=0)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        has_signal(np.zeros((4, 4)), threshold=float("nan"))
