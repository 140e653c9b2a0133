"""pipelines/train_centre_net.py and compare_centres.py stay runnable: tiny runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from deblend.models.centre_net import load_centre_net

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_two_stage_recipe_and_the_points_comparison(tmp_path):
    tiny = ["--steps", 2, "--n-train", 3, "--n-val", 2, "--workers", 1, "--max-minutes", 0, "--batch-size", 2,
            "--cache", tmp_path / "cache", "--channels", "4,8"]
    first = _run("train_centre_net.py", *tiny, "--checkpoints", tmp_path / "ck1", "--out", tmp_path / "c1.pt")
    assert first.returncode == 0, first.stderr
    card = json.loads((tmp_path / "c1.json").read_text())
    assert card["recipe"]["steps_done"] == 2 and card["recipe"]["init_from"] is None
    assert card["architecture"]["channels"] == [4, 8]

    second = _run("train_centre_net.py", *tiny, "--checkpoints", tmp_path / "ck2", "--init-from", tmp_path / "c1.pt",
                  "--lr", 1e-4, "--out", tmp_path / "c2.pt")
    assert second.returncode == 0, second.stderr
    card2 = json.loads((tmp_path / "c2.json").read_text())
    assert card2["recipe"]["init_from"]["file"] == "c1.pt" and card2["recipe"]["train_config"]["lr"] == 1e-4
    a = dict(load_centre_net(tmp_path / "c1.pt").named_parameters())
    b = dict(load_centre_net(tmp_path / "c2.pt").named_parameters())
    assert any(not torch.equal(a[k].detach(), b[k].detach()) for k in a)  # trained further...
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) < 0.01  # ...from c1 (two steps at lr 1e-4)

    out = tmp_path / "points.md"
    compared = _run("compare_centres.py", tmp_path / "c2.pt", "--n", 2, "--seed", 9100, "--out", out)
    assert compared.returncode == 0, compared.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| pipeline |") and len(rows) == 2 + 1 + 2 * 6


def test_training_goes_on_from_the_detector_attached_to_mask_rcnn_weights(tmp_path):
    from deblend.models import attach_centre_net, build_mask_rcnn, save_weights
    from deblend.models.centre_net import CentreNet, shift_operating_point

    torch.manual_seed(0)
    trained = CentreNet(channels=(4, 8))
    shifted = CentreNet(channels=(4, 8))
    shifted.load_state_dict(trained.state_dict())
    shift_operating_point(shifted, 0.4)  # as set_inference_options.py --centre-operating-point 0.4 does
    model = attach_centre_net(build_mask_rcnn(seed=0), shifted, proposals=5, threshold=0.2, detect=True)
    options = {"centre_net": {"operating_point": 0.4, "card": {"data": {"train_seed": 20}, "recipe": {}}}}
    save_weights(model, tmp_path / "m.pt", metadata={"inference_options": options})

    result = _run("train_centre_net.py", "--steps", 1, "--lr", 1e-9, "--n-train", 2, "--n-val", 2, "--workers", 1,
                  "--max-minutes", 0, "--batch-size", 2, "--cache", tmp_path / "cache", "--correlated-fraction", 1.0,
                  "--checkpoints", tmp_path / "ck", "--init-from", tmp_path / "m.pt", "--out", tmp_path / "c.pt")
    assert result.returncode == 0, result.stderr
    card = json.loads((tmp_path / "c.json").read_text())
    assert card["recipe"]["init_from"] == {"file": "m.pt", "data": {"train_seed": 20}, "recipe": {}}
    assert card["data"]["conditions"]["correlated_fraction"] == 1.0
    assert card["data"]["val_conditions"]["correlated_fraction"] == 0.5
    assert list((tmp_path / "cache").glob("centres_train_*_cf1.npz"))  # its own cache, not the standard one
    # the shift is undone: training went on from the network as trained (float16 storage, one tiny step)
    bias = load_centre_net(tmp_path / "c.pt").head.bias
    torch.testing.assert_close(bias.detach(), trained.head.bias.detach(), atol=5e-3, rtol=0)

    save_weights(build_mask_rcnn(seed=0), tmp_path / "plain.pt", metadata={})
    plain = _run("train_centre_net.py", "--init-from", tmp_path / "plain.pt", "--n-train", 2, "--n-val", 2,
                 "--workers", 1, "--cache", tmp_path / "cache", "--out", tmp_path / "x.pt")
    assert plain.returncode != 0 and "neither a centre detector" in plain.stderr
    assert not (tmp_path / "x.pt").exists()
