"""A finished run's ``report.html`` and ``concept_samples/``: written from the run's folder, read through
:class:`gig_fast.Run`, drawn by :mod:`gig_fast.explorer`.

:func:`publish` is the step after :meth:`gig_fast.Pipeline.run` (``gig-fast run`` and ``gig-fast demo``
take it themselves); :func:`rebuild_report` rewrites the page of a run published before
(``gig-fast report``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..api import Run
from ..explorer import render_explorer
from ..pipeline import Pipeline
from ..pipeline.sample_index import write_sample_index
from ..pipeline.files import atomic_write_text, load_json, save_json
from ..run_folder import METRICS_FILE, REPORT_FILE, VALIDATION_FIGURES_FILE, VALIDATION_SECTION_FILE
from .collect import collect_pictures

__all__ = ["publish", "rebuild_report", "write_report"]


def _validation_extras(out: Path) -> tuple[str, list[dict]]:
    """The validation section and the PFV decomposition cards that ``gig-fast validate`` left in ``out``
    (``validation_section.html``, ``validation_figures.json``), so a rewritten report keeps them."""
    section = out / VALIDATION_SECTION_FILE
    pics = out / VALIDATION_FIGURES_FILE
    cards = list(load_json(pics).get("decomposition", {}).values()) if pics.exists() else []
    return (section.read_text(encoding="utf-8") if section.exists() else ""), cards


def write_report(run: Run, graph: dict, metrics: dict, *, max_images: int = 20, crops: int = 10, path=None) -> Path:
    """Write ``report.html`` (default ``<run folder>/report.html``) for a finished run, atomically. A validation
    section and decomposition cards written by ``gig-fast validate`` are kept.

    Args:
        run: the run (:class:`gig_fast.Run`): pictures and heat-maps come through it.
        graph, metrics: its ``graph.json`` and ``metrics.json`` dicts.
        max_images: explained images embedded with pictures (the report's image view).
        crops: nearest samples per concept on its card.
        path: where to write the page (default: the run's folder).
    The nearest samples of every concept go to ``concept_samples/`` first (when the page goes into the run
    folder): the page's pictures and every card of ``gig-fast serve`` read them.

    Returns the page's path.
    """
    if path is None:
        write_sample_index(run, max(crops, 1))
        run.reload_sample_index()
    pictures = collect_pictures(run, graph, crops=crops, max_images=max_images)
    path = Path(path) if path is not None else run.path / REPORT_FILE
    section, cards = _validation_extras(run.path)
    atomic_write_text(path, render_explorer(graph, metrics, pictures, max_images=max_images, section_html=section,
                                            decompositions=cards))
    return path


def rebuild_report(run_dir: str | os.PathLike, *, html=None, max_images: int | None = None, device: str = "cpu",
                   model=None, dataset=None) -> Path:
    """Rewrite a finished run's report from its ``graph.json``, ``metrics.json`` and work folder.

    The data set is reopened from the run's stored configuration (only images are read; nothing is
    recomputed). ``html``: where to write (default ``<run_dir>/report.html``, with ``concept_samples/``);
    ``max_images``: explained images embedded (default: the configuration's ``report_images``);
    ``model`` / ``dataset``: the objects the run was given, when it was not run from names in its
    configuration. Returns the page's path.
    """
    run = Run.open(run_dir, model=model, dataset=dataset, device=device)
    metrics = load_json(Path(run_dir) / METRICS_FILE)
    limit = run.config.report_images if max_images is None else max_images
    return write_report(run, run.graph_dict(), metrics, max_images=limit, crops=run.config.report_crops, path=html)


def publish(source: Pipeline | str | os.PathLike, *, model=None, dataset=None, device: str | None = None) -> Path:
    """Publish a finished run in its own folder: ``concept_samples/`` and ``report.html`` (the
    configuration's ``report_images`` and ``report_crops``), and the time it took in ``metrics.json``
    (``timings_s["report"]``).

    Args:
        source: the :class:`~gig_fast.Pipeline` whose :meth:`~gig_fast.Pipeline.run` just returned (its
            model, data set and device are used), or a finished run's folder.
        model, dataset, device: for a folder, the objects the run was given when it was not run from
            names in its configuration, and the device that draws the heat-maps (default ``"cpu"``).

    Under ``torchrun`` call it once, on rank 0 (a :class:`~gig_fast.Pipeline` of another rank returns
    without writing). Returns the page's path.
    """
    if isinstance(source, Pipeline):
        if model is not None or dataset is not None or device is not None:
            raise ValueError("publish(pipeline) uses the pipeline's model, data set and device: pass a run folder "
                             "to give others")
        out = Path(source.out)
        if source.rank != 0:
            return out / REPORT_FILE
        model, dataset, device = source.model, source.dataset, str(source.device)
    else:
        out = Path(source)
    t0 = time.perf_counter()
    run = Run.open(out, model=model, dataset=dataset, device=device or "cpu")
    metrics = load_json(out / METRICS_FILE)
    metrics.get("timings_s", {}).pop("report", None)  # a folder published before: the page shows the computation's
    path = write_report(run, run.graph_dict(), metrics, max_images=run.config.report_images,
                        crops=run.config.report_crops)
    # the page shows the timings of the computation; metrics.json also keeps the page's own
    metrics.setdefault("timings_s", {})["report"] = round(time.perf_counter() - t0, 2)
    save_json(out / METRICS_FILE, metrics)
    return path
