"""Interventions: edit concepts inside the network and see what changes downstream.

An :class:`Edit` changes the coefficient ``u_pq`` of one concept ``q`` of one analysed layer: it scales
it where the concept is active (``factor``; 0 removes the concept) or adds the concept with given
coefficients at given positions (``add``). The layer's PFVs ``X [P, C]`` become

    X' = X + Σ_edits (u'_pq − u_pq) · v_q        (only at the positions each edit touches)

so the reconstruction residual ``X − β − U V`` is kept: an edit that changes nothing (an empty edit
list, a factor of 1, a concept that is not active) leaves ``X`` bit for bit as it was, and the model's
own output comes back. Several layers: the edits are applied in forward order; a later layer's codes
(the ``u`` its edits scale) are computed from the activations the earlier edits produced.

:func:`intervene` reports the class probabilities and the codes of the later layers' concepts
before and after (:class:`Intervention`). :meth:`gig_fast.Run.intervene` runs it on a finished run's
model and concept banks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["Edit", "EditError", "Intervention", "ConceptChange", "parse_edits", "intervene"]


class EditError(ValueError):
    """An edit that cannot be applied: unknown layer, concept out of range, bad factor, a vector of the
    wrong length, positions out of range (a ``ValueError``)."""


@dataclass(frozen=True)
class Edit:
    """One concept edit at one layer.

    Attributes:
        layer: an analysed layer.
        concept: the concept id ``q`` in ``0 … K−1``.
        factor: scale ``u_pq`` by this where the concept is active (``0.0`` removes it); or None.
        add: coefficients ``[n]`` added to ``u_pq`` at ``positions`` (adds ``add[i]·v_q`` to the PFV at
            ``positions[i]``); or None. Exactly one of ``factor`` and ``add`` is set.
        positions: ``[n]`` row-major positions of the layer's grid (``0 … P−1``) for ``add``; None:
            every position (then ``add`` has one value per position, ``P`` in all).
    """
    layer: str
    concept: int
    factor: float | None = None
    add: tuple[float, ...] | None = None
    positions: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "concept": self.concept}
        if self.factor is not None:
            d["factor"] = self.factor
        else:
            d["add"] = list(self.add)
            if self.positions is not None:
                d["positions"] = list(self.positions)
        return d


@dataclass(frozen=True)
class ConceptChange:
    """A concept's usage in the image — Σ over positions of its code — before and after the edits."""
    layer: str
    concept: int
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass
class Intervention:
    """What a set of edits does to one image.

    Attributes:
        edits: the edits, in the order they were applied (forward order of their layers).
        logits_before, logits_after: ``[n_classes]`` float64; before = the model's own output.
        probabilities_before, probabilities_after: ``[n_classes]`` softmax of the logits.
        concepts: the reported concepts of layers after the first edited one (:class:`ConceptChange`),
            layer by layer in forward order; at a layer that carries edits itself, the codes of the
            activations that reach it (before its own edits).
    """
    edits: list[Edit]
    logits_before: torch.Tensor
    logits_after: torch.Tensor
    concepts: list[ConceptChange] = field(default_factory=list)

    @property
    def probabilities_before(self) -> torch.Tensor:
        return torch.softmax(self.logits_before, 0)

    @property
    def probabilities_after(self) -> torch.Tensor:
        return torch.softmax(self.logits_after, 0)

    def top_classes(self, n: int = 5) -> list[tuple[int, float, float]]:
        """``[(class, probability before, after)]`` of the ``n`` classes most probable before or after."""
        pb, pa = self.probabilities_before, self.probabilities_after
        order = torch.argsort(-torch.maximum(pb, pa), stable=True)[:n].tolist()
        return [(c, float(pb[c]), float(pa[c])) for c in order]

    def to_dict(self, classes: int = 5) -> dict:
        """JSON form: the edits, the ``classes`` top classes, every class's probabilities and the concepts."""
        return {"edits": [e.to_dict() for e in self.edits],
                "top_classes": [{"class": c, "before": b, "after": a} for c, b, a in self.top_classes(classes)],
                "probabilities_before": [float(v) for v in self.probabilities_before],
                "probabilities_after": [float(v) for v in self.probabilities_after],
                "concepts": [{"layer": c.layer, "concept": c.concept, "before": c.before, "after": c.after}
                             for c in self.concepts]}


def _finite_real(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise EditError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _one_edit(e, layers: Mapping[str, tuple[int, int]]) -> Edit:
    """Validate one edit: an :class:`Edit`, a dict of its fields, or a tuple ``(layer, concept, factor)``
    / ``(layer, concept, vector)`` / ``(layer, concept, vector, positions)``."""
    if isinstance(e, Edit):
        fields = e.__dict__
    elif isinstance(e, Mapping):
        unknown = set(e) - {"layer", "concept", "factor", "add", "positions"}
        if unknown:
            raise EditError(f"unknown edit field(s) {sorted(unknown)}; valid: layer, concept, factor, add, positions")
        fields = e
    elif isinstance(e, (tuple, list)) and len(e) in (3, 4):
        third = e[2]
        is_vector = isinstance(third, (list, tuple, np.ndarray, torch.Tensor))
        fields = {"layer": e[0], "concept": e[1], ("add" if is_vector else "factor"): third,
                  "positions": e[3] if len(e) == 4 else None}
    else:
        raise EditError(f"an edit is (layer, concept, factor), (layer, concept, vector[, positions]) or a dict "
                        f"with those fields, got {e!r}")
    layer = fields.get("layer")
    if layer not in layers:
        raise EditError(f"unknown layer {layer!r}; valid: {', '.join(layers)}")
    K, P = layers[layer]
    q = fields.get("concept")
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= int(q) < K:
        raise EditError(f"concept {q!r} is out of range for {layer}: valid ids are 0..{K - 1}")
    factor, add, positions = fields.get("factor"), fields.get("add"), fields.get("positions")
    if (factor is None) == (add is None):
        raise EditError(f"an edit sets exactly one of factor and add (edit of {layer} concept {q})")
    if factor is not None:
        if positions is not None:
            raise EditError("positions go with add (a factor scales the concept wherever it is active)")
        return Edit(layer, int(q), factor=_finite_real(factor, f"the factor of {layer} concept {q}"))
    values = np.asarray(add.detach().cpu() if isinstance(add, torch.Tensor) else add, dtype=object).ravel()
    values = tuple(_finite_real(v, f"an added coefficient of {layer} concept {q}") for v in values)
    if positions is None:
        if len(values) != P:
            raise EditError(f"the vector added to {layer} concept {q} has {len(values)} values; without positions "
                            f"it needs one per position ({P})")
        return Edit(layer, int(q), add=values)
    pos = np.asarray(positions.detach().cpu() if isinstance(positions, torch.Tensor) else positions, dtype=object).ravel()
    if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pos):
        raise EditError(f"positions must be integers, got {list(pos)!r}")
    pos = tuple(int(p) for p in pos)
    if len(values) != len(pos):
        raise EditError(f"the vector added to {layer} concept {q} has {len(values)} values for {len(pos)} positions")
    bad = [p for p in pos if not 0 <= p < P]
    if bad:
        raise EditError(f"positions {bad} are out of range for {layer}: valid 0..{P - 1} (row-major over its grid)")
    if len(set(pos)) != len(pos):
        raise EditError(f"positions of the edit of {layer} concept {q} repeat; give each position once")
    return Edit(layer, int(q), add=values, positions=pos)


def parse_edits(edits, layers: Mapping[str, tuple[int, int]]) -> list[Edit]:
    """Validate ``edits`` and sort them into the forward order of their layers (stable).

    Args:
        edits: a sequence of edits (see :class:`Edit`; tuples ``("layer3.2", 117, 0.0)`` work).
        layers: ``{layer: (K, P)}`` of the analysed layers in forward order (concepts, positions).
    Raises:
        EditError: naming the bad edit and what is valid.
    """
    if isinstance(edits, (str, bytes, Mapping, Edit)) or not isinstance(edits, Sequence):
        raise EditError(f"edits must be a list of edits, got {type(edits).__name__}")
    order = list(layers)
    parsed = [_one_edit(e, layers) for e in edits]
    return sorted(parsed, key=lambda e: order.index(e.layer))


def _rows(v: torch.Tensor) -> torch.Tensor:
    """``[1, C, H, W]`` → ``[P, C]`` (row-major positions)."""
    return v[0].permute(1, 2, 0).reshape(-1, v.shape[1])


def _map(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[P, C]`` → the ``[1, C, H, W]`` shape of ``like``."""
    return rows.reshape(*like.shape[2:], like.shape[1]).permute(2, 0, 1)[None]


def concept_coefficients(idx: torch.Tensor, val: torch.Tensor, q: int) -> torch.Tensor:
    """``[P]`` the coefficient of concept ``q`` at each position of padded codes ``idx/val [P, s]``."""
    return torch.where(idx == q, val, torch.zeros_like(val)).sum(1)


def edit_rows(X: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor, edits: list[Edit]) -> torch.Tensor:
    """``X' = X + Σ (u' − u)·v_q`` of one layer's PFVs ``X [P, C]`` with codes ``idx/val [P, s]`` on the
    concepts ``V [K, C]``; rows no edit touches are ``X``'s own."""
    out = X.clone()
    for e in edits:
        if e.factor is not None:
            u = concept_coefficients(idx, val, e.concept).to(X.dtype)
            rows = torch.nonzero(u != 0).flatten()
            change = (e.factor - 1.0) * u[rows]
        else:
            rows = torch.arange(X.shape[0]) if e.positions is None else torch.tensor(e.positions, dtype=torch.long)
            change = torch.tensor(e.add, dtype=X.dtype)
        rows = rows.to(X.device)
        out[rows] = out[rows] + change.to(X.device)[:, None] * V[e.concept].to(X)[None]
    return out


def _usage(idx: torch.Tensor, val: torch.Tensor, K: int) -> torch.Tensor:
    """``[K]`` Σ over positions of each concept's code (float64)."""
    keep = idx >= 0
    return torch.zeros(K, dtype=torch.float64).index_add_(0, idx[keep].cpu(), val[keep].double().cpu())


def _targets(targets, layers: Mapping[str, tuple[int, int]], first: str) -> dict[str, list[int] | None]:
    """``{layer: concept ids (None: all)}`` to report: ``targets`` None (every concept of every layer after
    ``first``), layer names, or ``(layer, concept)`` pairs — all after ``first``."""
    order = list(layers)
    later = order[order.index(first) + 1:]
    if targets is None:
        return {lay: None for lay in later}
    out: dict[str, list[int] | None] = {}
    for t in targets:
        if not isinstance(t, str) and not (isinstance(t, (tuple, list)) and len(t) == 2):
            raise EditError(f"a target is a layer name or (layer, concept), got {t!r}")
        layer, q = (t, None) if isinstance(t, str) else tuple(t)
        if layer not in later:
            raise EditError(f"target layer {layer!r} is not an analysed layer after {first} (the first edited "
                            f"layer): valid {', '.join(later) or 'none'}")
        if q is not None:
            K = layers[layer][0]
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= int(q) < K:
                raise EditError(f"target concept {q!r} is out of range for {layer}: valid ids are 0..{K - 1}")
            if out.get(layer, []) is not None:
                out.setdefault(layer, []).append(int(q))
        else:
            out[layer] = None
    return {lay: out[lay] for lay in order if lay in out}


@torch.no_grad()
def intervene(adapter, banks: Mapping, image: torch.Tensor, edits, targets=None, record=None) -> Intervention:
    """Run ``image`` through the model with ``edits`` applied (see the module docstring).

    Args:
        adapter: the model's adapter (``record``, ``run_from``, ``points``; ``gig_fast.models.get_adapter``).
        banks: ``{layer: bank}`` for every analysed layer, each with ``V [K, C]``, ``beta [C]`` and
            ``code(X [P, C]) → (idx [P, s], val [P, s])`` (:class:`~gig_fast.ConceptBank`).
        image: ``[1, C_in, H, W]`` preprocessed.
        edits: see :func:`parse_edits`; an empty list reproduces the model's logits bit for bit.
        targets: the later concepts to report: None (all concepts of every layer after the first edited
            one), layer names, or ``(layer, concept)`` pairs.
        record: ``adapter.record(image, keep="preact")`` when the caller has it already.
    Returns:
        :class:`Intervention`.
    """
    rec = adapter.record(image, keep="preact") if record is None else record
    points = [p for p in adapter.points if p in banks]
    layers = {p: (int(banks[p].V.shape[0]), _rows(rec.preact(p)).shape[0]) for p in points}
    plan = parse_edits(edits, layers)
    before = rec.logits[0].double().cpu()
    if not plan:
        return Intervention([], before, before.clone())
    report = _targets(targets, layers, plan[0].layer)
    start = points.index(plan[0].layer)
    X = rec.preact(points[start])
    concepts: list[ConceptChange] = []
    for i, p in enumerate(points[start:], start):
        here = [e for e in plan if e.layer == p]
        if here or p in report:
            rows = _rows(X)
            if p in report:  # one coding of the edited and the unedited rows: the coder's set-up is paid once
                both = banks[p].code(torch.cat([rows, _rows(rec.preact(p))]))
                idx, val = (t[:rows.shape[0]] for t in both)
                concepts += _changes(p, report[p], int(banks[p].V.shape[0]), idx, val,
                                     *(t[rows.shape[0]:] for t in both))
            else:
                idx, val = banks[p].code(rows)
            if here:
                X = _map(edit_rows(rows, idx, val, banks[p].V, here), X)
        last = i == len(points) - 1 or (not any(e.layer in points[i + 1:] for e in plan)
                                        and not any(lay in points[i + 1:] for lay in report))
        if last:
            after = adapter.run_from(p, X)
            break
        X = adapter.run_from(p, X, points[i + 1])
    return Intervention(plan, before, after[0].double().cpu(), concepts)


def _changes(layer: str, concepts: list[int] | None, K: int, idx, val, idx_before, val_before) -> list[ConceptChange]:
    """The :class:`ConceptChange` of ``concepts`` (None: all K) of one layer: usage of the unedited pass's
    codes ``idx_before/val_before [P, s]`` against the edited pass's ``idx/val [P, s]``."""
    old = _usage(idx_before, val_before, K)
    new = _usage(idx, val, K)
    qs = range(K) if concepts is None else concepts
    return [ConceptChange(layer, q, float(old[q]), float(new[q])) for q in qs]
