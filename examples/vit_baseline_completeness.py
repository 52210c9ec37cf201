"""Measure how the choice of β (the "no concept" point of a ViT's residual stream) affects GIG's completeness.

Runs the demo ViT pipeline twice on the same images: β = the concept dataset's mean token (the default)
and β = 0 (the LayerNorm-invariant origin); the concepts are extracted with the same centring in each run.
GIG runs the demo's rule (8 Gauss–Legendre nodes) with the default completeness bar of 1 %: an image whose
8-node result misses it is integrated again by the adaptive rule. Per layer transition it prints the
share of images the 8-node rule left over the bar (refined), the nodes used on average, the final
relative gap |Σ GIG − (T(X(1)) − T(X(0)))| / |T(X(1)) − T(X(0))| (median, worst), the rel-L2 of the
decomposition of layer a, and the GIG stage's time::

    PYTHONPATH=. python examples/vit_baseline_completeness.py --out vit_beta [--concept-images 2000 --explain-images 200]

The README's table ("Vision transformers and timm models") comes from this script.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gig_fast.models import TransformerAdapter, default_demo_vit_path, load_demo_vit, train_demo_vit
from gig_fast.pipeline import Pipeline, demo_config


def run(baseline: str, out: Path, concept_images: int, explain_images: int, steps: int) -> dict:
    weights = default_demo_vit_path()
    train_demo_vit(weights)  # cached after the first time
    cfg = demo_config("vit", weights=str(weights), out=str(out / baseline), concept_images=concept_images,
                      explain_images=explain_images, per_class=explain_images // 10, gig_steps=steps,
                      progress=False)
    pipe = Pipeline(cfg, model=load_demo_vit(weights))
    pipe.adapter = TransformerAdapter(pipe.model, baseline=baseline)
    pipe.adapter.record(pipe.load_images(pipe.concept_ids[:1])[0])  # the patch grid, for the pictures
    pipe.run()
    return json.loads((out / baseline / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="vit_beta")
    ap.add_argument("--concept-images", type=int, default=2000)
    ap.add_argument("--explain-images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    results = {b: run(b, out, args.concept_images, args.explain_images, args.steps) for b in ("mean", "zero")}
    print("| transition | β | refined (8 nodes missed 1 %) | mean nodes | median / worst rel. gap | rel-L2 of a |")
    print("|---|---|---|---|---|---|")
    for name in results["mean"]["completeness"]:
        for b, m in results.items():
            c = m["completeness"][name]
            a = name.split("->")[0]
            print(f"| {name} | {b} | {100 * c['refined_share']:.1f} % | {c['mean_steps']:.1f} | "
                  f"{c['median_rel']:.1e} / {c['max_rel']:.1e} | {m['layers'][a]['rel_l2']:.3f} |")
    print("GIG stage (s):", {b: m["timings_s"]["stage4_gig"] for b, m in results.items()})
    (out / "summary.json").write_text(json.dumps({b: {"completeness": m["completeness"], "layers": m["layers"],
                                                       "timings_s": m["timings_s"]} for b, m in results.items()},
                                                 indent=1))


if __name__ == "__main__":
    main()
