"""Run a `Deblender` over many FITS files: discovery, per-file isolation, summary.

One bad file never stops a batch: its error is recorded with the file's name
and no output is left for it; the other files go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from deblend.exceptions import InputError
from deblend.io import FITS_SUFFIXES, fits_stem

__all__ = ["discover_inputs", "run_batch", "FileRecord", "BatchSummary", "is_fits_name"]

log = logging.getLogger(__name__)


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
    """What happened to one input."""

    path: str
    status: str  # 'ok' or 'failed'
    n_sources: int = 0
    duration: float = 0.0
    error: str = ""
    outputs: dict = field(default_factory=dict)


@dataclass
class BatchSummary:
    """All records of a batch run."""

    records: list

    @property
    def n_ok(self):
        """Number of inputs processed."""
        return sum(r.status == "ok" for r in self.records)

    @property
    def failed(self):
        """Records of the inputs that failed."""
        return [r for r in self.records if r.status == "failed"]

    @property
    def n_sources(self):
        """Sources found over all inputs."""
        return sum(r.n_sources for r in self.records)

    def report(self):
        """A short human-readable summary (one line per failure)."""
        lines = [f"{self.n_ok} of {len(self.records)} inputs deblended, {self.n_sources} sources, "
                 f"{len(self.failed)} failed"]
        lines += [f"  FAILED {r.error}" for r in self.failed]
        return "\n".join(lines)


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


def _process(deblender, paths, outdir, *, format, overwrite, read_options):
    """Deblend one input (one file, or several files as bands) and write its outputs."""
    start = time.perf_counter()
    first, base = paths[0]
    files = [p for p, _ in paths]
    try:
        result = deblender.run(files if len(files) > 1 else files[0], **read_options)
        outputs = result.write(_output_dir(outdir, first, base), stem=fits_stem(first),
                               format=format, overwrite=overwrite)
    except InputError as exc:
        return FileRecord(str(first), "failed", duration=time.perf_counter() - start, error=str(exc))
    except FileExistsError as exc:
        return FileRecord(str(first), "failed", duration=time.perf_counter() - start,
                          error=f"{first}: output exists ({exc})")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one bad file never stops a batch; the error names it
        log.debug("unexpected failure on %s", first, exc_info=True)
        return FileRecord(str(first), "failed", duration=time.perf_counter() - start,
                          error=f"{first}: {type(exc).__name__}: {exc}")
    return FileRecord(str(first), "ok", n_sources=result.n_sources,
                      duration=time.perf_counter() - start,
                      outputs={k: str(v) for k, v in outputs.items()})


def run_batch(inputs, outdir, deblender, *, format="fits", overwrite=False, as_bands=False,
              recursive=True, progress=None, read_options=None):
    """Deblend every FITS input and write ``<stem>_seg.fits`` and ``<stem>_cat.<ext>``.

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
        Replace existing outputs (otherwise such inputs fail with a message).
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
    """
    found = discover_inputs(inputs, recursive=recursive)
    groups = [found] if as_bands and found else [[item] for item in found]
    if progress is None:
        progress = len(groups) > 1
    records = []
    n_sources = 0
    with logging_redirect_tqdm(), tqdm(groups, unit="file", disable=not progress, desc="deblend",
                                       dynamic_ncols=True) as bar:
        claimed = {}  # output (directory, stem) -> the input that owns it in this run
        for group in bar:
            first, base = group[0]
            key = (_output_dir(outdir, first, base), fits_stem(first))
            if key in claimed:  # e.g. a/x.fits and b/x.fits, or x.fits and x.fits.gz
                record = FileRecord(str(first), "failed",
                                    error=f"{first}: its outputs {key[1]}_seg/_cat would replace "
                                          f"those of {claimed[key]} in this run; rename one or "
                                          "run them into different output directories")
            else:
                claimed[key] = first
                record = _process(deblender, group, outdir, format=format, overwrite=overwrite,
                                  read_options=read_options or {})
            records.append(record)
            n_sources += record.n_sources
            if record.status == "failed":
                log.error("%s", record.error)
            bar.set_postfix(sources=n_sources, failed=sum(r.status == "failed" for r in records))
    return BatchSummary(records)
