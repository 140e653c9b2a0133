"""Run a `Deblender` over many FITS files: discovery, per-file isolation, manifest, resume.

One bad file never stops a batch: its error is recorded with the file's name
and no output is left for it; the other files go on.

Every input handled by a run gets one JSON line in ``OUTDIR/manifest.jsonl``,
appended (flushed and fsync'ed) as soon as that input finishes, so an
interrupted run loses nothing it had finished. ``resume=True`` reads the
manifest back and skips the inputs whose outputs are already up to date.

Where inputs are deblended: in this process (default; Dask is not imported),
on a local Dask cluster (``workers=N``) or on an existing one
(``scheduler=ADDRESS``). This process plans every input (output names,
conflicts, the earlier record for resume), the tasks run wherever Dask puts
them, and the records come back here, where alone the manifest is written,
so the manifest, failure handling and resume decisions are the same in all
three modes. Images larger than ``large_image_pixels`` are read
memory-mapped and deblended window by window (`deblend.largeimage`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import glob
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from deblend import largeimage
from deblend._version import __version__
from deblend.exceptions import InputError
from deblend.io import FITS_SUFFIXES, file_checksum, fits_stem, read_header
from deblend.largeimage import LARGE_IMAGE_PIXELS
from deblend.result import output_paths

__all__ = ["discover_inputs", "run_batch", "read_manifest", "FileRecord", "BatchSummary", "is_fits_name",
           "MANIFEST_NAME", "REGIONS_SUFFIX"]

log = logging.getLogger(__name__)

#: Name of the manifest written into the output directory.
MANIFEST_NAME = "manifest.jsonl"
#: Suffix of the DS9 region files written with ``regions=True`` (``<stem>.reg``).
REGIONS_SUFFIX = ".reg"

# error_type of failures that refused an input before deblending it: they say nothing
# about the outputs already on disk, so --resume looks past them
_REFUSALS = ("OutputExists", "OutputConflict")


def is_fits_name(path):
    """True when a file name ends with a FITS suffix (``.fits``, ``.fit``, ``.fits.gz``, ``.fz``, ...)."""
    return str(path).lower().endswith(FITS_SUFFIXES)


def _is_output_or_truth(path):
    stem = fits_stem(path)
    return stem.endswith(("_seg", "_truth_seg", "_truth", "_cat"))


def discover_inputs(inputs, *, recursive=True):
    """Expand files and directories into a sorted list of FITS inputs.

    Directories are searched (recursively by default) for files with FITS
    suffixes; deblend's own outputs and simulation truth files
    (``*_seg``, ``*_cat``, ``*_truth``, ``*_truth_seg``) are skipped there.
    Files named explicitly are always kept, whatever their name, so that a
    non-FITS file given by name is reported as an error rather than ignored.

    Parameters
    ----------
    inputs : sequence of str or os.PathLike
    recursive : bool, optional

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        ``(file, base)`` pairs, where ``base`` is the directory the file was
        found under (outputs mirror the file's path relative to it), or the
        file's own directory for files named explicitly.

    Raises
    ------
    FileNotFoundError
        If an input does not exist.
    """
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for candidate in sorted(path.glob(pattern)):
                if candidate.is_file() and is_fits_name(candidate) and not _is_output_or_truth(candidate):
                    found.append((candidate, path))
        elif path.exists():
            found.append((path, path.parent))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    unique, seen = [], set()
    for path, base in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, base))
    return unique


@dataclass
class FileRecord:
    """What happened to one input: one line of ``manifest.jsonl``.

    Attributes
    ----------
    path : str
        The input as given (the first file when bands are given together).
    status : {'ok', 'failed', 'skipped'}
        ``skipped``: resumed, its outputs were already up to date.
    n_sources : int
        Sources in its outputs (for ``skipped``, those of the earlier run).
    duration : float
        Seconds spent on it (checksum, deblending, writing).
    error : str
        Why it failed, naming the file; empty otherwise.
    outputs : dict
        ``{'segmentation': str, 'catalog': str}`` when it has outputs.
    checksum : str
        SHA-256 of the input file's bytes (of all its files in order for bands).
    config : dict
        `deblend.pipeline.Deblender.config` (method, options, weights id, ...).
    format : str
        Catalog format.
    timestamp : str
        UTC time (ISO 8601) at which the input finished.
    error_type : str
        Kind of failure: the exception's class name (``InputError``, ...),
        ``OutputExists`` or ``OutputConflict`` when it was refused before deblending.
    version : str
        Version of deblend that handled it.
    """

    path: str
    status: str
    n_sources: int = 0
    duration: float = 0.0
    error: str = ""
    outputs: dict = field(default_factory=dict)
    checksum: str = ""
    config: dict = field(default_factory=dict)
    format: str = ""
    timestamp: str = ""
    error_type: str = ""
    version: str = __version__

    def to_dict(self):
        """The record as a JSON-serialisable dict (one manifest line)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build a record from a manifest line's dict (unknown keys are ignored).

        Parameters
        ----------
        data : dict

        Returns
        -------
        FileRecord
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class BatchSummary:
    """All records of a batch run.

    Attributes
    ----------
    records : list of FileRecord
        One per input, in processing order.
    manifest : str or None
        The manifest the records were appended to (None when nothing was recorded).
    """

    records: list
    manifest: str | None = None

    @property
    def n_ok(self):
        """Number of inputs deblended in this run."""
        return sum(r.status == "ok" for r in self.records)

    @property
    def failed(self):
        """Records of the inputs that failed."""
        return [r for r in self.records if r.status == "failed"]

    @property
    def skipped(self):
        """Records of the inputs skipped because their outputs were up to date (resume)."""
        return [r for r in self.records if r.status == "skipped"]

    @property
    def n_sources(self):
        """Sources found over the inputs deblended in this run."""
        return sum(r.n_sources for r in self.records if r.status == "ok")

    def report(self):
        """A short human-readable summary (one line per failure)."""
        line = (f"{self.n_ok} of {len(self.records)} inputs deblended, {self.n_sources} sources, "
                f"{len(self.failed)} failed")
        if self.skipped:
            line += f", {len(self.skipped)} skipped (already done)"
        return "\n".join([line] + [f"  FAILED {r.error}" for r in self.failed])


def read_manifest(outdir):
    """Read the records of ``OUTDIR/manifest.jsonl``, oldest first.

    A line that cannot be parsed (e.g. cut short by a crash while it was being
    written) is skipped with a warning.

    Parameters
    ----------
    outdir : str or os.PathLike
        Output directory of `run_batch` (or the manifest file itself).

    Returns
    -------
    list of FileRecord
        Empty when there is no manifest.
    """
    path = Path(outdir)
    if path.is_dir() or not path.exists():
        path = path / MANIFEST_NAME
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(FileRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                warnings.warn(f"{path}:{number}: unreadable manifest line skipped ({exc})", stacklevel=2)
    return records


class _Manifest:
    """Append-only JSON-lines writer, opened on the first record; every line is flushed and fsync'ed.

    A manifest that cannot be written (read-only or full disk) is reported once
    and the batch goes on: the outputs are what matters, the records only save
    work on resume.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.written = False
        self._fh = None
        self._broken = False

    def append(self, record):
        if self._broken:
            return
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8")
                if self._fh.tell() > 0:  # a crash may have cut the last line short: never glue onto it
                    with open(self.path, "rb") as fh:
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            self._fh.write("\n")
            self._fh.write(json.dumps(record.to_dict(), default=str, ensure_ascii=False) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.written = True
        except OSError as exc:
            self._broken = True
            log.error("cannot write the manifest %s (%s); the batch goes on without it, and a later "
                      "--resume will redo the inputs it could not record", self.path, exc)

    def close(self):
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None


class _History:
    """What earlier runs recorded: the latest decisive record per input, the latest ok per output."""

    def __init__(self, records):
        self.by_input = {}
        self.by_output = {}
        for record in records:
            if record.status == "skipped" or record.error_type in _REFUSALS:
                continue  # neither changed the outputs on disk
            self.by_input[_resolved(record.path)] = record
            if record.status == "ok" and "segmentation" in record.outputs:
                self.by_output[_resolved(record.outputs["segmentation"])] = record

    def candidate(self, path, expected):
        """The latest ok record of this input if it wrote ``expected`` and nothing replaced them since, or None.

        Whether the outputs are still valid (same checksum, configuration and
        format; files present) is decided where the input is handled, by
        `_still_valid`, since the checksum is computed there.
        """
        record = self.by_input.get(_resolved(path))
        if record is None or record.status != "ok":
            return None
        if {k: _resolved(v) for k, v in record.outputs.items()} != {k: _resolved(v) for k, v in expected.items()}:
            return None
        if self.by_output.get(_resolved(expected["segmentation"])) is not record:
            return None  # another input wrote these outputs since
        return record


def _still_valid(previous, expected, *, checksum, config, format):
    """Whether the outputs of an earlier ok record are up to date for this input."""
    if previous is None:
        return False
    if (previous.checksum, previous.config, previous.format) != (checksum, config, format):
        return False
    return all(Path(p).exists() for p in expected.values())


def _resolved(path):
    return str(Path(path).resolve())


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _config(deblender):
    """The deblender's configuration, normalised by a JSON round trip so that it compares with the manifest's."""
    return json.loads(json.dumps(deblender.config(), default=str))


def _output_dir(outdir, path, base):
    try:
        rel = path.parent.resolve().relative_to(base.resolve())
    except ValueError:
        rel = Path()
    target = (Path(outdir) / rel).resolve()
    root = Path(outdir).resolve()
    if root != target and root not in target.parents:  # never write outside OUTDIR
        target = root
    return target


def _expected_outputs(target, stem, *, format, regions, quicklook=False):
    """Every output of one input: segmentation map, catalog, DS9 regions and quick-look PNG (when asked for)."""
    expected = output_paths(target, stem, format=format, quicklook=quicklook)
    if regions:
        expected["regions"] = Path(target) / f"{stem}{REGIONS_SUFFIX}"
    return expected


def _exists_message(first, existing):
    names = ", ".join(str(p) for p in existing)
    return (f"{first}: output exists ({names}); use --resume (resume=True) to skip inputs already done "
            "or --overwrite (overwrite=True) to redo them")


@dataclass(frozen=True)
class _Task:
    """One input to handle, as the client planned it; sent to a Dask worker as it is.

    ``mode`` is ``'refuse'`` (fail when outputs exist), ``'overwrite'`` or
    ``'resume'`` (skip when ``previous`` is still valid, else redo).
    """

    index: int
    files: tuple
    target: str
    stem: str
    expected: dict
    config: dict
    format: str
    mode: str
    previous: FileRecord | None
    read_options: dict
    regions: bool
    quicklook: bool = False
    large_image_pixels: int | None = None


def _windowed(task):
    """Whether this input is one image large enough to be deblended window by window (not gzip: no memmap)."""
    if task.large_image_pixels is None or len(task.files) != 1 or task.files[0].lower().endswith(".gz"):
        return False
    try:
        header = read_header(task.files[0], hdu=task.read_options.get("hdu"))
    except InputError:
        return False  # deblending it reports why
    naxis = header.get("ZNAXIS", header.get("NAXIS", 0))
    ny, nx = (header.get(f"ZNAXIS{i}", header.get(f"NAXIS{i}", 0)) for i in (2, 1))
    return naxis >= 2 and ny * nx > task.large_image_pixels


def _process(deblender, task, windowed=False):
    """Deblend one input (one file, or several files as bands) and write its outputs.

    Returns a dict of `FileRecord` fields.
    """
    first = task.files[0]
    files = [Path(f) for f in task.files]
    overwrite = task.mode != "refuse"  # resume redoes what is not up to date, so it replaces stale outputs too
    try:
        if windowed:
            result = largeimage.run_windowed(files[0], deblender, window_size=largeimage.WINDOW_SIZE,
                                             margin=largeimage.WINDOW_MARGIN, hdu=task.read_options.get("hdu"),
                                             mask_bits=task.read_options.get("mask_bits"))
        else:
            result = deblender.run(files if len(files) > 1 else files[0], **task.read_options)
        outputs = result.write(task.target, stem=task.stem, format=task.format, overwrite=overwrite,
                               quicklook=task.quicklook)
        if task.regions:
            from deblend.regions import write_regions

            outputs["regions"] = write_regions(result.catalog, task.expected["regions"], wcs=result.image.wcs,
                                               overwrite=True)
    except InputError as exc:
        return {"status": "failed", "error": str(exc), "error_type": "InputError"}
    except FileExistsError:
        existing = [p for p in task.expected.values() if Path(p).exists()]
        return {"status": "failed", "error": _exists_message(first, existing), "error_type": "OutputExists"}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one bad file never stops a batch; the error names it
        log.debug("unexpected failure on %s", first, exc_info=True)
        return {"status": "failed", "error": f"{first}: {type(exc).__name__}: {exc}",
                "error_type": type(exc).__name__}
    return {"status": "ok", "n_sources": result.n_sources, "outputs": {k: str(v) for k, v in outputs.items()}}


def _malloc_trim():
    """The C library's ``malloc_trim`` (glibc), or None where there is none (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def _release_memory():
    """Hand the heap memory freed by the last input back to the operating system.

    Each input leaves behind freed blocks of its own sizes (tensors and arrays
    of that image's shapes, that many detections) in glibc's arenas, which a
    long-running process keeps resident and reuses only in part, so its RSS
    creeps up over thousands of files (pipelines/soak.py measured it in Dask
    workers). ``malloc_trim(0)`` returns those free pages; it is cheap next
    to deblending a file. A no-op on C libraries without it. Returns whether
    memory was released.
    """
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


def _execute(task, deblender):
    """Everything that happens to one planned input, wherever it runs; returns its `FileRecord`.

    The memory the input's deblending freed is given back afterwards (`_release_memory`).
    """
    try:
        return _execute_one(task, deblender)
    finally:
        _release_memory()


def _execute_one(task, deblender):
    start = time.perf_counter()
    first = task.files[0]
    checksum = ""
    config = task.config

    def record(status, **fields_):
        return FileRecord(str(first), status, duration=time.perf_counter() - start, checksum=checksum,
                          config=config, format=task.format, timestamp=_now(), **fields_)

    try:
        checksum = file_checksum(task.files)
    except OSError as exc:
        return record("failed", error=f"{first}: cannot be read ({exc})", error_type=type(exc).__name__)
    windowed = _windowed(task)
    if windowed:  # its outputs depend on the windows too
        config = {**config, "windows": {"size": largeimage.WINDOW_SIZE, "margin": largeimage.WINDOW_MARGIN}}
    if task.mode == "resume":
        if _still_valid(task.previous, task.expected, checksum=checksum, config=config, format=task.format):
            log.info("%s: outputs up to date, skipped", first)
            return record("skipped", n_sources=task.previous.n_sources, outputs=dict(task.previous.outputs))
    elif task.mode == "refuse":
        existing = [p for p in task.expected.values() if Path(p).exists()]
        if existing:  # refuse before spending time on deblending
            return record("failed", error=_exists_message(first, existing), error_type="OutputExists")
    return record(**_process(deblender, task, windowed))


def _plan(groups, outdir, *, config, format, mode, history, read_options, regions, quicklook=False,
          large_image_pixels=None):
    """Turn input groups into `_Task` objects, or `FileRecord` objects for inputs refused here.

    Output conflicts within the run are decided here, in input order, so they
    are the same however the tasks are executed.
    """
    claimed = {}  # output (directory, stem) -> the input that owns it in this run
    items = []
    for index, group in enumerate(groups):
        first, base = group[0]
        target, stem = _output_dir(outdir, first, base), fits_stem(first)
        if (target, stem) in claimed:  # e.g. a/x.fits and b/x.fits, or x.fits and x.fits.gz
            items.append(FileRecord(
                str(first), "failed", config=config, format=format, timestamp=_now(), error_type="OutputConflict",
                error=f"{first}: its outputs {stem}_seg/_cat would replace those of {claimed[(target, stem)]} in "
                      "this run; rename one or run them into different output directories"))
            continue
        claimed[(target, stem)] = first
        expected = {k: str(v) for k, v in _expected_outputs(target, stem, format=format, regions=regions,
                                                            quicklook=quicklook).items()}
        previous = history.candidate(first, expected) if history is not None else None
        items.append(_Task(index=index, files=tuple(str(p) for p, _ in group), target=str(target), stem=stem,
                           expected=expected, config=config, format=format, mode=mode, previous=previous,
                           read_options=dict(read_options), regions=regions, quicklook=quicklook,
                           large_image_pixels=large_image_pixels))
    return items


# ---------------------------------------------------------------------------------------------- execution


def _serial_results(items, deblender):
    """Yield ``(item, record)`` in input order, deblending in this process."""
    for item in items:
        if isinstance(item, FileRecord):
            yield item, item
        else:
            yield item, _execute(item, deblender)


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError("workers= and scheduler= (deblend run --workers/--scheduler) need Dask, which is not "
                          'installed; install it with: pip install "deblend[parallel]"') from exc
    return distributed


# Per worker process: the torch threads each task uses.
_WORKER_STATE = {"torch_threads": None}


def _setup_worker(n_threads, ignore_interrupts=False):
    """Run on each Dask worker: torch threads per task (applied now if torch is loaded, else when it is).

    Workers of a local cluster ignore Ctrl-C (the terminal sends it to them
    too): the client stops them and clears what they leave behind.
    """
    _WORKER_STATE["torch_threads"] = int(n_threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(n_threads))
    if ignore_interrupts and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return int(n_threads)


def _visible_cores():
    """Cores this process may run on (respects affinity and cgroup cpusets, e.g. under SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_task(deblender, task):
    """Dask task: one input on a worker.

    ``deblender`` is the client's, sent once to each worker (scattered), so a
    worker deserialises it, and loads its model, once per run; the torch
    threads chosen for the worker are applied to it here, after torch was
    imported with the model.
    """
    threads = _WORKER_STATE["torch_threads"]
    torch = sys.modules.get("torch")
    if threads and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return _execute(task, deblender)


class _DaskExecutor:
    """Run tasks on a local Dask cluster (``workers``) or an existing one (``scheduler``).

    The client submits one task per input and collects the records as they
    finish; only the client writes the manifest.
    """

    def __init__(self, *, workers=None, scheduler=None):
        self.workers = workers
        self.scheduler = scheduler
        self.client = None
        self.cluster = None
        self.owns_client = True
        self.in_flight = {}

    def __enter__(self):
        distributed = _import_distributed()
        # distributed logs its start-up and shut-down at INFO; they would reach the root logger's handlers
        # (and the user's terminal) through propagation, which LocalCluster(silence_logs=...) does not stop
        dask_log = logging.getLogger("distributed")
        self._log_level = dask_log.level
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            dask_log.setLevel(max(dask_log.getEffectiveLevel(), logging.WARNING))
        try:
            self._connect(distributed)
            self._set_threads()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _connect(self, distributed):
        if self.workers is not None:
            import dask

            # One task per worker process at a time; torch gets the cores divided among the workers.
            # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap
            # threshold: every large array is then mmap'ed and unmapped again, and a file takes
            # 1.4-1.6x as long (pipelines/results/batch_throughput.md); the workers here keep glibc's
            # default (a user's own setting of the variable still wins). Dask's statistical profiler
            # samples each worker's stack every 10 ms and keeps one call tree per second for the last
            # 1000 s (distributed.admin.low-level-log-length); with torch's deep stacks a worker's memory
            # grew with the run's duration (pipelines/soak.py), so it is off.
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                                  "distributed.worker.profile.enabled": False}):
                self.cluster = distributed.LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                                        processes=True, dashboard_address=":0")
            self.client = distributed.Client(self.cluster)
        elif isinstance(self.scheduler, distributed.Client):
            self.client, self.owns_client = self.scheduler, False
        else:
            try:
                self.client = distributed.Client(self.scheduler, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise ConnectionError(f"scheduler={self.scheduler!r}: cannot connect to the Dask scheduler ({exc}); "
                                      "check the address (e.g. tcp://host:8786) and that the scheduler runs") from exc

    def _set_threads(self):
        """Torch threads per task = the host's cores divided by the tasks that run at once on that host."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        cores = self.client.run(_visible_cores)
        per_host = {}
        for info in workers.values():
            per_host[info["host"]] = per_host.get(info["host"], 0) + int(info["nthreads"])
        by_threads = {}
        for address, info in workers.items():
            n = max(1, cores.get(address, 1) // max(1, per_host[info["host"]]))
            by_threads.setdefault(n, []).append(address)
        for n, addresses in by_threads.items():
            self.client.run(_setup_worker, n, self.cluster is not None, workers=addresses)
        log.info("Dask: %d workers, %s torch threads per task", len(workers),
                 "/".join(str(n) for n in sorted(by_threads)) or "no")

    def results(self, items, deblender):
        """Yield ``(item, record)`` as inputs finish (refused inputs first)."""
        distributed = _import_distributed()
        tasks = [item for item in items if not isinstance(item, FileRecord)]
        for item in items:
            if isinstance(item, FileRecord):
                yield item, item
        if not tasks:
            return
        # one copy of the configured deblender (with its model) per worker, not one per task
        shared = self.client.scatter(deblender, broadcast=True, hash=False)
        run_id = uuid.uuid4().hex[:8]
        for task in tasks:
            future = self.client.submit(_run_task, shared, task, key=f"deblend-{run_id}-{task.index}", pure=False)
            self.in_flight[future] = task
        for future in distributed.as_completed(list(self.in_flight)):
            task = self.in_flight.pop(future)
            try:
                record = future.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # the worker died (e.g. out of memory) or the task could not run
                record = _lost_record(task, exc)
            yield task, record

    def __exit__(self, exc_type, exc, tb):
        interrupted = exc_type is not None
        if interrupted and self.in_flight and self.cluster is None:  # a local cluster is closed below anyway
            self.client.cancel(list(self.in_flight), force=True)
        if self.owns_client and self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
            if interrupted:  # the worker processes are gone: clear what their atomic writes left behind
                for task in self.in_flight.values():
                    _remove_temporaries(task.expected.values())
        logging.getLogger("distributed").setLevel(self._log_level)
        return False


def _lost_record(task, exc):
    """The record of a task whose result never came back from the cluster."""
    first = task.files[0]
    name = type(exc).__name__
    hint = " (the worker died: out of memory? see the worker logs)" if name == "KilledWorker" else ""
    return FileRecord(first, "failed", error=f"{first}: {name}: {exc}{hint}", error_type=name,
                      config=task.config, format=task.format, timestamp=_now())


def _remove_temporaries(paths):
    """Remove the temporary files that `deblend.io.atomic_path` may have left for ``paths``."""
    for path in map(Path, paths):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                log.debug("removed %s", tmp)


def _check_parallel(workers, scheduler):
    if workers is not None and scheduler is not None:
        raise ValueError(f"workers={workers!r} and scheduler={scheduler!r} exclude each other: workers starts a "
                         "local Dask cluster, scheduler uses an existing one; pass one of them")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer (local Dask worker processes), got {workers!r}; "
                         "leave it None to deblend in this process")
    if isinstance(scheduler, str) and not scheduler.strip():
        raise ValueError(f"scheduler must be a Dask scheduler address such as 'tcp://host:8786', got {scheduler!r}")


def run_batch(inputs, outdir, deblender, *, format="fits", overwrite=False, resume=False, as_bands=False,
              recursive=True, progress=None, read_options=None, regions=False, workers=None, scheduler=None,
              quicklook=False, large_image_pixels=LARGE_IMAGE_PIXELS):
    """Deblend every FITS input and write ``<stem>_seg.fits`` and ``<stem>_cat.<ext>``.

    Each input handled gets a record in ``OUTDIR/manifest.jsonl``, appended
    (flushed and fsync'ed) as soon as it finishes. On KeyboardInterrupt the
    input in progress leaves no file behind (writes are atomic), the finished
    outputs and their records stay, and the interrupt is re-raised; a run with
    ``resume=True`` then does the rest.

    Inputs are deblended in this process by default; ``workers`` starts a
    local Dask cluster and ``scheduler`` uses an existing one. The outputs,
    the manifest (written by this process only), the failure handling and
    the resume decisions are the same in every mode; with Dask, records are
    appended in the order inputs finish, and the output directory must be
    on a file system that the workers and this process share.

    Parameters
    ----------
    inputs : sequence of str or os.PathLike
        Files and/or directories (searched for FITS files).
    outdir : str or os.PathLike
        Output directory; files found under an input directory keep their
        relative sub-directory.
    deblender : deblend.pipeline.Deblender
        The configured method. With Dask it is sent once to each worker
        (one model load per worker process), so the workers need no access
        to its weights files.
    format : {'fits', 'ecsv', 'csv', 'parquet', 'votable'}, optional
        Catalog format.
    overwrite : bool, optional
        Redo every input, replacing existing outputs. Without ``overwrite``
        or ``resume``, an input whose outputs exist fails with a message.
    resume : bool, optional
        Skip (status ``skipped``) the inputs whose outputs exist and whose
        latest record in the manifest is ``ok`` with the same input checksum,
        configuration and format; redo the others (failed, changed, new),
        replacing their outputs. Inputs are identified by their absolute path.
    as_bands : bool, optional
        Treat all inputs as single-band images of one field (one output,
        named after the first file).
    recursive : bool, optional
        Search input directories recursively.
    progress : bool or None, optional
        Show a progress bar (files, files/s, sources, failures); None shows
        one when there is more than one input.
    read_options : dict, optional
        Passed to `deblend.io.read_image` (``hdu``, ``mask_bits``, ...).
    regions : bool, optional
        Also write ``<stem>.reg``, a DS9 region file with one ellipse per
        source (see `deblend.regions.write_regions`).
    workers : int, optional
        Start a local Dask cluster of this many worker processes, one task
        at a time each; each task's torch gets ``cores // workers`` threads.
        Needs ``pip install "deblend[parallel]"``.
    scheduler : str or distributed.Client, optional
        Use an existing Dask cluster: its scheduler address (e.g.
        ``'tcp://host:8786'``), or a connected ``distributed.Client`` (which
        is left open). Torch threads per task are each host's cores divided
        by the tasks its workers run at once.
    quicklook : bool, optional
        Also write ``<stem>_quicklook.png`` (the image with the segmentation
        outlines, see `deblend.result.DeblendResult.write`). A quick-look
        that cannot be made is logged as a warning and does not fail the
        input; ``resume`` then makes it again.
    large_image_pixels : int or None, optional
        A single (not gzip-compressed) image with more pixels than this is
        read memory-mapped and deblended window by window
        (`deblend.largeimage.run_windowed`), so that peak memory stays that
        of one window; its record's ``config`` then has a ``windows`` entry.
        Default 4096 × 4096; None reads every image whole.

    Returns
    -------
    BatchSummary
        Records in input order.

    Raises
    ------
    ValueError
        If both ``overwrite`` and ``resume`` are set, both ``workers`` and
        ``scheduler``, ``workers`` is not a positive integer, or ``format``
        is unknown.
    FileNotFoundError
        If an input does not exist.
    ImportError
        If ``workers`` or ``scheduler`` is given and Dask is not installed.
    ConnectionError
        If the scheduler cannot be reached.
    KeyboardInterrupt
        Re-raised after the records of the finished inputs were written.
    """
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: overwrite=True redoes every input, "
                         "resume=True skips the inputs already done; pass one of them")
    _check_parallel(workers, scheduler)
    if large_image_pixels is not None and (isinstance(large_image_pixels, bool) or large_image_pixels < 1):
        raise ValueError(f"large_image_pixels must be a positive number of pixels or None, got {large_image_pixels!r}")
    output_paths(outdir, "x", format=format)  # validates format
    found = discover_inputs(inputs, recursive=recursive)
    groups = [found] if as_bands and found else [[item] for item in found]
    if progress is None:
        progress = len(groups) > 1
    manifest = _Manifest(Path(outdir) / MANIFEST_NAME)
    history = _History(read_manifest(outdir)) if resume else None
    config = _config(deblender) if groups else {}
    mode = "resume" if resume else "overwrite" if overwrite else "refuse"
    items = _plan(groups, outdir, config=config, format=format, mode=mode, history=history,
                  read_options=read_options or {}, regions=regions, quicklook=quicklook,
                  large_image_pixels=large_image_pixels)
    parallel = (workers is not None or scheduler is not None) and any(isinstance(i, _Task) for i in items)
    executor = _DaskExecutor(workers=workers, scheduler=scheduler) if parallel else contextlib.nullcontext()
    records = {}
    n_sources = n_failed = n_skipped = 0
    try:
        with logging_redirect_tqdm(), tqdm(total=len(groups), unit="file", disable=not progress, desc="deblend",
                                           dynamic_ncols=True) as bar, executor:
            stream = executor.results(items, deblender) if parallel else _serial_results(items, deblender)
            for item, record in stream:
                manifest.append(record)
                records[id(item)] = record
                n_sources += record.n_sources if record.status == "ok" else 0
                n_failed += record.status == "failed"
                n_skipped += record.status == "skipped"
                if record.status == "failed":
                    log.error("%s", record.error)
                bar.update(1)
                bar.set_postfix(sources=n_sources, failed=n_failed, skipped=n_skipped)
    except KeyboardInterrupt:
        pending = len(groups) - len(records)
        log.warning("interrupted after %d of %d inputs (%d not finished, they left no output); the finished "
                    "outputs and their records in %s are kept", len(records), len(groups), pending, manifest.path)
        raise
    finally:
        manifest.close()
    ordered = [records[id(item)] for item in items if id(item) in records]
    return BatchSummary(ordered, manifest=str(manifest.path) if manifest.written else None)
