"""The GIG engine: Generalized Integrated Gradients from the concepts of layer a to a target of layer b."""
from .engine import ADAPTIVE, RULES, ClassTarget, ConceptTarget, GIGResult, Target, gig, quadrature, tf32_allowed

__all__ = ["gig", "GIGResult", "ConceptTarget", "ClassTarget", "quadrature", "RULES", "ADAPTIVE", "tf32_allowed"]
