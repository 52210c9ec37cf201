"""The typed results of :class:`gig_fast.Run` (plain dataclasses; ``to_dict()`` gives the JSON form of
``docs/graph_schema.md`` where one exists).

Conventions as in ``graph.json``: a *layer* is an analysed point's name or ``"classes"`` (the class
targets); a node is a concept of a layer (or a class id for ``"classes"``); ``weight`` is a signed GIG
value, ``normalized`` its ``|weight| / max |weight|`` over one layer pair of one graph, in [0, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = ["LayerInfo", "ClassInfo", "Node", "Edge", "ErrorNode", "Graph", "ImageGraph", "SharedConcept", "PairGraph",
           "ConceptSample", "ClassUse", "ConceptCard", "ConceptUse", "Explanation", "Decomposition",
           "LayerMetrics", "TransitionMetrics", "Metrics"]

@dataclass(frozen=True)
class LayerInfo:
    """An analysed layer: ``channels`` C, ``n_concepts`` K, ``spatial`` ``(H, W)`` of its PFV grid
    (``channels``/``spatial`` are None for the pseudo-layer ``"classes"``, whose K is the class count)."""
    name: str
    n_concepts: int
    channels: int | None = None
    spatial: tuple[int, int] | None = None


@dataclass(frozen=True)
class ClassInfo:
    """A class of the model: ``n_images`` = explained images of it (by label or by prediction)."""
    id: int
    name: str
    n_images: int


@dataclass(frozen=True)
class Node:
    """A concept in a graph with its score (Σ GIG to the layer above); ``normalized``: |score| / max
    |score| over the graph's nodes of that layer."""
    layer: str
    concept: int
    score: float
    normalized: float


@dataclass(frozen=True)
class Edge:
    """GIG from concept ``source`` of ``source_layer`` to ``target`` of ``target_layer`` (a class id
    when ``target_layer == "classes"``)."""
    source_layer: str
    source: int
    target_layer: str
    target: int
    weight: float
    normalized: float


@dataclass(frozen=True)
class ErrorNode:
    """The reconstruction residual ``X − β − U V`` of ``layer`` as a node: the part of the change of the
    layer above that the layer's concepts do not explain (``T(F_ab(X)) − T(F_ab(X̃))`` per target).
    ``edges``: to the graph's targets of the layer above, ``source`` = :data:`ERROR_SOURCE`; ``score``:
    their sum (for a class graph, over the class's images)."""
    layer: str
    score: float
    edges: tuple[Edge, ...]

    @classmethod
    def from_dict(cls, layer: str, d: dict) -> "ErrorNode":
        return cls(layer, float(d["score"]), tuple(Edge(layer, ERROR_SOURCE, e["target"][0], int(e["target"][1]),
                                                        float(e["weight"]), float(e["normalized"])) for e in d["edges"]))

    def to_dict(self) -> dict:
        return {"score": self.score, "edges": [{"target": [e.target_layer, e.target], "weight": e.weight,
                                                "normalized": e.normalized} for e in self.edges]}


ERROR_SOURCE = -1  # the ``source`` of an error node's edges (it is no concept of its layer)


def _normalized(items: list[dict]) -> list[float]:
    peak = max((abs(n["score"]) for n in items), default=0.0) or 1.0
    return [n["normalized"] if "normalized" in n else abs(n["score"]) / peak for n in items]


@dataclass
class Graph:
    """A concept graph (of a class, or of one image): nodes per layer, top-down edges, and per layer its
    error node where the run has them (``graph.json`` version 2; empty for older runs)."""
    nodes: list[Node]
    edges: list[Edge]
    errors: list[ErrorNode] = field(default_factory=list)

    def layer(self, name: str) -> list[Node]:
        """The nodes of one layer, strongest first."""
        return [n for n in self.nodes if n.layer == name]

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        """From the ``graph.json`` form ``{"nodes": {layer: [{concept, score[, normalized]}]}, "edges": [...]}``."""
        nodes = [Node(layer, int(n["concept"]), float(n["score"]), float(norm))
                 for layer, items in d["nodes"].items() for n, norm in zip(items, _normalized(items))]
        edges = [Edge(e["source"][0], int(e["source"][1]), e["target"][0], int(e["target"][1]), float(e["weight"]),
                      float(e["normalized"])) for e in d["edges"]]
        errors = [ErrorNode.from_dict(layer, e) for layer, e in d.get("errors", {}).items()]
        return cls(nodes, edges, errors)

    def to_dict(self, node_normalized: bool = True) -> dict:
        """The ``graph.json`` form (``node_normalized=False``: image-graph nodes, ``{concept, score}``)."""
        nodes: dict[str, list] = {}
        for n in self.nodes:
            item = {"concept": n.concept, "score": n.score}
            if node_normalized:
                item["normalized"] = n.normalized
            nodes.setdefault(n.layer, []).append(item)
        edges = [{"source": [e.source_layer, e.source], "target": [e.target_layer, e.target], "weight": e.weight,
                  "normalized": e.normalized} for e in self.edges]
        out = {"nodes": nodes, "edges": edges}
        if self.errors:
            out["errors"] = {e.layer: e.to_dict() for e in self.errors}
        return out


@dataclass
class ImageGraph:
    """One explained image's graph: ``label`` (−1 when unlabelled), ``prediction`` and ``explained_class``
    (the label or the prediction, by the run's ``class_by``)."""
    id: int
    label: int
    prediction: int
    explained_class: int
    graph: Graph

    def to_dict(self) -> dict:
        """The ``graph.json`` ``images[]`` form."""
        return {"id": self.id, "label": self.label, "prediction": self.prediction, "class": self.explained_class,
                **self.graph.to_dict(node_normalized=False)}


@dataclass(frozen=True)
class SharedConcept:
    """A concept important to both classes of a pair: ``score`` = min of the two normalised importances,
    ``importance`` = the two classes' raw scores."""
    layer: str
    concept: int
    score: float
    importance: tuple[float, float]


@dataclass(frozen=True)
class PairEdge(Edge):
    """An edge that wires a pair's shared concept into class ``class_id``'s graph (paper Fig. 1): its
    weight is the GIG summed over that class's images, normalised with the class graph's edges."""
    class_id: int = -1


@dataclass
class PairGraph:
    """The shared concepts of two classes (``classes[0] < classes[1]``), per layer strongest first, and
    the edges that wire them into each class's graph (parents and children)."""
    classes: tuple[int, int]
    shared: list[SharedConcept]
    edges: list[PairEdge] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "PairGraph":
        """From ``graph.json``'s ``pair_graphs[...]`` form."""
        shared = [SharedConcept(layer, int(s["concept"]), float(s["score"]), tuple(float(x) for x in s["importance"]))
                  for layer, items in d.get("shared", {}).items() for s in items]
        edges = [PairEdge(e["source"][0], int(e["source"][1]), e["target"][0], int(e["target"][1]), float(e["weight"]),
                          float(e["normalized"]), int(e["class"])) for e in d.get("edges", [])]
        return cls(tuple(int(c) for c in d["classes"]), shared, edges)

    def to_dict(self) -> dict:
        shared: dict[str, list] = {}
        for s in self.shared:
            shared.setdefault(s.layer, []).append({"concept": s.concept, "score": s.score,
                                                   "importance": list(s.importance)})
        edges = [{"source": [e.source_layer, e.source], "target": [e.target_layer, e.target], "class": e.class_id,
                  "weight": e.weight, "normalized": e.normalized} for e in self.edges]
        return {"classes": list(self.classes), "shared": shared, "edges": edges}


@dataclass
class ConceptSample:
    """A stage-1 PFV near a concept (paper Fig. 1's "nearest embeddings").

    Attributes:
        image: dataset index of its image; ``position``: ``h·W + w`` at the layer's resolution.
        label: the image's label (−1 when unlabelled).
        cosine: cosine of ``x − β`` to the concept vector; ``member``: in the concept's cluster.
        ierf: float32 ``[H_in, W_in]`` its iERF (input-pixel relevance), None when the run kept none.
        picture: float32 ``[H_in, W_in, 3]`` the input image for display, in [0, 1] (None without iERF).
        crop: uint8 ``[h, w, 3]`` the "iERF with context" picture (None without iERF).
    """
    image: int
    position: int
    label: int
    cosine: float
    member: bool
    ierf: np.ndarray | None = None
    picture: np.ndarray | None = None
    crop: np.ndarray | None = None


@dataclass(frozen=True)
class ClassUse:
    """A class whose graph has the concept among its top concepts: ``rank`` 1 = strongest."""
    class_id: int
    rank: int
    normalized: float


@dataclass
class ConceptCard:
    """Everything about one concept: its vector ``[C]`` (float32), cluster ``size``, ``norm`` ‖v‖, its
    nearest ``samples`` (nearest first) and the classes that use it."""
    layer: str
    id: int
    size: int
    norm: float
    vector: torch.Tensor
    samples: list[ConceptSample]
    classes: list[ClassUse]


@dataclass(frozen=True)
class ConceptUse:
    """An explained image that uses a concept: ``usage`` = Σ over its positions of the concept's code
    value, largest value ``peak`` at ``peak_position`` (``h·W + w``), ``active`` coded positions."""
    rank: int
    image: int
    explained_class: int
    usage: float
    peak: float
    peak_position: int
    active: int


@dataclass
class Explanation:
    """The GIG graph of one image against a run's concepts (:meth:`gig_fast.Run.explain`).

    Attributes:
        prediction: the model's class; ``explained_class``: the class explained (prediction or target).
        class_name: its name.
        graph: per layer the image's ``top`` strongest concepts, edges to the image's own top concepts
            of the layer above (the class for the last layer).
        completeness: ``"a->b"`` → max |Σ GIG − (T(X(1)) − T(X(0)))| over that transition's targets.
    """
    prediction: int
    explained_class: int
    class_name: str
    graph: Graph
    completeness: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON form: ``graph.json``'s ``images[]`` fields plus ``class_name`` and ``completeness_max_abs``."""
        return {"prediction": self.prediction, "class": self.explained_class, "class_name": self.class_name,
                **self.graph.to_dict(node_normalized=False), "completeness_max_abs": dict(self.completeness)}


@dataclass
class Decomposition:
    """One image's PFVs at one layer coded on the run's concepts (docs/design.md §1.4): ``X̃ = U V + β``.

    Attributes:
        layer: the layer; ``spatial``: ``(H, W)`` with ``P = H·W``.
        idx: int64 ``[P, s]`` concept indices per position (−1 = padding).
        val: float32 ``[P, s]`` their code values (0 at padding).
        rel_l2: float32 ``[P]`` ``‖x − x̃‖ / ‖x‖`` per position.
        n_concepts: K of the layer.
        prefix, grid: how the positions are drawn: positions ``prefix …`` row-major on ``grid``
            ``(H, W)`` (a transformer: its class token first, then the patch grid); default: all
            positions on ``spatial``.
    """
    layer: str
    spatial: tuple[int, int]
    idx: torch.Tensor
    val: torch.Tensor
    rel_l2: torch.Tensor
    n_concepts: int
    prefix: int = 0
    grid: tuple[int, int] | None = None

    def usage(self) -> torch.Tensor:
        """float64 ``[K]``: Σ over positions of each concept's code value."""
        u = torch.zeros(self.n_concepts, dtype=torch.float64)
        keep = self.idx >= 0
        return u.index_add_(0, self.idx[keep], self.val[keep].double())

    def heat_map(self, concept: int) -> np.ndarray:
        """float32 ``[H, W]`` on the drawing grid: the code value of ``concept`` at each position (0 where
        it is not coded; a transformer's prefix tokens lie on no patch and are left out)."""
        m = torch.where(self.idx == int(concept), self.val, torch.zeros_like(self.val)).sum(1)
        return m[self.prefix:].reshape(self.grid or self.spatial).float().numpy()


@dataclass(frozen=True)
class LayerMetrics:
    """Decomposition quality of a layer over every PFV of the explained images (paper Table 1 form)."""
    rel_l2: float
    l0_ratio: float
    pfvs: int
    not_converged: int = 0


@dataclass(frozen=True)
class TransitionMetrics:
    """Completeness of GIG over one layer transition ``a->b`` (``metrics.json``'s ``completeness``)."""
    max_abs: float
    median_abs: float
    max_rel: float
    median_rel: float
    n: int
    p99_rel: float | None = None
    share_rel_within_1pct: float | None = None
    refined_share: float | None = None
    mean_steps: float | None = None


@dataclass
class Metrics:
    """A run's ``metrics.json``: per-layer decomposition quality, per-transition completeness, counts
    and timings (seconds per stage)."""
    layers: dict[str, LayerMetrics]
    completeness: dict[str, TransitionMetrics]
    explained_images: int
    concept_images: int
    accuracy_on_explained: float | None
    timings_s: dict[str, float]

    @classmethod
    def from_dict(cls, m: dict) -> "Metrics":
        fields = TransitionMetrics.__dataclass_fields__
        return cls(layers={k: LayerMetrics(**{f: v[f] for f in LayerMetrics.__dataclass_fields__ if f in v})
                           for k, v in m["layers"].items()},
                   completeness={k: TransitionMetrics(**{f: v[f] for f in fields if f in v})
                                 for k, v in m["completeness"].items()},
                   explained_images=int(m["explained_images"]), concept_images=int(m["concept_images"]),
                   accuracy_on_explained=m.get("accuracy_on_explained"), timings_s=dict(m.get("timings_s", {})))

    def to_dict(self) -> dict:
        return asdict(self)
