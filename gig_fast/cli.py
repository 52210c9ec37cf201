"""``gig-fast``: run the pipeline, the demo, train the demo network, or explain one image.

    gig-fast demo [--arch vit] [--out DIR]         # the shipped demo ResNet (or the demo ViT), full run on Fashion-MNIST
    gig-fast run --config FILE [--out DIR] ...     # YAML/JSON config; flags override it
    gig-fast train-demo [--arch vit] [--epochs N] [--force]   # retrain the demo ResNet (the shipped weights' recipe) or train the ViT
    gig-fast explain --image FILE --run DIR        # one image's graph on a finished run's concepts
    gig-fast intervene --run DIR --image FILE --edit layer3.2:117:0   # remove a concept, see what changes
    gig-fast show --run DIR --classes A B          # shared concepts of two classes in a run's graph.json
    gig-fast report --run DIR [--html FILE]        # rewrite a finished run's interactive report.html
    gig-fast serve --run DIR [--port 8000]         # local HTTP JSON API over the run + its explorer page
    gig-fast validate --config FILE [--vset K=V]   # run/resume the pipeline, then the validation suite
    gig-fast validate --demo [--out DIR]           # the same on the demo configuration

Common flags: ``--device cpu|cuda``, ``--backend torch|cpp|triton|cuda|batched`` (forces the op backend).

Several processes: ``torchrun --nproc_per_node=N -m gig_fast.cli run --config FILE`` (gloo on the CPU,
NCCL with ``--device cuda``, one GPU per rank); rank 0 prints and writes the shared files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's, cpu)")
    p.add_argument("--backend", default=None, help="force the op backend: torch, cpp, triton, cuda or batched")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gig-fast", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the pipeline from a config file")
    run.add_argument("--config", required=False, help="YAML or JSON file of PipelineConfig options")
    run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="override any option (VALUE parsed as YAML), e.g. --set k_factor=4 gig_steps=8")
    run.add_argument("--layers", default=None, help="comma-separated analysed points (default: all)")
    run.add_argument("--seed", type=int, default=None)
    _common(run)
    demo = sub.add_parser("demo", help="the README demo: demo net on Fashion-MNIST, every block")
    demo.add_argument("--arch", choices=("resnet", "vit"), default="resnet",
                      help="the demo ResNet (16 blocks, SRD) or the demo ViT (4 blocks, gradient × input)")
    demo.add_argument("--weights", default=None,
                      help="demo weights file (default: the ResNet's shipped in the package; the ViT's cache, "
                           "trained if missing)")
    demo.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override demo options")
    _common(demo)
    tr = sub.add_parser("train-demo", help="train a demo network on Fashion-MNIST (ResNet defaults: the shipped "
                                           "weights' schedule)")
    tr.add_argument("--arch", choices=("resnet", "vit"), default="resnet", help="the demo ResNet or the demo ViT")
    tr.add_argument("--epochs", type=int, default=None, help="default: the shipped weights' (DEMO_TRAINING); ViT: 3")
    tr.add_argument("--seed", type=int, default=None, help="default: the shipped weights' (0)")
    tr.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    tr.add_argument("--weights", default=None, help="where to write the weights (default: the cache)")
    tr.add_argument("--force", action="store_true", help="retrain even if the file exists")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    ex = sub.add_parser("explain", help="one image's concept graph on a finished run's concepts")
    ex.add_argument("--image", required=True, help="image file, or photo:NAME for a photo that ships offline (photo:chelsea)")
    ex.add_argument("--run", default=None, help="output folder of a finished run (default: --out or gig_demo)")
    ex.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    ex.add_argument("--json", default=None, help="write the graph here (default: stdout)")
    _common(ex)
    iv = sub.add_parser("intervene", help="edit concepts inside the model for one image: class probabilities "
                                          "and later concepts before and after")
    src = iv.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file, or photo:NAME for a photo that ships offline")
    src.add_argument("--dataset-image", type=int, help="an image of the run's data set, by index")
    iv.add_argument("--run", default=None, help="output folder of a finished run (default: --out or gig_demo)")
    iv.add_argument("--edit", action="append", default=[], metavar="LAYER:CONCEPT:FACTOR",
                    help="scale a concept where active (FACTOR 0 removes it); repeat for several edits")
    iv.add_argument("--add", action="append", default=[], metavar="LAYER:CONCEPT:V1,V2,…[@P1,P2,…]",
                    help="add the concept with coefficients V at positions P (row-major; default every position)")
    iv.add_argument("--targets", nargs="*", default=None, metavar="LAYER[:CONCEPT]",
                    help="later concepts to report (default: every concept of every later layer)")
    iv.add_argument("--top", type=int, default=5, help="classes and changed concepts printed")
    iv.add_argument("--json", default=None, help="write the whole result here as JSON")
    _common(iv)
    sh = sub.add_parser("show", help="print the shared concepts of two classes from a run's graph.json")
    sh.add_argument("--run", default="gig_demo")
    sh.add_argument("--classes", nargs=2, required=True, help="two class names or ids")
    rp = sub.add_parser("report", help="rewrite a finished run's report.html (the interactive graph explorer)")
    rp.add_argument("--run", default="gig_demo", help="output folder of a finished run")
    rp.add_argument("--html", default=None, help="where to write the page (default: RUN/report.html)")
    rp.add_argument("--images", type=int, default=None,
                    help="explained images embedded for the image view (default: the config's report_images)")
    sv = sub.add_parser("serve", help="a local HTTP JSON API over a finished run, and its explorer page (gig_fast[serve])")
    sv.add_argument("--run", default="gig_demo", help="output folder of a finished run")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    xp = sub.add_parser("export", help="write an image, class or pair graph as attribution-graph JSON "
                                       "(Neuronpedia's and circuit-tracer's graph viewers; docs/export.md)")
    xp.add_argument("--run", default="gig_demo", help="output folder of a finished run")
    xp.add_argument("--format", default="neuronpedia", choices=["neuronpedia"])
    which = xp.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", type=int, help="an explained image (dataset index)")
    which.add_argument("--class", dest="class_", help="a class name or id")
    which.add_argument("--pair", nargs=2, help="two class names or ids")
    xp.add_argument("--out", default=None, help="the JSON file (default: <slug>.json in the current folder)")
    xp.add_argument("--no-probabilities", action="store_true",
                    help="write p=nan on the logit nodes instead of running the model on the graph's images")
    xp.add_argument("--device", default="cpu")
    sv.add_argument("--device", default="cpu", help="where uploaded images are explained")
    va = sub.add_parser("validate", help="run/resume the pipeline, then the validation suite (paper §4.2)")
    va.add_argument("--config", default=None,
                    help="pipeline config (YAML/JSON); an optional 'validation:' mapping in it holds validation options")
    va.add_argument("--demo", action="store_true", help="use the demo configuration (the shipped demo net)")
    va.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override pipeline options")
    va.add_argument("--vset", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override validation options (gig_fast.validation.ValidationOptions, docs/validation.md), "
                         "e.g. images=20 experiments=c_deletion,inter_layer sae_steps=1000 (experiments: "
                         "c_deletion, sparsity, inter_layer, ablation, noise, attack, decomposition, trajectory, faithfulness)")
    _common(va)
    return ap


def _overrides(pairs) -> dict:
    import yaml

    out = {}
    for item in pairs:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return out


VIT_EPOCHS = 3  # the demo ViT's training: ≤ 3 minutes of one CPU core (README)


def cmd_train_demo(args) -> int:
    from .models import default_demo_path, default_demo_vit_path, train_demo, train_demo_vit

    t0 = time.perf_counter()
    vit = args.arch == "vit"
    path = Path(args.weights) if args.weights else (default_demo_vit_path() if vit else default_demo_path())
    kwargs = {k: v for k, v in {"epochs": args.epochs, "seed": args.seed, "train_limit": args.train_limit}.items()
              if v is not None}
    if vit:
        _, info = train_demo_vit(path, force=args.force, progress=not args.no_progress,
                                 **{"epochs": VIT_EPOCHS, **kwargs})
    else:
        _, info = train_demo(path, force=args.force, progress=not args.no_progress,
                             log=lambda line: print(line, file=sys.stderr, flush=True), **kwargs)
    print(json.dumps({**{k: v for k, v in info.items() if k != "curve"}, "wall_s": round(time.perf_counter() - t0, 1)},
                     indent=1))
    print(f"train-demo: weights in {path} (record: {path}.json)", file=sys.stderr)  # stdout: the JSON only
    return 0


def _run_pipeline(cfg, label: str) -> Path:
    from .pipeline import Pipeline
    from .pipeline import distributed as dist
    from .report import publish

    t0 = time.perf_counter()
    pipe = Pipeline(cfg)
    out = pipe.run()  # the stage files, graph.json and metrics.json
    if dist.is_main():  # one report per job, not one per torchrun rank
        publish(pipe)  # report.html and concept_samples/
        print(f"{label}: wrote {out}/graph.json, metrics.json, report.html in {time.perf_counter() - t0:.1f} s")
    return out


def _summary(out: Path) -> None:
    from .pipeline.files import load_json
    from .run_folder import METRICS_FILE

    m = load_json(out / METRICS_FILE)
    print(f"{'layer':10s} {'rel-L2':>8s} {'l0 ratio':>9s} {'active/PFV':>10s} {'K':>5s} {'PFVs/concept (median)':>22s} "
          f"{'at cap':>7s}")
    for name, v in m["layers"].items():
        K = v.get("concepts")
        active = f"{(1 - v['l0_ratio']) * K:10.2f}" if K else f"{'':10s}"
        print(f"{name:10s} {v['rel_l2']:8.4f} {v['l0_ratio']:9.4f} {active} {K or '':>5} "
              f"{v.get('concept_size_median', ''):>22} {v.get('not_converged', ''):>7}")
    print(f"completeness |delta|: max {m['completeness_max_abs']:.3g}; relative: max {m['completeness_max_rel']:.3g}, "
          f"median {m['completeness_median_rel']:.3g}")
    shares = {k: v["share_rel_within_1pct"] for k, v in m["completeness"].items() if "share_rel_within_1pct" in v}
    if shares:
        worst = min(shares, key=shares.get)
        print(f"(image, target) pairs with |delta| <= 1% of the span: {100 * min(shares.values()):.2f}% at worst ({worst})")
    print("timings (s):", json.dumps(m["timings_s"]))


def cmd_run(args) -> int:
    from .pipeline import load_config

    over = _overrides(args.set)
    over.update({k: v for k, v in {"device": args.device, "backend": args.backend, "out": args.out,
                                    "layers": args.layers, "seed": args.seed}.items() if v is not None})
    if args.no_progress:
        over["progress"] = False
    cfg = load_config(args.config, **over)
    out = _run_pipeline(cfg, "run")
    from .pipeline import distributed as dist
    if dist.is_main():
        _summary(out)
    return 0


def _demo_weights(arch: str, weights: str | None, progress: bool = True) -> tuple[str | None, dict]:
    """The demo's weights and their training record: the ResNet's file, or None for the ones shipped in
    the package; the ViT's file (default: the cache), trained first if missing."""
    from .models import default_demo_vit_path, load_demo, shipped_demo_info, train_demo_vit

    if arch == "vit":
        path = Path(weights) if weights else default_demo_vit_path()
        _, info = train_demo_vit(path, epochs=VIT_EPOCHS, progress=progress)  # loads the cached file if there
        return str(path), info
    if weights is None:
        return None, shipped_demo_info()
    load_demo(weights)  # a missing or unreadable file fails here, before any pipeline work
    meta = Path(str(weights) + ".json")
    return str(weights), (json.loads(meta.read_text()) if meta.exists() else {})


def cmd_demo(args) -> int:
    from .pipeline import demo_config

    t0 = time.perf_counter()
    weights, info = _demo_weights(args.arch, args.weights, progress=not args.no_progress)
    if "test_accuracy" in info:
        print(f"demo network ({args.arch}): test accuracy {info['test_accuracy']:.4f} ({info.get('epochs')} epochs, "
              f"{'shipped weights' if weights is None else weights})")
    over = _overrides(args.set)
    over.update({k: v for k, v in {"device": args.device, "backend": args.backend, "out": args.out}.items()
                 if v is not None})
    if args.no_progress:
        over["progress"] = False
    cfg = demo_config(args.arch, weights=weights, **over)
    out = _run_pipeline(cfg, "demo")
    _summary(out)
    _show(out, "Sneaker", "Ankle boot")
    _show(out, "Shirt", "T-shirt/top")
    print(f"demo wall time {time.perf_counter() - t0:.1f} s")
    return 0


def _show(out: Path, c1: str, c2: str) -> None:
    from .api import Run

    run = Run.open(out)
    pg = run.pair_graph(c1, c2)
    a, b = pg.classes
    empty = [repr(run.classes[c].name) for c in (a, b) if run.classes[c].n_images == 0]
    if empty:
        raise ValueError(f"no shared concepts of {run.classes[a].name!r} and {run.classes[b].name!r}: "
                         f"{' and '.join(empty)} {'has' if len(empty) == 1 else 'have'} no explained images in this run")
    print(f"shared concepts of {run.classes[a].name} / {run.classes[b].name} "
          "(layer: concept (min normalised importance)):")
    for layer in run.points[::-1]:
        items = [s for s in pg.shared if s.layer == layer]
        if items:
            print(f"  {layer}: " + ", ".join(f"#{s.concept} ({s.score:.2f})" for s in items))


def cmd_show(args) -> int:
    _show(Path(args.run), *args.classes)
    return 0


def cmd_explain(args) -> int:
    from .api import Run
    from .ops import use_backend
    import contextlib

    run = Run.open(args.run or args.out or "gig_demo", device=args.device or "cpu")
    image = run.load_image(args.image)
    with use_backend(args.backend) if args.backend else contextlib.nullcontext():
        result = run.explain(image, target=args.target).to_dict()
    text = json.dumps(result, indent=1)
    if args.json:
        from .pipeline.files import atomic_write_text
        atomic_write_text(args.json, text)
        print(f"explain: {result['class_name']} (prediction {result['prediction']}) → {args.json}")
    else:
        print(text)
    return 0


def _edit_args(edits: list[str], adds: list[str]) -> list[tuple]:
    """``--edit LAYER:Q:FACTOR`` and ``--add LAYER:Q:V1,V2[@P1,P2]`` as edit tuples (checked by the run)."""
    out = []
    for text, is_add in [(e, False) for e in edits] + [(a, True) for a in adds]:
        parts = text.rsplit(":", 2)
        if len(parts) != 3:
            raise ValueError(f"an edit is LAYER:CONCEPT:{'V1,V2[@P1,P2]' if is_add else 'FACTOR'}, got {text!r}")
        layer, q, value = parts
        try:
            if not is_add:
                out.append((layer, int(q), float(value)))
                continue
            values, _, positions = value.partition("@")
            vec = [float(v) for v in values.split(",")]
            out.append((layer, int(q), vec) + ((tuple(int(p) for p in positions.split(",")),) if positions else ()))
        except ValueError:
            raise ValueError(f"cannot read the edit {text!r}: CONCEPT and positions are integers, values numbers") from None
    return out


def cmd_intervene(args) -> int:
    from .api import Run

    run = Run.open(args.run or args.out or "gig_demo", device=args.device or "cpu")
    if args.image is not None:
        image = run.load_image(args.image)
    else:
        image = run.load_dataset_images([args.dataset_image])[0][0]
    targets = None if args.targets is None else [t if ":" not in t else (t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1]))
                                                 for t in args.targets]
    res = run.intervene(image, _edit_args(args.edit, args.add), targets=targets)
    if args.json:
        from .pipeline.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(res.to_dict(args.top), indent=1))
    name = {c.id: c.name for c in run.classes}
    print("class probabilities (before → after):")
    for c, b, a in res.top_classes(args.top):
        print(f"  {name.get(c, c)}: {b:.6g} → {a:.6g}")
    moved = [c for c in sorted(res.concepts, key=lambda c: -abs(c.change))[:args.top] if c.change != 0]
    if res.concepts and not moved:
        print("no later concept changed (is the edited concept active in this image?)")
    if moved:
        print("later concepts that changed most (Σ of the code over positions, before → after):")
        for c in moved:
            print(f"  {c.layer}:{c.concept}: {c.before:.4g} → {c.after:.4g}")
    return 0


def cmd_export(args) -> int:
    from .api import Run

    run = Run.open(args.run, device=args.device)
    kind, which = next((k, w) for k, w in (("image", args.image), ("class", args.class_), ("pair", args.pair))
                       if w is not None)
    graph = run.export(kind, which, format=args.format, probabilities=not args.no_probabilities)
    out = args.out or f"{graph['metadata']['slug']}.json"
    from .pipeline.files import save_json
    save_json(out, graph)
    print(f"export: {kind} graph, {len(graph['nodes'])} nodes, {len(graph['links'])} links → {out}")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    print(f"gig-fast serve: {args.run} on http://{args.host}:{args.port}/ (API under /api, docs /api/docs); "
          "Ctrl-C stops it", flush=True)
    serve(args.run, host=args.host, port=args.port, device=args.device)
    return 0


def cmd_report(args) -> int:
    from .report import rebuild_report

    t0 = time.perf_counter()
    path = rebuild_report(args.run, html=args.html, max_images=args.images)
    print(f"report: wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0
def _split_validation(path):
    """Pipeline options and the ``validation:`` mapping of a config file (either may be empty)."""
    from .pipeline.config import read_config_file

    if path is None:
        return {}, {}
    p = Path(path)
    data = read_config_file(p)  # a syntax error names the file and the line
    val = data.pop("validation", None) or {}
    if not isinstance(val, dict):
        raise ValueError(f"'validation' in {p} must be a mapping of validation options")
    return data, val


def cmd_validate(args) -> int:
    from .pipeline import Pipeline, PipelineConfig, demo_config
    from .report import publish
    from .run_folder import VALIDATION_MD
    from .validation import ValidationOptions, validate

    t0 = time.perf_counter()
    data, vopts = _split_validation(args.config)
    data.update(_overrides(args.set))
    data.update({k: v for k, v in {"device": args.device, "backend": args.backend, "out": args.out}.items()
                 if v is not None})
    if args.no_progress:
        data["progress"] = False
    if args.demo:
        weights, _ = _demo_weights("resnet", data.pop("weights", None))
        cfg = demo_config(weights=weights, **data)
    elif args.config is None:
        raise ValueError("validate needs --config FILE or --demo")
    else:
        cfg = PipelineConfig(**_checked(data))
    vopts.update(_overrides(args.vset))
    if args.no_progress:
        vopts["progress"] = False
    opts = ValidationOptions.from_dict(vopts)
    pipe = Pipeline(cfg)
    pipe.run()
    publish(pipe)  # the page the validation section goes into
    t1 = time.perf_counter()
    doc = validate(pipe, opts)
    print((Path(cfg.out) / VALIDATION_MD).read_text())
    print(f"validate: wrote {cfg.out}/validation.json, validation.md, validation_plots/ "
          f"(pipeline {t1 - t0:.1f} s, validation {time.perf_counter() - t1:.1f} s, wall {time.perf_counter() - t0:.1f} s)")
    return 0 if doc else 1


def _checked(data: dict) -> dict:
    from .pipeline.config import load_config

    return load_config(None, **data).to_dict()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "demo": cmd_demo, "train-demo": cmd_train_demo, "explain": cmd_explain,
                "intervene": cmd_intervene, "export": cmd_export,
                "show": cmd_show, "report": cmd_report, "serve": cmd_serve, "validate": cmd_validate}[args.command](args)
    except (ValueError, OSError) as e:  # a user error (bad option, file, image, data): one line, no traceback
        print(f"gig-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
