"""Interventions outside Python: ``POST /api/intervene`` over real HTTP, ``gig-fast intervene``, and the
explorer's "remove it" button in headless Chromium (the served tiny run of ``test_server``)."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gig_fast import Run  # noqa: E402

from test_pipeline import LAYERS  # noqa: E402
from test_server import _call, _wait, served_run, server  # noqa: E402,F401  (the served tiny run)
from test_explorer import _errors, _nodes, artifacts, browser  # noqa: E402,F401  (the headless chromium fixtures)


def _post(base, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _call(base, "/api/intervene", data=data, method="POST")


def _active_concept(run, image, layer):
    d = run.stored_codes(image, layer)
    return int(d.idx[d.idx >= 0][0])


def test_the_endpoint_answers_what_run_intervene_gives(served_run, server):
    run = Run.open(served_run / "run")
    ids = run.image_ids()[:2]
    q = _active_concept(run, ids[0], LAYERS[0])
    targets = [[LAYERS[1], 0], [LAYERS[2], 1]]
    status, got = _post(server, {"images": ids, "edits": [[LAYERS[0], q, 0.0]], "targets": targets, "top": 2})
    assert status == 200 and [r["image"] for r in got["results"]] == ids
    x, _ = run.load_dataset_images(ids)
    for r, xi in zip(got["results"], x):
        want = run.intervene(xi, [(LAYERS[0], q, 0.0)], targets=[tuple(t) for t in targets]).to_dict(2)
        assert r["top_classes"] == want["top_classes"] and r["concepts"] == want["concepts"]
        assert r["edits"] == [{"layer": LAYERS[0], "concept": q, "factor": 0.0}]
    # a no-op edit: the probabilities do not move at all
    status, same = _post(server, {"images": ids[:1], "edits": [[LAYERS[0], q, 1.0]]})
    assert status == 200 and all(t["before"] == t["after"] for t in same["results"][0]["top_classes"])
    assert len(same["results"][0]["concepts"]) == 5  # no targets: the 5 later concepts that changed most


@pytest.mark.parametrize("body, message", [
    (b"not json", "the request body is not JSON"),
    ([1, 2], "the request body is a JSON object"),
    ({"edits": [["layer3.5", 0, 0.0]]}, "images must be a non-empty list of image ids"),
    ({"images": [0], "edits": [["layer9.9", 0, 0.0]]}, "unknown layer 'layer9.9'"),
    ({"images": [0], "edits": [["layer3.5", 10**6, 0.0]]}, "concept 1000000 is out of range for layer3.5"),
    ({"images": [0], "edits": [["layer3.5", 0, "x"]]}, "must be a finite number"),
    ({"images": [0], "edits": [["layer3.5", 0, [1.0], [10**6]]]}, "positions [1000000] are out of range"),
    ({"images": [0], "edits": [["layer3.5", 0, [1.0, 2.0], [0]]]}, "has 2 values for 1 positions"),
    ({"images": [0]}, "edits must be a list of edits"),
    ({"images": [0], "edits": [], "top": 0}, "top must be an integer in 1..100"),
    ({"images": [0], "edits": [], "colour": 1}, "unknown field(s) ['colour']"),
    ({"images": [10**6], "edits": []}, "image ids must be in"),
    ({"images": list(range(65)), "edits": []}, "the limit is 64"),
])
def test_bad_intervention_requests_get_400_with_a_message(server, body, message):
    status, got = _post(server, body)
    assert status == 400 and message in got["error"], got


def test_cli_intervene(served_run, tmp_path, capsys):
    from gig_fast.cli import main

    run = Run.open(served_run / "run")
    image = run.image_ids()[0]
    q = _active_concept(run, image, LAYERS[0])
    out = tmp_path / "iv.json"
    assert main(["intervene", "--run", str(served_run / "run"), "--dataset-image", str(image),
                 "--edit", f"{LAYERS[0]}:{q}:0", "--add", f"{LAYERS[1]}:2:0.5,-1@0,3", "--targets", LAYERS[2],
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "class probabilities (before → after)" in printed
    got = json.loads(out.read_text())
    x = run.load_dataset_images([image])[0][0]
    want = run.intervene(x, [(LAYERS[0], q, 0.0), (LAYERS[1], 2, [0.5, -1.0], [0, 3])], targets=[LAYERS[2]])
    assert got == want.to_dict(5)
    assert main(["intervene", "--run", str(served_run / "run"), "--dataset-image", str(image),
                 "--edit", f"{LAYERS[0]}:{q}"]) == 2
    assert "an edit is LAYER:CONCEPT:FACTOR" in capsys.readouterr().err


def test_the_remove_button_shows_the_change_of_classes_and_nodes(server, served_run, browser, artifacts):
    from selenium.webdriver.common.by import By

    run = Run.open(served_run / "run")
    graph = json.loads((served_run / "run" / "graph.json").read_text())
    c = int(next(iter(graph["class_graphs"])))
    browser.get("about:blank")
    browser.get(server + f"/#class={c}")
    _wait(lambda: browser.execute_script("return document.documentElement.getAttribute('data-ready')") == "1", "the page")
    node = next(n for n in _nodes(browser, ".node:not(.cls):not(.error)") if n.get_attribute("data-layer") == LAYERS[0])
    layer, q = node.get_attribute("data-layer"), int(node.get_attribute("data-concept"))
    drawn = {(n.get_attribute("data-layer"), int(n.get_attribute("data-concept"))) for n in _nodes(browser, ".node:not(.cls):not(.error)")}
    node.click()
    button = browser.find_element(By.CSS_SELECTOR, "#card button.remove-concept")
    button.click()
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#card .intervention table.classes-change"), "the result")
    rows = browser.find_elements(By.CSS_SELECTOR, "#card table.classes-change tr[data-image]")
    images = sorted({int(r.get_attribute("data-image")) for r in rows})
    on_page = set(json.loads(browser.execute_script(
        "return JSON.stringify([...document.querySelectorAll('#image-select option')].map((o) => +o.value))")))
    embedded = [g["id"] for g in graph["images"] if g["class"] == c and g["id"] in on_page][:8]
    assert images == sorted(embedded) and images
    x, _ = run.load_dataset_images(images)
    below = sorted((lay, k) for lay, k in drawn if LAYERS.index(lay) > LAYERS.index(layer))
    for i, xi in zip(images, x):
        want = run.intervene(xi, [(layer, q, 0.0)], targets=below)
        shown = [(int(r.get_attribute("data-class")), r.find_elements(By.TAG_NAME, "td")[3].text)
                 for r in rows if int(r.get_attribute("data-image")) == i]
        assert [k for k, _ in shown] == [k for k, _, _ in want.top_classes(3)]
        assert all(float(text) == pytest.approx(after, abs=1e-3) for (_, text), (_, _, after) in zip(shown, want.top_classes(3)))
    node_rows = browser.find_elements(By.CSS_SELECTOR, "#card table.nodes-change tr[data-key]")
    assert len(node_rows) == len(below) > 0
    changes = {}
    for i, xi in zip(images, x):
        for ch in run.intervene(xi, [(layer, q, 0.0)], targets=below).concepts:
            changes.setdefault((ch.layer, ch.concept), []).append(ch.after)
    for r, key in zip(node_rows, below):
        after = float(r.find_elements(By.TAG_NAME, "td")[2].text)
        assert after == pytest.approx(sum(changes[key]) / len(changes[key]), rel=2e-3, abs=2e-3)
    browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.CSS_SELECTOR, "#card .intervention"))
    browser.save_screenshot(str(artifacts / "explorer_intervention.png"))
    assert _errors(browser) == []
