"""Pictures for the explorer page, as small PNG data URIs built from a run's work files.

* **iERF crops with context** (paper §3.1, Fig. 2): for a PFV sample, the input image with its iERF
  tinted blue and the rest dimmed, cropped to the region that holds most of the iERF mass plus a
  margin of context around it.
* **Concept samples**: per concept, the ``crops`` PFVs of the stage-1 PFV–iERF dataset nearest in
  cosine to the concept vector (``x − β`` against ``v_j``; paper Fig. 1 "top 10 nearest
  embeddings"), each flagged as a member of the concept's cluster or not. The first is the concept's
  top-1 representative drawn on its graph node.
* **Input images** and **localisation heat-maps** of a capped set of explained images: the code value
  of a concept at every position of a layer (stage-3 codes), drawn at that layer's resolution.

Only concepts that appear in some graph of the page get pictures; identical crops are stored once.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch

__all__ = ["collect_pictures", "png_data_uri", "ierf_crop", "heat_map_png", "graph_concepts", "pick_images"]

IERF_TINT = np.array([0.12, 0.35, 1.0])  # the paper's blue iERF area
IERF_MASS = 0.6  # the crop's core holds this share of the |iERF| mass
IERF_DECADES = 2.0  # iERF values down to 1 % of the peak are tinted
IMAGE_PX = 192  # longest side of an embedded input image (the heat-map underlay)
PALETTE_COLOURS = 32  # palette PNGs: ~35 % of the RGB size; 32 colours look the same as 64 here


def png_data_uri(pixels: np.ndarray, palette: bool = False) -> str:
    """``data:image/png;base64,…`` of ``pixels`` (uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels))
    if palette and img.mode == "RGB":
        img = img.quantize(PALETTE_COLOURS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def display_rgb(x: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` normalised image → float ``[H, W, 3]`` in [0, 1] (min–max over the image: the
    dataset's normalisation is not always known, and contrast stretching keeps shapes readable)."""
    a = x.detach().float().cpu().numpy()
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    return a.transpose(1, 2, 0)


def _mass_box(m: np.ndarray, share: float) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` of the strongest pixels that hold ``share`` of ``m``'s mass."""
    flat = np.sort(m.ravel())[::-1]
    total = np.cumsum(flat)
    if total[-1] <= 0:
        return 0, m.shape[0], 0, m.shape[1]
    thr = flat[min(int(np.searchsorted(total, share * total[-1])), flat.size - 1)]
    ys, xs = np.nonzero(m >= thr)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _context_box(box, shape, context: float) -> tuple[int, int, int, int]:
    """A square around ``box`` grown by its own size (at least ``context`` of the image side) on each side."""
    y0, y1, x0, x1 = box
    H, W = shape
    side = max(y1 - y0, x1 - x0)
    side = min(max(H, W), side + 2 * max(side, int(round(context * max(H, W)))))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(min(max(cy - side / 2, 0), max(H - side, 0))))
    left = int(round(min(max(cx - side / 2, 0), max(W - side, 0))))
    return top, min(H, top + side), left, min(W, left + side)


def ierf_crop(rgb: np.ndarray, ierf: np.ndarray, context: float = 0.2, max_px: int = 96) -> np.ndarray:
    """The "iERF with context" picture of one PFV sample.

    Args:
        rgb: ``[H, W, 3]`` float display image in [0, 1].
        ierf: ``[H, W]`` iERF relevance map of the sample (any sign; its magnitude is drawn).
        context: least margin around the iERF core, as a share of the image side.
        max_px: longest side of the result (larger crops are downsampled).
    Returns:
        uint8 ``[h, w, 3]``.
    """
    m = np.abs(np.nan_to_num(ierf.astype(np.float32)))
    m = m / max(float(m.max()), 1e-12)
    y0, y1, x0, x1 = _context_box(_mass_box(m, IERF_MASS), m.shape, context)
    # iERFs are peaked (a few pixels hold most of the relevance): draw them on a log scale over
    # IERF_DECADES orders of magnitude so the whole area the PFV sees is visible
    m = np.clip(1 + np.log10(np.maximum(m[y0:y1, x0:x1], 1e-30)) / IERF_DECADES, 0, 1)[..., None]
    pic = rgb[y0:y1, x0:x1] * (0.35 + 0.65 * m)  # dim the context
    pic = pic * (1 - 0.5 * m) + IERF_TINT * 0.5 * m  # tint the iERF
    out = (np.clip(pic, 0, 1) * 255).astype(np.uint8)
    return _fit(out, max_px)


def _fit(pixels: np.ndarray, max_px: int) -> np.ndarray:
    if max(pixels.shape[:2]) <= max_px:
        return pixels
    from PIL import Image

    img = Image.fromarray(pixels)
    img.thumbnail((max_px, max_px))
    return np.asarray(img)


def heat_map_png(values: np.ndarray) -> str | None:
    """RGBA overlay of one concept's code values ``[H, W]`` at a layer's resolution: red where the
    concept is used positively, blue where negatively, opacity ∝ |value| / max |value|.
    None when the concept is not used anywhere in the image."""
    peak = float(np.abs(values).max())
    if peak <= 0:
        return None
    a = np.abs(values) / peak
    rgba = np.zeros(values.shape + (4,), dtype=np.uint8)
    rgba[..., 0] = np.where(values > 0, 230, 30)
    rgba[..., 1] = 40
    rgba[..., 2] = np.where(values > 0, 40, 230)
    rgba[..., 3] = np.where(values != 0, np.maximum(np.round(np.sqrt(a) * 210), 1), 0).astype(np.uint8)
    return png_data_uri(rgba)


def graph_concepts(graph: dict, image_ids=()) -> dict[str, set[int]]:
    """layer → concept ids drawn anywhere: class graphs, shared concepts, and the given images' graphs."""
    need: dict[str, set[int]] = {}

    def add_graph(g):
        for layer, nodes in g["nodes"].items():
            need.setdefault(layer, set()).update(n["concept"] for n in nodes)
        for e in g["edges"]:  # edge ends are nodes of the same graph, except image edges' targets
            for layer, q in (e["source"], e["target"]):
                need.setdefault(layer, set()).add(q)

    for g in graph["class_graphs"].values():
        add_graph(g)
    for pg in graph["pair_graphs"].values():
        for layer, items in pg["shared"].items():
            need.setdefault(layer, set()).update(s["concept"] for s in items)
    wanted = set(int(i) for i in image_ids)
    for g in graph["images"]:
        if g["id"] in wanted:
            add_graph(g)
    need.pop("classes", None)
    return need


def pick_images(graph: dict, limit: int) -> list[int]:
    """Up to ``limit`` explained image ids, taken round-robin over classes so every class has some."""
    per_class: dict[int, list[int]] = {}
    for g in graph["images"]:
        per_class.setdefault(int(g["class"]), []).append(int(g["id"]))
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(v) for v in per_class.values()):
        for c in sorted(per_class):
            if depth < len(per_class[c]) and len(chosen) < limit:
                chosen.append(per_class[c][depth])
        depth += 1
    return sorted(chosen)


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
    from ..pipeline.stages import load_concepts

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
                picture = _fit((pics[img] * 255).astype(np.uint8), IMAGE_PX)
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
