"""The library backend: ``Run.open`` on a finished (tiny) run, concept banks as safetensors, the
per-image Parquet store (its rankings against brute force)."""
import json
import struct

import numpy as np
import pytest
import torch

import gig_fast
from gig_fast import ConceptBank, Run
from gig_fast.image_store import ConceptRanking, ImageStore, concept_usage
from gig_fast.pipeline import Pipeline

from test_pipeline import LAYERS, tiny_config, tiny_data, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished tiny run: its output folder, and Run opened from the public API alone."""
    out = tmp_path_factory.mktemp("api") / "run"
    Pipeline(tiny_config(out, concept_images=24, report_images=4), model=tiny_model(), dataset=tiny_data()).run()
    return out, Run.open(out, model=tiny_model(), dataset=tiny_data())


def _graph(out):
    return json.loads((out / "graph.json").read_text())


def _seed(request) -> int:
    return request.getfixturevalue("seed")


# ---------------------------------------------------------------------------------------------
# concept banks
# ---------------------------------------------------------------------------------------------
def _bank(seed: int, K=37, C=11) -> ConceptBank:
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(K, C, generator=g)
    V[0, 0], V[0, 1], V[0, 2] = -0.0, 1e-40, float("nan")  # sign of zero, a subnormal, a NaN: bits must survive
    return ConceptBank("layer3.5", V, torch.randn(C, generator=g), torch.randint(0, 99, (K,), generator=g),
                       model={"arch": "demo", "weights": None}, extraction={"k": K, "seed": seed},
                       coding={"lam": 0.1, "method": "lasso", "positive": False}, run_key="abc123")


def test_bank_round_trips_bit_identically(tmp_path, request):
    bank = _bank(_seed(request))
    bank.save(tmp_path / "b")
    back = ConceptBank.load(tmp_path / "b")
    for name in ("V", "beta"):
        a, b = getattr(bank, name), getattr(back, name)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert torch.equal(bank.sizes, back.sizes) and back.sizes.dtype == torch.int64
    assert back.metadata() == bank.metadata()
    assert back.coding == {"lam": 0.1, "method": "lasso", "positive": False} and back.run_key == "abc123"
    # the file is plain safetensors: any reader sees the tensors
    from safetensors.numpy import load_file
    arrays = load_file(str(tmp_path / "b" / "concepts.safetensors"))
    assert np.array_equal(arrays["V"].view(np.int32), bank.V.numpy().view(np.int32))
    # saving again gives the same bytes
    bank.save(tmp_path / "c")
    assert (tmp_path / "b" / "concepts.safetensors").read_bytes() == (tmp_path / "c" / "concepts.safetensors").read_bytes()


def test_corrupted_or_truncated_banks_fail_naming_the_file(tmp_path, request):
    bank = _bank(_seed(request))
    folder = bank.save(tmp_path / "b")
    tensors, meta = folder / "concepts.safetensors", folder / "bank.json"
    good, good_meta = tensors.read_bytes(), meta.read_text()
    header = struct.unpack("<Q", good[:8])[0]
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "data byte flipped": good[:-5] + bytes([good[-5] ^ 0x01]) + good[-4:],
        "header byte flipped": good[:8 + header // 2] + b"\xff" + good[9 + header // 2:],
    }
    for what, data in cases.items():
        tensors.write_bytes(data)
        with pytest.raises(ValueError, match="concepts.safetensors.*corrupted or truncated"):
            ConceptBank.load(folder)
        if what != "data byte flipped":  # safetensors itself cannot see a flipped data byte
            with pytest.raises(ValueError, match="concepts.safetensors.*corrupted or truncated"):
                ConceptBank.load(folder, verify=False)
    tensors.write_bytes(good)
    meta.write_text(good_meta[: len(good_meta) // 2])
    with pytest.raises(ValueError, match="bank.json is not valid JSON"):
        ConceptBank.load(folder)
    meta.write_text(good_meta.replace('"K": 37', '"K": 36'))
    with pytest.raises(ValueError, match="says K=36"):
        ConceptBank.load(folder)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="bank.json is missing"):
        ConceptBank.load(folder)
    with pytest.raises(ValueError, match="beta must be"):
        ConceptBank("x", torch.zeros(3, 4), torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# the store's rankings against brute force
# ---------------------------------------------------------------------------------------------
def _random_codes(rng, B, P, s, K):
    idx = np.full((B, P, s), -1, dtype=np.int64)
    val = np.zeros((B, P, s), dtype=np.float32)
    for b in range(B):
        for p in range(P):
            n = rng.integers(0, s + 1)
            where = rng.choice(s, n, replace=False)  # padding anywhere in a row
            idx[b, p, where] = rng.choice(K, n, replace=False)
            val[b, p, where] = rng.normal(0.3, 1.0, n)
    return idx, val


def test_concept_usage_and_ranking_match_brute_force(request):
    rng = np.random.default_rng(_seed(request))
    K, P, s, depth = 7, 5, 3, 4
    chunks = [(np.arange(i * 6, i * 6 + 6), *_random_codes(rng, 6, P, s, K)) for i in range(4)]
    ranking = ConceptRanking(K, depth)
    brute: dict[int, list] = {}
    for images, idx, val in chunks:
        u = concept_usage(idx, val, K)
        for i in range(len(u["row"])):
            b, q = u["row"][i], u["concept"][i]
            hits = [(p, float(val[b, p, j])) for p in range(P) for j in range(s) if idx[b, p, j] == q]
            assert np.isclose(u["usage"][i], sum(v for _, v in hits)) and u["active"][i] == len(hits)
            best = max(v for _, v in hits)
            assert u["peak"][i] == np.float32(best) and u["peak_position"][i] == min(p for p, v in hits if v == best)
            brute.setdefault(int(q), []).append((-u["usage"][i], int(images[b]), u["peak_position"][i]))
        assert len(u["row"]) == len({(b, q) for b, p, j in zip(*np.nonzero(idx >= 0)) for q in [idx[b, p, j]]})
        ranking.add(u["concept"], images[u["row"]], images[u["row"]] % 3, u["usage"], u["peak"], u["peak_position"],
                    u["active"])
    rows = ranking.rows()
    for q in range(K):
        want = sorted(r for r in brute.get(q, []) if -r[0] > 0)[:depth]
        got = [(-rows["usage"][i], rows["image"][i], rows["peak_position"][i]) for i in np.flatnonzero(rows["concept"] == q)]
        assert [g[1:] for g in got] == [w[1:] for w in want] and np.allclose([g[0] for g in got], [w[0] for w in want])
        assert list(rows["rank"][rows["concept"] == q]) == list(range(1, len(want) + 1))


# ---------------------------------------------------------------------------------------------
# Run.open on a finished run
# ---------------------------------------------------------------------------------------------
def test_run_reproduces_the_class_and_pair_graphs(tiny):
    out, run = tiny
    graph = _graph(out)
    assert gig_fast.Run is Run and run.key == graph["run_key"]
    assert run.points == LAYERS and [lay.name for lay in run.layers] == LAYERS + ["classes"]
    assert run.layer("layer4.0").n_concepts == 4 and run.layer("layer4.0").spatial == tuple(graph["layers"][1]["spatial"])
    assert [(c.id, c.name, c.n_images) for c in run.classes] == [(c["id"], c["name"], c["n_images"]) for c in graph["classes"]]
    for cid, g in graph["class_graphs"].items():
        cg = run.class_graph(int(cid))
        assert cg.to_dict() == g  # nodes per layer and edges, same values, same order
        assert run.class_graph(run.classes[int(cid)].name).to_dict() == g
        top = cg.layer(LAYERS[-1])
        assert [n.concept for n in top] == [n["concept"] for n in g["nodes"][LAYERS[-1]]]
    for key, pg in graph["pair_graphs"].items():
        a, b = map(int, key.split("-"))
        assert run.pair_graph(b, a).to_dict() == pg
    assert run.settings["top_concepts"] == 5 and run.config.k == 4
    m = run.metrics
    raw = json.loads((out / "metrics.json").read_text())
    assert set(m.layers) == set(LAYERS) and m.layers["layer4.0"].rel_l2 == raw["layers"]["layer4.0"]["rel_l2"]
    assert m.completeness["layer4.2->classes"].max_abs == raw["completeness"]["layer4.2->classes"]["max_abs"]


def test_pair_sample_deals_round_robin_over_classes():
    from gig_fast.pipeline.graph import pair_sample

    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pair_sample(pairs, 10) == pairs
    assert pair_sample(pairs, 3) == [(0, 1), (1, 2), (2, 3)]  # one per smaller class before a second
    assert pair_sample(pairs, 4) == [(0, 1), (0, 2), (1, 2), (2, 3)]
    assert pair_sample(pairs, 0) == []


def test_graph_json_keeps_a_sample_of_pairs_and_the_store_has_every_pair(tmp_path):
    """graph_pairs = 1 of the tiny run's 3 pairs: graph.json keeps one, says there are 3, and Run.pair_graph
    gives every pair — the kept one from graph.json, the others from the store — equal to a graph built
    with every pair; a pair the run did not compute is empty; a version-1 store (no pair table) still opens."""
    from gig_fast.pipeline import build_graph

    out = tmp_path / "run"
    cfg = tiny_config(out, graph_pairs=1)
    pipe = Pipeline(cfg, model=tiny_model(), dataset=tiny_data())
    pipe.run()
    graph = _graph(out)
    assert graph["pairs_total"] == 3 and list(graph["pair_graphs"]) == ["0-1"]
    every = build_graph(Pipeline(cfg.replace(graph_pairs=200), model=tiny_model(), dataset=tiny_data()))["pair_graphs"]
    assert sorted(every) == ["0-1", "0-2", "1-2"] and every["0-1"] == graph["pair_graphs"]["0-1"]
    run = Run.open(out, model=tiny_model(), dataset=tiny_data())
    store = ImageStore(out / "store")
    assert store.info.rows["pair_graphs"] == 3
    for key, pg in every.items():
        a, b = map(int, key.split("-"))
        assert store.pair_graph(a, b) == pg and run.pair_graph(b, a).to_dict() == pg
    assert store.pair_graph(1, 0) is None  # c1 < c2 only
    # a version-1 store: no pair table, every other lookup as before
    manifest = json.loads((out / "store" / "store.json").read_text())
    (out / "store" / "pair_graphs.parquet").unlink()
    (out / "store" / "store.json").write_text(json.dumps({**manifest, "version": 1}))
    old = ImageStore(out / "store")
    assert old.pair_graph(0, 2) is None and old.top_images(LAYERS[-1], 0, 3).num_rows >= 0
    with pytest.raises(ValueError, match="unknown table 'pair_graphs'"):
        old.path("pair_graphs")
    assert Run.open(out, model=tiny_model(), dataset=tiny_data()).pair_graph(0, 2).shared == []


def test_run_concept_card_matches_the_stage_files(tiny):
    out, run = tiny
    graph = _graph(out)
    layer = LAYERS[1]
    q = graph["class_graphs"]["0"]["nodes"][layer][0]["concept"]
    card = run.concept(layer, q)
    work = next(out.glob("work-*"))
    with np.load(work / "concepts" / f"{layer}.npz") as z:
        V, beta, labels = z["V"], z["beta"], z["labels"]
    assert torch.equal(card.vector, torch.from_numpy(V[q])) and torch.equal(run.bank(layer).V, torch.from_numpy(V))
    assert card.size == int((labels == q).sum()) and np.isclose(card.norm, np.linalg.norm(V[q]), rtol=1e-5)
    # the nearest samples: the stage-1 PFVs of highest cosine to v_q (brute force over the chunks)
    pfv, image, pos = [], [], []
    for f in sorted((work / "stage1").glob("chunk_*.npz")):
        with np.load(f) as z:
            pfv.append(z[f"{layer}|pfv"]), image.append(z["image"]), pos.append(z[f"{layer}|position"])
    X = np.concatenate(pfv).astype(np.float64) - beta
    cos = X @ V[q] / np.linalg.norm(X, axis=1) / np.linalg.norm(V[q])
    order = np.argsort(-cos, kind="stable")[:10]
    assert len(card.samples) == 10
    np.testing.assert_allclose([s.cosine for s in card.samples], cos[order], atol=1e-6)
    assert [(s.image, s.position) for s in card.samples] == list(zip(np.concatenate(image)[order].tolist(),
                                                                      np.concatenate(pos)[order].tolist()))
    assert [s.member for s in card.samples] == (labels[order] == q).tolist()
    s0 = card.samples[0]
    assert s0.ierf.shape == (28, 28) and s0.picture.shape == (28, 28, 3) and s0.crop.dtype == np.uint8
    assert s0.crop.ndim == 3 and s0.crop.shape[2] == 3
    assert {u.class_id for u in card.classes} == {int(c) for c, g in graph["class_graphs"].items()
                                                  if q in [n["concept"] for n in g["nodes"][layer]]}
    assert run.concept(layer, q, pictures=False).samples[0].crop is None


def test_run_image_graphs_and_top_images_from_the_store(tiny):
    out, run = tiny
    graph = _graph(out)
    assert graph["images_total"] == 6 == len(graph["images"]) and graph["store"] == "store"
    assert run.image_ids() == sorted(g["id"] for g in graph["images"])
    for g in graph["images"]:
        assert run.image_graph(g["id"]).to_dict() == g
    assert run.image_ids(class_id=1) == [g["id"] for g in graph["images"] if g["class"] == 1]
    # top images of a concept = the explained images with the largest Σ of its code values (brute force)
    work = next(out.glob("work-*"))
    layer = LAYERS[0]
    usage: dict[int, dict[int, float]] = {}
    for f in sorted((work / "codes").glob("chunk_*.npz")):
        with np.load(f) as z:
            for r, img in enumerate(z["image"].tolist()):
                idx, val = z[f"{layer}|idx"][r], z[f"{layer}|val"][r]
                for q in np.unique(idx[idx >= 0]).tolist():
                    usage.setdefault(q, {})[img] = float(val[idx == q].sum())
    for q, per_image in usage.items():
        want = sorted(((-u, i) for i, u in per_image.items() if u > 0))[:3]
        got = run.top_images(layer, q, n=3)
        assert [u.image for u in got] == [i for _, i in want]
        np.testing.assert_allclose([u.usage for u in got], [-u for u, _ in want], rtol=1e-5)
        for u in got:  # "where": the position of its largest code value
            heat = run.heat_map(u.image, layer, q).ravel()
            assert heat[u.peak_position] == np.float32(u.peak) == heat[heat != 0].max()
            assert u.active == int((heat != 0).sum())
    # the store's files are plain Parquet
    import pyarrow.parquet as pq
    t = pq.read_table(out / "store" / "image_edges.parquet")
    assert t.num_rows == sum(len(g["edges"]) for g in graph["images"])
    assert ImageStore(out / "store").info.rows["images"] == 6


def test_run_explains_and_decomposes_a_new_image(tiny):
    out, run = tiny
    graph = _graph(out)
    stored = graph["images"][0]
    x, _ = run.load_dataset_images([stored["id"]])
    ex = run.explain(x[0], target=stored["class"])
    assert ex.explained_class == stored["class"] and ex.class_name == run.classes[stored["class"]].name
    last = LAYERS[-1]
    # the last layer's GIG to the class is the stage-4 one of the same image
    want = {n["concept"]: n["score"] for n in stored["nodes"][last]}
    got = {n.concept: n.score for n in ex.graph.layer(last)}
    assert got.keys() == want.keys()
    scale = max(abs(v) for v in want.values())
    assert max(abs(got[q] - want[q]) for q in want) <= 1e-4 * scale
    assert set(ex.completeness) == {"layer4.2->classes", "layer4.0->layer4.2", "layer3.5->layer4.0"}
    assert ex.to_dict()["class_name"] == ex.class_name
    for e in ex.graph.edges:
        assert 0 <= e.normalized <= 1
    # decomposition of the same image = its stage-3 codes
    for layer in LAYERS:
        d, s = run.decompose(x[0], layer), run.stored_codes(stored["id"], layer)
        np.testing.assert_allclose(d.usage().numpy(), s.usage().numpy(), atol=1e-4 * float(s.usage().abs().max()))
        assert d.idx.shape[0] == int(np.prod(run.layer(layer).spatial)) and float(d.rel_l2.mean()) < 1


def test_run_says_what_is_wrong(tiny, tmp_path):
    out, run = tiny
    with pytest.raises(FileNotFoundError, match="no graph.json"):
        Run.open(tmp_path)
    (tmp_path / "graph.json").write_text("{}")
    with pytest.raises(ValueError, match="not a gig_fast graph"):
        Run.open(tmp_path)
    with pytest.raises(ValueError, match="unknown class 'nope'"):
        run.class_graph("nope")
    with pytest.raises(ValueError, match="unknown layer 'layer9.9'; valid: layer3.5"):
        run.concept("layer9.9", 0)
    with pytest.raises(ValueError, match="out of range for layer4.0"):
        run.top_images("layer4.0", 4)
    with pytest.raises(ValueError, match="not among the 6 explained images"):
        run.image_graph(10_000)
    with pytest.raises(ValueError, match="a class cannot be paired with itself"):
        run.pair_graph(1, "boot & shoe")
    with pytest.raises(ValueError, match="image must be a"):
        run.explain(torch.zeros(28, 28))
    with pytest.raises(ValueError, match="not a readable image"):
        run.load_image(b"not an image")
