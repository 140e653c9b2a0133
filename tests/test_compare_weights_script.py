"""pipelines/compare_weights.py: metrics from summed counts and the paired bootstrap."""

import numpy as np
import pytest
from conftest import load_pipeline_script

from deblend.evaluate import summarize


@pytest.fixture(scope="module")
def cw():
    return load_pipeline_script("compare_weights")


def _scene(tp, fp, fn, tp_blended, n_blended, iou_sum, class_correct=None, class_total=None):
    return {"tp": tp, "fp": fp, "fn": fn, "tp_blended": tp_blended, "n_blended": n_blended, "iou_sum": iou_sum,
            "class_correct": class_correct, "class_total": class_total}


def test_metrics_are_ratios_of_summed_counts(cw):
    counts = cw.counts_matrix([_scene(8, 2, 2, 3, 4, 6.0), _scene(2, 0, 8, 0, 6, 1.0)])
    m = cw.metrics_from_counts(counts.sum(0))
    assert m["recall"] == pytest.approx(10 / 20) and m["precision"] == pytest.approx(10 / 12)
    assert m["blended_recall"] == pytest.approx(3 / 10) and m["mean_iou"] == pytest.approx(7 / 10)
    assert m["f1"] == pytest.approx(20 / (20 + 2 + 10))


def test_star_galaxy_accuracy_and_catalogs_without_classes(cw):
    m = cw.metrics_from_counts(cw.counts_matrix([_scene(8, 2, 2, 3, 4, 6.0, 6, 8),
                                                 _scene(2, 0, 8, 0, 6, 1.0, 1, 2)]).sum(0))
    assert m["star_galaxy_accuracy"] == pytest.approx(7 / 10)
    m = cw.metrics_from_counts(cw.counts_matrix([_scene(8, 2, 2, 3, 4, 6.0)]).sum(0))
    assert np.isnan(m["star_galaxy_accuracy"]) and m["recall"] == pytest.approx(0.8)


def test_metrics_agree_with_evaluate_summarize(cw):
    scenes = [_scene(8, 2, 2, 3, 4, 6.0, 5, 7), _scene(2, 0, 8, 0, 6, 1.0, 2, 2), _scene(0, 3, 1, 0, 0, 0.0, 0, 0)]
    full = [dict(s, n_truth=s["tp"] + s["fn"], n_pred=s["tp"] + s["fp"], n_pred_ignored=0, merged=0, shredded=0,
                 flux_rel_errors=[]) for s in scenes]
    expected = summarize(full)
    got = cw.metrics_from_counts(cw.counts_matrix(scenes).sum(0))
    for name in ("recall", "precision", "f1", "blended_recall", "mean_iou", "star_galaxy_accuracy"):
        assert got[name] == pytest.approx(expected[name]), name


def test_bootstrap_interval_covers_a_real_difference_and_not_zero(cw):
    rng = np.random.default_rng(1)
    a = [_scene(int(t), 1, 20 - int(t), int(t) // 2, 10, 0.7 * t) for t in rng.integers(10, 14, 60)]
    b = [dict(s, tp=s["tp"] + 2, fn=s["fn"] - 2, tp_blended=s["tp_blended"] + 2) for s in a]  # 2 more per scene
    out = cw.paired_bootstrap(cw.counts_matrix(a), cw.counts_matrix(b), n_boot=500)
    assert out["recall"]["diff"] == pytest.approx(0.1)
    assert 0 < out["recall"]["low"] <= 0.1 <= out["recall"]["high"]
    assert out["blended_recall"]["low"] > 0


def test_identical_files_give_a_zero_interval(cw):
    a = cw.counts_matrix([_scene(5, 1, 2, 1, 2, 3.5), _scene(7, 0, 1, 2, 3, 5.0), _scene(3, 2, 4, 0, 1, 2.0)])
    out = cw.paired_bootstrap(a, a.copy(), n_boot=100)
    out.pop("star_galaxy_accuracy")  # no classes in these scenes: NaN
    assert all(row["diff"] == 0 and row["low"] == 0 and row["high"] == 0 for row in out.values())
    lines = cw.report(out, names=["a.pt", "b.pt"], n_scenes=3, seed=8000, noise_correlation=0.0,
                      seconds=[2.0, 3.0])
    assert "| recall | 0.682 | 0.682 | +0.000 | +0.000 to +0.000 |" in lines
    assert lines[-1].endswith("A 2.0 s, B 3.0 s (B/A 1.50).")


def test_mismatched_scene_sets_are_refused(cw):
    a = cw.counts_matrix([_scene(5, 1, 2, 1, 2, 3.5)])
    with pytest.raises(ValueError, match="same non-empty"):
        cw.paired_bootstrap(a, np.vstack([a, a]))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_options_must_be_a_json_object(cw, monkeypatch, capsys, text):
    monkeypatch.setattr("sys.argv", ["compare_weights.py", "a.pt", "b.pt", "--options-b", text])
    with pytest.raises(SystemExit) as exit_info:
        cw.main()
    assert exit_info.value.code == 2
    assert "--options-b must be a JSON object" in capsys.readouterr().err
