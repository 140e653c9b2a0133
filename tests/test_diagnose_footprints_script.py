"""pipelines/diagnose_footprints.py: its edge variants and per-source IoUs are right, and it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from conftest import load_pipeline_script

from deblend.evaluate import evaluate_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def diag():
    return load_pipeline_script("diagnose_footprints")


def _scene():
    truth_seg = np.zeros((12, 16), np.int32)
    truth_seg[2:7, 2:7] = 1
    truth_seg[3:6, 10:14] = 2
    truth = Table({"id": [1, 2], "x": [4.0, 11.5], "y": [4.0, 4.0], "snr": [8.0, 60.0], "flux": [1.0, 1.0],
                   "blended": [False, False]})
    labels = np.zeros_like(truth_seg)
    labels[3:6, 3:6] = 1  # inside the truth footprint, one pixel short on every side
    labels[2:7, 9:15] = 2  # a pixel too wide on every side
    catalog = Table({"label": [1, 2], "x_centroid": [4.0, 11.5], "y_centroid": [4.0, 4.0]})
    return labels, catalog, truth_seg, truth


def test_truth_edge_variants(diag):
    labels, _, truth_seg, _ = _scene()
    variants = diag.edge_variants(labels, truth_seg)
    assert list(variants) == ["as is", "truth foreground, cut", "truth foreground, grown 1",
                              "truth foreground, grown 2"]
    np.testing.assert_array_equal(variants["as is"], labels)
    np.testing.assert_array_equal(variants["truth foreground, cut"] == 2, truth_seg == 2)
    np.testing.assert_array_equal(variants["truth foreground, cut"] == 1, labels == 1)  # nothing to cut
    np.testing.assert_array_equal(variants["truth foreground, grown 2"], truth_seg)  # the edge is the truth's
    assert (variants["truth foreground, grown 1"] != truth_seg).sum() == 4  # the corners are sqrt(2) away


def test_per_source_iou_matches_evaluate(diag):
    labels, catalog, truth_seg, truth = _scene()
    rows = diag.matched_sources(labels, catalog, truth_seg, truth, 2.0)
    np.testing.assert_allclose(rows[:, 0], [8.0, 60.0])
    np.testing.assert_allclose(rows[:, 1], [9 / 25, 12 / 30])
    np.testing.assert_allclose(rows[:, 2], [9 / 25, 30 / 12])
    counts = evaluate_image(labels, catalog, truth_seg, truth, fwhm_pixels=2.0)
    assert counts["iou_sum"] == pytest.approx(rows[:, 1].sum())


def test_the_script_runs_and_reports(tmp_path):
    out = tmp_path / "d.md"
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "diagnose_footprints.py"), "--n", "1",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "| truth foreground, grown 2 |" in text and "| 5-10 |" in text
