"""Speed and memory benchmark: the Mask R-CNN pipeline stage by stage, beside SEP and photutils.

Every method runs on the same images in the same process: simulated single-band scenes from
256² to 4096² pixels (deblend.simulate, seed 5000, never used for training, tuning or the
quality benchmark), a 3-band simulated tile, a real DECaLS g,r,z tile when ../shared/realdata
is present, and scenes of increasing source density. Each stage is timed by calling the library
functions that `Deblender.run` calls (read_image, prepare, detect, suppress_duplicates +
instances_to_labels, refine when deblend.refine exists and the Deblender takes ``refine=``,
make_catalog, DeblendResult.write), and the sum of the stages is checked against the wall time
of `Deblender.run` + write on the same file. Memory is the peak resident set size (RSS) of the
process during each stage (Linux: the high-water mark is reset before each stage through
/proc/self/clear_refs; elsewhere a 5 ms sampler), and the peak GPU memory allocated on CUDA.

Also measured: FLOPs of the Mask R-CNN (torch.utils.flop_counter on one 256² window and on a
whole image) against the machine's float32 matmul rate, and with --ablation the optimisations
(empty-window skipping, batch size, inference_mode vs no_grad, threads, RPN proposal counts,
channels_last, torch.jit, torch.compile), each with its speed and its effect on the outputs and
on the quality metrics of deblend.evaluate.

Usage (from the repository root):
    .venv/bin/python pipelines/benchmark.py --ablation --prepare-only   # simulate the images (any time)
    .venv/bin/python pipelines/benchmark.py --ablation      # the full run, on a quiet machine
    .venv/bin/python pipelines/benchmark.py --ablation --compile        # + torch.compile (minutes more)
    .venv/bin/python pipelines/benchmark.py --sizes 256 512 --repeats 1 --quick   # smoke test, /tmp only

Simulated images are kept in runs/benchmark/ and reused. The refine stage (probabilistic
U-Net) is included when deblend.refine exists and Deblender(refine=True) can be built, and
shown as n/a otherwise; the ablation concerns the Mask R-CNN part (detect + mask NMS + labels).

Writes pipelines/results/benchmark.json, pipelines/results/benchmark.md (the README section) and
docs/benchmark_scaling.png; with --quick, everything goes to /tmp/deblend_benchmark_quick
unless --results-dir / --plot say otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

import deblend
import deblend.segment
from deblend.catalog import make_catalog
from deblend.classical import photutils_labels, sep_labels
from deblend.evaluate import evaluate_image, summarize
from deblend.io import Image, read_image
from deblend.models import set_test_proposals
from deblend.models.mask_rcnn import _MaskPredictor
from deblend.models.roi_align import SeparableMultiScaleRoIAlign
from deblend.pipeline import Deblender
from deblend.preprocess import prepare
from deblend.result import DeblendResult
from deblend.segment import detect, instances_to_labels, suppress_duplicates
from deblend.simulate import SceneConfig, read_truth, scene_seed, simulate_scene, write_scene
from deblend.tiling import has_signal, make_windows

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")

#: Stages of the Mask R-CNN pipeline, in order.
MASK_RCNN_STAGES = ("read", "preprocess", "detect", "nms_labels", "refine", "catalog", "write")
#: Stages of the classical pipelines.
CLASSICAL_STAGES = ("read", "preprocess", "detect_deblend", "catalog", "write")
CLASSICAL = {"sep": sep_labels, "photutils": photutils_labels}
#: Deblender keyword that switches the probabilistic U-Net refinement on (when it exists).
REFINE_OPTION = "refine"
DEFAULT_SIZES = (256, 512, 1024, 2048, 4096)
DEFAULT_DENSITIES = (50, 150, 400, 800)
SEED = 5000  # scaling/density/tile images; the ablation quality scenes use SEED + 1000
NOISE_LEVELS = (0.5, 1.0, 2.0)
REALDATA = ROOT.parent / "shared" / "realdata" / "decals_dr7_a1689_astro_rcnn"
MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- machine


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores():
    try:
        pairs, phys = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                pairs.add((phys, value.strip()))
        return len(pairs) or None
    except OSError:
        return None


def _memory_total_gb():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info():
    """What the numbers were measured on (CPU, cores, threads, versions, GPU, load)."""
    import photutils
    import sep
    import torchvision

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": _physical_cores(),
        "memory_gb": _memory_total_gb(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "sep": sep.__version__,
        "photutils": photutils.__version__,
        "deblend": deblend.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nice": os.nice(0) if hasattr(os, "nice") else None,
    }
    return info


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------- memory


def _proc_status_kb(key):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim():
    """Give memory freed by earlier stages back to the OS (glibc), so each stage's increase is its own."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _reset_peak_rss():
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS of this process (and peak CUDA memory) between start() and stop()."""

    method = None

    def __init__(self, device="cpu", *, trim=True):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.trim = trim
        self._sampler = None

    def start(self):
        if self.trim:
            _malloc_trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if _reset_peak_rss():
            PeakMemory.method = ("peak RSS of the process (VmHWM, reset before each stage through "
                                 "/proc/self/clear_refs, after glibc malloc_trim)")
            self._start_kb = _proc_status_kb("VmRSS")
            return self
        self._start_kb = _proc_status_kb("VmRSS")
        if self._start_kb is None:
            PeakMemory.method = "unavailable (no /proc)"
            return self
        PeakMemory.method = "peak RSS of the process (VmRSS sampled every 5 ms)"
        self._peak_kb = self._start_kb
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._peak_kb = max(self._peak_kb, _proc_status_kb("VmRSS") or 0)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        return self

    def stop(self):
        out = {}
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak_kb, _proc_status_kb("VmRSS") or 0)
        else:
            peak = _proc_status_kb("VmHWM")
        if peak is not None and self._start_kb is not None:
            out["start_rss_mb"] = round(self._start_kb / 1024, 1)
            out["peak_rss_mb"] = round(peak / 1024, 1)
            out["rss_increase_mb"] = round((peak - self._start_kb) / 1024, 1)
        if self.cuda:
            out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
        return out


@contextlib.contextmanager
def _stage(record, name, device="cpu", trim=True):
    """Time one stage and record its seconds and peak memory into ``record[name]``.

    With ``trim``, freed heap memory is returned to the OS before the stage (so its RSS
    increase is its own); the stage then pays the page faults of re-allocating it, so only the
    first of repeated passes trims.
    """
    memory = PeakMemory(device, trim=trim).start()
    t0 = time.perf_counter()
    yield
    if memory.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    record[name] = {"seconds": seconds, **memory.stop()}


# --------------------------------------------------------------------------- refine


class CallTimer:
    """Seconds spent inside a module's public functions and methods (outermost calls only).

    Used to time a stage whose API this script does not know (``deblend.refine``, being
    written): its callables are wrapped in the module, in every deblend module that imported
    them by name, and on its classes, for the duration of the ``with`` block.
    """

    def __init__(self, module):
        self.module = module
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._undo = []

    def _wrap(self, func):
        timer = self

        def wrapper(*args, **kwargs):
            timer._depth += 1
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                timer._depth -= 1
                if timer._depth == 0:
                    timer.seconds += time.perf_counter() - t0
                    timer.calls += 1

        wrapper.__wrapped__ = func
        return wrapper

    def _patch(self, owner, name, value):
        self._undo.append((owner, name, owner.__dict__[name] if name in vars(owner) else getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self):
        mod = self.module
        names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name, None)
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                wrapped = self._wrap(obj)
                self._patch(mod, name, wrapped)
                for other in list(sys.modules.values()):
                    if (other is not mod and getattr(other, "__name__", "").startswith("deblend")
                            and getattr(other, name, None) is obj):
                        self._patch(other, name, wrapped)
            elif isinstance(obj, type) and obj.__module__ == mod.__name__:
                for attr, member in list(vars(obj).items()):
                    if isinstance(member, types.FunctionType) and (not attr.startswith("_") or attr == "__call__"):
                        self._patch(obj, attr, self._wrap(member))
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo.clear()
        return False


def refine_support():
    """``(module or None, reason)``: whether the refine stage can be benchmarked at all."""
    if importlib.util.find_spec("deblend.refine") is None:
        return None, "n/a: deblend.refine does not exist yet"
    if REFINE_OPTION not in inspect.signature(Deblender.__init__).parameters:
        return None, f"n/a: deblend.refine exists but Deblender takes no {REFINE_OPTION}= option"
    try:
        return importlib.import_module("deblend.refine"), "measured"
    except Exception as error:  # a module being written may not import
        return None, f"n/a: import deblend.refine failed: {error}"


def _direct_refine_api(module, deblender):
    """Whether this script can call the refine stage itself, as `Deblender.run` does (else: CallTimer)."""
    import deblend.catalog

    return (hasattr(module, "refine_blends") and hasattr(deblend.catalog, "add_blend_columns")
            and getattr(deblender, "refiner", None) is not None and hasattr(deblender, "n_samples"))


def make_deblenders(methods, *, device="cpu", batch_size=None, half=False):
    """``({label: Deblender}, refine)`` for the methods benchmarked.

    ``refine`` is ``{"status", "module", "mode"}``: mode ``"direct"`` (this script calls
    ``refine_blends`` as `Deblender.run` does), ``"probe"`` (time spent in deblend.refine during
    `Deblender.run`, see `CallTimer`) or None (no refine stage: status says why).
    """
    module, status = refine_support()
    supports = REFINE_OPTION in inspect.signature(Deblender.__init__).parameters
    refine = {"status": status, "module": module, "mode": None}
    deblenders = {}
    for method in methods:
        kwargs = {}
        if method == "mask-rcnn":
            kwargs["device"] = device
            if half:
                kwargs["half"] = True
            if batch_size is not None:
                kwargs["batch_size"] = batch_size
        label = method if method != "mask-rcnn" or device == "cpu" else f"mask-rcnn ({device})"
        if method == "mask-rcnn" and half:
            label = f"mask-rcnn ({device}, float16)"
        deblender = None
        if method == "mask-rcnn" and module is not None:
            try:
                deblender = Deblender(method, **kwargs, **{REFINE_OPTION: True})
                refine["mode"] = "direct" if _direct_refine_api(module, deblender) else "probe"
                how = ("refine_blends called as Deblender.run calls it" if refine["mode"] == "direct"
                       else "time inside deblend.refine during Deblender.run")
                refine["status"] = f"measured ({how})"
            except Exception as error:  # e.g. weights not trained yet
                refine.update(module=None, status=f"n/a: Deblender({REFINE_OPTION}=True) failed: "
                                                  f"{type(error).__name__}: {error}"[:300])
        if deblender is None:
            # refinement off for the classical baselines, and for mask-rcnn when it cannot run
            deblender = Deblender(method, **kwargs, **({REFINE_OPTION: False} if supports else {}))
        deblenders[label] = deblender
    return deblenders, refine


# --------------------------------------------------------------------------- one image


def _stem(path):
    first = path[0] if isinstance(path, (list, tuple)) else path
    return Path(first).name.split(".")[0]


def time_mask_rcnn(path, deblender, outdir, refine=None, trim=True):
    """One pass of the Mask R-CNN pipeline, stage by stage, through the functions Deblender.run calls."""
    stages, dev = {}, deblender.device
    stage = functools.partial(_stage, trim=trim)
    refinement = None
    opts = deblender.options
    with stage(stages, "read", dev):
        image = read_image(path)
    with stage(stages, "preprocess", dev):
        prepared = prepare(image, box_size=deblender.box_size, filter_size=deblender.filter_size)
        normalized = prepared.normalized()
    with stage(stages, "detect", dev):
        instances = detect(normalized, model=deblender.model, mask=prepared.mask, window_size=opts["window_size"],
                           overlap=opts["overlap"], batch_size=opts["batch_size"], device=dev,
                           score_threshold=opts["score_threshold"], half=getattr(deblender, "half", False))
    with stage(stages, "nms_labels", dev):
        instances = suppress_duplicates(instances, normalized.shape, max_overlap=opts["max_overlap"],
                                        companion_distance=opts["companion_distance"],
                                        image=normalized)
        labels, keep = instances_to_labels(instances, normalized.shape, mask=prepared.mask)
        instances = instances.select(keep)
    if refine is not None and refine.get("mode") == "direct":
        with stage(stages, "refine", dev):
            flux_images = prepared.data if prepared.data.shape[0] == 1 else np.concatenate(
                [prepared.detection[np.newaxis], prepared.data])
            threshold = getattr(deblender, "claim_threshold", None)
            refinement = refine["module"].refine_blends(
                normalized, labels, flux_images, model=deblender.refiner, mask=prepared.mask,
                n_samples=deblender.n_samples, seed=deblender.seed, device=dev,
                half=getattr(deblender, "half", False), save_samples=getattr(deblender, "save_samples", False),
                **({} if threshold is None else {"claim_threshold": threshold}))
            labels = refinement.labels
    with stage(stages, "catalog", dev):
        catalog = make_catalog(prepared.data, labels, detection=prepared.detection, error=prepared.background.rms,
                               detection_error=prepared.detection_rms, mask=prepared.mask, wcs=image.wcs,
                               band_names=image.band_names, method=deblender.method,
                               weights_id=deblender.weights_id)
        catalog["class"] = instances.class_names.astype("U6")
        catalog["class_prob"] = instances.class_prob.astype("float32")
        catalog["det_score"] = instances.det_score.astype("float32")
        extensions = {}
        if refinement is not None:
            from deblend.catalog import add_blend_columns

            scale = getattr(deblender, "seg_err_scale", None)
            add_blend_columns(catalog, refinement, band_names=image.band_names,
                              **({} if scale is None else {"seg_err_scale": scale}))
            extensions["UNCERTAINTY"] = refinement.uncertainty
            if getattr(refinement, "samples", None) is not None:
                extensions["SAMPLES"] = refinement.samples
    with stage(stages, "write", dev):
        DeblendResult(labels=labels, catalog=catalog, image=image, method=deblender.method,
                      weights_id=deblender.weights_id, extensions=extensions).write(
                          outdir, stem=_stem(path), overwrite=True)
    return stages, labels


def time_classical(path, deblender, outdir, trim=True):
    """One pass of a classical pipeline (SEP or photutils), stage by stage."""
    stages = {}
    stage = functools.partial(_stage, trim=trim)
    with stage(stages, "read"):
        image = read_image(path)
    with stage(stages, "preprocess"):
        prepared = prepare(image, box_size=deblender.box_size, filter_size=deblender.filter_size)
    with stage(stages, "detect_deblend"):
        labels = CLASSICAL[deblender.method](prepared.detection, prepared.detection_rms, mask=prepared.mask,
                                             **deblender.options)
    with stage(stages, "catalog"):
        catalog = make_catalog(prepared.data, labels, detection=prepared.detection, error=prepared.background.rms,
                               detection_error=prepared.detection_rms, mask=prepared.mask, wcs=image.wcs,
                               band_names=image.band_names, method=deblender.method)
    with stage(stages, "write"):
        DeblendResult(labels=labels, catalog=catalog, image=image,
                      method=deblender.method).write(outdir, stem=_stem(path), overwrite=True)
    return stages, labels


def run_wall(path, deblender, outdir, refine_module=None):
    """Wall time of ``Deblender.run(path)`` + ``write`` (and the refine time inside it)."""
    timer = CallTimer(refine_module) if refine_module is not None else contextlib.nullcontext()
    memory = PeakMemory(deblender.device).start()
    t0 = time.perf_counter()
    with timer:
        result = deblender.run(path)
    result.write(outdir, stem=_stem(path), overwrite=True)
    seconds = time.perf_counter() - t0
    refine = None
    if refine_module is not None:
        refine = {"seconds": timer.seconds, "calls": timer.calls}
    return seconds, result, refine, memory.stop()


def _aggregate(passes, names):
    """Median seconds and largest memory of each stage over repeated passes."""
    out = {}
    for name in names:
        rows = [p[name] for p in passes if name in p]
        if not rows:
            continue
        entry = {"seconds": statistics.median(r["seconds"] for r in rows), "runs": [r["seconds"] for r in rows]}
        # memory from the first pass, which trimmed the heap before each stage (see `_stage`)
        for key in ("start_rss_mb", "peak_rss_mb", "rss_increase_mb", "cuda_peak_mb"):
            if key in rows[0]:
                entry[key] = rows[0][key]
        out[name] = entry
    return out


def benchmark_image(path, *, deblenders, outdir, repeats=1, crosscheck=True, refine=None, label=None):
    """Benchmark every method on one image file (or list of single-band files).

    Parameters
    ----------
    path : str, Path or list of them
        The image, read with `deblend.io.read_image`.
    deblenders : dict of str to Deblender
        Label -> deblender (``'mask-rcnn'``, ``'sep'``, ``'photutils'``, ``'mask-rcnn (cuda)'``).
    outdir : Path
        Where outputs are written (overwritten at every pass).
    repeats : int
        Passes per method; stage times are medians.
    crosscheck : bool
        Also time ``Deblender.run`` + write once and compare it with the sum of the stages.
    refine : dict, optional
        ``make_deblenders``' refine status.

    Returns
    -------
    dict
        ``{"image", "shape", "n_bands", "mpix", "methods": {label: {...}}, "ratios": {...}}``.
    """
    refine = refine or {"status": "n/a: not requested", "module": None, "mode": None}
    probe = refine["module"] if refine.get("mode") == "probe" else None
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    header_image = read_image(path)
    ny, nx = header_image.shape
    mpix = ny * nx / 1e6
    result = {"image": label or _stem(path), "shape": [ny, nx], "n_bands": header_image.n_bands,
              "mpix": mpix, "methods": {}}
    del header_image
    for name, deblender in deblenders.items():
        neural = deblender.method == "mask-rcnn"
        names = MASK_RCNN_STAGES if neural else CLASSICAL_STAGES
        passes, labels = [], None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(repeats):
                if neural:
                    stages, labels = time_mask_rcnn(path, deblender, outdir, refine, trim=i == 0)
                else:
                    stages, labels = time_classical(path, deblender, outdir, trim=i == 0)
                passes.append(stages)
            entry = {"stages": _aggregate(passes, names), "repeats": repeats, "n_sources": int(labels.max())}
            # in probe mode the refine stage is only seen inside Deblender.run: run it every time
            if crosscheck or (neural and probe is not None):
                seconds, run_result, refine_time, memory = run_wall(path, deblender, outdir,
                                                                    probe if neural else None)
                entry["run_wall_seconds"] = seconds
                entry["run_peak_rss_mb"] = memory.get("peak_rss_mb")
                entry["run_n_sources"] = int(run_result.n_sources)
                if neural and refine_time is not None:
                    entry["stages"]["refine"] = {"seconds": refine_time["seconds"], "calls": refine_time["calls"],
                                                 "note": "time inside deblend.refine during Deblender.run"}
                else:
                    entry["labels_match_run"] = bool(np.array_equal(run_result.labels, labels))
        if neural and "refine" not in entry["stages"]:
            entry["stages"]["refine"] = {"seconds": None, "note": refine["status"]}
        entry["stages"] = {k: entry["stages"][k] for k in names if k in entry["stages"]}
        total = sum(s["seconds"] for s in entry["stages"].values() if s["seconds"] is not None)
        entry["total_seconds"] = total
        # memory of the run from the first pass (the one that trims the heap before each stage)
        peaks = [s["peak_rss_mb"] for s in passes[0].values() if s.get("peak_rss_mb") is not None]
        if peaks and "start_rss_mb" in passes[0]["read"]:
            entry["start_rss_mb"] = passes[0]["read"]["start_rss_mb"]
            entry["peak_rss_mb"] = max(peaks)
            entry["rss_increase_mb"] = max(peaks) - entry["start_rss_mb"]
        entry["mpix_per_s"] = mpix / total if total > 0 else None
        for s in entry["stages"].values():
            s["mpix_per_s"] = mpix / s["seconds"] if s["seconds"] else None
        if "run_wall_seconds" in entry:
            entry["stage_sum_over_run"] = total / entry["run_wall_seconds"]
        result["methods"][name] = entry
        log.info("%s %dx%d %s: %.2f s (%s)", result["image"], ny, nx, name, total,
                 ", ".join(f"{k} {v['seconds']:.2f}" for k, v in entry["stages"].items() if v["seconds"] is not None))
    result["ratios"] = _ratios(result["methods"])
    return result


def _core_seconds(entry):
    stages = entry["stages"]
    keys = ("detect", "nms_labels", "refine") if "detect" in stages else ("detect_deblend",)
    return sum(stages[k]["seconds"] for k in keys if k in stages and stages[k]["seconds"] is not None)


def _ratios(methods):
    """Mask R-CNN time over each classical method's, end to end and for detection+deblending only."""
    out = {}
    for neural in [m for m in methods if m.startswith("mask-rcnn")]:
        for other in ("sep", "photutils"):
            if other in methods:
                key = f"{neural} / {other}"
                out[key] = {"total": methods[neural]["total_seconds"] / methods[other]["total_seconds"],
                            "core": _core_seconds(methods[neural]) / _core_seconds(methods[other])}
    return out


# --------------------------------------------------------------------------- images


def simulated_image(workdir, *, size, density=150.0, n_bands=1, seed=SEED, index=None, blank_fraction=0.0):
    """Write (or reuse) a simulated scene; returns ``{"path", "name", "n_truth", ...}``.

    ``blank_fraction`` of the columns, on the right, are set to NaN (off the survey footprint):
    `read_image` masks them.
    """
    index = size if index is None else index
    name = f"sim_{size}_d{density:g}_b{n_bands}_s{seed}_{index}"
    if blank_fraction:
        name += f"_blank{blank_fraction:g}"
    workdir = Path(workdir)
    path = workdir / f"{name}.fits"
    info = {"path": path, "name": name, "size": size, "density": density, "n_bands": n_bands,
            "seed": scene_seed(seed, index)}
    if path.exists() and (workdir / f"{name}_truth.fits").exists():
        _, truth, _ = read_truth(workdir, name)
        info.update(n_truth=len(truth), simulate_seconds=None)
        return info
    t0 = time.perf_counter()
    config = SceneConfig(shape=(size, size), density=float(density), n_bands=n_bands)
    scene = simulate_scene(config, seed=info["seed"], keep_sources=False)
    if blank_fraction:
        scene.image[..., size - int(round(blank_fraction * size)):] = np.nan
    write_scene(scene, workdir, name, overwrite=True)
    info.update(n_truth=scene.n_sources, simulate_seconds=time.perf_counter() - t0)
    log.info("simulated %s: %d sources in %.1f s", name, scene.n_sources, info["simulate_seconds"])
    return info


# --------------------------------------------------------------------------- FLOPs


def matmul_flops(threads=None, *, n=2048, repeats=5, device="cpu"):
    """Measured float32 matmul rate (FLOP/s) of ``n x n`` matrices with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device)
        b = torch.randn(n, n, generator=gen).to(device)
        torch.matmul(a, b)
        best = math.inf
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return {"n": n, "threads": torch.get_num_threads(), "flop_per_s": 2.0 * n**3 / best, "seconds": best}
    finally:
        torch.set_num_threads(previous)


_MODULE_GROUPS = {"backbone+FPN": ("_BackboneWithFPN", "BackboneWithFPN"), "RPN": ("RegionProposalNetwork",),
                  "box head": ("TwoMLPHead", "FastRCNNPredictor"), "mask head": ("MaskRCNNHeads", "MaskRCNNPredictor")}


def _flops_by_group(counter):
    counts = counter.get_flop_counts()
    out = {}
    for group, names in _MODULE_GROUPS.items():
        out[group] = int(sum(sum(counts.get(name, {}).values()) for name in names))
    out["total"] = int(counter.get_total_flops())
    out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def count_flops(path, deblender):
    """FLOPs of the Mask R-CNN on the central 256² window and on the whole image (flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from deblend.segment import _mask_rcnn_forward

    image = read_image(path)
    prepared = prepare(image, box_size=deblender.box_size, filter_size=deblender.filter_size)
    normalized = np.where(prepared.mask, 0.0, prepared.normalized()).astype(np.float32)
    opts = deblender.options
    ny, nx = normalized.shape
    w = min(opts["window_size"], ny, nx)
    y0, x0 = (ny - w) // 2, (nx - w) // 2
    tensor = torch.from_numpy(np.ascontiguousarray(normalized[y0:y0 + w, x0:x0 + w]))[None, None]
    tensor = tensor.to(deblender.device)
    counter = FlopCounterMode(display=False, depth=None)
    model = deblender.model.eval()
    with torch.inference_mode(), counter:
        found = _mask_rcnn_forward(model, tensor, float(opts["score_threshold"]))
    window = {"window": [w, w], "n_detections": len(found[0].boxes), "flops": _flops_by_group(counter)}
    window["gflop"] = window["flops"]["total"] / 1e9
    window["gflop_per_window_mpix"] = window["gflop"] / (w * w / 1e6)

    windows = make_windows(normalized.shape, size=opts["window_size"], overlap=opts["overlap"])
    bad = prepared.mask | ~np.isfinite(normalized)
    n_signal = sum(has_signal(normalized[win.slices], bad[win.slices]) for win in windows)
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        instances = detect(normalized, model=model, mask=prepared.mask, window_size=opts["window_size"],
                           overlap=opts["overlap"], batch_size=opts["batch_size"], device=deblender.device,
                           score_threshold=opts["score_threshold"])
    whole = {"shape": [ny, nx], "n_windows": len(windows), "n_windows_with_signal": int(n_signal),
             "n_instances": len(instances), "flops": _flops_by_group(counter)}
    whole["gflop"] = whole["flops"]["total"] / 1e9
    whole["gflop_per_image_mpix"] = whole["gflop"] / (ny * nx / 1e6)
    return {"window": window, "image": whole,
            "note": "FLOPs counted by torch.utils.flop_counter (convolutions and matrix products, "
                    "2 per multiply-add); RoIAlign, NMS, interpolation and element-wise ops are not counted"}


def count_refine_flops(path, deblender):
    """FLOPs of the probabilistic U-Net refining one image's blend groups (flop_counter).

    The refine stage as `Deblender.run` calls it, on the labels of the Mask R-CNN stages;
    per refined member (one U-Net window each, all samples) and per image megapixel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from deblend.refine import refine_blends

    prepared = prepare(read_image(path), box_size=deblender.box_size, filter_size=deblender.filter_size)
    normalized = prepared.normalized()
    labels, _ = deblender._segment(prepared, normalized)
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        refinement = refine_blends(normalized, labels, prepared.data, model=deblender.refiner, mask=prepared.mask,
                                   n_samples=deblender.n_samples, seed=deblender.seed, device=deblender.device,
                                   claim_threshold=deblender.claim_threshold)
    ny, nx = labels.shape
    n_refined = int(refinement.refined.sum())
    gflop = counter.get_total_flops() / 1e9
    return {"shape": [ny, nx], "n_sources": int(labels.max()), "n_refined": n_refined,
            "n_samples": deblender.n_samples, "gflop": gflop, "gflop_per_image_mpix": gflop / (ny * nx / 1e6),
            "mflop_per_member": 1e3 * gflop / n_refined if n_refined else None}


# --------------------------------------------------------------------------- ablation


def quality_scenes(n, *, seed=SEED + 1000, shape=(256, 256)):
    """Held-out scenes for the quality side of the ablation (conditions as benchmark_quality, density 40-400)."""
    scenes = []
    for i in range(n):
        rng = np.random.default_rng(scene_seed(seed, i))
        config = SceneConfig(shape=shape, pixel_scale=float(rng.uniform(0.15, 0.3)),
                             psf_fwhm=float(rng.uniform(0.5, 1.0)), noise_sigma=NOISE_LEVELS[i % 3],
                             density=float(rng.uniform(40, 400)))
        scene = simulate_scene(config, seed=scene_seed(seed + 1, i), keep_sources=False)
        prepared = prepare(Image.from_array(scene.image))
        scenes.append({"scene": scene, "prepared": prepared, "normalized": prepared.normalized(),
                       "fwhm_pixels": config.psf_fwhm / config.pixel_scale})
    return scenes


def _labels(normalized, prepared, model, opts, detect_kwargs):
    kwargs = {"window_size": opts["window_size"], "overlap": opts["overlap"], "batch_size": opts["batch_size"],
              "score_threshold": opts["score_threshold"], **detect_kwargs}
    instances = detect(normalized, model=model, mask=prepared.mask, **kwargs)
    instances = suppress_duplicates(instances, normalized.shape, max_overlap=opts["max_overlap"],
                                    companion_distance=opts["companion_distance"],
                                    image=normalized)
    labels, keep = instances_to_labels(instances, normalized.shape, mask=prepared.mask)
    return labels, instances.select(keep)


_QUALITY_KEYS = ("recall", "precision", "f1", "blended_recall", "mean_iou", "median_abs_flux_error", "merged",
                 "shredded", "n_truth", "n_pred")


def score_quality(scenes, model, opts, detect_kwargs):
    """deblend.evaluate metrics of one model setting over the quality scenes."""
    results = []
    t0 = time.perf_counter()
    for s in scenes:
        labels, instances = _labels(s["normalized"], s["prepared"], model, opts, detect_kwargs)
        p = s["prepared"]
        catalog = make_catalog(p.data, labels, detection=p.detection, error=p.background.rms,
                               detection_error=p.detection_rms, mask=p.mask)
        catalog["class"] = instances.class_names.astype("U6")
        results.append(evaluate_image(labels, catalog, s["scene"].truth_seg, s["scene"].truth,
                                      fwhm_pixels=s["fwhm_pixels"]))
    summary = summarize(results)
    out = {k: summary[k] for k in _QUALITY_KEYS}
    out["seconds"] = time.perf_counter() - t0
    return out


@contextlib.contextmanager
def _threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rpn(model, pre, post):
    return set_test_proposals(copy.deepcopy(model), pre, post)


def _max_detections(model, n):
    model = copy.deepcopy(model)
    model.roi_heads.detections_per_img = n
    return model


def _jit_backbone(model, example):
    """Trace, freeze (folds batch norm into the convolutions) and optimise the backbone + FPN."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model.backbone, example, strict=False, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    model.backbone = frozen
    return model


def _compiled(model, parts):
    model = copy.deepcopy(model).eval()
    if "backbone" in parts:
        model.backbone = torch.compile(model.backbone)
    if "heads" in parts:
        model.rpn.head = torch.compile(model.rpn.head)
        model.roi_heads.box_head = torch.compile(model.roi_heads.box_head, dynamic=True)
        model.roi_heads.mask_head = torch.compile(model.roi_heads.mask_head, dynamic=True)
    return model


def ablation_variants(base_model, opts, *, quick=False, compile_=False):
    """``(name, group, setup)``: setup() -> (model, detect kwargs, context manager)."""
    window = opts["window_size"]
    example = torch.zeros(opts["batch_size"], 1, window, window)
    default_threads = torch.get_num_threads()
    variants = [(f"baseline (defaults, {default_threads} torch threads)", "baseline",
                 lambda: (base_model, {}, contextlib.nullcontext())),
                ("skip_empty=False (no has_signal)", "empty windows",
                 lambda: (base_model, {"skip_empty": False}, contextlib.nullcontext()))]
    for b in (1, 8):
        variants.append((f"batch_size={b}", "batch size",
                         lambda b=b: (base_model, {"batch_size": b}, contextlib.nullcontext())))
    variants.append(("torch.no_grad instead of inference_mode", "grad mode",
                     lambda: (base_model, {}, mock.patch.object(torch, "inference_mode", torch.no_grad))))
    for n in sorted({1, 2} - {default_threads}):
        variants.append((f"torch threads={n}", "threads", lambda n=n: (base_model, {}, _threads(n))))
    settings = ((1000, 500), (400, 200), (300, 150), (200, 100))
    if quick:
        settings = ((300, 150),)
    for pre, post in settings:
        variants.append((f"RPN pre/post-NMS top-n {pre}/{post}", "proposals",
                         lambda pre=pre, post=post: (_rpn(base_model, pre, post), {}, contextlib.nullcontext())))
    pre0, post0 = base_model.rpn._pre_nms_top_n["testing"], base_model.rpn._post_nms_top_n["testing"]
    det0 = base_model.roi_heads.detections_per_img
    for size in ((384,) if quick else (384, 512)):
        f = (size / window) ** 2  # proposals and detections scale with the window's area
        variants.append((f"windows {size}² (default {window}²), overlap {opts['overlap']}; RPN top-n "
                         f"{round(pre0 * f)}/{round(post0 * f)} and detections <= {round(det0 * f)} "
                         "(scaled with the area)", "window size",
                         lambda size=size, f=f: (_max_detections(_rpn(base_model, round(pre0 * f), round(post0 * f)),
                                                                 round(det0 * f)),
                                                 {"window_size": size}, contextlib.nullcontext())))
    if not quick:
        variants.append(("detections per window <= 100 (default 300)", "proposals",
                         lambda: (_max_detections(base_model, 100), {}, contextlib.nullcontext())))
    variants.append(("masks for every detection (also those no window core can own)", "trimmed detections",
                     lambda: (base_model, {}, mock.patch.object(
                         deblend.segment, "_may_be_owned", lambda boxes, core: torch.ones(len(boxes), dtype=bool)))))
    variants.append(("RoI batches not padded to multiples of 8 (ROI_BUCKET = 1)", "memory",
                     lambda: (base_model, {}, mock.patch.object(deblend.segment, "ROI_BUCKET", 1))))
    variants.append(("torchvision's roi_align kernel (single-threaded) instead of deblend's batched products",
                     "RoIAlign", lambda: (base_model, {}, mock.patch.object(
                         SeparableMultiScaleRoIAlign, "forward", MultiScaleRoIAlign.forward))))
    variants.append(("mask predictor layer by layer (transposed conv, ReLU, 1x1 conv)", "mask predictor",
                     lambda: (base_model, {}, mock.patch.object(_MaskPredictor, "forward",
                                                                MaskRCNNPredictor.forward))))
    variants.append(("contiguous weights (the default is channels_last)", "memory format",
                     lambda: (copy.deepcopy(base_model).to(memory_format=torch.contiguous_format), {},
                              contextlib.nullcontext())))
    variants.append(("torch.jit trace+freeze (backbone+FPN)", "compilation",
                     lambda: (_jit_backbone(base_model, example), {}, contextlib.nullcontext())))
    if compile_:
        variants.append(("torch.compile (backbone+FPN)", "compilation",
                         lambda: (_compiled(base_model, ("backbone",)), {}, contextlib.nullcontext())))
        variants.append(("torch.compile (backbone+FPN and heads)", "compilation",
                         lambda: (_compiled(base_model, ("backbone", "heads")), {}, contextlib.nullcontext())))
    return variants


def run_ablation(images, scenes, deblender, *, repeats=2, quick=False, compile_=False):
    """Each optimisation against the defaults: detect seconds, outputs, quality.

    ``images``: list of ``(label, path, info)`` (speed and output agreement); ``scenes``: from
    `quality_scenes` (deblend.evaluate metrics, computed for the proposal settings and for every
    variant whose outputs differ from the defaults').
    """
    opts = deblender.options
    prepared = []
    for label, path, info in images:
        p = prepare(read_image(path), box_size=deblender.box_size, filter_size=deblender.filter_size)
        windows = make_windows(p.detection.shape, size=opts["window_size"], overlap=opts["overlap"])
        normalized = p.normalized()
        bad = p.mask | ~np.isfinite(normalized)
        n_signal = sum(has_signal(np.where(bad, 0, normalized)[w.slices], bad[w.slices]) for w in windows)
        prepared.append({"label": label, "prepared": p, "normalized": normalized, "n_windows": len(windows),
                         "n_windows_with_signal": int(n_signal), "density": info.get("density")})
    rows, baseline = [], None
    gflop = None
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _labels(prepared[0]["normalized"], prepared[0]["prepared"], deblender.model, opts, {})
        gflop = counter.get_total_flops() / 1e9
    except Exception as error:  # FLOP counting is a by-product here
        log.warning("ablation FLOP count failed: %s", error)
    for name, group, setup in ablation_variants(deblender.model, opts, quick=quick, compile_=compile_):
        row = {"variant": name, "group": group}
        log.info("ablation: %s", name)
        try:
            t0 = time.perf_counter()
            model, kwargs, context = setup()
            row["setup_seconds"] = time.perf_counter() - t0
            with context, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # warm-up: compiled variants on the first image (compiles for its batch shapes),
                # the others on the cheapest one
                first = prepared[0] if group == "compilation" else prepared[-1]
                t0 = time.perf_counter()
                _labels(first["normalized"], first["prepared"], model, opts, kwargs)
                row["first_call_seconds"] = time.perf_counter() - t0
                row["images"] = {}
                identical = True
                for item in prepared:
                    times, memory = [], None
                    for _ in range(repeats):
                        mem = PeakMemory().start()
                        t0 = time.perf_counter()
                        labels, _ = _labels(item["normalized"], item["prepared"], model, opts, kwargs)
                        times.append(time.perf_counter() - t0)
                        memory = mem.stop()
                    entry = {"seconds": statistics.median(times), "runs": times, "n_sources": int(labels.max()),
                             **memory}
                    if baseline is not None:
                        base = baseline["images"][item["label"]]
                        entry["speedup"] = base["seconds"] / entry["seconds"]
                        entry["identical_labels"] = bool(np.array_equal(labels, base["labels"]))
                        entry["pixel_agreement"] = float(np.mean((labels > 0) == (base["labels"] > 0)))
                        identical &= entry["identical_labels"]
                    else:
                        entry["labels"] = labels
                    row["images"][item["label"]] = entry
                row["identical_to_baseline"] = identical if baseline is not None else True
                if baseline is None or group in ("proposals", "window size") or not identical:
                    row["quality"] = score_quality(scenes, model, opts, kwargs)
                else:
                    row["quality"] = "identical outputs on the benchmark images; not re-scored"
        except Exception as error:  # an optimisation that does not work here is a result, not a crash
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            log.warning("ablation %s failed: %s", name, row["error"])
        if baseline is None:
            baseline = row
        rows.append(row)
    for entry in baseline.get("images", {}).values():
        entry.pop("labels", None)
    if not compile_:
        rows.append({"variant": "torch.compile", "group": "compilation",
                     "skipped": "not run: pass --compile (inductor compiles for minutes on a small CPU)"})
    windows = {item["label"]: {"n_windows": item["n_windows"], "n_windows_with_signal": item["n_windows_with_signal"]}
               for item in prepared}
    return {"variants": rows, "windows": windows, "repeats": repeats, "n_quality_scenes": len(scenes),
            "baseline_gflop_first_image": gflop}


def check_has_signal_used():
    """Whether detect skips empty windows by default and the pipeline keeps that default."""
    default = inspect.signature(detect).parameters["skip_empty"].default
    try:
        source = inspect.getsource(Deblender)
    except OSError:
        source = ""
    overridden = "skip_empty" in source
    return {"detect_skip_empty_default": default, "deblender_overrides_skip_empty": overridden,
            "used_by_pipeline": bool(default) and not overridden}


# --------------------------------------------------------------------------- outputs


def _fmt(value, digits=2):
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(value)
    if not math.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray) or isinstance(obj, types.ModuleType):
        return None
    return obj


def _image_rows(images, methods, neural="mask-rcnn"):
    lines = ["| image | pixels | sources (truth) | " + " | ".join(f"{m} s" for m in methods)
             + " | " + " | ".join(f"{m} Mpix/s" for m in methods) + f" | {neural} / photutils | {neural} / sep |",
             "| --- | --- | --- |" + " --- |" * (2 * len(methods) + 2)]
    for r in images:
        ms = r["methods"]
        shape = "×".join(str(s) for s in r["shape"])
        if r["n_bands"] > 1:
            shape = f"{r['n_bands']}×{shape}"
        cells = [_fmt(ms[m]["total_seconds"]) if m in ms else "n/a" for m in methods]
        cells += [_fmt(ms[m]["mpix_per_s"], 3) if m in ms else "n/a" for m in methods]
        ratios = r.get("ratios", {})
        cells += [_fmt(ratios.get(f"{neural} / {o}", {}).get("total")) for o in ("photutils", "sep")]
        truth = r.get("n_truth")
        truth = "n/a" if truth is None else truth
        lines.append(f"| {r['image']} | {shape} | {truth} | " + " | ".join(cells) + " |")
    return lines


def summary_lines(results):
    """Plain statements computed from the numbers (no judgement beyond thresholds stated here)."""
    out = []
    scaling = [r for r in results.get("scaling", []) if "mask-rcnn" in r["methods"]]
    if scaling:
        big = max(scaling, key=lambda r: r["mpix"])
        e = big["methods"]["mask-rcnn"]
        text = (f"- At {big['image']} pixels the Mask R-CNN pipeline takes {_fmt(e['total_seconds'])} s "
                f"({_fmt(e['mpix_per_s'], 3)} Mpix/s)")
        ratios = [f"{_fmt(v['total'])}× the time of {k.split(' / ')[1]}" for k, v in big["ratios"].items()
                  if k.startswith("mask-rcnn /")]
        text += (" — " + " and ".join(ratios) if ratios else "") + "; "
        shares = sorted(((v["seconds"] / e["total_seconds"], k) for k, v in e["stages"].items()
                         if v["seconds"] is not None), reverse=True)[:2]
        text += " and ".join(f"{k} is {100 * f:.0f} %" for f, k in shares) + " of it."
        out.append(text)
        checked = [r["methods"]["mask-rcnn"]["stage_sum_over_run"] for r in scaling + results.get("tiles", [])
                   if r["methods"].get("mask-rcnn", {}).get("stage_sum_over_run")]
        if checked:
            out.append(f"- Sum of the timed stages / wall time of `Deblender.run` + write: "
                       f"{min(checked):.2f}-{max(checked):.2f} over {len(checked)} images.")
    f = results.get("flops")
    if f:
        row = next((r for r in f.get("achieved", []) if r.get("fraction") is not None
                    and r["threads"] == results["machine"]["torch_threads"]), None)
        if row:
            out.append(f"- The Mask R-CNN runs at {_fmt(row['detect_gflop_per_s'])} GFLOP/s, "
                       f"{100 * row['fraction']:.0f} % of this machine's float32 matmul rate "
                       f"({f['image']['gflop_per_image_mpix']:.0f} GFLOP per image megapixel).")
        r = f.get("refine")
        if r and r.get("fraction") is not None:
            out.append(f"- The refine stage runs the probabilistic U-Net at {_fmt(r['gflop_per_s'])} GFLOP/s, "
                       f"{100 * r['fraction']:.0f} % of the matmul rate ({r['gflop_per_image_mpix']:.0f} GFLOP per "
                       f"image megapixel, {_fmt(r['mflop_per_member'])} MFLOP per refined source).")
    ab = results.get("ablation")
    if ab:
        first = next(iter(ab["windows"]))
        base_q = ab["variants"][0].get("quality")
        if isinstance(base_q, dict):
            out.append(f"- Defaults on the {ab['n_quality_scenes']} quality scenes: F1 {_fmt(base_q['f1'], 3)}, "
                       f"blended recall {_fmt(base_q['blended_recall'], 3)}.")
        faster = [v for v in ab["variants"] if "images" in v and v["images"][first].get("speedup", 0) >= 1.05]
        for v in faster:
            q = v.get("quality")
            effect = ("identical outputs" if v.get("identical_to_baseline") else
                      f"outputs differ: F1 {_fmt(q['f1'], 3)}, blended recall {_fmt(q['blended_recall'], 3)}"
                      if isinstance(q, dict) else "outputs differ")
            out.append(f"- {v['variant']}: {v['images'][first]['speedup']:.2f}× on the {first} image ({effect}).")
        if not faster:
            out.append("- No optimisation of the ablation was 5 % or more faster than the defaults.")
    return out + [""] if out else []


def render_markdown(results):
    """The README performance section, filled in from ``results``."""
    m = results["machine"]
    scaling = results.get("scaling", [])
    methods = [k for k in ("mask-rcnn", "photutils", "sep") if any(k in r["methods"] for r in scaling)]
    lines = [f"Measured by `{results['command']}` on {results['date']} "
             f"({results['duration_seconds'] / 60:.1f} min).", "",
             f"Machine: {m['cpu_model']}, {m['physical_cores']} physical cores ({m['usable_cpus']} usable), "
             f"{m['memory_gb']} GB; torch {m['torch']} with {m['torch_threads']} threads, "
             f"torchvision {m['torchvision']}, sep {m['sep']}, photutils {m['photutils']}; "
             f"GPU: {m['gpu'] or 'none'}. Load average before/after: {results['load_before']} / "
             f"{results['load_after']}.", ""]
    if results.get("quick"):
        lines += ["**Quick smoke-test settings: these numbers are not a benchmark.**", ""]
    lines += summary_lines(results)
    lines += ["### Throughput against image size", "",
              f"Simulated single-band scenes (deblend.simulate, seed {results['seed']}, 0.2″/pix, PSF FWHM 0.7″, "
              "150 sources per arcmin² drawn), every method end to end: read FITS, background and noise, "
              "detection and deblending, photutils catalog, write segmentation + catalog. Median of "
              f"{results['repeats']} passes (images ≥ {results['single_pass_from']}² once).", ""]
    lines += _image_rows(scaling, methods)
    lines += ["", "Mask R-CNN stages (seconds; share of the total):", ""]
    lines.append("| pixels | " + " | ".join(MASK_RCNN_STAGES)
                 + " | sum | Deblender.run + write | sum / run | same labels as run |")
    lines.append("| --- |" + " --- |" * (len(MASK_RCNN_STAGES) + 4))
    for r in scaling + results.get("tiles", []):
        e = r["methods"].get("mask-rcnn")
        if e is None:
            continue
        cells = []
        for s in MASK_RCNN_STAGES:
            sec = e["stages"].get(s, {}).get("seconds")
            cells.append("n/a" if sec is None else f"{_fmt(sec)} ({100 * sec / e['total_seconds']:.0f} %)")
        run = e.get("run_wall_seconds")
        same = {True: "yes", False: "no", None: "n/a"}[e.get("labels_match_run")]
        lines.append(f"| {r['image']} | " + " | ".join(cells) + f" | {_fmt(e['total_seconds'])} | {_fmt(run)} | "
                     f"{_fmt(e.get('stage_sum_over_run'))} | {same} |")
    refine = results.get("refine_status", "n/a")
    lines += ["", f"Refine stage: {refine}.", ""]
    lines += ["### Memory", "", f"Measured per stage: {results.get('memory_method')}. All methods run in one "
              "process that already holds the libraries and the Mask R-CNN weights; each cell gives the peak "
              "RSS above the RSS at the start of the run (reading the file), and the stage where the largest "
              "increase over that stage's own start happened. Mask R-CNN runs first on each image.", ""]
    lines.append("| pixels | " + " | ".join(f"{m}: peak above start (largest stage)" for m in methods) + " |")
    lines.append("| --- |" + " --- |" * len(methods))
    for r in scaling + results.get("tiles", []):
        cells = []
        for meth in methods:
            e = r["methods"].get(meth)
            stages = {k: v for k, v in (e or {}).get("stages", {}).items() if v.get("rss_increase_mb") is not None}
            if not stages or e.get("rss_increase_mb") is None:
                cells.append("n/a")
                continue
            name, worst = max(stages.items(), key=lambda kv: kv[1]["rss_increase_mb"])
            cells.append(f"{_fmt(e['rss_increase_mb'])} MB ({name} +{_fmt(worst['rss_increase_mb'])} MB)")
        lines.append(f"| {r['image']} | " + " | ".join(cells) + " |")
    starts = [e["start_rss_mb"] for r in scaling for e in r["methods"].values() if e.get("start_rss_mb")]
    if starts:
        lines += ["", f"RSS of the process at the start of a run: {_fmt(min(starts))}-{_fmt(max(starts))} MB."]
    lines.append("")
    if results.get("tiles"):
        lines += ["", "### Multi-band and real tiles", ""]
        lines += _image_rows(results["tiles"], methods)
    if results.get("density"):
        size = results.get("density_size") or "×".join(str(v) for v in results["density"][0]["shape"])
        lines += ["", f"### Time against source density ({size}² pixels)", ""]
        lines.append("| drawn per arcmin² | sources (truth) | " + " | ".join(f"{m} s" for m in methods)
                     + " | mask-rcnn detect s | mask-rcnn nms+labels s | mask-rcnn catalog s |")
        lines.append("| --- | --- |" + " --- |" * (len(methods) + 3))
        for r in results["density"]:
            e = r["methods"].get("mask-rcnn", {"stages": {}})
            cells = [_fmt(r["methods"][x]["total_seconds"]) if x in r["methods"] else "n/a" for x in methods]
            cells += [_fmt(e["stages"].get(s, {}).get("seconds")) for s in ("detect", "nms_labels", "catalog")]
            lines.append(f"| {r['density']:g} | {r.get('n_truth')} | " + " | ".join(cells) + " |")
    f = results.get("flops")
    if f:
        w, img = f["window"], f["image"]
        mm = results["matmul"]
        lines += ["", "### FLOPs and the hardware limit", "",
                  f"One {w['window'][0]}² window with {w['n_detections']} detections: {w['gflop']:.2f} GFLOP "
                  f"({', '.join(f'{k} {v / 1e9:.2f}' for k, v in w['flops'].items() if k not in ('total',))}). "
                  f"Whole {img['shape'][0]}×{img['shape'][1]} image ({img['n_windows_with_signal']} of "
                  f"{img['n_windows']} windows with signal, {img['n_instances']} instances): {img['gflop']:.1f} GFLOP, "
                  f"{img['gflop_per_image_mpix']:.1f} GFLOP per image megapixel. {f['note']}.", ""]
        lines.append("| torch threads | matmul GFLOP/s (float32, "
                     f"{mm[0]['n']}²) | network GFLOP/s | fraction of the matmul rate | measured on |")
        lines.append("| --- | --- | --- | --- | --- |")
        for row in f.get("achieved", []):
            where = row.get("note", f"the detect stage of the {f['reference_image']} image")
            lines.append(f"| {row['threads']} | {row['matmul_gflop_per_s']:.1f} | "
                         f"{_fmt(row.get('detect_gflop_per_s'))} | {_fmt(row.get('fraction'))} | {where} |")
        r = f.get("refine")
        if r:
            lines += ["", f"Probabilistic U-Net (refine stage) on the same {r['shape'][0]}×{r['shape'][1]} image: "
                      f"{r['n_refined']} of {r['n_sources']} sources refined, {r['n_samples']} samples each, "
                      f"{r['gflop']:.1f} GFLOP ({_fmt(r['mflop_per_member'])} MFLOP per refined source, "
                      f"{r['gflop_per_image_mpix']:.1f} GFLOP per image megapixel); it runs at "
                      f"{_fmt(r.get('gflop_per_s'))} GFLOP/s, {_fmt(r.get('fraction'))} of the matmul rate "
                      "(the stage's time includes building the inputs and assigning the pixels)."]
    ab = results.get("ablation")
    if ab:
        labels = list(ab["windows"])
        lines += ["", "### Optimisations (`--ablation`)", "",
                  "Detect stage (detect + mask NMS + labels) on "
                  + "; ".join(f"{k} ({v['n_windows_with_signal']} of {v['n_windows']} windows with signal)"
                              for k, v in ab["windows"].items())
                  + f"; median of {ab['repeats']} passes. Quality: deblend.evaluate on {ab['n_quality_scenes']} "
                  "held-out 256² scenes (seed 6000; 40-400 sources per arcmin², noise σ 0.5/1/2), for every "
                  "setting whose outputs differ from the defaults'.", ""]
        has = results.get("has_signal")
        if has:
            lines += [f"`has_signal` window skipping: default skip_empty={has['detect_skip_empty_default']} in "
                      f"`segment.detect`, used by the pipeline: {has['used_by_pipeline']}.", ""]
        head = "| variant | " + " | ".join(f"{lab} s (speed-up)" for lab in labels)
        head += " | same outputs | F1 | blended recall | precision | mean IoU | one-off setup s |"
        lines += [head, "| --- |" + " --- |" * (len(labels) + 6)]
        for row in ab["variants"]:
            if "error" in row or "skipped" in row:
                text = f"failed: {row['error'][:160]}" if "error" in row else row["skipped"]
                lines.append(f"| {row['variant']} | {text} |" + " |" * (len(labels) + 5))
                continue
            cells = []
            for lab in labels:
                e = row["images"][lab]
                sp = e.get("speedup")
                cells.append(f"{_fmt(e['seconds'])}" + (f" ({sp:.2f}×)" if sp else ""))
            q = row.get("quality")
            if isinstance(q, dict):
                qcells = [_fmt(q["f1"], 3), _fmt(q["blended_recall"], 3), _fmt(q["precision"], 3),
                          _fmt(q["mean_iou"], 3)]
            else:
                qcells = ["= defaults"] * 4
            same = "yes" if row.get("identical_to_baseline") else "no"
            warm_image = labels[0] if row["group"] == "compilation" else labels[-1]
            setup = (row.get("setup_seconds", 0) + row.get("first_call_seconds", 0)
                     - row["images"][warm_image]["seconds"])
            setup = _fmt(setup) if setup > 0.05 else "-"
            lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {same} | " + " | ".join(qcells)
                         + f" | {setup} |")
    lines += ["", "### GPU", "", results.get("gpu_status", "not run"), ""]
    if results.get("gpu"):
        for method in results["gpu"][0]["methods"]:  # float32, then float16 (--half)
            lines += _image_rows(results["gpu"], [method], neural=method) + [""]
        lines += ["", "Ratios: GPU Mask R-CNN time over the CPU time of the classical methods on the same image."]
    if results.get("plot"):
        lines += ["", f"![time against image size and source density]({results['plot']})", ""]
    return "\n".join(lines) + "\n"


def plot_scaling(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"mask-rcnn": "C0", "photutils": "C1", "sep": "C2"}
    scaling = results.get("scaling", [])
    for method, color in colors.items():
        rows = [r for r in scaling if method in r["methods"]]
        if not rows:
            continue
        mpix = [r["mpix"] for r in rows]
        axes[0].loglog(mpix, [r["methods"][method]["total_seconds"] for r in rows], "o-", color=color, label=method)
        axes[1].semilogx(mpix, [r["methods"][method]["mpix_per_s"] for r in rows], "o-", color=color, label=method)
        if method == "mask-rcnn":
            axes[0].loglog(mpix, [r["methods"][method]["stages"]["detect"]["seconds"] for r in rows], "s--",
                           color=color, alpha=0.6, label="mask-rcnn: detect stage")
    for r in results.get("gpu", []):
        for e in r["methods"].values():
            axes[1].semilogx([r["mpix"]], [e["mpix_per_s"]], "^", color="C3")
    axes[0].set(xlabel="image size (Mpix)", ylabel="wall time, end to end (s)", title="time against image size")
    axes[1].set(xlabel="image size (Mpix)", ylabel="Mpix/s", title="throughput")
    density = results.get("density", [])
    for method, color in colors.items():
        rows = [r for r in density if method in r["methods"]]
        if rows:
            axes[2].plot([r["n_truth"] for r in rows], [r["methods"][method]["total_seconds"] for r in rows], "o-",
                         color=color, label=method)
    axes[2].set(xlabel=f"sources in a {results.get('density_size', '?')}² image", ylabel="wall time (s)",
                title="time against source density")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"{m['cpu_model']}, torch {m['torch_threads']} threads"
                 + ("  [QUICK SMOKE TEST, NOT A BENCHMARK]" if results.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results, results_dir, plot_path=None):
    """Write benchmark.json, benchmark.md and (optionally) the plot; returns their paths."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if plot_path is not None:
        plot_scaling(results, plot_path)
        try:
            results["plot"] = os.path.relpath(Path(plot_path).resolve(), ROOT)
        except ValueError:
            results["plot"] = str(plot_path)
        if results["plot"].startswith(".."):
            results["plot"] = str(Path(plot_path).resolve())
    md = results_dir / "benchmark.md"
    md.write_text(render_markdown(results))
    js = results_dir / "benchmark.json"
    js.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    return {"json": js, "markdown": md, "plot": plot_path}


# --------------------------------------------------------------------------- main


def prepare_images(args):
    """Simulate every image a run with these arguments uses (each is written once and reused)."""
    for size in args.sizes:
        simulated_image(args.workdir, size=size)
    simulated_image(args.workdir, size=args.tile_size, n_bands=3)
    for d in args.densities:
        simulated_image(args.workdir, size=args.density_size, density=d, seed=SEED + 1, index=int(d))
    simulated_image(args.workdir, size=256, seed=SEED + 99)  # warm-up
    if args.ablation:
        simulated_image(args.workdir, size=args.ablation_size)
        simulated_image(args.workdir, size=args.ablation_size, density=20.0, seed=SEED + 2, blank_fraction=0.4)


def new_results(command, *, quick=False, repeats=1, single_pass_from=2048, refine_status="n/a"):
    """The results dict `render_markdown` expects, before any image is benchmarked."""
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(), "load_before": _load(), "quick": quick, "seed": SEED, "repeats": repeats,
            "single_pass_from": single_pass_from, "refine_status": refine_status,
            "has_signal": check_has_signal_used(), "scaling": [], "tiles": [], "density": [], "density_size": None,
            "gpu_status": "not run", "memory_method": None, "load_after": None, "duration_seconds": 0.0}


def _warm_up(deblenders, workdir):
    info = simulated_image(workdir, size=256, seed=SEED + 99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for deblender in deblenders.values():
            deblender.run(info["path"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="image sides in pixels")
    p.add_argument("--densities", type=float, nargs="*", default=None,
                   help="sources drawn per arcmin² for the density series (default 50 150 400 800; none to skip)")
    p.add_argument("--density-size", type=int, default=None, help="image side of the density series (default 768)")
    p.add_argument("--tile-size", type=int, default=None, help="side of the simulated 3-band tile (default 1024)")
    p.add_argument("--repeats", type=int, default=2, help="passes per image (median); see --single-pass-from")
    p.add_argument("--single-pass-from", type=int, default=2048, help="images this big or bigger run once")
    p.add_argument("--crosscheck-max", type=int, default=1024,
                   help="time Deblender.run for the sum-of-stages check on images up to this side")
    p.add_argument("--methods", nargs="+", default=["mask-rcnn", "photutils", "sep"],
                   choices=["mask-rcnn", "photutils", "sep"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, and CUDA as well when available")
    p.add_argument("--ablation", action="store_true", help="measure the optimisations too")
    p.add_argument("--ablation-size", type=int, default=None, help="side of the ablation images (default 768)")
    p.add_argument("--ablation-repeats", type=int, default=2)
    p.add_argument("--quality-scenes", type=int, default=None, help="ablation quality scenes (default 20)")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile to the ablation (compiling takes minutes on a small CPU)")
    p.add_argument("--no-realdata", action="store_true", help="leave the real DECaLS tile out")
    p.add_argument("--prepare-only", action="store_true",
                   help="only simulate the images into --workdir (reused later), e.g. while the machine is busy")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small defaults, outputs to /tmp/deblend_benchmark_quick, marked as such")
    p.add_argument("--workdir", default=None, help="simulated images and outputs (default runs/benchmark)")
    p.add_argument("--results-dir", default=None, help="default pipelines/results (quick: /tmp/...)")
    p.add_argument("--plot", default=None, help="default docs/benchmark_scaling.png (quick: /tmp/...)")
    args = p.parse_args(argv)
    quick_dir = Path("/tmp/deblend_benchmark_quick")
    if args.densities is None:
        args.densities = [50.0, 400.0] if args.quick else list(DEFAULT_DENSITIES)
    args.density_size = args.density_size or (256 if args.quick else 768)
    args.tile_size = args.tile_size or (256 if args.quick else 1024)
    args.ablation_size = args.ablation_size or (256 if args.quick else 768)
    args.quality_scenes = args.quality_scenes or (3 if args.quick else 20)
    args.workdir = Path(args.workdir or (quick_dir / "work" if args.quick else ROOT / "runs" / "benchmark"))
    args.results_dir = Path(args.results_dir or (quick_dir if args.quick else ROOT / "pipelines" / "results"))
    args.plot = Path(args.plot or (quick_dir / "benchmark_scaling.png" if args.quick
                                   else ROOT / "docs" / "benchmark_scaling.png"))
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("deblend").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    t_start = time.perf_counter()
    workdir = args.workdir
    outdir = workdir / "out"
    if args.prepare_only:
        prepare_images(args)
        log.info("simulated the images into %s in %.0f s", workdir, time.perf_counter() - t_start)
        return None
    deblenders, refine = make_deblenders(args.methods)
    log.info("refine stage: %s", refine["status"])
    command = "python pipelines/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = new_results(command, quick=args.quick, repeats=args.repeats, single_pass_from=args.single_pass_from,
                          refine_status=refine["status"])
    load, cpus = results["load_before"], results["machine"]["usable_cpus"]
    if load and cpus and load[0] > 0.5 * cpus:
        log.warning("load average %s on %s CPUs: the machine is busy, timings will not be representative",
                    load, cpus)
    _warm_up(deblenders, workdir)
    threads_used = torch.get_num_threads()
    results["matmul"] = [matmul_flops(threads, n=1024 if args.quick else 2048)
                         for threads in sorted({1, threads_used})]

    scaling = []
    for size in args.sizes:
        info = simulated_image(workdir, size=size)
        r = benchmark_image(info["path"], deblenders=deblenders, outdir=outdir, refine=refine,
                            repeats=1 if size >= args.single_pass_from else args.repeats,
                            crosscheck=size <= args.crosscheck_max, label=f"{size}²")
        r.update(n_truth=info["n_truth"], density=info["density"])
        scaling.append(r)
    results["scaling"] = scaling

    tiles = []
    info = simulated_image(workdir, size=args.tile_size, n_bands=3)
    r = benchmark_image(info["path"], deblenders=deblenders, outdir=outdir, refine=refine, repeats=1,
                        crosscheck=True, label=f"simulated 3-band {args.tile_size}²")
    r.update(n_truth=info["n_truth"])
    tiles.append(r)
    real = [REALDATA / f"img_{b}.fits" for b in "grz"]
    if not args.no_realdata and all(p.exists() for p in real):
        r = benchmark_image(real, deblenders=deblenders, outdir=outdir, refine=refine, repeats=1, crosscheck=True,
                            label="DECaLS DR7 g,r,z 512² (real)")
        tiles.append(r)
    results["tiles"] = tiles

    results["density_size"] = args.density_size
    density = []
    for d in args.densities:
        info = simulated_image(workdir, size=args.density_size, density=d, seed=SEED + 1, index=int(d))
        r = benchmark_image(info["path"], deblenders=deblenders, outdir=outdir, refine=refine, repeats=1,
                            crosscheck=False, label=f"{d:g}/arcmin²")
        r.update(n_truth=info["n_truth"], density=d)
        density.append(r)
    results["density"] = density

    if "mask-rcnn" in deblenders:
        mask_rcnn = deblenders["mask-rcnn"]
        ref = next((r for r in scaling if r["shape"][0] == min(1024, max(args.sizes))), scaling[-1])
        ref_info = simulated_image(workdir, size=ref["shape"][0])
        flops = count_flops(ref_info["path"], mask_rcnn)
        detect_seconds = ref["methods"]["mask-rcnn"]["stages"]["detect"]["seconds"]
        flops["achieved"] = []
        for mm in results["matmul"]:
            row = {"threads": mm["threads"], "matmul_gflop_per_s": mm["flop_per_s"] / 1e9}
            if mm["threads"] == threads_used:
                row["detect_gflop_per_s"] = flops["image"]["gflop"] / detect_seconds
                row["fraction"] = row["detect_gflop_per_s"] / row["matmul_gflop_per_s"]
            flops["achieved"].append(row)
        flops["reference_image"] = ref["image"]
        if refine.get("mode") == "direct" and getattr(mask_rcnn, "refiner", None) is not None:
            flops["refine"] = count_refine_flops(ref_info["path"], mask_rcnn)
            refine_seconds = ref["methods"]["mask-rcnn"]["stages"].get("refine", {}).get("seconds")
            if refine_seconds:
                flops["refine"]["gflop_per_s"] = flops["refine"]["gflop"] / refine_seconds
                flops["refine"]["fraction"] = flops["refine"]["gflop_per_s"] / next(
                    mm["flop_per_s"] / 1e9 for mm in results["matmul"] if mm["threads"] == threads_used)
        results["flops"] = flops

        if args.ablation:
            images = [("standard", simulated_image(workdir, size=args.ablation_size))]
            images.append(("sparse, 40 % off-footprint", simulated_image(
                workdir, size=args.ablation_size, density=20.0, seed=SEED + 2, blank_fraction=0.4)))
            scenes = quality_scenes(args.quality_scenes)
            results["ablation"] = run_ablation([(lab, i["path"], i) for lab, i in images], scenes, mask_rcnn,
                                               repeats=args.ablation_repeats, quick=args.quick,
                                               compile_=args.compile)
            gflop = results["ablation"]["baseline_gflop_first_image"]
            for row in flops["achieved"]:  # the other thread counts' rates, from the ablation's standard image
                variant = next((v for v in results["ablation"]["variants"]
                                if v["variant"] == f"torch threads={row['threads']}" and "images" in v), None)
                if "detect_gflop_per_s" not in row and variant is not None and gflop:
                    row["detect_gflop_per_s"] = gflop / variant["images"]["standard"]["seconds"]
                    row["fraction"] = row["detect_gflop_per_s"] / row["matmul_gflop_per_s"]
                    row["note"] = (f"from the ablation's {args.ablation_size}² standard image "
                                   "(detect + mask NMS + labels)")

    want_cuda = args.device in ("auto", "cuda")
    if want_cuda and torch.cuda.is_available() and "mask-rcnn" in args.methods:
        gpu_deblenders, gpu_refine = make_deblenders(["mask-rcnn"], device="cuda")
        gpu_deblenders.update(make_deblenders(["mask-rcnn"], device="cuda", half=True)[0])  # --half
        _warm_up(gpu_deblenders, workdir)
        results["gpu"] = []
        for size in args.sizes:
            info = simulated_image(workdir, size=size)
            r = benchmark_image(info["path"], deblenders=gpu_deblenders, outdir=outdir, refine=gpu_refine,
                                repeats=1 if size >= args.single_pass_from else args.repeats,
                                crosscheck=size <= args.crosscheck_max, label=f"{size}²")
            r.update(n_truth=info["n_truth"])
            cpu = next((c for c in scaling if c["shape"] == r["shape"]), None)
            if cpu is not None:
                merged = {k: v for k, v in cpu["methods"].items() if not k.startswith("mask-rcnn")}
                r["ratios"] = _ratios({**r["methods"], **merged})
            results["gpu"].append(r)
        results["gpu_status"] = (f"Mask R-CNN and the probabilistic U-Net on {torch.cuda.get_device_name(0)} "
                                 "(`--device cuda`, in float32 and in float16 with `--half`); reading, "
                                 "preprocessing, the catalog and writing stay on the CPU.")
    elif args.device == "cpu":
        results["gpu_status"] = "Skipped: --device cpu."
    else:
        results["gpu_status"] = "Skipped: torch.cuda.is_available() is False on this machine."

    results["memory_method"] = PeakMemory.method
    results["load_after"] = _load()
    results["duration_seconds"] = time.perf_counter() - t_start
    paths = write_outputs(results, args.results_dir, args.plot)
    log.info("wrote %s, %s and %s in %.1f min", paths["json"], paths["markdown"], paths["plot"],
             results["duration_seconds"] / 60)
    return results


if __name__ == "__main__":
    main()
