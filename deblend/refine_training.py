"""Training data, training loop and metrics for the probabilistic U-Net of `deblend.refine`.

Where two sources overlap, *which* pixels belong to which is ambiguous: the
truth convention of DESIGN.md (a pixel goes to the source contributing most,
down to 1 sigma of the noise) is one reasonable answer among several. To learn
a distribution of masks the network needs several plausible annotations per
example, as the LIDC data set had four radiologists. They are drawn from the
simulator's per-source noiseless images (`plausible_annotations`):

* ownership: pixel goes to ``argmax_k w_k * s_k`` with per-annotation weights
  ``w_k = exp(N(0, weight_sigma))``, so a pixel where two sources contribute
  equally is owned by either half of the time, and one where a source
  contributes much more is nearly always its own (ownership "in proportion"
  to the flux share, with boundaries that move coherently rather than
  pixel by pixel);
* extent: the isophote threshold is drawn log-uniformly between
  ``thresh_range`` times the noise sigma.

Annotation 0 of every example is the truth convention itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from deblend.io import Image, atomic_path
from deblend.preprocess import prepare
from deblend.refine import CUTOUT, _crop, refine_input
from deblend.simulate import scene_seed, simulate_scene
from deblend.training import ConditionRanges, fit, sample_config

__all__ = [
    "plausible_annotations",
    "make_refine_examples",
    "save_refine_examples",
    "load_refine_examples",
    "RefineDataset",
    "RefineTrainConfig",
    "train_prob_unet",
    "generalized_energy_distance",
    "sample_ged",
]

log = logging.getLogger(__name__)


def plausible_annotations(source_images, target, noise_sigma, *, n=8, rng, weight_sigma=0.5,
                          thresh_range=(0.5, 2.0)):
    """Several plausible masks of one source among its neighbours.

    Parameters
    ----------
    source_images : ndarray, shape (n_sources, ny, nx)
        Noiseless image of each source overlapping the cutout.
    target : int
        Index of the source whose masks are wanted.
    noise_sigma : float
        Pixel noise sigma (the truth convention's threshold).
    n : int, optional
        Number of annotations; the first is the truth convention.
    rng : numpy.random.Generator
    weight_sigma : float, optional
        Log-normal spread of the ownership weights.
    thresh_range : tuple of float, optional
        Range of the isophote threshold, in units of ``noise_sigma``.

    Returns
    -------
    ndarray of bool, shape (n, ny, nx)
    """
    s = np.asarray(source_images, dtype=np.float32)
    if s.ndim != 3 or not 0 <= target < len(s):
        raise ValueError(f"source_images must be (n_sources, ny, nx) with target < n_sources; got shape "
                         f"{s.shape} and target={target!r}")
    out = np.zeros((n, *s.shape[1:]), dtype=bool)
    for j in range(n):
        if j == 0:
            w, thresh = np.ones(len(s), np.float32), 1.0
        else:
            w = np.exp(rng.normal(0.0, weight_sigma, len(s))).astype(np.float32)
            thresh = float(np.exp(rng.uniform(*np.log(thresh_range))))
        weighted = w[:, None, None] * s
        owner = weighted.argmax(axis=0)
        out[j] = (owner == target) & (s[target] >= thresh * noise_sigma)
    return out


def make_refine_examples(seed, *, ranges=None, size=CUTOUT, n_annotations=8, isolated_fraction=0.2,
                         max_offset=12, centre_jitter=0.7, drop_fraction=0.15):
    """Simulate one scene and cut a training example around each blended source.

    Parameters
    ----------
    seed : int
    ranges : deblend.training.ConditionRanges, optional
    size : int, optional
        Cutout size (multiple of 8).
    n_annotations : int, optional
    isolated_fraction : float, optional
        Chance that an unblended source gives an example too (the refinement
        sees such sources when a detector footprint touches a neighbour).
    max_offset : int, optional
        The cutout centre is offset from the source by up to this many pixels,
        so the network does not learn that its target is in the middle.
    centre_jitter : float, optional
        Gaussian error (pixels) of the marked positions, as a detector's.
    drop_fraction : float, optional
        Fraction of neighbours left unmarked, as missed by a detector.

    Returns
    -------
    x : ndarray of float16, shape (n, 3, size, size)
        Inputs (see `deblend.refine.refine_input`).
    y : ndarray of bool, shape (n, n_annotations, size, size)
    """
    rng = np.random.default_rng(seed)
    cfg = sample_config(rng, ranges or ConditionRanges())
    scene = simulate_scene(cfg, seed=int(rng.integers(0, 2**62)), keep_sources=True)
    prepared = prepare(Image.from_array(scene.image.astype(np.float32)))
    normalized = prepared.normalized()
    truth = scene.truth
    xy = np.stack([np.asarray(truth["x"], float), np.asarray(truth["y"], float)], axis=1)
    blended = np.asarray(truth["blended"], bool)
    xs, ys = [], []
    for i in range(len(truth)):
        if not blended[i] and rng.random() > isolated_fraction:
            continue
        cx, cy = xy[i] + rng.integers(-max_offset, max_offset + 1, 2)
        x0, y0 = int(round(cx)) - size // 2, int(round(cy)) - size // 2
        stamps = _crop(scene.source_images, y0, x0, size, size)
        present = np.flatnonzero(stamps.reshape(len(stamps), -1).max(axis=1) > 0)
        if i not in present:
            continue
        others = [k for k in present if k != i and rng.random() >= drop_fraction]
        marks = xy + rng.normal(0.0, centre_jitter, xy.shape)
        x = refine_input(_crop(normalized, y0, x0, size, size), marks[i] - (x0, y0), marks[others] - (x0, y0))
        ann = plausible_annotations(stamps[present], int(np.flatnonzero(present == i)[0]), cfg.noise_sigma,
                                    n=n_annotations, rng=rng)
        if not ann[0].any():
            continue
        xs.append(x.astype(np.float16))
        ys.append(ann)
    if not xs:
        return np.zeros((0, 3, size, size), np.float16), np.zeros((0, n_annotations, size, size), bool)
    return np.stack(xs), np.stack(ys)


def build_refine_set(n_scenes, *, seed, ranges=None, progress=False, **options):
    """Examples from ``n_scenes`` scenes (scene ``i`` from ``scene_seed(seed, i)``), concatenated."""
    from tqdm.auto import tqdm

    xs, ys = [], []
    for i in tqdm(range(n_scenes), disable=not progress, desc="scenes", unit="scene"):
        x, y = make_refine_examples(scene_seed(seed, i), ranges=ranges, **options)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def save_refine_examples(x, y, path):
    """Cache examples in one ``.npz`` (annotations bit-packed; atomic)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=x.astype(np.float16), y=np.packbits(y, axis=-1), size=np.array(y.shape[-1]))


def load_refine_examples(path):
    """Load examples cached by `save_refine_examples` → ``(x, y)``."""
    with np.load(path) as z:
        size = int(z["size"])
        return z["x"], np.unpackbits(z["y"], axis=-1, count=size).astype(bool)


class RefineDataset(torch.utils.data.Dataset):
    """(input, one randomly chosen annotation) pairs with flips and 90° rotations.

    Parameters
    ----------
    x : ndarray, shape (n, channels, size, size)
    y : ndarray of bool, shape (n, n_annotations, size, size)
    augment : bool, optional
    seed : int, optional
    """

    def __init__(self, x, y, *, augment=True, seed=0):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y, self.augment, self.seed = x, y, augment, seed
        self.epoch = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        x = self.x[index].astype(np.float32)
        y = self.y[index, int(rng.integers(self.y.shape[1]))][None].astype(np.float32)
        if self.augment:
            k = int(rng.integers(4))
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


@dataclass
class RefineTrainConfig:
    """Optimisation settings of the probabilistic U-Net (recorded in the model card)."""

    steps: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    grad_clip: float = 100.0
    checkpoint_every: int = 200
    log_every: int = 50
    val_every: int = 200
    seed: int = 0
    max_minutes: float | None = None


def train_prob_unet(model, x, y, *, val=None, config=None, checkpoint_dir=None, resume=True, device="cpu"):
    """Train a `deblend.models.prob_unet.ProbUNet` with checkpoints and resume (the loop is `deblend.training.fit`).

    Parameters
    ----------
    model : ProbUNet
    x, y : ndarray
        Training inputs and annotations (`make_refine_examples`).
    val : tuple of ndarray, optional
        ``(x, y)`` of a fixed validation set; its loss (annotation 0) is logged.
    config : RefineTrainConfig, optional
    checkpoint_dir : str or os.PathLike, optional
    resume : bool, optional
    device : str, optional

    Returns
    -------
    dict
        ``history``, ``steps``, ``wall_time`` (s), ``stopped_early``.
    """
    cfg = config or RefineTrainConfig()
    dataset = RefineDataset(x, y, seed=cfg.seed)
    validate = None
    if val is not None and len(val[0]):
        val_x = torch.from_numpy(val[0].astype(np.float32)).to(device)
        val_y = torch.from_numpy(val[1][:, :1].astype(np.float32)).to(device)

        def validate():
            model.eval()
            with torch.no_grad():
                vals = [model.loss(val_x[i:i + 64], val_y[i:i + 64])[1].item() for i in range(0, len(val_x), 64)]
            return {"val_rec": float(np.mean(vals))}

    def batch_loss(step, rng):
        dataset.epoch = step // max(1, len(dataset) // cfg.batch_size)
        batch = [dataset[int(i)] for i in rng.integers(0, len(dataset), cfg.batch_size)]
        xb = torch.stack([b[0] for b in batch]).to(device)
        yb = torch.stack([b[1] for b in batch]).to(device)
        loss, rec, kl = model.loss(xb, yb)
        return loss, {"loss": loss, "rec": rec, "kl": kl}

    return fit(model, batch_loss, config=cfg, validate=validate, checkpoint_dir=checkpoint_dir, resume=resume,
               device=device)


def _iou_distance(a, b):
    """1 - IoU between every mask of ``a`` (n, ...) and of ``b`` (m, ...); two empty masks are at 0."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 - inter / union
    return np.where(union > 0, d, 0.0)


def generalized_energy_distance(samples, annotations):
    """Squared generalised energy distance between two sets of binary masks (Kohl et al. 2018).

    ``D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d = 1 - IoU``
    (0 between two empty masks), expectations over all pairs.

    Parameters
    ----------
    samples : ndarray of bool, shape (n, ny, nx)
    annotations : ndarray of bool, shape (m, ny, nx)

    Returns
    -------
    float
    """
    samples, annotations = np.asarray(samples, bool), np.asarray(annotations, bool)
    return float(2 * _iou_distance(samples, annotations).mean() - _iou_distance(samples, samples).mean()
                 - _iou_distance(annotations, annotations).mean())


def sample_ged(model, x, y, *, n_samples=16, seed=0, batch_size=64, device="cpu"):
    """GED per example of a model's samples (thresholded at 0.5) against the annotations.

    Parameters
    ----------
    model : ProbUNet
    x : ndarray, shape (n, channels, size, size)
    y : ndarray of bool, shape (n, n_annotations, size, size)

    Returns
    -------
    ged : ndarray, shape (n,)
    mean_iou : ndarray, shape (n,)
        IoU of the mean-probability mask (> 0.5) with annotation 0 (the truth convention).
    """
    model.eval().to(device)
    ged, iou = [], []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.asarray(x[i:i + batch_size], np.float32)).to(device)
        probs = model.sample(xb, n_samples=n_samples, seed=seed + i).cpu().numpy()
        for p, ann in zip(probs, y[i:i + batch_size], strict=True):
            ged.append(generalized_energy_distance(p > 0.5, ann))
            iou.append(1.0 - _iou_distance((p.mean(0) > 0.5)[None], ann[:1])[0, 0])
    return np.array(ged), np.array(iou)

