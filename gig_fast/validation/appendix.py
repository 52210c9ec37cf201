"""The paper's appendix experiments on a finished run: App. E (one PFV decomposed into its concepts),
App. I (a concept's trajectory from its centre to its farthest member, across K) and App. J (a targeted
adversarial attack and the concept graph of the attacked image).

Each experiment returns a JSON-ready dict; pictures are small PNG data URIs (``crop`` fields), which
the report draws and the explorer shows. :func:`concept_trajectory` is a pure function of arrays.
"""
from __future__ import annotations

import numpy as np
import torch

from ..explorer.cards import DECOMPOSITION_CARD_KIND
from ..explorer.pictures import png_data_uri
from ..api import Run
from ..pipeline.crops import nearest_samples, sample_crops
from ..pipeline.selection import top_sets
from ..pipeline.stages import load_concepts, load_pfvs
from .attack import targeted_pgd
from .baselines import ours

__all__ = ["pfv_decomposition", "concept_trajectory", "trajectory", "adversarial_graph", "pixel_bounds"]


def _uri(crop) -> str | None:
    return None if crop is None else png_data_uri(crop)


def _class_name(pipe, c: int) -> str:
    return pipe.class_names[c] if 0 <= c < len(pipe.class_names) else str(c)


# ---------------------------------------------------------------------------------------------
# App. E: PFV decomposition
# ---------------------------------------------------------------------------------------------
def _pick_row(pipe, point: str, X: torch.Tensor, dec, top: int, seed: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The first stage-1 row, in a seeded order, whose code uses at least ``min(top, 3)`` concepts
    (a PFV worth decomposing), with its codes; the most-used one if none does."""
    order = np.random.default_rng([seed, pipe.points.index(point)]).permutation(X.shape[0])[:512]
    idx, val = dec.encode(X[torch.from_numpy(order)])
    used = ((idx >= 0) & (val != 0)).sum(1)
    good = torch.nonzero(used >= min(top, 3)).flatten()
    j = int(good[0]) if good.numel() else int(torch.argmax(used))
    return int(order[j]), idx[j], val[j]


def pfv_decomposition(pipe, point: str, top: int = 5, samples: int = 5, seed: int = 0) -> dict:
    """App. E (paper Figs. 7–9): one PFV of the PFV–iERF dataset written as ``Σ u_q v_q + β``.

    Returns the explorer's decomposition card (a plain dict, ``kind`` = :data:`DECOMPOSITION_CARD_KIND`):
    the PFV (image, position, class, its iERF crop), its rel-L2 and active count, and its ``top``
    concepts by contribution ``|u_q|·‖v_q‖`` with coefficient, share of the total contribution, cosine
    to ``x − β`` and the ``samples`` stage-1 PFVs nearest to the concept (iERF crops).
    """
    cfg = pipe.config
    c = load_concepts(pipe, point)
    V, beta = c["V"].float(), c["beta"].float()
    data = load_pfvs(pipe, point)
    X = torch.from_numpy(data["pfv"]).float()
    dec = ours(V, beta, cfg.lam, cfg.code_method, cfg.positive)
    row, idx, val = _pick_row(pipe, point, X, dec, top, seed)
    x = X[row]
    act = (idx >= 0) & (val != 0)
    q, u = idx[act].long(), val[act].float()
    norms = V[q].norm(dim=1)
    contrib = u.abs() * norms
    order = torch.argsort(contrib, descending=True, stable=True)
    recon = beta + u @ V[q]
    xc = x - beta
    chosen = [int(q[i]) for i in order[:top]]
    rows, cos, member = nearest_samples(pipe, point, chosen, samples) if chosen else (np.zeros((0, 0), int),) * 3
    pics = sample_crops(pipe, point, [row, *rows.ravel().tolist()])
    terms = []
    for k, i in enumerate(order[:top].tolist()):
        terms.append({"concept": int(q[i]), "coefficient": round(float(u[i]), 4), "norm": round(float(norms[i]), 4),
                      "share": round(float(contrib[i] / contrib.sum().clamp_min(1e-30)), 4),
                      "cosine": round(float(torch.nn.functional.cosine_similarity(V[q[i]], xc, dim=0)), 4),
                      "size": int((c["labels"] == q[i]).sum()) if "labels" in c else None,
                      "samples": [{"row": int(r), "image": pics[int(r)]["image"], "label": pics[int(r)]["label"],
                                   "cosine": round(float(cv), 4), "member": bool(m), "crop": _uri(pics[int(r)]["crop"])}
                                  for r, cv, m in zip(rows[k], cos[k], member[k])]})
    H, W = pipe.spatial[point]
    pos = int(data["position"][row])
    label = int(data["label"][row])
    return {"kind": DECOMPOSITION_CARD_KIND, "layer": point, "row": row, "image": int(data["image"][row]),
            "position": pos, "yx": [pos // W, pos % W], "spatial": [H, W], "label": label,
            "class_name": _class_name(pipe, label), "crop": _uri(pics[row]["crop"]),
            "norm": round(float(x.norm()), 4), "centred_norm": round(float(xc.norm()), 4),
            "rel_l2": round(float((x - recon).norm() / x.norm().clamp_min(1e-12)), 4),
            "residual_norm": round(float((x - recon).norm()), 4), "active": int(act.sum()),
            "K": int(V.shape[0]), "terms": terms}


# ---------------------------------------------------------------------------------------------
# App. I: concept trajectory
# ---------------------------------------------------------------------------------------------
def concept_trajectory(Xc: torch.Tensor, v: torch.Tensor, points: int = 8) -> dict:
    """The trajectory of App. I (paper Fig. 11) inside one concept cluster.

    Members ``Xc [n, C]`` (centred PFVs ``x − β``) and the concept vector ``v [C]`` are taken to the unit
    sphere; the farthest member f has the lowest cosine to v. In the plane spanned by v̂ and f̂ (basis
    ``e1 = v̂``, ``e2`` = f̂'s component orthogonal to v̂, normalised), every member has 2-D coordinates
    ``(⟨x̂, e1⟩, ⟨x̂, e2⟩)``; ``points`` equally spaced points go from v̂ = (1, 0) to f̂, and at each the
    member nearest to it in the plane is picked (consecutive repeats dropped).

    Returns:
        ``{"farthest": member index, "cosine_distance": 1 − cos(v, f), "path": [member indices],
        "path_cosine": [cos(v, member)], "coords": [[c1, c2] …] of the path, "members": n}``.
    """
    if Xc.shape[0] == 0 or points < 2:
        raise ValueError(f"need at least one member and points ≥ 2, got {Xc.shape[0]} members, points={points}")
    U = torch.nn.functional.normalize(Xc.double(), dim=1)
    e1 = torch.nn.functional.normalize(v.double(), dim=0)
    cos = U @ e1
    far = int(torch.argmin(cos))
    e2 = U[far] - cos[far] * e1
    coords = torch.stack([cos, U @ (e2 / e2.norm())], 1) if e2.norm() > 1e-12 else torch.stack([cos, 0 * cos], 1)
    ts = torch.linspace(0, 1, points, dtype=torch.float64)[:, None]
    targets = (1 - ts) * torch.tensor([1.0, 0.0], dtype=torch.float64) + ts * coords[far]
    picks = torch.cdist(targets, coords).argmin(1).tolist()
    path = [p for k, p in enumerate(picks) if k == 0 or p != picks[k - 1]]
    return {"farthest": far, "cosine_distance": float(1 - cos[far]), "path": path,
            "path_cosine": [round(float(cos[p]), 4) for p in path],
            "coords": [[round(float(a), 4) for a in coords[p]] for p in path], "members": int(Xc.shape[0])}


def trajectory(pipe, point: str, clusters: dict, anchor_row: int, points: int = 8) -> dict:
    """App. I across K: the trajectory inside the cluster that holds the stage-1 PFV ``anchor_row``, for
    each clustering ``clusters {K: {"V": [K, C], "labels": [N], "beta": [C]}}`` of the same stage-1 PFVs.

    Returns per K (ascending) the cluster id and size, the cosine distance to its farthest member and
    the path's stage-1 rows, cosines and iERF crops.
    """
    X = torch.from_numpy(load_pfvs(pipe, point)["pfv"]).double()
    out = {"layer": point, "anchor_row": int(anchor_row), "per_k": []}
    for K in sorted(clusters):
        c = clusters[K]
        lab = int(c["labels"][anchor_row])
        members = torch.nonzero(torch.as_tensor(c["labels"]) == lab).flatten()
        tr = concept_trajectory(X[members] - c["beta"].double(), c["V"][lab].double(), points)
        rows = [int(members[p]) for p in tr["path"]]
        pics = sample_crops(pipe, point, rows)
        out["per_k"].append({"K": int(K), "concept": lab, "size": int(len(members)),
                             "cosine_distance": round(tr["cosine_distance"], 4), "rows": rows,
                             "path_cosine": tr["path_cosine"], "coords": tr["coords"],
                             "labels": [pics[r]["label"] for r in rows], "crops": [_uri(pics[r]["crop"]) for r in rows]})
    return out


# ---------------------------------------------------------------------------------------------
# App. J: targeted adversarial attack
# ---------------------------------------------------------------------------------------------
def pixel_bounds(pipe, channels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lower [C, 1, 1], upper [C, 1, 1], std)``: pixel values 0 and 1 in the model's normalised input
    units for ``channels`` input channels, and the mean pixel std (pixel-unit radii are divided by it).
    A normalisation with another number of channels than the images is averaged over its channels."""
    if pipe.config.dataset == "fashion-mnist":
        from ..models import DEMO_MEAN, DEMO_STD
        mean, std = [float(DEMO_MEAN)], [float(DEMO_STD)]
    else:
        pre = pipe.config.preprocessing()
        mean, std = list(pre["mean"]), list(pre["std"])
    if len(mean) != channels:
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (0 - m) / s, (1 - m) / s, float(s.mean())


def _layer_comparison(pipe, point: str, clean: dict, attacked: dict, source: int, target: int, tops: np.ndarray) -> dict:
    """Where the attacked image's top concepts of ``point`` stand: in the target / source class's top set
    (the graph's), in the clean image's graph, and their highest cosine to a clean-graph concept."""
    V = torch.nn.functional.normalize(load_concepts(pipe, point)["V"].double(), dim=1)
    src, tgt = set(tops[source].tolist()), set(tops[target].tolist())
    clean_q = [n["concept"] for n in clean["nodes"].get(point, [])]
    adv_q = [n["concept"] for n in attacked["nodes"].get(point, [])]
    sim = (V[adv_q] @ V[clean_q].T).max(1).values.tolist() if adv_q and clean_q else [None] * len(adv_q)
    nodes = [{"concept": int(n["concept"]), "score": round(float(n["score"]), 6), "in_target": n["concept"] in tgt,
              "in_source": n["concept"] in src, "in_clean": n["concept"] in clean_q,
              "max_cos_clean": None if s is None else round(float(s), 4)}
             for n, s in zip(attacked["nodes"].get(point, []), sim)]
    share = lambda qs, ref: float(np.mean([q in ref for q in qs])) if qs else 0.0  # noqa: E731
    return {"attacked": nodes, "clean": clean_q, "target_share_attacked": share(adv_q, tgt),
            "source_share_attacked": share(adv_q, src), "target_share_clean": share(clean_q, tgt),
            "source_share_clean": share(clean_q, src), "shared_with_clean": share(adv_q, set(clean_q))}


def _origins(pipe, attacked: dict, comparison: dict, tops: np.ndarray, source: int, target: int, k: int = 3) -> dict:
    """For every target-class concept in the attacked image's graph: its ``k`` strongest sources at the
    layer below (GIG edges of the image's graph), flagged as in the source / target class's top set there."""
    below = {pipe.points[i + 1]: pipe.points[i] for i in range(len(pipe.points) - 1)}
    out = {}
    for point, comp in comparison.items():
        if point not in below:
            continue
        lower = below[point]
        src, tgt = set(tops[lower][source].tolist()), set(tops[lower][target].tolist())
        clean_lower = set(comparison[lower]["clean"]) if lower in comparison else set()
        for node in comp["attacked"]:
            if not node["in_target"]:
                continue
            edges = [e for e in attacked["edges"] if list(e["target"]) == [point, node["concept"]]]
            edges.sort(key=lambda e: -e["weight"])
            out[f"{point}|{node['concept']}"] = [
                {"layer": lower, "concept": int(e["source"][1]), "gig": round(float(e["weight"]), 6),
                 "in_source": e["source"][1] in src, "in_target": e["source"][1] in tgt,
                 "in_clean": e["source"][1] in clean_lower} for e in edges[:k]]
    return out


def adversarial_graph(pipe, image_id: int, target: int, eps: float, step_size: float, steps: int) -> dict:
    """App. J (paper Fig. 12): attack image ``image_id`` towards class ``target`` with targeted L∞ PGD
    (``eps``, ``step_size`` in pixel units, ``steps``), then explain the attacked and the clean image
    with the run's concepts (:meth:`gig_fast.Run.explain`: the graph of the
    predicted class) and compare them layer by layer against the graph's class top sets.
    """
    x, y = pipe.load_images([image_id])
    source = int(y[0])
    lower, upper, std = pixel_bounds(pipe, x.shape[1])
    model = pipe.model.eval()
    with torch.no_grad():
        clean_logits = model(x)
    adv, info = targeted_pgd(model, x, [target], eps=eps / std, step_size=step_size / std, steps=steps,
                             lower=lower.to(x), upper=upper.to(x))
    prob = torch.softmax(info["logits"], 1)[0]
    res = {"image": int(image_id), "source": source, "target": int(target), "source_name": _class_name(pipe, source),
           "target_name": _class_name(pipe, target), "clean_prediction": int(clean_logits.argmax(1)),
           "prediction": int(info["logits"].argmax(1)), "success": bool(info["success"][0]),
           "steps": int(info["steps"][0]), "linf_pixels": round(float(info["linf"][0]) * std, 5),
           "target_probability": round(float(prob[target]), 4), "source_probability": round(float(prob[source]), 4),
           "clean_target_probability": round(float(torch.softmax(clean_logits, 1)[0, target]), 4)}
    run = Run.open(pipe.out, model=pipe.model, device=str(pipe.device))
    clean_g, adv_g = run.explain(x[0]).to_dict(), run.explain(adv[0]).to_dict()
    tops = {p: top_sets(pipe, p) for p in pipe.points}
    comparison = {p: _layer_comparison(pipe, p, clean_g, adv_g, source, target, tops[p]) for p in pipe.points}
    res.update(layers=comparison, origins=_origins(pipe, adv_g, comparison, tops, source, target),
               graph={"nodes": adv_g["nodes"], "edges": adv_g["edges"]},
               pictures={"clean": png_data_uri(_display(x[0])), "attacked": png_data_uri(_display(adv[0], x[0])),
                         "difference": png_data_uri(_display(adv[0] - x[0], symmetric=True))})
    return res


def _display(img: torch.Tensor, ref: torch.Tensor | None = None, symmetric: bool = False) -> np.ndarray:
    """uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` picture of ``img [C, H, W]``, min–max scaled over ``ref``
    (default ``img``; a clean and an attacked image share one scale), or over ±max|img| (``symmetric``:
    a difference image, grey = 0)."""
    a = img.detach().float().cpu()
    r = (ref if ref is not None else img).detach().float().cpu()
    lo, hi = float(r.min()), float(r.max())
    if symmetric:
        hi = max(abs(lo), abs(hi), 1e-12)
        lo = -hi
    a = ((a - lo) / max(hi - lo, 1e-12)).clamp(0, 1).numpy()
    a = a[0] if a.shape[0] == 1 else a[:3].transpose(1, 2, 0)
    return (a * 255).astype(np.uint8)
