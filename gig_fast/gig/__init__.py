"""The GIG engine: Generalized Integrated Gradients from the concepts of layer a to a target of layer b.

docs/design.md §1.5 / paper Eq. 4–7. With the codes ``(idx, val)`` of layer a, its concepts ``V`` and its BN
shift ``β``, the path is ``X(α) = β + α·U V`` (at α = 1 the reconstruction, at α = 0 "no concept").
For a target ``T`` on ``Ω = F_ab(X(α))``::

    GIG(q|p → T) = u_pq · Σ_k w_k ⟨∇_X T(F_ab(X(α_k)))_p , v_q⟩

over the m nodes/weights of a quadrature rule on [0, 1]. Completeness:
``Σ_{p,q} GIG = T(F_ab(X(1))) − T(F_ab(X(0)))`` up to quadrature error; every result carries the gap
(``delta``).

How it is fast: all m α-points of a chunk of images run through ``F_ab`` as one batch — one forward
shared by every target, then one backward per target over the rows that carry a weight (with several
targets, the path's ends and the refinement's boundaries go through a forward without a graph); ``batch_size``
bounds the rows per batch, so memory does not grow with m; the weighted α-sum of the gradients and its projection onto only the
*active* concepts of each position are one fused op (:func:`gig_fast.ops.gig_accumulate`); the prefix
up to a is never run.
The path tensor is laid out ``[n, H_a, W_a, C_a]`` (channels-last) so the sparse reconstruction, the
gradients and ``gig_accumulate`` share one layout with no transposes; ``F_ab`` sees a
``[n, C_a, H_a, W_a]`` view of it.

The package: :mod:`~gig_fast.gig.engine` (:func:`gig`, :class:`GIGResult`, the input checks, the fixed
rule), :mod:`~gig_fast.gig.adaptive` (the adaptive rule), :mod:`~gig_fast.gig.evaluation` (F_ab's forward
and the targets' backwards, shared by both rules), :mod:`~gig_fast.gig.targets` (:class:`ConceptTarget`,
:class:`ClassTarget`) and :mod:`~gig_fast.gig.rules` (:func:`quadrature`, :data:`RULES`, :data:`ADAPTIVE`).
"""
from .engine import GIGResult, gig
from .evaluation import tf32_allowed
from .rules import ADAPTIVE, RULES, quadrature
from .targets import ClassTarget, ConceptTarget, Target  # noqa: F401  (Target: the type of gig's target)

__all__ = ["gig", "GIGResult", "ConceptTarget", "ClassTarget", "quadrature", "RULES", "ADAPTIVE", "tf32_allowed"]
