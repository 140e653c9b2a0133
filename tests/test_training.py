import numpy as np
import pytest
import torch
from astropy.table import Table

from deblend.models import build_mask_rcnn, with_mask_head
from deblend.models.mask_rcnn import MASK_BRANCH
from deblend.training import (
    ConditionRanges,
    SceneDataset,
    TrainConfig,
    _loggable,
    collate,
    compute_losses,
    freeze_batchnorm,
    freeze_except,
    load_examples,
    make_example,
    make_examples,
    sample_config,
    save_examples,
    set_training_matchers,
    targets_from_truth,
    train_mask_rcnn,
)

SMALL = ConditionRanges(shape=(48, 48), density=(200.0, 400.0))


@pytest.fixture(scope="module")
def examples():
    return make_examples(4, seed=3, ranges=SMALL)


def test_sample_config_in_ranges():
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = sample_config(rng)
        assert 0.1 <= c.pixel_scale <= 0.3 and 0.5 <= c.psf_fwhm <= 1.1 and 0.5 <= c.noise_sigma <= 3.0


def test_sample_config_correlated_noise_fraction():
    white = [sample_config(np.random.default_rng(i)) for i in range(40)]
    assert all(c.noise_correlation == 0 for c in white)
    mixed = [sample_config(np.random.default_rng(i), ConditionRanges(correlated_fraction=0.5))
             for i in range(40)]
    sigmas = np.array([c.noise_correlation for c in mixed])
    assert 10 <= (sigmas > 0).sum() <= 30
    assert ((sigmas == 0) | ((sigmas >= 0.5) & (sigmas <= 1.5))).all()
    # With no correlated scenes asked for, the random stream (and so every recipe) is unchanged.
    again = [sample_config(np.random.default_rng(i), ConditionRanges(correlated_fraction=0.0))
             for i in range(40)]
    assert again == white


def test_sample_config_galaxy_size_range():
    default = [sample_config(np.random.default_rng(i)) for i in range(40)]
    assert all(c.r_half_range == (0.15, 1.5) for c in default)
    wide = [sample_config(np.random.default_rng(i), ConditionRanges(r_half_max=(1.5, 4.0)))
            for i in range(40)]
    tops = np.array([c.r_half_range[1] for c in wide])
    assert all(c.r_half_range[0] == 0.15 for c in wide)
    assert (tops >= 1.5).all() and (tops <= 4.0).all() and tops.std() > 0.3
    # Everything else is drawn as before: the size bound comes last in the stream.
    for a, b in zip(default, wide, strict=True):
        assert (a.pixel_scale, a.psf_fwhm, a.noise_sigma, a.density) == \
            (b.pixel_scale, b.psf_fwhm, b.noise_sigma, b.density)
    fixed = sample_config(np.random.default_rng(0), ConditionRanges(r_half_max=(3.0, 3.0)))
    assert fixed.r_half_range == (0.15, 3.0)


def test_sample_config_space_like_scenes():
    ranges = ConditionRanges(space_fraction=0.5)
    mixed = [sample_config(np.random.default_rng(i), ranges) for i in range(40)]
    space = [c for c in mixed if c.pixel_scale < 0.1]
    assert 10 <= len(space) <= 30
    assert all(0.1 <= c.psf_fwhm <= 0.3 and 300 <= c.density <= 1500 for c in space)
    ground = [c for c in mixed if c.pixel_scale >= 0.1]
    assert all(0.5 <= c.psf_fwhm <= 1.1 for c in ground)
    default = [sample_config(np.random.default_rng(i)) for i in range(40)]
    assert [c for c, d in zip(mixed, default, strict=True) if c.pixel_scale >= 0.1] == \
        [d for c, d in zip(mixed, default, strict=True) if c.pixel_scale >= 0.1]


def test_make_example_is_reproducible_and_consistent():
    a, b = make_example(11, ranges=SMALL), make_example(11, ranges=SMALL)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["seg"], b["seg"])
    assert a["image"].dtype == np.float32 and np.isfinite(a["image"]).all()
    assert set(np.unique(a["classes"])) <= {1, 2}
    assert a["seg"].max() <= len(a["classes"])


def test_targets_from_truth_masks_and_classes():
    seg = np.array([[1, 1, 0], [0, 2, 2], [0, 0, 2]], dtype=np.int32)
    truth = Table({"id": [1, 2], "is_star": [True, False]})
    mask = np.zeros_like(seg, dtype=bool)
    mask[0, :] = True  # removes every pixel of source 1
    out, classes = targets_from_truth(seg, truth, mask=mask)
    assert classes.tolist() == [1, 2]
    assert 1 not in out and (out == 2).sum() == 3


def test_dataset_targets_match_segmentation(examples):
    ds = SceneDataset(examples, augment=False)
    image, target = ds[0]
    seg = examples[0]["seg"]
    assert image.shape == (1, *seg.shape)
    assert len(target["boxes"]) == len(np.unique(seg[seg > 0]))
    for box, m in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = np.nonzero(m.numpy())
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_augmentation_keeps_image_and_masks_aligned(examples):
    ds = SceneDataset(examples, augment=True, seed=1)
    for i in range(len(ds)):
        image, target = ds[i]
        if len(target["masks"]):
            inside = image[0][target["masks"].any(0).bool()]
            outside = image[0][~target["masks"].any(0).bool()]
            assert inside.mean() > outside.mean()  # sources stay on their masks after flips/rotations


def test_cache_round_trip(examples, tmp_path):
    save_examples(examples, tmp_path / "c.npz")
    back = load_examples(tmp_path / "c.npz")
    assert len(back) == len(examples)
    np.testing.assert_array_equal(back[1]["seg"], examples[1]["seg"])
    np.testing.assert_array_equal(back[1]["classes"], examples[1]["classes"])
    np.testing.assert_allclose(back[1]["image"], examples[1]["image"], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(back[1]["centres"], examples[1]["centres"])


def test_example_centres_are_the_truth_positions(examples):
    distances = []
    for ex in examples:
        assert ex["centres"].shape == (len(ex["classes"]), 2)
        for label in np.unique(ex["seg"][ex["seg"] > 0]):
            ys, xs = np.nonzero(ex["seg"] == label)
            distances.append(np.hypot(*(ex["centres"][label - 1] - (xs.mean(), ys.mean()))))
    # A footprint's centroid is its source's position, unless a neighbour owns part of it.
    assert len(distances) > 20 and np.median(distances) < 0.5


def test_cache_without_centres_still_loads(examples, tmp_path):
    save_examples([{k: v for k, v in e.items() if k != "centres"} for e in examples], tmp_path / "old.npz")
    back = load_examples(tmp_path / "old.npz")
    assert len(back) == len(examples) and "centres" not in back[0]


def test_short_training_run_checkpoints_and_resumes(examples, tmp_path):
    torch.manual_seed(0)
    model = build_mask_rcnn(seed=0)
    cfg = TrainConfig(steps=4, batch_size=2, log_every=2, val_every=2, checkpoint_every=2, warmup_steps=2)
    result = train_mask_rcnn(model, examples, val_examples=examples[:2], config=cfg, checkpoint_dir=tmp_path)
    assert result["steps"] == 4 and (tmp_path / "last.pt").exists()
    assert all(np.isfinite(r["val_loss"]) for r in result["history"] if "val_loss" in r)
    # resuming a finished run does no more steps
    again = train_mask_rcnn(build_mask_rcnn(seed=0), examples, config=cfg, checkpoint_dir=tmp_path)
    assert again["steps"] == 4 and len(again["history"]) == len(result["history"])


def test_training_with_peak_proposals_needs_them_and_switches_them_off_after(examples, tmp_path):
    from deblend.models import set_peak_proposals

    cfg = TrainConfig(steps=2, batch_size=2, log_every=1, warmup_steps=1, peak_proposals=True)
    with pytest.raises(ValueError, match="set_peak_proposals"):
        train_mask_rcnn(build_mask_rcnn(seed=0), examples, config=cfg)
    model = set_peak_proposals(build_mask_rcnn(seed=0), 20, max_contrast_peaks=20)
    seen = []
    original = model.roi_heads.select_training_samples

    def spy(proposals, targets):  # what the box head is trained on
        seen.append(model.rpn.train_peak_proposals)
        return original(proposals, targets)

    model.roi_heads.select_training_samples = spy
    result = train_mask_rcnn(model, examples, config=cfg, checkpoint_dir=tmp_path)
    assert result["steps"] == 2 and seen == [True, True] and not model.rpn.train_peak_proposals


def test_compute_losses_leaves_batchnorm_statistics_alone(examples):
    model = build_mask_rcnn(seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    images, targets = collate([SceneDataset(examples, augment=False)[i] for i in range(2)])
    losses = compute_losses(model, images, targets)
    assert set(losses) >= {"loss_classifier", "loss_mask"} and all(np.isfinite(list(losses.values())))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_freeze_except_trains_only_the_mask_branch(examples, tmp_path):
    teacher = build_mask_rcnn(seed=0)
    model = with_mask_head(teacher, (16, 16), seed=1)
    n = freeze_except(model, MASK_BRANCH)
    assert 0 < n < sum(p.numel() for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=3, batch_size=2, log_every=1, warmup_steps=1, lr=1e-2)
    train_mask_rcnn(model, examples, config=cfg, checkpoint_dir=tmp_path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(MASK_BRANCH) for k in changed)
    # frozen BatchNorms kept their statistics although fit() put the model in training mode
    assert not any("backbone" in k and "running" in k for k in changed)
    model.train()
    assert model.training and not model.backbone.body.stem[1].training
    assert model.roi_heads.mask_head.training


def test_freeze_batchnorm_keeps_running_statistics_while_weights_train(examples, tmp_path):
    model = build_mask_rcnn(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_size=2, log_every=1, warmup_steps=1, lr=1e-2, freeze_batchnorm=True)
    train_mask_rcnn(model, examples, config=cfg, checkpoint_dir=tmp_path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone") and k.endswith("weight") for k in changed)
    assert not any("running_" in k or "num_batches_tracked" in k for k in changed)
    model.train()
    assert model.training and model.roi_heads.mask_head.training
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def test_freeze_batchnorm_without_the_option_updates_statistics(examples, tmp_path):
    model = build_mask_rcnn(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=1, batch_size=2, log_every=1, warmup_steps=1, lr=1e-2)
    train_mask_rcnn(model, examples, config=cfg, checkpoint_dir=tmp_path)
    assert any("running_mean" in k and not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_freeze_batchnorm_counts_and_excludes():
    model = build_mask_rcnn(seed=0)
    n_all = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert freeze_batchnorm(build_mask_rcnn(seed=0)) == n_all
    n_kept = freeze_batchnorm(model, exclude=("roi_heads.",))
    assert 0 < n_kept < n_all
    model.train()
    assert any(isinstance(m, torch.nn.BatchNorm2d) and m.training for m in model.roi_heads.modules())


def test_freeze_except_rejects_unknown_prefixes():
    with pytest.raises(ValueError, match="prefixes=.*named_parameters"):
        freeze_except(build_mask_rcnn(seed=0), ("no_such_module.",))


def test_logged_learning_rate_keeps_its_significant_digits():
    shown = _loggable({"step": 3000, "lr": 1.234567e-5, "loss_mask": 0.123456, "val_loss": 1.4})
    assert shown == {"step": 3000, "lr": 1.23e-5, "loss_mask": 0.1235, "val_loss": 1.4}


def _rpn_positives(model, boxes):
    """How many anchors the RPN labels positive for ``boxes`` in a 64×64 image."""
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)])
    with torch.no_grad():
        features = list(model.backbone(images.tensors).values())
    anchors = model.rpn.anchor_generator(images, features)
    labels, _ = model.rpn.assign_targets_to_anchors(anchors, [{"boxes": boxes}])
    return int((labels[0] == 1).sum())


def test_lower_rpn_threshold_gives_small_sources_more_positive_anchors():
    model = build_mask_rcnn(seed=0)
    # 6-pixel sources, one on the stride-4 anchor grid and one between its points
    boxes = torch.tensor([[13.0, 13.0, 19.0, 19.0], [40.0, 30.0, 46.0, 36.0]])
    set_training_matchers(model, rpn=(0.7, 0.3))
    default = _rpn_positives(model, boxes)
    set_training_matchers(model, rpn=(0.5, 0.3))
    lowered = _rpn_positives(model, boxes)
    assert default >= 2  # each source keeps at least its best anchor
    assert lowered > default
    assert model.rpn.proposal_matcher.allow_low_quality_matches
    set_training_matchers(model, box=(0.4, 0.4))
    assert model.roi_heads.proposal_matcher.high_threshold == 0.4
    assert not model.roi_heads.proposal_matcher.allow_low_quality_matches


@pytest.mark.parametrize("pair", [(0.3, 0.5), (0.5, 0.0), (1.2, 0.3), (0.5,)])
def test_set_training_matchers_rejects_bad_thresholds(pair):
    with pytest.raises(ValueError, match=r"rpn must be \(fg, bg\).*e\.g\."):
        set_training_matchers(build_mask_rcnn(seed=0), rpn=pair)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_with_validation_on_cuda(examples, tmp_path):
    model = build_mask_rcnn(seed=0)
    cfg = TrainConfig(steps=2, batch_size=2, log_every=1, val_every=1, warmup_steps=1)
    result = train_mask_rcnn(model, examples, val_examples=examples[:2], config=cfg, checkpoint_dir=tmp_path,
                             device="cuda")
    assert result["steps"] == 2 and np.isfinite(result["history"][-1]["val_loss"])
