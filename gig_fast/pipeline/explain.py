"""One image's concept graph against the stored concepts of a finished run (kept for older callers:
:meth:`gig_fast.Run.explain` is the public way)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..api.run import Run

__all__ = ["explain_image", "find_work"]


def find_work(out: Path) -> Path:
    """The work folder (``<out>/work-<key>``) of the newest finished run in the output folder ``out``."""
    works = sorted(Path(out).glob("work-*/concepts"))
    if not works:
        raise FileNotFoundError(f"no finished run with concepts under {out}; run `gig-fast run` or `gig-fast demo` first")
    return max(works, key=lambda p: p.stat().st_mtime).parent


def explain_image(run_dir: str | Path, image: torch.Tensor, *, target: int | None = None, model=None,
                  top: int | None = None, device: str | None = None) -> dict:
    """GIG graph of one image (``[C, H, W]``, preprocessed) on a run's concepts, in the ``images[]``
    form of ``docs/graph_schema.md`` plus ``class_name`` and ``completeness_max_abs``
    (:meth:`gig_fast.Run.explain`'s :class:`~gig_fast.api.Explanation` as a dict). For an explained
    image it is that image's ``images[]`` entry (stage 4's image pass; up to float rounding)."""
    run = Run.open(run_dir, model=model, device=device or "cpu")
    return run.explain(image, target=target, top=top).to_dict()
