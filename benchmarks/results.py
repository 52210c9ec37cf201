"""The results file: rows appended from pytest-benchmark's JSON, and its Markdown rendering.

    python benchmarks/results.py append RUN.json [--results PATH]   # one row per benchmark (+ pipeline stages)
    python benchmarks/results.py render [--results PATH] [--out benchmarks/RESULTS.md]

``RUN.json`` is what ``pytest benchmarks --benchmark-json RUN.json`` wrote (``benchmarks/run.py`` does both
steps). No timing happens here: the rows carry pytest-benchmark's statistics and the figures
``harness.derive`` added (GB/s, % of the bound, speed-ups). ``RESULTS.md`` shows the rows measured on a
committed tree only (see :func:`harness.renderable`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import harness

PREFACE = """# Benchmark results

Rendered from `benchmarks/results.jsonl` by `python benchmarks/results.py render` (do not edit by hand).
`ms` is the median of the rounds, `p20–p80` their spread where the row has one (a row of a single run has
none), `% bound` the share of the row's bound (the memory copy measured in the same run, or the GPU's peak
bandwidth), `speedup` the median of the fastest baseline of the same case and run over the row's median.
Rows measured on a tree with uncommitted changes are kept in the file but not shown here:
{hidden}.

Rows before the pytest-benchmark suite came from a hand-written harness; their statistics were relabelled
in the file where they had been mislabelled: `gig_engine` rows carry `ms_min`/`ms_max` (they were
written as `ms_p20`/`ms_p80`) and their `ms` is per image (`per_image`); CPU rows timed by
`torch.utils.benchmark` carry its `ms_p25`/`ms_p75`; rows of one run carry `rounds: 1` and no spread.

"""


def append(json_path: str, results: str) -> int:
    """Append the rows of one pytest-benchmark JSON file; returns how many were written."""
    with open(json_path) as f:
        run = json.load(f)
    harness.derive(run["benchmarks"])  # already there when the suite's hook ran; idempotent
    when = run.get("datetime", "")
    rows = []
    for bench in run["benchmarks"]:
        if "op" not in (bench.get("extra_info") or {}):
            continue
        rows.append(harness.row_from_benchmark(bench, when))
        rows.extend(harness.stage_rows(bench, when))
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(harness.format_row(row))
    return len(rows)


def render(results: str) -> str:
    rows = harness.load_rows(results)
    hidden = [r for r in rows if not harness.renderable(r)]
    commits = sorted({str(r.get("commit")) + (" (dirty)" if r.get("dirty") else "") for r in hidden})
    text = f"{len(hidden)} rows ({', '.join(commits)})" if hidden else "none at present"
    return PREFACE.format(hidden=text) + harness.render_table(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("append", help="append the rows of a pytest-benchmark JSON file")
    a.add_argument("json")
    a.add_argument("--results", default=harness.RESULTS)
    r = sub.add_parser("render", help="render the results file as Markdown")
    r.add_argument("--results", default=harness.RESULTS)
    r.add_argument("--out", default=None, help="write here (default: stdout)")
    args = ap.parse_args(argv)
    if args.command == "append":
        n = append(args.json, args.results)
        print(f"{n} rows appended to {args.results}", file=sys.stderr)
        return 0 if n else 1
    text = render(args.results)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
