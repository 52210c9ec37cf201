"""The GIG pipeline (docs/design.md §1): PFV–iERF dataset → concepts → decomposition → GIG → graph.

``Pipeline(config).run()`` runs (or resumes) everything and writes ``graph.json`` and ``metrics.json``
(the page, ``report.html``, is published by :mod:`gig_fast.report`); each stage is also a function of a
``Pipeline``: :func:`pfv_dataset`, :func:`extract_concepts`, :func:`decompose`, :func:`attribute`,
:func:`build_graph`.
"""
from .config import PipelineConfig, demo_config, load_config
from .graph import SCHEMA, SCHEMA_VERSION, build_graph, write_graph
from .runner import Pipeline
from .stages import attribute, decompose, extract_concepts, pfv_dataset

__all__ = ["Pipeline", "PipelineConfig", "load_config", "demo_config", "pfv_dataset", "extract_concepts",
           "decompose", "attribute", "build_graph", "write_graph", "SCHEMA", "SCHEMA_VERSION"]
