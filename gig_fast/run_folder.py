"""The layout of a run's output folder, in one place, and the one way files get into it: atomically.

The pipeline writes through these names and :class:`gig_fast.Run` reads through them (the layout:
docs/design.md §7)::

    <out>/graph.json, metrics.json      the computation's results (:meth:`gig_fast.Pipeline.run`)
    <out>/report.html, concept_samples/ the published page and the nearest samples of every concept
                                        (:func:`gig_fast.report.publish`)
    <out>/validation.json, validation.md, validation_plots/, validation_section.html, validation_figures.json
                                        what ``gig-fast validate`` writes (the last two go into the page)
    <out>/concepts/<layer>/             the concept banks (:class:`gig_fast.ConceptBank`)
    <out>/store/                        the per-image Parquet store (:mod:`gig_fast.image_store`)
    <out>/work-<run key>/config.json    what a relaunch must agree with (:mod:`gig_fast.pipeline.workdir`)
    <out>/work-<run key>/stage1/chunk_00000.npz …   stage 1: PFV–iERF samples per chunk of images
    <out>/work-<run key>/concepts/<layer>.npz       stage 2: concepts, cluster labels, representatives
    <out>/work-<run key>/codes/chunk_00000.npz …    stage 3: sparse codes per chunk of images
    <out>/work-<run key>/gig/<a>__<b>/chunk_00000.npz …   stage 4: GIG per layer pair and chunk
    <out>/work-<run key>/errors/chunk_00000.npz …  stage 4's error nodes per code chunk (``error_nodes``)
    <out>/work-<run key>/validation/    ``gig-fast validate``'s units and trained baselines

Atomic writes: a file is written to ``.<name>.tmp<PID>`` beside its target and renamed over it once
complete (:func:`atomic_open`), so a reader — or a resumed run — never sees a partial file; a process
killed mid-write leaves its temporary file behind, which :func:`remove_stale_tmp` deletes once that
process is gone (torchrun ranks write at the same time, so files of live processes are kept).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

__all__ = ["GRAPH_FILE", "METRICS_FILE", "REPORT_FILE", "SAMPLES_DIR", "SAMPLES_MANIFEST", "VALIDATION_JSON",
           "VALIDATION_MD", "VALIDATION_PLOTS_DIR", "VALIDATION_SECTION_FILE", "VALIDATION_FIGURES_FILE", "CONFIG_FILE",
           "BANKS_DIR", "STORE_DIR", "STAGE1", "CONCEPTS", "CODES", "GIG", "ERRORS", "VALIDATION_WORK", "work_dir",
           "chunk_file", "chunk_files", "layer_file", "concept_file", "bank_dir", "transition_dir", "tmp_path",
           "atomic_open", "remove_stale_tmp"]

GRAPH_FILE, METRICS_FILE, REPORT_FILE = "graph.json", "metrics.json", "report.html"
SAMPLES_DIR = "concept_samples"  # the nearest stage-1 samples of every concept (:mod:`gig_fast.pipeline.sample_index`)
SAMPLES_MANIFEST = "concept_samples.json"  # in SAMPLES_DIR, beside one layer_file per layer
# what gig-fast validate writes into <out> (gig_fast.validation.outputs)
VALIDATION_JSON, VALIDATION_MD, VALIDATION_PLOTS_DIR = "validation.json", "validation.md", "validation_plots"
VALIDATION_SECTION_FILE, VALIDATION_FIGURES_FILE = "validation_section.html", "validation_figures.json"
CONFIG_FILE = "config.json"  # in the work folder
BANKS_DIR = "concepts"  # <out>/concepts/<layer>/: one concept bank per layer
STORE_DIR = "store"  # the per-image store, relative to graph.json (graph.json's "store" field)
# the work folder's sub-folders, one per stage
STAGE1, CONCEPTS, CODES, GIG = "stage1", "concepts", "codes", "gig"
ERRORS = "errors"  # stage 4's error nodes, one file per code chunk (same names as CODES)
VALIDATION_WORK = "validation"  # gig-fast validate's resumable units and trained baselines

_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def work_dir(out: str | os.PathLike, key: str) -> Path:
    """``<out>/work-<key>``: the work files of the run whose configuration has the run key ``key``."""
    return Path(out) / f"work-{key}"


def chunk_file(folder: Path, ci: int) -> Path:
    """The file of chunk ``ci`` in a per-chunk stage folder (``work / STAGE1``, ``work / CODES`` or a
    :func:`transition_dir`): ``chunk_00012.npz``, numbered by the chunk's place in the image selection."""
    return Path(folder) / f"chunk_{ci:05d}.npz"


def chunk_files(folder: Path) -> list[Path]:
    """The chunk files present in a per-chunk stage folder, in chunk order."""
    return sorted(Path(folder).glob("chunk_*.npz"))


def layer_file(folder: Path, point: str) -> Path:
    """The file of the analysed layer ``point`` in a per-layer folder (``work / CONCEPTS``, ``SAMPLES_DIR``):
    ``<point>.npz``."""
    return Path(folder) / f"{point}.npz"


def concept_file(work: Path, point: str) -> Path:
    """Stage 2's file of the analysed layer ``point``."""
    return layer_file(Path(work) / CONCEPTS, point)


def bank_dir(out: str | os.PathLike, point: str) -> Path:
    """The concept bank folder of layer ``point`` in the output folder: ``out/concepts/<point>``; a layer
    name that cannot name a folder there (empty, hidden, or with a path separator) is a ValueError."""
    if not point or point.startswith(".") or any(ch in point for ch in "/\\:"):
        raise ValueError(f"layer name {point!r} cannot name a concept bank folder")
    return Path(out) / BANKS_DIR / point


def transition_dir(work: Path, a: str, b: str) -> Path:
    """Stage 4's folder of the layer pair ``a → b`` (``b`` may be ``"classes"``)."""
    return Path(work) / GIG / f"{a}__{b}"


def tmp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it: ``.<name>.tmp<PID>`` beside it."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
    """``with atomic_open(path) as f: f.write(...)``: the file appears at ``path`` whole (flushed and
    fsynced, then renamed over it) when the block ends, or not at all when it raises (the partial
    temporary file is removed). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the ``.<name>.tmp<PID>`` files in ``folder`` (and its sub-folders) whose process no longer
    runs (left by a kill mid-write); returns them. Files of live processes (another rank writing now)
    are kept."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in (folder.rglob if recursive else folder.glob)(".*.tmp*"):
        m = _TMP.match(path.name)
        if m and path.is_file() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
