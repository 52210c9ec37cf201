"""Validation outputs: ``validation.json``, Markdown tables in the paper's layout, PNG plots, an HTML section
(also put into ``report.html`` with the PFV decomposition cards of App. E).

What the figures and the explorer draw — the ``crop``/``crops``/``pictures`` fields of the appendix
experiments and the attacked images' graphs (``graph``) — goes to ``validation_figures.json``;
``validation.json`` keeps the numbers.
"""
from __future__ import annotations

import base64
import copy
import html
from pathlib import Path

import numpy as np

from ..explorer import insert_decompositions, insert_section
from ..pipeline.files import atomic_write_text, save_json
from ..run_folder import (REPORT_FILE, VALIDATION_FIGURES_FILE, VALIDATION_JSON, VALIDATION_MD, VALIDATION_PLOTS_DIR,
                          VALIDATION_SECTION_FILE)
from .faithfulness import faithfulness_section
from .metrics import MATCHED_ACTIVE, interpolate_at
from .plots import NAMES as _NAMES, ORDER as _ORDER, write_plots

__all__ = ["write_outputs", "tables_markdown", "split_pictures", "MATCHED_ACTIVE"]

_PICTURE_KEYS = {"crop", "crops", "pictures", "graph"}


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def split_pictures(doc: dict) -> tuple[dict, dict]:
    """``(numbers, figures)``: ``doc`` without its picture and graph fields, and the appendix experiments
    (``decomposition``, ``trajectory``, ``attack``) with them."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in _PICTURE_KEYS}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    pictures = {k: doc[k] for k in ("decomposition", "trajectory", "attack") if k in doc}
    return strip(doc), copy.deepcopy(pictures)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _table1(doc) -> str:
    cd = doc["c_deletion"]
    layers = doc["layers"]["layers"]
    rows = []
    for m in _ORDER:
        if m in cd:
            for key, lab in (("rel_l2", "Rel-l2 (↓)"), ("l0_ratio", "l0 ratio (↑)"), ("active", "active per PFV")):
                rows.append([_NAMES[m], lab] + [_f(cd[m][p]["quality"].get(key)) if p in cd[m] else "–" for p in layers])
    return _md_table(["Method", "Metric"] + layers, rows)


def _table2(doc, score: str) -> str:
    cd = doc["c_deletion"]
    layers = doc["layers"]["layers"]
    rows = []
    for m in _ORDER:
        if m in cd:
            for lab, get in (("Deletion AUC (↓)", lambda r: r[score]["deletion"]["auc"]),
                             ("Insertion AUC (↑)", lambda r: r[score]["insertion"]["auc"]),
                             ("Ins − Del (↑)", lambda r: r[score]["auc_difference"])):
                rows.append([_NAMES[m], lab] + [_f(get(cd[m][p])) if p in cd[m] else "–" for p in layers])
            if score == "accuracy":
                rows.append([_NAMES[m], "accuracy of the reconstruction"]
                            + [_f(cd[m][p]["reconstruction_accuracy"]) if p in cd[m] else "–" for p in layers])
    return _md_table(["Method", "Metric"] + layers, rows)


def _table_fits(doc) -> str:
    rows = []
    cd = doc["c_deletion"]
    for m in ("dictionary_learning", "sae"):
        for p, r in cd.get(m, {}).items():
            fit = r.get("fit", {})
            if m == "sae":
                last = fit.get("loss_curve", {}).get("loss", [None])[-1]
                detail = (f"λ {fit.get('lambda')}, {fit.get('steps')} steps, final loss {_f(last)}, "
                          f"relative loss change between the last two tenths of the constant-rate phase "
                          f"{_f(fit.get('converged_rel_change'))}, dead units {fit.get('dead_units')}")
            else:
                obj = fit.get("objective") or [None]
                detail = (f"α {fit.get('alpha', 0):.4g}, {fit.get('iterations')} of ≤ {fit.get('max_iterations')} "
                          f"iterations ({fit.get('fit_algorithm')} fit, lasso_lars codes, start: {fit.get('init')}), "
                          f"objective per PFV {' → '.join(f'{v:.4g}' for v in obj)}")
            rows.append([_NAMES[m], p, str(fit.get("K")), str(fit.get("train_vectors")), detail,
                         str(fit.get("fit_seconds"))])
    return _md_table(["Method", "Layer", "K", "training PFVs", "fit", "fit s"], rows)


def _sparsity_rows(sp: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    layers = sorted({p for m in sp.values() for p in m}, key=lambda p: list(sp.get("ours", {})).index(p)
                    if p in sp.get("ours", {}) else 99)
    levels, matched = [], []
    for p in layers:
        for m in _ORDER:
            if p not in sp.get(m, {}):
                continue
            pts = sp[m][p]
            lev = "λ" if m == "sae" else "λ_rel"
            levels.append([p, _NAMES[m], ", ".join(f"{lev} {r['level']:g}: {r['active']:.2f} / {r['rel_l2']:.3f}"
                                                   for r in pts)])
            act = [r["active"] for r in pts]
            rel = [r["rel_l2"] for r in pts]
            matched.append([p, _NAMES[m]] + [_f(v) for v in interpolate_at(MATCHED_ACTIVE, act, rel)])
    return layers, levels, matched


def _table_inter(res: dict) -> str:
    rows = []
    for t, r in res.items():
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


def _table_noise(doc) -> str:
    rows = []
    for p, r in doc["noise"].items():
        if p in ("sigma", "images"):
            continue
        rows.append([p, _f(r["image_overlap"]), _f(r["class_overlap"]), _f(r["chance"]),
                     _f(r["accuracy_clean"]), _f(r["accuracy_noisy"])])
    return _md_table(["Layer", f"top-{doc['options']['noise_top']} kept per image", "per class (Eq. 7)",
                      "chance k/K", "accuracy clean", "accuracy noisy"], rows)


def _attack_md(doc) -> list[str]:
    at = doc["attack"]
    parts = [f"Targeted L∞ PGD, ε = {at['eps']:g} (pixel units), step {at['step_size']:g}, ≤ {at['steps']} steps; "
             "target = the image's least likely class. Per layer: share of the image graph's top concepts that are "
             "among the target / source class's top concepts (the graph's class top sets), attacked vs clean.", ""]
    if not at["attacks"]:
        return parts + ["No correctly classified image to attack.", ""]
    for a in at["attacks"]:
        parts += [f"**Image #{a['image']}** ({a['source_name']} → {a['target_name']}): "
                  f"{'reached' if a['success'] else 'did NOT reach'} the target in {a['steps']} steps, "
                  f"|δ|∞ = {a['linf_pixels']:.3f}, p(target) {a['clean_target_probability']:.3f} → "
                  f"{a['target_probability']:.3f}, predicted {a['prediction']}.", ""]
        rows = []
        for p, r in a["layers"].items():
            tq = ", ".join(f"#{n['concept']}" for n in r["attacked"] if n["in_target"]) or "–"
            rows.append([p, _f(r["target_share_attacked"]), _f(r["target_share_clean"]),
                         _f(r["source_share_attacked"]), _f(r["source_share_clean"]), _f(r["shared_with_clean"]), tq])
        parts += [_md_table(["Layer", "target-class share (attacked)", "(clean)", "source-class share (attacked)",
                             "(clean)", "attacked ∩ clean", "target-class concepts in the attacked graph"], rows), ""]
        origins = []
        for key, srcs in a["origins"].items():
            desc = "; ".join(f"#{s['concept']} ({s['layer']}, GIG {s['gig']:.3g}"
                             + (", source-class" if s["in_source"] else "") + (", target-class" if s["in_target"] else "")
                             + (", in the clean graph" if s["in_clean"] else "") + ")" for s in srcs)
            origins.append(f"* {key.replace('|', ' #')} ← {desc or 'no edges'}")
        if origins:
            parts += ["Where the target-class concepts come from (their strongest sources one layer down):", ""]
            parts += origins + [""]
    return parts


def _decomposition_md(doc) -> list[str]:
    rows = []
    for p, d in doc["decomposition"].items():
        terms = "; ".join(f"{t['coefficient']:+.2f} × #{t['concept']} ({100 * t['share']:.0f} %)" for t in d["terms"])
        rows.append([p, f"#{d['image']} ({d['class_name']})", f"({d['yx'][0]}, {d['yx'][1]})", str(d["active"]),
                     _f(d["rel_l2"]), terms])
    return [_md_table(["Layer", "image", "position", "active", "rel-L2", "top concepts: coefficient × concept "
                       "(share of Σ|u|‖v‖)"], rows), ""]


def _trajectory_md(doc) -> list[str]:
    tr = doc["trajectory"]
    rows = []
    for a in tr["anchors"]:
        for k in a["per_k"]:
            rows.append([f"{a['class_name']} (#{a['concept']} at K = {a.get('concept_K')})", str(k["K"]),
                         f"#{k['concept']}", str(k["size"]), _f(k["cosine_distance"]),
                         " → ".join(f"{c:.2f}" for c in k["path_cosine"])])
    return [_md_table(["anchor (class, concept)", "K", "cluster", "members", "cosine distance centre–farthest",
                       "cos(centre, sample) along the path"], rows), ""]


def tables_markdown(doc: dict) -> str:
    """Every table of ``validation.json`` as Markdown, in the paper's layout (methods × metric rows, layers as columns)."""
    o = doc["options"]
    parts = [f"# GIG validation (run {doc['run_key']}, validation {doc['validation_key']})", ""]
    if "c_deletion" in doc:
        cd = doc["c_deletion"]
        n, h = len(cd["images"]), len(cd.get("importance_images", []))
        parts += [f"## Table 1 — reconstruction (all PFVs of {n} evaluated images per layer)", "", _table1(doc), "",
                  f"## Table 2 — C-Deletion / C-Insertion (paper §4.2.1): accuracy over {n} evaluated images as "
                  f"concepts are deleted / inserted in Eq. 7 order until none / all remain", "",
                  f"Order of the concepts: Eq. 7 importance (GIG to the class probability) summed over {h} other "
                  f"(held-out) explained images of each class. x = fraction of all K concepts (one at a time over "
                  f"the first {o['curve_concepts']}, then {o['accuracy_steps']} uniform steps).", "",
                  _table2(doc, "accuracy"), "",
                  f"## Table 2b — the class probability over the top {o['curve_concepts']} concepts "
                  f"({o['curve_steps']} steps; same held-out order), the earlier score of this suite", "",
                  _table2(doc, "probability"), ""]
        if any(m in cd for m in ("dictionary_learning", "sae")):
            parts += ["## Baselines — how they were fitted (SAE loss curves: validation_plots/sae_loss_curves.png)",
                      "", _table_fits(doc), ""]
    if doc.get("sparsity"):
        layers, levels, matched = _sparsity_rows(doc["sparsity"])
        parts += ["## Sparsity–error curves (rel-L2 against active concepts per PFV; same PFVs as Table 1)", "",
                  "Measured points (level: active per PFV / rel-L2):", "",
                  _md_table(["Layer", "Method", "points"], levels), "",
                  "Rel-L2 at matched sparsity (read off each curve, linear in log(active); – outside its range):", "",
                  _md_table(["Layer", "Method"] + [f"{a} active" for a in MATCHED_ACTIVE], matched), ""]
    if "ablation" in doc:
        parts += ["## Table 3 — number of concepts K (same PFVs as Table 1)", "", _table3(doc), ""]
    if "inter_layer" in doc:
        parts += [f"## Inter-layer deletion / insertion, consecutive blocks ({len(doc['inter_layer']['images'])} "
                  f"images × top {o['inter_targets']} target concepts, {o['inter_steps']} steps)", "",
                  _table_inter(doc["inter_layer"]), ""]
    if len(doc.get("inter_layer_paper", {})) > 1:
        parts += ["## Inter-layer deletion / insertion, the paper's Fig. 5 transitions (several blocks each)", "",
                  _table_inter(doc["inter_layer_paper"]), ""]
    if "noise" in doc:
        parts += [f"## Noise robustness (App. J; Gaussian σ = {doc['noise']['sigma'] * 255:.0f}/255, "
                  f"{len(doc['noise']['images'])} images)", "", _table_noise(doc), ""]
    if "attack" in doc:
        parts += ["## Targeted adversarial attack (App. J, Fig. 12)", ""] + _attack_md(doc)
    if doc.get("decomposition"):
        parts += ["## PFV decomposition (App. E, Figs. 7–9; figure validation_plots/appE_decomposition.png, "
                  "cards in report.html)", ""] + _decomposition_md(doc)
    if doc.get("trajectory", {}).get("anchors"):
        parts += [f"## Concept trajectory (App. I, Fig. 11) at {doc['trajectory']['layer']}", ""] + _trajectory_md(doc)
    if doc.get("faithfulness", {}).get("transitions"):
        parts += faithfulness_section(doc["faithfulness"])
    parts += ["Compute time of the units (s, summed over the runs that computed them): "
              + ", ".join(f"{k} {v}" for k, v in doc.get("compute_s", {}).items()),
              "Wall time of this run (s; finished units are loaded, not recomputed): "
              + ", ".join(f"{k} {v}" for k, v in doc["timings_s"].items()), ""]
    return "\n".join(parts)


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
    """Write ``validation.json`` (numbers), ``validation_figures.json`` (pictures, graphs), ``validation.md``,
    ``validation_plots/*.png`` and ``validation_section.html`` into ``out``; put the section and the PFV
    decomposition cards into ``report.html`` (replacing earlier ones). Returns the numbers' dict."""
    out = Path(out)
    plots = write_plots(doc, out / VALIDATION_PLOTS_DIR)
    numbers, pictures = split_pictures(doc)
    numbers["plots"] = [str(Path(p).relative_to(out)) for p in plots]
    md = tables_markdown(numbers) + "\nPlots: " + ", ".join(numbers["plots"]) + "\n"
    save_json(out / VALIDATION_JSON, numbers)
    save_json(out / VALIDATION_FIGURES_FILE, pictures, compact=True)
    atomic_write_text(out / VALIDATION_MD, md)
    # embedded: report.html's content policy loads images from data URIs only (no files, no network)
    imgs = "".join(f'<img alt="{html.escape(Path(p).stem)}" style="max-width:100%" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode("ascii")}">' for p in plots)
    section = f'<section id="validation">{_md_to_html(md)}{imgs}</section>'
    atomic_write_text(out / VALIDATION_SECTION_FILE, section)
    report = out / REPORT_FILE
    if report.exists():
        page = insert_section(report.read_text(encoding="utf-8"), section, "validation")
        page = insert_decompositions(page, list(pictures.get("decomposition", {}).values()))
        atomic_write_text(report, page)
    return numbers
