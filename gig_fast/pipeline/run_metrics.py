"""A finished run's ``metrics.json``: per-layer rel-L2, l0 ratio and concept sizes, per-transition
completeness deltas, accuracy, timings (the report page that shows them: :mod:`gig_fast.report`)."""
from __future__ import annotations

import numpy as np

from ..run_folder import CODES, chunk_files, concept_file
from .errors import error_metrics
from .selection import trans_dir, transitions

__all__ = ["collect_metrics"]


def collect_metrics(pipe, timings: dict) -> dict:
    """Per-layer decomposition quality (paper Table 1 form) and per-transition completeness deltas."""
    layers = {}
    sums: dict[str, np.ndarray] = {}
    for path in chunk_files(pipe.work / CODES):
        with np.load(path, allow_pickle=False) as z:
            for p in pipe.points:
                for key in ("rel_l2_sum", "l0_sum", "count", "not_converged"):
                    k = f"{p}|{key}"
                    if k in z.files:
                        sums[k] = sums.get(k, 0) + z[k].astype(np.float64)
    for p in pipe.points:
        n = float(sums[f"{p}|count"].sum())
        with np.load(concept_file(pipe.work, p), allow_pickle=False) as z:
            sizes = z["sizes"]  # stage-1 PFVs per concept: how well each concept is sampled
        layers[p] = {"rel_l2": float(sums[f"{p}|rel_l2_sum"].sum() / n), "l0_ratio": float(sums[f"{p}|l0_sum"].sum() / n),
                     "pfvs": int(n), "not_converged": int(np.sum(sums.get(f"{p}|not_converged", 0))),
                     "concepts": int(sizes.size), "concept_size_median": float(np.median(sizes)),
                     "concept_size_min": int(sizes.min())}
    deltas = {}
    for a, b in transitions(pipe):
        chunks = [np.load(f, allow_pickle=False) for f in chunk_files(trans_dir(pipe, a, b))]
        # every (image, target) pair of the transition under the run's rule: the class graphs' top
        # targets and the image graphs' own targets
        ad = np.abs(np.concatenate([z[k].ravel() for z in chunks for k in ("delta", "own_delta") if k in z.files]))
        rd = np.concatenate([z[k].ravel() for z in chunks for k in ("rel_delta", "own_rel_delta") if k in z.files])
        # quadrature nodes per image and whether the refinement ran (absent in runs made before it existed)
        steps = np.concatenate([z["steps"] for z in chunks if "refined" in z.files] or [np.zeros(0, np.int64)])
        refined = np.concatenate([z["refined"] for z in chunks if "refined" in z.files] or [np.zeros(0, bool)])
        # max_rel is set by targets whose span |T(X(1)) − T(X(0))| is ~0 (a concept the image barely
        # has): p99_rel and max_rel_to_median_span tell those apart from a real quadrature error
        span = ad / np.maximum(rd, 1e-30)
        deltas[f"{a}->{b}"] = {"max_abs": float(ad.max()), "median_abs": float(np.median(ad)),
                               "max_rel": float(rd.max()), "median_rel": float(np.median(rd)),
                               "p99_rel": float(np.quantile(rd, 0.99)),
                               "share_rel_within_1pct": float(np.mean(rd <= 0.01)),  # the paper's bar
                               "max_rel_to_median_span": float(ad.max() / max(float(np.median(span)), 1e-30)),
                               "n": int(ad.size)}
        if steps.size:
            deltas[f"{a}->{b}"].update(refined_share=float(np.mean(refined)),
                                       mean_steps=float(steps.mean()), max_steps=int(steps.max()))
        # the pair graphs' edges into shared concepts, reported apart (NaN: padding)
        shared = np.concatenate([z["shared_rel_delta"].ravel() for z in chunks if "shared_rel_delta" in z.files]
                                or [np.zeros(0)])
        shared = shared[np.isfinite(shared)]
        if shared.size:
            deltas[f"{a}->{b}"]["shared_targets"] = {
                "n": int(shared.size), "median_rel": float(np.median(shared)),
                "p99_rel": float(np.quantile(shared, 0.99)), "share_rel_within_1pct": float(np.mean(shared <= 0.01))}
    all_d = np.array([v["max_abs"] for v in deltas.values()])
    all_r = np.concatenate([[v["max_rel"], v["median_rel"]] for v in deltas.values()]) if deltas else np.array([])
    n_explained, n_labelled, n_correct = 0, 0, 0  # streamed over the chunks: no per-image table in memory
    for path in chunk_files(pipe.work / CODES):
        with np.load(path, allow_pickle=False) as z:
            n_explained += len(z["image"])
            labelled = z["label"] >= 0  # offline photos carry no label
            n_labelled += int(labelled.sum())
            n_correct += int((z["label"] == z["prediction"])[labelled].sum())
    acc = n_correct / n_labelled if n_labelled else None
    return {"run_key": pipe.config.key(), "layers": layers, "completeness": deltas,
            "completeness_max_abs": float(all_d.max()) if all_d.size else None,
            "completeness_median_of_max": float(np.median(all_d)) if all_d.size else None,
            "completeness_max_rel": float(all_r[0::2].max()) if all_r.size else None,
            "completeness_median_rel": float(np.median(all_r[1::2])) if all_r.size else None,
            "explained_images": n_explained, "concept_images": int(len(pipe.concept_ids)),
            "accuracy_on_explained": acc, "skipped_images": pipe.skipped, "timings_s": timings,
            "error_nodes": error_metrics(pipe)}  # None for a run without error nodes
