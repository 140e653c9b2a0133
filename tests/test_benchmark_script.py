"""pipelines/benchmark.py stays runnable: its core on a 128² scene, the result's structure and its writers.

No timing is asserted: only that every stage, method, ratio and output is there.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("deblend_benchmark_script", ROOT / "pipelines" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(bench, tmp_path_factory):
    work = tmp_path_factory.mktemp("benchmark")
    info = bench.simulated_image(work, size=128, seed=5000)
    deblenders, refine = bench.make_deblenders(["mask-rcnn", "photutils", "sep"])
    result = bench.benchmark_image(info["path"], deblenders=deblenders, outdir=work / "out", repeats=1,
                                   crosscheck=True, refine=refine, label="128²")
    result.update(n_truth=info["n_truth"], density=info["density"])
    return work, info, deblenders, refine, result


def _number(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def test_benchmark_image_structure(bench, small_run):
    _, info, _, refine, result = small_run
    assert info["n_truth"] > 0
    assert result["shape"] == [128, 128] and result["n_bands"] == 1
    assert set(result["methods"]) == {"mask-rcnn", "photutils", "sep"}
    neural = result["methods"]["mask-rcnn"]
    assert list(neural["stages"]) == list(bench.MASK_RCNN_STAGES)
    for name, entry in neural["stages"].items():
        if name == "refine" and entry["seconds"] is None:
            assert entry["note"].startswith("n/a") and refine["module"] is None
            continue
        assert _number(entry["seconds"]), name
    for method in ("sep", "photutils"):
        assert list(result["methods"][method]["stages"]) == list(bench.CLASSICAL_STAGES)
    for entry in result["methods"].values():
        assert _number(entry["total_seconds"]) and _number(entry["run_wall_seconds"])
        assert _number(entry["stage_sum_over_run"]) and entry["n_sources"] >= 0
        assert entry["n_sources"] == entry["run_n_sources"]
        assert entry.get("labels_match_run", True) is True  # the stages reproduce Deblender.run
        if bench.PeakMemory.method and "unavailable" not in bench.PeakMemory.method:
            assert all("peak_rss_mb" in s for s in entry["stages"].values() if s["seconds"] is not None)
    assert set(result["ratios"]) == {"mask-rcnn / sep", "mask-rcnn / photutils"}
    assert all(_number(r["total"]) and _number(r["core"]) for r in result["ratios"].values())


def test_outputs_written(bench, small_run, tmp_path):
    _, _, _, refine, result = small_run
    results = bench.new_results("test", quick=True, refine_status=refine["status"])
    results["scaling"] = [result]
    results["density"] = [result]
    results["matmul"] = [bench.matmul_flops(1, n=64, repeats=1)]
    results["memory_method"] = bench.PeakMemory.method
    paths = bench.write_outputs(results, tmp_path, tmp_path / "plot.png")
    text = paths["markdown"].read_text()
    assert "Throughput against image size" in text and "128²" in text and "not a benchmark" in text
    loaded = json.loads(paths["json"].read_text())
    assert loaded["scaling"][0]["methods"]["mask-rcnn"]["stages"]["detect"]["seconds"] > 0
    assert loaded["machine"]["torch"] and loaded["machine"]["torch_threads"] >= 1
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_call_timer_restores(bench):
    import types

    module = types.ModuleType("fake_refine")
    module.__all__ = ["work"]

    def work(x):
        return x + 1

    work.__module__ = module.__name__
    module.work = work
    with bench.CallTimer(module) as timer:
        assert module.work(1) == 2
    assert module.work is work and timer.calls == 1 and timer.seconds >= 0


def test_has_signal_check(bench):
    check = bench.check_has_signal_used()
    assert set(check) == {"detect_skip_empty_default", "deblender_overrides_skip_empty", "used_by_pipeline"}
