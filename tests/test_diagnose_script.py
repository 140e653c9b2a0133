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
    rows = [(True, True, 7.0, 0.5, "", 0.6), (True, False, 7.0, 3.0, "no detection", np.nan),
            (True, False, 60.0, 3.0, "mask NMS", np.nan), (False, True, 300.0, 0.1, "", 0.9),
            (False, False, 6.0, 0.1, "no detection", np.nan)]  # not blended: not among the missed
    text = "\n".join(diag.report(rows, n_scenes=2, tta=False))
    assert "Blended truth sources: 3; found 1 (blended recall 0.333); missed 2." in text
    assert "| no detection | 1 | 0.50 |" in text and "| mask NMS | 1 | 0.50 |" in text
    assert "| 5-10 | 2 | 0.500 | 1 | 0.600 |" in text
    assert "| 200-inf | 0 | n/a | 1 | 0.900 |" in text
    assert "| 1-10 | 2 | 0.000 |" in text


def test_diagnose_scene_with_the_shipped_model(diag):
    from deblend.models.registry import DEFAULT_MASK_RCNN, load_mask_rcnn
    from deblend.simulate import SceneConfig, simulate_scene

    config = SceneConfig(shape=(96, 96), pixel_scale=0.2, psf_fwhm=0.7, noise_sigma=1.0, blend_fraction=0.8)
    scene = simulate_scene(config, seed=3, keep_sources=False)
    rows = diag.diagnose_scene(scene, config.psf_fwhm / config.pixel_scale, load_mask_rcnn(DEFAULT_MASK_RCNN))
    assert len(rows) == len(scene.truth) > 0
    for _, matched, snr, _, fate, iou in rows:
        assert snr >= config.min_snr
        assert (fate == "") == matched and (fate in diag.FATES or matched)
        assert (0 < iou <= 1) if matched else np.isnan(iou)
    assert sum(r[1] for r in rows) > 0.5 * len(rows)  # the shipped model finds most of them
