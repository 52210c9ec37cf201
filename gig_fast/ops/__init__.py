"""The op layer of gig_fast (DESIGN.md §3).

Seven ops, each with a pure-PyTorch reference (``torch`` backend) and compiled backends (``cpp``,
``triton``, ``cuda``), registered with ``torch.library`` so they work under ``torch.compile``:

* :func:`sparse_reconstruct` — ``X̃ = U V + bias`` from padded sparse codes (differentiable);
* :func:`spherical_assign` — cosine argmax against centroids;
* :func:`centroid_update` — per-cluster sums and counts;
* :func:`gig_accumulate` — fused quadrature sum + active-concept projection of GIG;
* :func:`sparse_code` — Lasso / OMP coding of vectors on a concept dictionary;
* :func:`two_means_splits` / :func:`two_means_step` — the spherical 2-means splits of the concept extractor.

``available_backends()`` says what is built; :func:`use_backend` or ``GIG_FAST_BACKEND`` forces one.
The registry (:mod:`gig_fast.ops.registry`) is the public way to an op's backends, bare kernels and
registered ``torch.library`` op: ``spec("sparse_code").defaults``, ``kernel("spherical_assign", device)``.
"""
from .registry import BACKENDS, OpSpec, available_backends, forced_backend, kernel, spec, specs, use_backend
from .centroid_update import centroid_update
from .gig_accumulate import gig_accumulate
from .sparse_code import sparse_code
from .sparse_reconstruct import sparse_reconstruct
from .spherical_assign import spherical_assign
from .two_means import two_means_splits, two_means_step

__all__ = [
    "BACKENDS",
    "available_backends",
    "forced_backend",
    "use_backend",
    "OpSpec",
    "spec",
    "specs",
    "kernel",
    "sparse_reconstruct",
    "spherical_assign",
    "centroid_update",
    "gig_accumulate",
    "sparse_code",
    "two_means_splits",
    "two_means_step",
]
