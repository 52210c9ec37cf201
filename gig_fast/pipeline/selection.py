"""The graph selection of a run: which concepts, classes and class pairs its graphs hold, read from the
stage-4 files (docs/design.md §1.6).

* the layer transitions, top-down (:func:`transitions`), and their folders (:func:`trans_dir`);
* per class, the concepts' scores (:func:`class_scores`), its top set (:func:`top_sets`) and the concepts
  its images carry GIG to (:func:`view_sets`);
* the class pairs that get pair graphs (:func:`class_pairs`, :func:`neighbour_pairs`) and their shared
  concepts (:func:`shared_concepts`, :func:`shared_sets`);
* an image graph's own nodes (:func:`image_top_concepts`).

Stage 4 (:func:`gig_fast.pipeline.stages.attribute`) chooses its targets with these rules, the graph
(:mod:`.graph`) and :class:`gig_fast.Run` read the same selection back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..run_folder import chunk_files, transition_dir

__all__ = ["CLASSES", "transitions", "trans_dir", "class_scores", "class_pair_weights", "top_sets", "present_classes",
           "shared_concepts", "neighbour_pairs", "class_pairs", "shared_sets", "view_sets", "image_top_concepts",
           "layer_above"]

CLASSES = "classes"  # the name of the last graph layer (the class targets)


def transitions(pipe) -> list[tuple[str, str]]:
    """Layer pairs (a, b) top-down: (last, classes), then (previous, last), …"""
    pts = pipe.points
    pairs = [(pts[-1], CLASSES)] + [(pts[i], pts[i + 1]) for i in range(len(pts) - 2, -1, -1)]
    return pairs


def trans_dir(pipe, a, b) -> Path:
    """The folder of the GIG chunk files of the transition ``a → b``."""
    return transition_dir(pipe.work, a, b)


def _class_sums(pipe, a: str, b: str):
    """Per chunk file of (a → b): ``(classes [n], class_sum [n, T, K_a], n_top)``: the GIG summed over
    each class's images to its targets of b, the first ``n_top`` of which are the class's top set
    (older files hold every class, and only top targets)."""
    for path in chunk_files(trans_dir(pipe, a, b)):
        with np.load(path, allow_pickle=False) as z:
            sums = z["class_sum"]
            classes = z["classes"] if "classes" in z.files else np.arange(sums.shape[0])
            n_top = int(z["n_top"]) if "n_top" in z.files else sums.shape[1]
        yield classes, sums, n_top


def class_scores(pipe, a: str, b: str) -> np.ndarray:
    """``[n_classes, K_a]`` score of each concept of ``a`` per class: Σ over the class's images of its
    GIG to the class (b = classes) or to the class's top concepts of ``b`` (summed over those)."""
    total = None
    for classes, sums, n_top in _class_sums(pipe, a, b):
        if total is None:
            total = np.zeros((pipe.num_classes, sums.shape[2]), dtype=np.float64)
        total[classes] += sums[:, :n_top].sum(1)  # [n, T, K] → [n, K], the top targets only
    return total


def class_pair_weights(pipe, a: str, b: str, sources: np.ndarray) -> np.ndarray:
    """``[n_classes, T, S]``: Σ over each class's images of GIG(q → its t-th target of b) — the order of
    :func:`view_sets` of b: its top concepts first — for its ``sources [n_classes, S]`` concepts q of
    ``a`` (−1 = padding, weight 0; gathered chunk by chunk: never ``[n_classes, T, K_a]``)."""
    total = None
    for classes, sums, _ in _class_sums(pipe, a, b):
        if total is None:
            total = np.zeros((pipe.num_classes, sums.shape[1], sources.shape[1]), dtype=np.float64)
        src = sources[classes]
        picked = np.take_along_axis(sums, np.maximum(src, 0)[:, None, :], axis=2)
        total[classes] += np.where(src[:, None, :] >= 0, picked, 0.0)
    return total


def top_sets(pipe, point: str, scores: np.ndarray | None = None) -> np.ndarray:
    """``[n_classes, top]`` the top concepts of ``point`` per class (by the score from the layer above;
    ``scores``: its :func:`class_scores`, when the caller has read them already)."""
    scores = class_scores(pipe, point, layer_above(pipe, point)) if scores is None else scores
    k = min(pipe.config.top_concepts, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def layer_above(pipe, point: str) -> str:
    """The graph layer above ``point``: the next analysed layer, or :data:`CLASSES` above the last."""
    pts = pipe.points
    return CLASSES if point == pts[-1] else pts[pts.index(point) + 1]


def present_classes(pipe) -> list[int]:
    """The classes with explained images (graphs are drawn only for these)."""
    return [c for c in range(pipe.num_classes) if pipe.explained_per_class[c] > 0]


def shared_concepts(scores: np.ndarray, c1: int, c2: int, k: int) -> list[tuple[int, float]]:
    """Up to ``k`` concepts important to both classes, strongest first: ``[(concept, score)]`` with
    ``score = min(s1/max s1, s2/max s2)`` over the positive parts of the two classes' rows of
    ``scores [n_classes, K]`` (none when a class has no positive score; only positive ``score``)."""
    s1, s2 = np.clip(scores[c1], 0, None), np.clip(scores[c2], 0, None)
    if k <= 0 or s1.max() <= 0 or s2.max() <= 0:
        return []
    both = np.minimum(s1 / s1.max(), s2 / s2.max())
    return [(int(q), float(both[q])) for q in np.argsort(-both, kind="stable")[:k] if both[q] > 0]


def neighbour_pairs(scores: np.ndarray, present: list[int], neighbours: int | None) -> list[tuple[int, int]]:
    """The class pairs ``(c1 < c2)`` that get pair graphs: each present class with its ``neighbours``
    most similar present classes — cosine of their rows of ``scores [n_classes, K]`` (the classifier-level
    concept scores), ties to the smaller id — ascending; every pair when ``neighbours`` is None or
    reaches ``len(present) − 1``."""
    if neighbours is None or neighbours >= len(present) - 1:
        return [(c1, c2) for i, c1 in enumerate(present) for c2 in present[i + 1:]]
    rows = scores[present].astype(np.float64)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    pairs = set()
    for i, c in enumerate(present):
        for j in np.argsort(-sim[i], kind="stable")[:neighbours]:
            pairs.add((min(c, present[j]), max(c, present[j])))
    return sorted(pairs)


def class_pairs(pipe) -> list[tuple[int, int]]:
    """:func:`neighbour_pairs` of the run (``pair_neighbours``), on the last layer's class scores (known
    after stage 4's first transition, before any transition needs the pairs)."""
    last = pipe.points[-1]
    return neighbour_pairs(class_scores(pipe, last, CLASSES), present_classes(pipe), pipe.config.pair_neighbours)


def shared_sets(pipe, point: str, scores: np.ndarray | None = None) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """``{(c1, c2): shared_concepts(…)}`` of ``point`` for every pair of :func:`class_pairs` (c1 < c2)."""
    scores = class_scores(pipe, point, layer_above(pipe, point)) if scores is None else scores
    return {(c1, c2): shared_concepts(scores, c1, c2, pipe.config.top_shared) for c1, c2 in class_pairs(pipe)}


def view_sets(pipe, point: str, scores: np.ndarray | None = None) -> np.ndarray:
    """``[n_classes, T]`` (−1 padded) the concepts of ``point`` whose GIG a class's images carry: its top
    set (first, in :func:`top_sets` order), then every concept it shares with another class
    (:func:`shared_sets`) that is not in its top set (ascending), so a pair view can wire its shared
    concepts to their children (paper Fig. 1). ``scores``: as in :func:`top_sets`."""
    # one pass over the chunk files of the transition above (tens of MB each at K = 16,384), not one per set
    scores = class_scores(pipe, point, layer_above(pipe, point)) if scores is None else scores
    tops = top_sets(pipe, point, scores)
    extra: dict[int, set] = {c: set() for c in range(pipe.num_classes)}
    for (c1, c2), shared in shared_sets(pipe, point, scores).items():
        for q, _ in shared:
            extra[c1].add(q)
            extra[c2].add(q)
    rows = [list(tops[c]) + sorted(extra[c] - set(tops[c].tolist())) for c in range(pipe.num_classes)]
    out = np.full((pipe.num_classes, max(len(r) for r in rows)), -1, dtype=np.int64)
    for c, r in enumerate(rows):
        out[c, :len(r)] = r
    return out


def image_top_concepts(per_concept: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image graph's nodes of layer a: each image's ``k`` concepts with the largest signed GIG summed over
    its targets (ties to the smaller id), and their GIG to each target (paper Fig. 3; stage 4 and
    :meth:`gig_fast.Run.explain` both use this).

    Args:
        per_concept: ``[T, n, K_a]`` GIG of every concept of a to each of the T targets, per image.
    Returns:
        ``(nodes [n, k] int64, values [n, k, T])``.
    """
    score = per_concept.sum(0)  # [n, K]
    nodes = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
    values = torch.gather(per_concept.permute(1, 2, 0), 1, nodes[:, :, None].expand(-1, -1, per_concept.shape[0]))
    return nodes, values
