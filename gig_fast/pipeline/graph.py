"""The dataset-wide concept graph (DESIGN.md §1.6) and its files: ``graph.json``, ``metrics.json``.

Schema: ``docs/graph_schema.md`` (``schema = "gig_fast.graph"``, ``version = 1``). Built only from
the stage files, so a resumed run writes the same graph as an uninterrupted one. :func:`write_graph`
streams every image's graph chunk by chunk into the per-image store (:mod:`gig_fast.image_store`,
``<out>/store/``; memory independent of the number of explained images) and keeps a sample of
``graph_images`` of them, round-robin over classes, in ``graph.json``; :func:`build_graph` returns
the content of ``graph.json`` as one dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..image_store import ImageStoreWriter
from .stages import CLASSES, trans_dir, class_pair_weights, class_scores, load_concepts, top_sets, transitions
from .store import save_json

__all__ = ["build_graph", "write_graph", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA, SCHEMA_VERSION = "gig_fast.graph", 1


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
    sample = sample_quota(pipe)
    images, total = [], 0
    for chunk in _image_graph_chunks(pipe):
        images += _take_sample(chunk, sample)
        total += len(chunk)
    return {**graph_summary(pipe), "images": images, "images_total": total, "store": STORE_DIR}


def write_graph(pipe, path: str | Path) -> dict:
    """Write ``graph.json`` to ``path`` and the per-image store to ``<path's folder>/store`` (both
    atomically; the image graphs streamed one chunk at a time, so memory does not grow with the number
    of explained images). Returns the ``graph.json`` dict (:func:`build_graph`'s)."""
    head = graph_summary(pipe)
    layers = {lay["name"]: lay["n_concepts"] for lay in head["layers"] if lay["name"] != CLASSES}
    writer = ImageStoreWriter(Path(path).parent / STORE_DIR, layers, head["run_key"])
    sample = sample_quota(pipe)
    images, total = [], 0
    try:
        for cpath, chunk in zip(sorted((pipe.work / "codes").glob("chunk_*.npz")), _image_graph_chunks(pipe)):
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


STORE_DIR = "store"  # the per-image store's folder, relative to graph.json


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


def graph_summary(pipe) -> dict:
    """Every section of ``graph.json`` except the per-image ``images`` (its size does not grow with
    the number of explained images)."""
    cfg = pipe.config
    pts = pipe.points
    n_cls = pipe.num_classes
    trans = transitions(pipe)  # top-down
    tops = {p: top_sets(pipe, p) for p in pts}
    scores = {a: class_scores(pipe, a, b) for a, b in trans}  # [n_classes, K_a]
    layers = [{"name": p, "channels": pipe.adapter.channels(p), "n_concepts": int(scores[p].shape[1]),
               "spatial": list(pipe.spatial[p])} for p in pts] + [{"name": CLASSES, "n_concepts": n_cls}]

    # graphs only for the classes that have explained images (1,000 ImageNet classes × pairs otherwise)
    per_class = pipe.explained_per_class
    present = [c for c in range(n_cls) if per_class[c] > 0]
    # [n_classes, T, top] per transition: the GIG of each class's top sources to its top targets, read
    # once (not once per class: it sums every chunk file)
    pair_w = {(a, b): class_pair_weights(pipe, a, b, tops[a]) for a, b in trans if b != CLASSES}
    class_graphs = {}
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
                W = pair_w[(a, b)][c]  # [T, top]: columns in the order of `top`
                pairs = [(int(q), int(t), W[ti, qi]) for ti, t in enumerate(tops[b][c]) for qi, q in enumerate(top)]
            norm = _norm(np.array([p[2] for p in pairs]))
            edges += [{"source": [a, q], "target": [b, t], "weight": _r(w), "normalized": _r(n)}
                      for (q, t, w), n in zip(pairs, norm)]
        class_graphs[str(c)] = {"nodes": nodes, "edges": edges}

    pair_graphs = {}
    for i, c1 in enumerate(present):
        for c2 in present[i + 1:]:
            shared = {}
            for a, _ in trans:
                s1, s2 = np.clip(scores[a][c1], 0, None), np.clip(scores[a][c2], 0, None)
                if s1.max() <= 0 or s2.max() <= 0:
                    continue
                both = np.minimum(s1 / s1.max(), s2 / s2.max())
                order = np.argsort(-both, kind="stable")[:cfg.top_shared]
                keep = [{"concept": int(q), "score": _r(both[q]), "importance": [_r(scores[a][c1][q]),
                                                                                 _r(scores[a][c2][q])]}
                        for q in order if both[q] > 0]
                if keep:
                    shared[a] = keep
            pair_graphs[f"{c1}-{c2}"] = {"classes": [c1, c2], "shared": shared}

    return {
        "schema": SCHEMA, "version": SCHEMA_VERSION, "run_key": pipe.config.key(),
        "model": {"arch": cfg.model, "weights": cfg.weights, "dataset": cfg.dataset, "split": cfg.split},
        "settings": {"top_concepts": cfg.top_concepts, "top_shared": cfg.top_shared, "gig_steps": cfg.gig_steps,
                     "gig_rule": cfg.gig_rule, "class_by": cfg.class_by, "attribution": cfg.attribution,
                     "class_probability": cfg.class_probability},
        "classes": [{"id": c, "name": pipe.class_names[c], "n_images": int(per_class[c])}
                    for c in range(n_cls)],
        "layers": layers,
        "concepts": _concepts_section(pipe),
        "class_graphs": class_graphs,
        "pair_graphs": pair_graphs,
    }


def _image_graph_chunks(pipe):
    """Per explained image its strongest concepts per layer and edges to its class's top targets:
    yields one list per stage-3/4 chunk (images ascending), reading only that chunk's files."""
    trans = transitions(pipe)
    tops = {p: top_sets(pipe, p) for p in pipe.points}
    last = -1
    for cpath in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(cpath, allow_pickle=False) as z:
            meta = dict(zip(z["image"].tolist(), zip(z["label"].tolist(), z["prediction"].tolist())))
        per_image: dict[int, dict] = {}
        for a, b in trans:
            with np.load(trans_dir(pipe, a, b) / cpath.name, allow_pickle=False) as z:
                imgs, tidx, tval = z["image"], z["top_idx"], z["top_val"]
            _add_image_entries(pipe, per_image, meta, a, b, tops, imgs, tidx, tval)
        ids = sorted(per_image)
        if ids and ids[0] <= last:  # chunks hold ascending, disjoint image ranges (chunk_ids of sorted ids)
            raise ValueError(f"{cpath} repeats or reorders explained images; delete {pipe.work} and rerun")
        last = ids[-1] if ids else last
        yield [per_image[k] for k in ids]


def _add_image_entries(pipe, per_image, meta, a, b, tops, imgs, tidx, tval) -> None:
    """Add the nodes and edges of layer pair (a, b) of the images of one chunk to ``per_image``."""
    for r, img in enumerate(imgs.tolist()):
        label, pred = meta[img]
        c = label if pipe.config.class_by == "label" else pred
        g = per_image.setdefault(img, {"id": img, "label": label, "prediction": pred, "class": c,
                                       "nodes": {}, "edges": []})
        vals = tval[r]  # [M, T]
        strength = vals.sum(1)
        k = min(pipe.config.top_concepts, len(strength))
        sel = np.argsort(-strength, kind="stable")[:k]
        g["nodes"][a] = [{"concept": int(tidx[r, i]), "score": _r(strength[i])} for i in sel]
        targets = [c] if b == CLASSES else [int(t) for t in tops[b][c]]
        # the image's strongest edges of this layer pair (as many as top_concepts)
        cand = [(int(tidx[r, i]), t, float(vals[i, ti])) for i in sel for ti, t in enumerate(targets)]
        cand.sort(key=lambda e: -abs(e[2]))
        cand = cand[:pipe.config.top_concepts]
        norm = _norm(np.array([e[2] for e in cand]))
        g["edges"] += [{"source": [a, q], "target": [b, t], "weight": _r(w), "normalized": _r(n)}
                       for (q, t, w), n in zip(cand, norm)]
