"""`Deblender`: configuration and models in, a `DeblendResult` for one image out."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from deblend.catalog import add_blend_columns, make_catalog
from deblend.classical import check_options, photutils_labels, sep_labels
from deblend.exceptions import NoSourcesWarning
from deblend.io import Image, read_image
from deblend.preprocess import prepare
from deblend.refine import CLAIM_THRESHOLD, check_claim_threshold, refine_blends
from deblend.result import DeblendResult
from deblend.tiling import make_windows

__all__ = ["Deblender", "METHODS", "SCORE_THRESHOLD"]

log = logging.getLogger(__name__)

#: Classical methods, with the function that labels a prepared detection image.
CLASSICAL = {
    "sep": sep_labels,
    "photutils": photutils_labels,
}
#: Default minimum detection score of a Mask R-CNN instance (one pass, no test-time augmentation);
#: `deblend.segment.SCORE_THRESHOLD`, repeated here so that this module needs no torch.
SCORE_THRESHOLD = 0.5
#: Every method `Deblender` knows; the first is the default.
METHODS = ("mask-rcnn", "sep", "photutils")

# Generic CLI option -> each method's own parameter name (SExtractor's for sep, photutils' for photutils).
_OPTION_NAMES = {
    "sep": {"thresh": "thresh", "minarea": "minarea", "deblend_nthresh": "deblend_nthresh",
            "deblend_cont": "deblend_cont"},
    "photutils": {"thresh": "nsigma", "minarea": "n_pixels", "deblend_nthresh": "n_levels",
                  "deblend_cont": "contrast"},
}


def _channels_last(model):
    """The model with channels-last weights: the same outputs, faster convolutions on a CPU.

    Measured in pipelines/benchmark.py's ablation (1.16x for the Mask R-CNN).
    """
    import torch

    return model.to(memory_format=torch.channels_last)


class Deblender:
    """Deblend images with one method and one configuration.

    Parameters
    ----------
    method : {'mask-rcnn', 'sep', 'photutils'}, optional
        Deblending method: the Mask R-CNN instance segmenter (default), or a
        classical baseline.
    thresh, minarea, deblend_nthresh, deblend_cont : optional
        Common detection options, translated to each method's own parameter
        (sep: ``thresh``, ``minarea``, ``deblend_nthresh``, ``deblend_cont``;
        photutils: ``nsigma``, ``n_pixels``, ``n_levels``, ``contrast``).
        None keeps the method's default.
    method_options : dict, optional
        Further keyword arguments for the method's labelling function
        (`deblend.classical.sep_labels` or `deblend.classical.photutils_labels`).
    box_size, filter_size : int, optional
        Background mesh (see `deblend.preprocess.estimate_background`).
    seed : int, optional
        Seed for any randomness (kept for the neural methods).
    device : str, optional
        ``'cpu'`` or ``'cuda'`` (neural methods).
    half : bool, optional
        Run the networks in float16 (`deblend.models.precision`): faster on
        a GPU, outputs equal up to rounding; CUDA devices only.
    weights : str or os.PathLike, optional
        Mask R-CNN weights: a shipped name or a ``.pt`` file. Default: the
        shipped ``mask_rcnn_small``.
    batch_size : int, optional
        Windows per forward pass (neural methods).
    window_size, overlap : int, optional
        Tiling of large images for the network (see `deblend.tiling.make_windows`).
    score_threshold : float, optional
        Minimum detection score (``det_score``, `deblend.segment.Instances`:
        the centre heatmap's value with the shipped weights, else
        1 - P(background)) of a Mask R-CNN instance.
        Default: 0.5, or `deblend.tta.TTA_SCORE_THRESHOLD` (0.4, on the
        fused score) with ``tta=True``.
    max_overlap : float, optional
        Mask non-maximum suppression: an instance is dropped when more than
        this fraction of its mask is claimed by higher-scoring instances
        (see `deblend.segment.suppress_duplicates`); 1 disables it. Default:
        0.5, or 1 for weights whose centre detector decides what is a source
        (``centre_detect``, `deblend.models.build_mask_rcnn`): its centres are
        distinct sources already. The coarse pass, where the box head
        decides (`deblend.coarse.detect_coarse`), keeps 0.5 unless this is
        given.
    companion_distance : float, optional
        The mask NMS keeps an instance it would drop as a duplicate when its
        centre is at least this many pixels from the centres of the
        instances covering it, its ``det_score`` is at least
        `deblend.segment.COMPANION_SCORE` and the image has a bump of its
        own there (`deblend.segment.local_contrast` at least
        `deblend.segment.COMPANION_CONTRAST`): a faint companion on a
        brighter neighbour's wing, not a second detection of the neighbour.
        0 turns this off. Default: `deblend.segment.COMPANION_DISTANCE`
        (3 pixels; shipped by rule 18, see the README).
    split_crowded : bool, optional
        Run crowded windows again as windows of half the size, each with the
        network's whole budget of region proposals (see
        `deblend.segment.detect`). Costs time only where a window is crowded.
    coarse_pass : bool, optional
        Also detect on the image binned 2x2 and let the large sources found
        there (boxes of 48 px or more) replace the pieces the full-resolution
        pass made of them (`deblend.coarse`): for fields with galaxies much
        larger than the PSF (nearby galaxies, space-telescope pixels). The
        box head decides what is a source there, even with weights whose
        centre detector decides in the full-resolution pass. Off by
        default: on simulated scenes it changed F1 by less than 0.01, and
        it added 20-50 % to the run time on real 2600x2600 mosaics (see the
        README).
    tta : bool, optional
        Test-time augmentation (`deblend.tta`): detect on the image and on
        its three flips, and keep the sources the passes agree on, with
        their masks averaged. On simulated scenes it raised recall of
        blended sources and mask IoU at about the same precision, for four
        times the detection time (twice the whole run's; see the README).
        Off by default.
    refine : bool, optional
        Re-segment blend groups with the probabilistic U-Net
        (`deblend.refine`). Default: True for ``'mask-rcnn'``, False for the
        classical methods (which can be refined too when asked).
    n_samples : int, optional
        Samples drawn per blend group.
    refine_weights : str or os.PathLike, optional
        Probabilistic U-Net weights: a shipped name or a ``.pt`` file.
        Default: the shipped ``prob_unet``.
    save_samples : bool, optional
        Keep the sampled label maps (written as a ``SAMPLES`` cube).
    seg_err_scale : float, optional
        Factor on the samples' flux spread in ``segment_flux_seg_err``. Default:
        the recalibration in the probabilistic U-Net's model card
        (``calibration.seg_err_scale``, fitted by pipelines/benchmark_refine.py
        on simulated scenes), or 1 when the card has none; 1 gives the raw spread.
    claim_threshold : float, optional
        Claim (probability) a pixel needs to join a member in the refined map
        (`deblend.refine.refine_blends`). Default: the model card's
        ``calibration.claim_threshold`` (chosen by pipelines/benchmark_refine.py
        on simulated calibration scenes), or 0.5 when the card has none.
    """

    def __init__(self, method="mask-rcnn", *, thresh=None, minarea=None, deblend_nthresh=None,
                 deblend_cont=None, method_options=None, box_size=64, filter_size=3, seed=0,
                 device="cpu", half=False, weights=None, batch_size=4, window_size=256, overlap=48,
                 score_threshold=None, max_overlap=None, companion_distance=None,
                 split_crowded=True, coarse_pass=False, tta=False,
                 refine=None, n_samples=16,
                 refine_weights=None, save_samples=False, seg_err_scale=None, claim_threshold=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if int(n_samples) != n_samples or n_samples < 2:
            raise ValueError(f"n_samples must be an integer >= 2 (the flux spread needs two), got {n_samples!r}")
        self.method = method
        self.box_size = box_size
        self.filter_size = filter_size
        self.seed = seed
        self.device = device
        if half is not False:  # the default needs no check (nor the torch import the check brings)
            from deblend.models.precision import check_half

            half = check_half(half, device)
        self.half = half
        self.weights_id = None
        self.model = None
        self.refiner = None
        self.refine = (method not in CLASSICAL) if refine is None else bool(refine)
        self.n_samples = int(n_samples)
        self.save_samples = bool(save_samples)
        options = dict(method_options or {})
        if method in CLASSICAL:
            generic = {"thresh": thresh, "minarea": minarea, "deblend_nthresh": deblend_nthresh,
                       "deblend_cont": deblend_cont}
            for key, value in generic.items():
                if value is not None:
                    options[_OPTION_NAMES[method][key]] = value
            check_options(method, options)
        else:
            ignored = [k for k, v in {"thresh": thresh, "minarea": minarea, "deblend_nthresh": deblend_nthresh,
                                      "deblend_cont": deblend_cont}.items() if v is not None]
            if ignored:
                raise ValueError(f"options {ignored} apply to the classical methods only, not to {method!r}")
            if score_threshold is None and tta:
                from deblend.tta import TTA_SCORE_THRESHOLD

                score_threshold = TTA_SCORE_THRESHOLD
            elif score_threshold is None:
                score_threshold = SCORE_THRESHOLD
            if not 0 <= score_threshold <= 1:
                raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
            if max_overlap is not None and not 0 < max_overlap <= 1:
                raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap!r}")
            if int(batch_size) != batch_size or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            make_windows((window_size, window_size), size=window_size, overlap=overlap)  # validates both
            from deblend.segment import COMPANION_DISTANCE, check_companion_options

            companion_distance, _ = check_companion_options(
                COMPANION_DISTANCE if companion_distance is None else companion_distance)
            options.update(window_size=window_size, overlap=overlap, batch_size=int(batch_size),
                           score_threshold=score_threshold, max_overlap=max_overlap,
                           companion_distance=companion_distance,
                           split_crowded=bool(split_crowded), coarse_pass=bool(coarse_pass), tta=bool(tta))
            self._load_model(weights)
            # The coarse pass lets the box head decide (deblend.coarse.detect_coarse): its mask NMS is the box
            # head's default unless one is given.
            options["coarse_max_overlap"] = 0.5 if max_overlap is None else max_overlap
            if max_overlap is None:
                centres_decide = getattr(self.model, "deblend_config", {}).get("centre_detect", False)
                options["max_overlap"] = 1.0 if centres_decide else 0.5
        self.seg_err_scale = self.claim_threshold = None
        if self.refine:
            self._load_refiner(refine_weights)
            calibration = self.refiner.deblend_card.get("calibration", {})
            card_scale = calibration.get("seg_err_scale", 1.0)
            self.seg_err_scale = float(card_scale if seg_err_scale is None else seg_err_scale)
            if not (np.isfinite(self.seg_err_scale) and self.seg_err_scale > 0):
                raise ValueError(f"seg_err_scale must be a positive number, got {self.seg_err_scale!r}")
            self.claim_threshold = check_claim_threshold(
                calibration.get("claim_threshold", CLAIM_THRESHOLD) if claim_threshold is None else claim_threshold)
        self.options = options

    def _load_model(self, weights):
        import torch

        from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn

        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA GPU is available; use device='cpu'")
        self.model = _channels_last(load_mask_rcnn(weights or DEFAULT_MASK_RCNN, device=self.device))
        self.weights_id = self.model.deblend_sha256[:16]

    def _load_refiner(self, weights):
        from deblend.models.registry import DEFAULT_PROB_UNET, load_prob_unet

        self.refiner = _channels_last(load_prob_unet(weights or DEFAULT_PROB_UNET, device=self.device))
        refine_id = self.refiner.deblend_sha256[:16]
        self.weights_id = refine_id if self.weights_id is None else f"{self.weights_id}+{refine_id}"

    def __repr__(self):
        return f"Deblender(method={self.method!r}, options={self.options!r})"

    def config(self):
        """The configuration as a JSON-serialisable dict (for manifests and provenance)."""
        return {"method": self.method, "options": dict(self.options), "box_size": self.box_size,
                "filter_size": self.filter_size, "seed": self.seed, "weights": self.weights_id,
                "half": self.half, "refine": self.refine, "n_samples": self.n_samples if self.refine else None,
                "seg_err_scale": self.seg_err_scale, "claim_threshold": self.claim_threshold}

    def settings(self):
        """The settings that shape the outputs, as FITS cards ``{keyword: (value, comment)}``.

        Written into the segmentation file's header and the catalog's ``meta``
        (values only), beside the method and weights id, so an output says how
        it was made. The full configuration is `config` (and ``manifest.jsonl``).
        """
        cards = {"DBREFINE": (bool(self.refine), "probabilistic U-Net refinement of blends")}
        if self.method not in CLASSICAL:
            opts = self.options
            cards.update({
                "DBSCORE": (float(opts["score_threshold"]), "minimum detection score"),
                "DBCOMPD": (float(opts["companion_distance"]), "mask NMS keeps companions this far (pix)"),
                "DBTTA": (bool(opts["tta"]), "test-time augmentation (four flips, fused)"),
                "DBCOARSE": (bool(opts["coarse_pass"]), "coarse pass on the image binned 2x2"),
                "DBWINDOW": (int(opts["window_size"]), "network window (pixels)"),
            })
        return cards

    def run(self, image, **read_options):
        """Deblend one image.

        Parameters
        ----------
        image : Image, ndarray, str, os.PathLike, or list of paths
            An `Image`, an array ``(ny, nx)`` / ``(n_bands, ny, nx)``, or FITS
            file(s) read with `deblend.io.read_image`.
        **read_options
            Passed to `deblend.io.read_image` when ``image`` names files.

        Returns
        -------
        DeblendResult

        Raises
        ------
        deblend.exceptions.InputError
            If a file cannot be read.
        """
        if isinstance(image, (str, os.PathLike, list, tuple)):
            image = read_image(image, **read_options)
        elif not isinstance(image, Image):
            image = Image.from_array(image)
        prepared = prepare(image, box_size=self.box_size, filter_size=self.filter_size)
        instances = None
        normalized = prepared.normalized() if (self.refine or self.method not in CLASSICAL) else None
        if self.method in CLASSICAL:
            labels = CLASSICAL[self.method](prepared.detection, prepared.detection_rms,
                                            mask=prepared.mask, **self.options)
        else:
            labels, instances = self._segment(prepared, normalized)
        refinement = None
        if self.refine:
            flux_images = prepared.data if prepared.data.shape[0] == 1 else np.concatenate(
                [prepared.detection[np.newaxis], prepared.data])
            refinement = refine_blends(normalized, labels, flux_images, model=self.refiner,
                                       mask=prepared.mask, n_samples=self.n_samples, seed=self.seed,
                                       device=self.device, half=self.half, save_samples=self.save_samples,
                                       claim_threshold=self.claim_threshold)
            labels = refinement.labels
        catalog = make_catalog(prepared.data, labels, detection=prepared.detection,
                               error=prepared.background.rms, detection_error=prepared.detection_rms,
                               mask=prepared.mask, wcs=image.wcs, band_names=image.band_names,
                               method=self.method, weights_id=self.weights_id)
        if instances is not None:
            catalog["class"] = instances.class_names.astype("U6")
            catalog["class_prob"] = instances.class_prob.astype("float32")
            catalog["det_score"] = instances.det_score.astype("float32")
        settings = self.settings()
        catalog.meta.update({key: value for key, (value, _) in settings.items()})
        extensions = {}
        if refinement is not None:
            add_blend_columns(catalog, refinement, band_names=image.band_names, seg_err_scale=self.seg_err_scale)
            extensions["UNCERTAINTY"] = refinement.uncertainty
            if refinement.samples is not None:
                extensions["SAMPLES"] = refinement.samples
        if len(catalog) == 0:
            warnings.warn(f"{image.path}: no sources detected", NoSourcesWarning, stacklevel=2)
        log.info("%s: %d sources (%s)", image.path, len(catalog), self.method)
        return DeblendResult(labels=labels, catalog=catalog, image=image, method=self.method,
                             weights_id=self.weights_id, extensions=extensions, settings=settings)

    def _segment(self, prepared, normalized):
        """Mask R-CNN over the normalised detection image → (labels, kept instances in label order)."""
        from deblend.coarse import detect_coarse, merge_coarse
        from deblend.segment import detect, instances_to_labels, suppress_duplicates
        from deblend.tta import detect_tta

        opts = self.options
        common = dict(model=self.model, batch_size=opts["batch_size"], device=self.device, half=self.half,
                      score_threshold=opts["score_threshold"], split_crowded=opts["split_crowded"])
        find = detect_tta if opts["tta"] else detect
        instances = find(normalized, mask=prepared.mask, window_size=opts["window_size"],
                         overlap=opts["overlap"], **common)
        if opts["coarse_pass"]:
            large = detect_coarse(prepared.detection, prepared.detection_rms, mask=prepared.mask,
                                  window_size=opts["window_size"], max_overlap=opts["coarse_max_overlap"],
                                  tta=opts["tta"], **common)
            instances = merge_coarse(instances, large, normalized.shape)
        instances = suppress_duplicates(instances, normalized.shape, max_overlap=opts["max_overlap"],
                                        companion_distance=opts["companion_distance"], image=normalized)
        labels, keep = instances_to_labels(instances, normalized.shape, mask=prepared.mask)
        return labels, instances.select(keep)
