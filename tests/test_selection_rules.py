"""The graph's selection rules on hand-made scores whose answer is worked out by hand (not by the code under
test): a pair's shared concepts, the class pairs that get pair graphs, an image's top concepts, and the
class concept scores, top sets and stage-4 target sets read from stage-4 chunk files written here.

The run-level counterpart (node scores of a finished run against direct ``gig()`` sums) is in
``test_run_values.py``."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gig_fast.pipeline.selection import (CLASSES, class_pair_weights, class_pairs, class_scores, image_top_concepts,
                                         neighbour_pairs, shared_concepts, top_sets, trans_dir, view_sets)


# ---------------------------------------------------------------------------------------------- shared
def test_shared_concepts_is_the_min_of_the_max_normalised_positive_scores():
    scores = np.array([[4.0, 2.0, 0.0, 1.0, -3.0],
                       [1.0, 2.0, 5.0, 0.0, 2.0]])
    # class 0 / max 4: [1, .5, 0, .25, 0]; class 1 / max 5: [.2, .4, 1, 0, .4]; min: [.2, .4, 0, 0, 0]
    got = shared_concepts(scores, 0, 1, k=3)
    assert [q for q, _ in got] == [1, 0]  # strongest first; concepts at 0 are not shared
    np.testing.assert_allclose([v for _, v in got], [0.4, 0.2], rtol=1e-12)
    assert shared_concepts(scores, 1, 0, k=3) == got  # symmetric in the two classes
    assert [q for q, _ in shared_concepts(scores, 0, 1, k=1)] == [1]


def test_shared_concepts_ignores_negative_scores_and_breaks_ties_to_the_smaller_id():
    scores = np.array([[-1.0, 3.0, 3.0, 6.0],
                       [-9.0, 1.0, 1.0, 0.0]])
    # positive parts: [0, .5, .5, 1] and [0, 1, 1, 0]; min [0, .5, .5, 0]: a tie of 1 and 2
    assert shared_concepts(scores, 0, 1, k=5) == [(1, 0.5), (2, 0.5)]
    # a class without any positive score shares nothing (not a division by zero or a negative max)
    assert shared_concepts(np.array([[1.0, 2.0], [-1.0, -2.0]]), 0, 1, k=2) == []
    assert shared_concepts(scores, 0, 1, k=0) == []


# ---------------------------------------------------------------------------------------------- pairs
def test_neighbour_pairs_picks_the_most_similar_present_classes():
    scores = np.array([[1.0, 0.0, 0.0],    # 0 ~ 1
                       [0.9, 0.1, 0.0],
                       [0.0, 1.0, 0.1],    # 2 ~ 4 (class 3 has no explained images)
                       [1.0, 0.0, 0.0],
                       [0.1, 1.0, 0.0]])
    present = [0, 1, 2, 4]
    assert neighbour_pairs(scores, present, 1) == [(0, 1), (2, 4)]
    assert neighbour_pairs(scores, present, None) == [(0, 1), (0, 2), (0, 4), (1, 2), (1, 4), (2, 4)]
    assert neighbour_pairs(scores, present, 3) == neighbour_pairs(scores, present, None)


# ---------------------------------------------------------------------------------------------- image
def test_image_top_concepts_sums_over_targets_and_keeps_signed_order():
    # [T=2, n=2, K=4]; image 0 sums to [3, -5, 3, 1] (tie 0/2 → 0 first), image 1 to [0, 2, 1, 7]
    pc = torch.tensor([[[1.0, -2.0, 1.0, 1.0], [0.0, 1.0, 1.0, 3.0]],
                       [[2.0, -3.0, 2.0, 0.0], [0.0, 1.0, 0.0, 4.0]]], dtype=torch.float64)
    nodes, values = image_top_concepts(pc, 3)
    assert nodes.tolist() == [[0, 2, 3], [3, 1, 2]]  # the −5 is not among the "strongest": signed order
    assert values.tolist() == [[[1.0, 2.0], [1.0, 2.0], [1.0, 0.0]], [[3.0, 4.0], [1.0, 1.0], [1.0, 0.0]]]


# ------------------------------------------------------------------------- class scores from chunk files
def _pipe(tmp_path, num_classes=4, top_concepts=2, top_shared=1, pair_neighbours=None, points=("a", "b")):
    return SimpleNamespace(work=tmp_path, num_classes=num_classes, points=list(points),
                           explained_per_class=np.ones(num_classes, dtype=np.int64),
                           config=SimpleNamespace(top_concepts=top_concepts, top_shared=top_shared,
                                                  pair_neighbours=pair_neighbours))


def _chunk(pipe, a, b, index, classes, class_sum, n_top):
    folder = trans_dir(pipe, a, b)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"chunk_{index:05d}.npz", classes=np.asarray(classes, dtype=np.int64),
             class_sum=np.asarray(class_sum, dtype=np.float64), n_top=np.int64(n_top))


def test_class_scores_sum_the_top_targets_of_every_chunk_only(tmp_path):
    pipe = _pipe(tmp_path)
    # chunk 0: classes 0 and 2, T = 3 targets of which the first 2 are the top set; the third (a shared
    # target) must not count
    _chunk(pipe, "a", "b", 0, [0, 2], [[[1, 0, 0], [0, 2, 0], [100, 100, 100]],
                                       [[0, 0, 1], [0, 0, 1], [100, 100, 100]]], n_top=2)
    # chunk 1: classes 0 and 3
    _chunk(pipe, "a", "b", 1, [0, 3], [[[0, 0, 5], [1, 1, 1], [-50, 0, 0]],
                                       [[2, 0, 0], [0, 0, 0], [0, 7, 0]]], n_top=2)
    want = np.array([[2.0, 3.0, 6.0],   # class 0: [1, 2, 0] + [1, 1, 6]
                     [0.0, 0.0, 0.0],   # class 1: no images
                     [0.0, 0.0, 2.0],
                     [2.0, 0.0, 0.0]])
    np.testing.assert_array_equal(class_scores(pipe, "a", "b"), want)
    np.testing.assert_array_equal(top_sets(pipe, "a"), [[2, 1], [0, 1], [2, 0], [0, 1]])  # ties: smaller id


def test_class_pair_weights_gathers_each_classes_sources_with_padding(tmp_path):
    pipe = _pipe(tmp_path, num_classes=2)
    _chunk(pipe, "a", "b", 0, [0, 1], [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]], n_top=1)
    _chunk(pipe, "a", "b", 1, [1], [[[1, 1, 1], [1, 1, 1]]], n_top=1)
    sources = np.array([[2, 0], [1, -1]])
    want = np.array([[[3, 1], [6, 4]],           # class 0: columns 2, 0
                     [[8 + 1, 0], [11 + 1, 0]]])  # class 1: column 1 (both chunks), then padding
    np.testing.assert_array_equal(class_pair_weights(pipe, "a", "b", sources), want)


def test_view_sets_are_the_top_set_then_the_shared_concepts_outside_it(tmp_path):
    """The stage-4 targets of each class: its top set (by score), then every concept it shares with a
    paired class that is not in its top set, ascending — worked out by hand on chunk files written here."""
    pipe = _pipe(tmp_path, num_classes=3, top_concepts=1, top_shared=2, points=("a", "b"))
    # the class scores of b (the last layer, so the transition b → classes; one target per class)
    sb = np.array([[5.0, 4.0, 0.0, 1.0],
                   [0.0, 4.0, 3.0, 0.0],
                   [1.0, 0.0, 2.0, 6.0]])
    _chunk(pipe, "b", CLASSES, 0, [0, 1, 2], sb[:, None, :], n_top=1)
    # top sets (1 each): 0 → [0], 1 → [1], 2 → [3]
    # shared (2 per pair, every pair: pair_neighbours None):
    #   0-1: min([1, .8, 0, .2], [0, 1, .75, 0]) = [0, .8, 0, 0]      → [1]
    #   0-2: min([1, .8, 0, .2], [1/6, 0, 1/3, 1]) = [1/6, 0, 0, .2]  → [3, 0]
    #   1-2: min([0, 1, .75, 0], [1/6, 0, 1/3, 1]) = [0, 0, 1/3, 0]   → [2]
    # class 0: top [0], shared {1, 3, 0} − {0} → [0, 1, 3]; class 1: [1], {1, 2} − {1} → [1, 2];
    # class 2: [3], {3, 0, 2} − {3} → [3, 0, 2]
    want = np.array([[0, 1, 3], [1, 2, -1], [3, 0, 2]])
    np.testing.assert_array_equal(view_sets(pipe, "b"), want)


@pytest.mark.parametrize("neighbours, want", [(1, [(0, 1), (2, 3)]), (None, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])])
def test_class_pairs_follow_pair_neighbours_on_the_last_layers_scores(tmp_path, neighbours, want):
    pipe = _pipe(tmp_path, num_classes=4, pair_neighbours=neighbours, points=("a", "b"))
    sb = np.array([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.1, 0.8]])
    _chunk(pipe, "b", CLASSES, 0, [0, 1, 2, 3], sb[:, None, :], n_top=1)
    assert class_pairs(pipe) == want
