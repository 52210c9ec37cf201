"""The dataset-wide concept graph (docs/design.md §1.6) and its files: ``graph.json``, ``metrics.json``.

Schema: ``docs/graph_schema.md`` (``schema = "gig_fast.graph"``, ``version = 1``). Built only from
the stage files, so a resumed run writes the same graph as an uninterrupted one. :func:`write_graph`
streams every image's graph chunk by chunk into the per-image store (:mod:`gig_fast.image_store`,
``<out>/store/``; memory independent of the number of explained images) and keeps a sample of
``graph_images`` of them, round-robin over classes, in ``graph.json``; :func:`build_graph` returns
the content of ``graph.json`` as one dict.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..image_store import ImageStoreWriter
from ..run_folder import CODES, STORE_DIR, chunk_files
from .errors import class_error_sums, load_errors
from .selection import (CLASSES, class_pair_weights, class_scores, present_classes, shared_sets, top_sets, trans_dir,
                        transitions, view_sets)
from .stages import load_concepts
from .files import save_json

__all__ = ["build_graph", "write_graph", "image_layer_graph", "error_entry", "SCHEMA", "SCHEMA_VERSION",
           "READABLE_VERSIONS"]

SCHEMA, SCHEMA_VERSION = "gig_fast.graph", 2
READABLE_VERSIONS = (1, 2)  # version 1: no error nodes (read as none)


def _norm(weights: np.ndarray) -> np.ndarray:
    """Display weight in [0, 1]: |w| / max |w| over one layer pair of one graph."""
    m = np.abs(weights).max() if weights.size else 0.0
    return np.abs(weights) / m if m > 0 else np.zeros_like(weights, dtype=np.float64)


def _r(x: float) -> float:
    return float(f"{float(x):.6g}")


def _concepts_section(pipe) -> dict:
    out = {}
    for point in pipe.points:
        c = load_concepts(pipe, point)
        V, sizes, reps = c["V"], c["sizes"], c["representatives"]
        data = pipe.stage1_index(point)  # rows → (image, position)
        norms = V.norm(dim=1)
        out[point] = [
            {"id": j, "size": int(sizes[j]), "norm": _r(norms[j]),
             "samples": [[int(data["image"][r]), int(data["position"][r])] for r in reps[j].tolist() if r >= 0]}
            for j in range(V.shape[0])]
    return out


def build_graph(pipe) -> dict:
    """The content of ``graph.json`` (see ``docs/graph_schema.md``) as one dict, ``images`` the sample."""
    head, pairs = graph_summary(pipe)
    head["pair_graphs"] = {f"{a}-{b}": pairs.entry(a, b) for a, b in pair_sample(pairs.keys, pipe.config.graph_pairs)}
    sample = sample_quota(pipe)
    images, total = [], 0
    for chunk in _image_graph_chunks(pipe):
        images += _take_sample(chunk, sample)
        total += len(chunk)
    return {**head, "images": images, "images_total": total, "store": STORE_DIR}


def write_graph(pipe, path: str | Path) -> dict:
    """Write ``graph.json`` to ``path`` and the per-image store to ``<path's folder>/store`` (both
    atomically; the image graphs streamed one chunk at a time, so memory does not grow with the number
    of explained images). Returns the ``graph.json`` dict (:func:`build_graph`'s)."""
    head, pairs = graph_summary(pipe)
    layers = {lay["name"]: lay["n_concepts"] for lay in head["layers"] if lay["name"] != CLASSES}
    writer = ImageStoreWriter(Path(path).parent / STORE_DIR, layers, head["run_key"])
    sample = sample_quota(pipe)
    kept = set(pair_sample(pairs.keys, pipe.config.graph_pairs))
    images, total = [], 0
    try:
        for start in range(0, len(pairs.keys), PAIR_BATCH):  # every pair to the store, the sample also here
            batch = {(a, b): pairs.entry(a, b) for a, b in pairs.keys[start:start + PAIR_BATCH]}
            writer.add_pair_graphs(list(batch.values()))
            head["pair_graphs"].update({f"{a}-{b}": g for (a, b), g in batch.items() if (a, b) in kept})
        for cpath, chunk in zip(chunk_files(pipe.work / CODES), _image_graph_chunks(pipe)):
            writer.add_graphs(chunk)
            _rank_concepts(pipe, writer, cpath)
            images += _take_sample(chunk, sample)
            total += len(chunk)
        graph = {**head, "images": images, "images_total": total, "store": STORE_DIR}
        save_json(path, graph, compact=True)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return graph


PAIR_BATCH = 256  # pair graphs built and written to the store at a time


def sample_quota(pipe) -> dict[int, int]:
    """``{class: n}``: the images of each class that ``graph.json`` keeps (its first n by id), dealt
    round-robin over the classes with explained images until ``graph_images`` are chosen."""
    counts = pipe.explained_per_class
    quota = {c: 0 for c in np.flatnonzero(counts).tolist()}
    left = int(pipe.config.graph_images)
    while left > 0 and any(quota[c] < counts[c] for c in quota):
        for c in quota:
            if left > 0 and quota[c] < counts[c]:
                quota[c] += 1
                left -= 1
    return quota


def _take_sample(chunk: list[dict], quota: dict[int, int]) -> list[dict]:
    """The entries of ``chunk`` that the sample keeps (``quota`` counts down as they are taken)."""
    out = []
    for g in chunk:
        if quota.get(int(g["class"]), 0) > 0:
            quota[int(g["class"])] -= 1
            out.append(g)
    return out


def _rank_concepts(pipe, writer: ImageStoreWriter, codes_path: Path) -> None:
    """Feed one stage-3 chunk's codes to the store's per-concept image rankings."""
    with np.load(codes_path, allow_pickle=False) as z:
        images = z["image"]
        classes = z["label" if pipe.config.class_by == "label" else "prediction"]
        for layer in pipe.points:
            writer.add_codes(layer, images, classes, z[f"{layer}|idx"], z[f"{layer}|val"])


def graph_summary(pipe) -> tuple[dict, "_PairGraphs"]:
    """Every section of ``graph.json`` except the per-image ``images`` (its size does not grow with
    the number of explained images) and the pair graphs, which come as a :class:`_PairGraphs` that
    builds them one at a time (``pair_graphs`` left empty, ``pairs_total`` set)."""
    cfg = pipe.config
    pts = pipe.points
    n_cls = pipe.num_classes
    trans = transitions(pipe)  # top-down
    scores = {a: class_scores(pipe, a, b) for a, b in trans}  # [n_classes, K_a]: one pass over each transition's files
    tops = {p: top_sets(pipe, p, scores[p]) for p in pts}
    views = {p: view_sets(pipe, p, scores[p]) for p in pts}  # top sets, then the concepts shared with other classes
    shared = {p: shared_sets(pipe, p, scores[p]) for p in pts}
    layers = [{"name": p, "channels": pipe.adapter.channels(p), "n_concepts": int(scores[p].shape[1]),
               "spatial": list(pipe.spatial[p])} for p in pts] + [{"name": CLASSES, "n_concepts": n_cls}]

    # graphs only for the classes that have explained images (1,000 ImageNet classes × pairs otherwise)
    per_class = pipe.explained_per_class
    present = present_classes(pipe)
    # [n_classes, T, S] per transition: the GIG of each class's view-set sources to its view-set targets
    # (top sets first), read once (not once per class: it sums every chunk file)
    pair_w = {(a, b): class_pair_weights(pipe, a, b, views[a]) for a, b in trans if b != CLASSES}
    class_errors = {a: class_error_sums(pipe, a) for a, _ in trans}  # None where the run has no error nodes
    class_graphs, peak = {}, {}
    for c in present:
        nodes, edges = {}, []
        for a, b in trans:
            s = scores[a][c]
            top = tops[a][c]
            nodes[a] = [{"concept": int(q), "score": _r(s[q]), "normalized": _r(v)}
                        for q, v in zip(top, _norm(s[top]))]
            if b == CLASSES:
                w = s[top]
                pairs = [(int(q), c, w[i]) for i, q in enumerate(top)]
            else:
                W = pair_w[(a, b)][c]  # [T, S]: rows in the order of tops[b][c], columns of `top`
                pairs = [(int(q), int(t), W[ti, qi]) for ti, t in enumerate(tops[b][c]) for qi, q in enumerate(top)]
            peak[(c, a)] = max((abs(p[2]) for p in pairs), default=0.0)
            edges += _edges(a, b, pairs, peak[(c, a)])
        class_graphs[str(c)] = {"nodes": nodes, "edges": edges}
        if all(e is not None for e in class_errors.values()):
            class_graphs[str(c)]["errors"] = {
                a: error_entry(b, [c] if b == CLASSES else tops[b][c], class_errors[a][c], peak[(c, a)])
                for a, b in trans}

    pairs = _PairGraphs(pts, trans, tops, views, scores, shared, pair_w, peak)
    head = {
        "schema": SCHEMA, "version": SCHEMA_VERSION, "run_key": pipe.config.key(),
        "model": {"arch": cfg.model, "weights": cfg.weights, "dataset": cfg.dataset, "split": cfg.split},
        "settings": {"top_concepts": cfg.top_concepts, "top_shared": cfg.top_shared,
                     "pair_neighbours": cfg.pair_neighbours, "gig_steps": cfg.gig_steps,
                     "gig_rule": cfg.gig_rule, "class_by": cfg.class_by, "attribution": cfg.attribution,
                     "class_probability": cfg.class_probability},
        "classes": [{"id": c, "name": pipe.class_names[c], "n_images": int(per_class[c])}
                    for c in range(n_cls)],
        "layers": layers,
        "concepts": _concepts_section(pipe),
        "class_graphs": class_graphs,
        "pair_graphs": {},  # filled by the caller: the sample of pair_sample()
        "pairs_total": len(pairs.keys),
    }
    return head, pairs


class _PairGraphs:
    """The run's pair graphs (``graph.json``'s ``pair_graphs`` entries), built one at a time: on the demo
    each holds ~900 edges, so 10,000 pairs of a 1,000-class run at once would be GBs of dicts."""

    def __init__(self, pts, trans, tops, views, scores, shared, pair_w, peak):
        self.pts, self.trans, self.tops, self.views = pts, trans, tops, views
        self.scores, self.shared, self.pair_w, self.peak = scores, shared, pair_w, peak
        self.keys = sorted(next(iter(shared.values()))) if shared else []  # (c1, c2) ascending

    def entry(self, c1: int, c2: int) -> dict:
        pts, shared, scores = self.pts, self.shared, self.scores
        both = {p: [q for q, _ in shared[p][(c1, c2)]] for p in pts}
        return {"classes": [c1, c2],
                "shared": {p: [{"concept": q, "score": _r(v), "importance": [_r(scores[p][c1][q]), _r(scores[p][c2][q])]}
                               for q, v in shared[p][(c1, c2)]] for p in pts if shared[p][(c1, c2)]},
                "edges": [e for c in (c1, c2) for e in _shared_edges(c, self.trans, self.tops, self.views, scores,
                                                                     self.pair_w, both, self.peak)]}


def pair_sample(pairs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The ``n`` pairs that ``graph.json`` keeps (all when there are no more): dealt round-robin over the
    smaller class of each pair, so every class with pairs gets some before any gets many; ascending."""
    if len(pairs) <= n:
        return list(pairs)
    groups: dict[int, list] = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(pair)
    chosen, r = [], 0
    while len(chosen) < n:
        for group in groups.values():
            if r < len(group) and len(chosen) < n:
                chosen.append(group[r])
        r += 1
    return sorted(chosen)


def _edges(a: str, b: str, pairs: list[tuple[int, int, float]], peak: float, **extra) -> list[dict]:
    """Edge entries ``(source q of a, target t of b, weight)``, normalised by ``peak`` (the largest |weight|
    of the layer pair in the graph they are drawn with)."""
    return [{"source": [a, q], "target": [b, t], **extra, "weight": _r(w),
             "normalized": _r(abs(w) / peak if peak > 0 else 0.0)} for q, t, w in pairs]


def _shared_edges(c: int, trans, tops, views, scores, pair_w, shared: dict[str, list[int]], peak) -> list[dict]:
    """The edges that wire a pair's shared concepts into class ``c``'s graph (paper Fig. 1): per layer pair
    (a, b), from the class's top concepts and the shared ones of a to those of b (or to the class), each
    with a shared end; weight = Σ over the class's images of GIG(q → t). Normalised with the class
    graph's edges of the layer pair, so a pair view draws both on one scale."""
    out = []
    for a, b in trans:
        top_a = [int(q) for q in tops[a][c]]
        src = top_a + [q for q in shared[a] if q not in top_a]
        if b == CLASSES:
            pairs = [(q, c, scores[a][c][q]) for q in src if q not in top_a]
        else:
            top_b = [int(t) for t in tops[b][c]]
            dst = top_b + [t for t in shared[b] if t not in top_b]
            col, row = list(views[a][c]), list(views[b][c])  # stage 4's sources and targets of the class
            W = pair_w[(a, b)][c]
            pairs = [(q, t, W[row.index(t), col.index(q)]) for t in dst for q in src
                     if not (q in top_a and t in top_b)]  # those are the class graph's own edges
        if pairs:
            m = max(peak.get((c, a), 0.0), max(abs(p[2]) for p in pairs))
            out += _edges(a, b, pairs, m, **{"class": c})
    return out


def image_layer_graph(a: str, b: str, nodes, targets, values, top: int) -> tuple[list[dict], list[dict]]:
    """One layer pair of an image's graph (paper Fig. 3; ``graph.json``'s ``images[]`` and ``gig-fast explain``).

    Args:
        a, b: the layer pair (b may be ``classes``).
        nodes: ``[k]`` the image's own top concepts of a (:func:`~gig_fast.pipeline.selection.image_top_concepts`).
        targets: ``[T]`` its own targets of b (its top concepts of b, or its class).
        values: ``[k, T]`` GIG of each node to each target (this image only).
        top: edges kept: the ``top`` strongest by |GIG|.

    Returns:
        ``(node entries of a, edge entries a → b)``: node score = its GIG summed over the targets.
    """
    values = np.asarray(values, dtype=np.float64)
    entries = [{"concept": int(q), "score": _r(values[i].sum())} for i, q in enumerate(nodes)]
    cand = [(int(q), int(t), float(values[i, ti])) for i, q in enumerate(nodes) for ti, t in enumerate(targets)]
    cand.sort(key=lambda e: -abs(e[2]))  # stable: ties keep node, then target order
    cand = cand[:top]
    return entries, _edges(a, b, cand, max((abs(e[2]) for e in cand), default=0.0))


def error_entry(b: str, targets, values, peak: float) -> dict:
    """A graph's error node of one layer a (``docs/graph_schema.md``): its GIG ``values [T]`` to the graph's
    ``targets [T]`` of b; ``score`` their sum; ``normalized`` on the scale of the graph's concept edges of
    the layer pair (``peak``: their largest |weight|), or its own where it is larger."""
    values = np.asarray(values, dtype=np.float64)
    m = max(float(peak), float(np.abs(values).max(initial=0.0)))
    return {"score": _r(values.sum()),
            "edges": [{"target": [b, int(t)], "weight": _r(w), "normalized": _r(abs(w) / m if m > 0 else 0.0)}
                      for t, w in zip(targets, values)]}


def _image_graph_chunks(pipe):
    """Per explained image its own graph: its strongest concepts per layer and edges to its own top
    concepts of the layer above (paper Fig. 3); yields one list per stage-3/4 chunk (images ascending),
    reading only that chunk's files."""
    trans = transitions(pipe)
    last = -1
    for cpath in chunk_files(pipe.work / CODES):
        with np.load(cpath, allow_pickle=False) as z:
            meta = dict(zip(z["image"].tolist(), zip(z["label"].tolist(), z["prediction"].tolist())))
        per_image: dict[int, dict] = {}
        for a, b in trans:
            with np.load(trans_dir(pipe, a, b) / cpath.name, allow_pickle=False) as z:
                if "own_nodes" not in z.files:
                    raise ValueError(f"{trans_dir(pipe, a, b) / cpath.name} has no image graphs (an older run); "
                                     f"delete {pipe.work} and rerun")
                imgs, targets, nodes, values = z["image"], z["own_targets"], z["own_nodes"], z["own_val"]
            errors = load_errors(pipe, cpath.name)
            if errors is not None and not np.array_equal(errors["image"], imgs):
                raise ValueError(f"the error nodes of {cpath.name} are of other images; delete {pipe.work} and rerun")
            for r, img in enumerate(imgs.tolist()):
                label, pred = meta[img]
                c = label if pipe.config.class_by == "label" else pred
                g = per_image.setdefault(img, {"id": img, "label": label, "prediction": pred, "class": c,
                                               "nodes": {}, "edges": []})
                g["nodes"][a], edges = image_layer_graph(a, b, nodes[r], targets[r], values[r], pipe.config.top_concepts)
                g["edges"] += edges
                if errors is not None:
                    peak = max((abs(e["weight"]) for e in edges), default=0.0)
                    g.setdefault("errors", {})[a] = error_entry(b, targets[r], errors[f"{a}|own_error"][r], peak)
        ids = sorted(per_image)
        if ids and ids[0] <= last:  # chunks hold ascending, disjoint image ranges (chunk_ids of sorted ids)
            raise ValueError(f"{cpath} repeats or reorders explained images; delete {pipe.work} and rerun")
        last = ids[-1] if ids else last
        yield [per_image[k] for k in ids]
