"""Tests of DeblendResult's conveniences: cutout, HTML/text repr, plot, and the quick-look written by write()."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from deblend import Deblender, DeblendResult, Image  # noqa: E402
from deblend.result import Cutout, output_paths  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def result(scene_file):
    """SEP on the standard scene: three well separated sources."""
    res = Deblender("sep").run(scene_file)
    assert res.n_sources == 3
    return res


def bbox(labels, label):
    ys, xs = np.nonzero(labels == label)
    return ys.min(), ys.max(), xs.min(), xs.max()


# ------------------------------------------------------------------ cutout


def test_cutout_window_and_content(result):
    label = int(result.catalog["label"][0])
    y0, y1, x0, x1 = bbox(result.labels, label)
    c = result.cutout(label, pad=3)
    assert isinstance(c, Cutout) and c.label == label
    assert c.offset == (y0 - 3, x0 - 3)
    assert c.labels.shape == (y1 - y0 + 7, x1 - x0 + 7)
    assert c.data.shape == (1, *c.labels.shape) and c.image.shape == c.labels.shape
    np.testing.assert_array_equal(c.labels, result.labels[c.slices])
    np.testing.assert_array_equal(c.image, result.image.data[0][c.slices])
    assert c.source_mask.sum() == (result.labels == label).sum()  # the whole source is inside
    c.labels[:] = 0  # a copy: the result is not modified
    assert (result.labels == label).any()


def test_cutout_is_clipped_at_the_edges(result):
    label = int(result.catalog["label"][0])
    c = result.cutout(label, pad=500)
    assert c.offset == (0, 0) and c.labels.shape == result.labels.shape


def test_cutout_masked_pixels_are_nan_and_extensions_follow(scene):
    data = scene.copy()
    data[15:18, 14:17] = np.nan  # inside the first source
    res = Deblender("sep").run(Image.from_array(data))
    res.extensions["UNCERT"] = np.arange(data.size, dtype=np.float32).reshape(data.shape)
    res.extensions["OTHER"] = np.zeros((3, 3))  # not image-shaped: left out
    label = int(res.labels[12, 16])
    c = res.cutout(label, pad=2)
    assert np.isnan(c.image[c.mask]).all() and c.mask.sum() == 9
    assert set(c.extensions) == {"UNCERT"}
    np.testing.assert_array_equal(c.extensions["UNCERT"], res.extensions["UNCERT"][c.slices])


def test_cutout_multiband_image_is_the_mean(scene):
    res = Deblender("sep").run(Image.from_array(np.stack([scene, 2 * scene])))
    c = res.cutout(int(res.catalog["label"][0]))
    assert c.data.shape[0] == 2
    np.testing.assert_allclose(c.image, 1.5 * scene[c.slices], rtol=1e-6)


def test_cutout_errors(result):
    with pytest.raises(ValueError, match="label 99 is not in the label map; labels present: 1..3"):
        result.cutout(99)
    with pytest.raises(ValueError, match="label 0 is not in the label map"):
        result.cutout(0)
    with pytest.raises(ValueError, match="pad must be a non-negative integer"):
        result.cutout(1, pad=-1)
    with pytest.raises(ValueError, match="label must be an integer"):
        result.cutout("one")


# ------------------------------------------------------------------ repr


def test_repr_is_short(result):
    text = repr(result)
    assert text.startswith("DeblendResult(") and "n_sources=3" in text and "scene.fits" in text
    assert len(text) < 200


def test_repr_html(result):
    html = result._repr_html_()
    assert "scene.fits" in html and "sep" in html and "1 × 64 × 64" in html
    assert "<td style='text-align:left'>3</td>" in html
    assert "blended" not in html


def test_repr_html_counts_blended_sources(result):
    result.catalog["n_blend"] = [1, 2, 2]
    assert "<td style='text-align:left'>2 (in a blend group of 2 or more)</td>" in result._repr_html_()


def test_repr_html_escapes_the_file_name(scene):
    res = Deblender("sep").run(Image.from_array(scene))
    res.image.paths = ["<b>odd&name.fits"]
    assert "&lt;b&gt;odd&amp;name.fits" in res._repr_html_()


# ------------------------------------------------------------------ plot


def test_plot_new_figure(result):
    fig = result.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_title() == "scene.fits: 3 sources (sep)"
    images = ax.get_images()
    assert len(images) == 2 and all(im.origin == "lower" for im in images)
    outlines = np.asarray(images[1].get_array())[..., 3]
    assert (outlines[result.labels == 0] == 0).all() and (outlines > 0).any()


def test_plot_into_given_axes_with_boxes(result):
    fig = Figure()
    ax = fig.subplots(1, 2)[1]
    assert result.plot(ax=ax, boxes=True, title="t") is fig
    assert len(ax.patches) == 3 and ax.get_title() == "t"


def test_plot_band_selection(scene):
    res = Deblender("sep").run(Image.from_array(np.stack([scene, 2 * scene]), band_names=["g", "r"]))
    np.testing.assert_allclose(res.display_image("r"), 2 * scene)
    np.testing.assert_allclose(res.display_image(0), scene)
    with pytest.raises(ValueError, match="not one of the image's bands"):
        res.plot(band="z")
    with pytest.raises(ValueError, match="band index below 2"):
        res.display_image(5)


def test_plot_no_sources(make_scene):
    with pytest.warns(UserWarning, match="no sources"):
        res = Deblender("sep").run(Image.from_array(make_scene(sources=[])))
    fig = res.plot(boxes=True)
    assert fig.axes[0].get_title() == "<array>: 0 sources (sep)"


# ------------------------------------------------------------------ write(quicklook=...)


def test_output_paths_quicklook(tmp_path):
    assert set(output_paths(tmp_path, "x")) == {"segmentation", "catalog"}
    assert output_paths(tmp_path, "x", quicklook=True)["quicklook"] == tmp_path / "x_quicklook.png"


def test_write_quicklook(result, tmp_path, temp_files_under):
    paths = result.write(tmp_path, quicklook=True)
    assert paths["quicklook"] == tmp_path / "scene_quicklook.png"
    assert paths["quicklook"].read_bytes()[:8] == PNG_MAGIC
    assert paths["segmentation"].exists() and paths["catalog"].exists()
    assert temp_files_under(tmp_path) == []


def test_write_without_quicklook_writes_no_png(result, tmp_path):
    paths = result.write(tmp_path)
    assert "quicklook" not in paths and not list(tmp_path.glob("*.png"))


def test_write_quicklook_failure_keeps_the_outputs(result, tmp_path, monkeypatch, caplog, temp_files_under):
    def broken(self, *args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(DeblendResult, "plot", broken)
    with caplog.at_level(logging.WARNING, logger="deblend.result"):
        paths = result.write(tmp_path, quicklook=True)
    assert set(paths) == {"segmentation", "catalog"}
    assert paths["segmentation"].exists() and paths["catalog"].exists()
    assert not (tmp_path / "scene_quicklook.png").exists() and temp_files_under(tmp_path) == []
    assert "scene.fits" in caplog.text and "quick-look" in caplog.text and "no display" in caplog.text


def test_write_refuses_an_existing_quicklook(result, tmp_path):
    (tmp_path / "scene_quicklook.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="scene_quicklook.png"):
        result.write(tmp_path, quicklook=True)
    assert not (tmp_path / "scene_seg.fits").exists()
    result.write(tmp_path, quicklook=True, overwrite=True)
    assert (tmp_path / "scene_quicklook.png").read_bytes()[:8] == PNG_MAGIC
