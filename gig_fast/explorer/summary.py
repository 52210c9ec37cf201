"""The static run summary of ``report.html``: an HTML fragment of the metrics tables."""
from __future__ import annotations

import html

__all__ = ["summary_html"]


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
