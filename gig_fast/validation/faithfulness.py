"""Faithfulness of the class graphs' edges: does removing a concept do what its edge's GIG weight says?

For each class c with a graph and each transition ``a → b`` of it, every node q of layer a in the class
graph is removed from the class's explained images (its coefficient set to 0 where it is active, the
reconstruction residual kept: :func:`gig_fast.interventions.edit_rows`) and the network runs on to b.
For every edge ``q → t`` of the graph the measured drop, summed over the images, is compared with the
edge's weight ``GIG(q → t)`` (also summed over the class's images, from ``graph.json``):

* ``target``: the drop of what GIG attributes — ``Σ_p ⟨x^b_p, v_t/‖v_t‖⟩`` for a concept t of b, the
  class probability (or logit, as the run's ``class_probability``) for b = classes;
* ``code``: the drop of the child concept's code, ``Σ_p u_pt`` (the run's sparse coder at b).

Per transition, pooled over classes: Spearman's rank correlation of weight against drop, the share of
edges whose drop has the weight's sign, and for the target ``Σ|drop| / Σ|weight|`` (1 where the removal
moves it by what GIG gives the concept; a code is in its own units). GIG integrates from "no concept at
all" to the reconstruction with every concept scaled together; a removal takes one concept out of the
real PFVs: the first-order reading of an edge.
"""
from __future__ import annotations

import numpy as np
import torch

from ..interventions import Edit, concept_coefficients, edit_rows
from ..pipeline.selection import CLASSES, transitions
from ..pipeline.files import load_json
from ..run_folder import GRAPH_FILE
from .experiments import flat_codes, layer_inputs

__all__ = ["class_edges", "transition_summary", "faithfulness_table", "faithfulness_section", "class_images",
           "graph_classes", "run_faithfulness", "HOLDS", "FAILS"]

READOUTS = ("target", "code")
HOLDS = (0.7, 0.8)  # ρ and sign agreement at or above which a transition's edges read as first-order predictions
FAILS = (0.3, 0.6)  # ρ or sign agreement below which they do not


def class_images(pipe, c: int, limit: int) -> list[int]:
    """The first ``limit`` explained images of class ``c`` (by the run's ``class_by``), ascending ids."""
    col = 0 if pipe.config.class_by == "label" else 1
    return sorted(i for i, meta in pipe.explained_meta().items() if meta[col] == c)[:limit]


def _rows(X: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B·H·W, C]``."""
    return X.permute(0, 2, 3, 1).reshape(-1, X.shape[1])


def _maps(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B·H·W, C]`` → the ``[B, C, H, W]`` shape of ``like``."""
    B, C, H, W = like.shape
    return rows.reshape(B, H, W, C).permute(0, 3, 1, 2)


def _usage(dec, out: torch.Tensor, concepts: list[int]) -> torch.Tensor:
    """``[len(concepts), B]`` Σ over positions of each concept's code in ``out [B, C, H, W]``."""
    B, _, H, W = out.shape
    _, idx, val = flat_codes(dec, out)
    idx, val = idx.reshape(B * H * W, -1), val.reshape(B * H * W, -1)
    return torch.stack([concept_coefficients(idx, val, t).reshape(B, H * W).sum(1).double() for t in concepts])


@torch.no_grad()
def class_edges(pipe, a: str, b: str | None, dec_a, dec_b, X: torch.Tensor, c: int, edges: list[dict]) -> list[list]:
    """The measured drops of one class's edges ``a → b`` (b None: the classes).

    Args:
        dec_a, dec_b: the run's decompositions of a and b (``V``, ``bias``, ``encode``); dec_b None for classes.
        X: ``[B, C_a, H, W]`` pre-activations at a of the class's images.
        edges: the class graph's edges of this transition (``graph.json`` form).
    Returns:
        ``[[q, t, weight, target drop, code drop (None for classes)], …]`` in the order of ``edges``.
    """
    sources = sorted({e["source"][1] for e in edges})
    targets = sorted({e["target"][1] for e in edges})
    B = X.shape[0]
    rows, idx, val = flat_codes(dec_a, X)
    idx, val = idx.reshape(rows.shape[0], -1), val.reshape(rows.shape[0], -1)
    batch = [X] + [_maps(edit_rows(rows, idx, val, dec_a.V.to(rows), [Edit(a, q, factor=0.0)]), X) for q in sources]
    out = pipe.adapter.run_from(a, torch.cat(batch), b).detach()  # [(1 + S)·B, …]
    if b is None:
        score = torch.softmax(out.double(), 1) if pipe.config.class_probability else out.double()
        target = score[:, [c]].T  # [1, (1 + S)·B]
        code = None
    else:
        unit = dec_b.V[targets].to(out) / dec_b.V[targets].to(out).norm(dim=1, keepdim=True)
        target = torch.einsum("nchw,tc->tn", out, unit).double()
        code = _usage(dec_b, out, targets)
    drop_t = _drops(target, B)
    drop_c = _drops(code, B) if code is not None else None
    result = []
    for e in edges:
        s, t = sources.index(e["source"][1]), targets.index(e["target"][1])
        result.append([e["source"][1], e["target"][1], float(e["weight"]), float(drop_t[s, t]),
                       None if drop_c is None else float(drop_c[s, t])])
    return result


def _drops(values: torch.Tensor, B: int) -> np.ndarray:
    """``[S, T]`` Σ over images of (unedited − edited) from ``values [T, (1 + S)·B]`` (the unedited batch first)."""
    v = values.reshape(values.shape[0], -1, B).sum(2)  # [T, 1 + S]
    return (v[:, :1] - v[:, 1:]).T.cpu().numpy()


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def transition_summary(edges: list[list]) -> dict:
    """Spearman ρ and sign agreement of pooled edges ``[[q, t, w, drop_t, drop_c], …]`` for both readouts, and
    ``Σ|drop| / Σ|weight|`` for the target (edges of weight 0 — a concept no image of the class uses — are
    left out)."""
    e = [r for r in edges if r[2] != 0]
    w = np.array([r[2] for r in e], dtype=np.float64)
    out = {"edges": len(e)}
    for k, name in enumerate(READOUTS, 3):
        if not e or e[0][k] is None:
            continue
        d = np.array([r[k] for r in e], dtype=np.float64)
        out[name] = {"spearman": _spearman(w, d), "sign_agreement": float(np.mean(np.sign(d) == np.sign(w)))}
        if name == "target":  # a code is in units of its concept's coefficient, not of what GIG attributes
            out[name]["magnitude_ratio"] = float(np.abs(d).sum() / np.abs(w).sum())
    return out


def graph_classes(pipe, only=None) -> list[int]:
    """The classes with a graph in ``graph.json`` (among ``only`` when given)."""
    classes = sorted(int(c) for c in load_json(pipe.out / GRAPH_FILE)["class_graphs"])
    return classes if only is None else [c for c in classes if c in {int(x) for x in only}]


def run_faithfulness(pipe, units, opts, bar, decomposition) -> dict:
    """Every class graph's transitions (:func:`class_edges`), one unit per class, then the per-transition
    summaries pooled over classes. ``decomposition(pipe, point)``: the run's decomposition of a layer."""
    graph = load_json(pipe.out / GRAPH_FILE)
    classes = graph_classes(pipe, opts.faithfulness_classes)
    trans = transitions(pipe)  # top-down: (last, "classes"), …, (first, second)
    decs = {p: decomposition(pipe, p) for p in pipe.points}
    per_class: dict = {}
    for c in classes:
        bar.set_postfix_str(f"faithfulness class {c}")

        def compute(c=c):
            ids = class_images(pipe, c, opts.faithfulness_images)
            inputs, _, _ = layer_inputs(pipe, ids, pipe.points)
            g = graph["class_graphs"][str(c)]
            res = {"images": ids, "edges": {}}
            for a, b in trans:
                edges = [e for e in g["edges"] if e["source"][0] == a and e["target"][0] == b]
                to = None if b == CLASSES else b
                res["edges"][f"{a}->{b}"] = class_edges(pipe, a, to, decs[a], None if to is None else decs[to],
                                               inputs[a], c, edges) if edges and ids else []
            return res
        per_class[str(c)] = units.get(f"faithfulness/class_{c}", compute)
        bar.update(1)
    summary = {}
    for a, b in trans:
        key = f"{a}->{b}"
        summary[key] = transition_summary([e for r in per_class.values() for e in r["edges"].get(key, [])])
        within = [transition_summary(r["edges"].get(key, [])) for r in per_class.values()]
        for name in READOUTS:  # pooled ranks mix the classes' scales: the median of the per-class ρ too
            rhos = [w[name]["spearman"] for w in within if w.get(name) and w[name]["spearman"] is not None]
            if name in summary[key]:
                summary[key][name]["spearman_in_class"] = float(np.median(rhos)) if rhos else None
    return {"classes": classes, "images_per_class": opts.faithfulness_images, "per_class": per_class,
            "transitions": summary}


def _cell(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def faithfulness_table(res: dict) -> str:
    """The per-transition summary as a Markdown table (top-down, as the graph)."""
    head = ["Transition", "edges", "ρ target", "ρ target in a class (median)", "sign target", "size: Σ abs(drop) / Σ abs(GIG)",
            "ρ code", "ρ code in a class (median)", "sign code"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, s in res["transitions"].items():
        cells = [key, str(s["edges"])]
        for name in READOUTS:
            r = s.get(name)
            cells += [_cell(r["spearman"]), _cell(r.get("spearman_in_class")), _cell(r["sign_agreement"], "{:.0%}")] \
                if r else ["–", "–", "–"]
            if name == "target":
                cells.append(_cell(r and r["magnitude_ratio"], "{:.3g}") if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdicts(res: dict, readout: str) -> tuple[list[str], list[str]]:
    """The transitions where the ``readout`` drops follow the edge weights (:data:`HOLDS`) and where they
    do not (:data:`FAILS`)."""
    holds, fails = [], []
    for key, s in res["transitions"].items():
        r = s.get(readout)
        if not r or r["spearman"] is None:
            continue
        if r["spearman"] >= HOLDS[0] and r["sign_agreement"] >= HOLDS[1]:
            holds.append(key)
        elif r["spearman"] < FAILS[0] or r["sign_agreement"] < FAILS[1]:
            fails.append(key)
    return holds, fails


def faithfulness_section(res: dict) -> list[str]:
    """The Markdown lines of ``validation.md``'s faithfulness section."""
    out = [f"## Faithfulness of the class graphs' edges (remove a concept, measure; {len(res['classes'])} classes, "
           f"≤ {res['images_per_class']} images each)", "",
           "Each node q of a class graph at layer a is removed from the class's images (code set to 0 where "
           "active, residual kept) and the network runs on. Per edge q → t: the drop summed over the images "
           "against the edge's GIG weight. target: the drop of what GIG attributes (Σ_p ⟨x_p, v_t/‖v_t‖⟩; the "
           "class probability into the classes); code: the drop of t's code Σ_p u_pt. ρ: Spearman over the "
           "transition's edges of every class (in a class: the median over classes of ρ within one class); "
           "sign: share of edges whose drop has the weight's sign; size: 1 where the removal moves the target by "
           "what GIG gives the concept.", "", faithfulness_table(res), ""]
    for readout in READOUTS:
        holds, fails = _verdicts(res, readout)
        out.append(f"- {readout}: first-order reading holds (ρ ≥ {HOLDS[0]}, sign ≥ {HOLDS[1]:.0%}) at "
                   f"{', '.join(holds) or 'no transition'}; fails (ρ < {FAILS[0]} or sign < {FAILS[1]:.0%}) at "
                   f"{', '.join(fails) or 'no transition'}.")
    return out + [""]
