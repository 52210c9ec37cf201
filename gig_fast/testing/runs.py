"""A tiny finished run that ``gig-fast serve`` reopens by itself (made only from names in its
configuration): for the server tests and the small mode of ``benchmarks/bench_serve.py``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["TINY_LAYERS", "named_tiny_run"]

TINY_LAYERS = ["layer3.5", "layer4.0", "layer4.2"]


def named_tiny_run(root: str | Path, class_names=("<b>tee</b>", "boot & shoe", "bag"), **config) -> Path:
    """Write into ``root`` a demo net of width 2 with random BN statistics (``weights.pt``), a folder of
    4 random 28×28 PNGs per class (``data/c0`` …; 3 classes), run the pipeline over them into
    ``root/run`` (3 layers, K = 4, 6 explained images; ``config`` overrides) and publish it (``report.html``,
    ``concept_samples/``), as ``gig-fast run`` does. Returns ``root/run``."""
    from PIL import Image

    from ..models import DemoResNet
    from ..pipeline import Pipeline, PipelineConfig
    from ..report import publish

    root = Path(root)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = DemoResNet(base=2)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.3, generator=g)
            mod.weight.data.normal_(1.0, 0.3, generator=g)
            mod.bias.data.normal_(0.0, 0.3, generator=g)
    torch.save({"base": 2, "state_dict": model.state_dict()}, root / "weights.pt")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "data" / f"c{c}" / f"{i}.png")
    settings = dict(model="demo", weights=str(root / "weights.pt"), dataset=str(root / "data"), layers=TINY_LAYERS,
                    concept_images=12, explain_images=6, per_class=2, k=4, gig_steps=3, chunk_images=6, batch_size=6,
                    image_size=28, channels=1, mean=[0.5], std=[0.5], report_images=3, progress=False,
                    class_names=list(class_names), out=str(root / "run"),
                    graph_pairs=1)  # graph.json keeps pair 0-1; 0-2 and 1-2 come from the store
    settings.update(config)
    pipe = Pipeline(PipelineConfig(**settings))
    out = pipe.run()
    publish(pipe)
    return out
