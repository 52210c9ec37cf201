"""The per-image store at scale: write a 50,000-image store of demo-shaped rows, then time "the top 20
images of concept q at layer L" and an image-graph lookup, and state the size per image.

Demo-shaped rows (the demo net, docs/design.md §5): 16 layers, K = 8·C = 256/512/1024/2048 concepts at
14×14, 7×7, 4×4 and 2×2 positions, ~1% of K coded per position (the paper's l0 ratio ≥ 0.99) drawn
from a skewed concept distribution, and per image a graph of top-5 concepts per layer with 5 edges
per layer pair. One chunk of 500 images is drawn and repeated with new image ids and per-repeat
scaled code values (so every chunk moves the rankings, as new images would), through the real
writer (:class:`gig_fast.image_store.ImageStoreWriter`) and reader (:class:`gig_fast.image_store.ImageStore`).

    python benchmarks/bench_store.py --images 50000 --out store_bench
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gig_fast.image_store import ImageStore, ImageStoreWriter  # noqa: E402

DEMO_LAYERS = ([(f"layer1.{i}", 256, 196) for i in range(3)] + [(f"layer2.{i}", 512, 49) for i in range(4)]
               + [(f"layer3.{i}", 1024, 16) for i in range(6)] + [(f"layer4.{i}", 2048, 4) for i in range(3)])
CHUNK = 500


def demo_chunk(rng, n_classes=10):
    """One chunk of 500 demo-shaped images: per layer padded codes ``[B, P, s]`` and the image graphs."""
    codes = {}
    for name, K, P in DEMO_LAYERS:
        s = max(2, K // 100)
        p = 1.0 / np.arange(1, K + 1) ** 0.8  # skewed concept use
        p /= p.sum()
        idx = rng.choice(K, size=(CHUNK, P, s), p=p).astype(np.int64)
        idx.sort(axis=2)
        dup = np.zeros_like(idx, dtype=bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        idx[dup] = -1  # a concept once per position; the rest is padding
        val = np.where(idx >= 0, rng.gamma(2.0, 0.5, idx.shape), 0).astype(np.float32)
        codes[name] = (idx, val)
    names = [n for n, _, _ in DEMO_LAYERS][::-1]
    graphs = []
    for b in range(CHUNK):
        c = int(rng.integers(n_classes))
        g = {"id": b, "label": c, "prediction": c, "class": c, "nodes": {}, "edges": []}
        for i, (a) in enumerate(names):
            K = dict((n, k) for n, k, _ in DEMO_LAYERS)[a]
            qs = rng.choice(K, 5, replace=False).tolist()
            g["nodes"][a] = [{"concept": q, "score": float(f"{rng.normal():.6g}")} for q in qs]
            tgt = ("classes", c) if i == 0 else (names[i - 1], g["nodes"][names[i - 1]][0]["concept"])
            g["edges"] += [{"source": [a, q], "target": list(tgt), "weight": float(f"{rng.normal():.6g}"),
                            "normalized": 0.5} for q in qs]
        graphs.append(g)
    return codes, graphs


def build(n_images: int, folder: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    codes, graphs = demo_chunk(rng)
    writer = ImageStoreWriter(folder, {n: K for n, K, _ in DEMO_LAYERS}, run_key="bench")
    t0 = time.perf_counter()
    for r in range(n_images // CHUNK):
        base = r * CHUNK
        scale = rng.uniform(0.5, 1.5, size=CHUNK).astype(np.float32)[:, None, None]
        ids = np.arange(base, base + CHUNK)
        writer.add_graphs([{**g, "id": base + g["id"]} for g in graphs])
        for name, (idx, val) in codes.items():
            writer.add_codes(name, ids, np.array([g["class"] for g in graphs]), idx, val * scale)
    writer.close()
    return {"write_s": round(time.perf_counter() - t0, 1)}


def query(folder: Path, repeats: int = 5) -> dict:
    """Cold (fresh ImageStore, first call) and warm times of the two lookups, median of ``repeats``."""
    rng = np.random.default_rng(1)
    cold, warm, image = [], [], []
    for _ in range(repeats):
        name, K, _ = DEMO_LAYERS[int(rng.integers(len(DEMO_LAYERS)))]
        q = int(rng.integers(min(K, 64)))
        t0 = time.perf_counter()
        store = ImageStore(folder)
        top = store.top_images(name, q, 20)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.top_images(name, q, 20)
        warm.append(time.perf_counter() - t0)
        assert top.num_rows == 20 and top.column("rank").to_pylist() == list(range(1, 21))
        t0 = time.perf_counter()
        _, nodes, _ = store.image_rows(int(rng.integers(store.info.rows["images"])))
        image.append(time.perf_counter() - t0)
        assert nodes.num_rows == 80
    return {"top20_cold_s": round(float(np.median(cold)), 3), "top20_warm_s": round(float(np.median(warm)), 3),
            "image_graph_s": round(float(np.median(image)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--out", default="gig_store_bench")
    args = ap.parse_args()
    folder = Path(args.out) / "store"
    shutil.rmtree(folder, ignore_errors=True)
    row = {"images": args.images, **build(args.images, folder), **query(folder)}
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.parquet")}
    row.update({"bytes": sizes, "bytes_per_image": round(sum(sizes.values()) / args.images),
                "rows": ImageStore(folder).info.rows})
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
