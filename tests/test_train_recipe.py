"""pipelines/train_mask_rcnn.py stays runnable: tiny multi-stage runs, as the shipped weights' recipe does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deblend.models import build_mask_rcnn, load_weights, model_config
from deblend.models.mask_rcnn import BOX_BRANCH, MASK_BRANCH
from deblend.models.weights import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "train_mask_rcnn.py"


def _train(tmp_path, out, *extra):
    tiny = ["--steps", "2", "--n-train", "4", "--n-val", "2", "--workers", "1", "--max-minutes", "0",
            "--cache", str(tmp_path / "cache")]
    subprocess.run([sys.executable, str(SCRIPT), *tiny, "--out", str(out), *extra], check=True,
                   cwd=ROOT, capture_output=True, text=True, timeout=600)
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny first stage (seed 3), shared by the later-stage tests: ``(weights path, card)``."""
    tmp_path = tmp_path_factory.mktemp("stage1")
    path = tmp_path / "stage1.pt"
    return path, _train(tmp_path, path, "--checkpoints", str(tmp_path / "ck1"), "--seed", "3")


def test_two_stage_recipe_records_its_first_stage(tmp_path, stage1):
    stage1, card1 = stage1
    stage2 = tmp_path / "stage2.pt"
    assert card1["recipe"]["init_from"] is None
    assert card1["sha256"] == sha256_file(stage1)

    card2 = _train(tmp_path, stage2, "--checkpoints", str(tmp_path / "ck2"), "--init-from", str(stage1),
                   "--lr", "5e-4")
    init = card2["recipe"]["init_from"]
    assert init["file"] == "stage1.pt"
    assert init["sha256"] == card1["sha256"]
    assert init["recipe"]["steps_done"] == 2 and init["recipe"]["init_from"] is None
    assert card2["recipe"]["steps_done"] == 2 and card2["recipe"]["train_config"]["lr"] == 5e-4

    # stage 2 (seed 0) started from stage 1's weights (seed 3), not from its own initialisation,
    # and changed them a little (two warm-up steps)
    first, second = load_weights(stage1), load_weights(stage2)
    assert model_config(first) == model_config(second)
    fresh = build_mask_rcnn(**{**model_config(second), "seed": 0}).state_dict()
    keys = [k for k, v in second.state_dict().items() if v.is_floating_point() and v.ndim > 1]
    to_first = sum(float((second.state_dict()[k] - first.state_dict()[k]).abs().sum()) for k in keys)
    to_fresh = sum(float((second.state_dict()[k] - fresh[k]).abs().sum()) for k in keys)
    assert 0 < to_first < 0.01 * to_fresh


def test_mask_head_stage_changes_only_the_mask_branch(tmp_path, stage1):
    stage1, stage2 = stage1[0], tmp_path / "stage2.pt"
    card = _train(tmp_path, stage2, "--checkpoints", str(tmp_path / "ck2"), "--init-from", str(stage1),
                  "--mask-head-channels", "16,16", "--train-only", "mask", "--rpn-test-top-n", "700,350")
    assert card["recipe"]["trained_parts"] == "mask"
    assert card["recipe"]["init_from"]["new_mask_head_channels"] == [16, 16]
    assert 0 < card["n_parameters_trained"] < card["n_parameters"]
    first, second = load_weights(stage1), load_weights(stage2)
    config = model_config(second)
    assert config["mask_head_channels"] == (16, 16)
    assert (config["rpn_pre_nms_top_n_test"], config["rpn_post_nms_top_n_test"]) == (700, 350)
    old = first.state_dict()
    for key, value in second.state_dict().items():
        if not key.startswith(MASK_BRANCH):
            assert torch.equal(value, old[key]), key  # frozen, BatchNorm statistics included


def test_box_stage_changes_only_the_box_branch(tmp_path, stage1):
    stage1, stage2 = stage1[0], tmp_path / "stage2.pt"
    card = _train(tmp_path, stage2, "--checkpoints", str(tmp_path / "ck2"), "--init-from", str(stage1),
                  "--train-only", "box", "--box-batch-size", "32", "--rpn-iou", "0.5,0.3", "--box-iou", "0.4,0.4")
    assert card["recipe"]["trained_parts"] == "box"
    train_config = card["recipe"]["train_config"]
    assert train_config["box_batch_size_per_image"] == 32
    assert (train_config["rpn_fg_iou_thresh"], train_config["rpn_bg_iou_thresh"]) == (0.5, 0.3)
    assert (train_config["box_fg_iou_thresh"], train_config["box_bg_iou_thresh"]) == (0.4, 0.4)
    first, second = load_weights(stage1), load_weights(stage2)
    old = second.state_dict()
    changed = {key for key, value in first.state_dict().items() if not torch.equal(value, old[key])}
    assert changed and all(key.startswith(BOX_BRANCH) for key in changed)


def test_bad_iou_thresholds_are_a_parser_error_naming_the_fix(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--rpn-iou", "0.3,0.5", "--out", str(tmp_path / "x.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--rpn-iou must be FG,BG with 0 < BG <= FG <= 1, got '0.3,0.5'; e.g. --rpn-iou 0.5,0.3" in result.stderr


def test_widened_conditions_reach_the_card_and_the_cache_name(tmp_path, stage1):
    out = tmp_path / "stage7.pt"
    card = _train(tmp_path, out, "--checkpoints", str(tmp_path / "ck7"), "--init-from", str(stage1[0]),
                  "--r-half-max", "1.5,4", "--space-fraction", "0.25")
    conditions = card["data"]["conditions"]
    assert conditions["r_half_max"] == [1.5, 4.0] and conditions["space_fraction"] == 0.25
    assert "space-telescope-like in 25% of scenes" in card["data"]["augmentation"]
    assert (tmp_path / "cache" / "train_0_4_rhalf1.5-4_space0.25.npz").exists()  # not the default scenes' cache


@pytest.mark.parametrize("option, value, key, recorded, suffix", [
    ("--scene-shape", "96,64", "shape", [96, 64], "shape96x64"),
    ("--blend-fraction", "0.5,0.9", "blend_fraction", [0.5, 0.9], "blend0.5-0.9"),
    ("--density", "100,400", "density", [100.0, 400.0], "density100-400"),
])
def test_condition_ranges_reach_the_card_and_the_cache_name(tmp_path, stage1, option, value, key, recorded,
                                                            suffix):
    out = tmp_path / "stage.pt"
    card = _train(tmp_path, out, "--checkpoints", str(tmp_path / "ck"), "--init-from", str(stage1[0]),
                  option, value)
    assert card["data"]["conditions"][key] == recorded
    assert (tmp_path / "cache" / f"train_0_4_{suffix}.npz").exists()


@pytest.mark.parametrize("args, message", [(["--r-half-max", "4,1.5"], "--r-half-max must be LO,HI"),
                                           (["--r-half-max", "big"], "--r-half-max must be LO,HI"),
                                           (["--space-fraction", "2"], "--space-fraction must be a fraction"),
                                           (["--scene-shape", "256"], "--scene-shape must be NY,NX"),
                                           (["--scene-shape", "16,16"], "--scene-shape must be NY,NX"),
                                           (["--blend-fraction", "0.9,0.5"], "--blend-fraction must be LO,HI"),
                                           (["--blend-fraction", "0.5,1.5"], "--blend-fraction must be LO,HI"),
                                           (["--density", "0,400"], "--density must be LO,HI"),
                                           (["--density", "many"], "--density must be LO,HI")])
def test_bad_condition_options_are_refused(tmp_path, args, message):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.pt"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr
