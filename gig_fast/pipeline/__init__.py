"""The GIG pipeline (docs/design.md §1): PFV–iERF dataset → concepts → decomposition → GIG → graph.

``Pipeline(config).run()`` runs (or resumes) everything; each stage is also a function of a
``Pipeline``: :func:`pfv_dataset`, :func:`extract_concepts`, :func:`decompose`, :func:`attribute`,
:func:`build_graph`.
"""
from .config import PipelineConfig, demo_config, load_config
from .graph import SCHEMA, SCHEMA_VERSION, build_graph, write_graph
from .report import write_report
from .run import Pipeline, rebuild_report
from .stages import attribute, decompose, extract_concepts, pfv_dataset

__all__ = ["Pipeline", "PipelineConfig", "load_config", "demo_config", "pfv_dataset", "extract_concepts",
           "decompose", "attribute", "build_graph", "write_graph", "write_report", "rebuild_report", "SCHEMA", "SCHEMA_VERSION"]
