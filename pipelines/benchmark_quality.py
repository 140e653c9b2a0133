"""Quality benchmark: every method on the same held-out simulated scenes, scored by deblend.evaluate.

Scenes span pixel scales 0.15-0.3"/pix, PSF FWHM 0.5-1.0" and three noise levels, from
seed 2000 (training uses seeds 0 and 1 through scene_seed, so no scene is shared).

Usage (from the repository root):
    .venv/bin/python pipelines/benchmark_quality.py                     # 200 scenes, all methods
    .venv/bin/python pipelines/benchmark_quality.py --n 20 --methods sep photutils

Writes pipelines/results/quality.json and quality.md (the README table), and, when the
mask-rcnn method is benchmarked, its metrics into the model card next to the weights.
With --noise-correlation S every scene has correlated noise (as co-added images do), and the
results go to quality_corrS.json/.md. With --tta the Mask R-CNN also runs with test-time
augmentation (deblend.tta), as a further column "mask-rcnn+tta". --window-size/--overlap run the
Mask R-CNN over windows of another size; the results then go to quality_w<size>.json/.md (with
the noise suffix), and neither the figure nor the model card is written. --weights FILE.pt
benchmarks candidate weights (before shipping them): results to quality_FILE.json/.md, no figure,
no model card.
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from deblend.batch import run_batch
from deblend.catalog import make_catalog
from deblend.evaluate import compare_methods, evaluate_image, format_table, summarize
from deblend.io import read_image
from deblend.pipeline import METHODS, Deblender
from deblend.preprocess import prepare
from deblend.simulate import SceneConfig, read_truth, scene_seed, simulate_scene, write_scene

ROOT = Path(__file__).resolve().parents[1]
TTA_NAME = "mask-rcnn+tta"
FLUX_COLUMNS = ("segment_flux", "kron_flux")
NOISE_LEVELS = (0.5, 1.0, 2.0)
log = logging.getLogger("benchmark_quality")


def scene_config(seed, i, shape, noise_correlation=0.0):
    """Conditions and simulation seed of benchmark scene `i`."""
    rng = np.random.default_rng(scene_seed(seed, i))
    config = SceneConfig(shape=shape, pixel_scale=float(rng.uniform(0.15, 0.3)),
                         psf_fwhm=float(rng.uniform(0.5, 1.0)), noise_sigma=NOISE_LEVELS[i % 3],
                         noise_correlation=noise_correlation)
    return config, scene_seed(seed + 1, i)


def make_scenes(outdir, n, seed, shape, noise_correlation=0.0):
    """Simulate `n` scenes with varied conditions; returns {name: conditions}."""
    conditions = {}
    for i in range(n):
        config, sim_seed = scene_config(seed, i, shape, noise_correlation)
        scene = simulate_scene(config, seed=sim_seed, keep_sources=False)
        name = f"bench_{i:04d}"
        write_scene(scene, outdir, name)
        conditions[name] = {"pixel_scale": config.pixel_scale, "psf_fwhm": config.psf_fwhm,
                            "noise_sigma": config.noise_sigma}
    return conditions


def run_variants(truth, work, variants):
    """Deblend every scene of `truth` with each ``{name: (method, Deblender options)}`` into ``work / name``.

    Returns ``(seconds per name, prediction directories)``; a failed scene is
    an error (a benchmark with missing scenes would not compare methods).
    """
    timings, pred_dirs = {}, []
    for name, (method, options) in variants.items():
        deblender = Deblender(method, **options)
        out = Path(work) / name
        t0 = time.perf_counter()
        summary = run_batch([truth], out, deblender, progress=False)
        timings[name] = time.perf_counter() - t0
        if summary.failed:
            raise RuntimeError(f"{name} failed on {len(summary.failed)} scenes: {summary.failed[0].error}")
        pred_dirs.append(out)
        log.info("%s: %d sources in %.1f s", name, summary.n_sources, timings[name])
    return timings, pred_dirs


def run_methods(truth, work, methods, *, tta_variant=False, **options):
    """`run_variants` with one variant per method; ``options`` go to the mask-rcnn method (e.g. ``weights``).

    With ``tta_variant`` a variant ``mask-rcnn+tta`` (the same options and ``tta=True``) follows ``mask-rcnn``.
    """
    variants = {}
    for m in methods:
        variants[m] = (m, options if m == "mask-rcnn" else {})
        if m == "mask-rcnn" and tta_variant:
            variants[TTA_NAME] = (m, {**options, "tta": True})
    return run_variants(truth, work, variants)


def truth_footprint_reference(truth_dir, conditions):
    """Flux errors of the truth segmentation itself, measured as the pipeline measures segments.

    Each scene's ``truth_seg`` goes through the pipeline's preprocessing and
    `make_catalog` on the noisy image, then `evaluate_image`: the flux error
    that remains with footprints exactly of the truth convention (down to 1
    sigma of the noiseless image), i.e. the part of the error that is aperture
    loss and noise rather than segmentation. Returns ``{flux_column: summary}``
    for ``FLUX_COLUMNS``.
    """
    deblender = Deblender("sep")  # only for its preprocessing options
    results = {column: [] for column in FLUX_COLUMNS}
    for name, cond in conditions.items():
        truth_seg, truth, _ = read_truth(truth_dir, name)
        prepared = prepare(read_image(Path(truth_dir) / f"{name}.fits"), box_size=deblender.box_size,
                           filter_size=deblender.filter_size)
        catalog = make_catalog(prepared.data, truth_seg, detection=prepared.detection,
                               error=prepared.background.rms, detection_error=prepared.detection_rms,
                               mask=prepared.mask)
        for column in FLUX_COLUMNS:
            results[column].append(evaluate_image(truth_seg, catalog, truth_seg, truth, flux_column=column,
                                                  fwhm_pixels=cond["psf_fwhm"] / cond["pixel_scale"]))
    return {column: summarize(rows) for column, rows in results.items()}


def _flux_metrics(summary):
    return {k: summary[k] for k in ("median_abs_flux_error", "median_abs_flux_error_blended", "median_flux_bias")}


def flux_table(by_column, reference):
    """Markdown rows: median |Δflux|/flux (all, blended) per method and flux column, truth footprints last."""
    lines = ["", "Flux errors by catalog column (`deblend evaluate --flux-column`): `segment_flux` sums the "
             "segment, `kron_flux` is photutils' Kron flux (a total-flux estimate; pixels of neighbouring "
             "segments inside its aperture are replaced by their mirror images, photutils' default "
             "apermask_method='correct', so it too depends on the segmentation). Median |Δflux|/flux "
             "over matched sources, all / blended; the last row measures the truth footprints "
             "themselves the same way (preprocessing, photutils catalog on the noisy image): what "
             "remains with a perfect segmentation is aperture loss and noise.",
             "", "| method | " + " | ".join(f"{c}: all | {c}: blended" for c in FLUX_COLUMNS) + " |",
             "| --- |" + " --- | --- |" * len(FLUX_COLUMNS)]
    methods = [r["method"] for r in by_column[FLUX_COLUMNS[0]]]
    rows = [(m, [by_column[c][i]["summary"] for c in FLUX_COLUMNS]) for i, m in enumerate(methods)]
    rows.append(("truth footprints", [reference[c] for c in FLUX_COLUMNS]))
    for name, summaries in rows:
        cells = [f"{s['median_abs_flux_error']:.3f} | {s['median_abs_flux_error_blended']:.3f}" for s in summaries]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--shape", type=int, nargs=2, default=(192, 256))
    p.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    p.add_argument("--workdir", default="runs/benchmark_quality")
    p.add_argument("--results", default=str(ROOT / "pipelines" / "results"))
    p.add_argument("--noise-correlation", type=float, default=0.0,
                   help="correlated noise (Gaussian sigma, pixels) in every scene; results go to "
                        "quality_corr<sigma>.json/.md, and neither the figure nor the model card is written")
    p.add_argument("--window-size", type=int, default=None,
                   help="Mask R-CNN window in pixels (default: the pipeline's, 256)")
    p.add_argument("--overlap", type=int, default=None, help="overlap of the windows (default: the pipeline's, 48)")
    p.add_argument("--weights", default=None,
                   help="candidate Mask R-CNN weights instead of the shipped ones; results go to "
                        "quality_<file stem>.md/.json and the model card and figure are left alone")
    p.add_argument("--tta", action="store_true",
                   help="also run the Mask R-CNN with test-time augmentation (column mask-rcnn+tta)")
    p.add_argument("--figure", default=str(ROOT / "docs" / "recall_separation.png"),
                   help="recall against nearest-neighbour separation, every method")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    truth = work / "truth"
    t0 = time.perf_counter()
    conditions = make_scenes(truth, args.n, args.seed, tuple(args.shape), args.noise_correlation)
    suffix = f"_corr{args.noise_correlation:g}" if args.noise_correlation else ""
    windows = {k: v for k, v in (("window_size", args.window_size), ("overlap", args.overlap)) if v is not None}
    if windows:
        suffix = f"_w{args.window_size or 256}" + suffix
    options = dict(windows)
    if args.weights:
        options["weights"] = args.weights
        suffix = f"_{Path(args.weights).stem}" + suffix
    log.info("simulated %d scenes in %.0f s", args.n, time.perf_counter() - t0)

    timings, pred_dirs = run_methods(truth, work, args.methods, tta_variant=args.tta, **options)
    names = [d.name for d in pred_dirs]
    results = compare_methods(pred_dirs, truth)
    by_column = {"segment_flux": results, "kron_flux": compare_methods(pred_dirs, truth, flux_column="kron_flux")}
    for rs in by_column.values():  # name each column by its variant (mask-rcnn+tta is method mask-rcnn too)
        for r, name in zip(rs, names, strict=True):
            r["method"] = name
    reference = truth_footprint_reference(truth, conditions)
    # per noise level, from the per-image records
    by_noise = {}
    for r in results:
        for level in NOISE_LEVELS:
            rows = [img for img in r["per_image"] if conditions[img["name"]]["noise_sigma"] == level]
            by_noise.setdefault(str(level), {})[r["method"]] = summarize(rows)
    n_pix = args.n * args.shape[0] * args.shape[1]
    speed = {m: {"seconds": round(t, 2), "mpix_per_s": round(n_pix / t / 1e6, 3)} for m, t in timings.items()}
    table = format_table(results)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"n_scenes": args.n, "seed": args.seed, "weights": args.weights or "shipped",
               "shape": list(args.shape), "noise_levels": NOISE_LEVELS,
               "noise_correlation": args.noise_correlation, "mask_rcnn_windows": windows or "default",
               "pixel_scale_range": [0.15, 0.3], "psf_fwhm_range": [0.5, 1.0], "speed": speed,
               "summary": {r["method"]: r["summary"] for r in results}, "by_noise": by_noise,
               "flux_by_column": {c: {r["method"]: _flux_metrics(r["summary"]) for r in rs}
                                  for c, rs in by_column.items()},
               "truth_footprints": {c: _flux_metrics(ref) for c, ref in reference.items()}}
    (out / f"quality{suffix}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    lines = [f"{args.n} scenes {args.shape[0]}x{args.shape[1]}, seed {args.seed}, "
             f"pixel scale 0.15-0.3\"/pix, PSF FWHM 0.5-1.0\", noise sigma {NOISE_LEVELS}"
             + (f", noise correlated (Gaussian sigma {args.noise_correlation:g} px)" if args.noise_correlation else "")
             + (f", Mask R-CNN windows {windows}" if windows else ""),
             "", "```", table, "```", ""]
    lines.append("| method | seconds (in-process, 2 CPU cores) | Mpix/s |")
    lines.append("| --- | --- | --- |")
    for m, s in speed.items():
        lines.append(f"| {m} | {s['seconds']} | {s['mpix_per_s']} |")
    lines += ["", "Blended recall by noise level:", "", "| noise σ | " + " | ".join(names) + " |",
              "| --- |" + " --- |" * len(names)]
    for level, per in by_noise.items():
        lines.append(f"| {level} | " + " | ".join(f"{per[m]['blended_recall']:.3f}" for m in names) + " |")
    lines += separation_table(results)
    lines += snr_table(results)
    lines += flux_table(by_column, reference)
    (out / f"quality{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not suffix:
        separation_figure(results, args.figure)
        if "mask-rcnn" in args.methods:
            update_model_card(payload)


SEPARATION_LABELS = ("< 1", "1-2", "2-3", ">= 3")


def separation_table(results):
    """Markdown lines: recall per bin of nearest-neighbour separation (in FWHM), one column per method."""
    keys = [k for k in results[0]["summary"] if k.startswith("recall_nn_")]
    counts = results[0]["summary"]["n_by_separation"]
    lines = ["", "Recall by separation to the nearest truth neighbour (PSF FWHM; isolated sources in the last bin):",
             "", "| separation | truth sources | " + " | ".join(r["method"] for r in results) + " |",
             "| --- | --- |" + " --- |" * len(results)]
    for label, key, n in zip(SEPARATION_LABELS, keys, counts, strict=True):
        lines.append(f"| {label} | {n} | " + " | ".join(f"{r['summary'][key]:.3f}" for r in results) + " |")
    return lines


SNR_LABELS = ("5-10", "10-20", "20-50", ">= 50")  # the scenes hold no source below S/N 5


def snr_table(results):
    """Markdown lines: blended recall per bin of truth S/N (`deblend.evaluate.SNR_EDGES`), one column per method."""
    keys = [k for k in results[0]["summary"] if k.startswith("blended_recall_snr_")]
    counts = results[0]["summary"]["n_blended_by_snr"]
    lines = ["", "Blended recall by the source's truth S/N:", "",
             "| S/N | blended sources | " + " | ".join(r["method"] for r in results) + " |",
             "| --- | --- |" + " --- |" * len(results)]
    for label, key, n in zip(SNR_LABELS, keys, counts, strict=True):
        lines.append(f"| {label} | {n} | " + " | ".join(f"{r['summary'][key]:.3f}" for r in results) + " |")
    return lines


def separation_figure(results, path):
    """Recall against nearest-neighbour separation, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results[0]["summary"] if k.startswith("recall_nn_")]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in results:
        ax.plot(range(len(keys)), [r["summary"][k] for k in keys], "o-", label=r["method"])
    counts = results[0]["summary"]["n_by_separation"]
    ax.set_xticks(range(len(keys)), [f"{lab}\n(n={n})" for lab, n in zip(SEPARATION_LABELS, counts, strict=True)])
    ax.set_xlabel("separation to the nearest neighbour (PSF FWHM)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)


def update_model_card(payload):
    """Record the benchmark's Mask R-CNN metrics in the model card (the weights file is not touched)."""
    from deblend.models.registry import DEFAULT_MASK_RCNN, weights_path

    card_path = weights_path(DEFAULT_MASK_RCNN).with_suffix(".json")
    card = json.loads(card_path.read_text())
    keys = ("recall", "precision", "f1", "blended_recall", "mean_iou", "median_abs_flux_error",
            "star_galaxy_accuracy", "merged", "shredded", "n_truth", "n_pred")
    card["metrics"] = {
        "benchmark": "pipelines/benchmark_quality.py",
        "scenes": {k: payload[k] for k in ("n_scenes", "seed", "shape", "noise_levels", "pixel_scale_range",
                                           "psf_fwhm_range")},
        "mask-rcnn": {k: payload["summary"]["mask-rcnn"][k] for k in keys},
        "baselines": {m: {k: payload["summary"][m][k] for k in keys} for m in payload["summary"]
                      if m not in ("mask-rcnn", TTA_NAME)},
        "speed": payload["speed"],
    }
    if TTA_NAME in payload["summary"]:
        card["metrics"][TTA_NAME] = {k: payload["summary"][TTA_NAME][k] for k in keys}
    card.pop("metrics_note", None)
    card_path.write_text(json.dumps(card, indent=2, default=float) + "\n")
    log.info("updated %s", card_path)


if __name__ == "__main__":
    main()
