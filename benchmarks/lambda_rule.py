"""The λ rule measured on the demo: rel-L2, l0 ratio and active concepts per PFV against λ_rel.

    OMP_NUM_THREADS=2 python benchmarks/lambda_rule.py --run gig_demo --out docs/lambda_rule

Reads a finished run (``gig-fast demo``: its concepts, K = 8·C per layer, and its model) and codes the
PFVs of every position of ``--images`` explained images (balanced over classes) at each analysed layer
with :func:`gig_fast.ops.sparse_code` for every ``λ_rel`` of ``--lams`` (``λ = λ_rel · ‖V(x − β)‖_∞``
per PFV, docs/design.md §1.4). Per (layer, λ_rel): mean rel-L2 ``‖x − x̃‖/‖x‖`` (the pipeline's metric),
l0 ratio (share of zero coefficients), mean / median / 95th-percentile active concepts per PFV, the
share of rows stopped at the iteration cap, mean and largest coordinate-descent sweeps, and seconds.

Then the K dependence (paper Table 3): on ``--k-layers`` it clusters the run's stage-1 PFVs into
``k_factor·C`` concepts for each of ``--k-factors`` (bisecting spherical k-means, "fast" mode, the
pipeline's seed) and reports rel-L2 and l0 for each λ_rel of ``--k-lams``: with a λ tied to λ_max
the error barely moves with K at a large λ_rel, and moves as in the paper at a small one.

Writes ``<out>.json`` (every row), ``<out>.md`` (the tables) and ``<out>.png`` (rel-L2 and active
concepts against λ_rel per layer; needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gig_fast.concepts import bisecting_spherical_kmeans  # noqa: E402
from gig_fast.ops import sparse_code, sparse_reconstruct  # noqa: E402
from gig_fast.ops.sparse_code import SparseCodeConvergenceWarning  # noqa: E402
from gig_fast.pipeline import Pipeline  # noqa: E402
from gig_fast.pipeline.config import PipelineConfig  # noqa: E402
from gig_fast import Run  # noqa: E402
from gig_fast.pipeline.stages import load_concepts, load_pfvs  # noqa: E402
from gig_fast.pipeline.files import load_json  # noqa: E402

LAMS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def _pipeline(run: Path) -> Pipeline:
    work = Run.open(run).work
    cfg = PipelineConfig(**load_json(work / "config.json")["config"]).replace(out=str(run), progress=False)
    pipe = Pipeline(cfg)
    pipe.work = work  # the folder found, even if this code version would key the config differently
    return pipe


def _pfvs(pipe: Pipeline, n_images: int) -> dict[str, torch.Tensor]:
    """Every position's PFV ``[n·P, C]`` per layer, of ``n_images`` explained images taken round-robin over classes."""
    ids = pipe.explain_ids
    by_class = [ids[pipe.labels[ids] == c] for c in range(pipe.num_classes)]
    chosen = [int(g[i]) for i in range(max(len(g) for g in by_class)) for g in by_class if i < len(g)][:n_images]
    x, _ = pipe.load_images(np.array(sorted(chosen)))
    with torch.no_grad():
        rec = pipe.adapter.record(x, keep="preact")
    return {p: rec.preact(p).permute(0, 2, 3, 1).reshape(-1, rec.preact(p).shape[1]) for p in pipe.points}


def measure(X: torch.Tensor, V: torch.Tensor, beta: torch.Tensor, lam: float, **kw) -> dict:
    """Code ``X [N, C]`` on ``V [K, C]`` at ``λ_rel = lam``: the quality and convergence figures of one row."""
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SparseCodeConvergenceWarning)  # counted in at_cap instead
        idx, val, info = sparse_code(X, V, bias=beta, lam=lam, return_info=True, **kw)
    seconds = time.perf_counter() - t0
    recon = sparse_reconstruct(idx, val, V, beta)
    rel = ((X - recon).norm(dim=1) / X.norm(dim=1).clamp_min(1e-12)).double()
    active = (idx >= 0).sum(1).double()
    return {"lam_rel": lam, "K": V.shape[0], "pfvs": X.shape[0], "rel_l2": float(rel.mean()),
            "l0_ratio": float(1.0 - (active / V.shape[0]).mean()), "active_mean": float(active.mean()),
            "active_median": float(active.median()), "active_p95": float(torch.quantile(active, 0.95)),
            "at_cap_share": info.n_unconverged / max(X.shape[0], 1), "at_cap": info.n_unconverged,
            "sweeps_mean": float(info.iterations.double().mean()), "sweeps_max": int(info.iterations.max()),
            "max_rel_gap": info.max_rel_gap, "seconds": round(seconds, 2)}


def lambda_sweep(pipe: Pipeline, X: dict, lams) -> list[dict]:
    rows = []
    for point in pipe.points:
        c = load_concepts(pipe, point)
        for lam in lams:
            row = {"layer": point, "C": int(c["V"].shape[1]), **measure(X[point], c["V"], c["beta"], lam)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def k_sweep(pipe: Pipeline, X: dict, layers, factors, lams) -> list[dict]:
    rows = []
    for point in layers:
        c = load_concepts(pipe, point)
        fit = torch.from_numpy(load_pfvs(pipe, point)["pfv"])
        C = fit.shape[1]
        for f in factors:
            K = max(1, int(round(f * C)))
            if K == c["V"].shape[0]:
                V = c["V"]
            else:
                V, _ = bisecting_spherical_kmeans(fit, K, beta=c["beta"], seed=pipe.config.seed, mode="fast")
            for lam in lams:
                row = {"layer": point, "C": C, "k_factor": f, **measure(X[point], V, c["beta"], lam)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _markdown(sweep: list[dict], ks: list[dict], meta: dict) -> str:
    lams = sorted({r["lam_rel"] for r in sweep})
    layers = list(dict.fromkeys(r["layer"] for r in sweep))
    at = {(r["layer"], r["lam_rel"]): r for r in sweep}
    head = "| layer | C | K | " + " | ".join(f"λ_rel={lam:g}" for lam in lams) + " |"
    rule = "|---|---|---|" + "---|" * len(lams)
    out = [f"Measured by `benchmarks/lambda_rule.py` on {meta['run']} ({meta['images']} explained images, every "
           f"position; {meta['when']}, torch {torch.__version__}, {torch.get_num_threads()} threads).", ""]
    for title, key, fmt in (("rel-L2 (mean ‖x − x̃‖/‖x‖)", "rel_l2", "{:.3f}"), ("l0 ratio", "l0_ratio", "{:.4f}"),
                            ("active concepts per PFV (mean / median / p95)", None, None),
                            ("rows stopped at the iteration cap (share)", "at_cap_share", "{:.4f}"),
                            ("coordinate-descent sweeps (mean / max)", "sweeps", None)):
        out += [f"### {title}", "", head, rule]
        for layer in layers:
            cells = []
            for lam in lams:
                r = at[(layer, lam)]
                if key is None:
                    cells.append(f"{r['active_mean']:.1f} / {r['active_median']:.0f} / {r['active_p95']:.0f}")
                elif key == "sweeps":
                    cells.append(f"{r['sweeps_mean']:.0f} / {r['sweeps_max']}")
                else:
                    cells.append(fmt.format(r[key]))
            r0 = at[(layer, lams[0])]
            out.append(f"| {layer} | {r0['C']} | {r0['K']} | " + " | ".join(cells) + " |")
        out.append("")
    if ks:
        out += ["### rel-L2 / l0 ratio against K (paper Table 3)", "",
                "| layer | λ_rel | " + " | ".join(f"K={f:g}·C" for f in sorted({r['k_factor'] for r in ks})) + " |",
                "|---|---|" + "---|" * len({r["k_factor"] for r in ks})]
        for layer in dict.fromkeys(r["layer"] for r in ks):
            for lam in sorted({r["lam_rel"] for r in ks}):
                cells = [f"{r['rel_l2']:.3f} / {r['l0_ratio']:.4f}" for r in sorted(
                    (r for r in ks if r["layer"] == layer and r["lam_rel"] == lam), key=lambda r: r["k_factor"])]
                out.append(f"| {layer} | {lam:g} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _plot(sweep: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    layers = list(dict.fromkeys(r["layer"] for r in sweep))
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        rows = sorted((r for r in sweep if r["layer"] == layer), key=lambda r: r["lam_rel"])
        lam = [r["lam_rel"] for r in rows]
        kw = dict(color=cmap(i / max(len(layers) - 1, 1)), marker="o", ms=3, lw=1, label=layer)
        axes[0].plot(lam, [r["rel_l2"] for r in rows], **kw)
        axes[1].plot(lam, [r["active_mean"] for r in rows], **kw)
        axes[2].plot(lam, [1 - r["l0_ratio"] for r in rows], **kw)
    axes[0].set_ylabel("rel-L2")
    axes[1].set_ylabel("active concepts per PFV (mean)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("1 − l0 ratio (share of non-zero coefficients)")
    axes[2].set_yscale("log")
    axes[2].axhline(0.01, color="grey", ls="--", lw=1)
    for ax in axes:
        ax.set_xlabel("λ_rel (λ = λ_rel·‖V(x − β)‖∞)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Lasso codes of the demo's PFVs on their K = 8·C concepts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="gig_demo", help="a finished run's output folder")
    ap.add_argument("--images", type=int, default=100, help="explained images whose PFVs are coded")
    ap.add_argument("--lams", default=",".join(map(str, LAMS)))
    ap.add_argument("--k-layers", default="layer1.2,layer2.3,layer3.5,layer4.2")
    ap.add_argument("--k-factors", default="0.5,1,2,4,8")
    ap.add_argument("--k-lams", default="0.05,0.2")
    ap.add_argument("--out", default="docs/lambda_rule")
    args = ap.parse_args(argv)
    pipe = _pipeline(Path(args.run))
    X = _pfvs(pipe, args.images)
    sweep = lambda_sweep(pipe, X, [float(v) for v in args.lams.split(",")])
    k_layers = [p for p in args.k_layers.split(",") if p]
    ks = k_sweep(pipe, X, k_layers, [float(v) for v in args.k_factors.split(",")],
                 [float(v) for v in args.k_lams.split(",")]) if k_layers else []
    meta = {"run": f"`{args.run}` (run key {pipe.config.key()})", "images": args.images,
            "when": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "lambda": sweep, "k": ks}, indent=1))
    out.with_suffix(".md").write_text(_markdown(sweep, ks, meta))
    _plot(sweep, out.with_suffix(".png"))
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
