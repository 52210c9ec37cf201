"""The explorer's pictures of a finished run, read from its work files (stage-1 samples and iERFs,
stage-3 codes) and drawn by :mod:`gig_fast.explorer.pictures`.

* **Concept samples**: per concept, the ``crops`` PFVs of the stage-1 PFV–iERF dataset nearest in
  cosine to the concept vector (``x − β`` against ``v_j``; paper Fig. 1 "top 10 nearest
  embeddings"), each flagged as a member of the concept's cluster or not, drawn as iERF crops with
  context. The first is the concept's top-1 representative drawn on its graph node.
* **Input images** and **localisation heat-maps** of a capped set of explained images: the code value
  of a concept at every position of a layer (stage-3 codes), drawn at that layer's resolution.

Only concepts that appear in some graph of the page get pictures; identical crops are stored once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..explorer.pictures import (IMAGE_PX, display_rgb, fit, graph_concepts, heat_map_png, ierf_crop,
                                 pick_images, png_data_uri)
from .stages import load_concepts

__all__ = ["collect_pictures", "stage1_rows", "sample_crops", "nearest_samples"]


def _stage1_rows(work: Path):
    """Stage-1 chunk files with their first global row (rows are numbered across chunks in order)."""
    files = sorted((work / "stage1").glob("chunk_*.npz"))
    starts, n = [], 0
    for f in files:
        starts.append(n)
        with np.load(f, allow_pickle=False) as z:
            n += len(z["image"])
    return files, np.array(starts + [n])


def _nearest(pipe, layer: str, concepts: list[int], k: int, files: list[Path]):
    """``[len(concepts), k]`` stage-1 rows nearest in cosine to each concept (``x − β`` against
    ``v_j``), their cosines, and whether each row belongs to the concept's cluster. Streams the
    stage-1 chunks, so memory stays at one chunk of PFVs."""
    c = load_concepts(pipe, layer)
    V = torch.nn.functional.normalize(c["V"].double()[concepts], dim=1)  # [Q, C]
    beta = c["beta"].double()
    best_val = torch.empty(len(concepts), 0, dtype=torch.float64)
    best_row = torch.empty(len(concepts), 0, dtype=torch.long)
    start = 0
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            X = torch.from_numpy(z[f"{layer}|pfv"]).double() - beta
        cos = V @ torch.nn.functional.normalize(X, dim=1).T  # [Q, n]
        rows = torch.arange(start, start + X.shape[0]).expand(len(concepts), -1)
        start += X.shape[0]
        vals, pick = torch.topk(torch.cat([best_val, cos], 1), min(k, best_val.shape[1] + cos.shape[1]), dim=1)
        best_row = torch.gather(torch.cat([best_row, rows], 1), 1, pick)
        best_val = vals
    member = c["labels"].long()[best_row] == torch.tensor(concepts)[:, None]
    return best_row.numpy(), best_val.numpy(), member.numpy()


def _images(pipe, ids) -> dict[int, np.ndarray]:
    ids = sorted(set(int(i) for i in ids))
    out = {}
    for i in range(0, len(ids), 256):
        part = ids[i:i + 256]
        x, _ = pipe.load_images(part)
        out.update({img: display_rgb(x[j]) for j, img in enumerate(part)})
    return out


def _stage1_samples(files: list[Path], starts: np.ndarray, layer: str, rows) -> tuple[dict, dict]:
    """For global stage-1 ``rows`` of ``layer``: ``{row: (image, position, label)}`` and
    ``{row: iERF map [H, W]}`` (empty when the run kept no iERFs, ``store_ierf=False``)."""
    meta: dict[int, tuple[int, int, int]] = {}
    maps: dict[int, np.ndarray] = {}
    wanted = sorted(set(int(r) for r in rows))
    for fi, f in enumerate(files):
        local = [r - int(starts[fi]) for r in wanted if starts[fi] <= r < starts[fi + 1]]
        if not local:
            continue
        with np.load(f, allow_pickle=False) as z:
            img, pos, lab = z["image"], z[f"{layer}|position"], z["label"]
            ierf = z[f"{layer}|ierf"] if f"{layer}|ierf" in z.files else None
        for r in local:
            row = r + int(starts[fi])
            meta[row] = (int(img[r]), int(pos[r]), int(lab[r]))
            if ierf is not None:
                maps[row] = ierf[r]
    return meta, maps


def _concept_pictures(pipe, need: dict[str, set[int]], crops: int, max_px: int):
    """Per concept (``"layer|q"``) its nearest samples ``[crop, image, position, cosine, member,
    label]`` (crop = index into the returned crop table, −1 without iERFs), the crop table of PNG
    data URIs (each stage-1 sample drawn once), and whether iERFs were stored."""
    files, starts = _stage1_rows(pipe.work)
    table: list[str] = []
    crop_index: dict[tuple[str, int], int] = {}
    concepts: dict[str, list] = {}
    stored_ierf = True
    for layer, qs in need.items():
        qs = sorted(qs)
        rows, cos, member = _nearest(pipe, layer, qs, crops, files)
        meta, maps = _stage1_samples(files, starts, layer, rows.ravel())
        stored_ierf &= bool(maps)
        pics = _images(pipe, [m[0] for m in meta.values()]) if maps else {}
        for qi, q in enumerate(qs):
            samples = []
            for r, cv, mem in zip(rows[qi].tolist(), cos[qi].tolist(), member[qi].tolist()):
                key = (layer, r)
                if key not in crop_index and r in maps:
                    crop_index[key] = len(table)
                    table.append(png_data_uri(ierf_crop(pics[meta[r][0]], maps[r], max_px=max_px), palette=True))
                samples.append([crop_index.get(key, -1), *meta[r][:2], round(float(cv), 4), int(mem), meta[r][2]])
            concepts[f"{layer}|{q}"] = samples
    return concepts, table, stored_ierf


def _heat_maps(pipe, graph: dict, image_ids: list[int]) -> dict[str, dict]:
    """Per chosen explained image: its picture and, per layer, heat-maps of the concepts of its own
    graph and of its class's graph (the concepts a card can show while that image is selected)."""
    spatial = {lay["name"]: lay.get("spatial") for lay in graph["layers"]}
    by_id = {g["id"]: g for g in graph["images"]}
    want = {i: graph_concepts({"class_graphs": {"c": graph["class_graphs"][str(by_id[i]["class"])]},
                               "pair_graphs": {}, "images": [by_id[i]]}, [i]) for i in image_ids}
    pics = _images(pipe, image_ids)
    out: dict[str, dict] = {}
    for f in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            row_of = {int(i): r for r, i in enumerate(z["image"].tolist()) if int(i) in want}
            if not row_of:
                continue
            for img, r in row_of.items():
                picture = fit((pics[img] * 255).astype(np.uint8), IMAGE_PX)
                out[str(img)] = {"picture": png_data_uri(picture, palette=True),
                                 "heat": _image_heat_maps(z, r, want[img], spatial)}
    return out


def _image_heat_maps(codes, row: int, concepts: dict[str, set[int]], spatial: dict) -> dict[str, str]:
    """``"layer|q"`` → heat-map of concept q in one explained image (row ``row`` of a stage-3 codes
    file): its code value at each position ``[P]`` (0 where q is not among the position's codes),
    reshaped to the layer's ``[H, W]``. Concepts the image does not use are left out."""
    heat: dict[str, str] = {}
    for layer, qs in concepts.items():
        idx, val = codes[f"{layer}|idx"][row], codes[f"{layer}|val"][row]  # [P, s]
        for q in sorted(qs):
            uri = heat_map_png(np.where(idx == q, val, 0.0).sum(1).reshape(spatial[layer]))
            if uri is not None:
                heat[f"{layer}|{q}"] = uri
    return heat


def collect_pictures(pipe, graph: dict, *, crops: int = 10, max_images: int = 20, max_px: int = 96) -> dict:
    """Every picture the explorer page shows for a finished run.

    Args:
        pipe: the run's :class:`~gig_fast.pipeline.Pipeline` (work folder, model-free image loading).
        graph: its ``graph.json`` dict.
        crops: nearest samples per concept (the card shows them; the first is the node picture).
        max_images: explained images embedded with their picture and heat-maps (round-robin over
            classes); the page offers only these in its image view.
        max_px: longest side of a crop.
    Returns:
        JSON-able ``{"crops": [data URI, …], "concepts": {"layer|q": [[crop, image, position, cosine,
        member, label], …]}, "images": {"id": {"picture", "heat": {"layer|q": data URI}}}, "ierf": bool,
        "images_total": n}``.
    """
    image_ids = pick_images(graph, max_images)
    concepts, table, stored = _concept_pictures(pipe, graph_concepts(graph, image_ids), crops, max_px)
    return {"crops": table, "concepts": concepts, "images": _heat_maps(pipe, graph, image_ids),
            "ierf": stored, "images_total": graph.get("images_total", len(graph["images"]))}


def stage1_rows(pipe) -> tuple[list[Path], np.ndarray]:
    """The run's stage-1 chunk files and ``[files + 1]`` global first rows (rows numbered across chunks)."""
    return _stage1_rows(pipe.work)


def sample_crops(pipe, layer: str, rows, max_px: int = 96) -> dict[int, dict]:
    """For global stage-1 ``rows`` of ``layer``: ``{row: {"image", "position", "label", "crop"}}`` with
    ``crop`` the iERF-with-context picture (uint8 ``[h, w, 3]``, or None when the run kept no iERFs)."""
    files, starts = _stage1_rows(pipe.work)
    meta, maps = _stage1_samples(files, starts, layer, rows)
    pics = _images(pipe, [m[0] for m in meta.values()]) if maps else {}
    return {r: {"image": m[0], "position": m[1], "label": m[2],
                "crop": ierf_crop(pics[m[0]], maps[r], max_px=max_px) if r in maps else None}
            for r, m in meta.items()}


def nearest_samples(pipe, layer: str, concepts: list[int], k: int):
    """``(rows [Q, k], cosines [Q, k], member [Q, k])``: the stage-1 PFVs nearest in cosine to each concept
    (``x − β`` against ``v_j``; the explorer card's samples), and whether each is in the concept's cluster."""
    files, _ = _stage1_rows(pipe.work)
    return _nearest(pipe, layer, list(concepts), k, files)
