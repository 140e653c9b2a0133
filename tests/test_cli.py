"""Tests of the ``deblend`` command (deblend.cli.main)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits

import deblend.pipeline
from deblend._version import __version__
from deblend.batch import MANIFEST_NAME, read_manifest
from deblend.cli import build_parser, main
from deblend.io import read_catalog


def outputs(outdir):
    """Deblend's outputs in ``outdir`` (the manifest is checked by its own tests)."""
    return sorted(p.name for p in outdir.iterdir() if p.name != MANIFEST_NAME) if outdir.exists() else []


def test_run_good_input(scene_file, tmp_path, capsys):
    outdir = tmp_path / "out"
    assert main(["run", "--method", "sep", str(scene_file), "-o", str(outdir)]) == 0
    assert outputs(outdir) == ["scene_cat.fits", "scene_seg.fits"]
    assert len(read_catalog(outdir / "scene_cat.fits")) == 3
    captured = capsys.readouterr()
    assert "1 of 1 inputs deblended, 3 sources, 0 failed" in captured.out


def test_run_quiet_prints_nothing(scene_file, tmp_path, capsys):
    assert main(["-q", "run", "--method", "sep", str(scene_file), "-o", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""


def test_run_one_bad_input(scene_file, bad_files, tmp_path, capsys):
    outdir = tmp_path / "out"
    bad = bad_files["truncated_data"]
    status = main(["run", "--method", "sep", str(scene_file), str(bad), "-o", str(outdir)])
    assert status == 1
    assert outputs(outdir) == ["scene_cat.fits", "scene_seg.fits"]
    captured = capsys.readouterr()
    assert "1 of 2 inputs deblended" in captured.err
    assert f"FAILED {bad}" in captured.err and "truncated" in captured.err


def test_run_directory_with_bad_files(tmp_path, write_fits, make_scene, bad_files, capsys):
    write_fits("in/good.fits", make_scene())
    for kind in ("not_fits", "header_only"):
        shutil.copy(bad_files[kind], tmp_path / "in" / bad_files[kind].name)
    outdir = tmp_path / "out"
    assert main(["run", "--method", "sep", str(tmp_path / "in"), "-o", str(outdir)]) == 1
    assert outputs(outdir) == ["good_cat.fits", "good_seg.fits"]
    err = capsys.readouterr().err
    assert "notfits.fits" in err and "header_only.fits" in err


@pytest.mark.parametrize(("fmt", "ext"), [("ecsv", ".ecsv"), ("csv", ".csv"),
                                          ("parquet", ".parquet"), ("votable", ".xml")])
def test_run_format(scene_file, tmp_path, fmt, ext):
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", str(scene_file), "-o", str(outdir), "--format", fmt]) == 0
    assert outputs(outdir) == [f"scene_cat{ext}", "scene_seg.fits"]
    np.testing.assert_array_equal(np.asarray(read_catalog(outdir / f"scene_cat{ext}")["label"]),
                                  [1, 2, 3])


def test_run_photutils_with_options(scene_file, tmp_path):
    outdir = tmp_path / "out"
    argv = ["-q", "run", "--method", "photutils", "--thresh", "2", "--minarea", "4",
            "--deblend-nthresh", "16", "--deblend-cont", "0.01", str(scene_file), "-o", str(outdir)]
    assert main(argv) == 0
    assert read_catalog(outdir / "scene_cat.fits").meta["METHOD"] == "photutils"


def test_run_existing_outputs(scene_file, tmp_path, capsys):
    outdir = tmp_path / "out"
    argv = ["-q", "run", "--method", "sep", str(scene_file), "-o", str(outdir)]
    assert main(argv) == 0
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv, "--resume"]) == 0
    assert [r.status for r in read_manifest(outdir)] == ["ok", "failed", "ok", "skipped"]


def test_run_bands(tmp_path, write_fits, make_scene, make_header):
    paths = []
    for i, band in enumerate("grz"):
        hdu = fits.PrimaryHDU(make_scene(seed=i), header=make_header())
        hdu.header["FILTER"] = band
        paths.append(str(write_fits(f"img_{band}.fits", hdu)))
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", "--bands", *paths, "-o", str(outdir)]) == 0
    assert outputs(outdir) == ["img_g_cat.fits", "img_g_seg.fits"]
    catalog = read_catalog(outdir / "img_g_cat.fits")
    assert {"segment_flux_g", "segment_flux_r", "segment_flux_z", "ra", "dec"} <= set(
        catalog.colnames)


def test_run_hdu_and_mask_bits(tmp_path, write_fits, scene):
    mask = np.zeros(scene.shape, np.int32)
    mask[:, :32] = 8  # bad bit over the left half
    hdus = [fits.ImageHDU(np.ones((4, 4), np.float32), name="JUNK"),
            fits.ImageHDU(scene, name="SCI"), fits.ImageHDU(mask, name="MASK")]
    path = write_fits("mef.fits", hdus)
    for hdu in ("SCI", "2"):
        outdir = tmp_path / f"out_{hdu}"
        assert main(["-q", "run", "--method", "sep", str(path), "--hdu", hdu, "-o", str(outdir)]) == 0
        assert len(read_catalog(outdir / "mef_cat.fits")) == 3
    outdir = tmp_path / "out_bits"
    argv = ["-q", "run", "--method", "sep", str(path), "--hdu", "SCI", "--mask-bits", "0x8", "-o", str(outdir)]
    assert main(argv) == 0
    catalog = read_catalog(outdir / "mef_cat.fits")  # the source at x = 16 is masked
    assert len(catalog) == 2 and (np.asarray(catalog["x_centroid"]) > 32).all()


def test_run_missing_input(tmp_path):
    assert main(["-q", "run", "--method", "sep", str(tmp_path / "nope.fits"), "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_run_no_fits_found(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["-q", "run", "--method", "sep", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"deblend {__version__}"


def test_unknown_method(scene_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--method", "magic", str(scene_file), "-o", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["run", "--method", "sep", "x.fits"], ["run", "x.fits", "-o", "out", "--format", "hdf5"],
     ["run", "--method", "sep", "x.fits", "-o", "out", "--thresh", "abc"],
     ["run", "--method", "sep", "x.fits", "-o", "out", "--resume", "--overwrite"],
     ["merge", "out"]],
)
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "run" in out and "simulate" in out and "evaluate" in out and "merge" in out


def test_invalid_option_value_is_a_usage_error(scene_file, tmp_path):
    argv = ["-q", "run", "--method", "sep", "--minarea", "0", str(scene_file), "-o", str(tmp_path / "out")]
    assert main(argv) == 2


def test_run_writes_manifest(scene_file, tmp_path):
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", str(scene_file), "-o", str(outdir), "--format", "ecsv"]) == 0
    (record,) = read_manifest(outdir)
    assert record.path == str(scene_file) and record.status == "ok" and record.n_sources == 3
    assert record.format == "ecsv" and record.config["method"] == "sep" and len(record.checksum) == 64
    assert set(record.outputs) == {"segmentation", "catalog"}


def test_interrupt_returns_130_then_resume(tmp_path, write_fits, make_scene, monkeypatch, caplog):
    for i in range(3):
        write_fits(f"in/tile{i}.fits", make_scene(seed=i))
    real = deblend.pipeline.CLASSICAL["sep"]
    state = {"calls": 0, "interrupt_on": 3}

    def counting(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["interrupt_on"]:  # Ctrl-C while deblending tile2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setitem(deblend.pipeline.CLASSICAL, "sep", counting)
    outdir = tmp_path / "out"
    argv = ["-q", "run", "--method", "sep", str(tmp_path / "in"), "-o", str(outdir)]
    assert main(argv) == 130
    assert "run again with --resume" in caplog.text
    assert outputs(outdir) == ["tile0_cat.fits", "tile0_seg.fits", "tile1_cat.fits", "tile1_seg.fits"]
    assert not [p for p in outdir.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert [r.status for r in read_manifest(outdir)] == ["ok", "ok"]
    done = {name: (outdir / name).stat().st_mtime_ns for name in outputs(outdir)}
    state.update(calls=0, interrupt_on=None)
    assert main([*argv, "--resume"]) == 0
    assert state["calls"] == 1  # only tile2 was deblended
    assert all((outdir / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    assert len(outputs(outdir)) == 6
    assert [r.status for r in read_manifest(outdir)] == ["ok", "ok", "skipped", "skipped", "ok"]


def test_merge_command(scene_file, tmp_path, capsys, caplog):
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", str(scene_file), "-o", str(outdir)]) == 0
    survey = tmp_path / "survey.fits"
    assert main(["merge", str(outdir), "-o", str(survey), "--match-radius", "0.5"]) == 0
    assert "merged 1 catalogs: 3 detections, 3 sources (0 duplicates removed)" in capsys.readouterr().out
    merged = read_catalog(survey)
    assert len(merged) == 3 and {"source_file", "tile", "edge_distance"} <= set(merged.colnames)
    assert merged.meta["N_BEFORE"] == 3 and merged.meta["RADIUS"] == 0.5
    assert main(["-q", "merge", str(outdir), "-o", str(survey)]) == 1
    assert "exists; use --overwrite" in caplog.text
    assert main(["-q", "merge", str(outdir), "-o", str(survey), "--overwrite"]) == 0
    assert main(["-q", "merge", str(outdir), "-o", str(tmp_path / "survey.hdf5")]) == 2
    assert main(["-q", "merge", str(outdir), "-o", str(tmp_path / "s.ecsv"), "--match-radius", "0"]) == 2
    assert main(["-q", "merge", str(tmp_path / "missing"), "-o", str(tmp_path / "s.ecsv")]) == 2
    assert not (tmp_path / "s.ecsv").exists()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_quicklook(tmp_path, write_fits, make_scene):
    write_fits("in/a.fits", make_scene(seed=1))
    write_fits("in/b.fits", make_scene(seed=2))
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", "--quicklook", str(tmp_path / "in"), "-o", str(outdir)]) == 0
    assert outputs(outdir) == ["a_cat.fits", "a_quicklook.png", "a_seg.fits",
                               "b_cat.fits", "b_quicklook.png", "b_seg.fits"]
    assert (outdir / "a_quicklook.png").read_bytes()[:8] == PNG_MAGIC
    records = read_manifest(outdir)
    assert [r.outputs["quicklook"] for r in records] == [str(outdir / "a_quicklook.png"),
                                                         str(outdir / "b_quicklook.png")]


def test_run_quicklook_failure_does_not_stop_the_batch(tmp_path, write_fits, make_scene, monkeypatch, caplog):
    write_fits("in/a.fits", make_scene(seed=1))
    write_fits("in/b.fits", make_scene(seed=2))
    from deblend.result import DeblendResult

    plot = DeblendResult.plot

    def plot_fails_on_a(self, *args, **kwargs):
        if self.image.path.endswith("a.fits"):
            raise RuntimeError("cannot draw this one")
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(DeblendResult, "plot", plot_fails_on_a)
    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", "--quicklook", str(tmp_path / "in"), "-o", str(outdir)]) == 0
    assert outputs(outdir) == ["a_cat.fits", "a_seg.fits", "b_cat.fits", "b_quicklook.png", "b_seg.fits"]
    assert "a.fits" in caplog.text and "quick-look" in caplog.text and "cannot draw this one" in caplog.text
    assert [r.status for r in read_manifest(outdir)] == ["ok", "ok"]


def test_run_resume_adds_missing_quicklooks(scene_file, tmp_path):
    outdir = tmp_path / "out"
    argv = ["-q", "run", "--method", "sep", str(scene_file), "-o", str(outdir)]
    assert main(argv) == 0
    assert main([*argv, "--resume", "--quicklook"]) == 0  # the quick-look is missing: redone
    assert (outdir / "scene_quicklook.png").exists()
    assert main([*argv, "--resume", "--quicklook"]) == 0  # now everything is there: skipped
    assert [r.status for r in read_manifest(outdir)] == ["ok", "ok", "skipped"]


# ---------------------------------------------------------------- batch: bad files, regions, Dask (issue 5)


def test_run_ten_good_and_three_bad_files(tmp_path, write_fits, make_scene, make_header, bad_files, capsys):
    for i in range(10):
        write_fits(f"in/tile{i:02d}.fits", make_scene(seed=i), header=make_header())
    bad = {"corrupt.fits": bad_files["truncated_data"], "notfits.fits": bad_files["not_fits"],
           "empty_hdu.fits": bad_files["header_only"]}
    for name, path in bad.items():
        shutil.copy(path, tmp_path / "in" / name)
    outdir = tmp_path / "out"
    assert main(["run", "--method", "sep", str(tmp_path / "in"), "-o", str(outdir)]) == 1
    assert outputs(outdir) == sorted(f"tile{i:02d}_{kind}.fits" for i in range(10) for kind in ("cat", "seg"))
    records = read_manifest(outdir)
    assert len(records) == 13 and sum(r.status == "ok" for r in records) == 10
    failed = {r.path.rsplit("/", 1)[-1]: r for r in records if r.status == "failed"}
    assert set(failed) == set(bad)
    causes = {"corrupt.fits": "truncated", "notfits.fits": "not a FITS file", "empty_hdu.fits": "no image HDU"}
    for name, cause in causes.items():
        assert failed[name].error_type == "InputError" and cause in failed[name].error
        assert failed[name].error.startswith(str(tmp_path / "in" / name))
    err = capsys.readouterr().err
    assert "10 of 13 inputs deblended" in err and all(f"FAILED {tmp_path / 'in' / n}" in err for n in bad)


def test_run_regions(scene_file, tmp_path):
    from regions import Regions

    outdir = tmp_path / "out"
    assert main(["-q", "run", "--method", "sep", "--regions", str(scene_file), "-o", str(outdir)]) == 0
    assert outputs(outdir) == ["scene.reg", "scene_cat.fits", "scene_seg.fits"]
    regions = Regions.read(str(outdir / "scene.reg"), format="ds9")
    assert len(regions) == len(read_catalog(outdir / "scene_cat.fits")) == 3
    assert "icrs" in (outdir / "scene.reg").read_text()  # the input has a WCS


def test_run_serial_workers_and_scheduler_give_identical_catalogs(tmp_path, write_fits, make_scene, make_header,
                                                                 bad_files):
    distributed = pytest.importorskip("distributed")
    torch = pytest.importorskip("torch")
    for i in range(4):
        write_fits(f"in/tile{i}.fits", make_scene(seed=i), header=make_header())
    shutil.copy(bad_files["not_fits"], tmp_path / "in" / "notfits.fits")
    base = ["-q", "run", "--method", "sep", "--regions", str(tmp_path / "in"), "-o"]
    assert main([*base, str(tmp_path / "serial")]) == 1
    assert main([*base, str(tmp_path / "workers"), "--workers", "2"]) == 1
    threads = torch.get_num_threads()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as c:
        assert main([*base, str(tmp_path / "scheduler"), "--scheduler", c.scheduler_address]) == 1
    torch.set_num_threads(threads)  # in-process workers set it for this process
    names = outputs(tmp_path / "serial")
    assert len(names) == 12
    for mode in ("workers", "scheduler"):
        assert outputs(tmp_path / mode) == names
        for name in names:
            if name.endswith("_cat.fits"):
                a, b = read_catalog(tmp_path / "serial" / name), read_catalog(tmp_path / mode / name)
                assert a.colnames == b.colnames and len(a) == len(b) == 3
                for col in a.colnames:
                    np.testing.assert_array_equal(np.asarray(a[col]), np.asarray(b[col]))
            elif name.endswith(".reg"):
                assert (tmp_path / mode / name).read_text() == (tmp_path / "serial" / name).read_text()
            else:
                np.testing.assert_array_equal(fits.getdata(tmp_path / mode / name),
                                              fits.getdata(tmp_path / "serial" / name))
        serial, other = read_manifest(tmp_path / "serial"), read_manifest(tmp_path / mode)
        key = [(r.path, r.status, r.n_sources, r.checksum, r.error_type) for r in serial]
        assert sorted(key) == sorted((r.path, r.status, r.n_sources, r.checksum, r.error_type) for r in other)


def test_run_workers_and_scheduler_exclude_each_other(scene_file, tmp_path, capsys):
    argv = ["run", "--method", "sep", str(scene_file), "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--workers", "2", "--scheduler", "tcp://localhost:8786"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["-q", *argv, "--workers", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_run_workers_without_dask(scene_file, tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["-q", "run", "--method", "sep", str(scene_file), "-o", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert 'pip install "deblend[parallel]"' in caplog.text
    assert main(["-q", "run", "--method", "sep", str(scene_file), "-o", str(tmp_path / "out")]) == 0


def test_run_refinement_options(scene_file, tmp_path):
    """--refine on a classical method with --samples and --save-samples; --no-refine keeps it off."""
    import torch

    from deblend.models.prob_unet import build_prob_unet, save_prob_unet

    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    save_prob_unet(build_prob_unet(widths=(4, 8, 8, 8), head_width=8, latent_dim=2), weights, metadata={})
    outdir = tmp_path / "out"
    assert main(["run", "--method", "sep", "--refine", "--refine-weights", str(weights), "--samples", "3",
                 "--save-samples", str(scene_file), "-o", str(outdir)]) == 0
    with fits.open(outdir / "scene_seg.fits") as hdul:
        assert hdul["UNCERTAINTY"].data.shape == hdul[0].data.shape
        assert hdul["SAMPLES"].data.shape == (3, *hdul[0].data.shape)
    cat = read_catalog(outdir / "scene_cat.fits")
    assert {"blend_id", "n_blend", "segment_flux_seg_err", "segment_flux_err_total"} <= set(cat.colnames)
    args = build_parser().parse_args(["run", "x.fits", "-o", "o", "--no-refine"])
    assert args.refine is False and build_parser().parse_args(["run", "x.fits", "-o", "o"]).refine is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "x.fits", "-o", "o", "--refine", "--no-refine"])


def test_coarse_pass_flag():
    assert build_parser().parse_args(["run", "x.fits", "-o", "o"]).coarse_pass is False
    assert build_parser().parse_args(["run", "x.fits", "-o", "o", "--coarse-pass"]).coarse_pass is True


def test_tta_flag():
    args = build_parser().parse_args(["run", "x.fits", "-o", "o"])
    assert args.tta is False and args.score_threshold is None  # None: the Deblender's default for the mode
    assert build_parser().parse_args(["run", "x.fits", "-o", "o", "--tta"]).tta is True


def test_companion_distance_flag(scene_file, tmp_path, caplog):
    assert build_parser().parse_args(["run", "x.fits", "-o", "o"]).companion_distance is None  # the pipeline's
    args = build_parser().parse_args(["run", "x.fits", "-o", "o", "--companion-distance", "0"])
    assert args.companion_distance == 0.0
    argv = ["run", "--no-refine", "--companion-distance", "-1", str(scene_file), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "companion_distance must be a finite number of pixels >= 0" in caplog.text


def test_no_split_crowded_flag():
    assert build_parser().parse_args(["run", "x.fits", "-o", "o"]).split_crowded is True
    assert build_parser().parse_args(["run", "x.fits", "-o", "o", "--no-split-crowded"]).split_crowded is False
