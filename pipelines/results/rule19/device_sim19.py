"""Simulate the device run's training (seed 13) and validation caches in parallel."""
import logging
import sys

sys.path.insert(0, "pipelines")
import train_mask_rcnn as t  # noqa: E402

from deblend.training import ConditionRanges  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    n, workers = int(sys.argv[1]), int(sys.argv[2])
    ranges = ConditionRanges(correlated_fraction=0.5, r_half_max=(1.5, 4.0), space_fraction=0.25,
                             blend_fraction=(0.35, 0.85), density=(60.0, 400.0))
    t.cached_examples(f"/tmp/cache/train_13_{n}_corr0.5_rhalf1.5-4_space0.25_blend0.35-0.85_density60-400.npz",
                      n, 13, workers, ranges)
    t.cached_examples("/tmp/cache/val_1_100.npz", 100, 1, workers)
