"""The quadrature rules of the path integral: the fixed rules' nodes and weights on [0, 1], and the name
of the adaptive rule (whose nodes come from :mod:`gig_fast.gig.adaptive`)."""
from __future__ import annotations

import numpy as np
import torch

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "trapezoid")  # the fixed rules
ADAPTIVE = "adaptive"  # the rule whose nodes adapt to each image (see gig's ``rule``)


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of a rule on [0, 1], float64 ``[steps]`` each; the weights sum to 1.

    ``gausslegendre`` (exact for polynomials of degree 2m−1), ``riemann_left/right/middle`` (nodes
    k/m, (k+1)/m, (k+½)/m, weights 1/m) and ``trapezoid`` (nodes k/(m−1), weights 1/(m−1) halved at the
    ends, m ≥ 2). Captum's ``riemann_trapezoid`` uses weights 1/m halved at the ends instead, which sum to
    (m−1)/m; ours integrate constants exactly.
    """
    if rule == ADAPTIVE:
        raise ValueError("the adaptive rule has no fixed nodes: each image's come from gig(); choose one of "
                         f"{RULES}")
    if rule not in RULES:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {RULES}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    m = int(steps)
    k = np.arange(m, dtype=np.float64)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(m)
        nodes, weights = 0.5 * (x + 1.0), 0.5 * w
    elif rule == "trapezoid":
        if m < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        nodes = k / (m - 1)
        weights = np.full(m, 1.0 / (m - 1))
        weights[[0, -1]] *= 0.5
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        nodes, weights = (k + offset) / m, np.full(m, 1.0 / m)
    return torch.from_numpy(np.ascontiguousarray(nodes)), torch.from_numpy(np.ascontiguousarray(weights))
