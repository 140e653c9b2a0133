"""Tests of deblend.batch: discovery, per-file isolation, mirrored outputs, no partial files, manifest, resume."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import deblend.pipeline
import deblend.result
from deblend.batch import (
    MANIFEST_NAME,
    BatchSummary,
    FileRecord,
    discover_inputs,
    is_fits_name,
    read_manifest,
    run_batch,
)
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
    """Deblend's outputs under ``outdir`` (the manifest is checked by its own tests)."""
    return sorted(str(p) for p in files_under(outdir) if p.name != MANIFEST_NAME)


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
        assert str(input_dir / name) in record.error
        assert "--overwrite" in record.error and "--resume" in record.error
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
    assert not (tmp_path / "out").exists() or output_names(tmp_path / "out", files_under) == []


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
                            FileRecord("c", "ok", n_sources=1),
                            FileRecord("d", "skipped", n_sources=7)])
    assert summary.n_ok == 2 and summary.n_sources == 5  # found in this run
    assert [r.path for r in summary.failed] == ["b"] and [r.path for r in summary.skipped] == ["d"]
    report = summary.report()
    assert report.splitlines()[0] == "2 of 4 inputs deblended, 5 sources, 1 failed, 1 skipped (already done)"
    assert "FAILED b: bad" in report


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


# ---------------------------------------------------------------- manifest, resume, interrupts


@pytest.fixture
def count_calls(monkeypatch):
    """Wrap the SEP labelling function: ``calls`` lists the calls; ``fail_on[n] = exc`` raises on call n (1-based)."""
    real = deblend.pipeline.CLASSICAL["sep"]
    state = {"calls": [], "fail_on": {}}

    def counting(*args, **kwargs):
        state["calls"].append(1)
        exc = state["fail_on"].get(len(state["calls"]))
        if exc is not None:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setitem(deblend.pipeline.CLASSICAL, "sep", counting)
    return state


def good_files(input_dir):
    return [input_dir / name for name in GOOD]


def mtimes(outdir):
    return {p.name: p.stat().st_mtime_ns for p in Path(outdir).iterdir() if p.name != MANIFEST_NAME}


def test_manifest_records(input_dir, tmp_path):
    outdir = tmp_path / "out"
    summary = run([input_dir], outdir)
    assert summary.manifest == str(outdir / MANIFEST_NAME)
    lines = (outdir / MANIFEST_NAME).read_text().splitlines()
    assert len(lines) == 6
    records = read_manifest(outdir)
    assert [r.to_dict() for r in records] == [json.loads(line) for line in lines]
    assert [r.to_dict() for r in records] == [r.to_dict() for r in summary.records]
    config = json.loads(json.dumps(Deblender("sep").config()))
    for record in records:
        path = Path(record.path)
        assert record.path == str(input_dir / path.name)  # as given
        assert record.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record.config == config and record.format == "fits" and record.duration > 0
        stamp = datetime.datetime.fromisoformat(record.timestamp.replace("Z", "+00:00"))
        assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 600
        if path.name in GOOD:
            assert record.status == "ok" and record.n_sources == 3 and record.error == ""
            assert Path(record.outputs["catalog"]) == outdir.resolve() / f"{path.name.split('.')[0]}_cat.fits"
        else:
            assert record.status == "failed" and record.outputs == {} and path.name in record.error
            assert record.error_type == "InputError"
    run([input_dir], outdir)  # a second run appends (its inputs are refused: outputs exist)
    records = read_manifest(outdir)
    assert len(records) == 12 and all(r.status == "failed" for r in records[6:])


def test_resume_skips_done_and_redoes_changed(input_dir, tmp_path, write_fits, make_scene, count_calls,
                                              temp_files_under):
    outdir = tmp_path / "out"
    assert run(good_files(input_dir), outdir).n_ok == 3
    before = mtimes(outdir)
    (input_dir / "b.fits").unlink()
    write_fits("in/b.fits", make_scene(sources=[(30.0, 30.0, 50.0, 2.0)]))  # changed content
    (outdir / "c_cat.fits").unlink()  # lost output
    count_calls["calls"].clear()
    summary = run(good_files(input_dir), outdir, resume=True)
    assert [r.status for r in summary.records] == ["skipped", "ok", "ok"]
    assert len(count_calls["calls"]) == 2
    assert summary.records[0].n_sources == 3 and summary.records[1].n_sources == 1
    after = mtimes(outdir)
    assert after["a_seg.fits"] == before["a_seg.fits"] and after["a_cat.fits"] == before["a_cat.fits"]
    assert after["b_seg.fits"] != before["b_seg.fits"]
    assert len(read_catalog(outdir / "b_cat.fits")) == 1
    assert temp_files_under(outdir) == []
    # nothing left to do; skipped records do not hide the ok ones
    count_calls["calls"].clear()
    again = run(good_files(input_dir), outdir, resume=True)
    assert [r.status for r in again.records] == ["skipped"] * 3 and count_calls["calls"] == []
    assert "3 skipped (already done)" in again.report()
    assert [r.status for r in read_manifest(outdir)] == ["ok"] * 3 + ["skipped", "ok", "ok"] + ["skipped"] * 3


def test_resume_redoes_on_other_configuration_or_format(input_dir, tmp_path, count_calls):
    outdir = tmp_path / "out"
    run(good_files(input_dir), outdir)
    count_calls["calls"].clear()
    other = run_batch([str(p) for p in good_files(input_dir)], outdir, Deblender("sep", thresh=3.0),
                      resume=True, progress=False)
    assert [r.status for r in other.records] == ["ok"] * 3 and len(count_calls["calls"]) == 3
    assert other.records[0].config["options"] == {"thresh": 3.0}
    ecsv = run(good_files(input_dir), outdir, resume=True, format="ecsv")
    assert [r.status for r in ecsv.records] == ["ok"] * 3
    assert (outdir / "a_cat.ecsv").exists()


def test_resume_redoes_failed_inputs(input_dir, tmp_path, count_calls):
    outdir = tmp_path / "out"
    count_calls["fail_on"][2] = RuntimeError("boom")
    first = run(good_files(input_dir), outdir)
    assert [r.status for r in first.records] == ["ok", "failed", "ok"]
    assert first.records[1].error_type == "RuntimeError"
    count_calls["calls"].clear()
    count_calls["fail_on"].clear()
    resumed = run(good_files(input_dir), outdir, resume=True)
    assert [r.status for r in resumed.records] == ["skipped", "ok", "skipped"]
    assert len(count_calls["calls"]) == 1


def test_resume_looks_past_refused_reruns(input_dir, tmp_path, count_calls):
    outdir = tmp_path / "out"
    run(good_files(input_dir), outdir)
    refused = run(good_files(input_dir), outdir)  # forgot --resume: refused, outputs untouched
    assert [r.error_type for r in refused.records] == ["OutputExists"] * 3
    count_calls["calls"].clear()
    resumed = run(good_files(input_dir), outdir, resume=True)
    assert [r.status for r in resumed.records] == ["skipped"] * 3 and count_calls["calls"] == []


def test_resume_and_overwrite_exclude_each_other(input_dir, tmp_path):
    with pytest.raises(ValueError, match="overwrite and resume"):
        run(good_files(input_dir), tmp_path / "out", resume=True, overwrite=True)
    assert not (tmp_path / "out").exists()


def test_overwrite_redoes_everything(input_dir, tmp_path, count_calls):
    outdir = tmp_path / "out"
    run(good_files(input_dir), outdir)
    count_calls["calls"].clear()
    forced = run(good_files(input_dir), outdir, overwrite=True)
    assert [r.status for r in forced.records] == ["ok"] * 3 and len(count_calls["calls"]) == 3


def test_interrupt_then_resume(input_dir, tmp_path, count_calls, temp_files_under, files_under):
    outdir = tmp_path / "out"
    count_calls["fail_on"][3] = KeyboardInterrupt()  # while deblending c.fits.gz
    with pytest.raises(KeyboardInterrupt):
        run(good_files(input_dir), outdir)
    assert output_names(outdir, files_under) == ["a_cat.fits", "a_seg.fits", "b_cat.fits", "b_seg.fits"]
    assert temp_files_under(outdir) == []
    records = read_manifest(outdir)
    assert [(Path(r.path).name, r.status) for r in records] == [("a.fits", "ok"), ("b.fits", "ok")]
    before = mtimes(outdir)
    count_calls["calls"].clear()
    count_calls["fail_on"].clear()
    resumed = run(good_files(input_dir), outdir, resume=True)
    assert [r.status for r in resumed.records] == ["skipped", "skipped", "ok"]
    assert len(count_calls["calls"]) == 1  # only c was deblended
    after = mtimes(outdir)
    assert all(after[name] == before[name] for name in before)
    assert output_names(outdir, files_under) == sorted(f"{s}_{k}.fits" for s in "abc" for k in ("cat", "seg"))


def test_interrupt_while_writing_leaves_no_partial_files(input_dir, tmp_path, monkeypatch, temp_files_under,
                                                         files_under):
    real = deblend.result.write_catalog
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # b's segmentation map is written to its temporary name by now
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(deblend.result, "write_catalog", interrupted)
    outdir = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(good_files(input_dir), outdir)
    assert output_names(outdir, files_under) == ["a_cat.fits", "a_seg.fits"]
    assert temp_files_under(outdir) == []
    assert [r.status for r in read_manifest(outdir)] == ["ok"]


def test_manifest_line_cut_short(input_dir, tmp_path, count_calls):
    outdir = tmp_path / "out"
    run(good_files(input_dir)[:2], outdir)
    manifest = outdir / MANIFEST_NAME
    with open(manifest, "a") as fh:  # a crash in the middle of a third record
        fh.write('{"path": "x.fits", "sta')
    with pytest.warns(UserWarning, match="manifest.jsonl:3: unreadable"):
        assert len(read_manifest(outdir)) == 2
    count_calls["calls"].clear()
    with pytest.warns(UserWarning, match="unreadable"):
        resumed = run(good_files(input_dir), outdir, resume=True)
    assert [r.status for r in resumed.records] == ["skipped", "skipped", "ok"]
    lines = manifest.read_text().splitlines()
    assert len(lines) == 6 and lines[2].startswith('{"path": "x.fits", "sta')
    assert all(json.loads(line)["status"] for line in lines[3:])


def test_unwritable_manifest_does_not_stop_the_batch(input_dir, tmp_path, caplog):
    outdir = tmp_path / "out"
    (outdir / MANIFEST_NAME).mkdir(parents=True)  # cannot be opened as a file
    summary = run(good_files(input_dir), outdir)
    assert summary.n_ok == 3 and summary.manifest is None
    assert "cannot write the manifest" in caplog.text


# ---------------------------------------------------------------- regions, Dask execution


def test_regions_written_with_one_region_per_source(input_dir, tmp_path, count_calls):
    from regions import Regions

    outdir = tmp_path / "out"
    summary = run(good_files(input_dir), outdir, regions=True)
    for record in summary.records:
        stem = Path(record.path).name.split(".")[0]
        assert Path(record.outputs["regions"]) == outdir.resolve() / f"{stem}.reg"
        regions = Regions.read(record.outputs["regions"], format="ds9")
        assert len(regions) == len(read_catalog(record.outputs["catalog"])) == record.n_sources
    # resume: the region files are outputs too; a run without them does not count for a run with them
    count_calls["calls"].clear()
    (outdir / "b.reg").unlink()
    resumed = run(good_files(input_dir), outdir, resume=True, regions=True)
    assert [r.status for r in resumed.records] == ["skipped", "ok", "skipped"] and len(count_calls["calls"]) == 1
    plain = tmp_path / "plain"
    run(good_files(input_dir), plain)
    count_calls["calls"].clear()
    with_regions = run(good_files(input_dir), plain, resume=True, regions=True)
    assert [r.status for r in with_regions.records] == ["ok"] * 3 and (plain / "a.reg").exists()


@pytest.fixture
def distributed():
    """The Dask distributed module (the tests that need it are skipped without it)."""
    return pytest.importorskip("distributed")


@pytest.fixture
def cluster(distributed):
    """A small in-process Dask cluster (threads, no worker processes: quick to start)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as c:
        yield c


@pytest.fixture
def restore_worker_state():
    """In-process Dask workers set torch threads in this process: put them back afterwards."""
    import deblend.batch

    torch = pytest.importorskip("torch")
    threads, state = torch.get_num_threads(), dict(deblend.batch._WORKER_STATE)
    yield
    torch.set_num_threads(threads)
    deblend.batch._WORKER_STATE.update(state)


def comparable(records):
    """What must not depend on where the inputs were deblended (not durations, timestamps, order or OUTDIR)."""
    keys = ("path", "status", "n_sources", "error", "error_type", "checksum", "config", "format")
    return sorted((*(json.dumps(r.to_dict()[k], sort_keys=True) for k in keys),
                   sorted((k, Path(v).name) for k, v in r.outputs.items())) for r in records)


def test_scheduler_gives_the_same_records_and_outputs(input_dir, tmp_path, cluster, restore_worker_state):
    serial = run([input_dir], tmp_path / "serial")
    dask = run([input_dir], tmp_path / "dask", scheduler=cluster.scheduler_address)
    assert [r.path for r in dask.records] == [r.path for r in serial.records]  # summary in input order
    assert comparable(dask.records) == comparable(serial.records)
    assert len(serial.failed) == 3
    assert len(read_manifest(tmp_path / "dask")) == 6  # written by the client, one line per input
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(read_segmentation(tmp_path / "serial" / f"{name}_seg.fits")[0],
                                      read_segmentation(tmp_path / "dask" / f"{name}_seg.fits")[0])


def test_scheduler_client_resume_and_refusal(input_dir, tmp_path, distributed, cluster, count_calls,
                                             restore_worker_state):
    outdir = tmp_path / "out"
    with distributed.Client(cluster) as client:
        first = run(good_files(input_dir)[:2], outdir, scheduler=client)
        assert [r.status for r in first.records] == ["ok", "ok"]
        refused = run(good_files(input_dir), outdir, scheduler=client)
        assert [r.error_type for r in refused.records] == ["OutputExists", "OutputExists", ""]
        count_calls["calls"].clear()
        resumed = run(good_files(input_dir), outdir, resume=True, scheduler=client)
        assert [r.status for r in resumed.records] == ["skipped", "skipped", "skipped"]
        assert count_calls["calls"] == []  # c was done by the refused run, which wrote its record
        assert client.status == "running"  # a Client passed in is left open


def test_interrupt_with_dask_then_resume(input_dir, tmp_path, cluster, monkeypatch, count_calls,
                                         restore_worker_state, temp_files_under):
    import deblend.batch

    real = deblend.batch._Manifest.append
    appended = []

    def interrupted(self, record):  # Ctrl-C reaches the client after two inputs were recorded
        if len(appended) == 2:
            raise KeyboardInterrupt
        appended.append(record.path)
        real(self, record)

    monkeypatch.setattr(deblend.batch._Manifest, "append", interrupted)
    outdir = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(good_files(input_dir), outdir, scheduler=cluster.scheduler_address)
    monkeypatch.setattr(deblend.batch._Manifest, "append", real)
    assert [r.path for r in read_manifest(outdir)] == appended
    count_calls["calls"].clear()
    resumed = run(good_files(input_dir), outdir, resume=True, scheduler=cluster.scheduler_address)
    done = {r.path: r.status for r in resumed.records}
    assert all(done[path] == "skipped" for path in appended)  # none of the finished ones redone
    assert len(count_calls["calls"]) == 1 and temp_files_under(outdir) == []
    assert len(list(outdir.glob("*_cat.fits"))) == 3


def test_torch_threads_per_task(input_dir, tmp_path, cluster, restore_worker_state):
    import deblend.batch

    run(good_files(input_dir)[:1], tmp_path / "out", scheduler=cluster.scheduler_address)
    cores = deblend.batch._visible_cores()
    # one worker on this host running 2 tasks at once: each task gets half the cores
    assert deblend.batch._WORKER_STATE["torch_threads"] == max(1, cores // 2)


def test_serial_runs_without_dask(input_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails
    assert run(good_files(input_dir), tmp_path / "out").n_ok == 3
    with pytest.raises(ImportError, match=re.escape('pip install "deblend[parallel]"')):
        run(good_files(input_dir), tmp_path / "out2", workers=2)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"workers": 0}, "workers must be a positive integer.*got 0"),
    ({"workers": 1.5}, "workers must be a positive integer"),
    ({"workers": 2, "scheduler": "tcp://localhost:8786"}, "workers=2 and scheduler='tcp://localhost:8786' exclude"),
    ({"scheduler": " "}, "scheduler must be a Dask scheduler address"),
])
def test_parallel_option_errors(input_dir, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(good_files(input_dir), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_local_workers_keep_the_default_malloc_trimming(distributed, monkeypatch):
    """Dask's MALLOC_TRIM_THRESHOLD_ makes every file 1.4-1.6x slower; local workers start without it."""
    import os

    from deblend.batch import _DaskExecutor

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with _DaskExecutor(workers=1) as executor:
        env = executor.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        omp = executor.client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert list(env.values()) == [None]
    assert list(omp.values()) == ["1"]  # the other pre-spawn settings stay (torch threads are set per task)


def test_local_workers_run_without_the_statistical_profiler(distributed):
    """Dask's profiler keeps 1000 s of stack samples per worker: memory that grows with the run."""
    import dask

    from deblend.batch import _DaskExecutor

    with _DaskExecutor(workers=1) as executor:
        enabled = executor.client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        history = executor.client.run(lambda dask_worker: len(dask_worker.profile_history))
    assert list(enabled.values()) == [False]
    assert list(history.values()) == [0]


def test_freed_memory_is_handed_back_after_every_input(input_dir, tmp_path, monkeypatch):
    """Long runs: glibc keeps each file's freed blocks unless trimmed (pipelines/soak.py measured the creep)."""
    import deblend.batch

    calls = []
    monkeypatch.setattr(deblend.batch, "_release_memory", lambda: calls.append(1) or True)
    summary = run([input_dir], tmp_path / "out")
    assert len(summary.records) == 6 and len(calls) == 6  # failed inputs too


def test_release_memory_is_safe_to_call():
    from deblend.batch import _MALLOC_TRIM, _release_memory

    released = _release_memory()
    assert isinstance(released, bool)
    if _MALLOC_TRIM is None:  # a C library without malloc_trim: a no-op
        assert released is False
