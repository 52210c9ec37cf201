"""The explorer's pictures of a finished run, read through :class:`gig_fast.Run` (stage-1 samples and
iERFs, stage-3 codes) and drawn by :mod:`gig_fast.explorer.pictures`.

* **Concept samples**: per concept, the ``crops`` PFVs of the stage-1 PFV–iERF dataset nearest in
  cosine to the concept vector (``x − β`` against ``v_j``; paper Fig. 1 "top 10 nearest
  embeddings"), each flagged as a member of the concept's cluster or not, drawn as iERF crops with
  context. The first is the concept's top-1 representative drawn on its graph node.
* **Input images** and **localisation heat-maps** of a capped set of explained images: the code value
  of a concept at every position of a layer (stage-3 codes), drawn at that layer's resolution.

Only concepts that appear in some graph of the page get pictures; identical crops are stored once.
"""
from __future__ import annotations

import numpy as np

from ..explorer.pictures import IMAGE_PX, fit, graph_concepts, heat_map_png, pick_images, png_data_uri

__all__ = ["collect_pictures"]


def _concept_pictures(run, need: dict[str, set[int]], crops: int):
    """Per concept (``"layer|q"``) its nearest samples ``[crop, image, position, cosine, member,
    label]`` (crop = index into the returned crop table, −1 without iERFs), the crop table of PNG
    data URIs (each stage-1 sample drawn once), and whether iERFs were stored."""
    table: list[str] = []
    crop_index: dict[tuple[str, int, int], int] = {}
    concepts: dict[str, list] = {}
    stored_ierf = True
    for layer, qs in need.items():
        found = run.concept_samples(layer, sorted(qs), crops)
        stored_ierf &= any(s.crop is not None for items in found.values() for s in items)
        for q, items in found.items():
            samples = []
            for s in items:
                key = (layer, s.image, s.position)  # one stage-1 sample
                if key not in crop_index and s.crop is not None:
                    crop_index[key] = len(table)
                    table.append(png_data_uri(s.crop, palette=True))
                samples.append([crop_index.get(key, -1), s.image, s.position, round(s.cosine, 4), int(s.member), s.label])
            concepts[f"{layer}|{q}"] = samples
    return concepts, table, stored_ierf


def _heat_maps(run, graph: dict, image_ids: list[int]) -> dict[str, dict]:
    """Per chosen explained image: its picture and, per layer, heat-maps of the concepts of its own
    graph and of its class's graph (the concepts a card can show while that image is selected)."""
    by_id = {g["id"]: g for g in graph["images"]}
    pics = run.display_images(image_ids)
    out: dict[str, dict] = {}
    for img in image_ids:
        want = graph_concepts({"class_graphs": {"c": graph["class_graphs"][str(by_id[img]["class"])]},
                               "pair_graphs": {}, "images": [by_id[img]]}, [img])
        heat: dict[str, str] = {}
        for layer, qs in want.items():
            codes = run.stored_codes(img, layer)
            for q in sorted(qs):
                uri = heat_map_png(codes.heat_map(q))
                if uri is not None:  # concepts the image does not use are left out
                    heat[f"{layer}|{q}"] = uri
        picture = fit((pics[img] * 255).astype(np.uint8), IMAGE_PX)
        out[str(img)] = {"picture": png_data_uri(picture, palette=True), "heat": heat}
    return out


def collect_pictures(run, graph: dict, *, crops: int = 10, max_images: int = 20) -> dict:
    """Every picture the explorer page shows for a finished run.

    Args:
        run: the run (:class:`gig_fast.Run`).
        graph: its ``graph.json`` dict (the class graphs and the image sample).
        crops: nearest samples per concept (the card shows them; the first is the node picture).
        max_images: explained images embedded with their picture and heat-maps (round-robin over
            classes); the page offers only these in its image view.
    Returns:
        JSON-able ``{"crops": [data URI, …], "concepts": {"layer|q": [[crop, image, position, cosine,
        member, label], …]}, "images": {"id": {"picture", "heat": {"layer|q": data URI}}}, "ierf": bool,
        "images_total": n}``.
    """
    image_ids = pick_images(graph, max_images)
    concepts, table, stored = _concept_pictures(run, graph_concepts(graph, image_ids), crops)
    return {"crops": table, "concepts": concepts, "images": _heat_maps(run, graph, image_ids),
            "ierf": stored, "images_total": graph.get("images_total", len(graph["images"]))}
