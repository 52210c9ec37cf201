"""Run the benchmark scripts side by side and render the results table.

    python benchmarks/run.py --device cpu --quick            # every bench_*.py, small sizes
    python benchmarks/run.py --device cuda --only sparse_reconstruct kmeans
    python benchmarks/run.py --table                         # render benchmarks/results.jsonl as Markdown

Each ``bench_<topic>.py`` defines ``run(device, quick)``; rows go to ``benchmarks/results.jsonl``
(``$GIG_FAST_RESULTS`` overrides) with the device name, versions and commit.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# Prefer the checkout when it holds an in-place build (development, the GPU campaign); otherwise the
# installed package.
if glob.glob(os.path.join(ROOT, "gig_fast", "_C*.so")):
    sys.path.insert(0, ROOT)

import harness  # noqa: E402


def topics() -> list[str]:
    return sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def _load(topic: str):
    spec = importlib.util.spec_from_file_location(f"bench_{topic}", os.path.join(HERE, f"bench_{topic}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke runs, CI)")
    ap.add_argument("--only", nargs="*", default=None, help=f"topics among {topics()}")
    ap.add_argument("--table", action="store_true", help="only render the results file as Markdown")
    args = ap.parse_args(argv)
    if args.table:
        print(harness.render_table(harness.load_rows()))
        return 0
    failed = []
    for topic in args.only or topics():
        print(f"\n== {topic} on {args.device} ==", flush=True)
        t0 = time.time()
        try:
            _load(topic).run(args.device, args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(topic)
        print(f"== {topic}: {time.time() - t0:.1f} s", flush=True)
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
