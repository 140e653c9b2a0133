"""Tests of deblend.viz: every figure function on small synthetic label maps (Agg backend, no pyplot state)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from astropy.table import QTable  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from deblend.catalog import empty_catalog, make_catalog  # noqa: E402
from deblend.viz import (  # noqa: E402
    draw_boxes,
    label_colors,
    overlay_segmentation,
    plot_blend,
    plot_catalog,
    plot_comparison,
    plot_samples,
    show_image,
)

SHAPE = (40, 50)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """The library never creates pyplot figures (no global state, nothing to close)."""
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


@pytest.fixture
def labels():
    """Two touching rectangles (a blend: labels 1 and 2) and an isolated one (3)."""
    lab = np.zeros(SHAPE, dtype=np.int32)
    lab[10:20, 5:15] = 1
    lab[10:20, 15:22] = 2
    lab[30:36, 40:46] = 3
    return lab


@pytest.fixture
def image(labels):
    rng = np.random.default_rng(0)
    return (rng.normal(0, 1, SHAPE) + 20.0 * (labels > 0)).astype(np.float32)


@pytest.fixture
def catalog(image, labels):
    cat = make_catalog(image, labels, error=np.ones(SHAPE, dtype=np.float32))
    cat["class"] = np.array(["galaxy", "galaxy", "star"])
    cat["det_score"] = np.array([0.91, 0.52, 0.99], dtype=np.float32)
    return cat


def images_of(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def blank_axes():
    return Figure().subplots()


# ------------------------------------------------------------------ colours


def test_label_colors_are_stable_and_distinct():
    few, many = label_colors(4), label_colors(300)
    assert few.shape == (5, 4) and many.shape == (301, 4)
    np.testing.assert_array_equal(few, many[:5])  # a label's colour does not depend on how many there are
    assert few[0, 3] == 0 and np.all(few[1:, 3] == 1)  # background transparent
    assert len({tuple(c) for c in np.round(many[1:50], 3)}) == 49
    assert not np.array_equal(label_colors(4, seed=1), few)
    assert label_colors(0).shape == (1, 4)


# ------------------------------------------------------------------ drawing into axes


def test_show_image_origin_lower_and_offset(image):
    im = show_image(blank_axes(), image, offset=(100, 200))
    assert isinstance(im, AxesImage)
    assert im.origin == "lower"
    # pixel (x, y) = image[y, x] is centred on (200 + x, 100 + y)
    assert im.get_extent() == pytest.approx([199.5, 249.5, 99.5, 139.5])


@pytest.mark.parametrize("stretch", ["asinh", "linear", "sqrt", "log", "zscale"])
def test_show_image_stretches(image, stretch):
    im = show_image(blank_axes(), image, stretch=stretch)
    assert im.norm.vmin < im.norm.vmax


@pytest.mark.parametrize("data", [np.full(SHAPE, 3.0), np.full(SHAPE, np.nan)], ids=["flat", "all-nan"])
def test_show_image_without_contrast(data):
    im = show_image(blank_axes(), data)
    assert im.norm.vmin < im.norm.vmax


def test_show_image_rejects_cubes(image):
    with pytest.raises(ValueError, match="must be 2-D"):
        show_image(blank_axes(), np.stack([image, image]))


def test_overlay_outlines_lie_on_each_sources_edge(labels):
    im = overlay_segmentation(blank_axes(), labels, alpha=0.8)
    rgba = np.asarray(im.get_array())
    assert im.origin == "lower" and rgba.shape == (*SHAPE, 4)
    alpha = rgba[..., 3]
    # the isolated 6x6 square: its 20 border pixels are outlined, its 4x4 interior and the sky are not
    square = alpha[30:36, 40:46]
    assert np.all(square[[0, -1], :] == pytest.approx(0.8)) and np.all(square[:, [0, -1]] == pytest.approx(0.8))
    assert np.all(square[1:-1, 1:-1] == 0)
    assert np.all(alpha[labels == 0] == 0)
    # two touching sources both show their edge, each in its own colour
    colors = label_colors(3)
    np.testing.assert_allclose(rgba[15, 14, :3], colors[1, :3])
    np.testing.assert_allclose(rgba[15, 15, :3], colors[2, :3])
    assert alpha[15, 14] > 0 and alpha[15, 15] > 0


def test_overlay_fill_thickness_and_highlight(labels):
    alpha = np.asarray(overlay_segmentation(blank_axes(), labels, fill_alpha=0.3).get_array())[..., 3]
    assert alpha[32, 42] == pytest.approx(0.3)  # interior filled
    thick = np.asarray(overlay_segmentation(blank_axes(), labels, thickness=2, alpha=1.0).get_array())[..., 3]
    assert thick[31, 42] == 1 and thick[32, 42] == 0  # two pixels wide, inwards
    hl = np.asarray(overlay_segmentation(blank_axes(), labels, alpha=0.9, highlight=[3]).get_array())[..., 3]
    assert hl[30, 40] == pytest.approx(0.9) and hl[10, 5] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="thickness"):
        overlay_segmentation(blank_axes(), labels, thickness=0)


def test_overlay_auto_thickness_grows_for_large_maps():
    big = np.zeros((2000, 2000), dtype=np.int32)
    big[500:1500, 500:1500] = 1
    ax = Figure(figsize=(4, 4), dpi=50).subplots()
    alpha = np.asarray(overlay_segmentation(ax, big, thickness=None, alpha=1.0).get_array())[..., 3]
    width = int(alpha[1000, 500:1000].sum())
    assert width > 1  # 2000 pixels shown in ~150 screen pixels: a 1-pixel outline would vanish
    assert alpha[1000, 500 + width] == 0


def test_overlay_empty_labels():
    im = overlay_segmentation(blank_axes(), np.zeros(SHAPE, dtype=np.int32))
    assert np.all(np.asarray(im.get_array())[..., 3] == 0)


def test_overlay_rejects_float_maps(image):
    with pytest.raises(ValueError, match="integer label map"):
        overlay_segmentation(blank_axes(), image)


def test_draw_boxes_positions_and_text(catalog):
    ax = blank_axes()
    patches = draw_boxes(ax, catalog)
    assert len(patches) == 3 and all(isinstance(p, Rectangle) for p in patches)
    first = patches[0]  # label 1 spans x 5..14, y 10..19 (inclusive): edges on pixel borders
    assert first.get_xy() == pytest.approx((4.5, 9.5))
    assert (first.get_width(), first.get_height()) == pytest.approx((10, 10))
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["galaxy 0.91", "galaxy 0.52", "star 0.99"]


def test_draw_boxes_subset_and_fallbacks(catalog):
    ax = blank_axes()
    assert len(draw_boxes(ax, catalog, labels=[3], score_column="det_score")) == 1
    plain = catalog.copy()
    plain.remove_columns(["class", "det_score"])
    ax = blank_axes()
    draw_boxes(ax, plain)
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3"]
    with pytest.raises(ValueError, match="bbox_xmin"):
        draw_boxes(blank_axes(), QTable({"label": [1]}))
    with pytest.raises(ValueError, match="score_column"):
        draw_boxes(blank_axes(), catalog, score_column="nope")


# ------------------------------------------------------------------ figures


def test_plot_comparison(image, labels):
    one = np.where(labels == 3, 3, 0)
    fig = plot_comparison(image, {"a": labels, "one": one, "empty": np.zeros_like(labels)}, title="t")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    assert all(im.origin == "lower" for im in images_of(fig))
    assert [ax.get_title() for ax in fig.axes] == ["image", "a (3 sources)", "one (1 source)", "empty (0 sources)"]
    with pytest.raises(ValueError, match="differs from the image shape"):
        plot_comparison(image, {"bad": labels[:10]})


def test_plot_blend_crops_to_the_group(image, labels, catalog):
    fig = plot_blend(image, labels, [1, 2], pad=3, catalog=catalog)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert all(im.origin == "lower" for im in images_of(fig))
    # union bbox of labels 1 and 2: x 5..21, y 10..19; padded by 3, in full-image pixel coordinates
    assert fig.axes[0].get_xlim() == pytest.approx((1.5, 24.5))
    assert fig.axes[0].get_ylim() == pytest.approx((6.5, 22.5))
    texts = {t.get_text() for t in fig.axes[2].texts}
    assert {"1", "2", "galaxy 0.91", "galaxy 0.52"} <= texts
    assert "star 0.99" not in texts  # only the group's boxes
    assert "1, 2" in fig._suptitle.get_text()


def test_plot_blend_clips_at_the_image_edge(image, labels):
    fig = plot_blend(image, labels, [3], pad=10)
    assert fig.axes[0].get_xlim() == pytest.approx((29.5, 49.5))
    assert fig.axes[0].get_ylim() == pytest.approx((19.5, 39.5))


def test_plot_blend_errors(image, labels):
    with pytest.raises(ValueError, match="none of group_labels"):
        plot_blend(image, labels, [7])
    with pytest.raises(ValueError, match="no source"):
        plot_blend(image, np.zeros_like(labels), [1])
    with pytest.raises(ValueError, match="at least one label"):
        plot_blend(image, labels, [])
    with pytest.raises(ValueError, match="pad"):
        plot_blend(image, labels, [1], pad=-1)


@pytest.fixture
def samples(labels):
    """Five sampled label maps of the blend: the boundary between 1 and 2 moves by a pixel or two."""
    maps = []
    for shift in (-2, -1, 0, 1, 2):
        lab = labels.copy()
        lab[10:20, 5:15 + shift] = 1
        lab[10:20, 15 + shift:22] = 2
        maps.append(lab)
    return np.stack(maps)


def test_plot_samples_axes_and_colours(image, samples):
    fig = plot_samples(image, samples)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1 + 5
    assert all(im.origin == "lower" for im in images_of(fig))
    # label 1 has the same colour in every sample
    colors = {tuple(np.round(np.asarray(ax.get_images()[1].get_array())[12, 6, :3], 6)) for ax in fig.axes[1:]}
    assert len(colors) == 1


def test_plot_samples_with_uncertainty(image, samples):
    uncertainty = (samples != samples[2]).mean(axis=0)
    fig = plot_samples(image, samples, uncertainty, n_show=3, offset=(5, 7))
    assert len(fig.axes) == 1 + 3 + 2  # image, three samples, the map and its colour bar
    unc_ax = next(ax for ax in fig.axes if ax.get_title() == "uncertainty")
    shown = unc_ax.get_images()[0]
    np.testing.assert_array_equal(np.asarray(shown.get_array()), uncertainty)
    assert shown.origin == "lower" and shown.get_extent() == pytest.approx([6.5, 56.5, 4.5, 44.5])
    assert "3 of 5 samples" in fig._suptitle.get_text()


def test_plot_samples_empty_labels(image):
    fig = plot_samples(image, np.zeros((2, *SHAPE), dtype=np.int32), np.zeros(SHAPE))
    assert len(fig.axes) == 1 + 2 + 2


def test_plot_samples_errors(image, samples):
    with pytest.raises(ValueError, match="does not match the cutout shape"):
        plot_samples(image[:10], samples)
    with pytest.raises(ValueError, match="n_samples, ny, nx"):
        plot_samples(image, samples[0])
    with pytest.raises(ValueError, match="n_samples, ny, nx"):
        plot_samples(image, samples[:0])
    with pytest.raises(ValueError, match="uncertainty shape"):
        plot_samples(image, samples, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="n_show"):
        plot_samples(image, samples, n_show=0)


def test_plot_catalog_with_classes(catalog):
    fig = plot_catalog(catalog)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    bars = fig.axes[2].patches
    assert [b.get_height() for b in bars] == [1, 2]  # star first, then galaxy
    assert fig.axes[0].get_xscale() == "log"


def test_plot_catalog_without_classes_and_with_bad_fluxes(catalog):
    cat = catalog.copy()
    cat.remove_column("class")
    cat["segment_flux"][0] = -5.0
    fig = plot_catalog(cat, zeropoint=25.0)
    assert len(fig.axes) == 2
    assert "1 with flux ≤ 0 not shown" in fig.axes[0].get_title()
    assert fig.axes[1].get_xlabel() == "magnitude"
    offsets = fig.axes[1].collections[0].get_offsets()
    assert len(offsets) == 2
    np.testing.assert_allclose(np.sort(offsets[:, 0]),
                               np.sort(25.0 - 2.5 * np.log10(np.asarray(cat["segment_flux"][1:]))))


def test_plot_catalog_empty():
    fig = plot_catalog(empty_catalog())
    assert len(fig.axes) == 2
    assert "0 sources" in fig._suptitle.get_text()
    assert [t.get_text() for t in fig.axes[0].texts] == ["no sources"]


def test_plot_catalog_without_errors(image, labels):
    fig = plot_catalog(make_catalog(image, labels))  # no error map: error columns are NaN
    assert [t.get_text() for t in fig.axes[0].texts] == ["no source with a positive flux and error"]
    assert len(fig.axes[1].collections[0].get_offsets()) == 3  # sizes and magnitudes need no errors


def test_plot_catalog_columns(catalog):
    cat = catalog.copy()
    cat["segment_flux_r"] = cat["segment_flux"]
    cat["segment_flux_err_r"] = cat["segment_flux_err"]
    assert len(plot_catalog(cat, flux_column="segment_flux_r").axes) == 3
    with pytest.raises(ValueError, match="no column 'kron_flux_g'"):
        plot_catalog(cat, flux_column="kron_flux_g")


def test_figures_save_as_png(tmp_path, image, labels, samples, catalog):
    for i, fig in enumerate([plot_comparison(image, {"a": labels}), plot_blend(image, labels, [1]),
                             plot_samples(image, samples, samples.std(axis=0)), plot_catalog(catalog)]):
        path = tmp_path / f"{i}.png"
        fig.savefig(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
