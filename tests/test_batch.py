"""Tests of deblend.batch: discovery, per-file isolation, mirrored outputs, no partial files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from deblend.batch import BatchSummary, FileRecord, discover_inputs, is_fits_name, run_batch
from deblend.io import read_catalog, read_segmentation
from deblend.pipeline import Deblender

GOOD = ["a.fits", "b.fits", "c.fits.gz"]
BAD = {"notfits.fits": "not a FITS file", "trunc_header.fits": "truncated",
       "header_only.fits": "no image HDU"}


@pytest.fixture
def input_dir(tmp_path, write_fits, make_scene, make_header, bad_files):
    """in/ with 3 good images, 1 not-FITS, 1 truncated and 1 header-only file."""
    for i, name in enumerate(GOOD):
        write_fits(f"in/{name}", make_scene(seed=i), header=make_header())
    for kind, name in [("not_fits", "notfits.fits"), ("truncated_header", "trunc_header.fits"),
                       ("header_only", "header_only.fits")]:
        shutil.copy(bad_files[kind], tmp_path / "in" / name)
    return tmp_path / "in"


def run(inputs, outdir, **kwargs):
    kwargs.setdefault("progress", False)
    return run_batch([str(p) for p in inputs], outdir, Deblender("sep"), **kwargs)


def output_names(outdir, files_under):
    return sorted(str(p) for p in files_under(outdir))


def test_good_and_bad_files(input_dir, tmp_path, files_under, temp_files_under):
    outdir = tmp_path / "out"
    summary = run([input_dir], outdir)
    assert isinstance(summary, BatchSummary)
    assert len(summary.records) == 6
    assert summary.n_ok == 3 and len(summary.failed) == 3
    by_name = {Path(r.path).name: r for r in summary.records}
    for name in GOOD:
        record = by_name[name]
        assert record.status == "ok" and record.n_sources == 3 and record.error == ""
        assert set(record.outputs) == {"segmentation", "catalog"}
        assert all(Path(p).exists() for p in record.outputs.values())
    for name, cause in BAD.items():
        record = by_name[name]
        assert record.status == "failed" and record.outputs == {}
        pattern = re.escape(str(input_dir / name)) + ".*" + cause
        assert re.search(pattern, record.error), record.error
    assert summary.n_sources == 9
    stems = ["a", "b", "c"]
    expected = sorted([f"{s}_cat.fits" for s in stems] + [f"{s}_seg.fits" for s in stems])
    assert output_names(outdir, files_under) == expected
    assert temp_files_under(outdir) == [] and temp_files_under(input_dir) == []
    report = summary.report()
    assert report.splitlines()[0].startswith("3 of 6 inputs deblended, 9 sources, 3 failed")
    for name in BAD:
        assert name in report


def test_outputs_are_valid(input_dir, tmp_path):
    outdir = tmp_path / "out"
    run([input_dir], outdir)
    labels, header = read_segmentation(outdir / "a_seg.fits")
    catalog = read_catalog(outdir / "a_cat.fits")
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), catalog["label"])
    assert header["DBINPUT"] == "a.fits" and header["DBMETHOD"] == "sep"


def test_subdirectories_mirrored(tmp_path, write_fits, make_scene, files_under):
    write_fits("in/top.fits", make_scene(seed=0))
    write_fits("in/night1/ccd1.fits", make_scene(seed=1))
    write_fits("in/night1/deep/ccd2.fits.fz", fits.CompImageHDU(make_scene(seed=2),
                                                                  quantize_level=0.0,
                                                                  compression_type="GZIP_1"))
    outdir = tmp_path / "out"
    summary = run([tmp_path / "in"], outdir)
    assert summary.n_ok == 3
    assert output_names(outdir, files_under) == sorted([
        "top_cat.fits", "top_seg.fits",
        "night1/ccd1_cat.fits", "night1/ccd1_seg.fits",
        "night1/deep/ccd2_cat.fits", "night1/deep/ccd2_seg.fits",
    ])
    flat = run([tmp_path / "in"], tmp_path / "flat", recursive=False)
    assert [Path(r.path).name for r in flat.records] == ["top.fits"]


def test_existing_outputs_need_overwrite(input_dir, tmp_path, temp_files_under):
    outdir = tmp_path / "out"
    run([input_dir], outdir)
    before = (outdir / "a_seg.fits").read_bytes()
    again = run([input_dir], outdir)
    assert again.n_ok == 0
    for name in GOOD:
        record = next(r for r in again.records if Path(r.path).name == name)
        assert record.status == "failed"
        assert str(input_dir / name) in record.error and "--overwrite" in record.error
    assert (outdir / "a_seg.fits").read_bytes() == before
    forced = run([input_dir], outdir, overwrite=True)
    assert forced.n_ok == 3
    assert temp_files_under(outdir) == []


def test_files_named_explicitly(input_dir, tmp_path, files_under):
    outdir = tmp_path / "out"
    summary = run([input_dir / "a.fits", input_dir / "notfits.fits"], outdir, format="ecsv")
    assert [r.status for r in summary.records] == ["ok", "failed"]
    assert output_names(outdir, files_under) == ["a_cat.ecsv", "a_seg.fits"]


def test_as_bands(tmp_path, write_fits, make_scene, make_header, files_under):
    for i, band in enumerate("gri"):
        hdu = fits.PrimaryHDU(make_scene(seed=i), header=make_header())
        hdu.header["FILTER"] = band
        write_fits(f"bands/field_{band}.fits", hdu)
    outdir = tmp_path / "out"
    summary = run([tmp_path / "bands"], outdir, as_bands=True)
    assert len(summary.records) == 1 and summary.n_ok == 1
    assert summary.records[0].n_sources == 3
    # files are sorted: field_g, field_i, field_r; named after the first
    assert output_names(outdir, files_under) == ["field_g_cat.fits", "field_g_seg.fits"]
    catalog = read_catalog(outdir / "field_g_cat.fits")
    for band in "gri":
        assert f"segment_flux_{band}" in catalog.colnames
    assert "ra" in catalog.colnames and "dec" in catalog.colnames


def test_as_bands_with_a_bad_file_fails_as_a_whole(tmp_path, write_fits, make_scene, bad_files,
                                                   files_under):
    paths = [write_fits("g.fits", make_scene(seed=0)), bad_files["truncated_data"]]
    summary = run(paths, tmp_path / "out", as_bands=True)
    assert len(summary.records) == 1 and summary.records[0].status == "failed"
    assert str(bad_files["truncated_data"]) in summary.records[0].error
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_unexpected_error_is_isolated(input_dir, tmp_path, monkeypatch):
    import deblend.pipeline

    real = deblend.pipeline.sep_labels
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setitem(deblend.pipeline.CLASSICAL, "sep", flaky)
    summary = run([input_dir / n for n in GOOD], tmp_path / "out")
    assert [r.status for r in summary.records] == ["ok", "failed", "ok"]
    assert "b.fits: RuntimeError: boom" in summary.records[1].error
    assert not (tmp_path / "out" / "b_seg.fits").exists()


def test_discover_inputs(tmp_path, write_fits, make_scene):
    data = make_scene()
    for name in ["x.fits", "y.fit", "z.fits.gz", "sub/w.fts", "x_seg.fits", "x_cat.fits",
                 "scene_truth.fits", "scene_truth_seg.fits"]:
        write_fits(f"d/{name}", data)
    (tmp_path / "d" / "notes.txt").write_text("hi")
    found = discover_inputs([tmp_path / "d"])
    assert [p.relative_to(tmp_path / "d").as_posix() for p, _ in found] == [
        "sub/w.fts", "x.fits", "y.fit", "z.fits.gz"]
    assert all(base == tmp_path / "d" for _, base in found)
    found = discover_inputs([tmp_path / "d"], recursive=False)
    assert "sub/w.fts" not in [p.relative_to(tmp_path / "d").as_posix() for p, _ in found]
    # explicit files are kept whatever their name, and duplicates are dropped
    explicit = discover_inputs([tmp_path / "d" / "notes.txt", tmp_path / "d" / "x.fits",
                                tmp_path / "d"])
    assert [p.name for p, _ in explicit][:2] == ["notes.txt", "x.fits"]
    assert len(explicit) == 5
    with pytest.raises(FileNotFoundError, match="missing"):
        discover_inputs([tmp_path / "missing"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.fits", True), ("a.FITS", True), ("a.fits.gz", True), ("a.fz", True), ("a.fit", True),
     ("a.txt", False), ("a.fits.bz2", False)],
)
def test_is_fits_name(name, expected):
    assert is_fits_name(name) is expected


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    summary = run([tmp_path / "empty"], tmp_path / "out")
    assert summary.records == [] and summary.n_ok == 0


def test_summary_counts():
    summary = BatchSummary([FileRecord("a", "ok", n_sources=4),
                            FileRecord("b", "failed", error="b: bad"),
                            FileRecord("c", "ok", n_sources=1)])
    assert summary.n_ok == 2 and summary.n_sources == 5
    assert [r.path for r in summary.failed] == ["b"]
    assert "FAILED b: bad" in summary.report()


def test_same_stem_inputs_do_not_replace_each_other(tmp_path, write_fits, make_scene):
    first = write_fits("a/x.fits", make_scene(seed=0))
    second = write_fits("b/x.fits", make_scene(sources=[(30.0, 30.0, 50.0, 2.0)]))
    same_dir = write_fits("a/x.fits.gz", make_scene(seed=1))
    outdir = tmp_path / "out"
    summary = run([first, second, same_dir], outdir, overwrite=True)
    assert [r.status for r in summary.records] == ["ok", "failed", "failed"]
    for record, other in zip(summary.records[1:], (second, same_dir), strict=True):
        assert record.error.startswith(f"{other}:") and str(first) in record.error
    assert len(read_catalog(outdir / "x_cat.fits")) == 3  # still the first input's catalog
