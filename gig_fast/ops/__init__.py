"""The op layer of gig_fast (docs/design.md §3).

Seven ops, each with a pure-PyTorch reference (``torch`` backend) and compiled backends (``cpp``,
``triton``, ``cuda``), registered with ``torch.library`` so they work under ``torch.compile``:

* :func:`sparse_reconstruct` — ``X̃ = U V + bias`` from padded sparse codes (differentiable);
* :func:`spherical_assign` — cosine argmax against centroids;
* :func:`centroid_update` — per-cluster sums and counts;
* :func:`gig_accumulate` — fused quadrature sum + active-concept projection of GIG;
* :func:`sparse_code` — Lasso / OMP coding of vectors on a concept dictionary;
* :func:`two_means_splits` / :func:`two_means_step` — the spherical 2-means splits of the concept extractor.

``available_backends()`` says what is built; :func:`use_backend` or ``GIG_FAST_BACKEND`` forces one.

NaN/Inf policy, the same on every backend: each public op checks the finiteness of every float input it
reads (a sum per input, all combined with the index-range check into ONE host synchronisation per call)
and raises a ``ValueError`` that names the input and counts the bad entries. The bare kernels
(:func:`kernel`) check nothing: callers that validated once use them in their loops — the GIG engine
checks codes, V and β once per :func:`gig_fast.gig` call (and blames f_ab for a non-finite result), the
concept extractor checks its points once, the pipeline checks each concept file once when it loads it.
Padding (``idx = −1``) never reads V in any backend, so a NaN/Inf in a concept no code uses cannot leak
into other rows. Edge cases agree across backends: K = 0 in ``sparse_reconstruct`` gives the bias, C = 0
in ``spherical_assign``/``sparse_code`` gives label 0 / empty codes, and ``spherical_assign`` is
scale-free (rows of any finite scale, denormal or near the dtype's largest value, get the labels of the
same rows scaled to unit size).
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
