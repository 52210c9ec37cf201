"""Resume that cannot mix data: stage-1 draws per image, the work folder's
record (chunking pinned, backend/device/data set refused when changed), damaged work files recomputed,
stale temporary files removed, and a fault-injection run: SIGKILL in every stage, a damaged chunk,
other ``chunk_images``/``batch_size`` at every launch — the final graph is the uninterrupted run's."""
import json
import random
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from _children import PACKAGE_ROOT
import test_pipeline as tp
from gig_fast.cli import main
from gig_fast.pipeline import Pipeline, pfv_dataset
from gig_fast.pipeline.stages import load_pfvs
from gig_fast.pipeline.files import npz_problem
from gig_fast.report import rebuild_report
from gig_fast.run_folder import remove_stale_tmp

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["layer4.0", "layer4.2"]  # two layers and the fixed rule: a run of a few seconds


def config(out, **kw):
    return tp.tiny_config(out, **{"layers": LAYERS, "gig_rule": "gausslegendre", "gig_tolerance": None, **kw})


def pipeline(out, dataset=None, **kw):
    return Pipeline(config(out, **kw), model=tp.tiny_model(), dataset=dataset if dataset is not None else tp.tiny_data())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (chunk_images 6, batch_size 6): its output folder."""
    return pipeline(tmp_path_factory.mktemp("reference") / "run").run()


def _work(out: Path) -> Path:
    return next(out.glob("work-*"))


# ------------------------------------------------------------------------------ defect 1: no mixing
def test_stage1_samples_do_not_depend_on_chunking_or_batching(tmp_path):
    """Every image draws its samples from its own generator: the same rows whatever the chunks and
    batches (they used to be drawn from one generator per chunk, consumed batch by batch)."""
    got = []
    for chunk, batch in ((6, 6), (4, 3), (18, 5)):
        pipe = pipeline(tmp_path / f"c{chunk}", chunk_images=chunk, batch_size=batch)
        pfv_dataset(pipe)
        got.append({p: load_pfvs(pipe, p) for p in LAYERS})
    for other in got[1:]:
        for p in LAYERS:
            for key in ("image", "position", "label"):
                assert np.array_equal(other[p][key], got[0][p][key]), (p, key)
            # batched convolutions round differently per batch size: ~1e-7 of the activations' scale
            scale = np.abs(got[0][p]["pfv"]).max()
            np.testing.assert_allclose(other[p]["pfv"], got[0][p]["pfv"], rtol=0, atol=1e-6 * scale)


def test_relaunch_with_other_chunking_keeps_the_folders(tmp_path):
    first = pipeline(tmp_path, chunk_images=6)
    pfv_dataset(first)  # stage 1 done, as in a run killed after it
    with pytest.warns(UserWarning, match=r"chunk_images=4 but .* chunked with chunk_images=6: keeping 6 "
                                         r"\(its files are named by chunk index\)\. To rechunk"):
        again = pipeline(tmp_path, chunk_images=4)
    assert again.config.chunk_images == 6 and again.work == first.work


def test_relaunch_with_another_backend_or_device_is_refused(tmp_path, monkeypatch):
    pipeline(tmp_path)  # makes the work folder and its record (backend null, device cpu)
    with pytest.raises(ValueError, match=r"started with backend=null \(the default\) and this launch has "
                                         r"backend='torch'.*Relaunch with backend=null \(the default\) to resume, or use "
                                         r"another out folder"):
        pipeline(tmp_path, backend="torch").run()
    monkeypatch.setenv("GIG_FAST_BACKEND", "torch")
    with pytest.raises(ValueError, match=r"backend=null \(the default\) and this launch has backend='torch'"):
        pipeline(tmp_path).run()
    monkeypatch.delenv("GIG_FAST_BACKEND")
    record_file = _work(tmp_path) / "config.json"
    record = json.loads(record_file.read_text())
    assert record["numerics"] == {"backend": None, "device_type": "cpu"}
    record["numerics"]["device_type"] = "cuda"  # as if the folder had been started on a GPU
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"started with device='cuda' and this launch has device='cpu'"):
        pipeline(tmp_path).run()
    assert not (_work(tmp_path) / "stage1").exists()  # refused before any stage ran


def test_an_unfinished_stage1_of_an_older_version_is_not_mixed(tmp_path):
    pipe = pipeline(tmp_path)
    record_file = _work(tmp_path) / "config.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({"key": record["key"], "config": record["config"]}))  # the old format
    (_work(tmp_path) / "stage1").mkdir()
    with pytest.raises(ValueError, match="started by an older gig_fast that drew the stage-1 samples per chunk"):
        pipeline(tmp_path).run()
    pfv_dataset(pipe)  # stage 1 complete: the later stages do not depend on how it drew
    pipeline(tmp_path)._check_work()


def test_relaunch_on_a_changed_data_set_is_refused(tmp_path):
    pipeline(tmp_path)
    with pytest.raises(ValueError, match=r"data set 'tiny' changed since .* was started"):
        pipeline(tmp_path, dataset=tp.tiny_data(n=27))


# ------------------------------------------------------------------------------ defect 3: damaged files
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    """One byte inside the first array's data: the zip stays readable, its CRC check fails."""
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_array(path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files[1:]}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_damaged_work_files_are_named_and_recomputed(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    work = _work(out)
    damaged = {work / "stage1" / "chunk_00001.npz": _truncate, work / "concepts" / "layer4.2.npz": _flip_byte,
               work / "codes" / "chunk_00000.npz": _drop_array, next((work / "gig").glob("*/chunk_00000.npz")): _truncate}
    for path, damage in damaged.items():
        damage(path)
        assert npz_problem(path) is not None or damage is _drop_array
    (work / "gig" / "layer4.0__layer4.2" / "chunk_00000.npz").write_bytes(b"")  # a zero-length file too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline(out).run()
    named = " ".join(str(w.message) for w in caught)
    for path in damaged:
        assert f"work file {path} is damaged" in named and "recomputing it" in named
    assert (out / "graph.json").read_bytes() == (reference / "graph.json").read_bytes()
    assert all(npz_problem(p) is None for p in work.rglob("*.npz"))


def test_damaged_json_files_are_named(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "graph.json").write_text('{"schema": "gig_fast.graph", "vers')
    assert main(["show", "--run", str(out), "--classes", "0", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gig-fast: error: ") and "graph.json is damaged: not valid JSON" in err and "\n" not in err
    with pytest.raises(ValueError, match=r"graph\.json is damaged"):
        rebuild_report(out, model=tp.tiny_model(), dataset=tp.tiny_data())
    shutil.copy(reference / "graph.json", out / "graph.json")
    (out / "metrics.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match=r"metrics\.json is damaged"):
        rebuild_report(out, model=tp.tiny_model(), dataset=tp.tiny_data())
    (_work(out) / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json is damaged: not valid JSON"):
        pipeline(out)


def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pipeline(tmp_path)  # makes the work folder
        work = _work(tmp_path)
        stale = [work / "stage1" / f".chunk_00000.npz.tmp{dead.pid}", tmp_path / f".graph.json.tmp{dead.pid}"]
        kept = [work / "codes" / f".chunk_00001.npz.tmp{live.pid}", tmp_path / f".metrics.json.tmp{live.pid}"]
        for p in stale + kept:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"PK\x03\x04 a partial write")
        pipeline(tmp_path)  # a relaunch cleans up first
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert remove_stale_tmp(tmp_path) == []
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------ fault injection
_CHILD = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = {path!r}
import test_resume as t
from gig_fast.pipeline import stages

stage, nth, mid_write = {stage!r}, {nth}, {mid_write}
count = 0
save = stages.save_npz


def dying_save(path, **arrays):
    # SIGKILL at the nth file this stage writes: before the write (mid-computation), or mid-write
    global count
    path = Path(path)
    if stage in path.parts[-3:-1]:
        count += 1
        if count == nth:
            if mid_write:  # a partial temporary file, as a kill inside np.savez leaves
                path.parent.mkdir(parents=True, exist_ok=True)
                (path.parent / f".{{path.name}}.tmp{{os.getpid()}}").write_bytes(b"PK\\x03\\x04 partial")
            os.kill(os.getpid(), signal.SIGKILL)
    save(path, **arrays)


stages.save_npz = dying_save
t.pipeline({out!r}, chunk_images={chunk}, batch_size={batch}).run()
"""

# files each stage writes in the tiny run (18 concept images, 6 explained, chunks of 6, 2 layers)
STAGE_FILES = {"stage1": 3, "concepts": 2, "codes": 1, "gig": 2}


def test_fault_injection_kill_damage_and_rechunk_give_the_uninterrupted_graph(tmp_path, reference, request):
    seed = dict(request.node.user_properties)["seed"]
    rng = random.Random(seed)
    out = tmp_path / "run"
    launches = [(6, 6), (4, 3), (9, 2), (6, 4), (3, 5)]  # (chunk_images, batch_size) of each launch
    for (stage, files), (chunk, batch) in zip(STAGE_FILES.items(), launches):
        nth, mid_write = rng.randint(1, files), rng.random() < 0.5
        child = subprocess.run(
            [sys.executable, "-c", _CHILD.format(path=[PACKAGE_ROOT, str(ROOT / "tests")] + sys.path, stage=stage, nth=nth,
                                                 mid_write=mid_write, out=str(out), chunk=chunk, batch=batch)],
            capture_output=True, text=True, timeout=600)
        assert child.returncode == -signal.SIGKILL, (stage, nth, child.stderr[-3000:])
        assert not (out / "graph.json").exists()
    work = _work(out)
    victim = rng.choice(sorted(work.rglob("chunk_*.npz")))
    _truncate(victim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline(out, chunk_images=launches[-1][0], batch_size=launches[-1][1]).run()
    said = " ".join(str(w.message) for w in caught)
    assert f"work file {victim} is damaged" in said, (victim, said)
    assert "chunk_images=3 but" in said and "keeping 6" in said
    assert not list(out.rglob(".*.tmp*")), "stale temporary files left"
    # batch sizes change the float rounding of batched convolutions (1e-7 of the activations, see
    # test_stage1_samples_do_not_depend_on_chunking_or_batching), nothing else
    _assert_same_graph(json.loads((out / "graph.json").read_text()), json.loads((reference / "graph.json").read_text()))


def _assert_same_graph(got, want, where="graph"):
    """Equal JSON, floats to 1e-4 relative (graph.json keeps 6 significant digits)."""
    if isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_same_graph(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_graph(g, w, f"{where}[{i}]")
    else:
        assert got == want, where
