"""What ``gig-fast serve`` draws for the explorer page, built from a :class:`~gig_fast.Run`: the page,
concept cards, and the views of a pair or an image the page does not embed.

Every method is safe to call from several threads at once (the server runs them on a pool). What a view
needs is read, not recomputed: the nearest samples and top-1 crops of every concept come from the run's
``concept_samples/`` (written when the run ended; built in memory at start for an older run, see
:meth:`Views.warm_up`), other crops are drawn once and kept in a bounded cache, per-image codes and
stage-1 iERFs are read row by row from memory maps.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import numpy as np

from ..explorer.pictures import IMAGE_PX, display_rgb, fit, graph_concepts, heat_map_png, png_data_uri
from ..explorer.render import compact_graph, compact_pair_graph, render_explorer
from ..report.collect import collect_pictures
from ..run_folder import METRICS_FILE, REPORT_FILE
from ..pipeline.files import load_json
from ..api import Run

__all__ = ["Views", "CROP_CACHE"]

# Crops kept drawn (data URIs): ~0.4 KB each on the demo's 28 px images (~3 MB in all), at most
# ~12 KB at the 96 px a crop is shrunk to (~100 MB), for a card's samples beyond the stored top-1.
CROP_CACHE = 8192

_EMBEDDED = re.compile(r'<script type="application/json" id="(gig-main|gig-pictures)">(.*?)</script>', flags=re.S)


class _LRU:
    """A dict of at most ``size`` entries that forgets the least recently used; thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys) -> dict:
        with self._lock:
            found = {k: self._items[k] for k in keys if k in self._items}
            for k in found:
                self._items.move_to_end(k)
        return found

    def put_many(self, items: dict) -> None:
        with self._lock:
            self._items.update(items)
            for k in items:
                self._items.move_to_end(k)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Views:
    """The served views of ``run`` (see the module docstring); ``page_images``: explained images the
    page embeds when it has to draw its pictures itself (default: the run's ``report_images``)."""

    def __init__(self, run: Run, page_images: int | None = None):
        self.run = run
        self.page_images = page_images
        self.layer_index = {lay.name: i for i, lay in enumerate(run.layers)}
        self._crops = _LRU(CROP_CACHE)
        self._page: str | None = None
        self._page_lock = threading.Lock()

    # -- warming up -------------------------------------------------------------------------------
    def warm_up(self, log=print) -> None:
        """What the first requests would otherwise wait for: the page, the data set, the codes index,
        and — for a run without ``concept_samples/`` — every layer's nearest samples in memory
        (one pass over the stage-1 files per layer; until a layer's is built its cards stream them)."""
        run = self.run
        self.page()
        for layer in run.points:  # banks and stored nearest samples: ~0.1 s a layer on a card's first call
            run.bank(layer)
            run.sample_index(layer)
        ids = run.image_ids(limit=1)
        if ids:
            run.display_images(ids)
            run.stored_codes(ids[0], run.points[-1])
        if run.index_missing:
            log(f"the run has {run.index_missing}: building each layer's nearest samples in memory; "
                "`gig-fast report --run DIR` writes them into the run")
            for layer in run.points:
                run.build_sample_index(layer)
            log("nearest samples of every layer ready")

    # -- the page ---------------------------------------------------------------------------------
    def page(self) -> str:
        """The explorer page calling this API: drawn once; its pictures are taken from the run's
        ``report.html`` when it holds them (the same run), else drawn here."""
        with self._page_lock:
            if self._page is None:
                run = self.run
                graph = run.graph_dict()
                limit = run.config.report_images if self.page_images is None else self.page_images
                pictures = self._report_pictures() if self.page_images is None else None
                if pictures is None:
                    pictures = collect_pictures(run, graph, crops=run.config.report_crops, max_images=limit)
                metrics = load_json(run.path / METRICS_FILE) if (run.path / METRICS_FILE).is_file() else None
                self._page = render_explorer(graph, metrics, pictures, max_images=limit, api="api")
            return self._page

    def _report_pictures(self) -> dict | None:
        """The pictures embedded in the run's ``report.html`` (None when it has none of this run)."""
        path = self.run.path / REPORT_FILE
        if not path.is_file():
            return None
        found = {k: v for k, v in _EMBEDDED.findall(path.read_text(encoding="utf-8"))}
        if set(found) != {"gig-main", "gig-pictures"}:
            return None
        main, pictures = json.loads(found["gig-main"]), json.loads(found["gig-pictures"])
        if main.get("run_key") != self.run.key or not pictures.get("images"):
            return None
        return {**pictures, "ierf": bool(main.get("ierf"))}

    # -- concept samples --------------------------------------------------------------------------
    def _nearest(self, layer: str, qs: list[int], k: int):
        """``(rows, cosine, member, image, position, label)``, each ``[Q, k]``, of concepts ``qs``."""
        idx = self.run.sample_index(layer, k)
        if idx is not None:
            return tuple(a[qs, :k] for a in (idx.rows, idx.cosine, idx.member, idx.image, idx.position, idx.label))
        rows, cos, member = self.run.nearest_rows(layer, qs, k)
        return (rows, cos, member, *self.run.sample_meta(layer, rows))

    def _crop_uris(self, layer: str, qs: list[int], rows: np.ndarray) -> list[list[str | None]]:
        """The crop data URIs of ``rows [Q, k]`` (stage-1 samples of ``layer``; concept ``qs[i]`` for
        row ``i``): the top-1 from the sample index, others from the cache or drawn now."""
        idx = self.run.sample_index(layer, 1)
        out: list[list[str | None]] = [[None] * rows.shape[1] for _ in qs]
        need: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for i, q in enumerate(qs):
            png = idx.top_crop(q) if idx is not None and int(idx.rows[q, 0]) == int(rows[i, 0]) else None
            if png is not None:
                out[i][0] = png_data_uri(png)
            for j in range(0 if png is None else 1, rows.shape[1]):
                need.setdefault((layer, int(rows[i, j])), []).append((i, j))
        if need:
            found = self._crops.get_many(need)
            missing = [r for (_, r) in need if (layer, r) not in found]
            if missing:
                pngs = self.run.sample_crop_pngs(layer, missing)
                drawn = {(layer, r): (png_data_uri(pngs[r]) if r in pngs else None) for r in missing}
                self._crops.put_many(drawn)
                found.update(drawn)
            for key, places in need.items():
                for i, j in places:
                    out[i][j] = found[key]
        return out

    def _new_concepts(self, drawn: dict[str, set[int]], known: set[str]) -> dict:
        """``concepts`` (facts), ``samples`` and ``crops`` (top-1 pictures) of the drawn concepts the page
        does not have yet (``known``: "layer|q")."""
        facts: dict[str, list] = {}
        nodes: dict[str, list] = {}
        crops: list[str] = []
        concepts = self.run.graph_dict()["concepts"]
        for layer, qs in drawn.items():
            qs = sorted(q for q in qs if f"{layer}|{q}" not in known)
            if not qs:
                continue
            rows, cos, member, image, position, label = self._nearest(layer, qs, 1)
            uris = self._crop_uris(layer, qs, rows)
            for i, q in enumerate(qs):
                key = f"{layer}|{q}"
                facts[key] = [concepts[layer][q]["size"], concepts[layer][q]["norm"]]
                if uris[i][0] is not None:
                    crops.append(uris[i][0])
                    nodes[key] = [[len(crops) - 1, int(image[i, 0]), int(position[i, 0]), round(float(cos[i, 0]), 4),
                                   int(member[i, 0]), int(label[i, 0])]]
        return {"concepts": facts, "samples": nodes, "crops": crops}

    # -- the views --------------------------------------------------------------------------------
    def card(self, layer: str, q: int, samples: int) -> dict:
        """A concept card: facts, vector, the classes that use it, its ``samples`` nearest PFVs with crops."""
        run = self.run
        card = run.concept(layer, q, samples=0)
        items = []
        if samples > 0:
            rows, cos, member, image, position, label = self._nearest(layer, [card.id], samples)
            uris = self._crop_uris(layer, [card.id], rows)[0]
            items = [{"image": int(image[0, j]), "position": int(position[0, j]), "label": int(label[0, j]),
                      "cosine": float(cos[0, j]), "member": bool(member[0, j]), "crop": uris[j]}
                     for j in range(rows.shape[1])]
        return {"layer": card.layer, "id": card.id, "size": card.size, "norm": card.norm,
                "vector": [float(x) for x in card.vector.tolist()],
                "classes": [{"class": u.class_id, "name": run.classes[u.class_id].name, "rank": u.rank,
                             "normalized": u.normalized} for u in card.classes],
                "samples": items}

    def pair_view(self, c1: int | str, c2: int | str, known: set[str]) -> dict:
        """What the page needs to draw a pair graph it does not embed (``graph.json`` keeps a sample; the
        store has every pair): compact ``s``/``e`` arrays and the pictures and facts of its new concepts."""
        pg = self.run.pair_graph(c1, c2).to_dict()
        drawn: dict[str, set[int]] = {}
        for layer, items in pg["shared"].items():
            drawn.setdefault(layer, set()).update(s["concept"] for s in items)
        for e in pg["edges"]:
            for layer, q in (e["source"], e["target"]):
                if layer != "classes":
                    drawn.setdefault(layer, set()).add(q)
        return {"classes": pg["classes"], **compact_pair_graph(pg, self.layer_index), **self._new_concepts(drawn, known)}

    def image_view(self, image: int, known: set[str]) -> dict:
        """What the page draws for an explained image: its compact graph, picture, heat-maps and the
        node pictures it lacks."""
        run = self.run
        g = run.image_graph(image).to_dict()
        picture = run.display_images([image])[image]
        return self.graph_view(g, picture, lambda layer: run.stored_codes(image, layer), known)

    def graph_view(self, graph: dict, picture: np.ndarray | None, codes_of, known: set[str]) -> dict:
        """What the page needs to draw an image graph (``graph``: an image graph dict with ``id``,
        ``label``, ``prediction``, ``class``): compact arrays, its picture (``[H, W, 3]`` in [0, 1]),
        the heat-maps of its concepts (``codes_of(layer)``: a :class:`Decomposition`), and the top-1
        picture and facts of every concept the page does not have yet (``known``: "layer|q")."""
        drawn = graph_concepts({"class_graphs": {}, "pair_graphs": {}, "images": [graph]}, [graph["id"]])
        heat = {}
        for layer, qs in drawn.items():
            d = codes_of(layer)
            for q in sorted(qs):
                uri = heat_map_png(d.heat_map(q))
                if uri is not None:
                    heat[f"{layer}|{q}"] = uri
        pic = png_data_uri(fit((picture * 255).astype(np.uint8), IMAGE_PX), palette=True) if picture is not None else None
        return {"id": graph["id"], "label": graph["label"], "prediction": graph["prediction"], "class": graph["class"],
                **compact_graph(graph, self.layer_index), "picture": pic, "heat": heat,
                **self._new_concepts(drawn, known)}

    def explain(self, body: bytes, target: int | str | None, view: bool) -> dict:
        """Explain an uploaded image (the model under the run's ``model_lock``), as JSON, or as the view the
        page draws (``view``)."""
        run = self.run
        with run.model_lock:
            x = run.load_image(body)
            ex = run.explain(x, target=target)
            decomposed = {layer: run.decompose(x, layer) for layer in run.points} if view else {}
        if not view:
            return ex.to_dict()
        g = {"id": -1, "label": -1, **{k: v for k, v in ex.to_dict().items() if k in ("prediction", "class", "nodes", "edges")}}
        return {**self.graph_view(g, display_rgb(x), decomposed.__getitem__, set()),
                "class_name": ex.class_name, "completeness_max_abs": ex.completeness}
