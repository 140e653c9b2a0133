"""Does the centre detector find blended sources the Mask R-CNN misses? Points against points.

On scenes of the quality benchmark's conditions (``benchmark_quality.scene_config``), the
truth positions are matched to (a) the default pipeline's catalog centroids and (b) the local
maxima of a centre network's heatmap above each of several thresholds, with the benchmark's
own matcher (``deblend.evaluate.match_sources``: one-to-one, within one PSF FWHM). Recall,
blended recall and precision are counted the same way for both, with no masks involved, so the
table says whether the centres alone would detect more companions at a given precision. The
"union" rows add to the pipeline's detections the centres farther than ``--min-distance``
pixels from every pipeline centroid: what the pipeline would gain by adopting them.

Usage (from the repository root):
    .venv/bin/python pipelines/compare_centres.py runs/centre_net.pt --seed 9100 --n 40 \
        [--noise-correlation 1.0] [--out FILE.md]
"""

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_quality import scene_config  # noqa: E402

from deblend.evaluate import match_sources  # noqa: E402
from deblend.io import Image  # noqa: E402
from deblend.models.centre_net import centre_heatmap, find_centres, load_centre_net  # noqa: E402
from deblend.pipeline import Deblender  # noqa: E402
from deblend.preprocess import prepare  # noqa: E402
from deblend.simulate import simulate_scene  # noqa: E402

log = logging.getLogger("compare_centres")
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def counts(points, truth, fwhm):
    """tp, fp, n_truth, tp_blended, n_blended of points matched to the truth positions."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    t_xy = np.column_stack([np.asarray(truth["x"]), np.asarray(truth["y"])])
    blended = np.asarray(truth["blended"], dtype=bool)
    _, t_idx = match_sources(points, t_xy, max_distance=fwhm)
    tp = len(t_idx)
    return np.array([tp, len(points) - tp, len(t_xy), int(blended[t_idx].sum()), int(blended.sum())])


def _far_from(points, others, distance):
    if not len(others) or not len(points):
        return points
    d = np.hypot(points[:, None, 0] - others[None, :, 0], points[:, None, 1] - others[None, :, 1])
    return points[d.min(axis=1) > distance]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("centre_net")
    p.add_argument("--seed", type=int, default=9100)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--noise-correlation", type=float, default=0.0)
    p.add_argument("--min-distance", type=float, default=2.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    net = load_centre_net(args.centre_net)
    deblender = Deblender("mask-rcnn")
    rows = {"pipeline": np.zeros(5, int)}
    for t in THRESHOLDS:
        rows[f"centres >= {t:g}"] = np.zeros(5, int)
        rows[f"union, centres >= {t:g}"] = np.zeros(5, int)
    for i in range(args.n):
        config, sim_seed = scene_config(args.seed, i, (192, 256), args.noise_correlation)
        scene = simulate_scene(config, seed=sim_seed, keep_sources=False)
        fwhm = config.psf_fwhm / config.pixel_scale
        result = deblender.run(scene.image)
        ours = np.column_stack([np.asarray(result.catalog["x_centroid"], float),
                                np.asarray(result.catalog["y_centroid"], float)])
        rows["pipeline"] += counts(ours, scene.truth, fwhm)
        heat = centre_heatmap(net, prepare(Image.from_array(scene.image)).normalized())
        for t in THRESHOLDS:
            xs, ys, _ = find_centres(heat, threshold=t)
            centres = np.column_stack([xs, ys]).astype(float)
            rows[f"centres >= {t:g}"] += counts(centres, scene.truth, fwhm)
            extra = _far_from(centres, ours, args.min_distance)
            rows[f"union, centres >= {t:g}"] += counts(np.concatenate([ours, extra]), scene.truth, fwhm)
        if (i + 1) % 10 == 0:
            log.info("%d/%d scenes", i + 1, args.n)
    lines = [f"{args.n} scenes of the quality benchmark's conditions, seed {args.seed}, noise correlation "
             f"{args.noise_correlation:g}; centre net {Path(args.centre_net).name}; points matched within one "
             "FWHM (deblend.evaluate.match_sources).", "",
             "| detections | recall | precision | blended recall | F1 |", "| --- | --- | --- | --- | --- |"]
    for name, (tp, fp, n, tpb, nb) in rows.items():
        recall, precision = tp / n, tp / max(tp + fp, 1)
        f1 = 2 * tp / (2 * tp + fp + (n - tp))
        lines.append(f"| {name} | {recall:.3f} | {precision:.3f} | {tpb / nb:.3f} | {f1:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
