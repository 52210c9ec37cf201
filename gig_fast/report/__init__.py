"""Publishing a finished run: its interactive page ``report.html`` and the nearest samples of every concept
(``concept_samples/``), read through :class:`gig_fast.Run` and drawn by :mod:`gig_fast.explorer`.

Computing a run and publishing it are two steps: :meth:`gig_fast.Pipeline.run` writes the stage files,
``graph.json`` and ``metrics.json``; :func:`publish` then writes the page into the run's folder::

    pipe = Pipeline(config)
    pipe.run()
    publish(pipe)             # or publish("gig_demo") for a finished run's folder

``gig-fast run``, ``gig-fast demo`` and ``gig-fast validate`` take both steps; ``gig-fast report``
(:func:`rebuild_report`) rewrites the page of a finished run, optionally elsewhere.

* :mod:`.page`: :func:`publish`, :func:`rebuild_report`, :func:`write_report`.
* :mod:`.collect`: every picture the page shows (:func:`collect_pictures`), also used by ``gig-fast serve``.
"""
from .collect import collect_pictures
from .page import publish, rebuild_report, write_report

__all__ = ["publish", "rebuild_report", "write_report", "collect_pictures"]
