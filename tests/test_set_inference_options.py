"""pipelines/set_inference_options.py: a weights file with other inference options and its card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from deblend.models import build_mask_rcnn, load_weights, model_config, save_weights
from deblend.models.weights import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "set_inference_options.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _trained(tmp_path):
    path = tmp_path / "stage.pt"
    save_weights(build_mask_rcnn(seed=0), path, metadata={"name": "stage"})
    path.with_suffix(".json").write_text(json.dumps({"name": "stage", "metrics": {"f1": 0.9}}))
    return path


def test_options_reach_the_weights_and_the_card(tmp_path):
    source, out = _trained(tmp_path), tmp_path / "peaks.pt"
    result = _run(source, "--peak-proposals", 40, "--rpn-test-top-n", "700,350", "--out", out)
    assert result.returncode == 0, result.stderr
    first, second = load_weights(source), load_weights(out)
    config = model_config(second)
    assert config["peak_proposals"] == 40 and second.rpn.peak_proposals == 40
    assert (config["rpn_pre_nms_top_n_test"], config["rpn_post_nms_top_n_test"]) == (700, 350)
    assert config["contrast_peak_proposals"] == 0
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in second.state_dict().items())  # same network
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(out) and card["weights_file"] == "peaks.pt"
    assert card["inference_options"]["from"] == {"file": "stage.pt", "sha256": sha256_file(source)}
    assert card["metrics"] is None and "benchmark_quality" in card["metrics_note"]


def test_contrast_peaks_alone_keep_the_peak_setting(tmp_path):
    source, peaks, both = _trained(tmp_path), tmp_path / "peaks.pt", tmp_path / "both.pt"
    assert _run(source, "--peak-proposals", 40, "--out", peaks).returncode == 0
    result = _run(peaks, "--contrast-peak-proposals", 30, "--out", both)
    assert result.returncode == 0, result.stderr
    config = model_config(load_weights(both))
    assert (config["peak_proposals"], config["contrast_peak_proposals"]) == (40, 30)
    options = json.loads(both.with_suffix(".json").read_text())["inference_options"]
    assert (options["peak_proposals"], options["contrast_peak_proposals"]) == (40, 30)


def test_bad_options_are_parser_errors_naming_the_fix(tmp_path):
    source = _trained(tmp_path)
    bad = _run(source, "--rpn-test-top-n", "700", "--out", tmp_path / "x.pt")
    assert bad.returncode == 2 and "--rpn-test-top-n must be PRE,POST" in bad.stderr
    negative = _run(source, "--peak-proposals", -1, "--out", tmp_path / "x.pt")
    assert negative.returncode == 2 and "max_peaks" in negative.stderr
    same = _run(source, "--peak-proposals", 5, "--out", source)
    assert same.returncode == 2 and "--out must differ" in same.stderr
    source.with_suffix(".json").unlink()
    no_card = _run(source, "--peak-proposals", 5, "--out", tmp_path / "x.pt")
    assert no_card.returncode == 2 and "has no model card" in no_card.stderr
    assert not (tmp_path / "x.pt").exists()


def test_a_centre_detector_is_attached_with_its_settings(tmp_path):
    from deblend.models.centre_net import CentreNet, save_centre_net

    source, out, centre = _trained(tmp_path), tmp_path / "centres.pt", tmp_path / "centre_net.pt"
    torch.manual_seed(0)
    save_centre_net(CentreNet(channels=(4, 8)), centre, card={"name": "centre_net", "recipe": {"steps_done": 3}})
    result = _run(source, "--centre-net", centre, "--centre-proposals", 50, "--centre-detect",
                  "--centre-operating-point", 0.4, "--out", out)
    assert result.returncode == 0, result.stderr
    loaded = load_weights(out)
    config = model_config(loaded)
    assert (config["centre_net_channels"], config["centre_proposals"], config["centre_threshold"],
            config["centre_detect"]) == ((4, 8), 50, 0.3, True)
    bias = torch.load(centre, weights_only=True)["state_dict"]["head.bias"].float()
    shifted = bias - torch.log(torch.tensor(0.4 / 0.6))  # heatmap value 0.4 now reads 0.5
    torch.testing.assert_close(loaded.centre_net.head.bias, shifted, atol=2e-3, rtol=2e-3)
    options = json.loads(out.with_suffix(".json").read_text())["inference_options"]["centre_net"]
    assert options["detect"] is True and options["operating_point"] == 0.4
    assert options["card"]["recipe"] == {"steps_done": 3}
    bad = _run(source, "--centre-net", centre, "--centre-threshold", 2, "--out", tmp_path / "bad.pt")
    assert bad.returncode != 0 and "centre_threshold" in bad.stderr and not (tmp_path / "bad.pt").exists()
