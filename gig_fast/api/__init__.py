"""The library backend for frontends: a finished run as typed Python objects, and a local HTTP API.

* :class:`Run` (``gig_fast.Run.open(path)``): config, layers, classes, concepts (banks, cards with
  iERF crops), class / pair / image graphs, per-concept image rankings, metrics, and
  :meth:`Run.explain` / :meth:`Run.decompose` of new images against the stored concepts.
* :mod:`.types`: the dataclasses it returns.
* :mod:`.server` (optional extra ``gig_fast[serve]``): ``gig-fast serve --run DIR``, a JSON API over
  :class:`Run` (FastAPI + uvicorn).
* :mod:`.views`: what the server draws for the explorer page (cards, pair and image views), from what
  the run computed once.

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
