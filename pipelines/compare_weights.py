"""Paired comparison of two Mask R-CNN weight files, with bootstrap intervals: is a candidate better?

Runs the default pipeline (`deblend.pipeline.Deblender`, refinement included) with each weights
file on the same held-out *selection* scenes: the quality benchmark's conditions
(benchmark_quality.scene_config) from seed 8000, which no other set uses (training 0-11, the
quality benchmark 2000, refinement calibration 2100, benchmark.py 5000-6000, generalisation
7000-7091, tuning 9000-9015; the stage-8 and stage-9 shipping rules used --seed 8100 and 8300
here and benchmark_generalisation.py --seed 8200 and 8400, so a new rule takes another). Each
scene is scored with
`deblend.evaluate.evaluate_image`; the metrics of each file are ratios of counts summed over the
scenes, and their difference (B - A) gets a 95 % interval from a paired bootstrap over scenes
(the same resampled scenes for both files), so a shipping rule can ask for a gain that noise
does not explain. The 16 tuning scenes of tune_postprocessing.py are too few for that: a
stage-8 candidate gained 0.005 blended recall there and 0.019 on the 200 benchmark scenes.

The same file twice with different ``--options-a`` / ``--options-b`` (`Deblender` keyword arguments as
JSON) compares post-processing settings of one network instead.

Usage (from the repository root):
    .venv/bin/python pipelines/compare_weights.py A.pt B.pt [--n 100] [--noise-correlation S]
        [--options-a JSON] [--options-b JSON] [--out FILE.md]
"""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from benchmark_quality import scene_config

from deblend.evaluate import evaluate_image
from deblend.pipeline import Deblender
from deblend.simulate import simulate_scene

log = logging.getLogger("compare_weights")

#: Selection scenes' seed (and seed + 1): used by no training, tuning or benchmark set.
SELECTION_SEED = 8000
#: Metrics compared: name -> (numerator count, denominator counts summed).
METRICS = {
    "recall": ("tp", ("tp", "fn")),
    "precision": ("tp", ("tp", "fp")),
    "blended_recall": ("tp_blended", ("n_blended",)),
    "mean_iou": ("iou_sum", ("tp",)),
    "star_galaxy_accuracy": ("class_correct", ("class_total",)),
}
_COUNTS = ("tp", "fp", "fn", "tp_blended", "n_blended", "iou_sum", "class_correct", "class_total")


def counts_matrix(results):
    """(n_scenes, len(_COUNTS)) array of the per-scene counts `metrics_from_counts` needs.

    A count a result lacks or holds as None (``class_correct`` and ``class_total`` of a catalog
    without classes) is 0, so that metric comes out NaN.
    """
    rows = [[float(r.get(k) or 0) for k in _COUNTS] for r in results]
    return np.array(rows, dtype=float).reshape(-1, len(_COUNTS))


def metrics_from_counts(totals):
    """Metrics from summed counts; ``totals`` is (..., len(_COUNTS)). Undefined ratios are NaN.

    The ratios of `deblend.evaluate.summarize`, vectorised over bootstrap resamples
    (``tests/test_compare_weights_script.py`` checks that the two agree).
    """
    index = {k: i for i, k in enumerate(_COUNTS)}
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, (num, den) in METRICS.items():
            out[name] = totals[..., index[num]] / sum(totals[..., index[d]] for d in den)
        tp, fp, fn = (totals[..., index[k]] for k in ("tp", "fp", "fn"))
        out["f1"] = 2 * tp / (2 * tp + fp + fn)
    return out


def paired_bootstrap(counts_a, counts_b, *, n_boot=2000, seed=0):
    """Metrics of A and B, and B - A with a 95 % paired-bootstrap interval over scenes.

    Parameters
    ----------
    counts_a, counts_b : ndarray, shape (n_scenes, len(_COUNTS))
        Per-scene counts of the two weight files on the same scenes (`counts_matrix`).
    n_boot : int, optional
        Bootstrap resamples.
    seed : int, optional

    Returns
    -------
    dict
        ``{metric: {"a", "b", "diff", "low", "high"}}``.
    """
    counts_a, counts_b = np.asarray(counts_a, dtype=float), np.asarray(counts_b, dtype=float)
    if counts_a.shape != counts_b.shape or counts_a.ndim != 2 or not len(counts_a):
        raise ValueError(f"counts_a and counts_b must be the same non-empty (n_scenes, k) shape, got "
                         f"{counts_a.shape} and {counts_b.shape}; score both files on the same scenes")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts_a), size=(n_boot, len(counts_a)))  # the same scenes for A and B
    a, b = metrics_from_counts(counts_a.sum(0)), metrics_from_counts(counts_b.sum(0))
    boot_a, boot_b = metrics_from_counts(counts_a[picks].sum(1)), metrics_from_counts(counts_b[picks].sum(1))
    out = {}
    for name in a:
        diff = boot_b[name] - boot_a[name]
        low, high = np.nanpercentile(diff, [2.5, 97.5]) if np.isfinite(diff).any() else (np.nan, np.nan)
        out[name] = {"a": float(a[name]), "b": float(b[name]), "diff": float(b[name] - a[name]),
                     "low": float(low), "high": float(high)}
    return out


def score(weights, scenes, options=None):
    """Per-scene `evaluate_image` results of the default pipeline with ``weights``, and its seconds.

    ``options`` are further `Deblender` keyword arguments. The seconds are the wall time of
    ``Deblender.run`` summed over the scenes (scoring excluded): one run, so only a large
    difference between two files means anything.
    """
    deblender = Deblender("mask-rcnn", weights=weights, **(options or {}))
    results, seconds = [], 0.0
    for scene, config in scenes:
        start = time.perf_counter()
        result = deblender.run(scene.image)
        seconds += time.perf_counter() - start
        results.append(evaluate_image(result.labels, result.catalog, scene.truth_seg, scene.truth,
                                      fwhm_pixels=config.psf_fwhm / config.pixel_scale))
    return results, seconds


def report(comparison, *, names, n_scenes, seed, noise_correlation, seconds=None):
    """Markdown lines of the comparison table (and a line of each file's pipeline seconds)."""
    noise = f", noise correlated (Gaussian sigma {noise_correlation:g} px)" if noise_correlation else ""
    lines = [f"{n_scenes} selection scenes 192x256 (quality-benchmark conditions, seed {seed}{noise}); "
             f"A = {names[0]}, B = {names[1]}; B - A with a 95 % paired-bootstrap interval over scenes.", "",
             "| metric | A | B | B - A | 95 % interval |", "| --- | --- | --- | --- | --- |"]
    for name, row in comparison.items():
        lines.append(f"| {name} | {row['a']:.3f} | {row['b']:.3f} | {row['diff']:+.3f} | "
                     f"{row['low']:+.3f} to {row['high']:+.3f} |")
    if seconds is not None:
        lines += ["", f"Pipeline wall time over the scenes, one run each, A then B in one process: "
                      f"A {seconds[0]:.1f} s, B {seconds[1]:.1f} s (B/A {seconds[1] / seconds[0]:.2f})."]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights_a", help="reference weights (e.g. the shipped deblend/weights/mask_rcnn_small.pt)")
    p.add_argument("weights_b", help="candidate weights")
    p.add_argument("--n", type=int, default=100, help="selection scenes (default 100)")
    p.add_argument("--seed", type=int, default=SELECTION_SEED)
    p.add_argument("--noise-correlation", type=float, default=0.0,
                   help="Gaussian sigma (pixels) of correlated noise in every scene (default: white)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--options-a", default="{}", metavar="JSON",
                   help="Deblender keyword arguments for A, e.g. '{\"companion_distance\": 0}'")
    p.add_argument("--options-b", default="{}", metavar="JSON", help="the same for B")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    options = []
    for flag, text in (("--options-a", args.options_a), ("--options-b", args.options_b)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            p.error(f"{flag} must be a JSON object of Deblender keyword arguments, got {text!r} ({error})")
        if not isinstance(value, dict):
            p.error(f"{flag} must be a JSON object, e.g. '{{\"score_threshold\": 0.45}}', got {text!r}")
        options.append(value)
    if args.n < 2:
        p.error(f"--n must be at least 2 (a bootstrap over scenes needs several), got {args.n}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scenes = []
    for i in range(args.n):
        config, sim_seed = scene_config(args.seed, i, (192, 256), args.noise_correlation)
        scenes.append((simulate_scene(config, seed=sim_seed, keep_sources=False), config))
    log.info("simulated %d selection scenes", len(scenes))
    scored = [score(w, scenes, o) for w, o in zip((args.weights_a, args.weights_b), options, strict=True)]
    comparison = paired_bootstrap(*(counts_matrix(results) for results, _ in scored), n_boot=args.n_boot)
    names = [Path(w).name + (f" {json.dumps(o)}" if o else "")
             for w, o in zip((args.weights_a, args.weights_b), options, strict=True)]
    lines = report(comparison, names=names,
                   n_scenes=args.n, seed=args.seed, noise_correlation=args.noise_correlation,
                   seconds=[seconds for _, seconds in scored])
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
