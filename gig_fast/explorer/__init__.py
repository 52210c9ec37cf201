"""The interactive graph explorer (``report.html``): one self-contained page per run.

:func:`collect_pictures` turns a run's work files into small embedded pictures (iERF crops with
context, input images, concept heat-maps); :func:`render_explorer` writes the page from ``graph.json``,
``metrics.json`` and those pictures; :func:`write_report` does both for a finished
:class:`~gig_fast.pipeline.Pipeline`, and :func:`rebuild_report` for a finished run's output folder
(``gig-fast report --run DIR``).
"""
from pathlib import Path

from .pictures import collect_pictures
from .render import embed_json, render_explorer

__all__ = ["collect_pictures", "render_explorer", "embed_json", "write_report", "rebuild_report"]


def write_report(pipe, graph: dict, metrics: dict, *, max_images: int | None = None, path=None) -> Path:
    """Write ``report.html`` (default ``<out>/report.html``) for a finished run, atomically; return its path."""
    from ..pipeline.store import atomic_write_text

    limit = pipe.config.report_images if max_images is None else max_images
    pictures = collect_pictures(pipe, graph, crops=pipe.config.report_crops, max_images=limit)
    path = Path(path) if path is not None else pipe.out / "report.html"
    atomic_write_text(path, render_explorer(graph, metrics, pictures, max_images=limit))
    return path


def rebuild_report(run_dir, *, html=None, max_images: int | None = None, device: str = "cpu", model=None,
                   dataset=None) -> Path:
    """Rewrite a finished run's report from its ``graph.json``, ``metrics.json`` and work folder.

    The model and data set are reopened from the run's stored configuration (only images are read;
    nothing is recomputed). ``html``: where to write (default ``<run_dir>/report.html``); ``model`` /
    ``dataset``: the objects the run was given, when it was not run from names in its configuration.
    """
    from ..pipeline import Pipeline, PipelineConfig
    from ..pipeline.store import load_json

    run_dir = Path(run_dir)
    if not (run_dir / "graph.json").exists():
        raise FileNotFoundError(f"no graph.json in {run_dir}; is it the output folder of a finished run?")
    graph, metrics = load_json(run_dir / "graph.json"), load_json(run_dir / "metrics.json")
    work = run_dir / f"work-{graph['run_key']}"
    if not work.exists():
        raise FileNotFoundError(f"{work} (the work folder of this graph) does not exist")
    stored = load_json(work / "config.json")["config"]
    cfg = PipelineConfig(**{**stored, "out": str(run_dir), "device": device, "progress": False})
    if cfg.key() != graph["run_key"]:
        raise ValueError(f"{work}/config.json does not match graph.json (run key {graph['run_key']})")
    pipe = Pipeline(cfg, model=model, dataset=dataset)
    return write_report(pipe, graph, metrics, max_images=max_images, path=html)
