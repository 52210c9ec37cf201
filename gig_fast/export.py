"""Export a graph as the attribution-graph JSON that other frontends open (``docs/export.md``).

The format is the one circuit-tracer writes and its local viewer and Neuronpedia's graph viewer load:
``metadata`` (slug, scan, prompt, prompt_tokens …), ``qParams`` (the viewer's saved state), ``nodes``
(``node_id``, ``feature``, ``layer``, ``ctx_idx``, ``feature_type``, ``influence``, ``activation``,
``clerp`` …) and ``links`` (``source``, ``target``, ``weight``). The mapping from a gig_fast graph:

* analysed layer ``i`` (forward order) → ``layer = "i"``; a concept q of it → a feature node
  ``"i_q_0"`` labelled ``"<layer>:<q>"``; the layer's error node (the reconstruction residual) → an
  ``"mlp reconstruction error"`` node ``"i_error_0"``; a class → a ``logit`` node on the layer after the
  last; the image (or the class's images) → one ``embedding`` node, the only context position.
* A gig_fast graph is not per position (a node is a concept summed over the positions of its layer),
  so every node has ``ctx_idx = 0`` and ``prompt_tokens`` holds that one position.
* ``links``: the graph's edges with their GIG weights (signed, in the target's units); ``influence``: the
  node's share of its layer's total |score|, accumulated strongest first (circuit-tracer's cumulative
  influence, per layer: the viewer's ``node_threshold`` then keeps, per layer, the strongest nodes that
  make up that share).

:func:`neuronpedia_graph` maps a :class:`~gig_fast.api.types.Graph`; :meth:`gig_fast.Run.export` and
``gig-fast export`` pick the image, class or pair graph and write the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .api.types import Edge, ErrorNode, Graph, Node

__all__ = ["neuronpedia_graph", "merge_graphs", "GraphContext", "FORMATS", "CONCEPT_TYPE", "ERROR_TYPE"]

FORMATS = ("neuronpedia",)
CONCEPT_TYPE = "cross layer transcoder"  # the viewers' type of a dictionary feature (drawn as a feature node)
ERROR_TYPE = "mlp reconstruction error"  # the viewers' error-node type (drawn dimmed, left out of pruning)
CLASSES = "classes"


@dataclass
class GraphContext:
    """What the exported file says about the graph beyond its nodes and edges.

    Attributes:
        slug: the graph's name in the viewer (lower-case letters, digits and dashes are kept).
        scan: the model's name (Neuronpedia reads it as a model id).
        prompt: what was explained, in words (e.g. ``"image 123 (label Sneaker)"``), the one context
            position.
        layers: the analysed layers in forward order.
        class_names: by class id.
        probabilities: ``{class: p}`` of the logit nodes (an image's softmax probability, or the mean over
            a class's images); classes not given are written with ``p=nan``.
        activations: ``{(layer, concept): value}`` of the feature nodes (an image's code sum over the
            layer's positions); None where not given.
        pinned: ``(layer, concept)`` nodes the viewer shows pinned (a pair graph's shared concepts).
        info: ``metadata.info`` (description, generator …).
    """
    slug: str
    scan: str
    prompt: str
    layers: list[str]
    class_names: list[str]
    probabilities: dict[int, float] = field(default_factory=dict)
    activations: dict[tuple[str, int], float] = field(default_factory=dict)
    pinned: list[tuple[str, int]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "graph"


def merge_graphs(graphs: list[Graph], extra_edges: list[Edge] = ()) -> Graph:
    """One graph of several (a pair graph: its two class graphs and the pair's edges): nodes, edges and
    error nodes that occur in more than one are merged, their scores and weights added (each is a sum
    over its own class's images, so the sum is over the images of both). ``normalized`` is recomputed per
    layer (nodes) and per layer pair (edges)."""
    scores: dict[tuple[str, int], float] = {}
    weights: dict[tuple[str, int, str, int], float] = {}
    errors: dict[str, dict[tuple[str, int], float]] = {}
    for g in graphs:
        for n in g.nodes:
            scores[(n.layer, n.concept)] = scores.get((n.layer, n.concept), 0.0) + n.score
        for e in list(g.edges):
            key = (e.source_layer, e.source, e.target_layer, e.target)
            weights[key] = weights.get(key, 0.0) + e.weight
        for err in g.errors:
            into = errors.setdefault(err.layer, {})
            for e in err.edges:
                into[(e.target_layer, e.target)] = into.get((e.target_layer, e.target), 0.0) + e.weight
    for e in extra_edges:
        key = (e.source_layer, e.source, e.target_layer, e.target)
        weights.setdefault(key, 0.0)
        weights[key] += e.weight
    node_peak = _peaks(scores, lambda k: k[0])  # per layer
    edge_peak = _peaks(weights, lambda k: (k[0], k[2]))  # per layer pair
    nodes = [Node(layer, q, s, abs(s) / node_peak[layer] if node_peak[layer] else 0.0)
             for (layer, q), s in sorted(scores.items(), key=lambda kv: (kv[0][0], -abs(kv[1])))]
    edges = [Edge(a, q, b, t, w, abs(w) / edge_peak[(a, b)] if edge_peak[(a, b)] else 0.0)
             for (a, q, b, t), w in weights.items()]
    error_nodes = []
    for layer, into in errors.items():
        peak = max([edge_peak.get((layer, b), 0.0) for b, _ in into] + [abs(w) for w in into.values()])
        error_nodes.append(ErrorNode(layer, sum(into.values()), tuple(
            Edge(layer, -1, b, t, w, abs(w) / peak if peak else 0.0) for (b, t), w in into.items())))
    return Graph(nodes, edges, error_nodes)


def _peaks(values: dict, group) -> dict:
    """``{group: max |value|}`` over the entries of ``values`` of each group (``group(key)``)."""
    peak: dict = {}
    for k, v in values.items():
        peak[group(k)] = max(peak.get(group(k), 0.0), abs(v))
    return peak


def _influence(items: list[tuple[str, float]]) -> dict[str, float]:
    """``{node_id: cumulative share}`` of one layer's nodes ``(node_id, score)``, strongest |score| first."""
    total = sum(abs(s) for _, s in items)
    out, running = {}, 0.0
    for node_id, s in sorted(items, key=lambda it: -abs(it[1])):
        running += abs(s)
        out[node_id] = running / total if total > 0 else 1.0
    return out


def neuronpedia_graph(graph: Graph, ctx: GraphContext) -> dict:
    """``graph`` (an image, class or merged pair graph) as attribution-graph JSON (module docstring).

    Returns a dict that ``json.dump`` writes as the file; it validates against Neuronpedia's graph JSON
    schema and circuit-tracer's ``frontend/graph_models.Model``.
    """
    index = {layer: i for i, layer in enumerate(ctx.layers)}
    unknown = sorted({n.layer for n in graph.nodes} - set(index))
    if unknown:
        raise ValueError(f"the graph has layers {unknown} that are not among the run's layers {ctx.layers}")
    logit_layer = str(len(ctx.layers))

    def concept_id(layer: str, q: int) -> str:
        return f"{index[layer]}_{q}_0"

    def node_ref(layer: str, q: int) -> str:
        return f"{logit_layer}_{q}_0" if layer == CLASSES else concept_id(layer, q)

    by_layer: dict[str, list[tuple[str, float]]] = {}
    for n in graph.nodes:
        by_layer.setdefault(n.layer, []).append((concept_id(n.layer, n.concept), n.score))
    for err in graph.errors:
        by_layer.setdefault(err.layer, []).append((f"{index[err.layer]}_error_0", err.score))
    influence = {k: v for items in by_layer.values() for k, v in _influence(items).items()}

    nodes = [_embedding_node(ctx)]
    for n in graph.nodes:
        node_id = concept_id(n.layer, n.concept)
        nodes.append(_node(node_id, n.concept, str(index[n.layer]), CONCEPT_TYPE, f"{n.layer}:{n.concept}",
                           influence=influence[node_id], activation=ctx.activations.get((n.layer, n.concept))))
    for err in graph.errors:
        node_id = f"{index[err.layer]}_error_0"
        nodes.append(_node(node_id, -1, str(index[err.layer]), ERROR_TYPE, f"{err.layer}:error",
                           influence=influence[node_id]))
    classes = sorted({e.target for e in [*graph.edges, *(x for err in graph.errors for x in err.edges)]
                      if e.target_layer == CLASSES})
    for c in classes:
        p = ctx.probabilities.get(c, float("nan"))
        nodes.append(_node(f"{logit_layer}_{c}_0", c, logit_layer, "logit",
                           f'Output "{ctx.class_names[c]}" (p={p:.3f})', token_prob=0.0 if p != p else float(p),
                           is_target_logit=True))
    links = [{"source": concept_id(e.source_layer, e.source), "target": node_ref(e.target_layer, e.target),
              "weight": float(e.weight)} for e in graph.edges]
    links += [{"source": f"{index[err.layer]}_error_0", "target": node_ref(e.target_layer, e.target),
               "weight": float(e.weight)} for err in graph.errors for e in err.edges]
    pinned = [concept_id(layer, q) for layer, q in ctx.pinned if layer in index]
    metadata = {"slug": _slug(ctx.slug), "scan": ctx.scan, "transcoder_list": list(ctx.layers),
                "prompt_tokens": [ctx.prompt], "prompt": ctx.prompt, "node_threshold": 1.0, "schema_version": 1,
                "info": ctx.info}
    qparams = {"pinnedIds": pinned, "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def _node(node_id: str, feature: int, layer: str, feature_type: str, clerp: str, *, influence=None, activation=None,
          token_prob: float = 0.0, is_target_logit: bool = False) -> dict:
    return {"node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": 0, "feature_type": feature_type,
            "jsNodeId": node_id, "clerp": clerp, "influence": influence,
            "activation": None if activation is None else float(activation), "token_prob": token_prob,
            "is_target_logit": is_target_logit, "run_idx": 0, "reverse_ctx_idx": 0}


def _embedding_node(ctx: GraphContext) -> dict:
    """The input (the image, or a class's images) as the one context position."""
    return _node("E_0_0", 0, "E", "embedding", ctx.prompt)
