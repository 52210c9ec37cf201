"""Pictures for the explorer page, as small PNG data URIs (pure functions of arrays and graph dicts;
:mod:`gig_fast.report.collect` reads a run through :class:`gig_fast.Run` and calls them).

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

import numpy as np
import torch

__all__ = ["png_data_uri", "png_bytes", "display_rgb", "ierf_crop", "fit", "heat_map_png", "graph_concepts", "pick_images",
           "IMAGE_PX"]

IERF_TINT = np.array([0.12, 0.35, 1.0])  # the paper's blue iERF area
IERF_MASS = 0.6  # the crop's core holds this share of the |iERF| mass
IERF_DECADES = 2.0  # iERF values down to 1 % of the peak are tinted
IMAGE_PX = 192  # longest side of an embedded input image (the heat-map underlay)
PALETTE_COLOURS = 32  # palette PNGs: ~35 % of the RGB size; 32 colours look the same as 64 here
# Fast octree quantisation: 0.8 ms per 28 px crop against 2.3 ms for PIL's default median cut (same
# look side by side, ~10 % smaller files); every concept's top-1 crop is drawn when a run ends.


def png_data_uri(pixels: np.ndarray | bytes, palette: bool = False) -> str:
    """``data:image/png;base64,…`` of ``pixels`` (uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``, or
    the bytes of a PNG)."""
    data = pixels if isinstance(pixels, bytes) else png_bytes(pixels, palette)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_bytes(pixels: np.ndarray, palette: bool = False) -> bytes:
    """The PNG file of ``pixels`` (uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``); ``palette``: RGB
    quantised to :data:`PALETTE_COLOURS` colours."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels))
    if palette and img.mode == "RGB":
        img = img.quantize(PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


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
    return fit(out, max_px)


def fit(pixels: np.ndarray, max_px: int) -> np.ndarray:
    """``pixels`` (uint8 ``[H, W(, 3)]``) shrunk to at most ``max_px`` on the longest side."""
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
