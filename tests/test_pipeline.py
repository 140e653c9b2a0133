"""Tests of deblend.pipeline (Deblender) and deblend.result (DeblendResult.write)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from deblend.exceptions import InputError, NoSourcesWarning
from deblend.io import Image, read_catalog, read_segmentation
from deblend.pipeline import METHODS, Deblender
from deblend.result import DeblendResult, output_paths

METHOD_NAMES = ["sep", "photutils"]


@pytest.fixture
def out_dir(tmp_path):
    """An empty output directory apart from the inputs."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def check_result(result, n_sources):
    assert isinstance(result, DeblendResult)
    assert result.labels.dtype == np.int32 and result.labels.shape == result.image.shape
    assert result.n_sources == n_sources == len(result.catalog)
    present = np.unique(result.labels[result.labels > 0])
    np.testing.assert_array_equal(present, np.arange(1, n_sources + 1))
    np.testing.assert_array_equal(np.asarray(result.catalog["label"]), present)
    assert result.catalog.colnames[0] == "label"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_run_on_array(scene, method):
    result = Deblender(method).run(scene)
    check_result(result, 3)
    assert result.method == method and result.weights_id is None
    assert result.catalog.meta["method"] == method
    assert result.image.path == "<array>"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_run_on_file(scene_file, method):
    for given in (scene_file, str(scene_file), [scene_file]):
        result = Deblender(method).run(given)
        check_result(result, 3)
        assert result.image.path == str(scene_file)
        assert {"ra", "dec", "sky_centroid"} <= set(result.catalog.colnames)


def test_run_on_image_and_bands(write_fits, make_scene):
    paths = []
    for i, band in enumerate("gr"):
        hdu = fits.PrimaryHDU(make_scene(seed=i))
        hdu.header["FILTER"] = band
        paths.append(write_fits(f"f_{band}.fits", hdu))
    result = Deblender("sep").run(paths)
    check_result(result, 3)
    assert {"segment_flux_g", "segment_flux_r"} <= set(result.catalog.colnames)
    result = Deblender("sep").run(Image.from_array(make_scene()))
    check_result(result, 3)


def test_read_options_passed(write_fits, scene):
    path = write_fits("two.fits", [fits.ImageHDU(np.zeros((8, 8), np.float32) + 1, name="JUNK"),
                                   fits.ImageHDU(scene, name="SCI")])
    assert Deblender("sep").run(path, hdu="SCI").n_sources == 3


def test_run_bad_file_raises_input_error(bad_files):
    with pytest.raises(InputError, match="not a FITS"):
        Deblender("sep").run(bad_files["not_fits"])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_no_sources_warns_and_gives_empty_outputs(rng, method, tmp_path):
    noise = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    with pytest.warns(NoSourcesWarning, match="no sources"):
        result = Deblender(method, thresh=50.0).run(noise)
    assert result.n_sources == 0 and not result.labels.any()
    paths = result.write(tmp_path, stem="noise")
    assert len(read_catalog(paths["catalog"])) == 0
    assert not read_segmentation(paths["segmentation"])[0].any()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_write_both_files(scene_file, method, tmp_path):
    result = Deblender(method).run(scene_file)
    outdir = tmp_path / "out"
    paths = result.write(outdir)
    assert paths == output_paths(outdir, "scene")
    assert sorted(p.name for p in outdir.iterdir()) == ["scene_cat.fits", "scene_seg.fits"]
    labels, header = read_segmentation(paths["segmentation"])
    np.testing.assert_array_equal(labels, result.labels)
    assert header["DBMETHOD"] == method and header["DBINPUT"] == "scene.fits"
    assert WCS(header).has_celestial
    catalog = read_catalog(paths["catalog"])
    np.testing.assert_array_equal(np.asarray(catalog["label"]), np.arange(1, 4))
    assert "ra" in catalog.colnames and "sky_centroid" not in catalog.colnames


def test_write_formats_and_overwrite(scene_file, out_dir):
    result = Deblender("sep").run(scene_file)
    paths = result.write(out_dir, format="ecsv", stem="x")
    assert paths["catalog"].name == "x_cat.ecsv"
    assert "sky_centroid" in read_catalog(paths["catalog"]).colnames
    with pytest.raises(FileExistsError, match="overwrite"):
        result.write(out_dir, format="ecsv", stem="x")
    result.write(out_dir, format="ecsv", stem="x", overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["x_cat.ecsv", "x_seg.fits"]
    with pytest.raises(ValueError, match="format"):
        result.write(out_dir, format="hdf5")


def test_write_refuses_when_only_catalog_exists(scene_file, out_dir):
    result = Deblender("sep").run(scene_file)
    (out_dir / "scene_cat.fits").write_text("old")
    with pytest.raises(FileExistsError):
        result.write(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["scene_cat.fits"]  # nothing new written


def test_write_failure_leaves_no_files(scene_file, out_dir, monkeypatch):
    import deblend.result

    result = Deblender("sep").run(scene_file)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(deblend.result, "write_catalog", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        result.write(out_dir)
    assert list(out_dir.iterdir()) == []


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of.*'magic'"):
        Deblender("magic")
    assert set(METHODS) >= {"sep", "photutils"}


def test_options_translation():
    sep_d = Deblender("sep", thresh=3.0, minarea=7, deblend_nthresh=16, deblend_cont=0.01)
    assert sep_d.options == {"thresh": 3.0, "minarea": 7, "deblend_nthresh": 16,
                             "deblend_cont": 0.01}
    phot = Deblender("photutils", thresh=3.0, minarea=7, deblend_nthresh=16, deblend_cont=0.01)
    assert phot.options == {"nsigma": 3.0, "n_pixels": 7, "n_levels": 16, "contrast": 0.01}
    assert Deblender("photutils").options == {}
    merged = Deblender("photutils", thresh=2.0, method_options={"kernel_fwhm": 3.0})
    assert merged.options == {"kernel_fwhm": 3.0, "nsigma": 2.0}
    config = merged.config()
    assert config["method"] == "photutils" and config["options"]["nsigma"] == 2.0
    assert "photutils" in repr(merged)


def test_options_reach_the_method(scene):
    with pytest.warns(NoSourcesWarning):
        assert Deblender("photutils", thresh=1000.0).run(scene).n_sources == 0
    with pytest.warns(NoSourcesWarning):
        assert Deblender("sep", minarea=5000).run(scene).n_sources == 0


def test_invalid_option_value_raises(scene):
    with pytest.raises(ValueError, match="nsigma"):
        Deblender("photutils", thresh=-1.0).run(scene)


def test_deterministic(scene):
    a = Deblender("sep").run(scene)
    b = Deblender("sep").run(scene)
    np.testing.assert_array_equal(a.labels, b.labels)


# --- Mask R-CNN path, with tiny untrained weights (the shipped ones are tested in test_integration.py)


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory):
    from deblend.models import build_mask_rcnn, save_weights

    path = tmp_path_factory.mktemp("w") / "untrained.pt"
    save_weights(build_mask_rcnn(seed=0), path, metadata={"note": "untrained, for tests"})
    return path


def test_mask_rcnn_method_adds_class_columns(untrained_weights):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (80, 96)).astype(np.float32)
    yy, xx = np.mgrid[:80, :96]
    image += 200 * np.exp(-((xx - 40) ** 2 + (yy - 30) ** 2) / 8.0)
    deblender = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16,
                          score_threshold=0.0)
    result = deblender.run(image)
    cat = result.catalog
    assert {"class", "class_prob", "det_score"} <= set(cat.colnames)
    np.testing.assert_array_equal(np.unique(result.labels[result.labels > 0]), np.asarray(cat["label"]))
    assert set(np.asarray(cat["class"])) <= {"star", "galaxy"}
    assert np.all(np.asarray(cat["det_score"]) >= np.asarray(cat["class_prob"]) - 1e-6)
    assert result.weights_id and result.method == "mask-rcnn"


def test_mask_nms_is_off_by_default_only_when_centres_decide(untrained_weights, tmp_path):
    from deblend.models import attach_centre_net, load_weights, save_weights
    from deblend.models.centre_net import CentreNet

    assert Deblender("mask-rcnn", weights=untrained_weights, refine=False).options["max_overlap"] == 0.5
    model = attach_centre_net(load_weights(untrained_weights), CentreNet(channels=(4, 8)), proposals=5,
                              detect=True)
    save_weights(model, tmp_path / "centres.pt", metadata={})
    deciding = Deblender("mask-rcnn", weights=tmp_path / "centres.pt", refine=False)
    assert deciding.options["max_overlap"] == 1.0
    assert Deblender("mask-rcnn", weights=tmp_path / "centres.pt", refine=False,
                     max_overlap=0.6).options["max_overlap"] == 0.6


@pytest.mark.filterwarnings("ignore::deblend.exceptions.NoSourcesWarning")  # noise only
def test_split_crowded_option_reaches_detect(untrained_weights, monkeypatch):
    import deblend.segment

    seen = []
    real = deblend.segment.detect
    monkeypatch.setattr(deblend.segment, "detect", lambda *a, **k: seen.append(k["split_crowded"]) or real(*a, **k))
    image = np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32)
    for flag in (True, False):
        deblender = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16, refine=False,
                              split_crowded=flag, coarse_pass=False)
        assert deblender.config()["options"]["split_crowded"] is flag  # recorded in the provenance
        deblender.run(image)
    assert seen == [True, False]


@pytest.mark.filterwarnings("ignore::deblend.exceptions.NoSourcesWarning")  # noise only
def test_coarse_pass_option(untrained_weights, monkeypatch):
    import deblend.coarse

    seen = []
    real = deblend.coarse.detect_coarse
    monkeypatch.setattr(deblend.coarse, "detect_coarse", lambda *a, **k: seen.append(k) or real(*a, **k))
    image = np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32)
    for flag in (True, False):
        deblender = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16, refine=False,
                              coarse_pass=flag)
        assert deblender.config()["options"]["coarse_pass"] is flag  # recorded in the provenance
        deblender.run(image)
    assert len(seen) == 1 and seen[0]["window_size"] == 64 and seen[0]["score_threshold"] == 0.5
    assert seen[0]["max_overlap"] == 0.5


@pytest.mark.filterwarnings("ignore::deblend.exceptions.NoSourcesWarning")  # noise only
def test_coarse_pass_keeps_the_box_heads_mask_nms_when_centres_decide(untrained_weights, tmp_path, monkeypatch):
    import deblend.coarse
    from deblend.models import attach_centre_net, load_weights, save_weights
    from deblend.models.centre_net import CentreNet

    save_weights(attach_centre_net(load_weights(untrained_weights), CentreNet(channels=(4, 8)), proposals=5,
                                   detect=True), tmp_path / "centres.pt", metadata={})
    seen = []
    real = deblend.coarse.detect_coarse
    monkeypatch.setattr(deblend.coarse, "detect_coarse", lambda *a, **k: seen.append(k["max_overlap"]) or real(*a, **k))
    image = np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32)
    for max_overlap in (None, 0.7):
        deblender = Deblender("mask-rcnn", weights=tmp_path / "centres.pt", window_size=64, overlap=16,
                              refine=False, coarse_pass=True, max_overlap=max_overlap)
        assert deblender.options["max_overlap"] == (1.0 if max_overlap is None else 0.7)
        deblender.run(image)
    assert seen == [0.5, 0.7]  # the box head decides in the coarse pass: its default, unless one is given


@pytest.mark.filterwarnings("ignore::deblend.exceptions.NoSourcesWarning")  # noise only
def test_tta_option(untrained_weights, monkeypatch):
    import deblend.coarse
    import deblend.segment
    from deblend.tta import MEMBER_SCORE_THRESHOLD, TTA_SCORE_THRESHOLD

    seen, coarse = [], []
    real, real_coarse = deblend.segment.detect, deblend.coarse.detect_coarse
    monkeypatch.setattr(deblend.segment, "detect", lambda *a, **k: seen.append(k["score_threshold"]) or real(*a, **k))
    monkeypatch.setattr(deblend.coarse, "detect_coarse",
                        lambda *a, **k: coarse.append(k["tta"]) or real_coarse(*a, **k))
    image = np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32)
    plain = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16, refine=False)
    assert plain.config()["options"]["tta"] is False and plain.config()["options"]["score_threshold"] == 0.5
    plain.run(image)
    assert seen == [0.5]
    seen.clear()
    tta = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16, refine=False, tta=True,
                    coarse_pass=True)
    assert tta.config()["options"]["tta"] is True  # recorded in the provenance
    assert tta.config()["options"]["score_threshold"] == TTA_SCORE_THRESHOLD  # on the fused score
    tta.run(image)
    assert seen[:4] == [MEMBER_SCORE_THRESHOLD] * 4  # four flips at full resolution (then four coarse ones)
    assert coarse == [True]
    assert Deblender("mask-rcnn", weights=untrained_weights, tta=True,
                     score_threshold=0.7).config()["options"]["score_threshold"] == 0.7


def test_mask_rcnn_option_errors(untrained_weights):
    with pytest.raises(ValueError, match="classical methods only"):
        Deblender("mask-rcnn", weights=untrained_weights, thresh=2.0)
    with pytest.raises(ValueError, match="score_threshold"):
        Deblender("mask-rcnn", weights=untrained_weights, score_threshold=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        Deblender("mask-rcnn", weights=untrained_weights, batch_size=0)
    with pytest.raises(ValueError, match="overlap"):
        Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=64)
    with pytest.raises(FileNotFoundError, match="train_mask_rcnn"):
        Deblender("mask-rcnn", weights="/nonexistent/weights.pt")
    with pytest.raises(ValueError, match="half=True needs a CUDA device"):
        Deblender("mask-rcnn", weights=untrained_weights, half=True)
    assert Deblender("mask-rcnn", weights=untrained_weights, refine=False).config()["half"] is False


# ----------------------------------------------------------------------------- refinement


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory):
    """A tiny untrained probabilistic U-Net saved as a weights file."""
    import torch

    from deblend.models.prob_unet import build_prob_unet, save_prob_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_prob_unet.pt"
    save_prob_unet(build_prob_unet(widths=(4, 8, 8, 8), head_width=8, latent_dim=2), path, metadata={})
    return path


def test_refine_defaults_per_method(tiny_refiner):
    assert Deblender("sep").refine is False
    assert Deblender("sep", refine=True, refine_weights=tiny_refiner).refine is True
    with pytest.raises(ValueError, match="n_samples"):
        Deblender("sep", n_samples=1)


def test_refined_classical_result_columns_and_extensions(scene, tiny_refiner, out_dir):
    deblender = Deblender("sep", refine=True, refine_weights=tiny_refiner, n_samples=4, save_samples=True)
    result = deblender.run(scene)
    check_result(result, result.n_sources)
    cat = result.catalog
    for col in ("blend_id", "n_blend", "segment_flux_seg_err", "segment_flux_err_total"):
        assert col in cat.colnames
    assert result.extensions["UNCERTAINTY"].shape == scene.shape
    assert result.extensions["SAMPLES"].shape == (4, *scene.shape)
    assert deblender.config()["refine"] is True and deblender.config()["n_samples"] == 4
    paths = result.write(out_dir, stem="refined")
    with fits.open(paths["segmentation"]) as hdul:
        assert {"UNCERTAINTY", "SAMPLES"} <= {h.name for h in hdul}
        assert hdul["SAMPLES"].data.shape == (4, *scene.shape)


def test_refinement_per_band_columns(make_scene, tiny_refiner):
    cube = np.stack([make_scene(), 2 * make_scene()])
    result = Deblender("sep", refine=True, refine_weights=tiny_refiner, n_samples=3).run(cube)
    for band in ("band0", "band1"):
        assert f"segment_flux_seg_err_{band}" in result.catalog.colnames
        assert f"segment_flux_err_total_{band}" in result.catalog.colnames


def _calibrated_copy(weights, tmp_path, calibration):
    """A copy of the weights file whose model card holds ``calibration``."""
    import shutil

    copy = tmp_path / "calibrated.pt"
    shutil.copy(weights, copy)
    copy.with_suffix(".json").write_text(json.dumps({"calibration": calibration}))
    return copy


def test_seg_err_scale_from_model_card_or_argument(scene, tiny_refiner, tmp_path):
    weights = _calibrated_copy(tiny_refiner, tmp_path, {"seg_err_scale": 3.0})
    raw = Deblender("sep", refine=True, refine_weights=tiny_refiner, n_samples=4)
    scaled = Deblender("sep", refine=True, refine_weights=weights, n_samples=4)
    assert raw.seg_err_scale == 1.0 and scaled.seg_err_scale == 3.0
    assert Deblender("sep", refine=True, refine_weights=weights, n_samples=4, seg_err_scale=1.0).seg_err_scale == 1
    assert scaled.config()["seg_err_scale"] == 3.0
    a, b = raw.run(scene).catalog, scaled.run(scene).catalog
    np.testing.assert_allclose(b["segment_flux_seg_err"], 3 * a["segment_flux_seg_err"])
    with pytest.raises(ValueError, match="seg_err_scale"):
        Deblender("sep", refine=True, refine_weights=tiny_refiner, seg_err_scale=0)


def test_claim_threshold_from_model_card_or_argument(scene, tiny_refiner, tmp_path):
    weights = _calibrated_copy(tiny_refiner, tmp_path, {"claim_threshold": 0.2})
    default = Deblender("sep", refine=True, refine_weights=tiny_refiner, n_samples=4)
    card = Deblender("sep", refine=True, refine_weights=weights, n_samples=4)
    assert default.claim_threshold == 0.5 and card.claim_threshold == 0.2
    assert card.config()["claim_threshold"] == 0.2
    explicit = Deblender("sep", refine=True, refine_weights=weights, n_samples=4, claim_threshold=0.5)
    assert explicit.claim_threshold == 0.5
    assert Deblender("sep").claim_threshold is None  # no refinement
    # a lower threshold never gives a refined source fewer pixels in total
    a, b = default.run(scene), card.run(scene)
    assert (b.labels > 0).sum() >= (a.labels > 0).sum()
    for bad in (1.0, "high"):
        with pytest.raises(ValueError, match="claim_threshold"):
            Deblender("sep", refine=True, refine_weights=tiny_refiner, claim_threshold=bad)


@pytest.mark.filterwarnings("ignore::deblend.exceptions.NoSourcesWarning")  # noise only
def test_settings_are_written_into_the_outputs(untrained_weights, tmp_path):
    image = np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32)
    sep = Deblender("sep").run(image)
    assert sep.settings == {"DBREFINE": (False, "probabilistic U-Net refinement of blends")}
    tta = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16, refine=False, tta=True)
    result = tta.run(image)
    assert {k: v for k, (v, _) in result.settings.items()} == {
        "DBREFINE": False, "DBSCORE": 0.4, "DBCOMPD": 3.0, "DBTTA": True, "DBCOARSE": False, "DBWINDOW": 64}
    companions = Deblender("mask-rcnn", weights=untrained_weights, window_size=64, overlap=16, refine=False,
                           tta=True, companion_distance=2.5)
    paths = companions.run(image).write(tmp_path, stem="noise")
    header = fits.getheader(paths["segmentation"])
    assert header["DBTTA"] is True and header["DBSCORE"] == 0.4 and header["DBWINDOW"] == 64
    assert header["DBCOMPD"] == 2.5
    assert header.comments["DBTTA"].startswith("test-time augmentation")
    meta = read_catalog(paths["catalog"]).meta
    assert meta["DBTTA"] is True and meta["DBREFINE"] is False
