"""``report.html``: the interactive graph explorer as one self-contained HTML file.

The page inlines its own ``explorer.css`` and ``explorer.js`` (no network, no CDN; a Content Security
Policy forbids every fetch and allows only this one script, by hash) and embeds the data as JSON in
``<script type="application/json">`` elements. Every data string stays data: the JSON is escaped so it
cannot close its element (``<``, ``>``, ``&`` become ``\\u003c`` …), and the script inserts strings only
as text nodes or attribute values.

The data is split so that the page becomes interactive without reading all of it: one element per
class graph (parsed when that class is shown), and the pair and concept-usage indexes (parsed on first
use). Graph arrays are flat numbers (see :func:`compact_graph`) to keep large graphs small.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from importlib import resources

from .cards import check_decomposition_card
from .pictures import graph_concepts, pick_images
from .summary import summary_html as metrics_summary

__all__ = ["render_explorer", "embed_json", "compact_graph", "compact_pair_graph", "concept_usage", "insert_decompositions",
           "insert_section"]

_DECOMPOSITIONS = re.compile(r'<script type="application/json" id="gig-decompositions">.*?</script>\n?', flags=re.S)

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def embed_json(obj) -> str:
    """JSON text that is safe inside ``<script type="application/json">``: no ``</script>``, no ``<!--``.

    ``<``, ``>`` and ``&`` can only occur inside JSON strings, where their ``\\uXXXX`` escapes mean the
    same characters to ``JSON.parse``.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for ch, esc in _JSON_ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def compact_graph(g: dict, layer_index: dict[str, int]) -> dict:
    """One graph (class or image) as flat arrays: ``n = [layer, concept, score, normalized, …]`` and
    ``e = [source layer, source, target layer, target, weight, normalized, …]`` (layer = index into
    ``layers``). Image graphs have no node ``normalized``: it is |score| / max |score| per layer.
    A graph with error nodes (``graph.json`` version 2) also has ``x = [layer, score, target layer, target,
    weight, normalized, …]``, one entry per edge of each layer's error node."""
    nodes: list = []
    for layer, items in g["nodes"].items():
        peak = max((abs(n["score"]) for n in items), default=0.0) or 1.0
        for n in items:
            norm = n["normalized"] if "normalized" in n else round(abs(n["score"]) / peak, 6)
            nodes += [layer_index[layer], n["concept"], n["score"], norm]
    edges: list = []
    for e in g["edges"]:
        (sl, s), (tl, t) = e["source"], e["target"]
        edges += [layer_index[sl], s, layer_index[tl], t, e["weight"], e["normalized"]]
    if not g.get("errors"):
        return {"n": nodes, "e": edges}
    errors = [v for layer, node in g["errors"].items() for e in node["edges"]
              for v in (layer_index[layer], node["score"], layer_index[e["target"][0]], e["target"][1], e["weight"],
                        e["normalized"])]
    return {"n": nodes, "e": edges, "x": errors}


def concept_usage(graph: dict) -> dict[str, list]:
    """``"layer|concept"`` → flat ``[class, rank, normalized, …]`` over the class graphs that use it
    (rank = place among the class's top concepts of that layer, 1 = strongest)."""
    usage: dict[str, list] = {}
    for cid, g in graph["class_graphs"].items():
        for layer, items in g["nodes"].items():
            for rank, n in enumerate(items, 1):
                usage.setdefault(f"{layer}|{n['concept']}", []).extend([int(cid), rank, n["normalized"]])
    return usage


def _pairs(graph: dict, layer_index: dict[str, int]) -> dict[str, dict]:
    """``"c1-c2"`` → ``{"s": [layer, concept, score, importance c1, importance c2, …],
    "e": [source layer, source, target layer, target, weight, normalized, class, …]}`` (the edges that
    wire the shared concepts in; none in a graph.json written before they existed)."""
    return {key: compact_pair_graph(pg, layer_index) for key, pg in graph["pair_graphs"].items()}


def compact_pair_graph(pg: dict, layer_index: dict[str, int]) -> dict:
    """One pair graph as flat arrays: ``s = [layer, concept, score, importance c1, importance c2, …]``
    and ``e = [source layer, source, target layer, target, weight, normalized, class, …]``."""
    shared: list = []
    for layer, items in pg.get("shared", {}).items():
        for s in items:
            shared += [layer_index[layer], s["concept"], s["score"], *s["importance"]]
    edges: list = []
    for e in pg.get("edges", []):
        (sl, src), (tl, tgt) = e["source"], e["target"]
        edges += [layer_index[sl], src, layer_index[tl], tgt, e["weight"], e["normalized"], e["class"]]
    return {"s": shared, "e": edges}


def _main_data(graph: dict, pictures: dict | None, max_images: int, title: str) -> dict:
    layer_index = {lay["name"]: i for i, lay in enumerate(graph["layers"])}
    shown = set(pictures["images"]) if pictures else {str(i) for i in pick_images(graph, max_images)}
    images = [{"id": g["id"], "label": g["label"], "prediction": g["prediction"], "class": g["class"],
               **compact_graph(g, layer_index)} for g in graph["images"] if str(g["id"]) in shown]
    drawn = graph_concepts(graph, [g["id"] for g in images])  # only concepts a view can show get facts
    concepts = {f"{layer}|{c['id']}": [c["size"], c["norm"]] for layer, items in graph.get("concepts", {}).items()
                for c in items if c["id"] in drawn.get(layer, ())}
    return {"title": title, "run_key": graph["run_key"], "model": graph["model"], "settings": graph["settings"],
            "layers": [{"name": lay["name"], "spatial": lay.get("spatial"), "n_concepts": lay["n_concepts"]}
                       for lay in graph["layers"]],
            "classes": [{"id": c["id"], "name": c["name"], "n_images": c.get("n_images", 0)} for c in graph["classes"]],
            "class_graphs": sorted(int(c) for c in graph["class_graphs"]),
            "images": images, "images_total": graph.get("images_total", len(graph["images"])), "concepts": concepts,
            "has_pictures": bool(pictures and pictures.get("crops")),
            "ierf": bool(pictures and pictures.get("ierf"))}


def _script_tag(element_id: str, obj) -> str:
    return f'<script type="application/json" id="{element_id}">{embed_json(obj)}</script>\n'


def render_explorer(graph: dict, metrics: dict | None = None, pictures: dict | None = None, *,
                    max_images: int = 20, summary_html: str = "", title: str = "gig_fast concept graph",
                    api: str | None = None, decompositions: list[dict] | None = None,
                    section_html: str = "") -> str:
    """The explorer page for one run.

    Args:
        graph: a ``graph.json`` dict (``docs/graph_schema.md``).
        metrics: its ``metrics.json`` dict, or None (then no metrics section unless ``summary_html``).
        pictures: :func:`~gig_fast.report.collect_pictures` output, or None (nodes without pictures;
            the image view then offers up to ``max_images`` images without heat-maps).
        max_images: images offered in the image view when ``pictures`` is None.
        summary_html: trusted, already escaped HTML for the static summary section; default: the
            metrics tables of :func:`gig_fast.explorer.summary_html` when ``metrics`` is given.
        title: page title (escaped).
        api: the relative URL of a run API (``gig-fast serve``) the page may call (its CSP then allows
            same-origin requests): any explained image, top images of a concept, explaining an upload.
            None: a self-contained page that makes no request.
        decompositions: PFV decomposition cards (plain dicts, :mod:`gig_fast.explorer.cards`) offered in
            the page's "PFV decomposition" menu, or None.
        section_html: trusted, already escaped HTML appended to the page (e.g. the validation section).
    Returns:
        The HTML text (UTF-8; write it with ``atomic_write_text``).
    """
    if not summary_html and metrics is not None:
        summary_html = metrics_summary(graph, metrics)
    layer_index = {lay["name"]: i for i, lay in enumerate(graph["layers"])}
    script = _asset("explorer.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    connect = "; connect-src 'self'" if api else ""
    csp = (f"default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'{connect}")
    data = [_script_tag("gig-main", {**_main_data(graph, pictures, max_images, title), "api": api}),
            _script_tag("gig-pictures", {k: pictures[k] for k in ("crops", "concepts", "images")} if pictures
                        else {"crops": [], "concepts": {}, "images": {}}),
            _script_tag("gig-usage", concept_usage(graph)),
            _script_tag("gig-pairs", _pairs(graph, layer_index))]
    data += [_script_tag(f"gig-class-{int(cid)}", compact_graph(g, layer_index))
             for cid, g in sorted(graph["class_graphs"].items(), key=lambda kv: int(kv[0]))]
    if decompositions:
        data.append(_script_tag("gig-decompositions", [check_decomposition_card(c) for c in decompositions]))
    e = html.escape
    body = _asset("explorer.html").replace("{{summary}}", summary_html or "<p>No metrics for this graph.</p>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{e(csp)}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="icon" href="data:,">\n'
            f'<title>{e(title)} · {e(str(graph["run_key"]))}</title>\n'
            f'<style>\n{_asset("explorer.css")}</style></head>\n<body>\n{body}\n{section_html}'
            + "".join(data) + f"<script>{script}</script>\n</body></html>\n")


def insert_decompositions(page: str, cards: list[dict]) -> str:
    """``page`` (an explorer page) with its PFV decomposition cards replaced by ``cards`` (put before the
    page's own script, which reads them when it starts)."""
    page = _DECOMPOSITIONS.sub("", page)
    if not cards:
        return page
    block = _script_tag("gig-decompositions", [check_decomposition_card(c) for c in cards])
    at = page.rfind("<script>")
    if at < 0:
        raise ValueError("not an explorer page: it has no <script> element")
    return page[:at] + block + page[at:]


def insert_section(page: str, section_html: str, section_id: str) -> str:
    """``page`` with the ``<section id="section_id">`` replaced by ``section_html`` (trusted, escaped HTML;
    appended before ``</body>`` when the page has none yet)."""
    page = re.sub(rf'<section id="{re.escape(section_id)}">.*?</section>', "", page, flags=re.S)
    return page.replace("</body>", section_html + "</body>", 1) if section_html else page
