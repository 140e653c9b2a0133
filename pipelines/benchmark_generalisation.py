"""Generalisation benchmark: every method on scenes unlike the training scenes, scored by deblend.evaluate.

The shipped Mask R-CNN is trained on a range of survey conditions
(`deblend.training.ConditionRanges`). This script asks how it does outside
that range, beside SEP and photutils on the same files, one condition at a
time: a broader PSF, finer pixels, heavier PSF wings, a steep sky gradient,
a more crowded field, mostly irregular galaxies, noise outside the training
range, an image shape that is not a multiple of anything, and galaxies of
1.5-5" in half-light radius (nearby galaxies; the quality benchmark's are
0.15-1.5"; in a sparser field of 384x512 pixels, so that they do not all
overlap). Each condition changes one thing from the quality benchmark's conditions (pixel scale
0.15-0.3"/pix, PSF FWHM 0.5-1.0", noise sigma 0.5/1/2 in turn, 192x256
pixels; fine pixels also get a 384x512 image, so that the field holds about as
many sources), and the first row ('reference') changes nothing, so every row
reads against it. Seeds 7000 + 10 k and 7001 + 10 k (k = condition index) are used nowhere else;
--seed S draws other scenes from S + 10 k and S + 1 + 10 k (e.g. fresh scenes for a shipping rule,
with --results elsewhere).

Usage (from the repository root):
    .venv/bin/python pipelines/benchmark_generalisation.py              # 24 scenes per condition, all methods
    .venv/bin/python pipelines/benchmark_generalisation.py --n 4 --conditions reference crowded
    .venv/bin/python pipelines/benchmark_generalisation.py --conditions crowded --methods mask-rcnn \
        --no-split-crowded --results pipelines/results/nosplit --figure pipelines/results/nosplit/g.png

Writes pipelines/results/generalisation.json and generalisation.md (the README table) and
docs/generalisation.png (F1 and blended recall per condition and method).
"""

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from benchmark_quality import NOISE_LEVELS, run_methods

from deblend.evaluate import compare_methods
from deblend.pipeline import METHODS
from deblend.simulate import SceneConfig, scene_seed, simulate_scene, write_scene

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (192, 256)
log = logging.getLogger("benchmark_generalisation")


@dataclass(frozen=True)
class Condition:
    """One way of leaving the training distribution: a label and `SceneConfig` overrides."""

    key: str
    label: str
    training: str  # what training covers, for the table
    overrides: dict


CONDITIONS = (
    Condition("reference", "quality-benchmark conditions", "inside", {}),
    Condition("broad_psf", "PSF FWHM 1.2-1.6\"", "0.5-1.1\"", {"psf_fwhm": (1.2, 1.6)}),
    Condition("fine_pixels", "0.05-0.09\"/pix, PSF 0.15-0.3\" (space-like), 384x512 pixels",
              "0.1-0.3\"/pix, 0.5-1.1\"; a quarter of stage 7's scenes 0.04-0.1\"/pix, 0.1-0.3\"",
              {"pixel_scale": (0.05, 0.09), "psf_fwhm": (0.15, 0.3), "shape": (384, 512)}),
    Condition("psf_wings", "Moffat beta 2 (heavy wings)", "beta 3.5", {"psf_beta": 2.0}),
    Condition("sky_gradient", "sky gradient 30 % of a sky of 100 (15-60 sigma)", "<= 4 sigma",
              {"sky_gradient": 0.3}),
    Condition("crowded", "600 sources/arcmin^2, blend fraction 0.8", "40-400, 0.2-0.8",
              {"density": 600.0, "blend_fraction": 0.8}),
    Condition("irregular", "80 % irregular (knotty) galaxies", "15 %", {"irregular_fraction": 0.8}),
    Condition("noise_extremes", "noise sigma 0.25 and 4 in turn", "0.5-3", {"noise_sigma": (0.25, 4.0)}),
    Condition("odd_shape", "97x413 pixels", "128x128 scenes", {"shape": (97, 413)}),
    Condition("large_galaxies", "galaxies of half-light radius 1.5-5\" (nearby), 30 sources/arcmin^2, "
              "384x512 pixels", "0.15-1.5\"; stage 7 up to 1.5-4\"",
              {"r_half_range": (1.5, 5.0), "density": 30.0, "shape": (384, 512)}),
)


#: Base seed of the conditions' scenes (condition k uses BASE_SEED + 10 k and + 10 k + 1).
BASE_SEED = 7000


def condition_config(condition, index, i, *, base_seed=BASE_SEED):
    """Conditions and simulation seed of scene `i` of a condition (the `index`-th of CONDITIONS)."""
    seed = base_seed + 10 * index
    rng = np.random.default_rng(scene_seed(seed, i))
    drawn = {"shape": SHAPE, "pixel_scale": float(rng.uniform(0.15, 0.3)),
             "psf_fwhm": float(rng.uniform(0.5, 1.0)), "noise_sigma": NOISE_LEVELS[i % 3]}
    for name, value in condition.overrides.items():
        if name == "noise_sigma":
            drawn[name] = value[i % len(value)]
        elif isinstance(value, tuple) and name not in ("shape", "r_half_range"):
            drawn[name] = float(rng.uniform(*value))
        else:
            drawn[name] = value
    return SceneConfig(**drawn), scene_seed(seed + 1, i)


def make_scenes(outdir, condition, index, n, *, base_seed=BASE_SEED):
    """Simulate `n` scenes of one condition into `outdir`; returns the number of truth sources."""
    n_truth = 0
    for i in range(n):
        config, sim_seed = condition_config(condition, index, i, base_seed=base_seed)
        scene = simulate_scene(config, seed=sim_seed, keep_sources=False)
        write_scene(scene, outdir, f"{condition.key}_{i:04d}")
        n_truth += len(scene.truth)
    return n_truth


METRICS = ("f1", "recall", "precision", "blended_recall", "mean_iou")


def markdown(rows, methods, n):
    """The README table: one row per condition, F1 and blended recall per method, Mask R-CNN's precision and IoU."""
    head = (["condition", "training covers"] + [f"F1 {m}" for m in methods]
            + [f"blended recall {m}" for m in methods] + ["precision mask-rcnn", "mean IoU mask-rcnn"])
    lines = [f"{n} scenes per condition; every condition changes one thing from the quality benchmark's "
             f"conditions (first row).", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        s = row["summary"]
        cells = [row["label"], row["training"]]
        cells += [f"{s[m]['f1']:.3f}" for m in methods] + [f"{s[m]['blended_recall']:.3f}" for m in methods]
        neural = s.get("mask-rcnn")
        cells += [f"{neural['precision']:.3f}", f"{neural['mean_iou']:.3f}"] if neural else ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def figure(rows, methods, path):
    """F1 and blended recall per condition, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    x = np.arange(len(rows))
    width = 0.8 / len(methods)
    for ax, metric, title in zip(axes, ("f1", "blended_recall"), ("F1", "blended recall"), strict=True):
        for j, m in enumerate(methods):
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, [r["summary"][m][metric] for r in rows], width,
                   label=m)
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(methods), loc="lower left")
    axes[1].set_xticks(x, [r["key"].replace("_", "\n") for r in rows])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="scenes per condition")
    p.add_argument("--seed", type=int, default=BASE_SEED,
                   help=f"base seed of the scenes (default {BASE_SEED}; condition k uses seed + 10 k)")
    p.add_argument("--conditions", nargs="+", default=[c.key for c in CONDITIONS],
                   choices=[c.key for c in CONDITIONS])
    p.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    p.add_argument("--weights", default=None, help="Mask R-CNN weights (default: the shipped ones)")
    p.add_argument("--no-split-crowded", dest="split_crowded", action="store_false",
                   help="Mask R-CNN without re-running crowded windows (to measure what that gains)")
    p.add_argument("--coarse-pass", action="store_true",
                   help="Mask R-CNN with the 2x2-binned pass for large sources (deblend.coarse)")
    p.add_argument("--tta", action="store_true",
                   help="Mask R-CNN with test-time augmentation (deblend.tta)")
    p.add_argument("--companion-distance", type=float, default=None, metavar="PIX",
                   help="Deblender companion_distance of the mask NMS (default: the pipeline's; 0: off)")
    p.add_argument("--workdir", default="runs/benchmark_generalisation")
    p.add_argument("--results", default=str(ROOT / "pipelines" / "results"))
    p.add_argument("--figure", default=str(ROOT / "docs" / "generalisation.png"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    options = {"weights": args.weights} if args.weights else {}
    if not args.split_crowded:
        options["split_crowded"] = False
    if args.coarse_pass:
        options["coarse_pass"] = True
    if args.tta:
        options["tta"] = True
    if args.companion_distance is not None:
        options["companion_distance"] = args.companion_distance
    rows = []
    for index, condition in enumerate(CONDITIONS):
        if condition.key not in args.conditions:
            continue
        t0 = time.perf_counter()
        truth = work / condition.key / "truth"
        n_truth = make_scenes(truth, condition, index, args.n, base_seed=args.seed)
        timings, pred_dirs = run_methods(truth, work / condition.key, args.methods, **options)
        results = compare_methods(pred_dirs, truth)
        summary = {r["method"]: {k: r["summary"][k] for k in METRICS} for r in results}
        rows.append({"key": condition.key, "label": condition.label, "training": condition.training,
                     "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in condition.overrides.items()},
                     "n_truth": n_truth, "seconds": {m: round(t, 2) for m, t in timings.items()},
                     "summary": summary})
        log.info("%s: %d truth sources, %.0f s; F1 %s", condition.key, n_truth, time.perf_counter() - t0,
                 ", ".join(f"{m} {s['f1']:.3f}" for m, s in summary.items()))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"n_per_condition": args.n, "seed": args.seed, "shape": list(SHAPE), "weights": args.weights or "shipped",
               "split_crowded": args.split_crowded, "coarse_pass": args.coarse_pass, "tta": args.tta,
               "companion_distance": args.companion_distance,
               "methods": args.methods, "conditions": rows}
    (out / "generalisation.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    lines = markdown(rows, args.methods, args.n)
    (out / "generalisation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(rows, args.methods, args.figure)


if __name__ == "__main__":
    main()
