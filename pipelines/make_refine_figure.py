"""README figure: the most ambiguous blend of data/sample_0000.fits, its sampled masks and uncertainty map.

Usage (from the repository root):
    .venv/bin/python pipelines/make_refine_figure.py      # writes docs/refine_samples.png
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from deblend import Deblender, read_image  # noqa: E402
from deblend.viz import plot_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    image = read_image(ROOT / "data" / "sample_0000.fits")
    result = Deblender(save_samples=True).run(image)
    top = result.blends[0]
    members = [int(v) for v in top["labels"].split(",")]
    ys, xs = np.nonzero(np.isin(result.labels, members))
    sl = (slice(max(ys.min() - 10, 0), ys.max() + 11), slice(max(xs.min() - 10, 0), xs.max() + 11))
    fig = plot_samples(image.data[0][sl], result.extensions["SAMPLES"][(slice(None), *sl)],
                       result.extensions["UNCERTAINTY"][sl], n_show=8, offset=(sl[0].start, sl[1].start),
                       title=f"data/sample_0000.fits, blend of labels {top['labels']}: 8 of 16 samples "
                             "and the uncertainty map")
    out = ROOT / "docs" / "refine_samples.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
