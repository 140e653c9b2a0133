"""pipelines/benchmark_quality.py: its per-bin tables read the right summary keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_pipeline_script

from deblend.evaluate import SEPARATION_EDGES, SNR_EDGES


@pytest.fixture(scope="module")
def bq():
    return load_pipeline_script("benchmark_quality")


def _result(method, recall_by_snr, recall_by_separation):
    summary = {"n_blended_by_snr": [10, 20, 30, 40], "n_by_separation": [1, 2, 3, 4]}
    for suffix, value in zip(("0_10", "10_20", "20_50", "50_up"), recall_by_snr, strict=True):
        summary[f"blended_recall_snr_{suffix}"] = value
    for suffix, value in zip(("0_1", "1_2", "2_3", "3_up"), recall_by_separation, strict=True):
        summary[f"recall_nn_{suffix}"] = value
    return {"method": method, "summary": summary}


def test_bin_labels_match_the_evaluation_bins(bq):
    assert len(bq.SNR_LABELS) == len(SNR_EDGES) - 1
    assert len(bq.SEPARATION_LABELS) == len(SEPARATION_EDGES) - 1


def test_snr_and_separation_tables(bq):
    results = [_result("a", (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)),
               _result("b", (0.15, 0.25, 0.35, 0.45), (0.55, 0.65, 0.75, 0.85))]
    snr = bq.snr_table(results)
    assert "| S/N | blended sources | a | b |" in snr
    assert "| 5-10 | 10 | 0.100 | 0.150 |" in snr and "| >= 50 | 40 | 0.400 | 0.450 |" in snr
    separation = bq.separation_table(results)
    assert "| < 1 | 1 | 0.500 | 0.550 |" in separation and "| >= 3 | 4 | 0.800 | 0.850 |" in separation


def test_candidate_weights_get_their_own_results_and_leave_the_card_alone(tmp_path):
    from deblend.models.registry import DEFAULT_MASK_RCNN, weights_path

    shipped = weights_path(DEFAULT_MASK_RCNN)
    card = shipped.with_suffix(".json").read_bytes()
    candidate = tmp_path / "candidate.pt"
    candidate.write_bytes(shipped.read_bytes())
    script = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_quality.py"
    subprocess.run([sys.executable, str(script), "--n", "2", "--shape", "64", "64", "--methods", "mask-rcnn",
                    "--weights", str(candidate), "--workdir", str(tmp_path / "work"), "--results",
                    str(tmp_path / "results"), "--figure", str(tmp_path / "figure.png")],
                   check=True, capture_output=True, text=True, timeout=600)
    payload = json.loads((tmp_path / "results" / "quality_candidate.json").read_text())
    assert payload["weights"] == str(candidate) and payload["n_scenes"] == 2
    assert "Blended recall by the source's truth S/N" in (tmp_path / "results" / "quality_candidate.md").read_text()
    assert not (tmp_path / "figure.png").exists()
    assert shipped.with_suffix(".json").read_bytes() == card
