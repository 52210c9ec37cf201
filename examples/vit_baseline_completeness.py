"""Measure how the choice of β (the "no concept" point of a ViT's residual stream) affects GIG's completeness.

Runs the demo ViT pipeline twice on the same images with the fixed quadrature rule (no adaptive
refinement, so the raw quadrature error shows): β = the concept dataset's mean token (the default) and
β = 0 (the LayerNorm-invariant origin). The concepts are extracted with the same centring in each run.
Prints, per layer transition, the relative completeness gap |Σ GIG − (T(X(1)) − T(X(0)))| / |T(X(1)) − T(X(0))|
(median, 99th percentile, share within 1 %) and the decomposition's rel-L2::

    python examples/vit_baseline_completeness.py --out /tmp/vit_beta [--concept-images 2000 --explain-images 200]

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
                      gig_tolerance=None, progress=False)
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
    print(f"| transition | β | median rel. gap | p99 rel. gap | within 1 % | rel-L2 of layer a |")
    print("|---|---|---|---|---|---|")
    for name in results["mean"]["completeness"]:
        for b, m in results.items():
            c = m["completeness"][name]
            a = name.split("->")[0]
            print(f"| {name} | {b} | {c['median_rel']:.2e} | {c['p99_rel']:.2e} | {100 * c['share_rel_within_1pct']:.1f} % "
                  f"| {m['layers'][a]['rel_l2']:.3f} |")
    (out / "summary.json").write_text(json.dumps({b: {"completeness": m["completeness"], "layers": m["layers"],
                                                       "timings_s": m["timings_s"]} for b, m in results.items()},
                                                 indent=1))


if __name__ == "__main__":
    main()
