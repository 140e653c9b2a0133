"""Tests of deblend.refine_training: plausible annotations, examples, dataset, training loop, GED."""

import numpy as np
import pytest
import torch

from deblend.models.prob_unet import build_prob_unet
from deblend.refine_training import (
    RefineDataset,
    RefineTrainConfig,
    generalized_energy_distance,
    load_refine_examples,
    make_refine_examples,
    plausible_annotations,
    sample_ged,
    save_refine_examples,
    train_prob_unet,
)

TINY = {"widths": (4, 8), "head_width": 4, "latent_dim": 2}


def two_sources(shape=(16, 16)):
    """Two Gaussian blobs of equal flux, centred 6 px apart on one row."""
    yy, xx = np.indices(shape)
    a = 10 * np.exp(-((xx - 5) ** 2 + (yy - 8) ** 2) / 8.0)
    b = 10 * np.exp(-((xx - 11) ** 2 + (yy - 8) ** 2) / 8.0)
    return np.stack([a, b])


def test_first_annotation_is_the_truth_convention():
    s = two_sources()
    ann = plausible_annotations(s, 0, 0.5, n=6, rng=np.random.default_rng(0))
    assert ann.shape == (6, 16, 16) and ann.dtype == bool
    truth = (s.argmax(axis=0) == 0) & (s[0] >= 0.5)
    np.testing.assert_array_equal(ann[0], truth)


def test_annotations_vary_at_the_boundary_not_far_from_it():
    s = two_sources()
    ann = plausible_annotations(s, 0, 0.5, n=32, rng=np.random.default_rng(1), thresh_range=(1.0, 1.0))
    owned = ann.mean(axis=0)
    assert owned[8, 5] == 1  # the source's own peak: always its own
    assert owned[8, 11] == 0  # the neighbour's peak: never
    assert 0 < owned[8, 8] < 1  # equal contributions: sometimes


def test_annotation_arguments_are_checked():
    with pytest.raises(ValueError, match="target"):
        plausible_annotations(two_sources(), 2, 0.5, rng=np.random.default_rng(0))


def test_examples_from_one_scene_and_cache_roundtrip(tmp_path):
    x, y = make_refine_examples(1, n_annotations=4)
    assert x.ndim == 4 and x.shape[1:] == (3, 64, 64) and x.dtype == np.float16
    assert y.shape == (len(x), 4, 64, 64) and y.dtype == bool
    assert len(x) > 0 and all(a[0].any() for a in y)  # every example has a non-empty truth mask
    path = tmp_path / "examples.npz"
    save_refine_examples(x, y, path)
    x2, y2 = load_refine_examples(path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_dataset_augments_input_and_annotation_together():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, 8, 8)).astype(np.float16)
    y = np.repeat(x[:, :1] > 0, 2, axis=1)
    ds = RefineDataset(x, y, seed=4)
    for i in range(len(ds)):
        xi, yi = ds[i]
        assert xi.shape == (3, 8, 8) and yi.shape == (1, 8, 8)
        np.testing.assert_array_equal(yi[0].numpy() > 0, xi[0].numpy() > 0)  # same flips and rotations
    with pytest.raises(ValueError, match="same length"):
        RefineDataset(x, y[:2])


def test_training_lowers_the_loss_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float16)
    y = np.repeat((x[:, :1] > 0), 2, axis=1)  # learnable: the mask is where channel 0 is positive
    torch.manual_seed(0)
    model = build_prob_unet(**TINY)
    cfg = RefineTrainConfig(steps=60, batch_size=8, lr=1e-2, warmup_steps=5, log_every=10, val_every=20,
                            checkpoint_every=20)
    result = train_prob_unet(model, x, y, val=(x[:4], y[:4]), config=cfg, checkpoint_dir=tmp_path)
    history = result["history"]
    assert result["steps"] == 60 and not result["stopped_early"]
    assert history[-1]["rec"] < history[0]["rec"]
    assert "val_rec" in history[1] and "kl" in history[0]
    assert (tmp_path / "last.pt").exists()
    more = RefineTrainConfig(**{**cfg.__dict__, "steps": 70})
    resumed = train_prob_unet(model, x, y, config=more, checkpoint_dir=tmp_path)
    assert resumed["steps"] == 70 and resumed["history"][:len(history)] == history


def test_generalized_energy_distance():
    a = np.zeros((2, 4, 4), bool)
    a[0, :2] = True
    a[1, 2:] = True
    assert generalized_energy_distance(a, a) == pytest.approx(0.0)
    assert generalized_energy_distance(a[:1], a[1:]) == pytest.approx(2.0)  # disjoint single masks
    empty = np.zeros((1, 4, 4), bool)
    assert generalized_energy_distance(empty, empty) == 0.0


def test_sample_ged_shapes_and_determinism():
    torch.manual_seed(0)
    model = build_prob_unet(**TINY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)
    y = rng.random((5, 3, 8, 8)) > 0.5
    ged, iou = sample_ged(model, x, y, n_samples=4, batch_size=2)
    assert ged.shape == iou.shape == (5,)
    assert np.all(ged >= -1e-9) and np.all((iou >= 0) & (iou <= 1))
    np.testing.assert_array_equal(sample_ged(model, x, y, n_samples=4, batch_size=2)[0], ged)
