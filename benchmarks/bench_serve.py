"""Latency of ``gig-fast serve`` as a frontend sees it: a server process on 127.0.0.1, requests over real
HTTP, p50 / p95 / max per endpoint, cold (the first call of each URL: distinct pairs, images and
concepts) and warm (the same URLs again), the page ``GET /`` and the start, and ``GET /api/run`` while
explains run back to back (against the same request with no explain, interleaved in time).

    python benchmarks/bench_serve.py --run gig_demo                 # the demo run
    python benchmarks/bench_serve.py --small                        # a tiny run made here (seconds)
    python benchmarks/bench_serve.py --run gig_demo --code OLD_TREE # another checkout's server, same cases

Bounded: ``--requests`` URLs per endpoint (each called cold, then warm), ``--budget`` seconds in all
(a phase that would pass it is cut short and says so), every request times out after 120 s; the server
is stopped at the end. The server runs with ``--threads`` torch threads (OMP_NUM_THREADS).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMEOUT = 120  # seconds per request


def _get(base: str, path: str, data: bytes | None = None) -> tuple[int, float, bytes]:
    """``(status, seconds, body)`` of one request."""
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except TimeoutError:  # counted as TIMEOUT seconds, status 0
        status, body = 0, b""
    return status, time.perf_counter() - t0, body


def _stats(seconds: list[float]) -> dict:
    a = np.array(seconds) * 1e3
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1), "max_ms": round(float(a.max()), 1)} if a.size else {"n": 0}


class Server:
    """``gig-fast serve`` in a child process (``code``: the checkout whose ``gig_fast`` it imports)."""

    def __init__(self, run: Path, code: Path, threads: int, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = open(log, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "gig_fast.cli", "serve", "--run", str(run), "--port",
                                      str(self.port)], cwd=code, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                if _get(self.base, "/api/run")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise RuntimeError(f"the server did not start; see {log}")
            time.sleep(0.05)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _cases(run_dir: Path, n: int) -> dict[str, list[str]]:
    """Per endpoint ``n`` distinct URLs (pairs of classes with images, explained images, concepts drawn in
    class graphs across the layers)."""
    graph = json.loads((run_dir / "graph.json").read_text())
    classes = [int(c) for c in sorted(graph["class_graphs"], key=int)]
    pairs = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1:]]
    rng = np.random.default_rng(0)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    from gig_fast import Run

    run = Run.open(run_dir)
    ids = run.image_ids()
    images = [ids[i] for i in rng.permutation(len(ids))[:n]]
    drawn = sorted({(layer, x["concept"]) for g in graph["class_graphs"].values() for layer, items in g["nodes"].items()
                    for x in items if layer != "classes"})
    concepts = [drawn[i] for i in rng.permutation(len(drawn))[:n]]
    return {"pair view": [f"/api/pairs/{a}/{b}/view" for a, b in pairs],
            "image view": [f"/api/images/{i}/view" for i in images],
            "concept card": [f"/api/concepts/{layer}/{q}" for layer, q in concepts],
            "pair graph": [f"/api/pairs/{a}/{b}" for a, b in pairs],
            "image graph": [f"/api/images/{i}/graph" for i in images],
            "top images": [f"/api/concepts/{layer}/{q}/images" for layer, q in concepts],
            "class graph": [f"/api/classes/{c}/graph" for c in classes[:n]]}


def _upload(run_dir: Path) -> bytes:
    """A PNG of the run's first explained image (what a user would upload)."""
    from PIL import Image

    from gig_fast import Run
    from gig_fast.explorer.pictures import display_rgb

    run = Run.open(run_dir)
    x, _ = run.load_dataset_images(run.image_ids(limit=1))
    rgb = (display_rgb(x[0]) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0] if x.shape[1] == 1 else rgb).save(buf, format="PNG")
    return buf.getvalue()


def _during_explain(base: str, png: bytes, seconds: float) -> dict:
    """``/api/run`` every 50 ms while explains run back to back, and the same with none running
    (alternating 1-s windows, so both see the same machine load)."""
    busy = threading.Event()
    stop = threading.Event()
    explains: list[float] = []

    def explain_loop():
        while not stop.is_set():
            if busy.is_set():
                status, dt, _ = _get(base, "/api/explain", data=png)
                if status == 200:
                    explains.append(dt)
            else:
                time.sleep(0.01)

    t = threading.Thread(target=explain_loop, daemon=True)
    t.start()
    during, idle = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        busy.set()
        while not explains and time.perf_counter() < deadline:  # the first explain under way
            time.sleep(0.05)
        window = time.perf_counter() + 1.0
        while time.perf_counter() < window:
            during.append(_get(base, "/api/run")[1])
            time.sleep(0.05)
        busy.clear()
        time.sleep(0.5 + (np.median(explains) if explains else 0))  # the running explain ends
        window = time.perf_counter() + 1.0
        while time.perf_counter() < window:
            idle.append(_get(base, "/api/run")[1])
            time.sleep(0.05)
    stop.set()
    t.join(timeout=TIMEOUT)
    return {"api_run_during_explain": _stats(during), "api_run_idle": _stats(idle), "explain": _stats(explains)}


def measure(run_dir: Path, code: Path, requests: int, budget: float, threads: int, explain_s: float, log: Path,
            page: bool = True) -> dict:
    """Every figure of the module docstring for one server (``code``) on ``run_dir``."""
    t_end = time.perf_counter() + budget
    out: dict = {"run": run_dir.name, "cut_short": []}
    cases = _cases(run_dir, requests)
    png = _upload(run_dir)
    server = Server(run_dir, code, threads, log)
    try:
        out["start_s"] = round(server.start_s, 2)
        if page:
            status, dt, body = _get(server.base, "/")
            out["page_first_s"] = round(dt, 2)
            if status == 0:
                out.setdefault("timed_out", []).append("/")
            out["page_mb"] = round(len(body) / 1e6, 2)
            out["page_warm"] = _stats([_get(server.base, "/")[1] for _ in range(3)])
        out["endpoints"] = {}
        for name, urls in cases.items():
            cold, warm = [], []
            for url in urls:
                if time.perf_counter() > t_end:
                    out["cut_short"].append(name)
                    break
                status, dt, body = _get(server.base, url)
                if status not in (0, 200):
                    raise RuntimeError(f"{url}: {status} {body[:200]!r}")
                if status == 0:
                    out.setdefault("timed_out", []).append(url)
                cold.append(dt)
            for url in urls[:len(cold)]:
                if time.perf_counter() > t_end:
                    break
                warm.append(_get(server.base, url)[1])
            out["endpoints"][name] = {"cold": _stats(cold), "warm": _stats(warm)}
        out.update(_during_explain(server.base, png, min(explain_s, max(t_end - time.perf_counter(), 3.0))))
    finally:
        server.stop()
    return out


def _table(res: dict) -> str:
    lines = [f"start {res['start_s']} s" + (f"; GET / first call {res['page_first_s']} s ({res['page_mb']} MB), "
                                           f"then p50 {res['page_warm']['p50_ms']} ms" if "page_warm" in res else ""),
             "| endpoint | cold p50 / p95 / max (ms) | warm p50 / p95 / max (ms) | n |", "|---|---|---|---|"]
    for name, v in res["endpoints"].items():
        c, w = v["cold"], v["warm"]
        fmt = lambda s: f"{s['p50_ms']} / {s['p95_ms']} / {s['max_ms']}" if s["n"] else "-"  # noqa: E731
        lines.append(f"| {name} | {fmt(c)} | {fmt(w)} | {c['n']} |")
    if res.get("timed_out"):
        lines.append(f"timed out after {TIMEOUT} s (counted as {TIMEOUT} s): {', '.join(res['timed_out'])}")
    d, i, e = res["api_run_during_explain"], res["api_run_idle"], res["explain"]
    lines.append(f"GET /api/run during explains: p50 {d.get('p50_ms')} / p95 {d.get('p95_ms')} / max {d.get('max_ms')} ms "
                 f"(n {d['n']}); without: p50 {i.get('p50_ms')} / p95 {i.get('p95_ms')} / max {i.get('max_ms')} ms "
                 f"(n {i['n']}); explain p50 {e.get('p50_ms')} ms (n {e['n']})")
    if res["cut_short"]:
        lines.append(f"cut short by the budget: {', '.join(res['cut_short'])}")
    return "\n".join(lines)


def small_run(root: Path) -> Path:
    """The tiny run of the small mode (made from names, so that a server process reopens it)."""
    from gig_fast.testing.runs import named_tiny_run

    return named_tiny_run(root)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", type=Path, help="a finished run's output folder")
    where.add_argument("--small", action="store_true", help="make a tiny run in a temporary folder and use it")
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose server is measured (default: this one)")
    p.add_argument("--requests", type=int, default=20, help="distinct URLs per endpoint (default 20)")
    p.add_argument("--budget", type=float, default=600, help="seconds for the whole measurement (default 600)")
    p.add_argument("--explain-seconds", type=float, default=20, help="seconds of the during-explain phase (default 20)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    p.add_argument("--no-page", action="store_true", help="leave out GET / (a server that draws it for minutes)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gig_bench_serve_") as tmp:
        run_dir = small_run(Path(tmp)) if args.small else args.run.resolve()
        res = measure(run_dir, args.code.resolve(), args.requests, args.budget, args.threads, args.explain_seconds,
                      Path(tmp) / "server.log", page=not args.no_page)
    res["code"] = "this checkout" if args.code.resolve() == ROOT else args.code.name
    print(_table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


def bench_serve_small_mode():
    """The smoke run of the suite: the small mode end to end (every endpoint answers 200, figures made)."""
    res = main(["--small", "--requests", "2", "--budget", "120", "--explain-seconds", "3", "--threads", "1"])
    assert res["endpoints"]["pair view"]["cold"]["n"] >= 1 and res["api_run_during_explain"]["n"] > 0


if __name__ == "__main__":
    main()
