"""The demo ViT end to end from the command line, and its report.html: token-grid iERFs and heat-maps,
in Python and in a real browser (Chromium, as tests/test_explorer.py does for the CNN report)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import timm  # noqa: F401  (a dependency: these tests fail, not skip, without it)
import torch
from PIL import Image

from gig_fast.cli import main
from gig_fast.models import load_model

from test_explorer import _errors, _nodes, _open, artifacts, browser  # noqa: F401  (fixtures)


VIT_LAYERS = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """``gig-fast train-demo --arch vit`` (256 images, one epoch) and ``gig-fast demo --arch vit`` at a
    small size: ``(output folder, weights file, train-demo's JSON)``."""
    root = tmp_path_factory.mktemp("vit_demo")
    weights = root / "vit.pt"
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train-demo", "--arch", "vit", "--epochs", "1", "--train-limit", "256",
                     "--weights", str(weights)]) == 0
    info = json.loads(buf.getvalue())
    out = root / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--arch", "vit", "--weights", str(weights), "--out", str(out), "--no-progress",
                     "--set", "concept_images=40", "explain_images=10", "per_class=1", "k=6", "gig_steps=4",
                     "top_concepts=2", "report_images=4"]) == 0
    return out, weights, info


def _pictures(out):
    page = (out / "report.html").read_text()
    return json.loads(page.split('id="gig-pictures">', 1)[1].split("</script>", 1)[0])


def test_train_demo_vit_caches_weights_only_and_a_record(vit_run):
    _, weights, info = vit_run
    assert info["arch"] == "vit" and info["train_images"] == 256 and 0.0 <= info["test_accuracy"] <= 1.0
    assert json.loads(weights.with_suffix(".pt.json").read_text())["test_accuracy"] == info["test_accuracy"]
    blob = torch.load(weights, weights_only=True)
    assert set(blob) == {"shape", "state_dict"}
    model = load_model("demo-vit", weights)
    assert type(model).__name__ == "VisionTransformer" and not model.training
    with pytest.raises(SystemExit):  # argparse rejects an unknown --arch
        main(["train-demo", "--arch", "nope"])


def test_demo_vit_writes_graph_metrics_report(vit_run):
    out, _, _ = vit_run
    graph = json.loads((out / "graph.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert [lay["name"] for lay in graph["layers"]] == VIT_LAYERS + ["classes"]
    assert graph["layers"][0]["spatial"] == [1, 17]  # the class token + 4×4 patch tokens
    assert set(metrics["layers"]) == set(VIT_LAYERS)
    assert set(metrics["completeness"]) == {"blocks.3->classes", "blocks.2->blocks.3", "blocks.1->blocks.2",
                                            "blocks.0->blocks.1"}
    assert (out / "report.html").stat().st_size > 10_000


def test_explain_one_image_on_the_vit_run(vit_run):
    from gig_fast.data import fashion_mnist
    from gig_fast import Run

    out, _, _ = vit_run
    image = fashion_mnist("test")[7][0]
    result = Run.open(out).explain(image, target=3).to_dict()
    assert result["class"] == 3 and set(result["nodes"]) == set(VIT_LAYERS)
    assert set(result["completeness_max_abs"]) == {"blocks.3->classes", "blocks.2->blocks.3", "blocks.1->blocks.2",
                                                   "blocks.0->blocks.1"}


def test_token_grid_ierfs_and_heat_maps(vit_run):
    out, _, _ = vit_run
    work = next(out.glob("work-*"))
    with np.load(sorted((work / "stage1").glob("chunk_*.npz"))[0]) as z:
        ierf = z["blocks.1|ierf"].astype(np.float32)  # [n, 28, 28]
    # one value per 7×7 patch of the token grid
    patches = ierf.reshape(-1, 4, 7, 4, 7)
    np.testing.assert_array_equal(patches, np.broadcast_to(patches[:, :, :1, :, :1], patches.shape))
    assert np.abs(ierf).max() > 0
    pics = _pictures(out)
    assert pics["crops"] and all(u.startswith("data:image/png;base64,") for u in pics["crops"])
    heat = [uri for img in pics["images"].values() for uri in img["heat"].values()]
    assert heat and all(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size == (4, 4) for u in heat)


def test_vit_report_in_the_browser(vit_run, browser, artifacts):  # noqa: F811
    from selenium.webdriver.common.by import By

    out, _, _ = vit_run
    graph = json.loads((out / "graph.json").read_text())
    _open(browser, out / "report.html")
    assert _errors(browser) == []
    concepts = _nodes(browser, ".node:not(.cls):not(.error)")
    assert len(concepts) == sum(len(v) for v in graph["class_graphs"]["0"]["nodes"].values())
    assert {n.get_attribute("data-layer") for n in concepts} == set(VIT_LAYERS)
    assert all(n.find_elements(By.TAG_NAME, "image") for n in concepts)  # a token-grid iERF on every node
    browser.save_screenshot(str(artifacts / "explorer_vit_class.png"))
    concepts[0].click()
    card = browser.find_element(By.ID, "card")
    assert card.is_displayed() and "Concept #" in card.text
    crops = card.find_elements(By.CSS_SELECTOR, ".crop img")
    assert crops and all(c.get_attribute("naturalWidth") != "0" for c in crops)
    overlays = card.find_elements(By.CSS_SELECTOR, ".heat img.overlay")
    assert all(o.get_attribute("naturalWidth") == "4" for o in overlays)  # drawn on the 4×4 token grid
    browser.save_screenshot(str(artifacts / "explorer_vit_card.png"))
    browser.find_element(By.CSS_SELECTOR, 'button.mode[data-mode="image"]').click()
    assert "Image #" in browser.find_element(By.ID, "status").text
    assert _errors(browser) == []
