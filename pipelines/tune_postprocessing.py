"""Tune Mask R-CNN post-processing (score threshold, mask-NMS overlap) on a small tuning set.

16 scenes of 128x128 from seeds 9000-9015 (neither training, validation nor the quality
benchmark), conditions cycling through pixel scales 0.15-0.3"/pix, PSF FWHM 0.5-1.0" and
noise 0.5/1/2. Prints one line per setting; pipelines/results/tuning.txt keeps the output.
Also compares candidate weights before shipping them: pass the file, --noise-correlation for
scenes with correlated noise, and --out to keep tuning.txt as it is.

With --tta, detection is test-time augmented (deblend.tta.detect_tta) and the score
thresholds apply to the fused score.

Usage: .venv/bin/python pipelines/tune_postprocessing.py [WEIGHTS.pt] [--noise-correlation S]
       [--rpn-test-top-n PRE,POST] [--tta] [--score-thresholds T ...] [--out FILE]
"""

import argparse
from pathlib import Path

import numpy as np

from deblend.catalog import make_catalog
from deblend.evaluate import evaluate_image, summarize
from deblend.io import Image
from deblend.models import set_test_proposals
from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn
from deblend.preprocess import prepare
from deblend.segment import detect, instances_to_labels, suppress_duplicates
from deblend.simulate import SceneConfig, simulate_scene
from deblend.tta import detect_tta

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="?", default=DEFAULT_MASK_RCNN)
    p.add_argument("--noise-correlation", type=float, default=0.0,
                   help="Gaussian sigma (pixels) of correlated noise in every scene (default: white)")
    p.add_argument("--rpn-test-top-n", default=None, metavar="PRE,POST",
                   help="RPN proposals kept before/after NMS at inference (default: the weights' own)")
    p.add_argument("--mask-thresholds", type=float, nargs="+", default=[0.5],
                   help="soft-mask thresholds of the label map to try (default: 0.5, the pipeline's)")
    p.add_argument("--tta", action="store_true",
                   help="detect with test-time augmentation (deblend.tta); thresholds apply to the fused score")
    p.add_argument("--score-thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                   help="detection score thresholds to try (default: 0.3 0.5 0.7)")
    p.add_argument("--out", default=str(ROOT / "pipelines" / "results" / "tuning.txt"))
    args = p.parse_args()
    model = load_mask_rcnn(args.weights)
    if args.rpn_test_top_n:
        set_test_proposals(model, *(int(n) for n in args.rpn_test_top_n.split(",")))
    scenes = []
    for i in range(16):
        cfg = SceneConfig(shape=(128, 128), pixel_scale=0.15 + 0.15 * (i % 4) / 3,
                          psf_fwhm=0.5 + 0.5 * (i % 3) / 2, noise_sigma=[0.5, 1, 2][i % 3],
                          noise_correlation=args.noise_correlation)
        scene = simulate_scene(cfg, seed=9000 + i, keep_sources=False)
        prepared = prepare(Image.from_array(scene.image))
        low = min(args.score_thresholds)
        if args.tta:
            instances = detect_tta(prepared.normalized(), model=model, mask=prepared.mask, score_threshold=low)
        else:
            instances = detect(prepared.normalized(), model=model, mask=prepared.mask, score_threshold=low)
        scenes.append((scene, cfg, prepared, instances))
    lines = []
    settings = [(score, max_overlap, mask_threshold) for score in args.score_thresholds
                for max_overlap in (0.3, 0.5, 0.7, 1.0) for mask_threshold in args.mask_thresholds]
    for score, max_overlap, mask_threshold in settings:
        results = []
        for scene, cfg, prepared, instances in scenes:
            shape = prepared.detection.shape
            kept = instances.select(np.flatnonzero(instances.det_score >= score))
            kept = suppress_duplicates(kept, shape, max_overlap=max_overlap,
                                       mask_threshold=mask_threshold)
            labels, _ = instances_to_labels(kept, shape, mask=prepared.mask,
                                            mask_threshold=mask_threshold)
            catalog = make_catalog(prepared.data, labels, detection=prepared.detection)
            results.append(evaluate_image(labels, catalog, scene.truth_seg, scene.truth,
                                          fwhm_pixels=cfg.psf_fwhm / cfg.pixel_scale))
        s = summarize(results)
        setting = f"score_threshold={score} max_overlap={max_overlap}"
        if args.mask_thresholds != [0.5]:
            setting += f" mask_threshold={mask_threshold}"
        line = (f"{setting}: " + ", ".join(
            f"{k}={s[k]:.3f}" for k in ("recall", "precision", "f1", "blended_recall", "mean_iou"))
            + f", merged={s['merged']}, shredded={s['shredded']}")
        print(line, flush=True)
        lines.append(line)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
