"""A worker that ``tests/test_distributed.py`` launches under ``torchrun`` (one per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_dist_child.py OUT [--kmeans] [--slow S]

``--kmeans``: run the distributed bisecting k-means on :func:`kmeans_data` in both modes and (rank 0)
save the concepts and labels to ``OUT/kmeans.npz``. Then run the tiny pipeline of
``tests/test_pipeline.py`` into ``OUT/run`` (``--slow S``: sleep S seconds per image batch, so that a
test can kill a rank mid-run). Each rank writes its pid to ``OUT/pid_rank<r>`` first.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_pipeline as tp  # noqa: E402  (the tiny model, data and config)

from gig_fast.pipeline import Pipeline  # noqa: E402
from gig_fast.pipeline import distributed as dist  # noqa: E402

CHUNK = 2  # small chunks: every rank gets several in every stage
KMEANS = dict(K=12, seed=3, init_sample=200)  # clusters > 200 points take the data-parallel path


def kmeans_data(n=1500, c=8, seed=0):
    """A mixture of 10 directions with noise: ``(X [n, c], beta [c])`` float32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, c, generator=g) * 3
    X = centres[torch.randint(10, (n,), generator=g)] + torch.randn(n, c, generator=g)
    return X, torch.randn(c, generator=g) * 0.1


def tiny_config(out):
    return tp.tiny_config(out, chunk_images=CHUNK)


def run_kmeans(out: Path) -> None:
    import gig_fast.concepts.distributed_bisecting as cd

    X, beta = kmeans_data()
    res = {"sharded_splits": np.zeros(1, dtype=np.int64)}
    for mode in ("sequential", "fast"):
        V, labels, info = cd.distributed_bisecting_kmeans(X, KMEANS["K"], rank=dist.rank(), world=dist.world(),
                                                          all_reduce=dist.all_reduce, beta=beta, seed=KMEANS["seed"],
                                                          init_sample=KMEANS["init_sample"], mode=mode, return_info=True)
        res[f"{mode}_V"], res[f"{mode}_labels"] = V.numpy(), labels.numpy()
        res["sharded_splits"] += info.sharded_splits  # clusters > init_sample refined data-parallel
    if dist.rank() == 0:
        np.savez(out / "kmeans.npz", **res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kmeans", action="store_true")
    ap.add_argument("--slow", type=float, default=0.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid_rank{os.environ['RANK']}").write_text(str(os.getpid()))
    if args.slow:
        load = Pipeline.load_images

        def slow_load(self, ids):
            time.sleep(args.slow)
            return load(self, ids)
        Pipeline.load_images = slow_load
    pipe = Pipeline(tiny_config(out / "run"), model=tp.tiny_model(), dataset=tp.tiny_data())
    assert (pipe.rank, pipe.world) == (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if args.kmeans:
        run_kmeans(out)
    pipe.run()


if __name__ == "__main__":
    main()
