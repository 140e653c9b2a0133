"""Training data and training loop for the Mask R-CNN instance segmenter.

Training scenes come from `deblend.simulate` with randomised survey
conditions (pixel scale, PSF FWHM, noise level, sky gradient, density, blend
fraction, masked regions) so one model serves many surveys. Each scene goes
through exactly the preprocessing used at inference (`deblend.preprocess`),
and its targets are the truth segmentation of DESIGN.md: one instance per
truth source, the mask being the pixels it owns, the class star or galaxy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deblend.io import Image
from deblend.preprocess import prepare
from deblend.simulate import SceneConfig, scene_seed, simulate_scene

__all__ = [
    "ConditionRanges",
    "sample_config",
    "make_example",
    "make_examples",
    "save_examples",
    "load_examples",
    "targets_from_truth",
    "SceneDataset",
    "collate",
    "compute_losses",
    "TrainConfig",
    "freeze_batchnorm",
    "freeze_except",
    "train_mask_rcnn",
]

log = logging.getLogger(__name__)


@dataclass
class ConditionRanges:
    """Ranges of survey conditions that training scenes are drawn from (uniform unless noted)."""

    shape: tuple = (128, 128)
    pixel_scale: tuple = (0.1, 0.3)  # arcsec / pixel
    psf_fwhm: tuple = (0.5, 1.1)  # arcsec
    noise_sigma: tuple = (0.5, 3.0)  # log-uniform; fluxes are fixed, so this sets the depth
    sky_gradient: tuple = (0.0, 4.0)  # total change across the image, in units of the noise sigma
    density: tuple = (40.0, 400.0)  # log-uniform, sources per arcmin^2
    star_fraction: tuple = (0.05, 0.4)
    blend_fraction: tuple = (0.2, 0.8)
    masked_fraction: float = 0.2  # fraction of scenes with a masked region (NaN stripe or box)
    correlated_fraction: float = 0.0  # fraction of scenes with correlated noise (co-adds, resampling)
    noise_correlation: tuple = (0.5, 1.5)  # Gaussian sigma of the correlation, pixels (those scenes)
    # Largest galaxy half-light radius of a scene, arcsec, log-uniform; galaxies are drawn
    # log-uniformly from 0.15" up to it. A range reaching past 1.5" shows the network galaxies
    # tens of pixels across (space-like pixels, nearby galaxies), which it otherwise shreds.
    r_half_max: tuple = (1.5, 1.5)
    # Fraction of space-telescope-like scenes: fine pixels, a sharp PSF and a deep, dense field,
    # where galaxies are resolved far beyond the PSF (knots and bulges show) and must stay whole.
    space_fraction: float = 0.0
    space_pixel_scale: tuple = (0.04, 0.1)  # arcsec / pixel
    space_psf_fwhm: tuple = (0.1, 0.3)  # arcsec
    space_density: tuple = (300.0, 1500.0)  # log-uniform, sources per arcmin^2


def _uniform(rng, lo_hi):
    return float(rng.uniform(*lo_hi))


def _log_uniform(rng, lo_hi):
    return float(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))


def sample_config(rng, ranges=None):
    """Draw one `SceneConfig` from ``ranges``.

    Parameters
    ----------
    rng : numpy.random.Generator
    ranges : ConditionRanges, optional

    Returns
    -------
    deblend.simulate.SceneConfig
    """
    r = ranges or ConditionRanges()
    pixel_scale, psf_fwhm = _uniform(rng, r.pixel_scale), _uniform(rng, r.psf_fwhm)
    noise_sigma = _log_uniform(rng, r.noise_sigma)
    extra = {}
    # Drawn only when asked for, so recipes without correlated noise keep their random streams.
    if r.correlated_fraction > 0 and rng.random() < r.correlated_fraction:
        extra["noise_correlation"] = _uniform(rng, r.noise_correlation)
    drawn = dict(
        shape=tuple(r.shape),
        pixel_scale=pixel_scale,
        psf_fwhm=psf_fwhm,
        noise_sigma=noise_sigma,
        sky_gradient=min(1.0, _uniform(rng, r.sky_gradient) * noise_sigma / SceneConfig.sky_level),
        density=_log_uniform(rng, r.density),
        star_fraction=_uniform(rng, r.star_fraction),
        blend_fraction=_uniform(rng, r.blend_fraction),
    )
    # Likewise drawn last and only when asked for.
    if r.space_fraction > 0 and rng.random() < r.space_fraction:
        drawn.update(pixel_scale=_uniform(rng, r.space_pixel_scale), psf_fwhm=_uniform(rng, r.space_psf_fwhm),
                     density=_log_uniform(rng, r.space_density))
    lo, hi = r.r_half_max
    if hi > lo:
        extra["r_half_range"] = (SceneConfig.r_half_range[0], _log_uniform(rng, r.r_half_max))
    elif lo != SceneConfig.r_half_range[1]:
        extra["r_half_range"] = (SceneConfig.r_half_range[0], float(lo))
    return SceneConfig(**drawn, **extra)


def _masked_region(rng, shape):
    """A random bad-pixel region: a column/row stripe or a box (True = bad)."""
    ny, nx = shape
    bad = np.zeros(shape, dtype=bool)
    if rng.random() < 0.5:
        width = int(rng.integers(1, 6))
        if rng.random() < 0.5:
            x0 = int(rng.integers(0, nx - width))
            bad[:, x0:x0 + width] = True
        else:
            y0 = int(rng.integers(0, ny - width))
            bad[y0:y0 + width, :] = True
    else:
        h, w = int(rng.integers(ny // 8, ny // 3)), int(rng.integers(nx // 8, nx // 3))
        y0, x0 = int(rng.integers(0, ny - h)), int(rng.integers(0, nx - w))
        bad[y0:y0 + h, x0:x0 + w] = True
    return bad


def targets_from_truth(truth_seg, truth, *, mask=None):
    """Mask R-CNN targets from a truth segmentation and truth table.

    Parameters
    ----------
    truth_seg : ndarray of int, shape (ny, nx)
        Truth labels (label = truth ``id``).
    truth : astropy.table.Table
        With ``id`` and ``is_star``.
    mask : ndarray of bool, shape (ny, nx), optional
        Bad pixels: they are removed from the masks, and sources left with no
        pixel are dropped.

    Returns
    -------
    seg : ndarray of int32, shape (ny, nx)
        Truth labels with masked pixels zeroed (compact storage of the masks).
    classes : ndarray of int64, shape (n,)
        Class per label 1..max(seg) (index ``label - 1``): 1 = star, 2 = galaxy.
    """
    seg = np.asarray(truth_seg, dtype=np.int32).copy()
    if mask is not None:
        seg[mask] = 0
    n = int(truth_seg.max()) if truth_seg.size else 0
    classes = np.zeros(n, dtype=np.int64)
    ids = np.asarray(truth["id"], dtype=np.int64)
    classes[ids - 1] = np.where(np.asarray(truth["is_star"], dtype=bool), 1, 2)
    return seg, classes


def make_example(seed, *, ranges=None):
    """Simulate one scene and turn it into a training example.

    Parameters
    ----------
    seed : int
    ranges : ConditionRanges, optional

    Returns
    -------
    dict
        ``image`` (float32 (ny, nx), the normalised detection image the
        network sees), ``seg`` (int32 truth labels), ``classes`` (int64 class
        per label), ``centres`` (float32 ``(x, y)`` per label, the truth
        positions), ``config`` (dict).
    """
    rng = np.random.default_rng(seed)
    ranges = ranges or ConditionRanges()
    config = sample_config(rng, ranges)
    scene = simulate_scene(config, seed=int(rng.integers(0, 2**62)), keep_sources=False)
    data = scene.image.astype(np.float32)
    bad = _masked_region(rng, config.shape) if rng.random() < ranges.masked_fraction else None
    if bad is not None:
        data = data.copy()
        data[bad] = np.nan
    image = Image.from_array(data)
    prepared = prepare(image)
    normalized = prepared.normalized()
    seg, classes = targets_from_truth(scene.truth_seg, scene.truth, mask=image.mask)
    centres = np.full((len(classes), 2), np.nan, np.float32)
    ids = np.asarray(scene.truth["id"], dtype=np.int64)
    centres[ids - 1] = np.stack([np.asarray(scene.truth["x"]), np.asarray(scene.truth["y"])], axis=1)
    return {"image": normalized, "seg": seg, "classes": classes, "centres": centres, "config": asdict(config)}


def make_examples(n, *, seed, ranges=None, progress=False):
    """Make ``n`` examples; example ``i`` uses ``scene_seed(seed, i)`` (reproducible, independent).

    Parameters
    ----------
    n : int
    seed : int
    ranges : ConditionRanges, optional
    progress : bool, optional

    Returns
    -------
    list of dict
    """
    from tqdm.auto import tqdm

    return [make_example(scene_seed(seed, i), ranges=ranges)
            for i in tqdm(range(n), disable=not progress, desc="scenes", unit="scene")]


def save_examples(examples, path):
    """Cache examples in one ``.npz`` file (atomic)."""
    from deblend.io import atomic_path

    images = np.stack([e["image"] for e in examples]).astype(np.float16)
    segs = np.stack([e["seg"] for e in examples]).astype(np.int16)
    n_classes = np.array([len(e["classes"]) for e in examples])
    classes = np.concatenate([e["classes"] for e in examples]) if examples else np.zeros(0, np.int64)
    centres = (np.concatenate([e["centres"] for e in examples]) if examples and "centres" in examples[0]
               else np.zeros((0, 2), np.float32))
    configs = json.dumps([e["config"] for e in examples])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images, segs=segs, n_classes=n_classes,
                                classes=classes.astype(np.int8), centres=centres.astype(np.float32),
                                configs=np.array(configs))


def load_examples(path):
    """Load examples cached by `save_examples`."""
    with np.load(path) as z:
        images, segs = z["images"].astype(np.float32), z["segs"].astype(np.int32)
        n_classes, classes = z["n_classes"], z["classes"].astype(np.int64)
        configs = json.loads(str(z["configs"]))
        centres = z["centres"] if "centres" in z.files else None  # caches written before centres
    offsets = np.concatenate([[0], np.cumsum(n_classes)])
    examples = [{"image": images[i], "seg": segs[i], "classes": classes[offsets[i]:offsets[i + 1]],
                 "config": configs[i]} for i in range(len(images))]
    if centres is not None and len(centres) == offsets[-1]:
        for i, example in enumerate(examples):
            example["centres"] = centres[offsets[i]:offsets[i + 1]]
    return examples


def _instances(seg, classes):
    """Boxes, labels and masks of every instance present in ``seg``."""
    present = np.unique(seg[seg > 0])
    if present.size == 0:
        h, w = seg.shape
        return (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros((0, h, w), np.uint8))
    masks = (seg[None] == present[:, None, None])
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    return boxes, classes[present - 1], masks.astype(np.uint8)


class SceneDataset(torch.utils.data.Dataset):
    """Examples as (image tensor (1, H, W), target dict), with flips and 90° rotations.

    Parameters
    ----------
    examples : list of dict
        From `make_examples` or `load_examples`.
    augment : bool, optional
        Random flips and 90° rotations (the sky has no preferred orientation).
    seed : int, optional
        Seed of the augmentation draws (combined with the item index and an
        epoch counter, so runs are reproducible).
    """

    def __init__(self, examples, *, augment=True, seed=0):
        self.examples = examples
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        ex = self.examples[index]
        image, seg = ex["image"], ex["seg"]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            k = int(rng.integers(4))
            image, seg = np.rot90(image, k), np.rot90(seg, k)
            if rng.random() < 0.5:
                image, seg = image[:, ::-1], seg[:, ::-1]
        image = np.ascontiguousarray(image, dtype=np.float32)
        boxes, labels, masks = _instances(np.ascontiguousarray(seg), ex["classes"])
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                  "masks": torch.from_numpy(masks)}
        return torch.from_numpy(image)[None], target


def collate(batch):
    """Keep images and targets as lists (torchvision detection convention)."""
    return tuple(zip(*batch, strict=True))


def compute_losses(model, images, targets):
    """Training losses without updating weights or BatchNorm statistics (validation loss).

    torchvision detection models only return losses in training mode; this
    puts the model in training mode with every BatchNorm frozen, under
    ``torch.no_grad``, and restores the previous mode.

    Returns
    -------
    dict of str to float
    """
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        with torch.no_grad():
            losses = model(list(images), list(targets))
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in losses.items()}


@dataclass
class TrainConfig:
    """Optimisation settings (recorded in the model card)."""

    steps: int = 6000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 10.0
    checkpoint_every: int = 250
    log_every: int = 50
    val_every: int = 500
    seed: int = 0
    # With a time budget the learning-rate schedule runs on the larger of step and time progress,
    # so a slower machine still completes the schedule (with fewer steps, recorded in the card).
    max_minutes: float | None = None
    # RoI sampling per image in training: torchvision's 512 makes RoIAlign's single-threaded
    # backward dominate on CPU (1.6 s/step vs 0.5 s/step at 64 on 2 cores, batch 4 of 128²).
    box_batch_size_per_image: int = 64
    box_positive_fraction: float = 0.5
    # IoU thresholds that make an anchor (RPN) or a proposal (box head) a positive or a negative
    # training example (torchvision's defaults: 0.7/0.3 and 0.5/0.5). Sources a few pixels wide
    # overlap the stride-4 anchor grid poorly, so at 0.7 most get only their one best anchor.
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    # Add the inference-time peak and contrast-peak boxes (the model's own counts,
    # deblend.models.mask_rcnn.peak_boxes) to the box head's training proposals.
    peak_proposals: bool = False
    # Normalise with the initial weights' BatchNorm running statistics and never update them
    # (`freeze_batchnorm`); for fine-tuning, so that the batch size does not change them.
    freeze_batchnorm: bool = False


def _progress(step, elapsed, cfg):
    """Fraction of the run done: by steps, or by wall time when that is further along."""
    progress = step / cfg.steps
    if cfg.max_minutes is not None:
        progress = max(progress, elapsed / (60.0 * cfg.max_minutes))
    return min(1.0, progress)


def _lr_factor(step, progress, cfg):
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5 % over the run's progress."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _loggable(record):
    """A logged record for display: losses to 4 decimals, the learning rate to 3 significant digits.

    (Rounded to 4 decimals, a learning rate below 5e-5 would read 0.0.)
    """
    return {k: (float(f"{v:.3g}") if k == "lr" else round(v, 4)) if isinstance(v, float) else v
            for k, v in record.items()}


def _save_checkpoint(path, model, optimizer, step, history):
    tmp = Path(path).with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": history}, tmp)
    os.replace(tmp, path)


def fit(model, batch_loss, *, config, validate=None, checkpoint_dir=None, resume=True, device="cpu"):
    """The optimisation loop both networks are trained with.

    AdamW; linear warm-up then cosine decay on the larger of step and
    time-budget progress; gradient-norm clipping; running means of the loss
    terms logged every ``config.log_every`` steps, with ``validate()`` every
    ``config.val_every``; ``last.pt`` checkpoints every
    ``config.checkpoint_every`` steps and at the end; resume from it.

    Parameters
    ----------
    model : torch.nn.Module
    batch_loss : callable
        ``batch_loss(step, rng) -> (loss, terms)``: draws the step's batch with
        ``rng`` (a numpy Generator seeded from ``config.seed`` and the step the
        run starts at) and returns the loss to minimise and a dict of named
        loss tensors to log.
    config : TrainConfig or deblend.refine_training.RefineTrainConfig
        Reads ``steps, lr, weight_decay, warmup_steps, grad_clip,
        checkpoint_every, log_every, val_every, seed, max_minutes``.
    validate : callable, optional
        ``validate() -> dict of float`` added to the logged record; the model is
        put back in training mode afterwards.
    checkpoint_dir : str or os.PathLike, optional
    resume : bool, optional
    device : str, optional

    Returns
    -------
    dict
        ``history`` (list of logged records), ``steps`` done, ``wall_time`` (s),
        ``stopped_early`` (bool: the time budget ended the run).
    """
    cfg = config
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history = 0, []
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, history = state["step"], state["history"]
            log.info("resumed from %s at step %d", ckpt, step)
    rng = np.random.default_rng([cfg.seed, step])
    start = time.perf_counter()
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    stopped_early, running, n_run = False, {}, 0
    while step < cfg.steps:
        progress = _progress(step, elapsed_before + time.perf_counter() - start, cfg)
        if progress >= 1.0:
            log.info("time budget of %s min spent at step %d of %d", cfg.max_minutes, step, cfg.steps)
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, progress, cfg)
        loss, terms = batch_loss(step, rng)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: { {k: float(v) for k, v in terms.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        n_run += 1
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if step % cfg.log_every == 0:
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"],
                      "elapsed_s": round(elapsed_before + time.perf_counter() - start, 1),
                      **{k: v / n_run for k, v in running.items()}}
            running, n_run = {}, 0
            if validate is not None and step % cfg.val_every == 0:
                record.update(validate())
                model.train()
            history.append(record)
            log.info("step %d: %s", step, _loggable(record))
        if ckpt is not None and step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, model, optimizer, step, history)
    if ckpt is not None:
        _save_checkpoint(ckpt, model, optimizer, step, history)
    model.eval()
    return {"history": history, "steps": step, "wall_time": elapsed_before + time.perf_counter() - start,
            "stopped_early": stopped_early}


def freeze_except(model, prefixes):
    """Train only the parameters whose names start with one of ``prefixes``.

    Every other parameter gets ``requires_grad=False`` (so `fit` leaves it
    alone), and every BatchNorm outside ``prefixes`` stays in eval mode,
    keeping its running statistics, even when ``model.train()`` is called.

    Parameters
    ----------
    model : torch.nn.Module
    prefixes : tuple of str
        Parameter-name prefixes, e.g. ``deblend.models.mask_rcnn.MASK_BRANCH``.

    Returns
    -------
    int
        The number of scalar parameters left trainable.

    Raises
    ------
    ValueError
        If no parameter name starts with any of ``prefixes``.
    """
    prefixes = tuple(prefixes)
    n_trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        n_trainable += param.numel() if param.requires_grad else 0
    if not n_trainable:
        raise ValueError(f"no parameter of the model starts with any of prefixes={prefixes!r}; "
                         "pass prefixes of names from model.named_parameters()")
    freeze_batchnorm(model, exclude=prefixes)
    return n_trainable


def freeze_batchnorm(model, *, exclude=()):
    """Keep every BatchNorm of ``model`` in eval mode, even when ``model.train()`` is called.

    A frozen BatchNorm normalises with its running statistics and leaves them
    unchanged; its affine weights still train if they require gradients. The
    usual choice when fine-tuning a detector: the statistics the network was
    trained with stay, whatever the new batch size.

    Parameters
    ----------
    model : torch.nn.Module
    exclude : tuple of str, optional
        Module-name prefixes whose BatchNorms keep training normally.

    Returns
    -------
    int
        The number of BatchNorm layers frozen.
    """
    exclude = tuple(exclude)
    frozen_norms = [m for name, m in model.named_modules()
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    and not (exclude and (name + ".").startswith(exclude))]
    train = model.train

    def train_keeping_frozen_norms(mode=True):
        train(mode)
        for module in frozen_norms:
            module.eval()
        return model

    model.train = train_keeping_frozen_norms
    model.train(model.training)
    return len(frozen_norms)


def _to_device(images, targets, device):
    """A collated batch's images and targets on ``device``."""
    return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def set_training_matchers(model, *, rpn=(0.7, 0.3), box=(0.5, 0.5)):
    """Set the IoU thresholds that label anchors (RPN) and proposals (box head) in training.

    An anchor or proposal whose best IoU with a true box is at least the first
    value is a positive; below the second, a negative; between them, ignored.
    The RPN also keeps each true box's best anchor as a positive. Inference is
    unaffected.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
    rpn, box : tuple of float, optional
        ``(fg, bg)`` with ``0 < bg <= fg <= 1``.

    Raises
    ------
    ValueError
        If a pair is not ``(fg, bg)`` with ``0 < bg <= fg <= 1``.
    """
    from torchvision.models.detection._utils import Matcher

    for name, pair in (("rpn", rpn), ("box", box)):
        if len(pair) != 2 or not 0 < pair[1] <= pair[0] <= 1:
            raise ValueError(f"{name} must be (fg, bg) IoU thresholds with 0 < bg <= fg <= 1, got {pair!r}; "
                             f"e.g. {name}=(0.5, 0.3)")
    model.rpn.proposal_matcher = Matcher(float(rpn[0]), float(rpn[1]), allow_low_quality_matches=True)
    model.roi_heads.proposal_matcher = Matcher(float(box[0]), float(box[1]), allow_low_quality_matches=False)


def train_mask_rcnn(model, train_examples, *, val_examples=None, config=None, checkpoint_dir=None,
                    resume=True, device="cpu"):
    """Train a Mask R-CNN on examples, with checkpoints and resume (the loop is `fit`).

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        From `deblend.models.build_mask_rcnn`.
    train_examples : list of dict
    val_examples : list of dict, optional
        Fixed validation set; its loss is logged every ``config.val_every`` steps.
    config : TrainConfig, optional
    checkpoint_dir : str or os.PathLike, optional
        Where ``last.pt`` is written every ``config.checkpoint_every`` steps.
    resume : bool, optional
        Continue from ``checkpoint_dir/last.pt`` when it exists.
    device : str, optional

    Returns
    -------
    dict
        ``history`` (list of logged records), ``steps`` done, ``wall_time`` (s),
        ``stopped_early`` (bool).
    """
    cfg = config or TrainConfig()
    model.roi_heads.fg_bg_sampler.batch_size_per_image = cfg.box_batch_size_per_image
    model.roi_heads.fg_bg_sampler.positive_fraction = cfg.box_positive_fraction
    set_training_matchers(model, rpn=(cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh),
                          box=(cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh))
    dataset = SceneDataset(train_examples, augment=True, seed=cfg.seed)
    validate = None
    if val_examples:
        val_set = SceneDataset(val_examples, augment=False)
        val_batches = [collate([val_set[j] for j in range(i, min(i + 8, len(val_set)))])
                       for i in range(0, len(val_set), 8)]

        def validate():
            sums = {}
            for vi, vt in val_batches:
                for k, v in compute_losses(model, *_to_device(vi, vt, device)).items():
                    sums[k] = sums.get(k, 0.0) + v / len(val_batches)
            return {"val_loss": sum(sums.values())}

    def batch_loss(step, rng):
        dataset.epoch = step // max(1, len(dataset) // cfg.batch_size)
        images, targets = collate([dataset[int(i)] for i in rng.integers(0, len(dataset), cfg.batch_size)])
        losses = model(*_to_device(images, targets, device))
        return sum(losses.values()), losses

    if cfg.peak_proposals and not (model.rpn.peak_proposals or model.rpn.contrast_peak_proposals):
        raise ValueError("config.peak_proposals=True but the model adds no peak boxes (peak_proposals and "
                         "contrast_peak_proposals are 0); set them with deblend.models.set_peak_proposals first")
    model.rpn.train_peak_proposals = bool(cfg.peak_proposals)
    if cfg.freeze_batchnorm:
        log.info("froze %d BatchNorm layers (running statistics kept)", freeze_batchnorm(model))
    try:
        return fit(model, batch_loss, config=cfg, validate=validate, checkpoint_dir=checkpoint_dir,
                   resume=resume, device=device)
    finally:
        model.rpn.train_peak_proposals = False


def hardware_info():
    """A short description of the machine, for model cards."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
