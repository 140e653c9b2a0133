"""Recipe: train the shipped Mask R-CNN on simulated scenes (2-core CPU: nine stages, about 10.4 hours).

Steps: simulate training and validation scenes with randomised survey conditions
(cached as .npz), train with checkpoints (resumable), write half-precision weights
and a model card JSON beside them. Uses a GPU when there is one.

The shipped weights are trained in nine stages, each later one from the previous
one's weights (``--init-from``: fresh optimiser and learning-rate schedule; the
card keeps the earlier stages' recipes under ``init_from``): stage 1 from scratch
on 2500 scenes (60 minutes); stage 2 on 5000 scenes, the first 2500 being stage
1's (95 minutes); stage 3 on 3000 new scenes (seed 2), half of them with
correlated noise as in co-added images (``--correlated-fraction 0.5``; 60 minutes);
stage 4 replaces the mask head by a narrower one (two 32-channel convolutions
instead of 64, ``--mask-head-channels 32,32``) and trains only it, everything
else frozen (``--train-only mask``; same scenes, 45 minutes), for speed; stage 6
trains the whole network again on 5000 new scenes (seed 3), half with correlated
noise, at a peak lr of 2e-4 (90 minutes); stage 7 trains it again on 4000 new
scenes (seed 4) that widen the conditions: each scene's largest galaxy
half-light radius drawn from 1.5-4" (``--r-half-max 1.5,4``; 1.5" before) and
a quarter of the scenes space-telescope-like, 0.04-0.1"/pix with a PSF of
0.1-0.3" (``--space-fraction 0.25``), half with correlated noise (62
minutes); stage 8 trains it again on 5000 new scenes (seed 6) weighted towards
blends, a companion for 50-90 % of the primaries and 100-400 sources/arcmin²
(``--blend-fraction 0.5,0.9 --density 100,400``; 82 minutes); it was not shipped on its own
(it lost large-galaxy F1), but stage 9 trains it again on 4000 new scenes (seed 7) weighted
between the two (``--blend-fraction 0.35,0.85 --density 60,400``, lr 1e-4, 66 minutes);
stage 10 trains stage 9 again with the same recipe on 4000 new scenes (seed 8; 66 minutes).
The shipped file is stage 10 with peak and contrast-peak proposals at inference, written by
``pipelines/set_inference_options.py runs/mask_rcnn_stage10.pt --peak-proposals 100
--contrast-peak-proposals 100`` (see the README for the rules). ("Stage 5", a box head retrained
with 256 proposals per image; stage 11, stage 10 trained again on seed 10; stage 12p, the shipped
file trained again on seed 11 with ``--train-peak-proposals``; and stage 13p, stage 12p trained again
on seed 12, were tried and not shipped.)
The validation scenes (seed 1) are white-noise scenes throughout.

Usage (from the repository root; ``make train-mask-rcnn`` runs the nine stages):
    .venv/bin/python pipelines/train_mask_rcnn.py --out runs/mask_rcnn_stage1.pt           # stage 1
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage1.pt \
        --n-train 5000 --lr 5e-4 --steps 12000 --max-minutes 95 --checkpoints runs/checkpoints/mask_rcnn_stage2 \
        --out runs/mask_rcnn_stage2.pt                                                      # stage 2
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage2.pt \
        --n-train 3000 --train-seed 2 --correlated-fraction 0.5 --lr 3e-4 --steps 8000 --max-minutes 60 \
        --checkpoints runs/checkpoints/mask_rcnn_stage3 --out runs/mask_rcnn_stage3.pt     # stage 3
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage3.pt \
        --n-train 3000 --train-seed 2 --correlated-fraction 0.5 --mask-head-channels 32,32 --train-only mask \
        --lr 1e-3 --steps 15000 --max-minutes 45 --checkpoints runs/checkpoints/mask_head32 \
        --out runs/mask_rcnn_stage4.pt                                                      # stage 4
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage4.pt \
        --n-train 5000 --train-seed 3 --correlated-fraction 0.5 --lr 2e-4 --steps 12000 --max-minutes 90 \
        --checkpoints runs/checkpoints/mask_rcnn_stage6 --out runs/mask_rcnn_stage6.pt     # stage 6
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage6.pt \
        --n-train 4000 --train-seed 4 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
        --lr 2e-4 --steps 16000 --max-minutes 62 --checkpoints runs/checkpoints/mask_rcnn_stage7 \
        --out runs/mask_rcnn_stage7.pt                                                      # stage 7
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage7.pt \
        --n-train 5000 --train-seed 6 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
        --blend-fraction 0.5,0.9 --density 100,400 --lr 1.5e-4 --steps 24000 --max-minutes 82 \
        --checkpoints runs/checkpoints/mask_rcnn_stage8 --out runs/mask_rcnn_stage8.pt     # stage 8
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage8.pt \
        --n-train 4000 --train-seed 7 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
        --blend-fraction 0.35,0.85 --density 60,400 --lr 1e-4 --steps 20000 --max-minutes 66 \
        --checkpoints runs/checkpoints/mask_rcnn_stage9 --out runs/mask_rcnn_stage9.pt     # stage 9
    .venv/bin/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage9.pt \
        --n-train 4000 --train-seed 8 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
        --blend-fraction 0.35,0.85 --density 60,400 --lr 1e-4 --steps 20000 --max-minutes 66 \
        --checkpoints runs/checkpoints/mask_rcnn_stage10 --out runs/mask_rcnn_stage10.pt   # stage 10
    .venv/bin/python pipelines/set_inference_options.py runs/mask_rcnn_stage10.pt --peak-proposals 100 \
        --contrast-peak-proposals 100 --out deblend/weights/mask_rcnn_small.pt             # shipped
    .venv/bin/python pipelines/train_mask_rcnn.py --steps 50 --n-train 40 --out runs/tiny.pt   # smoke test
"""

import argparse
import json
import logging
import multiprocessing as mp
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from deblend._version import __version__
from deblend.models import (
    build_mask_rcnn,
    count_parameters,
    load_weights,
    save_weights,
    set_test_proposals,
    with_mask_head,
)
from deblend.models.mask_rcnn import BOX_BRANCH, MASK_BRANCH
from deblend.training import (
    ConditionRanges,
    TrainConfig,
    freeze_except,
    hardware_info,
    load_examples,
    make_examples,
    save_examples,
    train_mask_rcnn,
)

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_mask_rcnn")


def _chunk(args):
    n, seed, offset, ranges = args
    torch.set_num_threads(1)
    from deblend.simulate import scene_seed
    from deblend.training import make_example
    return [make_example(scene_seed(seed, offset + i), ranges=ranges) for i in range(n)]


def cached_examples(path, n, seed, workers, ranges=None):
    """Examples i = 0..n-1 of `seed` (conditions from `ranges`), simulated in parallel and cached at `path`."""
    path = Path(path)
    if path.exists():
        examples = load_examples(path)
        if len(examples) == n:
            log.info("loaded %d cached examples from %s", n, path)
            return examples
    t0 = time.perf_counter()
    if workers > 1:
        size = -(-n // (workers * 4))
        jobs = [(min(size, n - o), seed, o, ranges) for o in range(0, n, size)]
        with mp.get_context("spawn").Pool(workers) as pool:
            examples = [e for part in pool.map(_chunk, jobs) for e in part]
    else:
        examples = make_examples(n, seed=seed, ranges=ranges, progress=True)
    log.info("simulated %d examples in %.0f s", n, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_examples(examples, path)
    return examples


def _pair(text, cast):
    """``'A,B'`` as a tuple of two ``cast`` values, or ``()`` when it is not one."""
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError:
        return ()
    return values if len(values) == 2 else ()


def _pair_option(parser, option, text, default, cast, valid, requirement, example):
    """The ``A,B`` value of ``option`` (``default`` when not given); a parser error names the fix."""
    if not text:
        return default
    value = _pair(text, cast)
    if not value or not valid(value):
        parser.error(f"{option} must be {requirement}, got {text!r}; e.g. {option} {example}")
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=2500)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--train-seed", type=int, default=0, help="simulation seed of the training scenes")
    p.add_argument("--val-seed", type=int, default=1, help="simulation seed of the validation scenes")
    p.add_argument("--steps", type=int, default=8000, help="upper bound on optimisation steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="time budget: the learning-rate schedule completes within it (0: steps only)")
    p.add_argument("--backbone", default="small")
    p.add_argument("--init-from", default=None,
                   help="start from this weights file (fresh optimiser and schedule) instead of from scratch")
    p.add_argument("--correlated-fraction", type=float, default=0.0,
                   help="fraction of training scenes with correlated noise (validation stays white)")
    p.add_argument("--r-half-max", default=None, metavar="LO,HI",
                   help="range of each training scene's largest galaxy half-light radius, arcsec "
                        "(log-uniform; default 1.5,1.5, i.e. galaxies of 0.15-1.5\")")
    p.add_argument("--space-fraction", type=float, default=0.0,
                   help="fraction of space-telescope-like training scenes (0.04-0.1\"/pix, PSF 0.1-0.3\", "
                        "300-1500 sources/arcmin^2)")
    p.add_argument("--blend-fraction", default=None, metavar="LO,HI",
                   help="range of the fraction of primaries given a close companion (uniform; default "
                        "0.2,0.8); a higher range shows the network more faint companions beside brighter "
                        "sources")
    p.add_argument("--density", default=None, metavar="LO,HI",
                   help="range of the drawn source density, sources per arcmin^2 (log-uniform; default "
                        "40,400)")
    p.add_argument("--mask-head-channels", default=None,
                   help="comma-separated widths of a new mask head (e.g. 32,32), replacing the --init-from "
                        "model's; everything else keeps its weights")
    p.add_argument("--train-only", choices=("all", "mask", "box"), default="all",
                   help="'mask' or 'box': train that branch's head and predictor only, everything else frozen "
                        "('box' retrains the detection scores, classes and boxes; masks stay as they are)")
    p.add_argument("--box-batch-size", type=int, default=TrainConfig.box_batch_size_per_image,
                   help="proposals sampled per training image for the box head (torchvision: 512)"),
    p.add_argument("--rpn-iou", default=None, metavar="FG,BG",
                   help="IoU with a true box at or above which an anchor is a positive RPN example, and below "
                        "which a negative (default 0.7,0.3)")
    p.add_argument("--box-iou", default=None, metavar="FG,BG",
                   help="the same for the box head's proposals (default 0.5,0.5)")
    p.add_argument("--train-peak-proposals", action="store_true",
                   help="also give the box head the inference-time peak and contrast-peak boxes in training "
                        "(the --init-from model's counts)")
    p.add_argument("--freeze-batchnorm", action="store_true",
                   help="normalise with the --init-from model's BatchNorm statistics and keep them (fine-tuning)")
    p.add_argument("--rpn-test-top-n", default=None, metavar="PRE,POST",
                   help="RPN proposals the saved model keeps at inference, before/after NMS (training unaffected)")
    p.add_argument("--scene-shape", default=None, metavar="NY,NX",
                   help="training scenes' shape in pixels (default 128,128; the validation scenes stay 128x128)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    p.add_argument("--workers", type=int, default=2, help="processes for simulating scenes")
    p.add_argument("--cache", default="runs/train_cache")
    p.add_argument("--checkpoints", default="runs/checkpoints/mask_rcnn")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "deblend" / "weights" / "mask_rcnn_small.pt"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cache = Path(args.cache)
    r_half_max = _pair_option(p, "--r-half-max", args.r_half_max, ConditionRanges.r_half_max, float,
                              lambda v: 0 < v[0] <= v[1], "LO,HI in arcsec with 0 < LO <= HI", "1.5,4")
    shape = _pair_option(p, "--scene-shape", args.scene_shape, ConditionRanges.shape, int,
                         lambda v: min(v) >= 32, "NY,NX in pixels, each at least 32", "256,256")
    blend_fraction = _pair_option(p, "--blend-fraction", args.blend_fraction, ConditionRanges.blend_fraction,
                                  float, lambda v: 0 <= v[0] <= v[1] <= 1, "LO,HI with 0 <= LO <= HI <= 1",
                                  "0.5,0.9")
    density = _pair_option(p, "--density", args.density, ConditionRanges.density, float,
                           lambda v: 0 < v[0] <= v[1], "LO,HI in sources per arcmin^2 with 0 < LO <= HI",
                           "100,400")
    iou_pair = (float, lambda v: 0 < v[1] <= v[0] <= 1, "FG,BG with 0 < BG <= FG <= 1")
    rpn_iou = _pair_option(p, "--rpn-iou", args.rpn_iou, (TrainConfig.rpn_fg_iou_thresh,
                                                          TrainConfig.rpn_bg_iou_thresh), *iou_pair, "0.5,0.3")
    box_iou = _pair_option(p, "--box-iou", args.box_iou, (TrainConfig.box_fg_iou_thresh,
                                                          TrainConfig.box_bg_iou_thresh), *iou_pair, "0.4,0.4")
    if not 0 <= args.space_fraction <= 1:
        p.error(f"--space-fraction must be a fraction in [0, 1], got {args.space_fraction!r}")
    ranges = ConditionRanges(correlated_fraction=args.correlated_fraction, r_half_max=r_half_max,
                             space_fraction=args.space_fraction, shape=shape, blend_fraction=blend_fraction,
                             density=density)
    suffix = f"_corr{args.correlated_fraction:g}" if args.correlated_fraction else ""
    if r_half_max != ConditionRanges.r_half_max:
        suffix += f"_rhalf{r_half_max[0]:g}-{r_half_max[1]:g}"
    if args.space_fraction:
        suffix += f"_space{args.space_fraction:g}"
    if blend_fraction != ConditionRanges.blend_fraction:
        suffix += f"_blend{blend_fraction[0]:g}-{blend_fraction[1]:g}"
    if density != ConditionRanges.density:
        suffix += f"_density{density[0]:g}-{density[1]:g}"
    if shape != ConditionRanges.shape:
        suffix += f"_shape{shape[0]}x{shape[1]}"
    train = cached_examples(cache / f"train_{args.train_seed}_{args.n_train}{suffix}.npz", args.n_train,
                            args.train_seed, args.workers, ranges)
    val = cached_examples(cache / f"val_{args.val_seed}_{args.n_val}.npz", args.n_val, args.val_seed,
                          args.workers)
    init_from = None
    if args.init_from:
        model = load_weights(args.init_from)
        previous = model.deblend_metadata
        init_from = {"file": Path(args.init_from).name, "sha256": model.deblend_sha256,
                     **{k: previous.get(k) for k in ("data", "recipe", "final_val_loss")}}
        log.info("starting from %s (%s steps)", args.init_from, (previous.get("recipe") or {}).get("steps_done"))
    else:
        model = build_mask_rcnn(backbone=args.backbone, seed=args.seed)
    if args.mask_head_channels:
        if not args.init_from:
            p.error("--mask-head-channels replaces the mask head of --init-from's model; pass --init-from")
        channels = tuple(int(c) for c in args.mask_head_channels.split(","))
        model = with_mask_head(model, channels, seed=args.seed)
        init_from["new_mask_head_channels"] = list(channels)
    if args.train_only != "all":
        n = freeze_except(model, {"mask": MASK_BRANCH, "box": BOX_BRANCH}[args.train_only])
        log.info("training the %s branch only: %d parameters", args.train_only, n)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_minutes=args.max_minutes or None, box_batch_size_per_image=args.box_batch_size,
                      rpn_fg_iou_thresh=rpn_iou[0], rpn_bg_iou_thresh=rpn_iou[1],
                      box_fg_iou_thresh=box_iou[0], box_bg_iou_thresh=box_iou[1],
                      peak_proposals=args.train_peak_proposals, freeze_batchnorm=args.freeze_batchnorm)
    result = train_mask_rcnn(model, train, val_examples=val, config=cfg,
                             checkpoint_dir=args.checkpoints, resume=not args.no_resume,
                             device=args.device)
    model.to("cpu").eval()
    if args.rpn_test_top_n:
        set_test_proposals(model, *(int(n) for n in args.rpn_test_top_n.split(",")))
    last_val = [r["val_loss"] for r in result["history"] if "val_loss" in r]
    metadata = {
        "name": Path(args.out).stem,
        "deblend_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"simulator": "deblend.simulate (GalSim)", "n_train": args.n_train,
                 "train_seed": args.train_seed, "n_val": args.n_val, "val_seed": args.val_seed,
                 "conditions": asdict(ranges),
                 "augmentation": "flips and 90-degree rotations; masked stripes/boxes in 20% of scenes"
                                 + (f"; correlated noise in {100 * args.correlated_fraction:g}% of scenes"
                                    if args.correlated_fraction else "")
                                 + (f"; space-telescope-like in {100 * args.space_fraction:g}% of scenes"
                                    if args.space_fraction else "")},
        "recipe": {"script": "pipelines/train_mask_rcnn.py", "train_config": asdict(cfg),
                   "steps_done": result["steps"], "stopped_early": result["stopped_early"],
                   "wall_time_s": round(result["wall_time"], 1), "device": args.device,
                   "init_from": init_from, "trained_parts": args.train_only},
        "hardware": hardware_info(),
        "n_parameters": count_parameters(model),
        "n_parameters_trained": count_parameters(model, trainable_only=True),
        "final_val_loss": last_val[-1] if last_val else None,
        "history": result["history"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sha = save_weights(model, args.out, metadata=json.loads(json.dumps(metadata)))
    card = {k: v for k, v in metadata.items() if k != "history"}
    card.update({"weights_file": Path(args.out).name, "sha256": sha,
                 "input": "one channel: asinh(detection / sigma) (deblend.preprocess.normalize)",
                 "classes": ["background", "star", "galaxy"],
                 "metrics": None,
                 "metrics_note": "filled in by pipelines/benchmark_quality.py"})
    card_path = Path(args.out).with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s (sha256 %s) and %s", args.out, sha[:12], card_path)
    np.save(Path(args.checkpoints) / "done.npy", np.array([result["steps"]]))


if __name__ == "__main__":
    main()
