"""The interactive graph explorer (``report.html``): one self-contained page per run.

:func:`collect_pictures` turns a run's work files into small embedded pictures (iERF crops with
context, input images, concept heat-maps); :func:`render_explorer` writes the page from ``graph.json``,
``metrics.json`` and those pictures; :func:`write_report` does both for a finished
:class:`~gig_fast.pipeline.Pipeline`.
"""
from .pictures import collect_pictures
from .render import embed_json, render_explorer

__all__ = ["collect_pictures", "render_explorer", "embed_json", "write_report"]


def write_report(pipe, graph: dict, metrics: dict, *, max_images: int | None = None):
    """Write ``<out>/report.html`` for a finished run (atomically) and return its path."""
    from ..pipeline.store import atomic_write_text

    limit = pipe.config.report_images if max_images is None else max_images
    pictures = collect_pictures(pipe, graph, crops=pipe.config.report_crops, max_images=limit)
    path = pipe.out / "report.html"
    atomic_write_text(path, render_explorer(graph, metrics, pictures, max_images=limit))
    return path
