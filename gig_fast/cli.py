"""``gig-fast``: run the pipeline, the demo, train the demo network, or explain one image.

    gig-fast demo [--out DIR]                      # the shipped demo net, full run on Fashion-MNIST
    gig-fast run --config FILE [--out DIR] ...     # YAML/JSON config; flags override it
    gig-fast train-demo [--epochs N] [--force]     # retrain the demo network (the shipped weights' recipe)
    gig-fast explain --image FILE --run DIR        # one image's graph on a finished run's concepts
    gig-fast show --run DIR --classes A B          # shared concepts of two classes in a run's graph.json
    gig-fast report --run DIR [--html FILE]        # rewrite a finished run's interactive report.html
    gig-fast validate --config FILE [--vset K=V]   # run/resume the pipeline, then the validation suite
    gig-fast validate --demo [--out DIR]           # the same on the demo configuration

Common flags: ``--device cpu|cuda``, ``--backend torch|cpp|triton|cuda`` (forces the op backend).

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
    p.add_argument("--backend", default=None, help="force the op backend: torch, cpp, triton or cuda")
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
    demo = sub.add_parser("demo", help="the README demo: demo net on Fashion-MNIST, all 16 blocks")
    demo.add_argument("--weights", default=None,
                      help="demo weights file (default: the trained weights shipped in the package)")
    demo.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override demo options")
    _common(demo)
    tr = sub.add_parser("train-demo", help="train the demo network on Fashion-MNIST (defaults: the shipped weights' schedule)")
    tr.add_argument("--epochs", type=int, default=None, help="default: the shipped weights' (DEMO_TRAINING)")
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
    sh = sub.add_parser("show", help="print the shared concepts of two classes from a run's graph.json")
    sh.add_argument("--run", default="gig_demo")
    sh.add_argument("--classes", nargs=2, required=True, help="two class names or ids")
    rp = sub.add_parser("report", help="rewrite a finished run's report.html (the interactive graph explorer)")
    rp.add_argument("--run", default="gig_demo", help="output folder of a finished run")
    rp.add_argument("--html", default=None, help="where to write the page (default: RUN/report.html)")
    rp.add_argument("--images", type=int, default=None,
                    help="explained images embedded for the image view (default: the config's report_images)")
    va = sub.add_parser("validate", help="run/resume the pipeline, then the validation suite (paper §4.2)")
    va.add_argument("--config", default=None,
                    help="pipeline config (YAML/JSON); an optional 'validation:' mapping in it holds validation options")
    va.add_argument("--demo", action="store_true", help="use the demo configuration (the shipped demo net)")
    va.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override pipeline options")
    va.add_argument("--vset", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override validation options (see gig_fast.validation.ValidationOptions), e.g. images=20")
    _common(va)
    return ap


def _overrides(pairs) -> dict:
    import yaml

    out = {}
    for item in pairs:
        if "=" not in item:
            raise SystemExit(f"gig-fast: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_train_demo(args) -> int:
    from .models import default_demo_path, train_demo

    t0 = time.perf_counter()
    path = Path(args.weights) if args.weights else default_demo_path()
    kwargs = {k: v for k, v in {"epochs": args.epochs, "seed": args.seed, "train_limit": args.train_limit}.items()
              if v is not None}
    _, info = train_demo(path, force=args.force, progress=not args.no_progress,
                         log=lambda line: print(line, flush=True), **kwargs)
    print(json.dumps({**{k: v for k, v in info.items() if k != "curve"}, "wall_s": round(time.perf_counter() - t0, 1)},
                     indent=1))
    print(f"train-demo: weights in {path} (record: {path}.json)")
    return 0


def _run_pipeline(cfg, label: str) -> Path:
    from .pipeline import Pipeline

    from .pipeline import distributed as dist

    t0 = time.perf_counter()
    out = Pipeline(cfg).run()
    if dist.is_main():  # one report per job, not one per torchrun rank
        print(f"{label}: wrote {out}/graph.json, metrics.json, report.html in {time.perf_counter() - t0:.1f} s")
    return out


def _summary(out: Path) -> None:
    m = json.loads((out / "metrics.json").read_text())
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


def _demo_weights(weights: str | None) -> tuple[str | None, dict]:
    """The demo's weights (a file, or None for the ones shipped in the package) and their training record."""
    from .models import load_demo, shipped_demo_info

    if weights is None:
        return None, shipped_demo_info()
    load_demo(weights)  # a missing or unreadable file fails here, before any pipeline work
    meta = Path(str(weights) + ".json")
    return str(weights), (json.loads(meta.read_text()) if meta.exists() else {})


def cmd_demo(args) -> int:
    from .pipeline import demo_config

    t0 = time.perf_counter()
    weights, info = _demo_weights(args.weights)
    if "test_accuracy" in info:
        print(f"demo network: test accuracy {info['test_accuracy']:.4f} ({info.get('epochs')} epochs, "
              f"{'shipped weights' if weights is None else weights})")
    over = _overrides(args.set)
    over.update({k: v for k, v in {"device": args.device, "backend": args.backend, "out": args.out}.items()
                 if v is not None})
    if args.no_progress:
        over["progress"] = False
    cfg = demo_config(weights=weights, **over)
    out = _run_pipeline(cfg, "demo")
    _summary(out)
    _show(out, "Sneaker", "Ankle boot")
    _show(out, "Shirt", "T-shirt/top")
    print(f"demo wall time {time.perf_counter() - t0:.1f} s")
    return 0


def _show(out: Path, c1: str, c2: str) -> None:
    graph = json.loads((Path(out) / "graph.json").read_text())
    names = {c["name"]: c["id"] for c in graph["classes"]}
    ids = []
    for c in (c1, c2):
        if c in names:
            ids.append(names[c])
        elif str(c).isdigit() and int(c) < len(graph["classes"]):
            ids.append(int(c))
        else:
            raise ValueError(f"unknown class {c!r}; valid: {', '.join(names)}")
    a, b = sorted(ids)
    pg = graph["pair_graphs"].get(f"{a}-{b}")
    if pg is None:
        raise ValueError("a class cannot be paired with itself")
    print(f"shared concepts of {graph['classes'][a]['name']} / {graph['classes'][b]['name']} "
          "(layer: concept (min normalised importance)):")
    for layer in [lay["name"] for lay in graph["layers"]][::-1]:
        if layer in pg["shared"]:
            print(f"  {layer}: " + ", ".join(f"#{s['concept']} ({s['score']:.2f})" for s in pg["shared"][layer]))


def cmd_show(args) -> int:
    _show(Path(args.run), *args.classes)
    return 0


def cmd_explain(args) -> int:
    from .data import load_image
    from .pipeline.config import PipelineConfig
    from .pipeline.explain import explain_image, find_work
    from .pipeline.store import load_json

    run_dir = Path(args.run or args.out or "gig_demo")
    cfg = PipelineConfig(**load_json(find_work(run_dir) / "config.json")["config"])
    if cfg.dataset == "fashion-mnist":
        from .models import DEMO_MEAN, DEMO_STD
        image = load_image(args.image, 28, 1, (DEMO_MEAN,), (DEMO_STD,))
    else:
        pre = cfg.preprocessing()
        kw = dict(size=pre["image_size"], channels=pre["channels"], mean=pre["mean"], std=pre["std"])
        if args.image.startswith("photo:"):  # a photo that ships offline, e.g. photo:chelsea
            from .data import OfflinePhotos
            image = OfflinePhotos([args.image[len("photo:"):]], **kw)[0][0]
        else:
            image = load_image(args.image, **kw)
    from .ops import use_backend
    import contextlib
    with use_backend(args.backend) if args.backend else contextlib.nullcontext():
        result = explain_image(run_dir, image, target=args.target, device=args.device)
    text = json.dumps(result, indent=1)
    if args.json:
        from .pipeline.store import atomic_write_text
        atomic_write_text(args.json, text)
        print(f"explain: {result['class_name']} (prediction {result['prediction']}) → {args.json}")
    else:
        print(text)
    return 0


def cmd_report(args) -> int:
    from .pipeline import rebuild_report

    t0 = time.perf_counter()
    path = rebuild_report(args.run, html=args.html, max_images=args.images)
    print(f"report: wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0
def _split_validation(path):
    """Pipeline options and the ``validation:`` mapping of a config file (either may be empty)."""
    import yaml

    if path is None:
        return {}, {}
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    data = json.loads(p.read_text()) if p.suffix.lower() == ".json" else (yaml.safe_load(p.read_text()) or {})
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of options")
    val = data.pop("validation", None) or {}
    if not isinstance(val, dict):
        raise ValueError(f"'validation' in {p} must be a mapping of validation options")
    return data, val


def cmd_validate(args) -> int:
    from .pipeline import Pipeline, PipelineConfig, demo_config
    from .validation import ValidationOptions, validate

    t0 = time.perf_counter()
    data, vopts = _split_validation(args.config)
    data.update(_overrides(args.set))
    data.update({k: v for k, v in {"device": args.device, "backend": args.backend, "out": args.out}.items()
                 if v is not None})
    if args.no_progress:
        data["progress"] = False
    if args.demo:
        weights, _ = _demo_weights(data.pop("weights", None))
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
    t1 = time.perf_counter()
    doc = validate(pipe, opts)
    print((Path(cfg.out) / "validation.md").read_text())
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
                "show": cmd_show, "report": cmd_report, "validate": cmd_validate}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gig-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
