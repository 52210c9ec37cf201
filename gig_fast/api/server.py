"""``gig-fast serve --run DIR``: a local HTTP JSON API over :class:`~gig_fast.Run` (optional extra
``gig_fast[serve]``: FastAPI + uvicorn), and the run's explorer page that uses it.

Endpoints (JSON unless said; ``{cls}`` is a class id or name, ``{layer}`` an analysed layer):

========================================  ======================================================
``GET  /``                                 the explorer page, which loads from this API what the
                                           embedded report lacks (any image, top images, uploads)
``GET  /api/run``                          run key, model, settings, layers, counts
``GET  /api/classes[?with_images=true]``   ``[{id, name, n_images}]``
``GET  /api/classes/{cls}/graph``          the class graph (``graph.json`` form)
``GET  /api/pairs/{cls}/{cls}``            the pair graph of two classes: shared concepts and their edges
``GET  /api/pairs/{cls}/{cls}/view``       what the page draws for a pair it does not embed (``?known=``)
``GET  /api/concepts/{layer}/{q}``         concept card: size, norm, vector, classes, nearest samples
                                           with iERF crops as PNG data URIs (``?samples=N``)
``GET  /api/concepts/{layer}/{q}/images``  the images that use it most, where (``?n=20``)
``GET  /api/images[?class_id=&offset=&limit=]``  explained image ids
``GET  /api/images/{id}/graph``            an explained image's graph (the store)
``GET  /api/images/{id}/view``             what the page draws for an image: its compact graph,
                                           picture, heat-maps and node pictures
``POST /api/explain[?target=&view=]``      the body is an image file (PNG, JPEG …): its explanation
``POST /api/intervene``                    JSON ``{"images": [id, …], "edits": [[layer, q, factor], …],
                                           "targets": [[layer, q], …], "top": 5}``: per image the ``top``
                                           classes' probabilities and the target concepts (default: the
                                           ``top`` later ones that changed most) before and after
========================================  ======================================================

Errors are JSON ``{"error": message}``: 404 for an unknown class, layer, concept or image, 400 for
a malformed request (422 when a parameter has the wrong type), 413 for an upload over
``MAX_UPLOAD``; never a traceback. One request at a time touches the run (a lock): the model and
the caches are not thread-safe.
"""

import json
import threading
from pathlib import Path

import numpy as np

from ..explorer.pictures import IMAGE_PX, display_rgb, fit, graph_concepts, heat_map_png, png_data_uri
from ..explorer.render import compact_graph, compact_pair_graph, render_explorer
from ..pipeline.pictures import collect_pictures
from ..pipeline.store import load_json
from .run import NotFoundError, Run

__all__ = ["create_app", "serve", "MAX_UPLOAD"]

MAX_UPLOAD = 20 * 1024 * 1024  # bytes of one uploaded image
MAX_INTERVENE_IMAGES = 64  # images of one intervention request (each is a forward pass and a few sparse codings)


def _card(run: Run, layer: str, q: int, samples: int) -> dict:
    card = run.concept(layer, q, samples=samples)
    return {"layer": card.layer, "id": card.id, "size": card.size, "norm": card.norm,
            "vector": [float(x) for x in card.vector.tolist()],
            "classes": [{"class": u.class_id, "name": run.classes[u.class_id].name, "rank": u.rank,
                         "normalized": u.normalized} for u in card.classes],
            "samples": [{"image": s.image, "position": s.position, "label": s.label, "cosine": s.cosine,
                         "member": s.member, "crop": png_data_uri(s.crop, palette=True) if s.crop is not None else None}
                        for s in card.samples]}


def _view(run: Run, graph: dict, picture: np.ndarray | None, heat: dict[str, str], known: set[str]) -> dict:
    """What the page needs to draw an image graph: compact arrays, its picture, heat-maps, and the
    top-1 picture and facts of every concept the page does not have yet (``known``: "layer|q")."""
    index = {lay.name: i for i, lay in enumerate(run.layers)}
    drawn = graph_concepts({"class_graphs": {}, "pair_graphs": {}, "images": [graph]}, [graph["id"]])
    pic = png_data_uri(fit((picture * 255).astype(np.uint8), IMAGE_PX), palette=True) if picture is not None else None
    return {"id": graph["id"], "label": graph["label"], "prediction": graph["prediction"], "class": graph["class"],
            **compact_graph(graph, index), "picture": pic, "heat": heat, **_new_concepts(run, drawn, known)}


def _pair_view(run: Run, c1: int | str, c2: int | str, known: set[str]) -> dict:
    """What the page needs to draw a pair graph it does not embed (``graph.json`` keeps a sample; the
    store has every pair): compact ``s``/``e`` arrays and the pictures and facts of its new concepts."""
    pg = run.pair_graph(c1, c2).to_dict()
    index = {lay.name: i for i, lay in enumerate(run.layers)}
    drawn: dict[str, set[int]] = {}
    for layer, items in pg["shared"].items():
        drawn.setdefault(layer, set()).update(s["concept"] for s in items)
    for e in pg["edges"]:
        for layer, q in (e["source"], e["target"]):
            if layer != "classes":
                drawn.setdefault(layer, set()).add(q)
    return {"classes": pg["classes"], **compact_pair_graph(pg, index), **_new_concepts(run, drawn, known)}


def _new_concepts(run: Run, drawn: dict[str, set[int]], known: set[str]) -> dict:
    """``concepts`` (facts), ``samples`` and ``crops`` (top-1 pictures) of the drawn concepts the page
    does not have yet (``known``: "layer|q")."""
    need = {f"{layer}|{q}" for layer, qs in drawn.items() for q in qs} - known
    nodes: dict[str, list] = {}
    facts: dict[str, list] = {}
    by_layer: dict[str, list[int]] = {}
    for key in need:
        layer, q = key.rsplit("|", 1)
        by_layer.setdefault(layer, []).append(int(q))
    crops: list[str] = []
    for layer, qs in by_layer.items():
        for q, items in run.concept_samples(layer, qs, 1).items():
            c = run.graph_dict()["concepts"][layer][q]
            facts[f"{layer}|{q}"] = [c["size"], c["norm"]]
            s = items[0] if items else None
            if s is not None and s.crop is not None:
                crops.append(png_data_uri(s.crop, palette=True))
                nodes[f"{layer}|{q}"] = [[len(crops) - 1, s.image, s.position, round(s.cosine, 4), int(s.member), s.label]]
    return {"concepts": facts, "samples": nodes, "crops": crops}


def _heat(graph: dict, codes_of) -> dict[str, str]:
    heat = {}
    for layer, qs in graph_concepts({"class_graphs": {}, "pair_graphs": {}, "images": [graph]}, [graph["id"]]).items():
        d = codes_of(layer)
        for q in sorted(qs):
            uri = heat_map_png(d.heat_map(q))
            if uri is not None:
                heat[f"{layer}|{q}"] = uri
    return heat


def create_app(run: Run, *, page_images: int | None = None):
    """The FastAPI application over ``run`` (see the module docstring for its endpoints)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="gig_fast run API", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    lock = threading.Lock()
    page: dict[str, str] = {}

    @app.exception_handler(NotFoundError)
    async def not_found(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ValueError)
    async def bad_request(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(FileNotFoundError)
    async def missing(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": msg}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request, exc):  # a bug, not the caller's fault: a message, never a traceback
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index():
        with lock:
            if "html" not in page:
                graph = run.graph_dict()
                limit = run.config.report_images if page_images is None else page_images
                pictures = collect_pictures(run, graph, crops=run.config.report_crops, max_images=limit)
                metrics = load_json(run.path / "metrics.json") if (run.path / "metrics.json").is_file() else None
                page["html"] = render_explorer(graph, metrics, pictures, max_images=limit, api="api")
        return HTMLResponse(page["html"])

    @app.get("/api/run")
    def info():
        store = run.store
        return {"run_key": run.key, "model": run.model_info, "settings": run.settings,
                "layers": [{"name": lay.name, "n_concepts": lay.n_concepts, "channels": lay.channels,
                            "spatial": list(lay.spatial) if lay.spatial else None} for lay in run.layers],
                "classes": len(run.classes), "classes_with_images": sum(c.n_images > 0 for c in run.classes),
                "images_total": run.images_total, "rank_depth": store.info.rank_depth if store else None}

    @app.get("/api/classes")
    def classes(with_images: bool = False):
        return [{"id": c.id, "name": c.name, "n_images": c.n_images} for c in run.classes
                if c.n_images > 0 or not with_images]

    @app.get("/api/classes/{cls}/graph")
    def class_graph(cls: str):
        c = run.class_id(int(cls) if cls.isdigit() else cls)
        return {"class": c, "name": run.classes[c].name, **run.class_graph(c).to_dict()}

    @app.get("/api/pairs/{c1}/{c2}")
    def pair_graph(c1: str, c2: str):
        return run.pair_graph(*(int(c) if c.isdigit() else c for c in (c1, c2))).to_dict()

    @app.get("/api/pairs/{c1}/{c2}/view")
    def pair_view(c1: str, c2: str, known: str = ""):
        with lock:
            return _pair_view(run, *(int(c) if c.isdigit() else c for c in (c1, c2)), set(filter(None, known.split(","))))

    @app.get("/api/concepts/{layer}/{q}")
    def concept(layer: str, q: int, samples: int = Query(10, ge=0, le=100)):
        with lock:
            return _card(run, layer, q, samples)

    @app.get("/api/concepts/{layer}/{q}/images")
    def top_images(layer: str, q: int, n: int = Query(20, ge=1)):
        with lock:
            return [{"rank": u.rank, "image": u.image, "class": u.explained_class, "usage": u.usage, "peak": u.peak,
                     "peak_position": u.peak_position, "active": u.active} for u in run.top_images(layer, q, n)]

    @app.get("/api/images")
    def images(class_id: str | None = None, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=10_000)):
        cid = None if class_id is None else run.class_id(int(class_id) if class_id.isdigit() else class_id)
        with lock:
            ids = run.image_ids(cid)
        return {"total": len(ids), "offset": offset, "ids": ids[offset: offset + limit]}

    @app.get("/api/images/{image}/graph")
    def image_graph(image: int):
        with lock:
            return run.image_graph(image).to_dict()

    @app.get("/api/images/{image}/view")
    def image_view(image: int, known: str = ""):
        with lock:
            g = run.image_graph(image).to_dict()
            picture = run.display_images([image])[image]
            heat = _heat(g, lambda layer: run.stored_codes(image, layer))
            return _view(run, g, picture, heat, set(filter(None, known.split(","))))

    @app.post("/api/explain")
    async def explain(request: Request, target: str | None = None, view: bool = False):
        body = await request.body()
        if not body:
            raise ValueError("send the image file as the request body (e.g. curl --data-binary @cat.png)")
        if len(body) > MAX_UPLOAD:
            return JSONResponse({"error": f"the upload has {len(body)} bytes; the limit is {MAX_UPLOAD}"}, status_code=413)
        with lock:
            x = run.load_image(body)
            tgt = None if target is None else (int(target) if target.isdigit() else target)
            ex = run.explain(x, target=tgt)
            if not view:
                return ex.to_dict()
            g = {"id": -1, "label": -1, **{k: v for k, v in ex.to_dict().items() if k in ("prediction", "class", "nodes", "edges")}}
            decomposed = {layer: run.decompose(x, layer) for layer in run.points}
            return {**_view(run, g, display_rgb(x), _heat(g, decomposed.__getitem__), set()),
                    "class_name": ex.class_name, "completeness_max_abs": ex.completeness}

    @app.post("/api/intervene")
    async def intervene(request: Request):
        body = await request.body()
        if len(body) > MAX_UPLOAD:
            return JSONResponse({"error": f"the request has {len(body)} bytes; the limit is {MAX_UPLOAD}"}, status_code=413)
        with lock:
            return _intervene(run, _json_body(body))

    return app


def _json_body(body: bytes) -> dict:
    """A JSON object from a request body (``ValueError`` naming what is wrong: the server answers 400)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("the request body is a JSON object: {\"images\": [ids], \"edits\": [[layer, concept, factor]]}")
    return data


def _intervene(run: Run, data: dict) -> dict:
    """``POST /api/intervene``: :meth:`Run.intervene` on each of ``data["images"]`` (dataset ids)."""
    unknown = set(data) - {"images", "edits", "targets", "top"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; valid: images, edits, targets, top")
    images, top = data.get("images"), data.get("top", 5)
    if not isinstance(images, list) or not images or not all(isinstance(i, int) and not isinstance(i, bool) for i in images):
        raise ValueError("images must be a non-empty list of image ids (dataset indices)")
    if len(images) > MAX_INTERVENE_IMAGES:
        raise ValueError(f"{len(images)} images in one request; the limit is {MAX_INTERVENE_IMAGES}")
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 100:
        raise ValueError(f"top must be an integer in 1..100, got {top!r}")
    x, _ = run.load_dataset_images(images)
    out = [{"image": i, **run.intervene(x[j], data.get("edits"), targets=data.get("targets")).to_dict(top)}
           for j, i in enumerate(images)]
    for r in out:  # every class's probabilities would be 1,000 numbers per image: the top classes carry them
        del r["probabilities_before"], r["probabilities_after"]
        if data.get("targets") is None:  # every later concept of a 16-layer run is ~20,000 numbers per image
            r["concepts"] = sorted(r["concepts"], key=lambda c: -abs(c["after"] - c["before"]))[:top]
    return {"results": out}


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """Serve ``run_dir`` until interrupted (``gig-fast serve``)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError('gig-fast serve needs the optional extra: pip install "gig_fast[serve]"') from None
    run = Run.open(run_dir, device=device)
    uvicorn.run(create_app(run), host=host, port=port, log_level="warning")
