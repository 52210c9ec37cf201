"""One image's concept graph against the stored concepts of a finished run (the library-backend use)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..gig import ClassTarget, ConceptTarget, gig
from ..ops import sparse_code
from .config import PipelineConfig
from .graph import image_layer_graph
from .stages import CLASSES, image_top_concepts
from .store import load_json, load_npz

__all__ = ["explain_image", "find_work"]


def find_work(out: Path) -> Path:
    """The work folder (``<out>/work-<key>``) of the newest finished run in the output folder ``out``."""
    works = sorted(out.glob("work-*/concepts"))
    if not works:
        raise FileNotFoundError(f"no finished run with concepts under {out}; run `gig-fast run` or `gig-fast demo` first")
    return max(works, key=lambda p: p.stat().st_mtime).parent


def explain_image(run_dir: str | Path, image: torch.Tensor, *, target: int | None = None, model=None,
                  top: int | None = None, device: str | None = None) -> dict:
    """GIG graph of one image (``[C, H, W]``, preprocessed) on a run's concepts.

    Codes every layer's PFVs, takes GIG from the last layer to the class (predicted unless ``target``),
    then from each layer to the ``top`` strongest concepts of the layer above *for this image* — the
    image graphs of ``graph.json`` are the same computation (stage 4's image pass), so for an explained
    image this returns its ``images[]`` entry's nodes and edges (up to float rounding).
    Returns a dict in the ``images[]`` form of ``docs/graph_schema.md`` plus ``class_name``.
    """
    from ..models import get_adapter, load_model

    work = find_work(Path(run_dir))
    cfg = PipelineConfig(**{k: v for k, v in load_json(work / "config.json")["config"].items()})
    dev = torch.device(device or cfg.device)
    model = model if model is not None else load_model(cfg.model, cfg.weights)
    adapter = get_adapter(model)
    model.to(dev)
    points = adapter.check_points(cfg.layers)
    top = top or cfg.top_concepts
    x = image[None].to(dev, torch.float32) if image.dim() == 3 else image.to(dev, torch.float32)
    with torch.no_grad():
        rec = adapter.record(x, keep="preact")
    pred = int(rec.logits.argmax(1))
    cls = pred if target is None else int(target)
    codes, concepts = {}, {}
    for p in points:
        c = {k: torch.from_numpy(v).to(dev) for k, v in load_npz(work / "concepts" / f"{p}.npz").items()}
        concepts[p] = c
        v = rec.preact(p)
        X = v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])
        idx, val = sparse_code(X, c["V"].to(X), bias=c["beta"].to(X), **cfg.code_options())
        codes[p] = (idx.reshape(1, X.shape[0], -1), val.reshape(1, X.shape[0], -1).to(X))
    nodes, edges, deltas = {}, [], {}
    targets: list[int] = [cls]
    for i in range(len(points) - 1, -1, -1):
        a = points[i]
        b = CLASSES if i == len(points) - 1 else points[i + 1]
        if b == CLASSES:
            tgt = [ClassTarget(cls, probability=cfg.class_probability)]
        else:
            tgt = [ConceptTarget(concepts[b]["V"][t]) for t in targets]
        f_ab = adapter.f_ab(a, None if b == CLASSES else b)
        res = gig(f_ab, codes[a], concepts[a]["V"], concepts[a]["beta"], tgt, spatial=tuple(rec.preact(a).shape[-2:]),
                  **cfg.gig_options())
        pc = res.per_concept.detach().double().cpu().reshape(len(targets), 1, -1)  # [T, 1, K_a]
        deltas[f"{a}->{b}"] = float(res.delta.detach().abs().max())
        sel, values = image_top_concepts(pc, min(top, pc.shape[-1]))  # the same choice as stage 4's
        nodes[a], layer_edges = image_layer_graph(a, b, sel[0].tolist(), targets, values[0].numpy(), top)
        edges += layer_edges
        targets = sel[0].tolist()
    from ..models import FASHION_CLASSES
    names = cfg.class_names or getattr(model, "class_names", None) or (
        FASHION_CLASSES if cfg.dataset == "fashion-mnist" else None)
    return {"prediction": pred, "class": cls, "class_name": names[cls] if names and cls < len(names) else str(cls),
            "nodes": nodes, "edges": edges, "completeness_max_abs": deltas}
