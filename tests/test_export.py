"""``gig-fast export --format neuronpedia`` / ``Run.export``: image, class and pair graphs as attribution-graph
JSON, validated against Neuronpedia's published JSON schema and circuit-tracer's pydantic graph models
(both copied into ``tests/vendor/``, see its README), and checked value by value against the run."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from gig_fast import Run
from gig_fast.cli import main
from gig_fast.export import ERROR_TYPE
from gig_fast.pipeline import Pipeline

from test_pipeline import tiny_config, tiny_data, tiny_model
from vendor.circuit_tracer_graph_models import Link, Model

pytestmark = pytest.mark.slow  # one tiny run (~10 s on two cores)

SCHEMA = json.loads((Path(__file__).parent / "vendor" / "neuronpedia_graph_schema.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    Pipeline(tiny_config(out, class_probability=False), model=tiny_model(), dataset=tiny_data()).run()
    return Run.open(out, model=tiny_model(), dataset=tiny_data())


def _validate(graph: dict) -> None:
    """Both published definitions, strictly (no type coercion in pydantic); links resolve to nodes."""
    jsonschema.Draft7Validator(SCHEMA).validate(graph)
    Model.model_validate(graph, strict=True)
    for link in graph["links"]:
        Link.model_validate(link, strict=True)
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids))
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])


@pytest.mark.parametrize("kind", ["image", "class", "pair"])
def test_exported_graph_validates_against_both_schemas(run, kind, tmp_path):
    which = {"image": run.image_ids()[0], "class": 1, "pair": (2, 0)}[kind]
    graph = run.export(kind, which, tmp_path / "g.json")
    _validate(graph)
    assert json.loads((tmp_path / "g.json").read_text()) == graph
    assert sum(n["feature_type"] == ERROR_TYPE for n in graph["nodes"]) == len(run.points)
    assert sum(n["feature_type"] == "logit" for n in graph["nodes"]) == (2 if kind == "pair" else 1)
    broken = json.loads(json.dumps(graph))
    del broken["nodes"][1]["clerp"]
    with pytest.raises(jsonschema.ValidationError):  # the validator reads what it is given
        jsonschema.Draft7Validator(SCHEMA).validate(broken)


def test_image_export_carries_the_graphs_values(run):
    """Every edge and error edge of the image graph is a link with its GIG weight; concept nodes are named
    ``layer:concept`` on their layer's index; the logit's p is the model's softmax probability and a
    concept's activation its code sum in the image; influence accumulates per layer, strongest first."""
    image = run.image_ids()[1]
    g = run.image_graph(image)
    graph = run.export("image", image)
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    links = {(li["source"], li["target"]): li["weight"] for li in graph["links"]}
    index = {layer: i for i, layer in enumerate(run.points)}
    ref = lambda layer, q: f"{len(run.points)}_{q}_0" if layer == "classes" else f"{index[layer]}_{q}_0"  # noqa: E731
    for e in g.graph.edges:
        assert links.pop((ref(e.source_layer, e.source), ref(e.target_layer, e.target))) == e.weight
    for err in g.graph.errors:
        node = nodes[f"{index[err.layer]}_error_0"]
        assert node["feature_type"] == ERROR_TYPE and node["layer"] == str(index[err.layer])
        for e in err.edges:
            assert links.pop((node["node_id"], ref(e.target_layer, e.target))) == e.weight
    assert links == {}  # nothing else
    for n in g.graph.nodes:
        node = nodes[ref(n.layer, n.concept)]
        assert node["clerp"] == f"{n.layer}:{n.concept}" and node["feature"] == n.concept
        assert node["activation"] == pytest.approx(float(run.stored_codes(image, n.layer).usage()[n.concept]))
    x, _ = run.load_dataset_images([image])
    with torch.no_grad():
        p = torch.softmax(run.model(x), dim=1)[0, g.explained_class]
    logit = nodes[ref("classes", g.explained_class)]
    assert logit["feature_type"] == "logit" and logit["clerp"].endswith(f"(p={float(p):.3f})")
    assert logit["token_prob"] == pytest.approx(float(p), rel=1e-5)
    size = {ref(n.layer, n.concept): abs(n.score) for n in g.graph.nodes}
    size.update({f"{index[err.layer]}_error_0": abs(err.score) for err in g.graph.errors})
    for layer in run.points:
        items = sorted((n for n in graph["nodes"] if n["layer"] == str(index[layer])), key=lambda n: n["influence"])
        scores = [size[n["node_id"]] for n in items]
        assert scores == sorted(scores, reverse=True) and items[-1]["influence"] == pytest.approx(1.0)


def test_pair_export_adds_both_class_graphs(run):
    """A pair graph's link between two concepts both class graphs hold carries the sum of their weights
    (each a sum over its class's images), the pair's shared concepts are pinned, both classes are logits."""
    a, b = 0, 2
    graph = run.export("pair", (a, b), probabilities=False)
    links = {(li["source"], li["target"]): li["weight"] for li in graph["links"]}
    index = {layer: i for i, layer in enumerate(run.points)}
    want: dict = {}
    for c in (a, b):
        for e in run.class_graph(c).edges:
            key = (f"{index[e.source_layer]}_{e.source}_0", f"{len(run.points)}_{e.target}_0" if e.target_layer == "classes"
                   else f"{index[e.target_layer]}_{e.target}_0")
            want[key] = want.get(key, 0.0) + e.weight
    for key, w in want.items():
        assert links[key] == pytest.approx(w, rel=1e-12)
    shared = run.pair_graph(a, b).shared
    assert graph["qParams"]["pinnedIds"] == [f"{index[s.layer]}_{s.concept}_0" for s in shared]
    logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    assert sorted(n["feature"] for n in logits) == [a, b] and all("(p=nan)" in n["clerp"] for n in logits)


def test_export_cli(run, tmp_path, capsys):
    out = tmp_path / "pair.json"
    assert main(["export", "--run", str(run.path), "--pair", "0", "2", "--no-probabilities", "--out", str(out)]) == 0
    _validate(json.loads(out.read_text()))
    assert "pair graph" in capsys.readouterr().out
    assert main(["export", "--run", str(run.path), "--class", "nope", "--no-probabilities"]) == 2
    assert "unknown class 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown graph kind"):
        run.export("layer", 0)
    with pytest.raises(ValueError, match="unknown export format"):
        run.export("class", 0, format="graphml")
