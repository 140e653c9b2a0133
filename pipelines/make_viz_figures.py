"""Make docs/blend_zoom.png and docs/blend_window.png: deblend.viz figures for the README.

- blend_zoom.png: the largest blend group of the default pipeline (Mask R-CNN + blend refinement) in
  data/sample_0000.fits (`deblend.viz.plot_blend`, with each source's class and detection score);
- blend_window.png: the same window with the truth, the default pipeline's and SEP's outlines.

Usage: .venv/bin/python pipelines/make_viz_figures.py
"""

from pathlib import Path

import numpy as np

from deblend import Deblender, read_image, read_segmentation
from deblend.viz import plot_blend, plot_comparison

ROOT = Path(__file__).resolve().parents[1]
DPI = 80


def blend_figures(zoom_out, window_out):
    image = read_image(ROOT / "data" / "sample_0000.fits")
    truth, _ = read_segmentation(ROOT / "data" / "sample_0000_truth_seg.fits")
    result = Deblender().run(image)
    sep = Deblender("sep").run(image)
    blends = result.blends  # the blend groups of the refinement, most ambiguous first
    largest = blends[int(np.argmax(blends["n_blend"]))]
    group = [int(v) for v in largest["labels"].split(",")]
    fig = plot_blend(result.display_image(), result.labels, group, catalog=result.catalog, pad=8,
                     title=f"data/sample_0000.fits (simulated): blend group of labels {group}")
    fig.savefig(zoom_out, dpi=DPI)
    ys, xs = np.nonzero(np.isin(result.labels, group))
    win = np.s_[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9]
    fig = plot_comparison(result.display_image()[win],
                          {"truth": truth[win], "mask-rcnn + refinement": result.labels[win], "sep": sep.labels[win]},
                          offset=(win[0].start, win[1].start), panel_size=3.0,
                          title="the same window: truth, default pipeline and SEP")
    fig.savefig(window_out, dpi=DPI)
    print(f"wrote {zoom_out} and {window_out} (labels {group})")


def main():
    blend_figures(ROOT / "docs" / "blend_zoom.png", ROOT / "docs" / "blend_window.png")


if __name__ == "__main__":
    main()
