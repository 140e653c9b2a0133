"""Simulate training examples 0..39 of seed 13 (rule-19 ranges) and save them, to compare machines."""
import sys

import numpy as np
import scipy

sys.path.insert(0, "pipelines")
import train_mask_rcnn as t  # noqa: E402

from deblend.training import ConditionRanges, save_examples  # noqa: E402

if __name__ == "__main__":
    ranges = ConditionRanges(correlated_fraction=0.5, r_half_max=(1.5, 4.0), space_fraction=0.25,
                             blend_fraction=(0.35, 0.85), density=(60.0, 400.0))
    out = sys.argv[1]
    ex = t._chunk((40, 13, 0, ranges))
    save_examples(ex, out)
    import galsim
    print("numpy", np.__version__, "scipy", scipy.__version__, "galsim", galsim.__version__)
