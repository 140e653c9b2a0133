"""Make docs/blend_zoom.png and docs/blend_window.png: deblend.viz figures for the README.

- blend_zoom.png: the largest group of touching Mask R-CNN segments in data/sample_0000.fits
  (`deblend.viz.plot_blend`, with each source's class and detection score);
- blend_window.png: the same window with the truth, the Mask R-CNN and SEP outlines.

Usage: .venv/bin/python pipelines/make_viz_figures.py
"""

from pathlib import Path

import numpy as np
from scipy import ndimage

from deblend import Deblender, read_image, read_segmentation
from deblend.viz import plot_blend, plot_comparison

ROOT = Path(__file__).resolve().parents[1]
DPI = 80


def touching_groups(labels):
    """Groups of labels whose segments touch (8-connected), largest first, ties by smallest label."""
    grown = ndimage.grey_dilation(labels, size=3)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in ((labels, grown), (grown, labels)):
        sel = (a > 0) & (b > 0) & (a != b)
        for u, v in zip(a[sel].tolist(), b[sel].tolist(), strict=True):
            parent[find(u)] = find(v)
    groups = {}
    for label in parent:
        groups.setdefault(find(label), []).append(label)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def blend_figures(zoom_out, window_out):
    image = read_image(ROOT / "data" / "sample_0000.fits")
    truth, _ = read_segmentation(ROOT / "data" / "sample_0000_truth_seg.fits")
    result = Deblender().run(image)
    sep = Deblender("sep").run(image)
    group = touching_groups(result.labels)[0]
    fig = plot_blend(result.display_image(), result.labels, group, catalog=result.catalog, pad=8,
                     title=f"data/sample_0000.fits (simulated): Mask R-CNN blend of labels {group}")
    fig.savefig(zoom_out, dpi=DPI)
    ys, xs = np.nonzero(np.isin(result.labels, group))
    win = np.s_[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9]
    fig = plot_comparison(result.display_image()[win],
                          {"truth": truth[win], "mask-rcnn": result.labels[win], "sep": sep.labels[win]},
                          offset=(win[0].start, win[1].start), panel_size=3.0,
                          title="the same window: truth, Mask R-CNN and SEP")
    fig.savefig(window_out, dpi=DPI)
    print(f"wrote {zoom_out} and {window_out} (Mask R-CNN labels {group})")


def main():
    blend_figures(ROOT / "docs" / "blend_zoom.png", ROOT / "docs" / "blend_window.png")


if __name__ == "__main__":
    main()
