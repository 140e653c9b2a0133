"""Run a `Deblender` over many FITS files: discovery, per-file isolation, manifest, resume.

One bad file never stops a batch: its error is recorded with the file's name
and no output is left for it; the other files go on.

Every input handled by a run gets one JSON line in ``OUTDIR/manifest.jsonl``,
appended (flushed and fsync'ed) as soon as that input finishes, so an
interrupted run loses nothing it had finished. ``resume=True`` reads the
manifest back and skips the inputs whose outputs are already up to date.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from deblend._version import __version__
from deblend.exceptions import InputError
from deblend.io import FITS_SUFFIXES, file_checksum, fits_stem
from deblend.result import output_paths

__all__ = ["discover_inputs", "run_batch", "read_manifest", "FileRecord", "BatchSummary", "is_fits_name",
           "MANIFEST_NAME"]

log = logging.getLogger(__name__)

#: Name of the manifest written into the output directory.
MANIFEST_NAME = "manifest.jsonl"

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

    def up_to_date(self, path, expected, *, checksum, config, format):
        """The ok record whose outputs are ``expected`` and still valid for this input, or None."""
        record = self.by_input.get(_resolved(path))
        if record is None or record.status != "ok":
            return None
        if (record.checksum, record.config, record.format) != (checksum, config, format):
            return None
        if {k: _resolved(v) for k, v in record.outputs.items()} != {k: _resolved(v) for k, v in expected.items()}:
            return None
        if self.by_output.get(_resolved(expected["segmentation"])) is not record:
            return None  # another input wrote these outputs since
        if not all(Path(p).exists() for p in expected.values()):
            return None
        return record


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


def _exists_message(first, existing):
    names = ", ".join(str(p) for p in existing)
    return (f"{first}: output exists ({names}); use --resume (resume=True) to skip inputs already done "
            "or --overwrite (overwrite=True) to redo them")


def _process(deblender, files, target, stem, *, format, overwrite, read_options):
    """Deblend one input (one file, or several files as bands) and write its outputs.

    Returns a dict of `FileRecord` fields.
    """
    first = files[0]
    try:
        result = deblender.run(files if len(files) > 1 else files[0], **read_options)
        outputs = result.write(target, stem=stem, format=format, overwrite=overwrite)
    except InputError as exc:
        return {"status": "failed", "error": str(exc), "error_type": "InputError"}
    except FileExistsError:
        existing = [p for p in output_paths(target, stem, format=format).values() if p.exists()]
        return {"status": "failed", "error": _exists_message(first, existing), "error_type": "OutputExists"}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one bad file never stops a batch; the error names it
        log.debug("unexpected failure on %s", first, exc_info=True)
        return {"status": "failed", "error": f"{first}: {type(exc).__name__}: {exc}",
                "error_type": type(exc).__name__}
    return {"status": "ok", "n_sources": result.n_sources, "outputs": {k: str(v) for k, v in outputs.items()}}


def _handle(group, outdir, deblender, *, config, format, overwrite, history, claimed, read_options):
    """Everything that happens to one input; returns its `FileRecord`."""
    start = time.perf_counter()
    first, base = group[0]
    files = [p for p, _ in group]
    target, stem = _output_dir(outdir, first, base), fits_stem(first)
    expected = output_paths(target, stem, format=format)
    checksum = ""

    def record(status, **fields_):
        return FileRecord(str(first), status, duration=time.perf_counter() - start, checksum=checksum,
                          config=config, format=format, timestamp=_now(), **fields_)

    try:
        checksum = file_checksum(files)
    except OSError as exc:
        return record("failed", error=f"{first}: cannot be read ({exc})", error_type=type(exc).__name__)
    if (target, stem) in claimed:  # e.g. a/x.fits and b/x.fits, or x.fits and x.fits.gz
        return record("failed", error_type="OutputConflict",
                      error=f"{first}: its outputs {stem}_seg/_cat would replace those of "
                            f"{claimed[(target, stem)]} in this run; rename one or run them into "
                            "different output directories")
    claimed[(target, stem)] = first
    if history is not None:
        done = history.up_to_date(first, expected, checksum=checksum, config=config, format=format)
        if done is not None:
            log.info("%s: outputs up to date, skipped", first)
            return record("skipped", n_sources=done.n_sources, outputs=dict(done.outputs))
    elif not overwrite:
        existing = [p for p in expected.values() if p.exists()]
        if existing:  # refuse before spending time on deblending
            return record("failed", error=_exists_message(first, existing), error_type="OutputExists")
    # resume redoes what is not up to date, so it replaces stale outputs too
    return record(**_process(deblender, files, target, stem, format=format,
                             overwrite=overwrite or history is not None, read_options=read_options))


def run_batch(inputs, outdir, deblender, *, format="fits", overwrite=False, resume=False, as_bands=False,
              recursive=True, progress=None, read_options=None):
    """Deblend every FITS input and write ``<stem>_seg.fits`` and ``<stem>_cat.<ext>``.

    Each input handled gets a record in ``OUTDIR/manifest.jsonl``, appended
    (flushed and fsync'ed) as soon as it finishes. On KeyboardInterrupt the
    input in progress leaves no file behind (writes are atomic), the finished
    outputs and their records stay, and the interrupt is re-raised; a run with
    ``resume=True`` then does the rest.

    Parameters
    ----------
    inputs : sequence of str or os.PathLike
        Files and/or directories (searched for FITS files).
    outdir : str or os.PathLike
        Output directory; files found under an input directory keep their
        relative sub-directory.
    deblender : deblend.pipeline.Deblender
        The configured method.
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
        Show a progress bar; None shows one when there is more than one input.
    read_options : dict, optional
        Passed to `deblend.io.read_image` (``hdu``, ``mask_bits``, ...).

    Returns
    -------
    BatchSummary

    Raises
    ------
    ValueError
        If both ``overwrite`` and ``resume`` are set, or ``format`` is unknown.
    FileNotFoundError
        If an input does not exist.
    KeyboardInterrupt
        Re-raised after the records of the finished inputs were written.
    """
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: overwrite=True redoes every input, "
                         "resume=True skips the inputs already done; pass one of them")
    output_paths(outdir, "x", format=format)  # validates format
    found = discover_inputs(inputs, recursive=recursive)
    groups = [found] if as_bands and found else [[item] for item in found]
    if progress is None:
        progress = len(groups) > 1
    manifest = _Manifest(Path(outdir) / MANIFEST_NAME)
    history = _History(read_manifest(outdir)) if resume else None
    config = _config(deblender) if groups else {}
    records = []
    n_sources = 0
    claimed = {}  # output (directory, stem) -> the input that owns it in this run
    current = None
    try:
        with logging_redirect_tqdm(), tqdm(groups, unit="file", disable=not progress, desc="deblend",
                                           dynamic_ncols=True) as bar:
            for group in bar:
                current = group[0][0]
                record = _handle(group, outdir, deblender, config=config, format=format, overwrite=overwrite,
                                 history=history, claimed=claimed, read_options=read_options or {})
                manifest.append(record)
                records.append(record)
                current = None
                n_sources += record.n_sources if record.status == "ok" else 0
                if record.status == "failed":
                    log.error("%s", record.error)
                bar.set_postfix(sources=n_sources, failed=sum(r.status == "failed" for r in records),
                                skipped=sum(r.status == "skipped" for r in records))
    except KeyboardInterrupt:
        log.warning("interrupted%s after %d of %d inputs; their outputs and records in %s are kept",
                    f" while on {current} (it left no output)" if current else "", len(records), len(groups),
                    manifest.path)
        raise
    finally:
        manifest.close()
    return BatchSummary(records, manifest=str(manifest.path) if manifest.written else None)
