"""Input builders and checks shared by the tests and the benchmarks (not part of the public API).

One helper, one signature: ``codes`` (random padded sparse codes, benchmark shapes), ``kmeans``
(clustered points, label quality), ``coding_problems`` (sparse-coding problems, objectives,
scikit-learn oracles), ``gig_cases`` (tiny models with random BN statistics, fitted codes); ``runs``
(tiny finished runs, imported on its own: it runs the pipeline).
"""
from .codes import RECON_SHAPES, random_codes
from .gig_cases import (TinyResidualCNN, captum_rule, fitted_codes, randomize_bn, tiny_residual_cnn, tiny_resnet,
                        two_kinds_of_targets)
from .kmeans import clustered_points, cosine_scores64, label_quality, random_unit
from .coding_problems import (dense_codes, lasso_objective, pfv_like, random_problem, sklearn_lasso_objective,
                          sklearn_omp_supports)

__all__ = ["RECON_SHAPES", "random_codes", "TinyResidualCNN", "captum_rule", "fitted_codes", "randomize_bn",
           "tiny_residual_cnn", "tiny_resnet", "two_kinds_of_targets", "clustered_points", "cosine_scores64", "label_quality",
           "random_unit", "dense_codes", "lasso_objective", "pfv_like", "random_problem",
           "sklearn_lasso_objective", "sklearn_omp_supports"]
