import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import QTable, Table

from deblend import io as dbio
from deblend.evaluate import (
    compare_methods,
    evaluate_directory,
    evaluate_image,
    format_table,
    match_sources,
    summarize,
    write_json,
)
from deblend.exceptions import InputError

SHAPE = (32, 32)


def disk(x, y, r, shape=SHAPE):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= r**2


def label_map(sources, shape=SHAPE):
    """Paint disks (label, x, y, r) in order; later ones overwrite earlier ones."""
    labels = np.zeros(shape, dtype=np.int32)
    for label, x, y, r in sources:
        labels[disk(x, y, r, shape)] = label
    return labels


def truth_table(xy, *, flux=None, blended=None, is_star=None, snr=None):
    n = len(xy)
    return Table({
        "id": np.arange(1, n + 1, dtype=np.int32),
        "x": np.array([p[0] for p in xy], dtype=float),
        "y": np.array([p[1] for p in xy], dtype=float),
        "flux": np.asarray(flux if flux is not None else np.full(n, 100.0), dtype=float),
        "is_star": np.asarray(is_star if is_star is not None else np.zeros(n, bool)),
        "blended": np.asarray(blended if blended is not None else np.zeros(n, bool)),
        "snr": np.asarray(snr if snr is not None else np.full(n, 50.0), dtype=float),
    })


def pred_catalog(labels, xy, flux=None, cls=None):
    cat = QTable({
        "label": np.asarray(labels, dtype=np.int32),
        "x_centroid": np.array([p[0] for p in xy], dtype=float),
        "y_centroid": np.array([p[1] for p in xy], dtype=float),
        "segment_flux": np.asarray(flux if flux is not None else np.full(len(labels), 100.0)),
    })
    if cls is not None:
        cat["class"] = list(cls)
    return cat


THREE = [(6.0, 6.0), (20.0, 8.0), (12.0, 24.0)]


def three_truth():
    labels = label_map([(i + 1, x, y, 3) for i, (x, y) in enumerate(THREE)])
    return labels, truth_table(THREE, flux=[100.0, 200.0, 50.0])


def greedy_match(pred_xy, truth_xy, max_distance):
    """Closest-pair-first greedy matching (what the Hungarian solver must beat)."""
    pairs = sorted(
        (math.dist(p, t), i, j)
        for i, p in enumerate(pred_xy)
        for j, t in enumerate(truth_xy)
        if math.dist(p, t) <= max_distance
    )
    used_p, used_t, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            out.append((i, j))
    return sorted(out)


# ------------------------------------------------------------------ match_sources


def test_match_sources_hungarian_beats_greedy_on_count():
    truth = [(0.0, 0.0), (2.5, 0.0)]
    pred = [(1.4, 0.0), (4.2, 0.0)]
    # Greedy takes the closest pair (pred 0, truth 1) and strands pred 1.
    assert greedy_match(pred, truth, 2.0) == [(0, 1)]
    p, t = match_sources(pred, truth, max_distance=2.0)
    assert list(zip(p.tolist(), t.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_match_sources_hungarian_minimises_total_distance():
    truth = [(0.0, 0.0), (1.0, 0.0)]
    pred = [(0.9, 0.0), (1.9, 0.0)]
    greedy = greedy_match(pred, truth, 2.5)
    assert greedy == [(0, 1), (1, 0)]  # total distance 0.1 + 1.9 = 2.0
    p, t = match_sources(pred, truth, max_distance=2.5)
    assert list(zip(p.tolist(), t.tolist(), strict=True)) == [(0, 0), (1, 1)]  # 0.9 + 0.9


def test_match_sources_distance_cut_is_inclusive():
    truth = [(10.0, 10.0), (30.0, 10.0)]
    pred = [(14.0, 10.0), (34.1, 10.0)]
    p, t = match_sources(pred, truth, max_distance=4.0)
    assert p.tolist() == [0] and t.tolist() == [0]


def test_match_sources_empty_and_nonfinite():
    p, t = match_sources(np.empty((0, 2)), [(1.0, 1.0)], max_distance=2.0)
    assert p.size == 0 and t.size == 0
    p, t = match_sources([(np.nan, 1.0), (1.0, 1.0)], [(1.0, 1.0)], max_distance=2.0)
    assert p.tolist() == [1] and t.tolist() == [0]


def test_match_sources_many_components_seeded():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 500, size=(400, 2))
    pred = truth + rng.normal(0, 0.3, size=truth.shape)
    perm = rng.permutation(len(pred))
    p, t = match_sources(pred[perm], truth, max_distance=2.0)
    assert p.size == 400
    np.testing.assert_array_equal(perm[p], t)


@pytest.mark.parametrize("bad", [0, -1.0, np.nan, np.inf, "x"])
def test_match_sources_rejects_bad_distance(bad):
    with pytest.raises(ValueError, match="max_distance"):
        match_sources([(0.0, 0.0)], [(0.0, 0.0)], max_distance=bad)


def test_match_sources_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"pred_xy must have shape \(n, 2\)"):
        match_sources([1.0, 2.0, 3.0], [(0.0, 0.0)], max_distance=1.0)


# ------------------------------------------------------------------ evaluate_image


def test_perfect_prediction():
    truth_labels, truth = three_truth()
    cat = pred_catalog([1, 2, 3], THREE, flux=[100.0, 200.0, 50.0])
    res = evaluate_image(truth_labels.copy(), cat, truth_labels, truth, fwhm_pixels=3.0)
    assert (res["tp"], res["fp"], res["fn"]) == (3, 0, 0)
    s = summarize([res])
    assert s["recall"] == s["precision"] == s["f1"] == 1.0
    assert s["mean_iou"] == pytest.approx(1.0)
    assert s["median_abs_flux_error"] == 0.0
    assert s["merged"] == s["shredded"] == 0
    assert s["star_galaxy_accuracy"] is None


def test_missed_source_and_false_positive():
    truth_labels, truth = three_truth()
    pred_labels = label_map([(1, 6, 6, 3), (2, 20, 8, 3), (3, 26, 26, 2)])
    cat = pred_catalog([1, 2, 3], [(6.0, 6.0), (20.0, 8.0), (26.0, 26.0)],
                       flux=[110.0, 180.0, 30.0])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=3.0)
    assert (res["tp"], res["fp"], res["fn"]) == (2, 1, 1)
    assert (res["n_truth"], res["n_pred"]) == (3, 3)
    assert res["merged"] == 0 and res["shredded"] == 0
    s = summarize([res])
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["median_abs_flux_error"] == pytest.approx(0.1)
    assert s["median_flux_bias"] == pytest.approx(0.0)


def test_iou_of_partial_overlap():
    truth_labels = np.zeros((4, 8), dtype=np.int32)
    truth_labels[:, 0:4] = 1  # 16 pixels
    pred_labels = np.zeros_like(truth_labels)
    pred_labels[:, 1:5] = 7  # 16 pixels, 12 shared
    truth = truth_table([(1.5, 1.5)])
    cat = pred_catalog([7], [(2.5, 1.5)])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0)
    assert res["tp"] == 1
    assert res["iou_sum"] == pytest.approx(12 / 20)


def test_distance_cut_in_evaluate_image():
    truth_labels = label_map([(1, 10, 10, 2)])
    truth = truth_table([(10.0, 10.0)])
    pred_labels = label_map([(1, 15, 10, 2)])
    cat = pred_catalog([1], [(15.0, 10.0)])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=4.0)
    assert (res["tp"], res["fp"], res["fn"]) == (0, 1, 1)
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=5.0)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 0, 0)


def test_merged_source():
    truth_labels = label_map([(1, 10, 10, 3), (2, 14, 10, 3)])
    truth = truth_table([(10.0, 10.0), (14.0, 10.0)], blended=[True, True])
    pred_labels = ((truth_labels > 0) * 1).astype(np.int32)  # one segment over both
    cat = pred_catalog([1], [(10.5, 10.0)])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=3.0)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 0, 1)
    assert res["merged"] == 1
    assert res["shredded"] == 0


def test_shredded_source():
    truth_labels = label_map([(1, 12, 10, 5)])
    truth = truth_table([(12.0, 10.0)])
    pred_labels = np.zeros(SHAPE, dtype=np.int32)
    fp = truth_labels == 1
    xx = np.arange(SHAPE[1])[np.newaxis, :]
    pred_labels[fp & (xx <= 12)] = 1
    pred_labels[fp & (xx > 12)] = 2
    cat = pred_catalog([1, 2], [(11.0, 10.0), (15.0, 10.0)])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 1, 0)
    assert res["shredded"] == 1
    assert res["merged"] == 0


def test_blended_recall_only_over_blended_truth():
    xy = [(5.0, 5.0), (9.0, 5.0), (20.0, 20.0), (5.0, 25.0)]
    truth_labels = label_map([(i + 1, x, y, 2) for i, (x, y) in enumerate(xy)])
    truth = truth_table(xy, blended=[True, True, False, False])
    found = [0, 2, 3]  # one of the two blended sources is missed
    pred_labels = label_map([(k + 1, xy[i][0], xy[i][1], 2) for k, i in enumerate(found)])
    cat = pred_catalog([1, 2, 3], [xy[i] for i in found])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0)
    assert (res["n_blended"], res["tp_blended"]) == (2, 1)
    s = summarize([res])
    assert s["recall"] == pytest.approx(0.75)
    assert s["blended_recall"] == pytest.approx(0.5)


def test_blended_recall_by_snr():
    # six blended sources of S/N 7, 8, 15, 30, 80 and nan, one isolated; the S/N 8 and 80 ones are missed
    xy = [(5.0, 5.0), (15.0, 5.0), (25.0, 5.0), (5.0, 20.0), (15.0, 20.0), (25.0, 20.0), (5.0, 35.0)]
    truth_labels = label_map([(i + 1, x, y, 2) for i, (x, y) in enumerate(xy)])
    truth = truth_table(xy, blended=[True] * 6 + [False], snr=[7, 8, 15, 30, 80, np.nan, 9])
    found = [0, 2, 3, 5, 6]
    pred_labels = label_map([(k + 1, xy[i][0], xy[i][1], 2) for k, i in enumerate(found)])
    cat = pred_catalog(list(range(1, len(found) + 1)), [xy[i] for i in found])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0)
    assert res["n_blended_by_snr"] == [2, 1, 1, 1]  # no S/N, not binned; isolated, not counted
    assert res["tp_blended_by_snr"] == [1, 1, 1, 0]
    s = summarize([res, res])
    assert s["n_blended_by_snr"] == [4, 2, 2, 2]
    assert [s[f"blended_recall_snr_{k}"] for k in ("0_10", "10_20", "20_50", "50_up")] == [0.5, 1.0, 1.0, 0.0]
    # only counted sources: with min_snr=10 the S/N 7 and 8 ones drop out
    bright = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0, min_snr=10)
    assert bright["n_blended_by_snr"] == [0, 1, 1, 1]


def test_recall_by_neighbour_separation():
    # fwhm 2 px: a pair 1.5 px apart (< 1 FWHM), a pair 3 px apart (1-2 FWHM), an isolated source
    xy = [(5.0, 5.0), (6.5, 5.0), (20.0, 5.0), (23.0, 5.0), (12.0, 25.0)]
    truth_labels = label_map([(i + 1, x, y, 1) for i, (x, y) in enumerate(xy)])
    truth = truth_table(xy, snr=[50, 50, 50, 5, 50])
    found = [0, 2, 3, 4]  # the close pair comes out as one source
    pred_labels = label_map([(k + 1, xy[i][0], xy[i][1], 1) for k, i in enumerate(found)])
    cat = pred_catalog([1, 2, 3, 4], [xy[i] for i in found])
    res = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0)
    assert res["n_by_separation"] == [2, 2, 0, 1]
    assert res["tp_by_separation"] == [1, 2, 0, 1]
    s = summarize([res, res])
    assert s["n_by_separation"] == [4, 4, 0, 2]
    assert (s["recall_nn_0_1"], s["recall_nn_1_2"], s["recall_nn_3_up"]) == (0.5, 1.0, 1.0)
    assert math.isnan(s["recall_nn_2_3"])
    assert "recall, neighbour < 1 FWHM" in format_table({"method": "m", "summary": s})
    # counted sources only; a faint uncounted neighbour still sets the separation
    faint = evaluate_image(pred_labels, cat, truth_labels, truth, fwhm_pixels=2.0, min_snr=10)
    assert faint["n_by_separation"] == [2, 1, 0, 1]
    assert faint["tp_by_separation"] == [1, 1, 0, 1]


def test_class_accuracy_present_and_absent():
    truth_labels, _ = three_truth()
    truth = truth_table(THREE, is_star=[True, False, True])
    with_class = pred_catalog([1, 2, 3], THREE, cls=["star", "galaxy", "galaxy"])
    res = evaluate_image(truth_labels, with_class, truth_labels, truth, fwhm_pixels=3.0)
    assert (res["class_correct"], res["class_total"]) == (2, 3)
    assert summarize([res])["star_galaxy_accuracy"] == pytest.approx(2 / 3)

    without = pred_catalog([1, 2, 3], THREE)
    res2 = evaluate_image(truth_labels, without, truth_labels, truth, fwhm_pixels=3.0)
    assert res2["class_total"] is None
    assert summarize([res2])["star_galaxy_accuracy"] is None
    # Images without a class column do not dilute the accuracy of those with one.
    assert summarize([res, res2])["star_galaxy_accuracy"] == pytest.approx(2 / 3)


def test_min_snr_filters_counted_truth_without_penalising_matches():
    truth_labels, _ = three_truth()
    truth = truth_table(THREE, snr=[20.0, 3.0, 20.0])
    cat = pred_catalog([1, 2, 3], THREE)
    res = evaluate_image(truth_labels, cat, truth_labels, truth, fwhm_pixels=3.0, min_snr=5.0)
    assert (res["n_truth"], res["n_truth_total"]) == (2, 3)
    assert (res["tp"], res["fp"], res["fn"], res["n_pred_ignored"]) == (2, 0, 0, 1)
    # Without a prediction for the bright ones, only they count as missed.
    cat2 = pred_catalog([2], [THREE[1]])
    res2 = evaluate_image(label_map([(2, 20, 8, 3)]), cat2, truth_labels, truth,
                          fwhm_pixels=3.0, min_snr=5.0)
    assert (res2["tp"], res2["fp"], res2["fn"]) == (0, 0, 2)


def test_centroids_fall_back_to_label_map():
    truth_labels, truth = three_truth()
    cat = pred_catalog([1, 2, 3], [(np.nan, np.nan)] * 3)
    res = evaluate_image(truth_labels, cat, truth_labels, truth, fwhm_pixels=1.0)
    assert res["tp"] == 3
    res = evaluate_image(truth_labels, None, truth_labels, truth, fwhm_pixels=1.0)
    assert res["tp"] == 3 and res["flux_rel_errors"] == []


def test_map_labels_without_catalog_rows_are_predictions():
    truth_labels, truth = three_truth()
    cat = pred_catalog([1, 2], THREE[:2])
    res = evaluate_image(truth_labels, cat, truth_labels, truth, fwhm_pixels=3.0)
    assert (res["n_pred"], res["tp"]) == (3, 3)


def test_catalog_with_units_and_dict_tables():
    import astropy.units as u

    truth_labels, truth = three_truth()
    cat = pred_catalog([1, 2, 3], THREE)
    cat["x_centroid"] = cat["x_centroid"] * u.pix
    cat["y_centroid"] = cat["y_centroid"] * u.pix
    res = evaluate_image(truth_labels, cat, truth_labels,
                         {k: np.asarray(truth[k]) for k in truth.colnames}, fwhm_pixels=3.0)
    assert res["tp"] == 3


def test_empty_scene():
    empty = np.zeros(SHAPE, dtype=np.int32)
    res = evaluate_image(empty, pred_catalog([], []), empty, truth_table([]), fwhm_pixels=3.0)
    assert (res["tp"], res["fp"], res["fn"]) == (0, 0, 0)
    s = summarize([res])
    assert math.isnan(s["recall"]) and math.isnan(s["precision"]) and math.isnan(s["mean_iou"])


def test_evaluate_image_validation():
    truth_labels, truth = three_truth()
    cat = pred_catalog([1, 2, 3], THREE)
    with pytest.raises(ValueError, match="differs from truth_labels shape"):
        evaluate_image(truth_labels[:10], cat, truth_labels, truth, fwhm_pixels=3.0)
    with pytest.raises(ValueError, match="fwhm_pixels"):
        evaluate_image(truth_labels, cat, truth_labels, truth, fwhm_pixels=-1)
    with pytest.raises(ValueError, match="integer labels"):
        evaluate_image(truth_labels.astype(float), cat, truth_labels, truth, fwhm_pixels=3.0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['x'\]"):
        evaluate_image(truth_labels, cat, truth_labels, Table(truth)[["id", "y"]],
                       fwhm_pixels=3.0)
    with pytest.raises(ValueError, match="'snr'"):
        evaluate_image(truth_labels, cat, truth_labels, Table(truth)[["id", "x", "y"]],
                       fwhm_pixels=3.0, min_snr=5)
    cat.remove_column("label")
    with pytest.raises(ValueError, match="lacks a 'label' column"):
        evaluate_image(truth_labels, cat, truth_labels, truth, fwhm_pixels=3.0)
    dup = pred_catalog([1, 1, 3], THREE)
    with pytest.raises(ValueError, match="must be unique"):
        evaluate_image(truth_labels, dup, truth_labels, truth, fwhm_pixels=3.0)


def test_summarize_rejects_foreign_dicts():
    with pytest.raises(ValueError, match=r"per_image_results\[0\] lacks"):
        summarize([{"recall": 1.0}])


# ------------------------------------------------------------------ directories


def write_scene(truth_dir, name, truth_labels, truth, *, pixscale=0.2, psf_fwhm=0.6):
    header = fits.Header()
    if pixscale is not None:
        header["PIXSCALE"] = pixscale
        header["PSF_FWHM"] = psf_fwhm
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, truth_labels.shape).astype(np.float32)
    dbio.write_image(truth_dir / f"{name}.fits", image, header=header)
    dbio.write_segmentation(truth_dir / f"{name}_truth_seg.fits", truth_labels)
    dbio.write_catalog(truth, truth_dir / f"{name}_truth.fits")


def write_prediction(pred_dir, name, labels, cat, *, method, ext=".ecsv"):
    dbio.write_segmentation(pred_dir / f"{name}_seg.fits", labels, method=method)
    dbio.write_catalog(cat, pred_dir / f"{name}_cat{ext}")


@pytest.fixture
def truth_dir(tmp_path):
    d = tmp_path / "truth"
    d.mkdir()
    labels, truth = three_truth()
    write_scene(d, "a", labels, truth)  # fwhm = 0.6 / 0.2 = 3 pixels
    write_scene(d, "b", labels, truth)
    return d


try:
    import pandas  # noqa: F401  (astropy needs it to read Parquet)

    HAS_PANDAS = True
except ImportError:
    HAS_PANDAS = False


@pytest.mark.parametrize("ext", [
    ".fits", ".ecsv", ".csv", ".xml",
    pytest.param(".parquet", marks=pytest.mark.skipif(not HAS_PANDAS, reason="astropy reads "
                                                      "Parquet only with pandas installed")),
])
def test_evaluate_directory_with_missing_prediction(tmp_path, truth_dir, ext):
    pred_dir = tmp_path / "pred"
    labels, _ = three_truth()
    cat = pred_catalog([1, 2, 3], THREE, flux=[100.0, 200.0, 50.0], cls=["galaxy"] * 3)
    write_prediction(pred_dir, "a", labels, cat, method="mymethod", ext=ext)

    result = evaluate_directory(pred_dir, truth_dir)
    assert result["method"] == "mymethod"
    assert result["missing"] == ["b"]
    s = result["summary"]
    assert (s["n_images"], s["n_missing"]) == (2, 1)
    assert (s["tp"], s["fp"], s["fn"], s["n_truth"], s["n_pred"]) == (3, 0, 3, 6, 3)
    assert s["recall"] == pytest.approx(0.5) and s["precision"] == 1.0
    assert s["mean_iou"] == pytest.approx(1.0)
    assert s["star_galaxy_accuracy"] == 1.0
    a, b = result["per_image"]
    assert (a["name"], a["missing"], b["name"], b["missing"]) == ("a", False, "b", True)
    assert a["fwhm_pixels"] == pytest.approx(3.0)


def test_evaluate_directory_fwhm_from_header_limits_matching(tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    labels, table = three_truth()
    write_scene(truth, "s", labels, table, pixscale=0.5, psf_fwhm=0.5)  # 1 pixel
    pred_dir = tmp_path / "pred"
    shifted = [(x + 2.0, y) for x, y in THREE]
    write_prediction(pred_dir, "s", labels, pred_catalog([1, 2, 3], shifted), method="m")
    assert evaluate_directory(pred_dir, truth)["summary"]["tp"] == 0
    assert evaluate_directory(pred_dir, truth, fwhm_pixels=2.5)["summary"]["tp"] == 3


def test_evaluate_directory_errors(tmp_path, truth_dir):
    with pytest.raises(InputError, match="prediction directory does not exist"):
        evaluate_directory(tmp_path / "nope", truth_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no truth scene"):
        evaluate_directory(truth_dir, empty)
    with pytest.raises(ValueError, match="catalog_format must be one of"):
        evaluate_directory(truth_dir, truth_dir, catalog_format="xls")
    bare = tmp_path / "bare"
    bare.mkdir()
    labels, table = three_truth()
    write_scene(bare, "s", labels, table, pixscale=None)
    with pytest.raises(InputError, match="PSF_FWHM"):
        evaluate_directory(tmp_path / "truth", bare)


def test_method_name_falls_back_to_directory(tmp_path, truth_dir):
    pred_dir = tmp_path / "sep_run"
    pred_dir.mkdir()
    labels, _ = three_truth()
    dbio.write_segmentation(pred_dir / "a_seg.fits", labels)  # no DBMETHOD, no catalog
    result = evaluate_directory(pred_dir, truth_dir)
    assert result["method"] == "sep_run"
    assert result["summary"]["tp"] == 3


def test_compare_methods_table_and_json(tmp_path, truth_dir):
    labels, _ = three_truth()
    good, poor = tmp_path / "good", tmp_path / "poor"
    for name in ("a", "b"):
        write_prediction(good, name, labels, pred_catalog([1, 2, 3], THREE), method="maskrcnn")
        poor_labels = label_map([(1, 6, 6, 3)])
        write_prediction(poor, name, poor_labels, pred_catalog([1], THREE[:1]), method="sep")
    results = compare_methods([good, poor], truth_dir)
    assert [r["method"] for r in results] == ["maskrcnn", "sep"]
    assert results[0]["summary"]["f1"] == 1.0
    assert results[1]["summary"]["recall"] == pytest.approx(1 / 3)

    table = format_table(results)
    for word in ("maskrcnn", "sep", "recall", "precision", "F1", "blended recall", "mean IoU",
                 "median |Δflux|/flux", "star/galaxy acc", "merged", "shredded", "n_truth",
                 "n_pred", "0.333", "1.000", "n/a"):
        assert word in table, word
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned columns

    path = write_json(results, tmp_path / "out" / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded == nan_to_none(results)
    assert loaded[0]["summary"]["star_galaxy_accuracy"] is None
    assert not list(path.parent.glob("*.tmp*"))


def test_format_table_disambiguates_equal_method_names(tmp_path, truth_dir):
    labels, _ = three_truth()
    for d in ("run1", "run2"):
        write_prediction(tmp_path / d, "a", labels, pred_catalog([1, 2, 3], THREE), method="sep")
    results = compare_methods([tmp_path / "run1", tmp_path / "run2"], truth_dir)
    table = format_table(results)
    assert "sep (run1)" in table and "sep (run2)" in table


def test_write_json_converts_numpy_types(tmp_path):
    data = {"a": np.int64(3), "b": np.float32(0.5), "c": np.array([1, 2]), "d": np.bool_(True),
            "e": float("nan"), "f": tmp_path}
    loaded = json.loads(write_json(data, tmp_path / "x.json").read_text())
    assert loaded == {"a": 3, "b": 0.5, "c": [1, 2], "d": True, "e": None, "f": str(tmp_path)}


def nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def test_flux_column_scores_another_catalog_flux(tmp_path, truth_dir):
    labels, _ = three_truth()  # true fluxes 100, 200, 50
    pred = tmp_path / "pred"
    for name in ("a", "b"):
        cat = pred_catalog([1, 2, 3], THREE, flux=[90.0, 180.0, 45.0])  # segment flux 10 % low
        cat["kron_flux"] = np.array([100.0, 220.0, 50.0])  # one source 10 % high, the others exact
        write_prediction(pred, name, labels, cat, method="maskrcnn")
    segment = evaluate_directory(pred, truth_dir)
    kron = evaluate_directory(pred, truth_dir, flux_column="kron_flux")
    assert segment["flux_column"] == "segment_flux" and kron["flux_column"] == "kron_flux"
    assert segment["summary"]["median_flux_bias"] == pytest.approx(-0.1)
    assert kron["summary"]["median_abs_flux_error"] == 0.0
    assert kron["summary"]["tp"] == segment["summary"]["tp"] == 6  # matching does not change
    assert "median |Δflux|/flux (kron_flux)" in format_table([kron])
    assert "(kron_flux)" not in format_table([segment])
    with pytest.raises(InputError, match="has no column 'auto_flux'.*--flux-column"):
        evaluate_directory(pred, truth_dir, flux_column="auto_flux")
