"""Where a pipeline run's wall time goes on the host: one run under ``cProfile``, its time
split by cause — image loading and decoding, the stage-1 sampler's per-image loop, chunk-file writes and
reads, the model/op compute — as shares of the run's wall time.

    python benchmarks/profile_pipeline.py --images DIR [--loader-workers N] [--out DIR]
    python benchmarks/profile_pipeline.py --images DIR --loader-compare 60 --loader-workers 2  # side by side
    python benchmarks/profile_pipeline.py --writer-compare 40 200     # inline vs background chunk writes
    python benchmarks/profile_pipeline.py --sampler-compare           # stage-1 draws: loop vs thread pool

``DIR`` is an image folder (``DIR/<class>/<file>``, e.g. JPEGs of ImageNet's typical 500×375); the run
uses the demo-shaped network (random weights) at 28×28 grey, its last four blocks, so that the host-side
costs that do not shrink on a GPU (decoding, Python loops, file I/O) show beside a small compute. Prints
one JSON line: ``wall_s``, per cause its seconds (cumulative, the same call counted once) and share,
and the stage timings from ``metrics.json``. ``--loader-workers`` sets the pipeline's ``loader_workers``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import json
import math
import pstats
import shutil
import tempfile
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gig_fast

# cause → the functions whose cumulative time it is (file name fragment, function name); a cause counts a
# call once even when it nests (load_images inside explain's caller, etc.)
CAUSES = {
    # load_images once ran on the main thread; now the main thread only waits in
    # loading.py's generators for batches not ready yet (the loading itself runs on other threads/processes)
    "image loading + decoding (main thread)": [("pipeline/runner.py", "load_images"), ("pipeline/image_loader.py", "_threaded"),
                                               ("pipeline/image_loader.py", "_worker_processes")],
    "stage-1 sampler (per-image generators)": [("pipeline/stages.py", "select")],
    "chunk-file writes (save_npz, fsync)": [("pipeline/files.py", "save_npz")],
    "chunk-file checks (CRC on resume)": [("pipeline/files.py", "npz_problem")],
    "stage-4 class-score re-reads": [("pipeline/selection.py", "_class_sums")],
    "SRD / forward (stages 1, 3)": [("gig_fast/srd.py", "explain"), ("models/adapters.py", "record")],
    "sparse coding (stage 3)": [("ops/sparse_code.py", "sparse_code")],
    "GIG (stage 4)": [("gig_fast/gig/engine.py", "gig")],
    "graph.json + store + report": [("pipeline/graph.py", "write_graph"), ("report/page.py", "write_report")],
}


def cause_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Per cause, the cumulative seconds of its functions (the largest where several match: they nest).
    cProfile sees the main thread only: work moved to other threads leaves the main thread's waits."""
    out = {}
    for cause, funcs in CAUSES.items():
        best = 0.0
        for (fname, _, name), (_, _, _, cum, _) in stats.stats.items():
            if any(fname.endswith(f) and name == n for f, n in funcs):
                best = max(best, cum)
        out[cause] = best
    return out


def run(images: str, out: str, loader_workers: int, top: int = 25) -> dict:
    from gig_fast.models import DemoResNet
    from gig_fast.pipeline import Pipeline, PipelineConfig
    from gig_fast.report import publish
    from gig_fast.testing import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(DemoResNet(base=2), torch.Generator().manual_seed(0)).eval()
    cfg = PipelineConfig(model="demo", dataset=images, image_size=28, channels=1, mean=(0.5,), std=(0.25,),
                         concept_images=400, pfvs_per_image=2, k_factor=1.0, explain_images=64, per_class=0,
                         layers=["layer3.5", "layer4.0", "layer4.1", "layer4.2"], gig_steps=4, batch_size=32,
                         chunk_images=128, kmeans_mode="fast", out=out, progress=False, loader_workers=loader_workers)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    pipe = Pipeline(cfg, model=model)
    pipe.run()
    publish(pipe)  # as gig-fast run does
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    seconds = cause_seconds(stats)
    by_self = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (file, line, name) → (.., tottime, ..)
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {"wall_s": round(wall, 2), "loader_workers": loader_workers,
            "causes": {k: {"s": round(v, 2), "share": round(v / wall, 3)} for k, v in seconds.items()},
            "timings_s": metrics["timings_s"],
            "top_self_s": [[f"{Path(f).name}:{name}", calls, round(tt, 2)] for (f, _, name), (_, calls, tt, _, _) in by_self]}


def loader_compare(images: str, device_ms: float, workers: int, batch_size: int = 32) -> dict:
    """Stage 1's image loading alone, three ways over the same batches, with ``device_ms`` of simulated
    device work per batch (a sleep: the host waits on the GPU, its cores idle): (a) ``load_images`` on the
    main thread, then the compute (how the pipeline loaded images at first); (b) :func:`image_batches` with
    ``loader_workers=0`` (one loading thread); (c) with ``workers`` decoding processes. Checks that every
    way yields the same tensors."""
    from gig_fast.models import DemoResNet
    from gig_fast.pipeline import Pipeline, PipelineConfig
    from gig_fast.pipeline.image_loader import image_batches

    out = tempfile.mkdtemp(prefix="gig_loader_")
    try:
        cfg = PipelineConfig(model="demo", dataset=images, image_size=28, channels=1, mean=(0.5,), std=(0.25,),
                             concept_images=400, explain_images=16, per_class=0, layers=["layer4.2"],
                             batch_size=batch_size, out=out, progress=False)
        pipe = Pipeline(cfg, model=DemoResNet(base=2).eval())
        ids = pipe.concept_ids
        batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        times, first = {}, None
        for name, n in (("main thread", None), ("loading thread", 0), (f"{workers} workers", workers)):
            pipe.config = cfg.replace(loader_workers=n if n is not None else 0)
            t0 = time.perf_counter()
            loaded = (pipe.load_images(b) for b in batches) if n is None else image_batches(pipe, batches)
            got = []
            for x, y in loaded:
                time.sleep(device_ms / 1e3)
                got.append(x)
            times[name] = round(time.perf_counter() - t0, 3)
            got = torch.cat(got)
            first = got if first is None else first
            assert torch.equal(got, first), f"{name}: other images than the main thread's"
        base = times["main thread"]
        return {"images": len(ids), "batch_size": batch_size, "device_ms_per_batch": device_ms, "wall_s": times,
                "speedup_vs_main_thread": {k: round(base / v, 2) for k, v in times.items()}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def writer_compare(folder: str, mb: float, compute_ms: float, files: int = 8) -> dict:
    """Chunk-file writes on the critical path vs :class:`~gig_fast.pipeline.files.BackgroundWriter`: ``files``
    chunk files of ``mb`` MB (float64, the size of a stage-4 ``class_sum``) each after ``compute_ms`` of
    simulated device work (a sleep); the same bytes both ways (checked)."""
    import numpy as np

    from gig_fast.pipeline.files import BackgroundWriter, load_npz, save_npz

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(int(mb * 2**20 / 8)) for _ in range(2)]
    base = Path(tempfile.mkdtemp(prefix="gig_writer_", dir=folder))
    try:
        t0 = time.perf_counter()
        for i in range(files):
            time.sleep(compute_ms / 1e3)
            save_npz(base / "inline" / f"chunk_{i:05d}.npz", class_sum=arrays[i % 2])
        inline = time.perf_counter() - t0
        t0 = time.perf_counter()
        with BackgroundWriter() as writer:
            for i in range(files):
                time.sleep(compute_ms / 1e3)
                writer.save_npz(base / "background" / f"chunk_{i:05d}.npz", class_sum=arrays[i % 2])
        background = time.perf_counter() - t0
        for i in range(files):
            a, b = (load_npz(base / way / f"chunk_{i:05d}.npz")["class_sum"] for way in ("inline", "background"))
            assert np.array_equal(a, b), f"chunk {i}: the background writer wrote other bytes"
        return {"files": files, "mb_per_file": mb, "compute_ms_per_file": compute_ms,
                "wall_s": {"inline": round(inline, 3), "background": round(background, 3)},
                "speedup": round(inline / background, 2)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def sampler_compare(batch: int = 128, rounds: int = 7) -> dict:
    """The stage-1 sampler's draws over ResNet-50's 16 blocks (3 at 56×56, 4 at 28×28, 6 at 14×14, 3 at
    7×7 positions): its per-image loop on the main thread (the pipeline's ``_sampler``) vs the same draws
    on a thread pool of one thread per core (a candidate fix, not adopted: slower on the 2-core box); best of ``rounds``, alternating; checks that the draws are the same."""
    import numpy as np

    from gig_fast.pipeline.stages import image_generator

    g = torch.Generator().manual_seed(0)
    contribs = [torch.randn(batch, s, s, generator=g) for s in [56] * 3 + [28] * 4 + [14] * 6 + [7] * 3]
    images = np.arange(batch) * 7

    def loop(point, contrib):  # the code before: one draw after the other
        w = contrib.flatten(1).double().clamp_min(0)
        w[w.sum(1) <= 0] = 1.0
        return torch.stack([torch.multinomial(w[i], 1, replacement=False, generator=image_generator(0, im, point))
                            for i, im in enumerate(images.tolist())])

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def select(point, contrib):  # the same draws, the images' on a thread pool (torch may release the GIL)
        w = contrib.flatten(1).double().clamp_min(0)
        w[w.sum(1) <= 0] = 1.0
        draw = lambda i, im: torch.multinomial(w[i], 1, replacement=False,  # noqa: E731
                                               generator=image_generator(0, im, point))
        return torch.stack(list(pool.map(draw, range(len(images)), images.tolist())))

    times = {"main-thread loop": math.inf, "thread pool": math.inf}
    for _ in range(rounds):  # the two ways alternate, so that a busy spell of the machine hits both
        for name, fn in (("main-thread loop", loop), ("thread pool", select)):
            t0 = time.perf_counter()
            drawn = [fn(f"layer{i}", c) for i, c in enumerate(contribs)]
            times[name] = min(times[name], time.perf_counter() - t0)
            if name == "main-thread loop":
                ref = drawn
            else:
                assert all(torch.equal(a, b) for a, b in zip(ref, drawn)), "the thread pool drew other positions"
    return {"images": batch, "ms_per_image": {k: round(v / batch * 1e3, 3) for k, v in times.items()},
            "speedup": round(times["main-thread loop"] / times["thread pool"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", help="an image folder DIR/<class>/<file> (the profile and --loader-compare)")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--top", type=int, default=25, help="functions listed by their own time")
    ap.add_argument("--loader-compare", type=float, default=None, metavar="DEVICE_MS",
                    help="only compare the ways of loading stage 1's images, DEVICE_MS simulated device work per batch")
    ap.add_argument("--writer-compare", type=float, nargs=2, default=None, metavar=("MB", "COMPUTE_MS"),
                    help="only compare inline and background chunk-file writes")
    ap.add_argument("--sampler-compare", action="store_true", help="only compare the stage-1 sampler's two ways")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.loader_compare is not None:
        print(json.dumps(loader_compare(args.images, args.loader_compare, args.loader_workers or 2)))
        return
    if args.sampler_compare:
        print(json.dumps(sampler_compare()))
        return
    if args.writer_compare is not None:
        print(json.dumps(writer_compare(args.out or tempfile.gettempdir(), *args.writer_compare)))
        return
    out = args.out or tempfile.mkdtemp(prefix="gig_profile_")
    try:
        print(json.dumps(run(args.images, out, args.loader_workers, args.top)))
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
