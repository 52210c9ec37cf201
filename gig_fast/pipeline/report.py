"""``metrics.json`` (per-layer rel-L2, l0 ratio, completeness deltas, timings) and the static run summary
(a section of ``report.html``, whose interactive part is :mod:`gig_fast.explorer`)."""
from __future__ import annotations

import html

import numpy as np

from .stages import _trans_dir, transitions

__all__ = ["collect_metrics", "render_report", "summary_html"]


def collect_metrics(pipe, timings: dict) -> dict:
    """Per-layer decomposition quality (paper Table 1 form) and per-transition completeness deltas."""
    layers = {}
    sums: dict[str, np.ndarray] = {}
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            for p in pipe.points:
                for key in ("rel_l2_sum", "l0_sum", "count", "not_converged"):
                    k = f"{p}|{key}"
                    if k in z.files:
                        sums[k] = sums.get(k, 0) + z[k].astype(np.float64)
    for p in pipe.points:
        n = float(sums[f"{p}|count"].sum())
        layers[p] = {"rel_l2": float(sums[f"{p}|rel_l2_sum"].sum() / n), "l0_ratio": float(sums[f"{p}|l0_sum"].sum() / n),
                     "pfvs": int(n), "not_converged": int(np.sum(sums.get(f"{p}|not_converged", 0)))}
    deltas = {}
    for a, b in transitions(pipe):
        chunks = [np.load(f, allow_pickle=False) for f in sorted(_trans_dir(pipe, a, b).glob("chunk_*.npz"))]
        ad = np.abs(np.concatenate([z["delta"].ravel() for z in chunks]))
        rd = np.concatenate([z["rel_delta"].ravel() for z in chunks])
        # quadrature nodes per image and whether the refinement ran (absent in runs made before it existed)
        steps = np.concatenate([z["steps"] for z in chunks if "refined" in z.files] or [np.zeros(0, np.int64)])
        refined = np.concatenate([z["refined"] for z in chunks if "refined" in z.files] or [np.zeros(0, bool)])
        # max_rel is set by targets whose span |T(X(1)) − T(X(0))| is ~0 (a concept the image barely
        # has): p99_rel and max_rel_to_median_span tell those apart from a real quadrature error
        span = ad / np.maximum(rd, 1e-30)
        deltas[f"{a}->{b}"] = {"max_abs": float(ad.max()), "median_abs": float(np.median(ad)),
                               "max_rel": float(rd.max()), "median_rel": float(np.median(rd)),
                               "p99_rel": float(np.quantile(rd, 0.99)),
                               "share_rel_within_1pct": float(np.mean(rd <= 0.01)),  # the paper's bar
                               "max_rel_to_median_span": float(ad.max() / max(float(np.median(span)), 1e-30)),
                               "n": int(ad.size)}
        if steps.size:
            deltas[f"{a}->{b}"].update(refined_share=float(np.mean(refined)),
                                       mean_steps=float(steps.mean()), max_steps=int(steps.max()))
    all_d = np.array([v["max_abs"] for v in deltas.values()])
    all_r = np.concatenate([[v["max_rel"], v["median_rel"]] for v in deltas.values()]) if deltas else np.array([])
    n_explained, n_labelled, n_correct = 0, 0, 0  # streamed over the chunks: no per-image table in memory
    for path in sorted((pipe.work / "codes").glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            n_explained += len(z["image"])
            labelled = z["label"] >= 0  # offline photos carry no label
            n_labelled += int(labelled.sum())
            n_correct += int((z["label"] == z["prediction"])[labelled].sum())
    acc = n_correct / n_labelled if n_labelled else None
    return {"run_key": pipe.config.key(), "layers": layers, "completeness": deltas,
            "completeness_max_abs": float(all_d.max()) if all_d.size else None,
            "completeness_median_of_max": float(np.median(all_d)) if all_d.size else None,
            "completeness_max_rel": float(all_r[0::2].max()) if all_r.size else None,
            "completeness_median_rel": float(np.median(all_r[1::2])) if all_r.size else None,
            "explained_images": n_explained, "concept_images": int(len(pipe.concept_ids)),
            "accuracy_on_explained": acc, "skipped_images": pipe.skipped, "timings_s": timings}


def summary_html(graph: dict, metrics: dict) -> str:
    """The static run summary (HTML fragment): decomposition quality per layer (paper Table 1 form),
    completeness deltas, top concepts per class, shared concepts at the last layer, timings.
    Every string from the data is escaped."""
    e = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    names = {c["id"]: c["name"] for c in graph["classes"]}
    acc = "n/a (unlabelled)" if metrics["accuracy_on_explained"] is None else f"{metrics['accuracy_on_explained']:.3f}"
    rows = "".join(f"<tr><td>{e(p)}</td><td>{m['rel_l2']:.4f}</td><td>{m['l0_ratio']:.4f}</td><td>{m['pfvs']}</td></tr>"
                   for p, m in metrics["layers"].items())
    share = lambda v, key: f"{100 * v[key]:.2f}%" if key in v else "n/a"  # noqa: E731 (older runs lack them)
    drows = "".join(f"<tr><td>{e(k)}</td><td>{v['max_abs']:.3g}</td><td>{v['median_abs']:.3g}</td>"
                    f"<td>{v['max_rel']:.3g}</td><td>{v['median_rel']:.3g}</td>"
                    f"<td>{share(v, 'share_rel_within_1pct')}</td><td>{share(v, 'refined_share')}</td></tr>"
                    for k, v in metrics["completeness"].items())
    classes = []
    for cid, g in graph["class_graphs"].items():
        items = "".join(f"<li>{e(layer)}: " + ", ".join(f"#{n['concept']} ({n['normalized']:.2f})" for n in nodes) + "</li>"
                        for layer, nodes in list(g["nodes"].items())[:4])
        classes.append(f"<h3>{e(names[int(cid)])}</h3><ul>{items}</ul>")
    pairs = []
    for key, pg in graph["pair_graphs"].items():
        c1, c2 = pg["classes"]
        last = pg["shared"].get(graph["layers"][-2]["name"], [])
        if last:
            pairs.append(f"<tr><td>{e(names[c1])} / {e(names[c2])}</td><td>"
                         + ", ".join(f"#{s['concept']} ({s['score']:.2f})" for s in last) + "</td></tr>")
    timing = "".join(f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>" for k, v in metrics["timings_s"].items())
    return f"""<h2>gig_fast run {e(graph['run_key'])}</h2>
<p>Model {e(graph['model']['arch'])} on {e(graph['model']['dataset'])}; {metrics['explained_images']} explained images,
{metrics['concept_images']} concept images; accuracy on explained images {acc}.</p>
<h2>Decomposition per layer</h2><table><tr><th>layer</th><th>rel-L2</th><th>l0 ratio</th><th>PFVs</th></tr>{rows}</table>
<h2>Completeness deltas (|Σ GIG − ΔT|)</h2><table><tr><th>transition</th><th>max</th><th>median</th><th>max rel.</th><th>median rel.</th><th>within 1%</th><th>images refined</th></tr>{drows}</table>
<h2>Top concepts per class (upper layers)</h2>{''.join(classes)}
<h2>Shared concepts at the last layer</h2><table><tr><th>classes</th><th>concepts (score)</th></tr>{''.join(pairs)}</table>
<h2>Timings (s)</h2><table>{timing}</table>
"""


def render_report(graph: dict, metrics: dict) -> str:
    """A static HTML summary without the interactive graph (see :func:`gig_fast.explorer.render_explorer`
    for ``report.html``); every string from the data is escaped."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>gig_fast report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}td,th{{padding:2px 8px;text-align:left}}</style></head><body>
{summary_html(graph, metrics)}</body></html>
"""
