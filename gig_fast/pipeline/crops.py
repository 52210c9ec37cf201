"""Pictures of stage-1 samples for the validation's appendix figures, read from a pipeline's work folder:
iERF crops with context (:func:`sample_crops`) and the samples nearest to a concept (:func:`nearest_samples`).
The report page's pictures are read through :class:`gig_fast.Run` instead (:mod:`gig_fast.report.collect`)."""
from __future__ import annotations

from ..explorer.pictures import display_rgb, ierf_crop
from .samples import nearest_rows, stage1_samples
from .stages import load_concepts

__all__ = ["sample_crops", "nearest_samples"]


def sample_crops(pipe, layer: str, rows, max_px: int = 96) -> dict[int, dict]:
    """For global stage-1 ``rows`` of ``layer``: ``{row: {"image", "position", "label", "crop"}}`` with
    ``crop`` the iERF-with-context picture (uint8 ``[h, w, 3]``, or None when the run kept no iERFs)."""
    meta, maps = stage1_samples(pipe.work, layer, rows)
    ids = sorted({m[0] for m in meta.values()}) if maps else []
    x = pipe.load_images(ids)[0] if ids else None
    pics = {img: display_rgb(x[j]) for j, img in enumerate(ids)}
    return {r: {"image": m[0], "position": m[1], "label": m[2],
                "crop": ierf_crop(pics[m[0]], maps[r], max_px=max_px) if r in maps else None}
            for r, m in meta.items()}


def nearest_samples(pipe, layer: str, concepts: list[int], k: int):
    """``(rows [Q, k], cosines [Q, k], member [Q, k])``: the stage-1 PFVs nearest in cosine to each concept
    (:func:`~gig_fast.pipeline.samples.nearest_rows` on the pipeline's work folder)."""
    c = load_concepts(pipe, layer)
    return nearest_rows(pipe.work, layer, c["V"], c["beta"], c["labels"], list(concepts), k)
