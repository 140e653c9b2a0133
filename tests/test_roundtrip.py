"""End to end through the CLI: simulate -> run -> evaluate, and the bundled sample data."""

import json
from pathlib import Path

import numpy as np
import pytest

from deblend.cli import main
from deblend.io import read_catalog, read_segmentation
from deblend.pipeline import METHODS

DATA = Path(__file__).resolve().parents[1] / "data"


def test_simulate_run_evaluate(tmp_path, capsys):
    truth = tmp_path / "truth"
    assert main(["-q", "simulate", "--n", "3", "--out", str(truth), "--seed", "5", "--shape", "96", "96"]) == 0
    assert len(list(truth.glob("scene_*_truth.fits"))) == 3
    for method in ("sep", "photutils"):
        assert main(["-q", "run", str(truth), "-o", str(tmp_path / method), "--method", method]) == 0
        # the truth files in the directory are not deblended as inputs
        assert len(list((tmp_path / method).glob("*_seg.fits"))) == 3
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "sep"), str(tmp_path / "photutils"),
                 "--truth", str(truth), "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "sep" in table and "photutils" in table and "blended recall" in table
    results = json.loads(report.read_text())
    assert [r["method"] for r in results] == ["sep", "photutils"]
    for r in results:
        s = r["summary"]
        assert s["n_images"] == 3 and s["n_truth"] > 10
        # bright simulated sources are found and matched: a broken pipeline scores ~0
        assert 0.3 < s["recall"] <= 1 and s["precision"] > 0.8 and s["mean_iou"] > 0.3


def test_bundled_sample_data_runs(tmp_path):
    """What `make run` does (default method, shipped weights): each sample tile gives a map and a catalog."""
    assert main(["-q", "run", str(DATA), "-o", str(tmp_path)]) == 0
    stems = sorted(p.name[: -len(".fits")] for p in DATA.glob("*.fits") if "_truth" not in p.name)
    assert stems == ["sample_0000", "sample_0001", "sample_3band_0000"]
    for stem in stems:
        labels, header = read_segmentation(tmp_path / f"{stem}_seg.fits")
        cat = read_catalog(tmp_path / f"{stem}_cat.fits")
        assert len(cat) > 5
        np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.asarray(cat["label"]))
        assert header["DBMETHOD"] == METHODS[0]
    multi = read_catalog(tmp_path / "sample_3band_0000_cat.fits")
    assert {"segment_flux_band0", "segment_flux_band1", "segment_flux_band2"} <= set(multi.colnames)


@pytest.mark.parametrize("fmt", ["fits", "ecsv", "csv", "parquet", "votable"])
def test_evaluate_reads_every_catalog_format(tmp_path, fmt):
    truth = tmp_path / "truth"
    assert main(["-q", "simulate", "--n", "1", "--out", str(truth), "--seed", "9", "--shape", "64", "64"]) == 0
    assert main(["-q", "run", str(truth), "-o", str(tmp_path / "p"), "--format", fmt, "--method", "sep"]) == 0
    assert main(["-q", "evaluate", "--pred", str(tmp_path / "p"), "--truth", str(truth)]) == 0
