"""Run the benchmark suite and record its rows: pytest-benchmark, then ``results.py append`` and ``render``.

    python benchmarks/run.py                                   # this device, its default size, all topics
    python benchmarks/run.py --gig-size quick sparse_reconstruct gig
    python benchmarks/run.py --results $OUT/results.jsonl --json $OUT/run.json -- -k "not pipeline"

Topics are the ``bench_<topic>.py`` modules (the memory-copy ceiling always runs with them, for "% of
the bound"). Arguments after ``--`` go to pytest. The rows go to ``benchmarks/results.jsonl`` (or
``--results``; ``$GIG_FAST_RESULTS``): one per benchmark that ran, each of them past its correctness check
(a route that fails its check is never timed); ``benchmarks/RESULTS.md`` is re-rendered when the default
results file was written. The exit status is pytest's. ``--no-record`` only runs the suite.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile

import harness
import results

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("topics", nargs="*", help="bench_<topic>.py modules (default: all)")
    ap.add_argument("--gig-size", choices=("smoke", "quick", "full"), default=None)
    ap.add_argument("--gig-device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--results", default=harness.RESULTS, help="results file to append to")
    ap.add_argument("--json", default=None, help="keep pytest-benchmark's JSON here")
    ap.add_argument("--no-record", action="store_true", help="run the suite, append nothing")
    args = ap.parse_args(argv)
    paths = [os.path.join(HERE, f"bench_{t}.py") for t in args.topics] or [HERE]
    if args.topics and "ceilings" not in args.topics:
        paths.insert(0, os.path.join(HERE, "bench_ceilings.py"))
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        ap.error(f"no such topic: {missing}")
    json_path = args.json or os.path.join(tempfile.mkdtemp(prefix="gig_bench_"), "run.json")
    # The smoke size checks every route once and times nothing (the conftest turns timing off): it records no rows.
    smoke = args.gig_size == "smoke"
    cmd = [sys.executable, "-m", "pytest", *paths] + ([] if smoke else ["--benchmark-only", f"--benchmark-json={json_path}"])
    cmd += ["-rs"]
    cmd += [f"--gig-size={args.gig_size}"] * bool(args.gig_size) + [f"--gig-device={args.gig_device}"] * bool(args.gig_device)
    print("+", " ".join(cmd + extra), flush=True)
    # A time box's SIGINT (gpu_campaign.sh) reaches pytest too, which stops and writes the JSON of what
    # it finished: this process waits for that and records it (a Python handler, not SIG_IGN, so that the
    # child starts with the default and turns SIGINT into KeyboardInterrupt).
    previous = signal.signal(signal.SIGINT, lambda *_: print("SIGINT: waiting for pytest to write its JSON"))
    try:
        status = subprocess.call(cmd + extra, cwd=os.path.dirname(HERE))
    finally:
        signal.signal(signal.SIGINT, previous)
    if smoke or args.no_record or not os.path.exists(json_path):
        return status
    # Every benchmark in the JSON passed its check (a route whose check fails is never timed); an
    # interrupted run (a time box's SIGINT) still wrote the ones it finished.
    results.append(json_path, args.results)
    if os.path.abspath(args.results) == os.path.abspath(os.path.join(HERE, "results.jsonl")):
        with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
            f.write(results.render(args.results))
    return status


if __name__ == "__main__":
    sys.exit(main())
