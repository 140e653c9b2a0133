"""pipelines/diagnose_blends.py stays runnable, and its fates and tables add up."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_pipeline_script


@pytest.fixture(scope="module")
def diag():
    return load_pipeline_script("diagnose_blends")


def test_report_counts_fates_and_bins(diag):
    # (blended, matched, snr, neighbour flux ratio, fate, iou)
    # (blended, matched, snr, neighbour flux ratio, fate, iou, truth-box score)
    rows = [(True, True, 7.0, 0.5, "", 0.6, 0.9), (True, False, 7.0, 3.0, "no proposal", np.nan, 0.2),
            (True, False, 60.0, 3.0, "mask NMS", np.nan, 0.7), (False, True, 300.0, 0.1, "", 0.9, 0.99),
            (False, False, 6.0, 0.1, "box score", np.nan, 0.1)]  # not blended: not among the missed
    text = "\n".join(diag.report(rows, n_scenes=2, tta=False))
    assert "Blended truth sources: 3; found 1 (blended recall 0.333); missed 2." in text
    assert "| no proposal | 1 | 0.50 |" in text and "| mask NMS | 1 | 0.50 |" in text
    assert "| box score | 0 | 0.00 |" in text and "| no detection |" not in text
    assert "| 5-10 | 2 | 0.500 | 0.500 | 1 | 0.600 |" in text
    assert "| 200-inf | 0 | n/a | n/a | 1 | 0.900 |" in text
    assert "| all | 3 | 0.333 | 0.667 | 2 | 0.750 |" in text
    assert "| 1-10 | 2 | 0.000 |" in text
    tta = "\n".join(diag.report([(True, False, 7.0, 3.0, "no detection", np.nan, 0.2)], n_scenes=1, tta=True))
    assert "| no detection | 1 | 1.00 |" in tta and "| no proposal |" not in tta


def test_truth_boxes_follow_the_training_convention(diag):
    seg = np.zeros((8, 10), dtype=np.int32)
    seg[2:5, 3:7] = 2
    seg[6, 1] = 5
    boxes = diag.truth_boxes(seg, np.array([5, 2]))
    np.testing.assert_array_equal(boxes, [[1, 6, 2, 7], [3, 2, 7, 5]])


def test_diagnose_scene_with_the_shipped_model(diag):
    from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn
    from deblend.simulate import SceneConfig, simulate_scene

    config = SceneConfig(shape=(96, 96), pixel_scale=0.2, psf_fwhm=0.7, noise_sigma=1.0, blend_fraction=0.8)
    scene = simulate_scene(config, seed=3, keep_sources=False)
    model = load_mask_rcnn(DEFAULT_MASK_RCNN)
    before = model.roi_heads.nms_thresh, model.roi_heads.detections_per_img
    rows = diag.diagnose_scene(scene, config.psf_fwhm / config.pixel_scale, model)
    assert (model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == before  # NMS switched back on
    assert len(rows) == len(scene.truth) > 0
    for _, matched, snr, _, fate, iou, box_score in rows:
        assert snr >= config.min_snr
        assert (fate == "") == matched and (fate in diag.FATES or matched) and fate != "no detection"
        assert (0 < iou <= 1) if matched else np.isnan(iou)
        assert 0 <= box_score <= 1
    # the box head recognises most sources from their truth boxes
    assert np.mean([r[6] >= diag.SCORE_THRESHOLD for r in rows]) > 0.5
    assert sum(r[1] for r in rows) > 0.5 * len(rows)  # the shipped model finds most of them
