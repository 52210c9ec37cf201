"""The PNG plots of a validation run (``validation_plots/``): C-Deletion/Insertion curves, baseline fits,
sparsity–error curves, inter-layer deletion/insertion, the K ablation, noise robustness and the
appendix figures (attack, PFV decomposition, trajectory). Written by :func:`write_plots` with matplotlib's
Agg backend; :mod:`.report` writes the tables and the HTML around them."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

__all__ = ["write_plots", "NAMES", "ORDER", "COLORS"]

NAMES = {"dictionary_learning": "DictionaryLearning", "sae": "SAE", "ours": "Ours"}
ORDER = ("dictionary_learning", "sae", "ours")
COLORS = {"dictionary_learning": "tab:orange", "sae": "tab:red", "ours": "tab:blue"}


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


def _image(uri: str | None) -> np.ndarray | None:
    if not uri:
        return None
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


class _Saver:
    def __init__(self, plt, folder: Path):
        self.plt, self.folder, self.files = plt, folder, []

    def __call__(self, fig, name):
        path = self.folder / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
        self.plt.close(fig)
        tmp.replace(path)
        self.files.append(str(path))


def _plot_c_deletion(plt, np_, doc, save):
    cd = doc["c_deletion"]
    layers = doc["layers"]["layers"]
    for score, name, ylab, xlab in (
            ("accuracy", "c_deletion_accuracy_curves.png", "accuracy", "concepts edited (of all K; symlog)"),
            ("probability", "c_deletion_probability_curves.png", "class probability", "fraction of the top concepts")):
        fig, grid = _grid(plt, len(layers))
        for j, p in enumerate(layers):
            for i, mode in enumerate(("deletion", "insertion")):
                ax = grid(j, i)
                for m in ORDER:
                    if m in cd and p in cd[m]:
                        r = cd[m][p][score][mode]
                        x = np_.asarray(r["x"]) * (cd[m][p]["K"] if score == "accuracy" else 1)
                        ax.plot(x, r["curve"], color=COLORS[m], label=NAMES[m])
                if score == "accuracy":
                    ax.set_xscale("symlog", linthresh=1)
                ax.set_title(f"{p} {mode}", fontsize=8)
                ax.tick_params(labelsize=6)
        grid(0, 0).legend(fontsize=7)
        grid(0, 0).set_ylabel(ylab, fontsize=7)
        grid(0, 1).set_xlabel(xlab, fontsize=7)
        save(fig, name)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for row, score in enumerate(("accuracy", "probability")):
        for ax, (lab, get) in zip(axes[row], (("Deletion AUC (↓)", lambda r: r[score]["deletion"]["auc"]),
                                               ("Insertion AUC (↑)", lambda r: r[score]["insertion"]["auc"]),
                                               ("Ins − Del (↑)", lambda r: r[score]["auc_difference"]))):
            for m in ORDER:
                if m in cd:
                    xs = [k for k, p in enumerate(layers) if p in cd[m]]
                    ax.plot(xs, [get(cd[m][layers[k]]) for k in xs], "o-", color=COLORS[m], label=NAMES[m])
            ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7)
            ax.set_title(f"{lab} — {score}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.subplots_adjust(hspace=0.6)
    save(fig, "fig4_auc_by_layer.png")


def _plot_fits(plt, doc, save):
    import matplotlib.ticker

    sae = doc["c_deletion"].get("sae", {})
    curves = [(p, r["fit"]["loss_curve"]) for p, r in sae.items() if r.get("fit", {}).get("loss_curve")]
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(3.3 * len(curves), 3), squeeze=False)
    for ax, (p, c) in zip(axes[0], curves):
        ax.plot(c["step"], c["loss"], label="loss (Eq. 11, full λ)")
        ax.plot(c["step"], c["mse"], label="squared error")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=7)
    save(fig, "sae_loss_curves.png")


def _plot_sparsity(plt, doc, save):
    import matplotlib
    import matplotlib.ticker

    sp = doc["sparsity"]
    layers = sorted({p for m in sp.values() for p in m})
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.2), squeeze=False)
    for ax, p in zip(axes[0], layers):
        for m in ORDER:
            if p in sp.get(m, {}):
                pts = sorted(sp[m][p], key=lambda r: r["active"])
                ax.plot([r["active"] for r in pts], [r["rel_l2"] for r in pts], "o-", color=COLORS[m], label=NAMES[m])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (1, 2, 4, 8, 16, 32) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("active concepts per PFV", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("rel-L2")
    axes[0, 0].legend(fontsize=7)
    save(fig, "sparsity_error.png")


def _plot_inter(plt, np_, res, prefix, save):
    tr = [(t, r) for t, r in res.items() if t != "images" and r.get("pairs")]
    if not tr:
        return
    n = len(tr)
    fig, grid = _grid(plt, n, cols=min(n, 5))
    for j, (t, r) in enumerate(tr):
        for i, mode in enumerate(("deletion", "insertion")):
            ax = grid(j, i)
            for name, col in (("gig", "tab:blue"), ("random", "tab:green")):
                y = r[name][mode]["curve"]
                ax.plot(np_.linspace(0, 1, len(y)), y, color=col, label=name.upper() if name == "gig" else name)
            ax.set_title(f"{t.replace('->', '→')} {mode[:3]}.", fontsize=7)
            ax.tick_params(labelsize=6)
    grid(0, 0).legend(fontsize=6)
    grid(0, 0).set_ylabel("projection score", fontsize=7)
    grid(0, 1).set_xlabel("fraction of active source concepts edited", fontsize=7)
    save(fig, f"{prefix}_curves.png")
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * n), 3.5))
    x = np_.arange(n)
    ax.bar(x - 0.2, [r["deletion_auc_difference"] for _, r in tr], 0.4, label="deletion: random − GIG")
    ax.bar(x + 0.2, [r["insertion_auc_difference"] for _, r in tr], 0.4, label="insertion: GIG − random")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, [t.replace("->", "→") for t, _ in tr], rotation=70, fontsize=7)
    ax.set_ylabel("AUC difference")
    ax.legend(fontsize=7)
    save(fig, f"{prefix}_auc_difference.png")


def _plot_attack(plt, np_, doc, save):
    attacks = doc["attack"]["attacks"]
    if not attacks:
        return
    fig, axes = plt.subplots(len(attacks), 4, figsize=(14, 3 * len(attacks)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 4]})
    for row, a in zip(axes, attacks):
        for ax, key, title in zip(row[:3], ("clean", "attacked", "difference"),
                                  (f"#{a['image']} {a['source_name']}", f"attacked → {a['target_name']}", "δ")):
            img = _image(a.get("pictures", {}).get(key))
            if img is not None:
                ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        pts = list(a["layers"])
        x = np_.arange(len(pts))
        ax = row[3]
        for off, k, lab, col in ((-0.3, "target_share_attacked", "target class, attacked", "tab:red"),
                                 (-0.1, "target_share_clean", "target class, clean", "mistyrose"),
                                 (0.1, "source_share_attacked", "source class, attacked", "tab:blue"),
                                 (0.3, "source_share_clean", "source class, clean", "lightsteelblue")):
            ax.bar(x + off, [a["layers"][p][k] for p in pts], 0.2, label=lab, color=col)
        ax.set_xticks(x, pts, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of the image graph's top concepts", fontsize=7)
        ax.legend(fontsize=6, ncol=2)
    save(fig, "appJ_attack.png")


def _plot_decomposition(plt, doc, save):
    cards = list(doc["decomposition"].values())
    if not cards:
        return
    top = max(len(c["terms"]) for c in cards)
    per = max((len(t["samples"]) for c in cards for t in c["terms"]), default=1) or 1
    fig = plt.figure(figsize=(1.2 + 1.1 * top * min(per, 3), 1.6 * len(cards)))
    gs = fig.add_gridspec(len(cards), 1 + top * min(per, 3), wspace=0.08, hspace=0.5)
    for i, c in enumerate(cards):
        ax = fig.add_subplot(gs[i, 0])
        img = _image(c.get("crop"))
        if img is not None:
            ax.imshow(img)
        ax.set_title(f"{c['layer']}\n#{c['image']} rel-L2 {c['rel_l2']:.2f}", fontsize=6)
        ax.axis("off")
        for j, t in enumerate(c["terms"]):
            for k, s in enumerate(t["samples"][:min(per, 3)]):
                ax = fig.add_subplot(gs[i, 1 + j * min(per, 3) + k])
                img = _image(s.get("crop"))
                if img is not None:
                    ax.imshow(img)
                if k == 0:
                    ax.set_title(f"{t['coefficient']:+.2f} × #{t['concept']}", fontsize=6)
                ax.axis("off")
    save(fig, "appE_decomposition.png")


def _plot_trajectory(plt, doc, save):
    rows = [(a, k) for a in doc["trajectory"]["anchors"] for k in a["per_k"]]
    if not rows:
        return
    n = max(len(k["crops"]) for _, k in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.0 * n + 1, 1.2 * len(rows)), squeeze=False)
    for (a, k), row in zip(rows, axes):
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < len(k["crops"]):
                img = _image(k["crops"][j])
                if img is not None:
                    ax.imshow(img)
                ax.set_title(f"{k['path_cosine'][j]:.2f}", fontsize=6)
        row[0].text(-0.15, 0.5, f"{a['class_name']}\nK={k['K']}\nd={k['cosine_distance']:.2f}", fontsize=6,
                    transform=row[0].transAxes, ha="right", va="center")
    save(fig, "appI_trajectory.png")


def write_plots(doc: dict, folder: Path) -> list[str]:
    """Every plot ``doc`` (a validation result) has data for, as PNGs in ``folder``: their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    save = _Saver(plt, folder)
    if "c_deletion" in doc:
        _plot_c_deletion(plt, np, doc, save)
        _plot_fits(plt, doc, save)
    if doc.get("sparsity"):
        _plot_sparsity(plt, doc, save)
    if "inter_layer" in doc:
        _plot_inter(plt, np, doc["inter_layer"], "fig5_inter_layer", save)
    if "inter_layer_paper" in doc:
        _plot_inter(plt, np, doc["inter_layer_paper"], "fig5_paper_transitions", save)
    if doc.get("ablation"):
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
    if "attack" in doc:
        _plot_attack(plt, np, doc, save)
    if doc.get("decomposition"):
        _plot_decomposition(plt, doc, save)
    if doc.get("trajectory", {}).get("anchors"):
        _plot_trajectory(plt, doc, save)
    return save.files
