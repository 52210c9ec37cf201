"""Boundary ids on every id-taking ``Run`` method and server endpoint: the last valid id (n − 1) and 0
answer, one past it (n) and −1 are refused — a named ``NotFoundError`` (a ``ValueError``) from ``Run``,
404 with ``{"error": …}`` from the server — never an empty answer or a 500."""
from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from gig_fast import Run
from gig_fast.api.run import NotFoundError

from _tiny_run import finished_run
from test_pipeline import tiny_data, tiny_model

pytestmark = pytest.mark.slow  # the shared tiny run (~15 s on two cores)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, out = finished_run(tmp_path_factory)
    return Run.open(out, model=tiny_model(), dataset=tiny_data())


def _explained(run):
    return run.image_ids()


def _not_explained(run):
    """Dataset ids that are not explained images: −1, one past the dataset, and an unexplained one."""
    ids = set(_explained(run))
    inside = next(i for i in range(len(run.dataset)) if i not in ids)
    return [-1, len(run.dataset), inside]


def test_class_ids(run):
    n = len(run.classes)
    assert run.class_id(0) == 0 and run.class_id(n - 1) == n - 1 and run.class_id(str(n - 1)) == n - 1
    assert run.class_id(np.int64(n - 1)) == n - 1
    for bad in (n, -1, str(n), "-1", np.int64(n)):
        with pytest.raises(NotFoundError, match="unknown class"):
            run.class_id(bad)
        with pytest.raises(NotFoundError):
            run.class_graph(bad)
        with pytest.raises(NotFoundError):
            run.pair_graph(0, bad)
        with pytest.raises(NotFoundError):
            run.image_ids(bad)
        with pytest.raises(NotFoundError):
            run.explain(tiny_data()[0][0], target=bad)
    assert run.class_graph(n - 1).nodes and run.class_graph(0).nodes


def test_concept_ids(run):
    for layer in run.points:
        K = run.layer(layer).n_concepts
        assert run.concept(layer, K - 1, samples=1, pictures=False).id == K - 1
        assert run.concept(layer, 0, samples=0).id == 0
        image = _explained(run)[0]
        assert run.heat_map(image, layer, K - 1).ndim == 2
        for bad in (K, -1):
            with pytest.raises(NotFoundError, match="out of range"):
                run.concept(layer, bad, samples=0)
            with pytest.raises(NotFoundError):
                run.concept_samples(layer, [bad], 1)
            with pytest.raises(NotFoundError):
                run.top_images(layer, bad)
            with pytest.raises(NotFoundError):
                run.heat_map(image, layer, bad)
    with pytest.raises(NotFoundError, match="unknown layer"):
        run.concept("classes", 0)


def test_top_images_depth(run):
    layer = run.points[-1]
    depth = run.store.info.rank_depth
    assert len(run.top_images(layer, 0, n=depth)) <= depth
    for bad in (0, depth + 1):
        with pytest.raises(ValueError, match="n must be in"):
            run.top_images(layer, 0, n=bad)


def test_image_ids(run):
    ids = _explained(run)
    assert run.image_graph(ids[0]).id == ids[0] and run.image_graph(ids[-1]).id == ids[-1]
    for bad in _not_explained(run):
        with pytest.raises(NotFoundError):
            run.image_graph(bad)
        with pytest.raises(NotFoundError):
            run.stored_codes(bad, run.points[0])
    with pytest.raises(ValueError, match="image ids must be in"):
        run.load_dataset_images([len(run.dataset)])


# ------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(run):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from gig_fast.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(run, page_images=2), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _call(url: str, body: bytes | None = None) -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(run) -> bytes:
    x, _ = run.load_dataset_images([0])
    arr = (255 * (x[0, 0] - x.min()) / (x.max() - x.min())).byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_server_boundary_ids(run, server):
    n = len(run.classes)
    layer = run.points[-1]
    K = run.layer(layer).n_concepts
    image = _explained(run)[-1]
    good = [f"/api/classes/{n - 1}/graph", "/api/classes/0/graph", f"/api/pairs/0/{n - 1}",
            f"/api/concepts/{layer}/{K - 1}?samples=1", f"/api/concepts/{layer}/{K - 1}/images",
            f"/api/images?class_id={n - 1}", f"/api/images/{image}/graph"]
    for path in good:
        status, body = _call(server + path)
        assert status == 200, (path, body)
    bad = [f"/api/classes/{n}/graph", "/api/classes/-1/graph", f"/api/pairs/0/{n}", "/api/pairs/-1/0",
           f"/api/pairs/{n}/{n}/view", f"/api/concepts/{layer}/{K}", f"/api/concepts/{layer}/-1",
           f"/api/concepts/{layer}/{K}/images", f"/api/concepts/{layer}/-1/images", f"/api/images?class_id={n}",
           "/api/concepts/classes/0"]
    bad += [f"/api/images/{i}/{what}" for i in _not_explained(run) for what in ("graph", "view")]
    for path in bad:
        status, body = _call(server + path)
        assert status == 404 and isinstance(body, dict) and body.get("error"), (path, status, body)
    png = _png(run)
    assert _call(server + f"/api/explain?target={n - 1}", png)[0] == 200
    for target in (n, -1):
        status, body = _call(server + f"/api/explain?target={target}", png)
        assert status == 404 and body.get("error"), (target, status, body)
