"""Recipe step: a weights file with other inference options, same network (e.g. the shipped one).

The options change what the trained network is given or keeps at inference, never its
weights: ``--peak-proposals N`` adds boxes around up to N local maxima of each window to
the RPN's proposals (`deblend.models.set_peak_proposals`), ``--contrast-peak-proposals N``
boxes around up to N maxima of the local contrast (companions on a brighter neighbour's
slope, `deblend.models.peak_boxes`), ``--rpn-test-top-n PRE,POST``
sets how many RPN proposals are kept (`deblend.models.set_test_proposals`), and
``--centre-net FILE`` attaches a centre detector trained by ``pipelines/train_centre_net.py``
(`deblend.models.attach_centre_net`): boxes around up to ``--centre-proposals`` maxima of its
heatmap above ``--centre-threshold`` join the proposals, and with ``--centre-detect`` the centres
alone decide what is a source (``deblend.models.build_mask_rcnn``). The new file
gets a model card beside it: the input's card with the options recorded under
``inference_options`` (and the input file's name and sha256), and its metrics cleared
until `pipelines/benchmark_quality.py` measures them again.

Usage (from the repository root):
    .venv/bin/python pipelines/set_inference_options.py runs/mask_rcnn_stage10.pt --peak-proposals 100 \
        [--contrast-peak-proposals 100] --out runs/mask_rcnn_stage10_peaks.pt
    .venv/bin/python pipelines/set_inference_options.py deblend/weights/mask_rcnn_small.pt \
        --centre-net runs/centre_net.pt --centre-proposals 200 --centre-threshold 0.2 --centre-detect \
        --out runs/with_centres.pt
"""

import argparse
import json
import logging
from pathlib import Path

from deblend.models import (
    attach_centre_net,
    load_weights,
    model_config,
    save_weights,
    set_peak_proposals,
    set_test_proposals,
)
from deblend.models.centre_net import load_centre_net, shift_operating_point

log = logging.getLogger("set_inference_options")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a Mask R-CNN weights file with its model card (.json) beside it")
    p.add_argument("--peak-proposals", type=int, default=None, metavar="N",
                   help="peak proposals per window at inference (0: none)")
    p.add_argument("--contrast-peak-proposals", type=int, default=None, metavar="N",
                   help="contrast-peak proposals per window at inference (0: none)")
    p.add_argument("--rpn-test-top-n", default=None, metavar="PRE,POST",
                   help="RPN proposals kept at inference, before/after NMS")
    p.add_argument("--centre-net", default=None, metavar="FILE",
                   help="attach this centre detector (pipelines/train_centre_net.py)")
    p.add_argument("--centre-proposals", type=int, default=100, metavar="N",
                   help="with --centre-net: centre proposals per window (default 100)")
    p.add_argument("--centre-threshold", type=float, default=0.3, metavar="V",
                   help="with --centre-net: lowest heatmap value of a proposed centre (default 0.3)")
    p.add_argument("--centre-operating-point", type=float, default=None, metavar="V",
                   help="with --centre-net: shift its output so that heatmap value V reads 0.5 "
                        "(deblend.models.centre_net.shift_operating_point)")
    p.add_argument("--centre-detect", action="store_true",
                   help="with --centre-net: the centres alone decide what is a source")
    p.add_argument("--out", required=True, help="the new weights file (its card is written beside it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    source, out = Path(args.weights), Path(args.out)
    if out.resolve() == source.resolve():
        p.error(f"--out must differ from the input weights file, got {args.out!r} for both")
    card_path = source.with_suffix(".json")
    if not card_path.exists():
        p.error(f"{source} has no model card {card_path.name} beside it; pass a file written by "
                "pipelines/train_mask_rcnn.py (or a copy with its card)")
    model = load_weights(source)
    try:
        if args.peak_proposals is not None or args.contrast_peak_proposals is not None:
            peaks = model_config(model)["peak_proposals"] if args.peak_proposals is None else args.peak_proposals
            set_peak_proposals(model, peaks, max_contrast_peaks=args.contrast_peak_proposals)
        if args.rpn_test_top_n is not None:
            values = args.rpn_test_top_n.split(",")
            if len(values) != 2 or not all(v.strip().isdigit() for v in values):
                p.error(f"--rpn-test-top-n must be PRE,POST (two integers), got {args.rpn_test_top_n!r}; "
                        "e.g. --rpn-test-top-n 600,300")
            set_test_proposals(model, int(values[0]), int(values[1]))
        if args.centre_net is not None:
            centre_net = load_centre_net(args.centre_net)
            if args.centre_operating_point is not None:
                shift_operating_point(centre_net, args.centre_operating_point)
            attach_centre_net(model, centre_net, proposals=args.centre_proposals,
                              threshold=args.centre_threshold, detect=args.centre_detect)
    except ValueError as error:
        p.error(str(error))
    config = model_config(model)
    options = {"peak_proposals": config["peak_proposals"],
               "contrast_peak_proposals": config["contrast_peak_proposals"],
               "rpn_test_top_n": [config["rpn_pre_nms_top_n_test"], config["rpn_post_nms_top_n_test"]],
               "from": {"file": source.name, "sha256": model.deblend_sha256}}
    if config.get("centre_net_channels") is not None:
        options["centre_net"] = {"proposals": config["centre_proposals"], "threshold": config["centre_threshold"],
                                 "detect": config["centre_detect"],
                                 "operating_point": args.centre_operating_point}
        if args.centre_net is not None:
            options["centre_net"]["card"] = centre_net.deblend_card
    metadata = {**model.deblend_metadata, "name": out.stem, "inference_options": options}
    sha = save_weights(model, out, metadata=metadata)
    card = json.loads(card_path.read_text())
    card.update({"name": out.stem, "weights_file": out.name, "sha256": sha, "inference_options": options,
                 "metrics": None, "metrics_note": "filled in by pipelines/benchmark_quality.py"})
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s (sha256 %s) and its card: %s", out, sha[:12],
             {k: v for k, v in options.items() if k != "centre_net"})


if __name__ == "__main__":
    main()
