"""Multi-process runs (docs/design.md §6): ``torchrun --nproc_per_node=2`` on the CPU (gloo) gives the same
concepts and graph as one process, the distributed k-means equals the single-process one, and a run
whose rank was SIGKILLed resumes from the finished chunks to the same graph."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed


from _children import child_env
import _dist_child as child
from gig_fast.concepts import bisecting_spherical_kmeans
from gig_fast.pipeline import Pipeline
from gig_fast.pipeline import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,  # torchrun jobs of two ranks
              pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str) -> subprocess.Popen:
    """2 CPU ranks of ``tests/_dist_child.py``, importing the very gig_fast this test process imported
    (the installed package in CI, whose compiled backends the in-tree copy lacks; this checkout in
    development), so ranks and the single-process reference run the same kernels."""
    env = child_env(OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=0",
           str(ROOT / "tests" / "_dist_child.py"), str(out), *args]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{log[-4000:]}")
    return log


def _single_run(out: Path) -> Path:
    """The one-process reference, with one intra-op thread like each rank (OMP_NUM_THREADS=1): the
    thread count changes the float reduction order of convolutions, hence the last bits of GIG sums."""
    cfg = child.tiny_config(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Pipeline(cfg, model=child.tp.tiny_model(), dataset=child.tp.tiny_data()).run()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch: the distributed k-means, then the tiny pipeline (its output folder)."""
    out = tmp_path_factory.mktemp("two_ranks")
    proc = _torchrun(out, "--kmeans")
    log = _finish(proc)
    assert proc.returncode == 0, log[-4000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _single_run(tmp_path_factory.mktemp("single") / "run")


def _close(a, b, path="") -> None:
    """JSON values equal; numbers within float tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}/{i}")
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.setup(torch.device("cpu")) == (0, 1, torch.device("cpu"))
    assert (dist.rank(), dist.world(), dist.is_main(), dist.owns(3)) == (0, 1, True, True)
    t = torch.arange(3.0)
    assert dist.all_reduce(t) is t
    dist.barrier()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        dist.setup(torch.device("cpu"))


def test_distributed_kmeans_equals_single_process(two_ranks):
    X, beta = child.kmeans_data()
    got = np.load(two_ranks / "kmeans.npz")
    K, seed, init_sample = child.KMEANS["K"], child.KMEANS["seed"], child.KMEANS["init_sample"]
    assert got["sharded_splits"][0] >= 2  # clusters > init_sample were refined data-parallel
    for mode in ("sequential", "fast"):
        V, labels = bisecting_spherical_kmeans(X, K, beta=beta, seed=seed, init_sample=init_sample, mode=mode)
        np.testing.assert_array_equal(got[f"{mode}_labels"], labels.numpy())
        np.testing.assert_allclose(got[f"{mode}_V"], V.numpy(), rtol=1e-5, atol=1e-6)


def test_two_ranks_give_the_single_process_graph(two_ranks, single):
    run = two_ranks / "run"
    _close(json.loads((single / "graph.json").read_text()), json.loads((run / "graph.json").read_text()))
    work = next(run.glob("work-*"))
    for f in sorted((single / work.name / "concepts").glob("*.npz")):
        a, b = np.load(f), np.load(work / "concepts" / f.name)
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["V"], b["V"], rtol=1e-5, atol=1e-6)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (single, run))
    m1.pop("timings_s"), m2.pop("timings_s")
    _close(m1, m2)
    # both ranks wrote their own chunk files (round-robin), and nothing is left half-written
    assert len(list((work / "stage1").glob("chunk_*.npz"))) == 9
    assert not list(work.rglob(".*.tmp*"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"torchrun ended before {path} appeared:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def test_killed_rank_then_relaunch_resumes_to_the_same_graph(tmp_path, single):
    proc = _torchrun(tmp_path, "--slow", "0.3")  # slow image loading: the kill lands mid stage 1
    work = tmp_path / "run" / f"work-{child.tiny_config(tmp_path).key()}"
    first = work / "stage1" / "chunk_00001.npz"  # rank 1's first chunk
    _wait_for(first, proc)
    os.kill(int((tmp_path / "pid_rank1").read_text()), signal.SIGKILL)
    log = _finish(proc)
    assert proc.returncode != 0, log[-4000:]  # torchrun stopped the whole job
    assert not (tmp_path / "run" / "graph.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (work / "stage1").glob("chunk_*.npz")}
    assert 0 < len(done) < 9
    proc = _torchrun(tmp_path)  # relaunch
    log = _finish(proc)
    assert proc.returncode == 0, log[-4000:]
    # the finished chunks were kept, not recomputed, and the result is the uninterrupted one
    assert {n: (work / "stage1" / n).stat().st_mtime_ns for n in done} == done
    assert (tmp_path / "run" / "graph.json").read_bytes() == (single / "graph.json").read_bytes()


def test_streamed_graph_has_the_bytes_of_the_whole_graph(single):
    from gig_fast.pipeline import build_graph
    from gig_fast.pipeline.files import save_json

    pipe = Pipeline(child.tiny_config(single), model=child.tp.tiny_model(), dataset=child.tp.tiny_data())
    save_json(single.parent / "whole.json", build_graph(pipe), compact=True)
    assert (single.parent / "whole.json").read_bytes() == (single / "graph.json").read_bytes()
