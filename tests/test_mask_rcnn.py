import hashlib
import math

import numpy as np
import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from deblend.models import (
    CLASS_NAMES,
    build_mask_rcnn,
    count_parameters,
    load_weights,
    model_config,
    save_weights,
    set_peak_proposals,
    set_test_proposals,
    with_mask_head,
)
from deblend.models.mask_rcnn import (
    MASK_BRANCH,
    _paste_masks,
    _running_max,
    attach_centre_net,
    centre_boxes,
    paste_mask_crops,
    peak_boxes,
)
from deblend.training import _instances

torch.set_num_threads(2)


def _scene(ny=64, nx=64, seed=0):
    """A detection-image tile with one star and one galaxy, and its targets."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ny, :nx]
    image = rng.normal(0.0, 1.0, (ny, nx))
    sources = [(20.0, 22.0, 1.5, 80.0, 1), (42.0, 40.0, 4.0, 40.0, 2)]  # x, y, sigma, peak, class
    boxes, labels, masks = [], [], []
    for cx, cy, sigma, peak, label in sources:
        profile = peak * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        image += profile
        mask = profile > 1.0
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        labels.append(label)
        masks.append(mask)
    image = torch.from_numpy(np.arcsinh(image).astype(np.float32))[None]
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.array(masks, dtype=np.uint8)),
    }
    return image, target


def _empty_target(ny=64, nx=64):
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, ny, nx), dtype=torch.uint8),
    }


@pytest.fixture(scope="module")
def eval_model():
    return build_mask_rcnn(seed=0).eval()


def test_build_defaults():
    model = build_mask_rcnn(seed=0)
    assert isinstance(model, MaskRCNN)
    assert model.training
    assert CLASS_NAMES == ("background", "star", "galaxy")
    config = model_config(model)
    assert config["backbone"] == "small"
    assert config["num_classes"] == len(CLASS_NAMES)
    assert config["box_detections_per_img"] == 300
    assert config["box_nms_thresh"] > 0.5
    assert config["anchor_sizes"] == ((4,), (8,), (16,), (32,), (64,))
    assert model.roi_heads.detections_per_img == 300
    assert model.roi_heads.nms_thresh == config["box_nms_thresh"]
    assert model.rpn._post_nms_top_n["testing"] == config["rpn_post_nms_top_n_test"]
    assert model.transform.image_mean == [0.0] and model.transform.image_std == [1.0]
    # every parameter trains (from scratch), with ordinary batch norm
    assert count_parameters(model, trainable_only=True) == count_parameters(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    # the stored config rebuilds the same architecture and initialisation
    again = build_mask_rcnn(**config)
    assert model_config(again) == config
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_seed_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_mask_rcnn(seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = build_mask_rcnn(seed=7)
    c = build_mask_rcnn(seed=8)
    name = "backbone.body.stem.0.weight"
    assert torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert not torch.equal(a.state_dict()[name], c.state_dict()[name])


def test_eval_forward_shapes(eval_model):
    image, _ = _scene()
    with torch.inference_mode():
        (out,) = eval_model([image])
    n = out["boxes"].shape[0]
    assert 0 < n <= 300
    assert out["boxes"].shape == (n, 4)
    assert out["labels"].shape == (n,) and out["labels"].dtype == torch.int64
    assert out["scores"].shape == (n,)
    assert out["masks"].shape == (n, 1, 64, 64)
    assert set(out["labels"].tolist()) <= {1, 2}
    assert float(out["masks"].min()) >= 0.0 and float(out["masks"].max()) <= 1.0


def test_no_resizing_odd_size(eval_model):
    image = torch.randn(1, 72, 100, generator=torch.Generator().manual_seed(1))
    image_list, _ = eval_model.transform([image])
    assert image_list.image_sizes == [(72, 100)]
    assert image_list.tensors.shape == (1, 1, 128, 128)  # zero-padded to a multiple of 64
    assert torch.equal(image_list.tensors[0, :, :72, :100], image)  # mean 0, std 1
    with torch.inference_mode():
        (out,) = eval_model([image])
    assert out["masks"].shape[-2:] == (72, 100)
    boxes = out["boxes"]
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 100).all())
    assert bool((boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 72).all())


def test_training_targets_keep_their_coordinates():
    model = build_mask_rcnn(seed=0).train()
    image, target = _scene()
    image = torch.nn.functional.pad(image, (0, 36, 0, 8))  # (1, 72, 100)
    target["masks"] = torch.nn.functional.pad(target["masks"], (0, 36, 0, 8))
    image_list, targets = model.transform([image], [target])
    assert image_list.image_sizes == [(72, 100)]
    assert torch.equal(targets[0]["boxes"], target["boxes"])
    assert torch.equal(targets[0]["masks"], target["masks"])


def test_roi_pool_scales_fixed_for_any_tile_size(eval_model):
    # torchvision would infer (and cache) 1/2 for a 40-px-high tile padded to 64.
    with torch.inference_mode():
        (out,) = eval_model([torch.randn(1, 40, 64)])
    assert out["masks"].shape[-2:] == (40, 64)
    for pool in (eval_model.roi_heads.box_roi_pool, eval_model.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_wrong_channel_count_is_rejected(eval_model):
    with pytest.raises(ValueError, match=r"shape \(1, H, W\)"):
        eval_model([torch.zeros(3, 64, 64)])


def test_empty_prediction(eval_model):
    model = build_mask_rcnn(seed=0, box_score_thresh=1.0).eval()
    with torch.inference_mode():
        (out,) = model([torch.zeros(1, 64, 48)])
    assert out["boxes"].shape == (0, 4)
    assert out["labels"].shape == (0,) and out["scores"].shape == (0,)
    assert out["masks"].shape == (0, 1, 64, 48)


def test_train_losses_finite_and_backward():
    torch.manual_seed(0)
    model = build_mask_rcnn(seed=0).train()
    image, target = _scene()
    other, other_target = _scene(seed=1)
    losses = model([image, other], [target, other_target])
    expected = {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert set(losses) == expected
    assert all(math.isfinite(v.detach().item()) for v in losses.values())
    assert losses["loss_mask"].item() > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_image_without_objects_trains():
    torch.manual_seed(0)
    model = build_mask_rcnn(seed=0).train()
    image = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(2))
    losses = model([image], [_empty_target()])
    assert all(math.isfinite(v.detach().item()) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_rpn_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    # and mixed in a batch with an image that has sources
    scene, target = _scene()
    losses = model([image, scene], [_empty_target(), target])
    assert all(math.isfinite(v.detach().item()) for v in losses.values())


def test_trainable_backbone_layers_freezes_bottom_units():
    model = build_mask_rcnn(seed=0, trainable_backbone_layers=3).train()
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert not body.stem[1].training  # frozen batch norm keeps its statistics
    assert body.layer2[0].bn1.training
    assert count_parameters(model, trainable_only=True) < count_parameters(model)


def test_resnet18_backbone_runs():
    model = build_mask_rcnn(backbone="resnet18", seed=0).eval()
    assert model_config(model)["fpn_channels"] == 128
    assert count_parameters(model) > 4 * count_parameters(build_mask_rcnn())
    with torch.inference_mode():
        (out,) = model([torch.randn(1, 64, 64)])
    assert out["masks"].shape[-2:] == (64, 64)


@pytest.mark.parametrize(("cx", "cy", "a", "b"), [(20.3, 17.8, 6.0, 4.0), (9.6, 30.2, 1.6, 1.3),
                                             (40.0, 25.5, 12.0, 7.5)])
def test_paste_masks_inverts_the_training_targets(cx, cy, a, b):
    # A footprint -> its box as deblend.training makes it -> the M x M target torchvision's
    # loss is computed against -> pasted back: the same pixels, not moved.
    y, x = np.mgrid[:48, :60]
    footprint = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1
    boxes, _, masks = _instances(footprint.astype(np.int32), np.array([2]))
    boxes = torch.from_numpy(boxes)
    target = project_masks_on_boxes(torch.from_numpy(masks), boxes, torch.tensor([0]), 28)
    pasted = _paste_masks(target[:, None], boxes, footprint.shape)[0, 0].numpy()
    assert pasted[~footprint].max() < 0.9 and pasted[footprint].min() > 0.1
    back = pasted >= 0.5
    assert (back & footprint).sum() / (back | footprint).sum() > 0.9
    for axis_coords in (x, y):  # centroids agree to a small fraction of a pixel
        assert abs(axis_coords[back].mean() - axis_coords[footprint].mean()) < 0.1


def test_paste_mask_crops_cover_the_box_and_stop_at_the_window():
    masks = torch.ones(3, 1, 28, 28)
    boxes = torch.tensor([[10.5, 5.0, 20.0, 9.0], [-8.0, -4.0, 3.0, 2.0], [70.0, 10.0, 80.0, 20.0]])
    (crop, y0, x0), (edge, ey0, ex0), (outside, _, _) = paste_mask_crops(masks, boxes, (48, 60))
    assert (y0, x0) == (5, 10) and crop.shape == (5, 11)  # the box's pixels and one beyond
    assert torch.all(crop[:, 1:] == 1.0)  # pixels inside the box read whole cells
    assert torch.allclose(crop[:, 0], torch.tensor(0.5))  # half a pixel beyond it: half
    assert (ey0, ex0) == (0, 0) and edge.shape == (3, 4)
    assert outside.numel() == 0
    assert _paste_masks(masks[:0], boxes[:0], (64, 60)).shape == (0, 1, 64, 60)


def test_save_load_round_trip(tmp_path, eval_model):
    path = tmp_path / "mask_rcnn.pt"
    metadata = {"training_set": "unit test", "epochs": 0, "metrics": {"f1": None}}
    digest = save_weights(eval_model, path, metadata=metadata)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["mask_rcnn.pt"]  # no temp file left

    payload = torch.load(path, weights_only=True)
    assert payload["config"] == model_config(eval_model)
    assert payload["metadata"] == metadata
    assert payload["state_dict"]["backbone.body.stem.0.weight"].dtype == torch.float16

    loaded = load_weights(path, expected_sha256=digest.upper())
    assert isinstance(loaded, MaskRCNN) and not loaded.training
    assert model_config(loaded) == model_config(eval_model)
    assert loaded.deblend_metadata == metadata and loaded.deblend_sha256 == digest
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    # the loaded model is the original with its weights rounded to float16 ...
    rounded = build_mask_rcnn(**model_config(eval_model))
    rounded.load_state_dict(
        {
            k: v.half().float() if v.is_floating_point() else v
            for k, v in eval_model.state_dict().items()
        }
    )
    rounded.eval()
    image, _ = _scene()
    with torch.inference_mode():
        (got,) = loaded([image])
        (want,) = rounded([image])
        # ... and its features stay within half-precision error of the original
        features = loaded.backbone(image[None])
        original = eval_model.backbone(image[None])
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(got[key], want[key])
    for key in original:
        torch.testing.assert_close(features[key], original[key], rtol=2e-2, atol=2e-2)


def test_load_rejects_wrong_sha256(tmp_path, eval_model):
    path = tmp_path / "weights.pt"
    digest = save_weights(eval_model, path, metadata={})
    with pytest.raises(ValueError, match="sha256") as info:
        load_weights(path, expected_sha256="0" * 64)
    assert str(path) in str(info.value) and digest in str(info.value)


def test_load_missing_file_says_how_to_get_weights(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="train_mask_rcnn.py") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a deblend Mask R-CNN weights file"):
        load_weights(path)


def test_load_rejects_mismatched_config(tmp_path, eval_model):
    path = tmp_path / "future.pt"
    payload = {
        "config": {**model_config(eval_model), "attention": True},
        "state_dict": eval_model.state_dict(),
        "metadata": {},
    }
    torch.save(payload, path)
    with pytest.raises(ValueError, match="does not match"):
        load_weights(path)


def test_save_rejects_bad_metadata_atomically(tmp_path, eval_model):
    path = tmp_path / "weights.pt"
    digest = save_weights(eval_model, path, metadata={"v": 1})
    with pytest.raises(ValueError, match="metadata"):
        save_weights(eval_model, path, metadata={"v": object()})
    with pytest.raises(ValueError, match="metadata must be a dict"):
        save_weights(eval_model, path, metadata=None)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_model_config_requires_a_built_model():
    with pytest.raises(ValueError, match="build_mask_rcnn"):
        model_config(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "resnet50"}, "backbone must be one of"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"anchor_sizes": (4, 8, 16)}, "anchor_sizes must have 5 entries"),
        ({"anchor_sizes": (4, 8, -16, 32, 64)}, "anchor_sizes has an invalid entry -16"),
        ({"anchor_sizes": ((4, 6), 8, 16, 32, 64)}, "same number of sizes"),
        ({"aspect_ratios": ()}, "aspect_ratios"),
        ({"box_nms_thresh": 0.0}, r"box_nms_thresh must be a number in \(0, 1\], got 0.0"),
        ({"box_nms_thresh": 1.5}, "box_nms_thresh"),
        ({"box_nms_thresh": "0.6"}, "box_nms_thresh must be a number"),
        ({"box_score_thresh": -0.1}, "box_score_thresh"),
        ({"box_detections_per_img": 0}, "box_detections_per_img must be an integer >= 1"),
        ({"rpn_post_nms_top_n_test": True}, "rpn_post_nms_top_n_test"),
        (
            {"trainable_backbone_layers": 6},
            r"trainable_backbone_layers must be an integer in \[0, 5\]",
        ),
        ({"mask_head_channels": (128, 0)}, "mask_head_channels"),
        ({"fpn_channels": 4}, "fpn_channels"),
        ({"seed": -1}, "seed"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_mask_rcnn(**kwargs)


def test_builder_is_keyword_only():
    with pytest.raises(TypeError):
        build_mask_rcnn("small")


def test_with_mask_head_keeps_everything_but_the_mask_branch(eval_model):
    new = with_mask_head(eval_model, (16,), seed=3)
    assert model_config(new)["mask_head_channels"] == (16,)
    old, fresh = eval_model.state_dict(), new.state_dict()
    for key, value in fresh.items():
        if key.startswith(MASK_BRANCH):
            if key.endswith("weight"):
                assert key not in old or old[key].shape != value.shape or not torch.equal(old[key], value)
        else:
            assert torch.equal(old[key], value), key
    assert count_parameters(new) < count_parameters(eval_model)
    # same detections, other masks
    image, _ = _scene()
    a, b = eval_model([image])[0], new.eval()([image])[0]
    assert len(a["boxes"]) > 0
    torch.testing.assert_close(a["boxes"], b["boxes"])
    assert model_config(eval_model)["mask_head_channels"] != (16,)


def test_mask_predictor_at_inference_equals_its_layers():
    """The fused inference path of the mask predictor gives the layer-by-layer logits."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    predictor = build_mask_rcnn(seed=0).roi_heads.mask_predictor
    torch.nn.init.normal_(predictor.conv5_mask.bias)  # non-zero biases, as after training
    torch.nn.init.normal_(predictor.mask_fcn_logits.bias)
    x = torch.relu(torch.randn(37, predictor.conv5_mask.in_channels, 14, 14,
                               generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        fused = predictor(x)
        layers = MaskRCNNPredictor.forward(predictor, x)
    assert fused.shape == layers.shape == (37, len(CLASS_NAMES), 28, 28)
    torch.testing.assert_close(fused, layers, rtol=1e-4, atol=1e-4)
    # with autograd (training) the layers run one by one
    assert torch.equal(predictor(x), MaskRCNNPredictor.forward(predictor, x))


def test_set_test_proposals_is_saved_and_loaded(tmp_path):
    model = set_test_proposals(build_mask_rcnn(seed=0), 1000, 500)
    assert (model.eval().rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (1000, 500)
    save_weights(model, tmp_path / "m.pt", metadata={})
    loaded = load_weights(tmp_path / "m.pt").eval()
    assert (loaded.rpn.pre_nms_top_n(), loaded.rpn.post_nms_top_n()) == (1000, 500)
    assert model_config(loaded)["rpn_post_nms_top_n_test"] == 500
    default = model_config(build_mask_rcnn())
    assert model_config(loaded)["rpn_post_nms_top_n_train"] == default["rpn_post_nms_top_n_train"]
    with pytest.raises(ValueError, match="post_nms_top_n"):
        set_test_proposals(model, 10, 0)


def _two_close_peaks():
    """A 40x48 asinh(S/N)-like image: two sources 4 pixels apart and a fainter one, on a flat sky."""
    y, x = np.mgrid[:40, :48]
    image = np.zeros((40, 48), np.float32)
    for cx, cy, peak in ((20, 15, 6.0), (24, 15, 5.0), (40, 30, 2.0)):
        image += peak * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.0**2))
    return torch.from_numpy(image)[None]


def test_peak_boxes_find_close_companions_brightest_first():
    image = _two_close_peaks()
    boxes = peak_boxes(image, [(40, 48)], max_peaks=10, threshold=1.0, sizes=(6.0,))[0]
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).tolist()
    assert centres == [[20.5, 15.5], [24.5, 15.5], [40.5, 30.5]]  # pixel centres, brightest first
    assert torch.allclose(boxes[0], torch.tensor([17.5, 12.5, 23.5, 18.5]))
    # capped, one box per size, clipped to the unpadded image
    two = peak_boxes(image, [(40, 42)], max_peaks=2, threshold=1.0, sizes=(6.0, 50.0))[0]
    assert two.shape == (4, 4) and float(two[:, 2].max()) == 42.0 and float(two[:, 0].min()) == 0.0
    # a threshold above the fainter source drops it; flat sky gives none
    assert len(peak_boxes(image, [(40, 48)], max_peaks=10, threshold=1.5, sizes=(6.0,))[0]) == 2
    assert len(peak_boxes(torch.zeros(1, 16, 16), [(16, 16)], max_peaks=10)[0]) == 0


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_running_max_equals_max_pooling(size):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((3, 1, 17, 22), generator=gen)
    images[0, 0, 4:9, 6:12] = 2.5  # plateaus: ties must come out as the pooling gives them
    expected = torch.nn.functional.max_pool2d(images, size, stride=1, padding=size // 2)
    assert torch.equal(_running_max(images, size), expected)
    flags = (images > 1).to(images.dtype)  # peak_boxes also dilates a boolean map this way
    expected = torch.nn.functional.max_pool2d(flags, size, stride=1, padding=size // 2)
    assert torch.equal(_running_max(flags, size), expected)


def _companion_on_a_slope(companion=2.0):
    """A 40x48 image: a broad source at x=18 and a compact companion 7 pixels away on its slope."""
    y, x = np.mgrid[:40, :48]
    image = 8.0 * np.exp(-((x - 18) ** 2 + (y - 20) ** 2) / (2 * 3.0**2))
    image += companion * np.exp(-((x - 25) ** 2 + (y - 20) ** 2) / (2 * 1.0**2))
    return torch.from_numpy(image.astype(np.float32))[None]


def test_contrast_peaks_find_a_companion_without_a_maximum_of_its_own():
    def centres(image, n_contrast):
        boxes = peak_boxes(image, [(40, 48)], max_peaks=10, max_contrast_peaks=n_contrast, threshold=1.0,
                           sizes=(6.0,))[0]
        return ((boxes[:, :2] + boxes[:, 2:]) / 2).tolist()

    assert centres(_companion_on_a_slope(), 0) == [[18.5, 20.5]]  # the companion is no local maximum
    assert centres(_companion_on_a_slope(), 10) == [[18.5, 20.5], [25.5, 20.5]]  # peaks first, then contrast
    # a lone source's contrast peaks at its own maximum, which already has boxes; flat sky gives none
    assert centres(_companion_on_a_slope(companion=0.0), 10) == [[18.5, 20.5]]
    assert len(peak_boxes(torch.zeros(1, 16, 16), [(16, 16)], max_peaks=10, max_contrast_peaks=10)[0]) == 0


def test_peak_proposals_reach_the_box_head_at_inference_only(tmp_path):
    from torchvision.models.detection.image_list import ImageList

    model = set_peak_proposals(build_mask_rcnn(seed=0), 5)
    save_weights(model, tmp_path / "m.pt", metadata={})
    loaded = load_weights(tmp_path / "m.pt")
    assert model_config(loaded)["peak_proposals"] == 5 and model_config(build_mask_rcnn())["peak_proposals"] == 0
    image = torch.nn.functional.pad(_two_close_peaks(), (0, 16, 0, 24))[None]  # padded to 64x64
    images = ImageList(image, [(40, 48)])
    with torch.no_grad():
        features = loaded.backbone(image)
        with_peaks = loaded.rpn(images, features)[0][0]
        set_peak_proposals(loaded, 0)
        without = loaded.rpn(images, features)[0][0]
    assert len(with_peaks) == len(without) + 2 * 2  # the two peaks above PEAK_THRESHOLD, two box sizes
    assert torch.equal(with_peaks[: len(without)], without)
    loaded.train()
    set_peak_proposals(loaded, 5)
    targets = [{"boxes": torch.tensor([[17.0, 12.0, 24.0, 19.0]])}]
    with torch.no_grad():
        trained = loaded.rpn(images, features, targets)[0][0]
        set_peak_proposals(loaded, 0)
        assert torch.equal(trained, loaded.rpn(images, features, targets)[0][0])  # no peak boxes in training
        set_peak_proposals(loaded, 5)
        loaded.rpn.train_peak_proposals = True  # ...unless asked for (TrainConfig.peak_proposals)
        asked = loaded.rpn(images, features, targets)[0][0]
    assert len(asked) == len(trained) + 2 * 2 and torch.equal(asked[: len(trained)], trained)
    with pytest.raises(ValueError, match="max_peaks"):
        set_peak_proposals(loaded, -1)


def test_contrast_peak_proposals_are_saved_and_kept(tmp_path):
    from torchvision.models.detection.image_list import ImageList

    model = set_peak_proposals(build_mask_rcnn(seed=0), 5, max_contrast_peaks=3)
    save_weights(model, tmp_path / "m.pt", metadata={})
    loaded = load_weights(tmp_path / "m.pt")
    assert model_config(loaded)["contrast_peak_proposals"] == 3
    assert model_config(build_mask_rcnn())["contrast_peak_proposals"] == 0
    set_peak_proposals(loaded, 0)  # the contrast setting is kept unless given
    assert loaded.rpn.contrast_peak_proposals == 3 and model_config(loaded)["contrast_peak_proposals"] == 3
    image = torch.nn.functional.pad(_companion_on_a_slope(), (0, 16, 0, 24))[None]  # padded to 64x64
    images = ImageList(image, [(40, 48)])
    with torch.no_grad():
        features = loaded.backbone(image)
        with_contrast = loaded.rpn(images, features)[0][0]
        set_peak_proposals(loaded, 0, max_contrast_peaks=0)
        without = loaded.rpn(images, features)[0][0]
    assert len(with_contrast) == len(without) + 2  # the companion, two box sizes
    with pytest.raises(ValueError, match="max_contrast_peaks"):
        set_peak_proposals(loaded, 0, max_contrast_peaks=-1)


def test_peak_threshold_rises_with_correlated_noise():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    noise = gaussian_filter(rng.normal(0.0, 1.0, (96, 96)), 1.5)
    noise /= noise.std()  # correlated: smoothing 3x3 barely lowers it
    image = torch.from_numpy(noise.astype(np.float32))[None]
    loose = peak_boxes(image, [(96, 96)], max_peaks=100, threshold=1.5, nsigma=0.0, sizes=(6.0,))[0]
    strict = peak_boxes(image, [(96, 96)], max_peaks=100, threshold=1.5, nsigma=4.5, sizes=(6.0,))[0]
    assert len(loose) >= 5 and len(strict) == 0
    y, x = np.mgrid[:96, :96]
    image[0] += torch.from_numpy((12.0 * np.exp(-((x - 30) ** 2 + (y - 60) ** 2) / 4.0)).astype(np.float32))
    found = peak_boxes(image, [(96, 96)], max_peaks=100, threshold=1.5, nsigma=4.5, sizes=(6.0,))[0]
    assert ((found[:, :2] + found[:, 2:]) / 2).tolist() == [[30.5, 60.5]]


def test_centre_net_is_attached_saved_and_loaded_whole(tmp_path):
    from deblend.models.centre_net import CentreNet

    torch.manual_seed(0)
    centre_net = CentreNet(channels=(4, 8))
    model = attach_centre_net(build_mask_rcnn(seed=0), centre_net, proposals=7, threshold=0.2, detect=True)
    config = model_config(model)
    assert (config["centre_net_channels"], config["centre_proposals"], config["centre_threshold"],
            config["centre_detect"]) == ((4, 8), 7, 0.2, True)
    save_weights(model, tmp_path / "m.pt", metadata={})
    loaded = load_weights(tmp_path / "m.pt")
    assert model_config(loaded)["centre_detect"] is True
    image = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        # weights are stored in float16: the loaded detector is the attached one to that precision
        torch.testing.assert_close(loaded.centre_net(image), centre_net.eval()(image), atol=2e-2, rtol=2e-2)
    assert "centre_net_channels" not in {k for k, v in model_config(build_mask_rcnn()).items() if v is not None}


@pytest.mark.parametrize("kwargs, match", [
    ({"centre_proposals": 5}, "centre detector"),
    ({"centre_net_channels": (8,)}, "centre_net_channels"),
    ({"centre_net_channels": (4, 8), "centre_threshold": 0.0}, "centre_threshold"),
    ({"centre_net_channels": (4, 8), "centre_detect": True}, "centre_detect"),
])
def test_centre_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_mask_rcnn(**kwargs)


def test_centre_boxes_surround_the_heatmap_maxima():
    from deblend.models.centre_net import CentreNet

    model = attach_centre_net(build_mask_rcnn(seed=0), CentreNet(channels=(4, 8)), proposals=3, threshold=0.5)

    class Fixed(torch.nn.Module):  # a heatmap with maxima at (x, y) = (5, 6) and (20, 9)
        def forward(self, x):
            logits = torch.full_like(x, -5.0)
            logits[..., 6, 5], logits[..., 9, 20] = 3.0, 1.0
            return logits

    model.centre_net = Fixed()
    ((boxes, values),) = centre_boxes(model, torch.zeros(1, 1, 32, 32), [(32, 32)])
    assert values.tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(),
                                             torch.sigmoid(torch.tensor(1.0)).item()])
    centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    assert centres.tolist() == [[5.5, 6.5], [20.5, 9.5], [5.75, 6.5], [20.5, 9.5]]  # 12-px box clipped at x=0
    assert (boxes[:2, 2] - boxes[:2, 0]).tolist() == [6.0, 6.0]
