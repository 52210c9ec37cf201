"""The pipeline end to end on a tiny net and data: artifacts, schema, resume after SIGKILL, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gig_fast.models import DemoResNet
from gig_fast.cli import main
from gig_fast.pipeline import Pipeline, PipelineConfig, extract_concepts, load_config, pfv_dataset
from gig_fast.report import publish
from gig_fast import Run

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["layer3.5", "layer4.0", "layer4.2"]


def tiny_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = DemoResNet(base=2, num_classes=3)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.3, generator=g)
            mod.running_var.uniform_(0.5, 2.0, generator=g)
            mod.weight.data.normal_(1.0, 0.3, generator=g)
            mod.bias.data.normal_(0.0, 0.3, generator=g)
    return m.eval()


def tiny_data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 3)


def tiny_config(out, **kw):
    base = dict(model="demo", dataset="tiny", layers=LAYERS, concept_images=18, explain_images=6, per_class=2,
                k=4, gig_steps=3, chunk_images=6, batch_size=6, out=str(out), progress=False,
                class_names=["<b>tee</b>", "boot & shoe", "bag"])
    base.update(kw)
    return PipelineConfig(**base)


def run_tiny(out, **kw):
    return Pipeline(tiny_config(out, **kw), model=tiny_model(), dataset=tiny_data()).run()


def test_tiny_run_writes_graph_metrics_report(tmp_path):
    pipe = Pipeline(tiny_config(tmp_path / "run"), model=tiny_model(), dataset=tiny_data())
    out = pipe.run()
    graph = json.loads((out / "graph.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    # computing a run writes no page: publishing it is the step after (what gig-fast run takes)
    assert not (out / "report.html").exists() and not (out / "concept_samples").exists()
    assert "report" not in metrics["timings_s"]
    assert publish(pipe) == out / "report.html"
    report = (out / "report.html").read_text()
    assert (out / "concept_samples" / "concept_samples.json").is_file()
    published = json.loads((out / "metrics.json").read_text())
    assert published.pop("timings_s")["report"] > 0 and published == {k: v for k, v in metrics.items() if k != "timings_s"}
    assert graph["schema"] == "gig_fast.graph" and graph["version"] == 2
    assert [layer["name"] for layer in graph["layers"]] == LAYERS + ["classes"]
    assert [c["name"] for c in graph["classes"]] == ["<b>tee</b>", "boot & shoe", "bag"]
    assert set(graph["concepts"]) == set(LAYERS) and len(graph["concepts"]["layer4.0"]) == 4
    assert sum(c["size"] for c in graph["concepts"]["layer4.0"]) == 18  # every sampled PFV in one cluster
    for cid, cg in graph["class_graphs"].items():
        assert set(cg["nodes"]) == set(LAYERS)
        targets = {tuple(e["target"]) for e in cg["edges"] if e["target"][0] == "classes"}
        assert targets == {("classes", int(cid))}
        for e in cg["edges"]:
            assert 0.0 <= e["normalized"] <= 1.0
    assert set(graph["pair_graphs"]) == {"0-1", "0-2", "1-2"}
    assert len(graph["images"]) == 6 and all(img["edges"] for img in graph["images"])
    assert set(metrics["layers"]) == set(LAYERS)
    for m in metrics["layers"].values():
        assert 0.0 <= m["rel_l2"] < 1.0 and 0.0 <= m["l0_ratio"] <= 1.0 and m["pfvs"] > 0
    assert set(metrics["completeness"]) == {"layer4.2->classes", "layer4.0->layer4.2", "layer3.5->layer4.0"}
    for c in metrics["completeness"].values():  # gig_steps=3 with the default refinement bar of 1%
        assert 0.0 <= c["refined_share"] <= 1.0 and 3 <= c["mean_steps"] <= c["max_steps"] <= 64  # gig_max_steps
    assert all(k in metrics["timings_s"] for k in ("stage1_pfv_dataset", "stage4_gig"))
    assert "<b>tee</b>" not in report and "&lt;b&gt;tee&lt;/b&gt;" in report and "boot &amp; shoe" in report
    assert "<th>within 1%</th><th>images refined</th>" in report  # the completeness table of the summary
    # stage files are safe formats only
    work = next(out.glob("work-*"))
    assert {p.suffix for p in work.rglob("*") if p.is_file()} <= {".npz", ".json"}
    # same config and seed again in the same folder: nothing recomputed, same graph
    before = (out / "graph.json").read_bytes()
    run_tiny(tmp_path / "run")
    assert (out / "graph.json").read_bytes() == before
    # one image against the stored concepts (the library-backend use), and the CLI's pair view
    one = Run.open(out, model=tiny_model()).explain(tiny_data()[0][0], target=1).to_dict()
    assert one["class"] == 1 and one["class_name"] == "boot & shoe"
    assert set(one["nodes"]) == set(LAYERS) and all(np.isfinite(d) for d in one["completeness_max_abs"].values())
    assert main(["show", "--run", str(out), "--classes", "bag", "0"]) == 0
    assert main(["show", "--run", str(out), "--classes", "bag", "nope"]) != 0


def test_image_graphs_equal_explain_for_the_same_image(tmp_path):
    """graph.json's image graph and `gig-fast explain` of the same image are one computation (paper Fig. 3):
    the same nodes (the image's own top concepts) with the same scores, the same edges (to the image's own
    top concepts of the layer above) with the same GIG values — not only the same structure."""
    out = run_tiny(tmp_path / "run", top_concepts=2)
    graph = json.loads((out / "graph.json").read_text())
    data = tiny_data()
    for g in graph["images"][:4]:
        one = Run.open(out, model=tiny_model()).explain(data[g["id"]][0], target=g["class"]).to_dict()
        assert one["nodes"].keys() == g["nodes"].keys()
        for layer, items in g["nodes"].items():
            assert [n["concept"] for n in one["nodes"][layer]] == [n["concept"] for n in items]
            np.testing.assert_allclose([n["score"] for n in one["nodes"][layer]], [n["score"] for n in items],
                                       rtol=1e-4, atol=1e-6)  # graph.json rounds to 6 digits; codes per batch
        ours = {(tuple(e["source"]), tuple(e["target"])): e["weight"] for e in g["edges"]}
        theirs = {(tuple(e["source"]), tuple(e["target"])): e["weight"] for e in one["edges"]}
        assert ours.keys() == theirs.keys() and len(ours) == 2 * len(LAYERS)
        np.testing.assert_allclose([theirs[k] for k in ours], list(ours.values()), rtol=1e-4, atol=1e-6)
        # edges end at the image's own top concepts of the layer above, not at its class's
        for (src, tgt), _ in ours.items():
            if tgt[0] != "classes":
                assert tgt[1] in [n["concept"] for n in g["nodes"][tgt[0]]]


def _class_gig(out, a, b, c, target_concept):
    """Σ over class c's explained images of GIG(every concept of a → concept t of b), computed here from the
    run's work files with gig() directly, with the plain gig_steps-node rule (a shared target outside the
    class's top set, stage 4's shared pass): ``[K_a]``."""
    from gig_fast.gig import ConceptTarget, gig
    from gig_fast.slicing import make_f_ab

    work = next(out.glob("work-*"))
    cfg = PipelineConfig(**json.loads((work / "config.json").read_text())["config"])
    ca, cb = (np.load(work / "concepts" / f"{p}.npz") for p in (a, b))
    V, beta = torch.from_numpy(ca["V"]), torch.from_numpy(ca["beta"])
    total = torch.zeros(V.shape[0], dtype=torch.float64)
    for path in sorted((work / "codes").glob("chunk_*.npz")):
        z = np.load(path)
        rows = np.nonzero(z["label"] == c)[0]
        if len(rows):
            codes = (torch.from_numpy(z[f"{a}|idx"][rows]), torch.from_numpy(z[f"{a}|val"][rows]))
            H, W = next(l["spatial"] for l in json.loads((out / "graph.json").read_text())["layers"] if l["name"] == a)
            res = gig(make_f_ab(tiny_model(), a, b), codes, V, beta, ConceptTarget(torch.from_numpy(cb["V"][target_concept])),
                      spatial=(H, W), **cfg.shared_gig_options())
            total += res.per_concept.double().sum(0)
    return total


def test_neighbour_pairs_pick_each_class_nearest_classes():
    """Each class with its n most similar classes (cosine of the class-score rows), ties to the smaller
    id; every pair when n is None or covers the other classes; only the present classes."""
    from gig_fast.pipeline.selection import neighbour_pairs

    scores = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9], [5.0, 0.0, 0.1]])
    every = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert neighbour_pairs(scores, [0, 1, 2, 3, 4], None) == every
    assert neighbour_pairs(scores, [0, 1, 2, 3, 4], 4) == every
    # 0's nearest is 4 (cosine 0.9998), 4's is 0, 1's is 0 (0.994), 2's is 3, 3's is 2
    assert neighbour_pairs(scores, [0, 1, 2, 3, 4], 1) == [(0, 1), (0, 4), (2, 3)]
    assert neighbour_pairs(scores, [1, 2, 3], 1) == [(1, 3), (2, 3)]  # 1's nearest present class is 3
    tie = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert neighbour_pairs(tie, [0, 1, 2], 1) == [(0, 1), (1, 2)]  # 0 is orthogonal to both: the smaller id


def test_pair_neighbours_bound_the_pair_graphs_and_the_shared_targets(tmp_path):
    """With pair_neighbours = 1 of 3 classes, only the chosen pairs get pair graphs, and stage 4's
    targets of a class hold only the concepts it shares within them (every pair would give 3 graphs)."""
    from gig_fast.pipeline.selection import class_pairs, shared_sets, top_sets, view_sets

    out = run_tiny(tmp_path / "run", top_concepts=1, top_shared=3, pair_neighbours=1)
    pipe = Pipeline(tiny_config(tmp_path / "run", top_concepts=1, top_shared=3, pair_neighbours=1), model=tiny_model(),
                    dataset=tiny_data())
    pairs = class_pairs(pipe)
    graph = json.loads((out / "graph.json").read_text())
    assert 1 <= len(pairs) < 3 and sorted(graph["pair_graphs"]) == [f"{a}-{b}" for a, b in pairs]
    for layer in LAYERS[1:]:
        shared = shared_sets(pipe, layer)
        tops, views = top_sets(pipe, layer), view_sets(pipe, layer)
        assert set(shared) == set(pairs)
        for c in range(3):
            want = set(tops[c].tolist()) | {q for pair, items in shared.items() if c in pair for q, _ in items}
            assert set(views[c][views[c] >= 0].tolist()) == want
    every = run_tiny(tmp_path / "every", top_concepts=1, top_shared=3, pair_neighbours=None)
    assert len(json.loads((every / "graph.json").read_text())["pair_graphs"]) == 3


def test_pair_graphs_wire_the_shared_concepts(tmp_path):
    """A shared concept outside both classes' top sets carries GIG edges from its children (its incoming
    GIG, summed over each class's images) and to its parents; the weights are what gig() gives."""
    out = run_tiny(tmp_path / "run", top_concepts=1, top_shared=3)
    graph = json.loads((out / "graph.json").read_text())
    tops = {c: {layer: {n["concept"] for n in items} for layer, items in g["nodes"].items()}
            for c, g in graph["class_graphs"].items()}
    checked = 0
    for key, pg in graph["pair_graphs"].items():
        c1, c2 = pg["classes"]
        for layer in ("layer4.0", "layer4.2"):  # layers with a layer below
            below = LAYERS[LAYERS.index(layer) - 1]
            for s in pg["shared"].get(layer, []):
                q = s["concept"]
                if q in tops[str(c1)][layer] or q in tops[str(c2)][layer]:
                    continue
                for c in (c1, c2):  # incoming: from class c's top and shared concepts of the layer below
                    incoming = {e["source"][1]: e["weight"] for e in pg["edges"]
                                if e["class"] == c and e["target"] == [layer, q]}
                    sources = tops[str(c)][below] | {x["concept"] for x in pg["shared"].get(below, [])}
                    assert set(incoming) == sources
                    expected = _class_gig(out, below, layer, c, q)
                    np.testing.assert_allclose([incoming[p] for p in sorted(incoming)],
                                               [expected[p].item() for p in sorted(incoming)], rtol=1e-4, atol=1e-7)
                    assert any(e["class"] == c and e["source"] == [layer, q] for e in pg["edges"])  # outgoing
                    assert all(0.0 <= e["normalized"] <= 1.0 for e in pg["edges"])
                checked += 1
    assert checked > 0, "no shared concept outside both top sets in this run: the test checks nothing"


_CHILD = """
import sys
sys.path[:0] = {path!r}  # the parent's import path: same gig_fast (checkout or installed)
sys.path.insert(0, {tests!r})
import test_pipeline as t
pipe = t.Pipeline(t.tiny_config({out!r}), model=t.tiny_model(), dataset=t.tiny_data())
print("started", flush=True)
pipe.run()
"""


def test_sigkill_then_resume_gives_the_same_graph(tmp_path):
    t0 = time.perf_counter()
    reference = run_tiny(tmp_path / "reference")
    full = time.perf_counter() - t0
    killed = tmp_path / "killed"
    env = dict(os.environ)
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(path=list(sys.path), tests=str(ROOT / "tests"), out=str(killed))],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(random.uniform(0.1, 0.8) * full)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # graph.json is written atomically before metrics and the report: a kill after it finds it whole
    if (killed / "graph.json").exists():
        json.loads((killed / "graph.json").read_text())
    run_tiny(killed)  # resume
    assert (killed / "graph.json").read_bytes() == (reference / "graph.json").read_bytes()


def test_config_gig_autocast():
    base = PipelineConfig()
    assert PipelineConfig(gig_autocast=None).key() == base.key()  # older run keys stay valid
    assert PipelineConfig(gig_autocast="bf16").key() != base.key()
    with pytest.raises(ValueError, match="gig_autocast"):
        PipelineConfig(gig_autocast="int8")


def test_config_gig_tolerance():
    base = PipelineConfig()
    assert base.gig_tolerance == 0.01
    assert PipelineConfig(gig_rule="gausslegendre", gig_tolerance=None).key() != base.key()  # a fixed rule alone
    assert PipelineConfig(gig_tolerance=0.05).key() != base.key()
    for bad in (0, -0.01):
        with pytest.raises(ValueError, match="gig_tolerance"):
            PipelineConfig(gig_tolerance=bad)


def test_tiny_run_with_bf16_gig_matches_float32(tmp_path):
    """Stage 4 with gig_autocast=bf16: the same graph structure, its completeness in metrics.json, and
    class-level concept scores close to the float32 run's."""
    full, half = run_tiny(tmp_path / "fp32"), run_tiny(tmp_path / "bf16", gig_autocast="bf16")
    gf, gh = (json.loads((o / "graph.json").read_text()) for o in (full, half))
    assert [c["name"] for c in gh["classes"]] == [c["name"] for c in gf["classes"]]
    assert json.loads((half / "metrics.json").read_text())["completeness"]
    assert gh["class_graphs"].keys() == gf["class_graphs"].keys()
    for cid, cf in gf["class_graphs"].items():
        wf = {(tuple(e["source"]), tuple(e["target"])): e["weight"] for e in cf["edges"]}
        wh = {(tuple(e["source"]), tuple(e["target"])): e["weight"] for e in gh["class_graphs"][cid]["edges"]}
        common = wf.keys() & wh.keys()  # a near-tie may swap a top concept; the rest are the same edges
        assert len(common) >= 0.8 * len(wf)
        scale = max(abs(w) for w in wf.values())
        assert max(abs(wf[k] - wh[k]) for k in common) <= 2e-2 * scale


def test_config_files_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("k: 7\nlayers: [layer1.0, layer4.2]\ngig_steps: 3\n")
    cfg = load_config(tmp_path / "c.yaml", gig_steps=5, out=None)
    assert cfg.k == 7 and cfg.gig_steps == 5 and cfg.layers == ["layer1.0", "layer4.2"]
    (tmp_path / "c.json").write_text(json.dumps({"k_factor": 2}))
    assert load_config(tmp_path / "c.json").k_factor == 2
    assert load_config(tmp_path / "c.json").key() != load_config(tmp_path / "c.yaml").key()
    assert load_config(tmp_path / "c.json", out="x").key() == load_config(tmp_path / "c.json").key()
    (tmp_path / "bad.yaml").write_text("kk: 1\n")
    with pytest.raises(ValueError, match="unknown config option.*kk"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="attribution"):
        PipelineConfig(attribution="lrp")


def test_unknown_layer_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown layer name.*'layer9\.0'.*valid names: layer1\.0"):
        Pipeline(tiny_config(tmp_path, layers=["layer9.0"]), model=tiny_model(), dataset=tiny_data())


def test_empty_or_missing_dataset(tmp_path):
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        Pipeline(tiny_config(tmp_path), model=tiny_model(), dataset=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline(tiny_config(tmp_path, dataset=str(tmp_path / "missing")), model=tiny_model())


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    (tmp_path / "data" / "c1" / "bad.png").write_bytes(b"garbage")
    cfg = tiny_config(tmp_path / "out", dataset=str(tmp_path / "data"), image_size=28, channels=1, mean=[0.5],
                      std=[0.5], concept_images=9, layers=["layer4.2"])
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        pipe = Pipeline(cfg, model=tiny_model())
    assert len(pipe.dataset) == 9 and len(pipe.skipped) == 1 and "bad.png" in pipe.skipped[0][0]
    files = pfv_dataset(pipe)
    assert sum(len(np.load(f)["image"]) for f in files) == 9


def test_k_larger_than_the_number_of_pfvs(tmp_path):
    pipe = Pipeline(tiny_config(tmp_path, k=50, layers=["layer4.2"]), model=tiny_model(), dataset=tiny_data())
    pfv_dataset(pipe)
    with pytest.raises(ValueError, match=r"K=50 concepts requested at layer4.2 but only N=18 PFVs"):
        extract_concepts(pipe)


def test_nan_activations_are_a_clear_error(tmp_path):
    model = tiny_model()
    model.layer2[1].bn2.running_var[0] = float("nan")
    pipe = Pipeline(tiny_config(tmp_path, layers=["layer4.2"]), model=model, dataset=tiny_data())
    with pytest.raises(ValueError, match="non-finite"):
        pfv_dataset(pipe)
