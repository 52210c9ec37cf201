"""The store's pair table at a 1,000-class scale: each class with 10 random neighbours (~10,000 pairs),
pair graphs shaped like the demo's (16 layers, 3 shared concepts per layer, 870 edges, random values:
they compress worse than real ones). Prints the file size, KB per pair and the time of one
``ImageStore.pair_graph`` lookup (docs/scale.md). ``python benchmarks/pair_store.py`` with gig_fast importable."""
import json
import random
import tempfile
import time
from pathlib import Path

from gig_fast.image_store import ImageStoreWriter, ImageStore
layers = [f"layer{i}.{j}" for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n)]
rng = random.Random(0)
def pg(c1, c2):
    shared = {l: [{"concept": rng.randrange(2048), "score": round(rng.random(), 6), "importance": [round(rng.random() * 1e4, 1), round(rng.random() * 1e4, 1)]} for _ in range(3)] for l in layers}
    edges = []
    for _ in range(870):
        a = rng.randrange(len(layers) - 1)
        edges.append({"source": [layers[a], rng.randrange(2048)], "target": [layers[a + 1], rng.randrange(2048)], "class": rng.choice((c1, c2)),
                      "weight": round(rng.gauss(0, 1), 6), "normalized": round(rng.random(), 6)})
    return {"classes": [c1, c2], "shared": shared, "edges": edges}
pairs = sorted({(min(c, d), max(c, d)) for c in range(1000) for d in rng.sample([x for x in range(1000) if x != c], 10)})
folder = Path(tempfile.mkdtemp()) / "store"
w = ImageStoreWriter(folder, {l: 2048 for l in layers}, "k")
t0 = time.perf_counter()
for i in range(0, len(pairs), 256):
    w.add_pair_graphs([pg(a, b) for a, b in pairs[i:i + 256]])
w.close()
tw = time.perf_counter() - t0
size = (folder / "pair_graphs.parquet").stat().st_size
st = ImageStore(folder)
probe = rng.sample(pairs, 20)
t0 = time.perf_counter()
for a, b in probe:
    g = st.pair_graph(a, b)
    assert g["classes"] == [a, b]
tl = (time.perf_counter() - t0) / len(probe)
print(json.dumps({"pairs": len(pairs), "write_s_incl_building": round(tw, 1), "file_MB": round(size / 2**20, 1),
                  "KB_per_pair": round(size / len(pairs) / 1024, 1), "lookup_ms": round(tl * 1e3, 1)}))
