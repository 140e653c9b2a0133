"""Recipe: train the centre detector (deblend.models.centre_net) on simulated scenes.

The scenes are the Mask R-CNN recipe's (``pipelines/train_mask_rcnn.py``: same
simulator, conditions and cache), with each source's truth position; the
target is a Gaussian bump (sigma 1 pixel) at each centre, the loss CenterNet's
focal loss. Flips and 90-degree rotations. Checkpoints and resume as for the
other networks (``deblend.training.fit``). Uses a GPU when there is one.

Usage (from the repository root):
    .venv/bin/python pipelines/train_centre_net.py --n-train 4000 --train-seed 20 \
        --max-minutes 60 --out runs/centre_net.pt                                  # stage 1
    .venv/bin/python pipelines/train_centre_net.py --init-from runs/centre_net.pt --n-train 4000 \
        --train-seed 22 --lr 1e-3 --max-minutes 45 --checkpoints runs/checkpoints/centre_net2 \
        --out runs/centre_net2.pt                                  # stage 2 (rule 21; not shipped)
    .venv/bin/python pipelines/train_centre_net.py --init-from runs/centre_net.pt \
        --n-train 4000 --train-seed 23 --correlated-fraction 0.8 --lr 1e-3 --steps 8000 --max-minutes 42 \
        --checkpoints runs/checkpoints/centre_net3 --out runs/centre_net3.pt         # stage 3 (shipped)

``--init-from`` takes a centre detector file or Mask R-CNN weights with one attached (its
operating-point shift undone). ``--correlated-fraction`` sets the share of training scenes with
correlated noise (default 0.5); the validation scenes keep 0.5, so validation losses compare.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from deblend import __version__
from deblend.models.centre_net import (
    CentreNet,
    centre_focal_loss,
    centre_targets,
    load_centre_net,
    save_centre_net,
    shift_operating_point,
)
from deblend.models.mask_rcnn import load_weights
from deblend.training import ConditionRanges, TrainConfig, fit, hardware_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mask_rcnn import cached_examples  # noqa: E402  (same scenes and cache as the Mask R-CNN recipe)

log = logging.getLogger("train_centre_net")
#: The TrainConfig fields deblend.training.fit reads (the rest are the Mask R-CNN's).
_FIT_SETTINGS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "checkpoint_every",
                 "log_every", "val_every", "seed", "max_minutes")


def _with_targets(examples):
    """Keep examples with truth centres; add each one's target heatmap."""
    kept = [e for e in examples if "centres" in e]
    if len(kept) < len(examples):
        raise ValueError(f"{len(examples) - len(kept)} cached examples have no truth centres (a cache "
                         "written before deblend.training.make_example recorded them); delete the cache file "
                         "or pass a new --cache folder")
    for e in kept:
        e["heat"] = centre_targets(e["centres"], e["image"].shape)
    return kept


def _batch(examples, index, rng):
    images, heats = [], []
    for i in index:
        e = examples[int(i)]
        k, flip = int(rng.integers(4)), rng.random() < 0.5
        image, heat = np.rot90(e["image"], k), np.rot90(e["heat"], k)
        if flip:
            image, heat = image[:, ::-1], heat[:, ::-1]
        images.append(np.nan_to_num(image, nan=0.0))
        heats.append(heat)
    return (torch.from_numpy(np.ascontiguousarray(np.stack(images)[:, None], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(np.stack(heats)[:, None], dtype=np.float32)))


def _initial_centre_net(path):
    """The centre detector in ``path``: a `save_centre_net` file, or Mask R-CNN weights with one attached.

    From Mask R-CNN weights (e.g. deblend/weights/mask_rcnn_small.pt) the
    operating-point shift recorded in their card is undone, so training goes on
    from the network as it was trained.
    """
    try:
        return load_centre_net(path)
    except ValueError:
        pass
    model = load_weights(path)
    if getattr(model, "centre_net", None) is None:
        raise SystemExit(f"--init-from {path}: neither a centre detector (save_centre_net) nor Mask R-CNN "
                         "weights with one attached (pipelines/set_inference_options.py --centre-net)")
    options = model.deblend_metadata.get("inference_options", {}).get("centre_net", {})
    net = model.centre_net
    if options.get("operating_point") is not None:  # shifting by 1 - v undoes a shift by v
        shift_operating_point(net, 1.0 - options["operating_point"])
    net.deblend_card = options.get("card", {})
    return net


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--train-seed", type=int, default=20)
    p.add_argument("--val-seed", type=int, default=21)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-minutes", type=float, default=70.0)
    p.add_argument("--channels", default="16,32,64,96")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from this centre detector, or from the one attached to these Mask R-CNN "
                        "weights (fresh optimiser and schedule; --channels ignored)")
    p.add_argument("--correlated-fraction", type=float, default=0.5,
                   help="fraction of training scenes with correlated noise (default 0.5, the Mask R-CNN's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default="runs/train_cache")
    p.add_argument("--checkpoints", default="runs/checkpoints/centre_net")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/centre_net.pt")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # The conditions of the shipped Mask R-CNN's last stages (its model card).
    # The validation set keeps them whatever --correlated-fraction is, so validation losses compare.
    ranges = ConditionRanges(correlated_fraction=0.5, r_half_max=(1.5, 4.0), space_fraction=0.25,
                             blend_fraction=(0.35, 0.85), density=(60.0, 400.0))
    train_ranges = replace(ranges, correlated_fraction=args.correlated_fraction)
    cache = Path(args.cache)
    tag = "" if args.correlated_fraction == ranges.correlated_fraction else f"_cf{args.correlated_fraction:g}"
    train = _with_targets(cached_examples(cache / f"centres_train_{args.train_seed}_{args.n_train}{tag}.npz",
                                          args.n_train, args.train_seed, args.workers, train_ranges))
    val = _with_targets(cached_examples(cache / f"centres_val_{args.val_seed}_{args.n_val}.npz",
                                        args.n_val, args.val_seed, args.workers, ranges))
    torch.manual_seed(args.seed)
    init_from = None
    if args.init_from:
        model = _initial_centre_net(args.init_from).train()
        previous = model.deblend_card
        init_from = {"file": Path(args.init_from).name, **{k: previous.get(k) for k in ("data", "recipe")}}
    else:
        model = CentreNet(channels=tuple(int(c) for c in args.channels.split(",")))
    device = args.device
    val_batches = [_batch(val, range(i, min(i + 16, len(val))), np.random.default_rng(0))
                   for i in range(0, len(val), 16)]

    def batch_loss(step, rng):
        images, heats = _batch(train, rng.integers(0, len(train), args.batch_size), rng)
        loss = centre_focal_loss(model(images.to(device)), heats.to(device))
        return loss, {"focal": loss}

    def validate():
        model.eval()
        with torch.no_grad():
            total = sum(float(centre_focal_loss(model(x.to(device)), y.to(device))) for x, y in val_batches)
        return {"val_loss": total / len(val_batches)}

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_minutes=args.max_minutes or None, val_every=500)
    result = fit(model, batch_loss, config=cfg, validate=validate, checkpoint_dir=args.checkpoints,
                 resume=not args.no_resume, device=device)
    model.to("cpu").eval()
    last_val = [r["val_loss"] for r in result["history"] if "val_loss" in r]
    card = {
        "name": Path(args.out).stem, "deblend_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"simulator": "deblend.simulate (GalSim)", "n_train": args.n_train,
                 "train_seed": args.train_seed, "n_val": args.n_val, "val_seed": args.val_seed,
                 "conditions": asdict(train_ranges), "val_conditions": asdict(ranges),
                 "augmentation": "flips and 90-degree rotations"},
        "recipe": {"script": "pipelines/train_centre_net.py",
                   "train_config": {k: v for k, v in asdict(cfg).items() if k in _FIT_SETTINGS},
                   "steps_done": result["steps"], "stopped_early": result["stopped_early"],
                   "wall_time_s": round(result["wall_time"], 1), "device": device, "init_from": init_from},
        "hardware": hardware_info(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_val_loss": last_val[-1] if last_val else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_centre_net(model, out, card=card)
    out.with_suffix(".json").write_text(json.dumps(torch.load(out, weights_only=True)["card"], indent=2) + "\n")
    log.info("wrote %s after %d steps (val loss %s)", out, result["steps"], card["final_val_loss"])


if __name__ == "__main__":
    main()
