"""``gig-fast serve --run DIR``: a local HTTP JSON API over :class:`~gig_fast.Run` (optional extra
``gig_fast[serve]``: FastAPI + uvicorn), and the run's explorer page that uses it.

Endpoints (JSON unless said; ``{cls}`` is a class id or name, ``{layer}`` an analysed layer):

========================================  ======================================================
``GET  /``                                 the explorer page, which loads from this API what the
                                           embedded report lacks (any image, top images, uploads)
``GET  /api/run``                          run key, model, settings, layers (those ``/api/concepts``
                                           takes), counts, what the run lacks for fast views
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

A class name may hold any character: percent-encode it (``T-shirt/top`` is ``T-shirt%2Ftop``).

Errors are JSON ``{"error": message}``: 404 for an unknown class, layer, concept, image or path, 405 for
a method a path does not take, 400 for a malformed request (422 when a parameter has the wrong type),
413 for an upload over ``MAX_UPLOAD``, 503 with ``Retry-After`` when the explain queue is full; never a
traceback.

Nothing blocks the event loop: reads and views run on a pool of ``VIEW_WORKERS`` threads (:class:`Workers`,
which new endpoints use too), explains on ``EXPLAIN_WORKERS`` threads with at most ``EXPLAIN_QUEUE``
waiting (the model is used by one request at a time: ``Run.model_lock``). The views read what the run
computed once (:mod:`.views`).
"""

import asyncio
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

from ..api import NotFoundError, Run
from .views import Views

__all__ = ["create_app", "serve", "Workers", "Busy", "MAX_UPLOAD", "VIEW_WORKERS", "EXPLAIN_WORKERS", "EXPLAIN_QUEUE"]

MAX_UPLOAD = 20 * 1024 * 1024  # bytes of one uploaded image
VIEW_WORKERS = 4  # threads for reads and views: 2 per core, so a slow view does not hold up short reads
EXPLAIN_WORKERS = 1  # explains at once: the model is used by one request at a time
EXPLAIN_QUEUE = 4  # explains waiting beyond those running; one more is answered 503 + Retry-After
MAX_INTERVENE_IMAGES = 64  # images of one intervention request (each is a forward pass and a few sparse codings)


class Busy(Exception):
    """Every explain worker is busy and the queue is full; ``retry_after``: seconds, an estimate."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Workers:
    """Where blocking work runs, off the event loop: :meth:`read` on a pool of ``views`` threads, and
    :meth:`model` on ``model`` threads with at most ``queue`` calls waiting (:class:`Busy` beyond)."""

    def __init__(self, views: int = VIEW_WORKERS, model: int = EXPLAIN_WORKERS, queue: int = EXPLAIN_QUEUE):
        self._reads = ThreadPoolExecutor(views, thread_name_prefix="gig-view")
        self._models = ThreadPoolExecutor(model, thread_name_prefix="gig-model")
        self._capacity = model + queue
        self._workers = model
        self._admitted = 0
        self._lock = threading.Lock()
        self._seconds = 2.0  # running mean of a model call (the demo's explain: ~2 s)

    async def read(self, fn, *args):
        """``fn(*args)`` on the read pool."""
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, *args)

    async def model(self, fn, *args):
        """``fn(*args)`` on the model pool, or :class:`Busy` when ``queue`` calls already wait."""
        with self._lock:
            if self._admitted >= self._capacity:
                waves = math.ceil((self._admitted + 1) / self._workers)
                raise Busy(f"{self._admitted} explains are running or waiting (the limit); try again later",
                           max(1, math.ceil(waves * self._seconds)))
            self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._models, self._timed, fn, args)
        finally:
            with self._lock:
                self._admitted -= 1

    @property
    def admitted(self) -> int:
        """Model calls running or waiting now."""
        return self._admitted

    def _timed(self, fn, args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - t0)

    def close(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)
        self._models.shutdown(wait=False, cancel_futures=True)


def _known(known: str) -> set[str]:
    return set(filter(None, known.split(",")))


def _class(name_or_id: str) -> int | str:
    return int(name_or_id) if name_or_id.isdigit() else name_or_id


def _raw_segments(request, skip: int) -> list[str]:
    """The request path's segments after the first ``skip``, each percent-decoded on its own, so that a
    name holding ``/`` (sent as ``%2F``) stays one segment."""
    raw = request.scope.get("raw_path") or request.url.path.encode("utf-8")
    return [unquote(p) for p in raw.decode("latin-1").split("/")[skip + 1:]]


def _warm_up(views: Views) -> None:
    try:
        views.warm_up(log=lambda msg: print(f"gig-fast serve: {msg}", flush=True))
    except Exception as e:  # noqa: BLE001 — the requests that need it will say what is wrong
        print(f"gig-fast serve: warming up failed ({type(e).__name__}: {e})", flush=True)


def create_app(run: Run, *, page_images: int | None = None, workers: Workers | None = None, warm_up: bool = True):
    """The FastAPI application over ``run`` (see the module docstring for its endpoints). ``warm_up``:
    draw the page (and, for a run without ``concept_samples/``, every layer's nearest samples) in the
    background as the server starts."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    views = Views(run, page_images=page_images)
    work = workers or Workers()

    @asynccontextmanager
    async def lifespan(app):
        if warm_up:  # a daemon thread: stopping the server does not wait for it
            threading.Thread(target=_warm_up, args=(views,), name="gig-warm-up", daemon=True).start()
        yield
        work.close()

    app = FastAPI(title="gig_fast run API", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None, lifespan=lifespan)

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

    @app.exception_handler(HTTPException)
    async def routing(request, exc):  # no such path (404), a method the path does not take (405)
        message = {404: f"no endpoint {request.url.path}; see /api/docs",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Busy)
    async def busy(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def failed(request, exc):  # a bug, not the caller's fault: a message, never a traceback
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(await work.read(views.page))

    @app.get("/api/run")
    async def info():
        store = run.store
        return {"run_key": run.key, "model": run.model_info, "settings": run.settings,
                "layers": [{"name": lay.name, "n_concepts": lay.n_concepts, "channels": lay.channels,
                            "spatial": list(lay.spatial) if lay.spatial else None} for lay in run.layers
                           if lay.name in run.points],
                "classes": len(run.classes), "classes_with_images": sum(c.n_images > 0 for c in run.classes),
                "images_total": run.images_total, "rank_depth": store.info.rank_depth if store else None,
                "lacks": [run.index_missing] if run.index_missing else []}

    @app.get("/api/classes")
    async def classes(with_images: bool = False):
        return [{"id": c.id, "name": c.name, "n_images": c.n_images} for c in run.classes
                if c.n_images > 0 or not with_images]

    @app.get("/api/classes/{cls:path}/graph")
    async def class_graph(cls: str):
        c = run.class_id(_class(cls))
        return {"class": c, "name": run.classes[c].name, **(await work.read(run.class_graph, c)).to_dict()}

    async def pair(c1: str, c2: str):
        return (await work.read(run.pair_graph, _class(c1), _class(c2))).to_dict()

    async def pair_view(c1: str, c2: str, known: str):
        return await work.read(views.pair_view, _class(c1), _class(c2), _known(known))

    @app.get("/api/pairs/{c1}/{c2}")
    async def pair_graph(c1: str, c2: str):
        return await pair(c1, c2)

    @app.get("/api/pairs/{c1}/{c2}/view")
    async def pair_graph_view(c1: str, c2: str, known: str = ""):
        return await pair_view(c1, c2, known)

    @app.get("/api/pairs/{names:path}", include_in_schema=False)
    async def pair_by_encoded_names(request: Request, names: str, known: str = ""):
        """A pair whose names hold ``/`` (sent as ``%2F``): split on the path's own slashes."""
        parts = _raw_segments(request, 2)
        if len(parts) == 2:
            return await pair(*parts)
        if len(parts) == 3 and parts[2] == "view":
            return await pair_view(parts[0], parts[1], known)
        raise NotFoundError(f"no endpoint {request.url.path}: /api/pairs/{{class}}/{{class}}[/view], a class "
                            "name holding '/' written as %2F")

    @app.get("/api/concepts/{layer}/{q}")
    async def concept(layer: str, q: int, samples: int = Query(10, ge=0, le=100)):
        return await work.read(views.card, layer, q, samples)

    @app.get("/api/concepts/{layer}/{q}/images")
    async def top_images(layer: str, q: int, n: int = Query(20, ge=1)):
        uses = await work.read(run.top_images, layer, q, n)
        return [{"rank": u.rank, "image": u.image, "class": u.explained_class, "usage": u.usage, "peak": u.peak,
                 "peak_position": u.peak_position, "active": u.active} for u in uses]

    @app.get("/api/images")
    async def images(class_id: str | None = None, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=10_000)):
        cid = None if class_id is None else run.class_id(_class(class_id))
        ids = await work.read(run.image_ids, cid)
        return {"total": len(ids), "offset": offset, "ids": ids[offset: offset + limit]}

    @app.get("/api/images/{image}/graph")
    async def image_graph(image: int):
        return (await work.read(run.image_graph, image)).to_dict()

    @app.get("/api/images/{image}/view")
    async def image_view(image: int, known: str = ""):
        return await work.read(views.image_view, image, _known(known))

    @app.post("/api/explain")
    async def explain(request: Request, target: str | None = None, view: bool = False):
        body = await request.body()
        if not body:
            raise ValueError("send the image file as the request body (e.g. curl --data-binary @cat.png)")
        if len(body) > MAX_UPLOAD:
            return JSONResponse({"error": f"the upload has {len(body)} bytes; the limit is {MAX_UPLOAD}"}, status_code=413)
        return await work.model(views.explain, body, None if target is None else _class(target), view)

    @app.post("/api/intervene")
    async def intervene(request: Request):
        body = await request.body()
        if len(body) > MAX_UPLOAD:
            return JSONResponse({"error": f"the request has {len(body)} bytes; the limit is {MAX_UPLOAD}"}, status_code=413)
        return await work.model(_intervene, run, _json_body(body))

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
    with run.model_lock:  # the model is used by one request at a time
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
    # An explain holds the GIL between torch calls: the event loop waits up to one switch interval
    # each time it wants it back (the default 5 ms, several times per request: /api/run took ~17 ms
    # during explains of the tiny run); 1 ms gives it back sooner.
    sys.setswitchinterval(0.001)
    uvicorn.run(create_app(run), host=host, port=port, log_level="warning")
