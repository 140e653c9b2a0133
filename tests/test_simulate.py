import numpy as np
import pytest
from astropy.wcs import WCS

from deblend.exceptions import InputError
from deblend.io import read_catalog, read_image, read_segmentation
from deblend.simulate import (
    WCS_CENTER,
    Scene,
    SceneConfig,
    read_truth,
    scene_seed,
    simulate_directory,
    simulate_scene,
    truth_segmentation,
    write_scene,
)

SMALL = SceneConfig(shape=(64, 72), density=300.0)


@pytest.fixture(scope="module")
def scene():
    return simulate_scene(seed=11)


def _gaussian(shape, x0, y0, flux, sigma):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    return (flux * g / (2 * np.pi * sigma**2)).astype(np.float32)


# --- reproducibility ----------------------------------------------------------------------


def test_same_seed_is_byte_identical():
    a = simulate_scene(SMALL, seed=7)
    b = simulate_scene(SMALL, seed=7)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.truth_seg.tobytes() == b.truth_seg.tobytes()
    assert a.source_images.tobytes() == b.source_images.tobytes()
    assert a.truth.colnames == b.truth.colnames
    for name in a.truth.colnames:
        assert np.array_equal(np.asarray(a.truth[name]), np.asarray(b.truth[name])), name


def test_different_seed_differs():
    a = simulate_scene(SMALL, seed=7)
    b = simulate_scene(SMALL, seed=8)
    assert not np.array_equal(a.image, b.image)
    assert len(a.truth) != len(b.truth) or not np.allclose(a.truth["x"], b.truth["x"])


def test_keep_sources_false_gives_same_scene():
    a = simulate_scene(SMALL, seed=3)
    b = simulate_scene(SMALL, seed=3, keep_sources=False)
    assert b.source_images is None
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.truth_seg, b.truth_seg)


def test_scene_seed_is_deterministic_and_distinct():
    seeds = [scene_seed(5, i) for i in range(50)]
    assert seeds == [scene_seed(5, i) for i in range(50)]
    assert len(set(seeds)) == 50
    assert scene_seed(6, 0) != scene_seed(5, 0)
    assert all(0 <= s < 2**63 for s in seeds)


# --- the truth convention on hand-made sources ----------------------------------------------


def test_truth_segmentation_by_hand():
    # one row of five pixels, sigma = 1
    a = np.array([[[3.0, 2.0, 0.5, 0.0, 0.0]]], dtype=np.float32)
    b = np.array([[[0.0, 1.5, 0.8, 0.9, 2.0]]], dtype=np.float32)
    seg, blended = truth_segmentation(np.concatenate([a, b]), 1.0)
    # pixel 1: a (2.0) beats b (1.5); pixels 2, 3: the largest contribution is below 1 sigma
    assert seg.tolist() == [[1, 1, 0, 0, 2]]
    assert seg.dtype == np.int32
    # a's footprint {0, 1} and b's {1, 4} share pixel 1
    assert blended.tolist() == [True, True]

    b[0, 0, 1] = 0.99  # b's footprint shrinks to {4}: no shared pixel any more
    seg, blended = truth_segmentation(np.concatenate([a, b]), 1.0)
    assert seg.tolist() == [[1, 1, 0, 0, 2]]
    assert blended.tolist() == [False, False]

    # exactly 1 sigma counts; a tie goes to the first source
    c = np.array([[[1.0, 0.0]], [[1.0, 0.5]]], dtype=np.float32)
    seg, blended = truth_segmentation(c, 1.0)
    assert seg.tolist() == [[1, 0]]
    assert blended.tolist() == [True, True]


def test_truth_segmentation_two_gaussians():
    shape = (40, 60)
    bright = _gaussian(shape, 20.0, 20.0, 400.0, 2.0)
    faint = _gaussian(shape, 27.0, 20.0, 100.0, 2.0)
    sigma = 1.0
    seg, blended = truth_segmentation(np.stack([bright, faint]), sigma)
    owner = np.argmax([bright, faint], axis=0) + 1
    expected = np.where(np.maximum(bright, faint) >= sigma, owner, 0)
    assert np.array_equal(seg, expected)
    assert seg[20, 20] == 1 and seg[20, 27] == 2
    assert seg[0, 0] == 0 and seg[20, 50] == 0
    # the faint source's peak (100 / (2 pi 4) = 4 sigma) is its own; pixels below 1 sigma are not
    assert seg[20, 24] == 1  # closer to the bright one, which contributes more
    assert faint[20, 31] < sigma and seg[20, 31] == 0
    assert blended.tolist() == [True, True]

    # move the faint one far away: both unblended
    far = _gaussian(shape, 50.0, 20.0, 100.0, 2.0)
    seg, blended = truth_segmentation(np.stack([bright, far]), sigma)
    assert blended.tolist() == [False, False]
    assert set(np.unique(seg)) == {0, 1, 2}


def test_truth_segmentation_source_without_pixels_is_absent():
    shape = (30, 30)
    bright = _gaussian(shape, 15.0, 15.0, 1000.0, 2.0)
    buried = _gaussian(shape, 15.5, 15.0, 50.0, 2.0)  # >= 1 sigma somewhere, but never the largest
    seg, blended = truth_segmentation(np.stack([bright, buried]), 1.0)
    assert buried.max() >= 1.0
    assert 2 not in seg
    assert blended.tolist() == [True, True]


def test_truth_segmentation_validates():
    with pytest.raises(ValueError, match="source_images must be 3-D"):
        truth_segmentation(np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="noise_sigma must be a positive"):
        truth_segmentation(np.zeros((1, 4, 4)), 0.0)


# --- scene contents -----------------------------------------------------------------------


def test_ids_equal_labels_and_footprints_nonempty(scene):
    truth = scene.truth
    n = len(truth)
    assert 10 <= n <= 30
    assert scene.truth_seg.dtype == np.int32 and scene.truth_seg.shape == scene.config.shape
    assert truth["id"].tolist() == list(range(1, n + 1))
    assert set(np.unique(scene.truth_seg)) - {0} == set(range(1, n + 1))
    counts = np.bincount(scene.truth_seg.ravel(), minlength=n + 1)[1:]
    assert (counts >= 1).all()
    assert np.array_equal(truth["n_pixels"], counts)
    assert scene.header["NSOURCE"] == n and scene.n_sources == n


def test_truth_follows_the_convention(scene):
    seg, blended = truth_segmentation(scene.source_images, scene.config.noise_sigma)
    assert np.array_equal(seg, scene.truth_seg)
    assert np.array_equal(blended, np.asarray(scene.truth["blended"]))
    sources = scene.source_images.astype(np.float64)
    snr = np.sqrt((sources**2).sum(axis=(1, 2))) / scene.config.noise_sigma
    np.testing.assert_allclose(scene.truth["snr"], snr, rtol=1e-6)
    assert (scene.truth["snr"] >= scene.config.min_snr).all()


def test_flux_and_image_model(scene):
    cfg = scene.config
    truth = scene.truth
    sums = scene.source_images.astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(truth["flux_in_image"], sums, rtol=1e-5)
    assert (truth["flux"] >= truth["flux_in_image"] * (1 - 1e-6)).all()
    ny, nx = cfg.shape
    x, y = truth["x"], truth["y"]
    interior = (x > 25) & (x < nx - 26) & (y > 25) & (y < ny - 26)
    assert interior.sum() >= 3
    np.testing.assert_allclose(truth["flux"][interior], sums[interior], rtol=2e-3)

    # image = sky + sum(sources) + Gaussian noise of noise_sigma
    residual = scene.image - scene.sky - scene.source_images.sum(axis=0)
    assert abs(residual.mean()) < 0.05 * cfg.noise_sigma
    assert residual.std() == pytest.approx(cfg.noise_sigma, rel=0.03)
    assert scene.sky.mean() == pytest.approx(cfg.sky_level, rel=1e-4)
    assert np.ptp(scene.sky) == pytest.approx(cfg.sky_gradient * cfg.sky_level, rel=1e-3)
    assert scene.image.dtype == np.float32 and scene.image.shape == cfg.shape


def test_source_kinds_and_positions():
    truths = [simulate_scene(seed=s, keep_sources=False).truth for s in range(4)]
    kinds = np.concatenate([t["kind"] for t in truths])
    assert {"star", "bulge+disk", "irregular"} <= set(kinds.tolist())
    for t in truths:
        stars = np.asarray(t["is_star"])
        assert np.array_equal(stars, np.asarray(t["kind"]) == "star")
        assert (t["r_half"].value[stars] == 0).all()
        assert (t["r_half"].value[~stars] > 0.05).all() and (t["r_half"].value < 1.6).all()
        assert ((t["x"] >= 0) & (t["x"] <= 127) & (t["y"] >= 0) & (t["y"] <= 127)).all()
        ids = set(t["id"].tolist())
        assert set(t["companion_of"].tolist()) <= ids | {0}


def test_blend_fraction_controls_blends():
    def blended_fraction(fraction):
        cfg = SceneConfig(blend_fraction=fraction)
        truths = [simulate_scene(cfg, seed=s, keep_sources=False).truth for s in range(6)]
        companions = sum(int((t["companion_of"] > 0).sum()) for t in truths)
        return np.concatenate([t["blended"] for t in truths]).mean(), companions

    low, low_companions = blended_fraction(0.0)
    high, high_companions = blended_fraction(1.0)
    assert low_companions == 0 and high_companions > 10
    assert high > low + 0.15


def test_wcs_header(scene):
    wcs = WCS(scene.header)
    ny, nx = scene.config.shape
    ra, dec = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
    assert ra == pytest.approx(WCS_CENTER[0]) and dec == pytest.approx(WCS_CENTER[1])
    scale = wcs.proj_plane_pixel_scales()[0].to_value("arcsec")
    assert scale == pytest.approx(scene.config.pixel_scale)
    for key in ("PIXSCALE", "PSF_FWHM", "PSF_BETA", "NOISE", "SKYLEVEL", "SEED", "NSOURCE"):
        assert key in scene.header
    assert scene.header["SIMULATR"] == "deblend.simulate"
    assert scene.header["SEED"] == 11


def test_multiband():
    cfg = SceneConfig(shape=(48, 48), density=300.0, n_bands=3)
    sc = simulate_scene(cfg, seed=2)
    assert sc.image.shape == (3, 48, 48) and sc.image.dtype == np.float32
    bands = np.stack([sc.truth[f"flux_band{i}"] for i in range(3)])
    np.testing.assert_allclose(bands.mean(axis=0), sc.truth["flux"], rtol=1e-9)
    residual = sc.image.mean(axis=0) - sc.sky - sc.source_images.sum(axis=0)
    assert residual.std() == pytest.approx(cfg.noise_sigma / np.sqrt(3), rel=0.05)


def test_empty_scene(tmp_path):
    sc = simulate_scene(SceneConfig(density=0.0), seed=0)
    assert len(sc.truth) == 0 and sc.source_images.shape == (0, 128, 128)
    assert not sc.truth_seg.any()
    write_scene(sc, tmp_path, "empty")
    seg, truth, header = read_truth(tmp_path, "empty")
    assert len(truth) == 0 and not seg.any() and header["NSOURCE"] == 0


# --- files ----------------------------------------------------------------------------------


def test_write_and_read_scene(scene, tmp_path):
    paths = write_scene(scene, tmp_path, "tile")
    assert paths == {
        "image": tmp_path / "tile.fits",
        "truth_seg": tmp_path / "tile_truth_seg.fits",
        "truth": tmp_path / "tile_truth.fits",
    }
    assert all(p.exists() for p in paths.values())

    image = read_image(paths["image"])
    assert np.array_equal(image.data[0], scene.image)
    assert image.wcs is not None
    keys = ("PIXSCALE", "PSF_FWHM", "PSF_BETA", "NOISE", "SKYLEVEL", "SEED", "NSOURCE", "SIMULATR")
    for key in keys:
        assert image.header[key] == scene.header[key]
    labels, _ = read_segmentation(paths["truth_seg"])
    assert np.array_equal(labels, scene.truth_seg)
    assert len(read_catalog(paths["truth"])) == len(scene.truth)

    seg, truth, header = read_truth(tmp_path, "tile")
    assert np.array_equal(seg, scene.truth_seg)
    assert header["SEED"] == scene.seed
    assert truth.colnames == scene.truth.colnames
    for name in truth.colnames:
        assert np.array_equal(np.asarray(truth[name]), np.asarray(scene.truth[name])), name
    assert truth["r_half"].unit == scene.truth["r_half"].unit

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_scene(scene, tmp_path, "tile")
    write_scene(scene, tmp_path, "tile", overwrite=True)


def test_read_truth_missing(tmp_path):
    with pytest.raises(InputError, match="missing"):
        read_truth(tmp_path, "nothing")


def test_simulate_directory(tmp_path):
    names = simulate_directory(tmp_path, 3, config=SMALL, seed=4, prefix="sim")
    assert names == ["sim_0000", "sim_0001", "sim_0002"]
    for name in names:
        for suffix in (".fits", "_truth_seg.fits", "_truth.fits"):
            assert (tmp_path / f"{name}{suffix}").exists()
    again = simulate_scene(SMALL, seed=scene_seed(4, 1))
    seg, truth, header = read_truth(tmp_path, "sim_0001")
    assert np.array_equal(seg, again.truth_seg)
    assert np.array_equal(read_image(tmp_path / "sim_0001.fits").data[0], again.image)
    assert header["SEED"] == scene_seed(4, 1)
    with pytest.raises(FileExistsError):
        simulate_directory(tmp_path, 1, config=SMALL, seed=4, prefix="sim")


# --- validation -----------------------------------------------------------------------------


def test_correlated_noise_keeps_the_pixel_sigma_and_the_truth():
    white = simulate_scene(SceneConfig(shape=(96, 96), noise_sigma=2.0), seed=4)
    cfg = SceneConfig(shape=(96, 96), noise_sigma=2.0, noise_correlation=1.5)
    smooth = simulate_scene(cfg, seed=4)
    # Same sources and truth; only the noise differs.
    np.testing.assert_array_equal(smooth.truth_seg, white.truth_seg)
    noise = smooth.image - smooth.sky - smooth.source_images.sum(axis=0)
    assert noise.std() == pytest.approx(2.0, rel=0.1)
    # Neighbouring pixels correlate: about exp(-1 / (4 sigma^2)) = 0.89 for a Gaussian kernel.
    lag1 = np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]
    white_noise = white.image - white.sky - white.source_images.sum(axis=0)
    assert lag1 == pytest.approx(np.exp(-1 / (4 * 1.5**2)), abs=0.05)
    assert abs(np.corrcoef(white_noise[:, :-1].ravel(), white_noise[:, 1:].ravel())[0, 1]) < 0.05
    assert smooth.header["NOISECOR"] == 1.5 and "NOISECOR" not in white.header


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (4, 128)}, r"SceneConfig\.shape .* >= 8"),
        ({"shape": (128.0, 128)}, r"SceneConfig\.shape"),
        ({"pixel_scale": 0.0}, r"SceneConfig\.pixel_scale .* got 0\.0"),
        ({"psf_fwhm": -0.7}, r"SceneConfig\.psf_fwhm .* got -0\.7"),
        ({"psf_beta": 1.0}, r"SceneConfig\.psf_beta .* > 1\.1"),
        ({"noise_sigma": float("nan")}, r"SceneConfig\.noise_sigma"),
        ({"sky_level": -1.0}, r"SceneConfig\.sky_level .* >= 0"),
        ({"density": -5.0}, r"SceneConfig\.density"),
        ({"star_fraction": 1.5}, r"SceneConfig\.star_fraction .* between 0 and 1"),
        ({"blend_fraction": -0.1}, r"SceneConfig\.blend_fraction"),
        ({"sky_gradient": 2.0}, r"SceneConfig\.sky_gradient"),
        ({"noise_correlation": -1.0}, r"SceneConfig\.noise_correlation .* >= 0"),
        ({"n_bands": 0}, r"SceneConfig\.n_bands .* >= 1"),
        ({"n_bands": True}, r"SceneConfig\.n_bands"),
        ({"flux_max": 10.0}, r"SceneConfig\.flux_max .* > flux_min"),
        ({"r_half_range": (1.0, 0.5)}, r"SceneConfig\.r_half_range"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneConfig(**kwargs)


def test_seed_and_config_validation():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        simulate_scene(seed=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got 1.5"):
        simulate_scene(seed=1.5)
    with pytest.raises(TypeError, match="config must be a SceneConfig"):
        simulate_scene({"shape": (64, 64)}, seed=0)
    with pytest.raises(TypeError, match="Scene from simulate_scene"):
        write_scene("not a scene", ".", "x")
    assert isinstance(simulate_scene(SceneConfig(shape=[32, 40], density=0.0), seed=0), Scene)
