"""The ``deblend`` command: a thin layer over the public API.

Commands
--------
``deblend run INPUT... -o OUTDIR [--resume | --overwrite]``
    Deblend FITS files and directories into segmentation maps and catalogs.
``deblend merge OUTDIR -o SURVEY_CATALOG [--match-radius ARCSEC]``
    Merge the catalogs of overlapping tiles into one, each source once.
``deblend simulate --n N --out DIR --seed S``
    Make simulated blended scenes with ground truth.
``deblend evaluate --pred DIR [DIR ...] --truth DIR``
    Score predictions against simulation truth, several methods side by side.
"""

from __future__ import annotations

import argparse
import logging
import sys

from deblend._version import __version__

__all__ = ["main", "build_parser"]

log = logging.getLogger("deblend")


def _add_run(sub):
    from deblend.io import CATALOG_FORMATS
    from deblend.pipeline import METHODS

    p = sub.add_parser("run", help="deblend FITS files or directories",
                       description="Deblend FITS images. For each input <stem>.fits, writes "
                                   "OUTDIR/<stem>_seg.fits (int32 label map with the input's WCS) and "
                                   "OUTDIR/<stem>_cat.<ext> (one row per label), and appends one JSON "
                                   "record per input to OUTDIR/manifest.jsonl. A bad file is reported "
                                   "and skipped; the exit status is 1 when any input failed, 130 when "
                                   "interrupted (run again with --resume to finish).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="FITS file(s) and/or directories")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    p.add_argument("--method", default=METHODS[0], choices=METHODS,
                   help=f"deblending method (default: {METHODS[0]})")
    p.add_argument("--format", default="fits", choices=sorted(CATALOG_FORMATS),
                   help="catalog format (default: fits)")
    redo = p.add_mutually_exclusive_group()
    redo.add_argument("--overwrite", action="store_true", help="redo every input, replacing existing outputs")
    redo.add_argument("--resume", action="store_true",
                      help="skip inputs whose outputs are up to date according to OUTDIR/manifest.jsonl "
                           "(same input checksum, configuration and format); redo failed and changed ones")
    p.add_argument("--bands", action="store_true",
                   help="treat all inputs as single-band images of one field (one multi-band output)")
    p.add_argument("--hdu", default=None, help="HDU holding the image (index or EXTNAME); "
                                                "default: first HDU with 2-D or 3-D data")
    p.add_argument("--mask-bits", type=lambda s: int(s, 0), default=None,
                   help="bits of a MASK HDU that flag bad pixels (e.g. 0x1)")
    p.add_argument("--no-recursive", action="store_true", help="do not search directories recursively")
    p.add_argument("--regions", action="store_true",
                   help="also write OUTDIR/<stem>.reg: a DS9 region file with one ellipse (2 sigma) per source")
    p.add_argument("--quicklook", action="store_true",
                   help="also write OUTDIR/<stem>_quicklook.png: the image with the segmentation outlines "
                        "(a plot that fails is a warning, never a failed input)")
    par = p.add_argument_group("parallel execution (needs: pip install \"deblend[parallel]\")")
    where = par.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="start a local Dask cluster of N worker processes (torch threads per worker: "
                            "cores // N); default: deblend in this process")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="use an existing Dask cluster, e.g. tcp://host:8786 (see README: dask-jobqueue)")
    n = p.add_argument_group("neural methods")
    n.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    n.add_argument("--half", action="store_true",
                   help="run the networks in float16 (CUDA GPUs only; faster there, same outputs up to rounding)")
    n.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    n.add_argument("--weights", default=None,
                   help="weights name or .pt file (default: the shipped model, mask_rcnn_small, whose centre "
                        "detector decides what is a source; also shipped: mask_rcnn_boxhead, the default before, "
                        "where the box head decides: more sources in images with correlated noise, at lower precision)")
    n.add_argument("--score-threshold", type=float, default=None,
                   help="minimum detection score (default 0.5; with --tta, 0.4 on the fused score)")
    n.add_argument("--companion-distance", type=float, default=None, metavar="PIX",
                   help="the mask NMS keeps a detection covered by a brighter one's mask as a companion when "
                        "its centre is this far from the brighter one's and the image has a bump there "
                        "(default: the pipeline's; 0: off; only where the mask NMS is on, which it is not by "
                        "default with the shipped weights: their centre detector decides)")
    n.add_argument("--window-size", type=int, default=256, help="network window in pixels (default 256)")
    n.add_argument("--overlap", type=int, default=48, help="overlap of windows in pixels (default 48)")
    n.add_argument("--no-split-crowded", dest="split_crowded", action="store_false",
                   help="do not run crowded windows again as half-size windows (faster in crowded fields; "
                        "sources beyond the network's proposal budget are then lost)")
    n.add_argument("--coarse-pass", action="store_true",
                   help="also detect on a 2x2-binned copy of the image; sources found there with boxes of 48 px "
                        "or more replace the pieces the full-resolution pass made of them (for galaxies much "
                        "larger than the PSF)")
    n.add_argument("--tta", action="store_true",
                   help="test-time augmentation: detect on the image and its three flips and keep what the "
                        "passes agree on (more blended sources and better masks, about 4x the detection time)")
    r = p.add_argument_group("blend refinement (probabilistic U-Net; default on for mask-rcnn)")
    onoff = r.add_mutually_exclusive_group()
    onoff.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                       help="keep the detector's masks; no segmentation errors")
    onoff.add_argument("--refine", dest="refine", action="store_true",
                       help="refine blends of a classical method's segmentation too")
    r.add_argument("--samples", type=int, default=16, metavar="N", help="samples per blend group (default 16)")
    r.add_argument("--save-samples", action="store_true",
                   help="also write the sampled label maps as a SAMPLES cube in <stem>_seg.fits")
    r.add_argument("--refine-weights", default=None,
                   help="probabilistic U-Net weights name or .pt file (default: the shipped model)")
    g = p.add_argument_group("classical options (SExtractor names; photutils equivalents in brackets)")
    g.add_argument("--thresh", type=float, default=None, help="detection threshold in σ [nsigma] (1.5)")
    g.add_argument("--minarea", type=int, default=None, help="minimum pixels per source [n_pixels] (5)")
    g.add_argument("--deblend-nthresh", type=int, default=None, help="deblending levels [n_levels] (32)")
    g.add_argument("--deblend-cont", type=float, default=None,
                   help="deblending minimum contrast [contrast] (sep 0.005, photutils 0.001)")
    p.set_defaults(func=_cmd_run)


def _add_simulate(sub):
    p = sub.add_parser("simulate", help="make simulated blended scenes with ground truth",
                       description="Write N GalSim scenes <prefix>_<i>.fits with truth "
                                   "(<name>_truth_seg.fits, <name>_truth.fits) into DIR.")
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--prefix", default="scene", help="scene name prefix (default: scene)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("NY", "NX"), default=None, help="image shape")
    p.add_argument("--pixel-scale", type=float, default=None, help="arcsec per pixel")
    p.add_argument("--psf-fwhm", type=float, default=None, help="Moffat PSF FWHM in arcsec")
    p.add_argument("--noise", type=float, default=None, help="pixel noise σ")
    p.add_argument("--density", type=float, default=None, help="source density (see SceneConfig)")
    p.add_argument("--star-fraction", type=float, default=None, help="fraction of stars")
    p.add_argument("--blend-fraction", type=float, default=None,
                   help="fraction of sources given a close companion")
    p.add_argument("--n-bands", type=int, default=None, help="number of bands (default 1)")
    p.add_argument("--min-snr", type=float, default=None,
                   help="sources below this S/N are not drawn (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing scenes")
    p.set_defaults(func=_cmd_simulate)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="score predictions against simulation truth",
                       description="Match each prediction directory (outputs of `deblend run`) to the "
                                   "truth of `deblend simulate` and print the metrics side by side.")
    p.add_argument("--pred", nargs="+", required=True, metavar="DIR", help="prediction directories")
    p.add_argument("--truth", required=True, metavar="DIR", help="directory of simulated scenes and truth")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--min-snr", type=float, default=0.0, help="ignore truth sources below this S/N")
    p.add_argument("--flux-column", default="segment_flux", metavar="NAME",
                   help="catalog flux column to score against the true fluxes (default segment_flux; "
                        "kron_flux for total fluxes)")
    p.set_defaults(func=_cmd_evaluate)


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge the catalogs of overlapping tiles into one survey catalog",
                       description="Read every <stem>_cat.<ext> under OUTDIR (outputs of `deblend run`), add "
                                   "source_file, tile and edge_distance columns, and keep one row per source "
                                   "where tiles overlap: detections of different tiles closer than the match "
                                   "radius on the sky are one source, kept from the tile where it lies "
                                   "farthest from the edge. Catalogs without ra/dec (inputs without a WCS) "
                                   "are left out with a warning.")
    p.add_argument("outdir", metavar="OUTDIR", help="output directory of `deblend run`")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="merged catalog; the format follows the extension (.fits, .ecsv, .csv, .parquet, .xml)")
    p.add_argument("--match-radius", type=float, default=1.0, metavar="ARCSEC",
                   help="detections of different tiles closer than this are one source (default 1 arcsec)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged catalog")
    p.set_defaults(func=_cmd_merge)


def build_parser():
    """The argument parser of the ``deblend`` command."""
    parser = argparse.ArgumentParser(prog="deblend", description="Deblend astronomical survey images.")
    parser.add_argument("--version", action="version", version=f"deblend {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_simulate(sub)
    _add_evaluate(sub)
    _add_merge(sub)
    return parser


def _cmd_run(args):
    from deblend.batch import run_batch
    from deblend.pipeline import Deblender

    try:
        deblender = Deblender(args.method, thresh=args.thresh, minarea=args.minarea,
                              deblend_nthresh=args.deblend_nthresh, deblend_cont=args.deblend_cont,
                              device=args.device, half=args.half, batch_size=args.batch_size,
                              weights=args.weights,
                              score_threshold=args.score_threshold, companion_distance=args.companion_distance,
                              window_size=args.window_size,
                              overlap=args.overlap, split_crowded=args.split_crowded, coarse_pass=args.coarse_pass,
                              tta=args.tta,
                              refine=args.refine, n_samples=args.samples,
                              save_samples=args.save_samples, refine_weights=args.refine_weights)
    except FileNotFoundError as exc:  # missing weights: the message says how to get them
        log.error("%s", exc)
        return 2
    hdu = args.hdu
    if hdu is not None and hdu.lstrip("-").isdigit():
        hdu = int(hdu)
    read_options = {"hdu": hdu, "mask_bits": args.mask_bits}
    try:
        summary = run_batch(args.inputs, args.outdir, deblender, format=args.format,
                            overwrite=args.overwrite, resume=args.resume, as_bands=args.bands,
                            recursive=not args.no_recursive, progress=None if not args.quiet else False,
                            read_options=read_options, regions=args.regions, workers=args.workers,
                            scheduler=args.scheduler, quicklook=args.quicklook)
    except (FileNotFoundError, ImportError, ConnectionError) as exc:  # missing input, Dask, or scheduler
        log.error("%s", exc)
        return 2
    if not summary.records:
        log.error("no FITS files found in %s", " ".join(args.inputs))
        return 2
    stream = sys.stderr if summary.failed else sys.stdout
    if not args.quiet or summary.failed:
        print(summary.report(), file=stream)
    return 1 if summary.failed else 0


def _cmd_simulate(args):
    from dataclasses import replace

    from deblend.simulate import SceneConfig, simulate_directory

    config = SceneConfig()
    changes = {"shape": tuple(args.shape) if args.shape else None, "pixel_scale": args.pixel_scale,
               "psf_fwhm": args.psf_fwhm, "noise_sigma": args.noise, "density": args.density,
               "star_fraction": args.star_fraction, "blend_fraction": args.blend_fraction,
               "n_bands": args.n_bands, "min_snr": args.min_snr}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    names = simulate_directory(args.out, args.n, config=config, seed=args.seed, prefix=args.prefix,
                               overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {len(names)} scenes to {args.out}")
    return 0


def _cmd_evaluate(args):
    from deblend.evaluate import compare_methods, format_table, write_json

    results = compare_methods(args.pred, args.truth, min_snr=args.min_snr, flux_column=args.flux_column)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    return 0


def _cmd_merge(args):
    from pathlib import Path

    from deblend.io import catalog_format, write_catalog
    from deblend.merge import merge_catalogs

    output = Path(args.output)
    catalog_format(output)  # an unknown extension fails before any catalog is read
    if output.exists() and not args.overwrite:
        log.error("%s exists; use --overwrite to replace it", output)
        return 1
    try:
        merged = merge_catalogs(args.outdir, match_radius=args.match_radius)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    write_catalog(merged, output, overwrite=args.overwrite)
    if not args.quiet:
        meta = merged.meta
        print(f"merged {meta['n_files']} catalogs: {meta['n_before']} detections, {meta['n_after']} sources "
              f"({meta['n_before'] - meta['n_after']} duplicates removed) -> {output}")
    return 0


def main(argv=None):
    """Entry point of the ``deblend`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    try:
        return args.func(args)
    except ValueError as exc:  # bad option values: the message names the parameter
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        hint = "; run again with --resume to finish" if args.command == "run" else ""
        log.error("interrupted; finished outputs are complete, no partial files were left%s", hint)
        return 130


if __name__ == "__main__":
    sys.exit(main())
