"""Make docs/sample_comparison.png: a bundled sample tile, its truth, and every method's segmentation.

Usage: .venv/bin/python pipelines/make_readme_figure.py
"""

from pathlib import Path

from deblend import Deblender, read_image, read_segmentation
from deblend.viz import plot_comparison

ROOT = Path(__file__).resolve().parents[1]


def main():
    image = read_image(ROOT / "data" / "sample_0000.fits")
    truth, _ = read_segmentation(ROOT / "data" / "sample_0000_truth_seg.fits")
    maps = {"truth": truth}
    for method in ("mask-rcnn", "sep", "photutils"):
        maps[method] = Deblender(method).run(image).labels
    fig = plot_comparison(image.data[0], maps, title="data/sample_0000.fits (simulated, 0.2\"/pix, PSF 0.7\")",
                          panel_size=3.6)
    out = ROOT / "docs" / "sample_comparison.png"
    fig.savefig(out, dpi=60)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
