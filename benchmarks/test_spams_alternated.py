"""``spams_alternated.py``: the calls take turns, each round's ratio is kept, and each side's result is
checked before anything is timed. (Run with the smoke suite.)"""
from __future__ import annotations

import pytest

import spams_alternated as alt


def test_calls_take_turns_and_each_round_gives_its_ratio(monkeypatch):
    clock, calls = iter(range(100)), []

    def fake(name, cost):
        def call():
            calls.append(name)
            for _ in range(cost - 1):  # each call advances the fake clock by `cost`
                next(clock)
        return call
    monkeypatch.setattr(alt.time, "perf_counter", lambda: next(clock))
    ours, theirs = fake("ours", 1), fake("theirs", 3)
    m_ours, m_theirs, ratios = alt.alternate(ours, theirs, rounds=3)
    assert calls == ["ours", "theirs"] * 4  # the warm-up, then three rounds in turn
    assert (m_ours, m_theirs) == (1, 3) and ratios == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("method", ["lasso", "omp"])
def test_both_sides_code_the_same_problem(method, monkeypatch):
    """On a small unit problem SPAMS and ours pass the check the timing starts with, and the check fails
    on codes that are off (our supports with every code halved)."""
    pytest.importorskip("spams", reason="SPAMS is not installed (optional benchmark dependency: pip install spams-bin)")
    Y, V, lam = alt.unit_problem(40, 16, 128)
    _, _, check = alt.pair(method, Y, V, lam, atoms=4)
    check()
    idx, val = alt.sparse_code(Y, V, lam=lam, lam_mode="absolute", backend="cpp") if method == "lasso" else \
        alt.sparse_code(Y, V, method="omp", n_nonzero=4, backend="cpp")
    monkeypatch.setattr(alt, "sparse_code", lambda *a, **k: (idx, 0.5 * val))
    _, _, check_off = alt.pair(method, Y, V, lam, atoms=4)
    with pytest.raises(AssertionError):
        check_off()
