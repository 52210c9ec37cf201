"""``gig-fast serve`` over real HTTP: a server process on a free port, every endpoint called, malformed
input and unknown ids included (4xx with a JSON message, never a traceback)."""
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gig_fast import Run  # noqa: E402
from gig_fast.image_store import ImageStore  # noqa: E402
from gig_fast.testing.runs import TINY_LAYERS as LAYERS, named_tiny_run  # noqa: E402

from _children import child_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A tiny run made only from names in its configuration (demo-net weights file, image folder), so
    that ``gig-fast serve`` reopens it by itself."""
    root = tmp_path_factory.mktemp("serve")
    named_tiny_run(root)
    return root


@pytest.fixture(scope="module")
def server(served_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(served_run / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gig_fast.cli", "serve", "--run", str(served_run / "run"),
                             "--port", str(port)], cwd=served_run, stdout=log, stderr=subprocess.STDOUT,
                            env=child_env())  # the gig_fast (and compiled backends) this process runs
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/api/run", timeout=5).read()
            break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, (served_run / "server.log").read_text()
            assert time.time() < deadline, "the server never answered"
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _call(base, path, data=None, method=None):
    """``(status, parsed body)``; the body is JSON except for the page."""
    req = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, body, kind = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get("content-type", "")
    text = body.decode("utf-8")
    assert "Traceback" not in text and 'File "' not in text
    return status, (json.loads(text) if "json" in kind else text)


def test_every_endpoint_answers_what_run_gives(served_run, server):
    run = Run.open(served_run / "run")
    graph = json.loads((served_run / "run" / "graph.json").read_text())
    status, info = _call(server, "/api/run")
    assert status == 200 and info["run_key"] == run.key and [lay["name"] for lay in info["layers"]] == LAYERS
    assert info["images_total"] == 6 and info["rank_depth"] == 100
    status, classes = _call(server, "/api/classes")
    assert [c["name"] for c in classes] == ["<b>tee</b>", "boot & shoe", "bag"] + [str(i) for i in range(3, 10)]
    assert [c["id"] for c in _call(server, "/api/classes?with_images=true")[1]] == [0, 1, 2]
    for cid, g in graph["class_graphs"].items():
        status, cg = _call(server, f"/api/classes/{cid}/graph")
        assert status == 200 and {k: cg[k] for k in ("nodes", "edges", "errors")} == g
    assert _call(server, "/api/classes/boot%20%26%20shoe/graph")[1]["class"] == 1
    assert list(graph["pair_graphs"]) == ["0-1"] and graph["pairs_total"] == 3
    assert _call(server, "/api/pairs/1/0")[1] == graph["pair_graphs"]["0-1"]
    stored = ImageStore(served_run / "run" / "store").pair_graph(0, 2)
    assert stored["shared"] and _call(server, "/api/pairs/2/0")[1] == stored == run.pair_graph(0, 2).to_dict()
    # what the page loads for a pair it does not embed: the compact arrays, and pictures of what it lacks
    from gig_fast.explorer.render import compact_pair_graph

    index = {lay["name"]: i for i, lay in enumerate(graph["layers"])}
    status, pv = _call(server, "/api/pairs/2/0/view")
    assert status == 200 and pv["classes"] == [0, 2]
    assert {"s": pv["s"], "e": pv["e"]} == compact_pair_graph(stored, index)
    shared = {f"{layer}|{x['concept']}" for layer, items in stored["shared"].items() for x in items}
    assert shared and shared <= set(pv["concepts"]) and len(pv["crops"]) == len(pv["samples"])
    known = ",".join(sorted(shared))
    assert not set(_call(server, f"/api/pairs/0/2/view?known={known}")[1]["concepts"]) & shared
    layer = LAYERS[1]
    q = graph["class_graphs"]["0"]["nodes"][layer][0]["concept"]
    status, card = _call(server, f"/api/concepts/{layer}/{q}?samples=5")
    want = run.concept(layer, q, samples=5)
    assert status == 200 and card["size"] == want.size and np.allclose(card["vector"], want.vector.numpy())
    assert [(s["image"], s["position"]) for s in card["samples"]] == [(s.image, s.position) for s in want.samples]
    assert all(s["crop"].startswith("data:image/png;base64,") for s in card["samples"])
    status, tops = _call(server, f"/api/concepts/{layer}/{q}/images?n=3")
    assert status == 200 and [t["image"] for t in tops] == [u.image for u in run.top_images(layer, q, 3)]
    status, ids = _call(server, "/api/images?limit=4&offset=1")
    assert ids["total"] == 6 and ids["ids"] == run.image_ids()[1:5]
    assert _call(server, "/api/images?class_id=2")[1]["ids"] == run.image_ids(2)
    first = run.image_ids()[0]
    assert _call(server, f"/api/images/{first}/graph")[1] == run.image_graph(first).to_dict()
    status, view = _call(server, f"/api/images/{first}/view")
    assert status == 200 and view["picture"].startswith("data:image/png") and view["heat"] and view["n"] and view["e"]
    # explain an upload (a PNG of a dataset image): the same explanation as Run.explain
    png = (served_run / "data" / "c1" / "2.png").read_bytes()
    status, ex = _call(server, "/api/explain?target=1", data=png, method="POST")
    local = run.explain(run.load_image(png), target=1)
    assert status == 200 and ex["class"] == 1 and ex["class_name"] == "boot & shoe", ex
    got = {(n["concept"]): n["score"] for n in ex["nodes"][LAYERS[-1]]}
    assert got == pytest.approx({n.concept: n.score for n in local.graph.layer(LAYERS[-1])}, rel=1e-5, abs=1e-9)
    status, exview = _call(server, "/api/explain?view=true", data=png, method="POST")
    assert status == 200 and exview["picture"].startswith("data:image/png") and exview["n"]
    # the page: the explorer, allowed to call this API and nothing else
    status, page = _call(server, "/")
    assert status == 200 and "connect-src &#x27;self&#x27;" in page and '"api":"api"' in page


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/api/classes/nope/graph", 404, "unknown class 'nope'"),
    ("GET", "/api/classes/99/graph", 404, "unknown class"),
    ("GET", "/api/pairs/0/0", 400, "cannot be paired with itself"),
    ("GET", "/api/concepts/layer9.9/0", 404, "unknown layer 'layer9.9'"),
    ("GET", "/api/concepts/layer4.0/4", 404, "out of range"),
    ("GET", "/api/concepts/layer4.0/-1", 404, "out of range"),
    ("GET", "/api/concepts/layer4.0/abc", 422, "q"),
    ("GET", "/api/concepts/layer4.0/0?samples=1000", 422, "samples"),
    ("GET", "/api/concepts/layer4.0/0/images?n=0", 422, "n"),
    ("GET", "/api/concepts/layer4.0/0/images?n=1000", 400, "n must be in 1..100"),
    ("GET", "/api/images/123456/graph", 404, "not among the 6 explained images"),
    ("GET", "/api/images/abc/graph", 422, "image"),
    ("GET", "/api/images/123456/view", 404, "not among"),
    ("GET", "/api/images?offset=-1", 422, "offset"),
    ("GET", "/api/images?class_id=nope", 404, "unknown class"),
    ("POST", "/api/explain", 400, "send the image file"),
    ("POST", "/api/explain?target=nope", 400, "not a readable image"),
    ("GET", "/api/nothing", 404, None),
])
def test_bad_requests_get_4xx_with_a_message(server, method, path, status, message):
    data = b"\x89PNG garbage" if method == "POST" and "target" in path else (b"" if method == "POST" else None)
    got, body = _call(server, path, data=data, method=method)
    assert got == status, body
    if message is not None:
        assert message in body["error"]


def test_an_unknown_target_for_an_upload_is_a_404(served_run, server):
    png = (served_run / "data" / "c0" / "1.png").read_bytes()
    status, body = _call(server, "/api/explain?target=nope", data=png, method="POST")
    assert status == 404 and "unknown class 'nope'" in body["error"]


from test_explorer import _errors, _nodes, artifacts, browser  # noqa: E402,F401  (the headless chromium fixtures)


def _wait(predicate, what, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_served_page_loads_top_images_and_any_image_from_the_api(server, served_run, browser, artifacts):
    from selenium.webdriver.common.by import By

    run = Run.open(served_run / "run")
    browser.get("about:blank")
    browser.get(server + "/#class=0")
    _wait(lambda: browser.execute_script("return document.documentElement.getAttribute('data-ready')") == "1", "the page")
    # a drawn concept that some explained image uses (a class's top concept may have all-zero codes)
    node, want = next((n, want) for n in _nodes(browser, ".node:not(.cls):not(.error)")
                      if (want := [u.image for u in run.top_images(n.get_attribute("data-layer"),
                                                                   int(n.get_attribute("data-concept")), 12)]))
    node.click()
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#card .top-images button"), "the top images")
    shown = [int(b.get_attribute("data-image")) for b in browser.find_elements(By.CSS_SELECTOR, "#card .top-images button")]
    assert shown == want
    # an explained image that the page does not embed: its graph comes from the store
    embedded = set(json.loads(browser.execute_script("return JSON.stringify([...document.querySelectorAll('#image-select option')].map((o) => +o.value))")))
    other = next(i for i in run.image_ids() if i not in embedded)
    browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="image"]').click()
    box = browser.find_element(By.ID, "image-id")
    box.send_keys(str(other))
    browser.find_element(By.ID, "image-load").click()
    _wait(lambda: f"Image #{other}" in browser.find_element(By.ID, "status").text, "the image view")
    g = run.image_graph(other)
    drawn = {(n.get_attribute("data-layer"), int(n.get_attribute("data-concept"))) for n in _nodes(browser, ".node:not(.cls):not(.error)")}
    assert drawn == {(n.layer, n.concept) for n in g.graph.nodes} | {(e.target_layer, e.target) for e in g.graph.edges
                                                                     if e.target_layer != "classes"}
    browser.save_screenshot(str(artifacts / "explorer_served_image.png"))
    # a pair graph the page does not embed (graph_pairs = 1): loaded from the store, its shared concepts drawn
    browser.get("about:blank")
    browser.get(server + "/#pair=0-2")
    _wait(lambda: browser.execute_script("return document.documentElement.getAttribute('data-ready')") == "1", "the page")
    _wait(lambda: _nodes(browser, ".node.shared"), "the pair view")
    pg = run.pair_graph(0, 2)
    shared = {(n.get_attribute("data-layer"), int(n.get_attribute("data-concept"))) for n in _nodes(browser, ".node.shared")}
    assert {(s.layer, s.concept) for s in pg.shared} <= shared
    browser.save_screenshot(str(artifacts / "explorer_served_pair.png"))
    browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="image"]').click()
    box = browser.find_element(By.ID, "image-id")
    # an unknown id: a message, no error
    box.clear()
    box.send_keys("99999")
    browser.find_element(By.ID, "image-load").click()
    _wait(lambda: "not among" in browser.find_element(By.ID, "status").text, "the error message")
    assert [e for e in _errors(browser) if "404" not in e["message"]] == []


def test_cli_explain_and_serve_through_run(served_run, tmp_path, capsys):
    from gig_fast.cli import main

    png = served_run / "data" / "c2" / "0.png"
    assert main(["explain", "--run", str(served_run / "run"), "--image", str(png), "--target", "2",
                 "--json", str(tmp_path / "ex.json")]) == 0
    got = json.loads((tmp_path / "ex.json").read_text())
    run = Run.open(served_run / "run")
    want = run.explain(run.load_image(png), target=2).to_dict()
    assert got["class_name"] == "bag" and got["nodes"].keys() == want["nodes"].keys()
    assert [n["concept"] for n in got["nodes"][LAYERS[-1]]] == [n["concept"] for n in want["nodes"][LAYERS[-1]]]
    assert [n["score"] for n in got["nodes"][LAYERS[-1]]] == pytest.approx([n["score"] for n in want["nodes"][LAYERS[-1]]])
    assert main(["explain", "--run", str(served_run / "run"), "--image", str(tmp_path / "missing.png")]) == 2
    assert main(["serve", "--run", str(tmp_path)]) == 2
    assert "no graph.json" in capsys.readouterr().err


# -- answered while an explain runs, the queue, names with "/", routing errors (an in-process server) -----

class _HeldExplains:
    """``run.explain`` made to wait until released, so that a test sees explains running and queued."""

    def __init__(self, run):
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self._explain = run.explain
        run.explain = self

    def __call__(self, *args, **kwargs):
        self.started.release()
        assert self.release.wait(60), "never released"
        return self._explain(*args, **kwargs)


@pytest.fixture(scope="module")
def slashed(tmp_path_factory):
    """An in-process server (one explain at a time, one waiting) over a tiny run whose class 0 is named
    "T-shirt/top"; ``(base URL, run, held explains, workers, root)``."""
    import uvicorn

    from gig_fast.serve import Workers, create_app

    root = tmp_path_factory.mktemp("slashed")
    run = Run.open(named_tiny_run(root, class_names=("T-shirt/top", "boot & shoe", "bag")))
    held = _HeldExplains(run)
    workers = Workers(views=2, model=1, queue=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(run, workers=workers, warm_up=False), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started, "the in-process server")
    yield f"http://127.0.0.1:{port}", run, held, workers, root
    held.release.set()
    server.should_exit = True
    thread.join(timeout=30)


def _call_with_headers(base, path, data=None, method=None, timeout=120):
    req = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_requests_are_answered_while_an_explain_runs_and_a_full_queue_is_a_503(slashed):
    base, run, held, workers, root = slashed
    png = (root / "data" / "c1" / "2.png").read_bytes()
    answers: dict[int, tuple] = {}

    def post(i):
        answers[i] = _call_with_headers(base, "/api/explain?target=1", data=png, method="POST")

    first = threading.Thread(target=post, args=(1,))
    first.start()
    assert held.started.acquire(timeout=60)  # the explain is running (and holds the model) ...
    t0 = time.perf_counter()
    status, info = _call(base, "/api/run")
    status_card, card = _call(base, f"/api/concepts/{LAYERS[-1]}/0?samples=2")
    assert time.perf_counter() - t0 < 30 and first.is_alive() and not answers  # ... and these were answered meanwhile
    assert status == 200 and info["run_key"] == run.key and status_card == 200 and card["id"] == 0
    second = threading.Thread(target=post, args=(2,))
    second.start()
    _wait(lambda: workers.admitted == 2, "the second explain to queue")
    status, headers, body = _call_with_headers(base, "/api/explain", data=png, method="POST", timeout=30)
    assert status == 503 and set(body) == {"error"} and "try again" in body["error"]
    assert int(headers["retry-after"]) >= 1
    held.release.set()
    first.join(60)
    second.join(60)
    want = {n.concept: n.score for n in held._explain(run.load_image(png), target=1).graph.layer(LAYERS[-1])}
    for i in (1, 2):
        status, _, ex = answers[i]
        assert status == 200 and ex["class"] == 1
        assert {n["concept"]: n["score"] for n in ex["nodes"][LAYERS[-1]]} == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert workers.admitted == 0


def test_a_class_name_with_a_slash_is_addressable(slashed):
    base, run, *_ = slashed
    status, g = _call(base, "/api/classes/T-shirt%2Ftop/graph")
    assert status == 200 and g["class"] == 0 and g["name"] == "T-shirt/top"
    assert {k: v for k, v in g.items() if k not in ("class", "name")} == run.class_graph(0).to_dict()
    assert _call(base, "/api/pairs/T-shirt%2Ftop/boot%20%26%20shoe") == (200, run.pair_graph(0, 1).to_dict())
    assert _call(base, "/api/pairs/bag/T-shirt%2ftop")[1] == run.pair_graph(0, 2).to_dict()
    status, view = _call(base, "/api/pairs/T-shirt%2Ftop/2/view")
    assert status == 200 and view["classes"] == [0, 2]
    assert _call(base, "/api/images?class_id=T-shirt%2Ftop")[1]["ids"] == run.image_ids(0)
    status, body = _call(base, "/api/pairs/T-shirt/top/2")  # the slash not encoded: which split is meant?
    assert status == 404 and "%2F" in body["error"]


@pytest.mark.parametrize("method, path, status", [("GET", "/api/nothing", 404), ("GET", "/nothing/at/all", 404),
                                                  ("DELETE", "/api/run", 405), ("POST", "/api/classes", 405)])
def test_routing_errors_have_the_one_error_shape(slashed, method, path, status):
    got, headers, body = _call_with_headers(slashed[0], path, data=b"" if method == "POST" else None, method=method)
    assert got == status and set(body) == {"error"} and path in body["error"]
    assert status != 405 or "GET" in headers["allow"]


def test_api_run_lists_the_layers_the_concept_endpoints_take(slashed):
    base, run, *_ = slashed
    status, info = _call(base, "/api/run")
    assert status == 200 and info["lacks"] == []
    for lay in info["layers"]:
        assert _call(base, f"/api/concepts/{lay['name']}/0?samples=0")[0] == 200
    assert _call(base, "/api/concepts/classes/0")[0] == 404


# -- concept_samples/: written with the report, equal to streaming stage 1; older runs still open ---------

def test_the_sample_index_holds_what_streaming_stage1_gives(served_run, tmp_path):
    from gig_fast.serve import Views
    from gig_fast.explorer.pictures import png_bytes

    run = Run.open(served_run / "run")
    assert run.index_missing == ""
    for layer in LAYERS:
        idx = run.sample_index(layer, run.config.report_crops)
        K = run.layer(layer).n_concepts
        bank = run.bank(layer)
        labels = np.load(run.work / "concepts" / f"{layer}.npz")["labels"]
        # every stage-1 PFV against every concept in float64, sorted: the nearest rows by brute force
        X = np.concatenate([np.load(f)[f"{layer}|pfv"] for f in sorted((run.work / "stage1").glob("chunk_*.npz"))])
        X = X.astype(np.float64) - bank.beta.double().numpy()
        V = bank.V.double().numpy()
        cos = (V / np.linalg.norm(V, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
        rows = np.argsort(-cos, axis=1, kind="stable")[:, :idx.k]
        assert np.array_equal(idx.rows, rows) and np.allclose(idx.cosine, np.take_along_axis(cos, rows, 1), rtol=0, atol=1e-12)
        assert np.array_equal(idx.member, labels[rows] == np.arange(K)[:, None])
        for q in range(K):
            top = run.concept(layer, q, samples=1).samples[0]
            assert (idx.image[q, 0], idx.position[q, 0]) == (top.image, top.position)
            assert idx.top_crop(q) == png_bytes(top.crop, palette=True)
    # a run written before concept_samples/ existed: the same cards, streamed, then from memory
    import shutil

    old_dir = tmp_path / "old"
    shutil.copytree(served_run / "run", old_dir, ignore=shutil.ignore_patterns("concept_samples"))
    old = Run.open(old_dir)
    assert "no concept_samples/" in old.index_missing and old.sample_index(LAYERS[0]) is None
    new_views, old_views = Views(run), Views(old)
    streamed, indexed = old_views.card(LAYERS[0], 1, 5), new_views.card(LAYERS[0], 1, 5)
    # the cosines of one concept against all K at once differ in the last bit (another GEMM blocking)
    assert [s.pop("cosine") for s in streamed["samples"]] == pytest.approx([s.pop("cosine") for s in indexed["samples"]],
                                                                         rel=1e-12)
    assert streamed == indexed
    built = old.build_sample_index(LAYERS[0])
    stored = run.sample_index(LAYERS[0])
    assert np.array_equal(built.rows, stored.rows) and np.array_equal(built.image, stored.image)
    assert old_views.pair_view(0, 2, set()) == new_views.pair_view(0, 2, set())


def test_npz_member_reads_the_rows_np_load_reads(tmp_path):
    from gig_fast.pipeline.files import npz_member, npz_rows, save_npz

    rng = np.random.default_rng(0)
    arrays = {"L|ierf": rng.standard_normal((50, 7, 5)).astype(np.float16), "image": np.arange(50),
              "fortran": np.asfortranarray(rng.standard_normal((6, 4)))}
    save_npz(tmp_path / "a.npz", **arrays)
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    for name in ("a.npz", "c.npz"):  # uncompressed: a memory map; compressed: loaded whole
        with np.load(tmp_path / name) as z:
            for key in arrays:
                got = npz_member(tmp_path / name, key)
                assert got.dtype == z[key].dtype and np.array_equal(np.asarray(got), z[key])
                assert np.array_equal(got[[3, 1, 4]], z[key][[3, 1, 4]])
    assert isinstance(npz_member(tmp_path / "a.npz", "L|ierf"), np.memmap)
    for name in ("a.npz", "c.npz"):
        with np.load(tmp_path / name) as z:
            for key in arrays:
                got = npz_rows(tmp_path / name, key, [4, 0, 4, -1])
                assert got.dtype == z[key].dtype and np.array_equal(got, z[key][[4, 0, 4, -1]])
    with pytest.raises(KeyError):
        npz_member(tmp_path / "a.npz", "nope")


def test_store_lookups_read_what_pyarrow_filters_read(served_run, tmp_path):
    """ImageStore.read prunes row groups by their statistics itself: the same rows as pyarrow's filters,
    on tables cut into groups of 3 rows (so that pruning has groups to skip)."""
    import shutil

    import pyarrow.parquet as pq

    folder = tmp_path / "store"
    shutil.copytree(served_run / "run" / "store", folder)
    for name in ("concept_images", "image_edges"):
        pq.write_table(pq.read_table(folder / f"{name}.parquet"), folder / f"{name}.parquet", row_group_size=3)
    store = ImageStore(folder)
    assert pq.ParquetFile(folder / "concept_images.parquet").metadata.num_row_groups > 3
    image = Run.open(served_run / "run").image_ids()[2]
    cases = [("concept_images", [("layer", "=", LAYERS[1]), ("concept", "=", 2), ("rank", "<=", 3)], None),
             ("concept_images", [("layer", "=", LAYERS[0]), ("rank", ">", 1), ("rank", "<", 4)], ["image", "usage"]),
             ("concept_images", [("concept", ">=", 3)], None), ("concept_images", [("layer", "=", "nope")], None),
             ("image_edges", [("image", "=", image)], None), ("image_edges", None, ["weight"])]
    for table, filters, columns in cases:
        got = store.read(table, filters, columns=columns)
        want = pq.read_table(folder / f"{table}.parquet", filters=filters, columns=columns)
        assert got.column_names == want.column_names and got.to_pylist() == want.to_pylist(), (table, filters)
    assert store.read("concept_images", [("layer", "=", LAYERS[1])]).num_rows > 0
    with pytest.raises(ValueError, match="cannot filter"):
        store.read("concept_images", [("nope", "=", 1)])
