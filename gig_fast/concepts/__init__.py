"""Concept extraction (docs/design.md §1.3, paper §3.2.1): bisecting spherical k-means on a layer's PFVs.

* :func:`bisecting_spherical_kmeans` — one process (:mod:`.bisecting`, the algorithm's description);
* :func:`distributed_bisecting_kmeans` — the same concepts computed by several ranks (:mod:`.distributed`);
* :func:`cosine_inertia` — the objective, to compare any two partitions;
* :mod:`.core` — the split machinery both share;
* :class:`ConceptBank` — one layer's concepts saved as safetensors + JSON metadata (:mod:`.bank`).
"""
from .bank import ConceptBank
from .bisecting import bisecting_spherical_kmeans
from .core import BisectingInfo, cosine_inertia
from .distributed_bisecting import distributed_bisecting_kmeans

__all__ = ["ConceptBank", "bisecting_spherical_kmeans", "distributed_bisecting_kmeans", "BisectingInfo", "cosine_inertia"]
