"""Validation outputs: ``validation.json``, Markdown tables in the paper's layout, PNG plots, an HTML section."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from ..pipeline.store import atomic_write_text, save_json

__all__ = ["write_outputs", "tables_markdown"]

_NAMES = {"dictionary_learning": "DictionaryLearning", "sae": "SAE", "ours": "Ours"}
_ORDER = ("dictionary_learning", "sae", "ours")
_COLORS = {"dictionary_learning": "tab:orange", "sae": "tab:red", "ours": "tab:blue"}


def _f(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _table1(doc) -> str:
    cd = doc["c_deletion"]
    layers = doc["layers"]["layers"]
    rows = []
    for m in _ORDER:
        if m in cd:
            for key, lab in (("rel_l2", "Rel-l2 (↓)"), ("l0_ratio", "l0 ratio (↑)")):
                rows.append([_NAMES[m], lab] + [_f(cd[m][p]["quality"][key]) if p in cd[m] else "–" for p in layers])
    return _md_table(["Method", "Metric"] + layers, rows)


def _table2(doc) -> str:
    cd = doc["c_deletion"]
    layers = doc["layers"]["layers"]
    rows = []
    for m in _ORDER:
        if m in cd:
            for lab, get in (("Deletion AUC (↓)", lambda r: r["deletion"]["auc"]),
                             ("Insertion AUC (↑)", lambda r: r["insertion"]["auc"]),
                             ("Ins − Del (↑)", lambda r: r["auc_difference"])):
                rows.append([_NAMES[m], lab] + [_f(get(cd[m][p])) if p in cd[m] else "–" for p in layers])
    return _md_table(["Method", "Metric"] + layers, rows)


def _table3(doc) -> str:
    ab = doc["ablation"]
    layers = list(ab)
    factors = list(next(iter(ab.values()))) if ab else []
    rows = []
    for f in factors:
        rl = [_f(ab[p][f].get("rel_l2")) for p in layers]
        l0 = [_f(ab[p][f].get("l0_ratio")) for p in layers]
        rows.append([f"{float(f):g} × n_c"] + rl + l0)
    return _md_table(["k"] + [f"Rel-l2 {p}" for p in layers] + [f"l0 ratio {p}" for p in layers], rows)


def _table_inter(doc) -> str:
    rows = []
    for t, r in doc["inter_layer"].items():
        if t == "images":
            continue
        if not r.get("pairs"):
            rows.append([t, "–", "–", "–", "–", "–", "–", "0"])
            continue
        rows.append([t, _f(r["gig"]["deletion"]["auc"]), _f(r["random"]["deletion"]["auc"]),
                     _f(r["deletion_auc_difference"]), _f(r["gig"]["insertion"]["auc"]),
                     _f(r["random"]["insertion"]["auc"]), _f(r["insertion_auc_difference"]), str(r["pairs"])])
    return _md_table(["Transition", "Del AUC GIG", "Del AUC random", "Δ del (random − GIG, ↑)", "Ins AUC GIG",
                      "Ins AUC random", "Δ ins (GIG − random, ↑)", "(image, target) pairs"], rows)


def _table_noise(doc) -> str:
    rows = []
    for p, r in doc["noise"].items():
        if p in ("sigma", "images"):
            continue
        rows.append([p, _f(r["image_overlap"]), _f(r["class_overlap"]), _f(r["chance"]),
                     _f(r["accuracy_clean"]), _f(r["accuracy_noisy"])])
    return _md_table(["Layer", f"top-{doc['options']['noise_top']} kept per image", "per class (Eq. 7)",
                      "chance k/K", "accuracy clean", "accuracy noisy"], rows)


def tables_markdown(doc: dict) -> str:
    """Every table of ``validation.json`` as Markdown, in the paper's layout (methods × metric rows, layers as columns)."""
    o = doc["options"]
    parts = [f"# GIG validation (run {doc['run_key']}, validation {doc['validation_key']})", "",
             f"Score of the C-Deletion/C-Insertion curves: {doc['score']}.", ""]
    if "c_deletion" in doc:
        n = len(doc["c_deletion"]["images"])
        parts += [f"## Table 1 — reconstruction (all PFVs of {n} validation images per layer)", "", _table1(doc), "",
                  f"## Table 2 — C-Deletion / C-Insertion AUC (top {o['curve_concepts']} concepts by Eq. 7, "
                  f"{o['curve_steps']} steps, {n} images)", "", _table2(doc), ""]
    if "ablation" in doc:
        parts += ["## Table 3 — number of concepts K (same PFVs as Table 1)", "", _table3(doc), ""]
    if "inter_layer" in doc:
        parts += [f"## Inter-layer deletion / insertion (Fig. 5; {len(doc['inter_layer']['images'])} images × top "
                  f"{o['inter_targets']} target concepts, {o['inter_steps']} steps)", "", _table_inter(doc), ""]
    if "noise" in doc:
        parts += [f"## Noise robustness (App. J; Gaussian σ = {doc['noise']['sigma'] * 255:.0f}/255, "
                  f"{len(doc['noise']['images'])} images)", "", _table_noise(doc), ""]
    parts += ["Compute time of the units (s, summed over the runs that computed them): "
              + ", ".join(f"{k} {v}" for k, v in doc.get("compute_s", {}).items()),
              "Wall time of this run (s; finished units are loaded, not recomputed): "
              + ", ".join(f"{k} {v}" for k, v in doc["timings_s"].items()), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
def _grid(plt, n: int, cols: int = 4):
    """A figure of ``n`` panels × (deletion, insertion), ``cols`` panels per row: ``grid(j, mode) → axes``."""
    rows = (n + cols - 1) // cols
    c = min(n, cols)
    fig, axes = plt.subplots(2 * rows, c, figsize=(2.8 * c, 2.3 * 2 * rows), squeeze=False)
    for k in range(n, rows * c):
        for i in range(2):
            axes[2 * (k // c) + i, k % c].axis("off")
    fig.subplots_adjust(hspace=0.55, wspace=0.3)
    return fig, lambda j, i: axes[2 * (j // c) + i, j % c]


def _plots(doc: dict, folder: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    files = []

    def save(fig, name):
        path = folder / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        files.append(str(path))

    if "c_deletion" in doc:
        cd = doc["c_deletion"]
        layers = doc["layers"]["layers"]
        fig, grid = _grid(plt, len(layers))
        for j, p in enumerate(layers):
            for i, mode in enumerate(("deletion", "insertion")):
                ax = grid(j, i)
                for m in _ORDER:
                    if m in cd and p in cd[m]:
                        y = cd[m][p][mode]["curve"]
                        ax.plot(np.linspace(0, 1, len(y)), y, color=_COLORS[m], label=_NAMES[m])
                ax.set_title(f"{p} {mode}", fontsize=8)
                ax.tick_params(labelsize=6)
        grid(0, 0).legend(fontsize=7)
        grid(0, 0).set_ylabel("class probability", fontsize=7)
        grid(0, 1).set_xlabel("fraction of the top concepts edited", fontsize=7)
        save(fig, "c_deletion_insertion_curves.png")
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
        for ax, (lab, get) in zip(axes, (("Deletion AUC (↓)", lambda r: r["deletion"]["auc"]),
                                        ("Insertion AUC (↑)", lambda r: r["insertion"]["auc"]),
                                        ("Ins − Del (↑)", lambda r: r["auc_difference"]))):
            for m in _ORDER:
                if m in cd:
                    xs = [k for k, p in enumerate(layers) if p in cd[m]]
                    ax.plot(xs, [get(cd[m][layers[k]]) for k in xs], "o-", color=_COLORS[m], label=_NAMES[m])
            ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7)
            ax.set_title(lab)
        axes[0].legend(fontsize=7)
        save(fig, "fig4_auc_by_layer.png")
    if "inter_layer" in doc:
        tr = [(t, r) for t, r in doc["inter_layer"].items() if t != "images" and r.get("pairs")]
        if tr:
            n = len(tr)
            fig, grid = _grid(plt, n)
            for j, (t, r) in enumerate(tr):
                for i, mode in enumerate(("deletion", "insertion")):
                    ax = grid(j, i)
                    for name, col in (("gig", "tab:blue"), ("random", "tab:green")):
                        y = r[name][mode]["curve"]
                        ax.plot(np.linspace(0, 1, len(y)), y, color=col, label=name.upper() if name == "gig" else name)
                    ax.set_title(f"{t.replace('->', '→')} {mode[:3]}.", fontsize=7)
                    ax.tick_params(labelsize=6)
            grid(0, 0).legend(fontsize=6)
            grid(0, 0).set_ylabel("projection score", fontsize=7)
            grid(0, 1).set_xlabel("fraction of active source concepts edited", fontsize=7)
            save(fig, "fig5_inter_layer_curves.png")
            fig, ax = plt.subplots(figsize=(max(6, 0.5 * n), 3.5))
            x = np.arange(n)
            ax.bar(x - 0.2, [r["deletion_auc_difference"] for _, r in tr], 0.4, label="deletion: random − GIG")
            ax.bar(x + 0.2, [r["insertion_auc_difference"] for _, r in tr], 0.4, label="insertion: GIG − random")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xticks(x, [t.replace("->", "→") for t, _ in tr], rotation=70, fontsize=7)
            ax.set_ylabel("AUC difference")
            ax.legend(fontsize=7)
            save(fig, "fig5_auc_difference.png")
    if "ablation" in doc and doc["ablation"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for p, r in doc["ablation"].items():
            fs = [f for f in r if "rel_l2" in r[f]]
            for ax, key in zip(axes, ("rel_l2", "l0_ratio")):
                ax.plot([float(f) for f in fs], [r[f][key] for f in fs], "o-", label=p)
        for ax, lab in zip(axes, ("Rel-l2 (↓)", "l0 ratio (↑)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("K / n_channels")
            ax.set_title(lab)
        axes[0].legend(fontsize=7)
        save(fig, "table3_k_ablation.png")
    if "noise" in doc:
        pts = [p for p in doc["noise"] if p not in ("sigma", "images")]
        if pts:
            fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(pts)), 3.5))
            x = np.arange(len(pts))
            ax.bar(x - 0.2, [doc["noise"][p]["image_overlap"] for p in pts], 0.4, label="per image")
            ax.bar(x + 0.2, [doc["noise"][p]["class_overlap"] for p in pts], 0.4, label="per class")
            ax.plot(x, [doc["noise"][p]["chance"] for p in pts], "k_", markersize=14, label="chance k/K")
            ax.set_xticks(x, pts, rotation=60, fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"top-{doc['options']['noise_top']} concepts kept")
            ax.legend(fontsize=7)
            save(fig, "noise_robustness.png")
    return files


def _md_to_html(md: str) -> str:
    out, table = [], []

    def flush():
        if table:
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in table if not r.startswith("|---")]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h3>{html.escape(line[3:])}</h3>")
        elif line.startswith("# "):
            out.append(f"<h2>{html.escape(line[2:])}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def write_outputs(out: str | Path, doc: dict) -> dict:
    """Write ``validation.json``, ``validation.md``, ``validation_plots/*.png``, ``validation_section.html``
    into ``out`` and insert the section into ``report.html`` (replacing an earlier one). Returns the paths."""
    out = Path(out)
    plots = _plots(doc, out / "validation_plots")
    doc["plots"] = [str(Path(p).relative_to(out)) for p in plots]
    md = tables_markdown(doc) + "\nPlots: " + ", ".join(doc["plots"]) + "\n"
    save_json(out / "validation.json", doc)
    atomic_write_text(out / "validation.md", md)
    # embedded: report.html's content policy loads images from data URIs only (no files, no network)
    imgs = "".join(f'<img alt="{html.escape(Path(p).stem)}" style="max-width:100%" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode("ascii")}">' for p in plots)
    section = f'<section id="validation">{_md_to_html(md)}{imgs}</section>'
    atomic_write_text(out / "validation_section.html", section)
    report = out / "report.html"
    if report.exists():
        text = re.sub(r'<section id="validation">.*?</section>', "", report.read_text(encoding="utf-8"), flags=re.S)
        atomic_write_text(report, text.replace("</body>", section + "</body>"))
    return {"json": str(out / "validation.json"), "markdown": str(out / "validation.md"), "plots": plots}
