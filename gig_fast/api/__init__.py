"""The results reader: a finished run as typed Python objects, for frontends (the HTTP server of
:mod:`gig_fast.serve`, the report page of :mod:`gig_fast.report`, notebooks).

* :class:`Run` (``gig_fast.Run.open(path)``): config, layers, classes, concepts (banks, cards with
  iERF crops), class / pair / image graphs, per-concept image rankings, metrics, and
  :meth:`Run.explain` / :meth:`Run.decompose` of new images against the stored concepts.
* :mod:`.types`: the dataclasses it returns.

Concept banks are :class:`gig_fast.concepts.ConceptBank`; the per-image store is
:mod:`gig_fast.image_store`.
"""
from .run import NotFoundError, Run
from .types import (ClassInfo, ClassUse, ConceptCard, ConceptSample, ConceptUse, Decomposition, Edge, ErrorNode, Explanation,
                    Graph, ImageGraph, LayerInfo, LayerMetrics, Metrics, Node, PairEdge, PairGraph, SharedConcept,
                    TransitionMetrics)

__all__ = ["Run", "NotFoundError", "ClassInfo", "ClassUse", "ConceptCard", "ConceptSample", "ConceptUse", "Decomposition", "Edge",
           "ErrorNode", "Explanation", "Graph", "ImageGraph", "LayerInfo", "LayerMetrics", "Metrics", "Node", "PairEdge", "PairGraph",
           "SharedConcept", "TransitionMetrics"]
