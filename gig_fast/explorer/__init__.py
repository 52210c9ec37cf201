"""The interactive graph explorer (``report.html``): one self-contained page per run.

The explorer only renders what it is given: :func:`render_explorer` writes the page from a
``graph.json`` dict, a ``metrics.json`` dict and the pictures (:mod:`.pictures` draws them from arrays);
:func:`summary_html` is the page's static run summary. Reading a run's work files belongs to the
results reader (:class:`gig_fast.Run`) and the page of a run to :mod:`gig_fast.report`
(:func:`~gig_fast.report.publish`, :func:`~gig_fast.report.rebuild_report`).
"""
from .cards import DECOMPOSITION_CARD_KIND, check_decomposition_card
from .render import embed_json, insert_decompositions, insert_section, render_explorer
from .summary import summary_html

__all__ = ["render_explorer", "embed_json", "summary_html", "insert_decompositions",
           "insert_section", "check_decomposition_card", "DECOMPOSITION_CARD_KIND"]
