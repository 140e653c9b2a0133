"""pipelines/benchmark_generalisation.py stays runnable, and each condition leaves the training range as it says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_pipeline_script

from deblend.training import ConditionRanges

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    return load_pipeline_script("benchmark_generalisation")


def _configs(gen, key, n=6):
    index = [c.key for c in gen.CONDITIONS].index(key)
    return [gen.condition_config(gen.CONDITIONS[index], index, i)[0] for i in range(n)]


def test_conditions_leave_the_training_ranges(gen):
    r = ConditionRanges()
    reference = _configs(gen, "reference")
    assert all(0.15 <= c.pixel_scale <= 0.3 and 0.5 <= c.psf_fwhm <= 1.0 for c in reference)
    assert all(c.psf_fwhm > r.psf_fwhm[1] for c in _configs(gen, "broad_psf"))
    assert all(c.pixel_scale < r.pixel_scale[0] for c in _configs(gen, "fine_pixels"))
    assert all(c.psf_beta != reference[0].psf_beta for c in _configs(gen, "psf_wings"))
    assert all(c.density > r.density[1] and c.blend_fraction == r.blend_fraction[1]
               for c in _configs(gen, "crowded"))
    assert {c.noise_sigma for c in _configs(gen, "noise_extremes")} == {0.25, 4.0}
    assert all(not (r.noise_sigma[0] <= c.noise_sigma <= r.noise_sigma[1]) for c in _configs(gen, "noise_extremes"))
    assert all(c.shape == (97, 413) for c in _configs(gen, "odd_shape"))
    assert all(c.r_half_range == (1.5, 5.0) for c in _configs(gen, "large_galaxies"))
    # one thing changed: the drawn conditions of a scene are the reference's where not overridden
    assert [c.noise_sigma for c in _configs(gen, "crowded")] == [c.noise_sigma for c in reference]


def test_seed_draws_other_scenes_of_the_same_conditions(gen):
    index = [c.key for c in gen.CONDITIONS].index("fine_pixels")
    default = [gen.condition_config(gen.CONDITIONS[index], index, i) for i in range(4)]
    other = [gen.condition_config(gen.CONDITIONS[index], index, i, base_seed=8100) for i in range(4)]
    assert {sim_seed for _, sim_seed in default}.isdisjoint(sim_seed for _, sim_seed in other)
    assert [c.pixel_scale for c, _ in default] != [c.pixel_scale for c, _ in other]
    assert all(c.pixel_scale < ConditionRanges().pixel_scale[0] for c, _ in other)


def test_small_run_writes_table_json_and_figure(gen, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmark_generalisation.py", "--n", "1", "--conditions", "reference",
                                      "odd_shape", "--methods", "sep", "photutils", "--workdir",
                                      str(tmp_path / "work"), "--results", str(tmp_path / "res"),
                                      "--figure", str(tmp_path / "g.png")])
    gen.main()
    payload = json.loads((tmp_path / "res" / "generalisation.json").read_text())
    assert payload["seed"] == 7000
    assert [row["key"] for row in payload["conditions"]] == ["reference", "odd_shape"]
    for row in payload["conditions"]:
        assert row["n_truth"] > 0 and set(row["summary"]) == {"sep", "photutils"}
        assert 0 <= row["summary"]["sep"]["f1"] <= 1
    table = (tmp_path / "res" / "generalisation.md").read_text()
    assert "| 97x413 pixels |" in table and "n/a" in table  # no mask-rcnn column asked for
    assert (tmp_path / "g.png").stat().st_size > 0
