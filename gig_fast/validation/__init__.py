"""Validation suite (paper §4.2, App. D/F/I/J; DESIGN.md §1.7): C-Deletion/C-Insertion, reconstruction
quality, inter-layer deletion/insertion, dictionary-learning and SAE baselines, the K ablation and the
noise-robustness check. Entry point: :func:`validate` (CLI: ``gig-fast validate``)."""
from .metrics import auc, class_score, concept_curve, edit_codes, max_projection, reconstruction_quality, step_counts, \
    top_overlap
from .run import ValidationOptions, validate

__all__ = ["validate", "ValidationOptions", "auc", "step_counts", "edit_codes", "concept_curve", "class_score",
           "max_projection", "reconstruction_quality", "top_overlap"]
