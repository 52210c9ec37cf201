"""Validation suite (paper §4.2, App. D/E/F/I/J; docs/design.md §1.7): C-Deletion/C-Insertion, reconstruction
quality, sparsity–error curves, inter-layer deletion/insertion, dictionary-learning and SAE baselines, the
K ablation, the noise-robustness check, a targeted adversarial attack, PFV decompositions and concept
trajectories. Entry point: :func:`validate` (CLI: ``gig-fast validate``)."""
from .appendix import concept_trajectory
from .attack import targeted_pgd
from .metrics import auc, class_score, concept_curve, curve_grid, edit_codes, interpolate_at, label_hits, \
    max_projection, reconstruction_quality, step_counts, top_overlap
from .options import EXPERIMENTS, ValidationOptions
from .suite import validate

__all__ = ["validate", "ValidationOptions", "EXPERIMENTS", "auc", "step_counts", "curve_grid", "edit_codes",
           "concept_curve", "class_score", "label_hits", "max_projection", "reconstruction_quality", "top_overlap",
           "interpolate_at", "targeted_pgd", "concept_trajectory"]
