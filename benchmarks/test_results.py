"""The suite's own bookkeeping: derived figures, rows from pytest-benchmark's JSON, the rendering.
(Run with the smoke suite: ``python -m pytest benchmarks --gig-size smoke``.)"""
from __future__ import annotations

import json

import pytest

import harness
import results


def _bench(group, impl, role, times_s, **info):
    data = sorted(times_s)
    return {"group": group, "extra_info": {"op": "op", "impl": impl, "role": role, "device": "CPU test", "shape": {},
                                           "commit": "abcdef1", **info},
            "stats": {"median": data[len(data) // 2], "min": data[0], "rounds": len(data), "data": list(times_s)}}


def test_speedup_is_against_the_fastest_baseline_of_the_group():
    entries = [_bench("g", "slow", "baseline", [4.0, 4.0, 4.0]), _bench("g", "fast", "baseline", [2.0, 2.0, 2.0]),
               _bench("g", "ours", "ours", [1.0, 1.0, 1.0]), _bench("g", "floor", "floor", [0.5, 0.5, 0.5]),
               _bench("other", "x", "baseline", [0.1, 0.1, 0.1])]
    harness.derive(entries)
    ours = entries[2]["extra_info"]
    assert ours["baseline"] == "fast" and ours["speedup"] == pytest.approx(2.0)
    assert ours["speedup_vs"] == pytest.approx({"slow": 4.0, "fast": 2.0})
    assert ours["x_floor"] == pytest.approx({"floor": 2.0})
    assert "speedup" not in entries[1]["extra_info"]  # baselines get none


def test_relative_to_names_another_impl_of_the_group():
    """The adaptive GIG rule's time over the fixed rule's on the same images."""
    entries = [_bench("g", "captum", "baseline", [4.0, 4.0, 4.0]), _bench("g", "fixed", "ours", [1.0, 1.0, 1.0]),
               _bench("g", "adaptive", "ours", [2.5, 3.0, 3.5], relative_to="fixed"),
               _bench("h", "fixed", "ours", [9.0, 9.0, 9.0])]
    harness.derive(entries)
    assert entries[2]["extra_info"]["x_relative"] == pytest.approx({"fixed": 3.0})  # medians, same group only
    assert "x_relative" not in entries[1]["extra_info"]
    row = harness.row_from_benchmark(entries[2], "now")
    assert row["x_relative"] == pytest.approx({"fixed": 3.0}) and row["relative_to"] == "fixed"


def test_percent_of_bound_uses_the_memory_copy_of_the_run():
    copy = _bench("copy", "Tensor.copy_", "ceiling", [0.1, 0.2, 0.3], bytes_moved=1e9)  # 10 GB/s at best
    op = _bench("g", "ours", "ours", [0.5, 1.0, 2.0], bytes_moved=2e9)  # 2 GB/s at the median
    harness.derive([copy, op])
    assert op["extra_info"]["GB_per_s"] == pytest.approx(2.0)
    assert op["extra_info"]["pct_bound"] == pytest.approx(20.0)


def test_row_percentiles_come_from_the_rounds():
    bench = _bench("g", "ours", "ours", [i / 1000 for i in range(1, 101)])  # 1..100 ms
    harness.derive([bench])
    row = harness.row_from_benchmark(bench, "2026-01-01T00:00:00")
    assert row["ms_p20"] == pytest.approx(20.8) and row["ms_p80"] == pytest.approx(80.2)
    assert row["ms"] == pytest.approx(51.0) and row["ms_min"] == pytest.approx(1.0) and row["rounds"] == 100


def test_rows_of_a_dirty_or_unknown_tree_are_not_rendered(tmp_path):
    clean = _bench("g", "clean", "baseline", [1.0, 1.0])
    dirty = _bench("g", "dirty", "baseline", [1.0, 1.0], dirty=True)
    unknown = _bench("g", "unknown", "baseline", [1.0, 1.0], commit="pre-2d (uncommitted)")
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"datetime": "2026-01-01", "benchmarks": [clean, dirty, unknown]}))
    path = str(tmp_path / "results.jsonl")
    assert results.append(str(run), path) == 3
    text = results.render(path)
    assert "| clean |" in text and "| dirty |" not in text and "| unknown |" not in text
    assert "2 rows" in text


def test_pipeline_stages_become_rows():
    base = _bench("p", "torch", "baseline", [10.0], stages_s={"stage1": 4.0, "stage3": 6.0})
    ours = _bench("p", "default", "ours", [3.0], stages_s={"stage1": 2.0, "stage3": 1.0})
    harness.derive([base, ours])
    rows = harness.stage_rows(ours, "t")
    assert [r["op"] for r in rows] == ["pipeline/stage1", "pipeline/stage3"]
    assert [r["speedup"] for r in rows] == pytest.approx([2.0, 6.0])


def test_profile_gig_writes_the_shares_and_the_trace(tmp_path):
    """benchmarks/profile_gig.py at B = 2, fixed rule: every F_ab region is in the table, the
    region shares add up to the wall time with what is outside them, and the chrome trace holds the regions."""
    import gzip
    import re

    import profile_gig
    assert profile_gig.main(["--out", str(tmp_path), "--B", "2", "--modes", "fixed", "--repeats", "1", "--trace"]) == 0
    text = (tmp_path / "gig_profile.md").read_text()
    sections = text.split("### ")[1:]
    assert len(sections) == 2  # layer3.5 -> logits and layer1.2 -> layer2.0
    for section in sections:
        shares = [float(x) for x in re.findall(r"^\| (?:gig\.\w+|outside the regions[^|]*) \| [\d.]+ \| ([\d.-]+)%",
                                                section, re.M)]
        assert len(shares) >= 8 and abs(sum(shares) - 100) < 0.5, section
        assert "| gig.forward |" in section and "| gig.backward |" in section
    names = {e.get("name") for e in json.load(gzip.open(tmp_path / "gig_trace.json.gz"))["traceEvents"]}
    assert {"gig.forward", "gig.backward", "gig.accumulate"} <= names
