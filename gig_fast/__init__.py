"""gig_fast — Generalized Integrated Gradients on compiled kernels.

Decomposes every analysed layer of a CNN into dataset-wide concept vectors and traces, with
integrated gradients between layers, how concepts build each other up to the class decision.
"""
from . import ops
from ._extensions import has_cpp_extension, has_cuda_extension, has_triton
from .gig import ClassTarget, ConceptTarget, GIGResult, gig
from .pipeline import Pipeline
from .api import Run
from .concepts import ConceptBank

__version__ = "0.2.0"  # 0.2.0: Pipeline.run() computes, gig_fast.report publishes the page

__all__ = ["ops", "Pipeline", "Run", "ConceptBank", "gig", "GIGResult", "ConceptTarget", "ClassTarget", "has_cpp_extension", "has_cuda_extension", "has_triton", "__version__"]
